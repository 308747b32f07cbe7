"""Compiled shared-prefix decode attention (cpp; triton, under TRITON_INTERPRET=1 on CPU) against the
reference (explicit -inf masking)."""

from __future__ import annotations

import pytest
import torch

from maskvl.numerics import compute_dtype
from maskvl.ops.decode_attention import decode_attention_reference
from maskvl.ops.testing import assert_rows_close, backend_params, case_id, compiled_backend, rtol, shape_cases

BACKENDS = backend_params()
CASES = [(T, D, H, KV, dt) for (T, D, H, KV) in shape_cases() for dt in (torch.float32, torch.float64)]
CASES += [(T, D, H, KV, torch.bfloat16) for (T, D, H, KV) in shape_cases() if D == 128 and T in (2, 1025)]


def _inputs(B, T, D, H, KV, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return mk(B, H, D), mk(T, KV, D), mk(T, KV, D), mk(B, KV, D), mk(B, KV, D)


def _exclude(B, T):
    """None, the first and last prefix key, the own row, a middle key, and out-of-range values (= none)."""
    base = [-1, 0, T - 1, T, T // 2, -5, T + 3, 1 % T]
    return torch.tensor([base[i % len(base)] for i in range(B)], dtype=torch.int64)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("T,D,H,KV,dtype", CASES, ids=[case_id(*c) for c in CASES])
def test_decode_attention_matches_reference(backend_name, T, D, H, KV, dtype):
    backend, dev = compiled_backend(backend_name)
    B = 9 if T < 1025 else 5
    q, kp, vp, ko, vo = _inputs(B, T, D, H, KV, dtype, seed=T + D + H)
    ex = _exclude(B, T)
    scale = D ** -0.5
    out = backend.decode_attention(*(x.to(dev) for x in (q, kp, vp, ko, vo)), scale, ex.to(dev))
    ref = decode_attention_reference(q, kp, vp, ko, vo, scale, ex)
    assert_rows_close(out.cpu(), ref, rtol(compute_dtype(dtype), dev), "out")


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("gap", [15.0, 30.0], ids=lambda g: f"gap{g:g}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_decode_attention_sink(backend_name, gap, dtype):
    """Prefix key 3 scores `gap` above the rest for every variant and head; variants exclude it or not.
    Compared with explicit float64 masking of the same (rounded) inputs."""
    backend, dev = compiled_backend(backend_name)
    B, T, D, H, KV = 6, 97, 64, 8, 2
    q, kp, vp, ko, vo = _inputs(B, T, D, H, KV, dtype, seed=11)
    q[:] = q[0]  # one query for all variants, so one key can be a sink for all of them
    G = H // KV
    scale = D ** -0.5
    k64 = kp.double()
    for kv in range(KV):
        Q = q[0, kv * G:(kv + 1) * G].double()
        s = scale * Q @ k64[:, kv].T
        s[:, 3] = float("-inf")
        target = (torch.maximum(s.amax(-1), scale * (Q * ko[:, kv].double().unsqueeze(1)).sum(-1).amax(0)) + gap) / scale
        k64[3, kv] = torch.linalg.lstsq(Q, target.unsqueeze(-1)).solution.squeeze(-1)
    kp = k64.to(dtype)
    ex = torch.tensor([-1, 3, 3, T, 0, 3])
    out = backend.decode_attention(*(x.to(dev) for x in (q, kp, vp, ko, vo)), scale, ex.to(dev))
    ref = decode_attention_reference(q.double(), kp.double(), vp.double(), ko.double(), vo.double(), scale, ex)
    cd = compute_dtype(dtype)
    assert_rows_close(out.cpu(), ref.to(cd), rtol(cd, dev), "out vs float64 masking")


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_attention_strided_cache(backend_name, dtype):
    """Prefix as a transposed view of a [KV, T, D] cache and own rows as a slice: no copies needed."""
    backend, dev = compiled_backend(backend_name)
    B, T, D, H, KV = 7, 50, 48, 6, 2
    q, kp, vp, ko, vo = _inputs(B, T, D, H, KV, dtype, seed=2)
    kc, vc = kp.transpose(0, 1).contiguous().to(dev), vp.transpose(0, 1).contiguous().to(dev)
    own = torch.stack([ko, vo], 1).to(dev)  # [B, 2, KV, D]
    ex = _exclude(B, T)
    out = backend.decode_attention(q.to(dev), kc.transpose(0, 1), vc.transpose(0, 1), own[:, 0], own[:, 1], D ** -0.5,
                                   ex.to(dev))
    ref = decode_attention_reference(q, kp, vp, ko, vo, D ** -0.5, ex)
    assert_rows_close(out.cpu(), ref, rtol(compute_dtype(dtype), dev), "out")


def _sets(N, T, seed):
    """Key sets [N, T + 1]: empty, the own row only, a prefix block with the own row, a random half, and
    every prefix key (then only the own row is left)."""
    g = torch.Generator().manual_seed(seed)
    sets = torch.zeros(N, T + 1, dtype=torch.bool)
    for n in range(N):
        kind = n % 5
        if kind == 1:
            sets[n, T] = True
        elif kind == 2:
            sets[n, T // 3:(2 * T) // 3 + 1] = True
            sets[n, T] = True
        elif kind == 3:
            sets[n, :T] = torch.rand(T, generator=g) < 0.5
        elif kind == 4:
            sets[n, :T] = True
    return sets


# The Triton interpreter gets the odd head_dim at every T, and bf16.
SET_CASES = ([pytest.param("cpp", *c, id="cpp-" + case_id(*c)) for c in CASES]
             + [pytest.param("triton", *c, id="triton-" + case_id(*c), marks=pytest.mark.cuda) for c in CASES
                if c[1] == 48 or c[4] == torch.bfloat16])


@pytest.mark.parametrize("backend_name,T,D,H,KV,dtype", SET_CASES)
def test_decode_attention_with_key_sets_matches_reference(backend_name, T, D, H, KV, dtype):
    """Rows that also leave out a key set (group knockout), mixed with rows that name none and with
    single excluded keys; each checked against the reference (explicit -inf masking)."""
    backend, dev = compiled_backend(backend_name)
    B = 11 if T < 1025 else 6
    q, kp, vp, ko, vo = _inputs(B, T, D, H, KV, dtype, seed=T + D + H + 1)
    sets = _sets(5, T, seed=T)
    which = torch.tensor([(b * 2) % 6 - 1 for b in range(B)])  # -1 (none), then sets 1, 3, 0, 2, 4, ...
    ex = torch.tensor([-1 if b % 3 else (b * 7) % (T + 1) for b in range(B)])
    scale = D ** -0.5
    out = backend.decode_attention(*(x.to(dev) for x in (q, kp, vp, ko, vo)), scale, ex.to(dev), sets.to(dev),
                                   which.to(dev))
    ref = decode_attention_reference(q, kp, vp, ko, vo, scale, ex, sets, which)
    assert_rows_close(out.cpu(), ref, rtol(compute_dtype(dtype), dev), "out")
    # Rows that name no set equal the single-key path exactly (the same arithmetic).
    plain = backend.decode_attention(*(x.to(dev) for x in (q, kp, vp, ko, vo)), scale, ex.to(dev)).cpu()
    none = which < 0
    assert torch.equal(out.cpu()[none], plain[none])


def test_decode_attention_reference_key_sets_are_explicit_masking():
    """The reference's set semantics, spelled out per row: a softmax over the T + 1 keys with the set's
    keys and the excluded key at -inf."""
    B, T, H, KV, D = 7, 23, 4, 2, 16
    q, kp, vp, ko, vo = _inputs(B, T, D, H, KV, torch.float64, seed=1)
    sets = _sets(5, T, seed=2)
    which = torch.tensor([-1, 0, 1, 2, 3, 4, 2])
    ex = torch.tensor([4, -1, 5, T, 0, -1, -1])
    out = decode_attention_reference(q, kp, vp, ko, vo, 0.3, ex, sets, which)
    heads = torch.arange(H) // (H // KV)
    for b in range(B):
        keys = torch.cat([kp, ko[b:b + 1]])[:, heads]  # [T + 1, H, D]
        vals = torch.cat([vp, vo[b:b + 1]])[:, heads]
        s = torch.einsum("hd,thd->ht", q[b], keys) * 0.3
        drop = torch.zeros(T + 1, dtype=torch.bool)
        if ex[b] >= 0:
            drop[ex[b]] = True
        if which[b] >= 0:
            drop |= sets[which[b]]
        s[:, drop] = float("-inf")
        want = torch.einsum("ht,thd->hd", torch.softmax(s, -1), vals)
        torch.testing.assert_close(out[b], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_decode_attention_rejects_bad_key_sets(backend_name):
    backend, dev = compiled_backend(backend_name)
    B, T, H, KV, D = 3, 5, 2, 1, 16
    args = [x.to(dev) for x in _inputs(B, T, D, H, KV, torch.float32, seed=0)]
    ex = torch.full((B,), -1, device=dev)
    sets = torch.zeros(2, T + 1, dtype=torch.bool, device=dev)
    with pytest.raises((RuntimeError, ValueError), match="go together"):
        backend.decode_attention(*args, 0.25, ex, sets, None)
    with pytest.raises((RuntimeError, ValueError), match="names set 2"):
        backend.decode_attention(*args, 0.25, ex, sets, torch.tensor([0, 2, -1], device=dev))
    with pytest.raises((RuntimeError, ValueError), match=r"bool \[N, 6\]"):
        backend.decode_attention(*args, 0.25, ex, sets[:, :T], torch.tensor([0, 1, -1], device=dev))
