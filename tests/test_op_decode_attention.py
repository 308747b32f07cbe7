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
