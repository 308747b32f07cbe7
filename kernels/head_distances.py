"""Triton fused per-head distances (``maskvl::head_distances`` for CUDA tensors).

``o [H, D]``, ``delta [T, H, D]``, ``gram [H, D, D]`` -> ``l2, cos [T, H]``; same math as
``maskvl/ops/head_distances.py`` and ``csrc/head_distances.cpp``. One program per (head, block of
BLOCK_T rows) forms ``G_h delta`` for its tile only, BLOCK_N output columns at a time (``tl.dot`` over
BLOCK_Y chunks of the inner dimension, in full float32 (``input_precision="ieee"``, not TF32) or
float64), and reduces the moments B = o.(G d), C = d.(G d) and A = o.(G o) on the fly; nothing of size
[T, H, D] is written. All tl.dot tiles are >= 16 in every dimension and all block sizes are powers of
two, so the kernel compiles for real GPUs. Row offsets are 64-bit (``T * H * D`` may pass 2^31).
Numerics of the compiled code: ``kernels/_launch.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import acc_type, compute_dtype
from .distances import distances_from_moments

# Tiles and warps, checked with make compile-check for sm_80 and sm_90: BLOCK_T rows of delta by BLOCK_N
# output columns of G_h delta, reduced over BLOCK_Y. 64 x 64 x 64 at four warps spills on both targets
# (float32), and still on sm_80 at eight; 64 x 32 x 64 at eight warps fits (about 130 registers).
CONFIG = {"BLOCK_T": 64, "BLOCK_N": 32, "BLOCK_Y": 64, "num_warps": 8}


@triton.jit
def _head_distances(o_ptr, d_ptr, g_ptr, l2_ptr, cos_ptr, T, H, D,
                    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Y: tl.constexpr):
    h = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    mt = offs_t < T
    Bv = tl.zeros([BLOCK_T], ACC)
    Cv = tl.zeros([BLOCK_T], ACC)
    Av = tl.zeros([BLOCK_N], ACC)
    for n0 in range(0, D, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < D
        gd = tl.zeros([BLOCK_T, BLOCK_N], ACC)  # (G_h d_t)[n] for this column block
        go = tl.zeros([BLOCK_N], ACC)  # (G_h o_h)[n]
        for y0 in range(0, D, BLOCK_Y):
            offs_y = y0 + tl.arange(0, BLOCK_Y)
            my = offs_y < D
            dy = tl.load(d_ptr + (offs_t[:, None] * H + h) * D + offs_y[None, :], mask=mt[:, None] & my[None, :],
                         other=0.0)
            gy = tl.load(g_ptr + (h * D + offs_n[:, None]) * D + offs_y[None, :], mask=mn[:, None] & my[None, :],
                         other=0.0)
            gd += tl.dot(dy, tl.trans(gy), input_precision="ieee")
            oy = tl.load(o_ptr + h * D + offs_y, mask=my, other=0.0)
            go += tl.sum(gy * oy[None, :], axis=1)
        dn = tl.load(d_ptr + (offs_t[:, None] * H + h) * D + offs_n[None, :], mask=mt[:, None] & mn[None, :],
                     other=0.0)
        on = tl.load(o_ptr + h * D + offs_n, mask=mn, other=0.0)
        Cv += tl.sum(dn * gd, axis=1)
        Bv += tl.sum(on[None, :] * gd, axis=1)
        Av += on * go
    A = tl.sum(Av, axis=0)
    l2, cosd = distances_from_moments(A, Bv, Cv, ACC)
    tl.store(l2_ptr + offs_t * H + h, l2, mask=mt)
    tl.store(cos_ptr + offs_t * H + h, cosd, mask=mt)


def head_distances(o: torch.Tensor, delta: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``o [H, D]``, ``delta [T, H, D]``, ``gram [H, D, D]`` -> ``(l2 [T, H], cos [T, H])`` in the compute dtype.

    Inputs are cast to the compute dtype of ``delta`` (float64 for float64, else float32) first.
    """
    if delta.dim() != 3 or o.shape != delta.shape[1:] or gram.shape != (delta.shape[1], delta.shape[2], delta.shape[2]):
        raise ValueError(f"head_distances: need o [H, D], delta [T, H, D], gram [H, D, D]; got {tuple(o.shape)}, "
                         f"{tuple(delta.shape)}, {tuple(gram.shape)}")
    T, H, D = delta.shape
    cd = compute_dtype(delta.dtype)
    _launch.check_float64(cd)
    o, delta, gram = (x.to(cd).contiguous() for x in (o, delta, gram))
    l2 = torch.empty(T, H, dtype=cd, device=delta.device)
    cosd = torch.empty(T, H, dtype=cd, device=delta.device)
    if T == 0:
        return l2, cosd
    _launch.launch(_head_distances, (H, triton.cdiv(T, CONFIG["BLOCK_T"])), o, delta, gram, l2, cosd, T, H, D,
                   ACC=acc_type(cd), **CONFIG)
    return l2, cosd
