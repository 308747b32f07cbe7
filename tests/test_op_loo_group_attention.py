"""Leave-group-out attention: every backend (reference; cpp; triton, under TRITON_INTERPRET=1 on CPU)
against explicit float64 masking of the whole group, and the compiled ones against the reference;
groups holding nearly all of a head's attention mass exercise the direct recompute."""

from __future__ import annotations

import pytest
import torch

from maskvl.numerics import compute_dtype
from maskvl.ops import get_backend
from maskvl.ops.loo_attention import loo_attention_reference
from maskvl.ops.loo_group_attention import loo_group_attention_reference
from maskvl.ops.testing import (
    RTOL,
    assert_rows_close,
    backend_params,
    bruteforce_atol,
    case_id,
    compiled_backend,
    csr_groups,
    group_bruteforce,
    make_sink,
    rtol,
    shape_cases,
)

ALL = ["reference"] + backend_params()
CASES = [(T, D, H, KV, dt) for (T, D, H, KV) in shape_cases() for dt in (torch.float32, torch.float64)]
CASES += [(T, D, H, KV, torch.bfloat16) for (T, D, H, KV) in shape_cases() if D == 128 and T in (2, 1025)]


def _backend(name):
    if name == "reference":
        return get_backend("reference"), torch.device("cpu")
    return compiled_backend(name)


