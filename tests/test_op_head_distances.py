"""Compiled per-head distances (cpp; triton, under TRITON_INTERPRET=1 on CPU) against the reference:
distances of every head's residual contribution through the head Gram matrices."""

from __future__ import annotations

import pytest
import torch

from maskvl.numerics import compute_dtype
from maskvl.ops.head_distances import head_distances_reference
from maskvl.ops.loo_attention import loo_attention_reference
from maskvl.ops.testing import (
    assert_elements_close,
    backend_params,
    case_id,
    compiled_backend,
    random_gram,
    rtol,
    shape_cases,
)

BACKENDS = backend_params()
# The GQA ratio does not enter head_distances (it only shapes the loo_attention that makes the inputs),
# so one head count per T is enough here.
CASES = [(T, D, H, KV, dt) for (T, D, H, KV) in shape_cases() if (H == 2 if T == 1025 else KV == 2)
         for dt in (torch.float32, torch.float64)]


def _head_inputs(T, D, H, KV, dtype, seed):
    """o, delta from leave-one-out attention of random inputs (the op's real input), a random PSD gram."""
    g = torch.Generator().manual_seed(seed)
    cd = compute_dtype(dtype)
    q = torch.randn(H, D, generator=g, dtype=cd)
    k = torch.randn(T, KV, D, generator=g, dtype=cd)
    v = torch.randn(T, KV, D, generator=g, dtype=cd)
    o, delta = loo_attention_reference(q, k, v, D ** -0.5)
    gram = random_gram(H, D, 96, cd, g)
    return o.to(dtype), delta.to(dtype), gram.to(dtype)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("T,D,H,KV,dtype", CASES, ids=[case_id(*c) for c in CASES])
def test_head_distances_matches_reference(backend_name, T, D, H, KV, dtype):
    backend, dev = compiled_backend(backend_name)
    o, delta, gram = _head_inputs(T, D, H, KV, dtype, seed=T + 31 * D + H)
    l2, cosd = backend.head_distances(o.to(dev), delta.to(dev), gram.to(dev))
    rl2, rcos = head_distances_reference(o, delta, gram)
    cd = compute_dtype(dtype)
    tol = rtol(cd, dev)
    assert_elements_close(l2.cpu(), rl2, tol, "l2")
    if T == 1:
        # delta = -o: the masked vector is zero up to rounding, so |m|^2 = A + 2B + C is a sum that
        # cancels to ~eps A and the cosine is as ill-conditioned as it gets: its absolute error is about
        # sqrt(eps) in any implementation of the formula. Compare at that resolution.
        atol = 16 * torch.finfo(cd).eps ** 0.5
        assert_elements_close(cosd.cpu(), rcos, 0.0, "cosine distance (T = 1)", atol=atol)
        assert bool(((cosd.cpu() - 1).abs() <= atol).all())
    else:
        assert_elements_close(cosd.cpu(), rcos, tol, "cosine distance")
        assert bool((rcos > 0).all()), "test inputs should give nonzero cosine distances"


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("T", [97, 1025], ids=lambda t: f"T{t}")
def test_head_distances_bf16_inputs_upcast(backend_name, T):
    """bf16 inputs are cast to float32 first: equal to the reference on the upcast inputs."""
    backend, dev = compiled_backend(backend_name)
    H, KV = (8, 2) if T < 1025 else (2, 2)
    o, delta, gram = _head_inputs(T, 128, H, KV, torch.bfloat16, seed=5)
    l2, cosd = backend.head_distances(o.to(dev), delta.to(dev), gram.to(dev))
    assert l2.dtype == torch.float32 and cosd.dtype == torch.float32
    rl2, rcos = head_distances_reference(o.float(), delta.float(), gram.float())
    assert_elements_close(l2.cpu(), rl2, rtol(torch.float32, dev), "l2")
    assert_elements_close(cosd.cpu(), rcos, rtol(torch.float32, dev), "cosine distance")


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_head_distances_degenerate(backend_name, dtype):
    """Zero clean head (A = 0), zero delta (C = 0) and both: the conventions 1 / 0 / 0 exactly."""
    backend, dev = compiled_backend(backend_name)
    T, D, H = 5, 48, 3
    g = torch.Generator().manual_seed(1)
    o = torch.randn(H, D, generator=g, dtype=dtype)
    delta = torch.randn(T, H, D, generator=g, dtype=dtype)
    gram = random_gram(H, D, 64, dtype, g)
    o[0] = 0  # head 0: clean contribution zero
    delta[1, 0] = 0  # ... and its delta zero: both vectors zero -> 0
    delta[2, 1] = 0  # head 1: masked == clean -> 0
    l2, cosd = backend.head_distances(o.to(dev), delta.to(dev), gram.to(dev))
    l2, cosd = l2.cpu(), cosd.cpu()
    rl2, rcos = head_distances_reference(o, delta, gram)
    assert cosd[0, 0] == 1 and cosd[3, 0] == 1  # exactly one vector zero
    assert cosd[1, 0] == 0 and l2[1, 0] == 0  # both zero
    assert cosd[2, 1] == 0 and l2[2, 1] == 0  # identical
    assert_elements_close(l2, rl2, rtol(dtype, dev), "l2")
    assert_elements_close(cosd, rcos, rtol(dtype, dev), "cosine distance")


def test_head_distances_tiny_delta_keeps_relative_precision():
    """|d| = 1e-6 |c|: 1 - cos computed directly is all rounding in float32; the moment form is not."""
    backend, dev = compiled_backend("cpp")
    g = torch.Generator().manual_seed(2)
    H, D, T = 2, 64, 4
    o = torch.randn(H, D, generator=g, dtype=torch.float64)
    delta = 1e-6 * torch.randn(T, H, D, generator=g, dtype=torch.float64)
    gram = random_gram(H, D, 64, torch.float64, g)
    _, cos64 = head_distances_reference(o, delta, gram)
    _, cos32 = backend.head_distances(o.float(), delta.float(), gram.float())
    assert_elements_close(cos32.double(), cos64, 1e-4, "float32 cosine distance vs float64")
