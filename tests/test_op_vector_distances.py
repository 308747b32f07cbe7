"""Compiled vector distances (cpp; triton, under TRITON_INTERPRET=1 on CPU) against the reference:
distances of plain vectors (Full, Attn, Logits) from one pass over each masked row."""

from __future__ import annotations

import pytest
import torch

from maskvl.numerics import compute_dtype, distances_from_moments
from maskvl.ops.testing import assert_elements_close, backend_params, compiled_backend, rtol
from maskvl.ops.vector_distances import vector_distances_reference

BACKENDS = backend_params()

# N: 1, odd, and a real hidden size (2560, Qwen3-VL-4B); T = 1025 uses N = 700 to keep the interpreter quick.
VEC_CASES = [(T, N, dt) for T in (1, 2, 97, 1025) for N in (1, 40, 2560 if T < 1025 else 700)
             for dt in (torch.float32, torch.float64)]


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("T,N,dtype", VEC_CASES, ids=[f"T{T}-N{N}-{str(dt)[6:]}" for (T, N, dt) in VEC_CASES])
def test_vector_distances_matches_reference(backend_name, T, N, dtype):
    backend, dev = compiled_backend(backend_name)
    g = torch.Generator().manual_seed(T + N)
    clean = torch.randn(N, generator=g, dtype=dtype)
    delta = torch.randn(T, N, generator=g, dtype=dtype) * torch.logspace(-6, 1, T, dtype=dtype).unsqueeze(-1)
    l2, cosd = backend.vector_distances(clean.to(dev), delta.to(dev))
    rl2, rcos = vector_distances_reference(clean, delta)
    tol = rtol(dtype, dev)
    assert_elements_close(l2.cpu(), rl2, tol, "l2")
    if N > 1:
        assert_elements_close(cosd.cpu(), rcos, tol, "cosine distance")
    else:
        # N = 1: the exact cosine distance is 0 or 2; the computed 0s are rounding residue of C - diff^2
        # (absolute size ~eps), which no implementation reproduces bit for bit.
        assert_elements_close(cosd.cpu(), rcos, tol, "cosine distance (N = 1)", atol=16 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_vector_distances_degenerate_and_dtype(backend_name, dtype):
    backend, dev = compiled_backend(backend_name)
    cd = compute_dtype(dtype)
    g = torch.Generator().manual_seed(4)
    clean = torch.randn(33, generator=g).to(dtype)
    delta = torch.randn(4, 33, generator=g).to(dtype)
    delta[1] = 0  # identical -> 0
    l2, cosd = backend.vector_distances(clean.to(dev), delta.to(dev))
    assert l2.dtype == cd and cosd.dtype == cd
    rl2, rcos = vector_distances_reference(clean.to(cd), delta.to(cd))
    assert cosd[1].item() == 0 and l2[1].item() == 0
    assert_elements_close(l2.cpu(), rl2, rtol(cd, dev), "l2")
    assert_elements_close(cosd.cpu(), rcos, rtol(cd, dev), "cosine distance")
    # zero clean vector: every masked vector is "orthogonal" (1), except a zero delta (0)
    z = torch.zeros(33, dtype=dtype)
    _, cz = backend.vector_distances(z.to(dev), delta.to(dev))
    _, rcz = distances_from_moments(torch.zeros(1, dtype=cd), torch.zeros(4, dtype=cd), (delta.to(cd) ** 2).sum(-1))
    assert torch.equal(cz.cpu(), rcz)