def _inputs(T, D, H, KV, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(H, D, generator=g, dtype=torch.float64)
    k = torch.randn(T, KV, D, generator=g, dtype=torch.float64)
    v = torch.randn(T, KV, D, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _groups(T: int, seed: int) -> list[list[int]]:
    """Singletons at both ends, a strided set, a contiguous block, a random subset in random order, an
    empty group, two overlapping groups and the whole sequence."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(T, generator=g).tolist()
    return [[0], [T - 1], list(range(0, T, 3)), list(range(T // 4, T // 2 + 1)), perm[: max(1, T // 5)], [],
            list(range(T // 3, (2 * T) // 3 + 1)), list(range(T // 2, T)), perm]


# The Triton interpreter runs one Python program per (group, head): it gets the odd head_dim at every T,
# and bf16.
MATRIX = ([pytest.param("cpp", *c, id="cpp-" + case_id(*c)) for c in CASES]
          + [pytest.param("triton", *c, id="triton-" + case_id(*c), marks=pytest.mark.cuda) for c in CASES
             if c[1] == 48 or c[4] == torch.bfloat16])


@pytest.mark.parametrize("backend_name,T,D,H,KV,dtype", MATRIX)
def test_loo_group_attention_matches_reference(backend_name, T, D, H, KV, dtype):
    backend, dev = compiled_backend(backend_name)
    q, k, v = _inputs(T, D, H, KV, dtype, seed=T * 1000 + D + H)
    members, offsets = csr_groups(_groups(T, seed=T))
    scale = D ** -0.5
    o, delta = backend.loo_group_attention(q.to(dev), k.to(dev), v.to(dev), scale, members.to(dev), offsets.to(dev))
    ro, rdelta = loo_group_attention_reference(q, k, v, scale, members, offsets)
    tol = rtol(compute_dtype(dtype), dev)
    assert_rows_close(o.cpu(), ro, tol, "o")
    assert_rows_close(delta.cpu(), rdelta, tol, "delta")


@pytest.mark.parametrize("backend_name", ALL)
@pytest.mark.parametrize("T,H,KV", [(1, 2, 1), (2, 4, 4), (97, 8, 2), (300, 6, 3)], ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_loo_group_attention_against_explicit_masking(backend_name, T, H, KV, dtype):
    """Every group's masked output equals a softmax with the whole group at -inf (float64, on the same
    rounded inputs), every row relative to its size down to the brute force's own resolution."""
    backend, dev = _backend(backend_name)
    D = 48
    q, k, v = _inputs(T, D, H, KV, dtype, seed=5 + T)
    groups = _groups(T, seed=T + 1)
    members, offsets = csr_groups(groups)
    scale = D ** -0.5
    o, delta = backend.loo_group_attention(q.to(dev), k.to(dev), v.to(dev), scale, members.to(dev), offsets.to(dev))
    bo, bdelta = group_bruteforce(q, k, v, scale, groups)
    cd = compute_dtype(dtype)
    tol = rtol(cd, dev)
    assert_rows_close(o.cpu(), bo.to(cd), tol, "o vs explicit masking")
    assert_rows_close(delta.cpu(), bdelta.to(cd), tol, "delta vs explicit masking", atol=bruteforce_atol(v, T))
    # The empty group changes nothing; the whole sequence leaves nothing (masked output 0).
    assert bool((delta[5] == 0).all())
    assert torch.equal(delta[-1].cpu(), -o.cpu())


@pytest.mark.parametrize("backend_name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_singleton_groups_equal_the_single_key_op(backend_name, dtype):
    backend, dev = _backend(backend_name)
    T, D, H, KV = 61, 24, 6, 2
    q, k, v = _inputs(T, D, H, KV, dtype, seed=9)
    k = make_sink(q, k, D ** -0.5, key=7, gap=15.0)  # the singleton {7} holds almost all the mass
    members, offsets = csr_groups([[p] for p in range(T)])
    o, delta = backend.loo_group_attention(q.to(dev), k.to(dev), v.to(dev), D ** -0.5, members.to(dev),
                                           offsets.to(dev))
    lo, ldelta = loo_attention_reference(q, k, v, D ** -0.5)
    tol = rtol(compute_dtype(dtype), dev)
    assert_rows_close(o.cpu(), lo, tol, "o")
    assert_rows_close(delta.cpu(), ldelta, tol, "delta")


SAFEGUARD = [(kind, gap, dt) for kind in ("sink-in-group", "all-but-two") for gap in (15.0, 30.0)
             for dt in (torch.float32, torch.float64)]


@pytest.mark.parametrize("backend_name", ALL)
@pytest.mark.parametrize("kind,gap,dtype", SAFEGUARD, ids=[f"{k}-gap{g:g}-{str(d)[6:]}" for k, g, d in SAFEGUARD])
def test_group_holding_nearly_all_mass(backend_name, kind, gap, dtype):
    """A group with 1 - A ~ e^-gap: the closed form's denominator cancels (float32: relative errors of
    order one), so those (head, group) pairs must be recomputed directly. ``sink-in-group``: a key
    scoring `gap` above the rest for every head, inside a 5-key group; ``all-but-two``: a group of
    every key except two that score `gap` below the rest. Compared with explicit float64 masking of
    the same rounded inputs; a group just under half the mass checks the closed form's side."""
    backend, dev = _backend(backend_name)
    T, D, H, KV = 97, 64, 8, 2
    scale = D ** -0.5
    q, k, v = _inputs(T, D, H, KV, dtype, seed=21)
    if kind == "sink-in-group":
        k = make_sink(q, k, scale, key=40, gap=gap)
        heavy = [38, 39, 40, 41, 90]
    else:
        low = [3, 50]
        # Keys 3 and 50 score `gap` below the best key: the rest holds all but ~e^-gap of the mass.
        k = make_sink(q, k, scale, key=3, gap=-gap)
        k = make_sink(q, k, scale, key=50, gap=-gap)
        heavy = [p for p in range(T) if p not in low]
    # A group just under half of head 0's mass (greedy by weight), to check the closed-form side.
    heads = torch.arange(H) // (H // KV)
    a0 = torch.softmax(torch.einsum("d,td->t", q[0].double(), k[:, heads[0]].double()) * scale, -1)
    order = a0.argsort(descending=True).tolist()
    half, mass = [], 0.0
    for p in order:
        if mass + a0[p] < 0.45 and p not in heavy:
            half.append(p)
            mass += float(a0[p])
    groups = [heavy, half, [0, 1, 2]]
    members, offsets = csr_groups(groups)
    o, delta = backend.loo_group_attention(q.to(dev), k.to(dev), v.to(dev), scale, members.to(dev), offsets.to(dev))
    delta = delta.cpu()
    bo, bdelta = group_bruteforce(q, k, v, scale, groups)
    cd = compute_dtype(dtype)
    tol = rtol(cd, dev)
    assert bdelta[0].abs().amax(-1).min() > 0.05  # the heavy group's change is O(1): no atol hides it
    assert_rows_close(delta[0], bdelta[0].to(cd), tol, "delta[heavy group] vs explicit masking")
    assert_rows_close(delta, bdelta.to(cd), tol, "delta vs explicit masking", atol=bruteforce_atol(v, T))
    if dtype == torch.float32:
        # Without the direct recompute the closed form is far off here: the safeguard is what passes.
        a = torch.softmax(torch.einsum("hd,thd->ht", q, k[:, heads]) * scale, -1)
        idx = torch.tensor(heavy)
        A = a[:, idx].sum(-1, keepdim=True)
        U = torch.einsum("ht,thd->hd", a[:, idx], v[idx][:, heads])
        naive = (A * o.cpu() - U) / (1 - A)
        err = (naive.double() - bdelta[0]).abs().amax(-1) / bdelta[0].abs().amax(-1)
        assert not bool((err <= 100 * RTOL[cd]).all())  # far off, or not finite at all (1 - A rounds to 0)


@pytest.mark.parametrize("backend_name", ALL)
def test_loo_group_attention_strided_kv_cache(backend_name):
    backend, dev = _backend(backend_name)
    T, D, H, KV = 70, 64, 8, 2
    q, k, v = _inputs(T, D, H, KV, torch.float32, seed=3)
    kt = k.transpose(0, 1).contiguous().to(dev).transpose(0, 1)
    vt = v.transpose(0, 1).contiguous().to(dev).transpose(0, 1)
    members, offsets = csr_groups(_groups(T, seed=4))
    o, delta = backend.loo_group_attention(q.to(dev), kt, vt, D ** -0.5, members.to(dev), offsets.to(dev))
    ro, rdelta = loo_group_attention_reference(q, k, v, D ** -0.5, members, offsets)
    assert_rows_close(o.cpu(), ro, rtol(torch.float32, dev), "o")
    assert_rows_close(delta.cpu(), rdelta, rtol(torch.float32, dev), "delta")


@pytest.mark.parametrize("backend_name", ALL)
@pytest.mark.parametrize("members,offsets,match", [
    ([0, 5], [0, 2], "lie in"),  # position 5 of 5 keys
    ([0, -1], [0, 2], "lie in"),
    ([0, 1], [1, 2], "rise from 0"),
    ([0, 1], [0, 2, 1], "rise from 0"),
    ([0, 1], [0, 1], "rise from 0"),  # the last offset must be len(members)
], ids=["past-end", "negative", "first-offset", "decreasing", "short"])
def test_loo_group_attention_rejects_bad_groups(backend_name, members, offsets, match):
    backend, dev = _backend(backend_name)
    q, k, v = (x.to(dev) for x in _inputs(5, 16, 2, 1, torch.float32, seed=0))
    with pytest.raises((RuntimeError, ValueError), match=match):
        backend.loo_group_attention(q, k, v, 0.25, torch.tensor(members, device=dev), torch.tensor(offsets, device=dev))
