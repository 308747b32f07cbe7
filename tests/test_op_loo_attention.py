"""Compiled leave-one-out attention (cpp; triton, under TRITON_INTERPRET=1 on CPU) against the reference
and, for attention sinks, against explicit float64 masking."""

from __future__ import annotations

import pytest
import torch

from maskvl.numerics import compute_dtype
from maskvl.ops.loo_attention import loo_attention_reference
from maskvl.ops.testing import (
    assert_rows_close,
    backend_params,
    bruteforce_atol,
    case_id,
    compiled_backend,
    loo_bruteforce,
    make_sink,
    rtol,
    shape_cases,
)

BACKENDS = backend_params()
CASES = [(T, D, H, KV, dt) for (T, D, H, KV) in shape_cases() for dt in (torch.float32, torch.float64)]
# bf16 inputs (the model's KV cache): the ops upcast on load; compared with the reference on the same inputs.
CASES += [(T, D, H, KV, torch.bfloat16) for (T, D, H, KV) in shape_cases() if D == 128 and T in (2, 1025)]


def _inputs(T, D, H, KV, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(H, D, generator=g, dtype=torch.float64)
    k = torch.randn(T, KV, D, generator=g, dtype=torch.float64)
    v = torch.randn(T, KV, D, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("T,D,H,KV,dtype", CASES, ids=[case_id(*c) for c in CASES])
def test_loo_attention_matches_reference(backend_name, T, D, H, KV, dtype):
    backend, dev = compiled_backend(backend_name)
    q, k, v = _inputs(T, D, H, KV, dtype, seed=T * 1000 + D + H)
    scale = D ** -0.5
    o, delta = backend.loo_attention(q.to(dev), k.to(dev), v.to(dev), scale)
    ro, rdelta = loo_attention_reference(q, k, v, scale)
    tol = rtol(compute_dtype(dtype), dev)
    assert_rows_close(o.cpu(), ro, tol, "o")
    assert_rows_close(delta.cpu(), rdelta, tol, "delta")


SINKS = [(T, KV * r, KV, gap, dt) for T in (97, 1025) for (KV, r) in ((2, 1), (1, 4)) for gap in (15.0, 30.0)
         for dt in (torch.float32, torch.float64)]


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("T,H,KV,gap,dtype", SINKS,
                         ids=[f"gap{gap:g}-" + case_id(T, 64, H, KV, dt) for (T, H, KV, gap, dt) in SINKS])
def test_loo_attention_sink(backend_name, T, H, KV, gap, dtype):
    """One key scores `gap` above all others, so 1 - a_p cancels in the naive closed form (float32:
    0.39 relative error at gap 15, NaN at 20). Checked against explicit float64 masking of the very
    same (rounded) inputs, every row relative to its size down to the brute force's own absolute
    resolution, and against the float64 reference, every row relative to its size."""
    backend, dev = compiled_backend(backend_name)
    D = 64
    q, k, v = _inputs(T, D, H, KV, dtype, seed=7 + T + H)
    scale = D ** -0.5
    sink = T // 3
    k = make_sink(q, k, scale, key=sink, gap=gap)
    o, delta = backend.loo_attention(q.to(dev), k.to(dev), v.to(dev), scale)
    o, delta = o.cpu(), delta.cpu()
    cd = compute_dtype(dtype)
    tol = rtol(cd, dev)
    bo, bdelta = loo_bruteforce(q, k, v, scale)
    # The sink row is the one the closed form gets wrong; it is O(1) (no atol hides it).
    assert bdelta[sink].abs().amax(-1).min() > 0.1
    assert_rows_close(delta[sink], bdelta[sink].to(cd), tol, "delta[sink] vs explicit masking")
    assert_rows_close(o, bo.to(cd), tol, "o vs explicit masking")
    assert_rows_close(delta, bdelta.to(cd), tol, "delta vs explicit masking", atol=bruteforce_atol(v, T))
    ro, rdelta = loo_attention_reference(q.double(), k.double(), v.double(), scale)
    assert_rows_close(delta, rdelta.to(cd), tol, "delta vs float64 reference")


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_loo_attention_strided_kv_cache(backend_name, dtype):
    """k, v as transposed views of a [KV, T, D] cache (how the engine holds them): no copy needed,
    same result."""
    backend, dev = compiled_backend(backend_name)
    T, D, H, KV = 70, 64, 8, 2
    q, k, v = _inputs(T, D, H, KV, dtype, seed=3)
    kc, vc = k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()  # [KV, T, D]
    kt, vt = kc.to(dev).transpose(0, 1), vc.to(dev).transpose(0, 1)
    assert not kt.is_contiguous()
    o, delta = backend.loo_attention(q.to(dev), kt, vt, D ** -0.5)
    ro, rdelta = loo_attention_reference(q, k, v, D ** -0.5)
    tol = rtol(compute_dtype(dtype), dev)
    assert_rows_close(o.cpu(), ro, tol, "o")
    assert_rows_close(delta.cpu(), rdelta, tol, "delta")


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_loo_attention_rejects_bad_shapes(backend_name):
    backend, dev = compiled_backend(backend_name)
    q = torch.randn(6, 16, device=dev)
    k = torch.randn(5, 4, 16, device=dev)  # 6 heads are not a multiple of 4 KV heads
    with pytest.raises((RuntimeError, ValueError), match="multiple"):
        backend.loo_attention(q, k, k, 0.25)
