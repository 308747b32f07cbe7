"""Triton fused vector distances (``maskvl::vector_distances`` for CUDA tensors).

``clean [N]``, ``delta [T, N]`` -> ``l2, cos [T]``; same math as ``maskvl/ops/vector_distances.py`` and
``csrc/vector_distances.cpp``: A = |c|^2, B = <c, d_t> and C = |d_t|^2 reduced in one pass over each
row, then the distance formula. The rows are the masked variants of ``Full`` and ``Attn`` (N = hidden
size) and of ``Logits`` (N = vocabulary: 151,936 for Qwen3-VL), so row offsets are formed in 64 bits:
``t * N`` passes 2^31 from row 14,135 on at that vocabulary. Numerics of the compiled code:
``kernels/_launch.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import acc_type, compute_dtype
from .distances import distances_from_moments


@triton.jit
def _vector_distances(c_ptr, d_ptr, l2_ptr, cos_ptr, T, N,
                      ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    mt = offs_t < T
    rows = d_ptr + offs_t[:, None] * N  # [BLOCK_T, 1] row starts, 64-bit offsets
    Bv = tl.zeros([BLOCK_T], ACC)
    Cv = tl.zeros([BLOCK_T], ACC)
    Av = tl.zeros([BLOCK_N], ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < N
        c = tl.load(c_ptr + offs_n, mask=mn, other=0.0)
        d = tl.load(rows + offs_n[None, :], mask=mt[:, None] & mn[None, :], other=0.0)
        Bv += tl.sum(d * c[None, :], axis=1)
        Cv += tl.sum(d * d, axis=1)
        Av += c * c
    A = tl.sum(Av, axis=0)
    l2, cosd = distances_from_moments(A, Bv, Cv, ACC)
    tl.store(l2_ptr + offs_t, l2, mask=mt)
    tl.store(cos_ptr + offs_t, cosd, mask=mt)


def vector_distances(clean: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``clean [N]``, ``delta [T, N]`` -> ``(l2 [T], cos [T])`` in the compute dtype of ``delta``."""
    if delta.dim() != 2 or clean.shape != delta.shape[1:]:
        raise ValueError(f"vector_distances: need clean [N], delta [T, N]; got {tuple(clean.shape)}, "
                         f"{tuple(delta.shape)}")
    T, N = delta.shape
    cd = compute_dtype(delta.dtype)
    _launch.check_float64(cd)
    clean, delta = clean.to(cd).contiguous(), delta.to(cd).contiguous()
    l2 = torch.empty(T, dtype=cd, device=delta.device)
    cosd = torch.empty(T, dtype=cd, device=delta.device)
    if T == 0:
        return l2, cosd
    BLOCK_T = 32
    # [32, 256] tiles: ~165 registers per thread at four warps in float32; float64 needs eight warps to
    # stay unspilled (make compile-check).
    _launch.launch(_vector_distances, (triton.cdiv(T, BLOCK_T),), clean, delta, l2, cosd, T, N,
                   ACC=acc_type(cd), BLOCK_T=BLOCK_T, BLOCK_N=256, num_warps=8 if cd == torch.float64 else 4)
    return l2, cosd
