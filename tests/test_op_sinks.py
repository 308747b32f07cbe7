"""Attention sinks (``maskvl/ops/sinks.py``): the exact correction applied to every backend's sink-free
leave-one-out, leave-group-out and decode attention, against the plain reference that puts the sink in
the softmax as one more column and removes every key or set explicitly (float64 and float32), including
keys and groups holding nearly all the mass, dominant and negligible sinks, and a single key."""

from __future__ import annotations

import pytest
import torch

from maskvl.ops import get_backend, sinks
from maskvl.ops.decode_attention import decode_attention_reference
from maskvl.ops.testing import compiled_backend

# The Triton cases run on CUDA under `make gpu-check` (-m cuda), else in the interpreter.
BACKENDS = ["reference", "cpp", pytest.param("triton", marks=pytest.mark.cuda)]
# (T, D, H, KV): odd sequence and head sizes, GQA 1 and 3, a single key
SHAPES = [(97, 48, 6, 2), (33, 24, 4, 4), (1, 16, 3, 1)]
SINK_LEVELS = {"negligible": -30.0, "comparable": 0.0, "dominant": 25.0}


def _backend(name):
    """The backend and the device its inputs go to."""
    if name == "reference":
        return get_backend("reference"), torch.device("cpu")
    return compiled_backend(name)


def _inputs(T, D, H, KV, dtype, seed, peaked=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(H, D, generator=g, dtype=torch.float64)
    k = torch.randn(T, KV, D, generator=g, dtype=torch.float64)
    v = torch.randn(T, KV, D, generator=g, dtype=torch.float64)
    if peaked:  # every head's attention almost all on key T // 2: a_p -> 1
        heads = torch.arange(H) // (H // KV)
        k[T // 2] = 0
        for h in range(H):
            k[T // 2, heads[h]] += 4.0 * q[h]
    c = torch.randn(H, generator=g, dtype=torch.float64) * 2
    return q.to(dtype), k.to(dtype), v.to(dtype), c


def _tol(dtype):
    return (1e-10, 1e-12) if dtype == torch.float64 else (2e-4, 2e-6)


def _close(got, want, dtype, what):
    rtol, atol = _tol(dtype)
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", list(SINK_LEVELS))
@pytest.mark.parametrize("peaked", [False, True], ids=["spread", "peaked"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-D{}-H{}-KV{}".format(*s))
def test_loo_with_sinks(backend, level, peaked, dtype, shape):
    T, D, H, KV = shape
    q, k, v, c = _inputs(T, D, H, KV, dtype, seed=T + D, peaked=peaked and T > 1)
    c = c + SINK_LEVELS[level]
    be, dev = _backend(backend)
    o, delta = be.loo_attention(q.to(dev), k.to(dev), v.to(dev), 0.3)
    o_s, delta_s = sinks.loo_attention(o, delta, q.to(dev), k.to(dev), 0.3, c.to(dev))
    want_o, want_d = sinks.masked_outputs_reference(q, k, v, 0.3, c, [[p] for p in range(T)])
    _close(o_s.cpu(), want_o, dtype, "o")
    _close(delta_s.cpu(), want_d, dtype, "delta")


def _groups(T: int) -> list[list[int]]:
    return [[0], [T - 1], list(range(0, T, 3)), list(range(T // 4, T // 2 + 1)), [],
            list(range(T // 3, T)), list(range(T))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", list(SINK_LEVELS))
@pytest.mark.parametrize("peaked", [False, True], ids=["spread", "peaked"])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "T{}-D{}-H{}-KV{}".format(*s))
def test_groups_with_sinks(backend, level, peaked, shape):
    T, D, H, KV = shape
    q, k, v, c = _inputs(T, D, H, KV, torch.float64, seed=3 * T, peaked=peaked)
    c = c + SINK_LEVELS[level]
    groups = _groups(T)
    members = torch.tensor([p for g in groups for p in g], dtype=torch.int64)
    offsets = torch.tensor([0] + [len(g) for g in groups]).cumsum(0)
    be, dev = _backend(backend)
    o, delta = be.loo_group_attention(q.to(dev), k.to(dev), v.to(dev), 0.3, members.to(dev), offsets.to(dev))
    o_s, delta_s = sinks.loo_group_attention(o, delta, q.to(dev), k.to(dev), 0.3, members, offsets, c.to(dev))
    o_s, delta_s = o_s.cpu(), delta_s.cpu()
    want_o, want_d = sinks.masked_outputs_reference(q, k, v, 0.3, c, groups)
    _close(o_s, want_o, torch.float64, "o")
    _close(delta_s, want_d, torch.float64, "delta")
    # the group of every key leaves only the sink: zero output
    assert torch.equal(o_s + delta_s[-1], torch.zeros_like(o_s))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", list(SINK_LEVELS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_decode_with_sinks(backend, level, dtype):
    T, D, H, KV, B = 41, 24, 6, 2, 9
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, H, D, generator=g, dtype=torch.float64).to(dtype)
    kp, vp = (torch.randn(T, KV, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    ko, vo = (torch.randn(B, KV, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    c = torch.randn(H, generator=g, dtype=torch.float64) + SINK_LEVELS[level]
    exclude = torch.tensor([-1, 0, 5, T, 40, -1, 3, -1, 7])
    sets = torch.zeros(2, T + 1, dtype=torch.bool)
    sets[0, 10:20] = True
    sets[1, :] = True  # every key: the row keeps only the sink
    exclude_set = torch.tensor([-1, -1, 0, -1, -1, 0, -1, 1, -1])
    be, dev = _backend(backend)
    out = be.decode_attention(*(t.to(dev) for t in (q, kp, vp, ko, vo)), 0.4, exclude.to(dev), sets.to(dev),
                              exclude_set.to(dev))
    got = sinks.decode_attention(out, q.to(dev), kp.to(dev), ko.to(dev), 0.4, exclude, sets, exclude_set,
                                 c.to(dev)).cpu()
    want = decode_attention_reference(q, kp, vp, ko, vo, 0.4, exclude, sets, exclude_set, sinks=c)
    _close(got, want, dtype, "decode")
    assert torch.equal(got[7], torch.zeros_like(got[7]))


def test_decode_is_blocked_over_rows(monkeypatch):
    """The rows' scores are computed in blocks; a tiny block gives the same result (to float64's rounding:
    a matrix product's last bit may depend on how many rows it multiplies at once)."""
    T, D, H, KV, B = 13, 8, 4, 2, 5
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, D, generator=g, dtype=torch.float64)
    kp, vp = torch.randn(T, KV, D, generator=g, dtype=torch.float64), torch.randn(T, KV, D, generator=g, dtype=torch.float64)
    ko, vo = torch.randn(B, KV, D, generator=g, dtype=torch.float64), torch.randn(B, KV, D, generator=g, dtype=torch.float64)
    c = torch.randn(H, generator=g, dtype=torch.float64)
    ex = torch.tensor([-1, 2, T, 0, -1])
    out = decode_attention_reference(q, kp, vp, ko, vo, 0.5, ex)
    whole = sinks.decode_attention(out, q, kp, ko, 0.5, ex, None, None, c)
    monkeypatch.setattr(sinks, "DECODE_BLOCK", 1)
    torch.testing.assert_close(sinks.decode_attention(out, q, kp, ko, 0.5, ex, None, None, c), whole, rtol=1e-14,
                               atol=1e-15)
