"""Gated-delta-rule knockout of position sets (group runs at Qwen3.5's linear layers): the difference scan
against one literal recurrence per group (float64), against the single-position op for singleton groups, on
odd shapes with grouped heads, gates near 0, near 1 and mixed, overlapping and scattered groups, NaN-filled
outputs that every group must overwrite, and the chunking over groups."""

from __future__ import annotations

import pytest
import torch

from maskvl.ops import Backend, gated_delta_group_knockout as gdg
from maskvl.ops.gated_delta_group_knockout import gated_delta_group_knockout_naive, gated_delta_group_knockout_reference
from maskvl.ops.gated_delta_knockout import gated_delta_knockout_reference
from maskvl.ops.testing import GATES, gated_delta_inputs


def _csr(groups: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    members = torch.tensor([p for grp in groups for p in sorted(set(grp))], dtype=torch.int64)
    offsets = torch.tensor([0] + [len(set(grp)) for grp in groups], dtype=torch.int64).cumsum(0)
    return members, offsets


def _groups(T: int) -> list[list[int]]:
    """Contiguous blocks, a scattered set, overlapping sets, a singleton, the final position, everything."""
    g = [list(range(0, min(T, 5))), list(range(T // 2, T)), [p for p in range(T) if p % 7 == 3] or [0],
         [T // 3], [T - 1], list(range(T))]
    return g + [list(range(T // 4, T // 2 + 1))]


CASES = [(T, gates) for T in (1, 2, 23, 97) for gates in GATES]


@pytest.mark.parametrize("T,gates", CASES, ids=[f"T{T}-Hk2-Hv4-dk24-dv20-{g}" for T, g in CASES])
def test_group_knockout_matches_one_recurrence_per_group(T: int, gates: str) -> None:
    q, k, v, g, beta = gated_delta_inputs(T, 2, 4, 24, 20, gates, seed=7 * T + len(gates))
    members, offsets = _csr(_groups(T))
    o, delta = gated_delta_group_knockout_reference(q[-1], k, v, g, beta, 24 ** -0.5, True, members, offsets)
    no, ndelta = gated_delta_group_knockout_naive(q[-1], k, v, g, beta, 24 ** -0.5, True, members, offsets)
    assert not torch.isnan(delta).any()
    scale = float(no.abs().max())
    torch.testing.assert_close(o, no, rtol=0, atol=1e-13 * scale)
    # Each group's change against its own literal run: to float64's resolution of the readout.
    torch.testing.assert_close(delta, ndelta, rtol=0, atol=1e-12 * scale)
    # Not vacuous: removing every write leaves nothing to read (o^(-all) = 0), a large change.
    torch.testing.assert_close(delta[5], -no, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("T", [1, 31, 97])
def test_singletons_equal_the_single_position_op(T: int) -> None:
    q, k, v, g, beta = gated_delta_inputs(T, 1, 3, 16, 12, "mixed", seed=T)
    members, offsets = _csr([[p] for p in range(T)])
    o, delta = gated_delta_group_knockout_reference(q[-1], k, v, g, beta, 16 ** -0.5, True, members, offsets)
    o1, delta1 = gated_delta_knockout_reference(q[-1], k, v, g, beta, 16 ** -0.5, True)
    scale = float(o1.abs().max())
    torch.testing.assert_close(o, o1, rtol=0, atol=1e-13 * scale)
    torch.testing.assert_close(delta, delta1, rtol=0, atol=1e-12 * scale)


def test_chunks_over_groups_and_backends(monkeypatch) -> None:
    """Groups processed a few at a time (a tiny chunk budget) give the same rows; every backend runs it."""
    T = 40
    q, k, v, g, beta = gated_delta_inputs(T, 2, 2, 8, 8, "mixed", seed=3)
    members, offsets = _csr(_groups(T))
    whole = gated_delta_group_knockout_reference(q[-1], k, v, g, beta, 8 ** -0.5, True, members, offsets)
    monkeypatch.setattr(gdg, "CHUNK_BYTES", 1)
    chunked = gated_delta_group_knockout_reference(q[-1], k, v, g, beta, 8 ** -0.5, True, members, offsets)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
    from maskvl.ops.testing import compiled_backend

    for be in (Backend(), compiled_backend("cpp")[0]):
        got = be.gated_delta_group_knockout(q[-1], k, v, g, beta, 8 ** -0.5, True, members, offsets)
        for a, b in zip(got, chunked):
            torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


def test_bad_groups_are_refused() -> None:
    q, k, v, g, beta = gated_delta_inputs(5, 1, 1, 4, 4, "mixed", seed=0)
    for members, offsets in ((torch.tensor([0, 9]), torch.tensor([0, 2])), (torch.tensor([1]), torch.tensor([0, 0, 1]))):
        with pytest.raises(ValueError, match="gated_delta_group_knockout"):
            gated_delta_group_knockout_reference(q[-1], k, v, g, beta, 0.5, True, members, offsets)
