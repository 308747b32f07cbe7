"""Triton fused distances: ``maskvl::head_distances`` and ``maskvl::vector_distances`` for CUDA tensors.

head_distances: ``o [H, D]``, ``delta [T, H, D]``, ``gram [H, D, D]`` -> ``l2, cos [T, H]``. One program
per (head, block of BLOCK_T rows) forms ``G_h delta`` for its tile only, BLOCK_N output columns at a time
(``tl.dot`` over BLOCK_Y chunks of the inner dimension, fp32 in IEEE precision, not TF32), and reduces
the moments B = o.(G d), C = d.(G d) and A = o.(G o) on the fly; nothing of size [T, H, D] is written.
vector_distances: ``clean [N]``, ``delta [T, N]`` -> ``l2, cos [T]``, B = <c, d_t> and C = |d_t|^2
reduced in one pass over each row. All tl.dot tiles are >= 16 in every dimension and all block sizes
are powers of two, so the same kernels compile for real GPUs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from maskvl.measures import compute_dtype

from .distances import distances_from_moments


@triton.jit
def _head_distances(o_ptr, d_ptr, g_ptr, l2_ptr, cos_ptr, T, H, D,
                    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Y: tl.constexpr):
    h = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
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


@triton.jit
def _vector_distances(c_ptr, d_ptr, l2_ptr, cos_ptr, T, N,
                      ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mt = offs_t < T
    Bv = tl.zeros([BLOCK_T], ACC)
    Cv = tl.zeros([BLOCK_T], ACC)
    Av = tl.zeros([BLOCK_N], ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < N
        c = tl.load(c_ptr + offs_n, mask=mn, other=0.0)
        d = tl.load(d_ptr + offs_t[:, None] * N + offs_n[None, :], mask=mt[:, None] & mn[None, :], other=0.0)
        Bv += tl.sum(d * c[None, :], axis=1)
        Cv += tl.sum(d * d, axis=1)
        Av += c * c
    A = tl.sum(Av, axis=0)
    l2, cosd = distances_from_moments(A, Bv, Cv, ACC)
    tl.store(l2_ptr + offs_t, l2, mask=mt)
    tl.store(cos_ptr + offs_t, cosd, mask=mt)


def _acc(cd: torch.dtype):
    return tl.float64 if cd == torch.float64 else tl.float32


def head_distances(o: torch.Tensor, delta: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``o [H, D]``, ``delta [T, H, D]``, ``gram [H, D, D]`` -> ``(l2 [T, H], cos [T, H])`` in the compute dtype.

    Inputs are cast to the compute dtype of ``delta`` (float64 for float64, else float32) first.
    """
    if delta.dim() != 3 or o.shape != delta.shape[1:] or gram.shape != (delta.shape[1], delta.shape[2], delta.shape[2]):
        raise ValueError(f"head_distances: need o [H, D], delta [T, H, D], gram [H, D, D]; got {tuple(o.shape)}, "
                         f"{tuple(delta.shape)}, {tuple(gram.shape)}")
    T, H, D = delta.shape
    cd = compute_dtype(delta.dtype)
    o, delta, gram = (x.to(cd).contiguous() for x in (o, delta, gram))
    l2 = torch.empty(T, H, dtype=cd, device=delta.device)
    cosd = torch.empty(T, H, dtype=cd, device=delta.device)
    if T == 0:
        return l2, cosd
    # 64 x 64 tiles: few enough iterations for the interpreter, small enough for registers on a GPU.
    BLOCK_T = 64
    _head_distances[(H, triton.cdiv(T, BLOCK_T))](o, delta, gram, l2, cosd, T, H, D, ACC=_acc(cd),
                                                  BLOCK_T=BLOCK_T, BLOCK_N=64, BLOCK_Y=64)
    return l2, cosd


def vector_distances(clean: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``clean [N]``, ``delta [T, N]`` -> ``(l2 [T], cos [T])`` in the compute dtype of ``delta``."""
    if delta.dim() != 2 or clean.shape != delta.shape[1:]:
        raise ValueError(f"vector_distances: need clean [N], delta [T, N]; got {tuple(clean.shape)}, "
                         f"{tuple(delta.shape)}")
    T, N = delta.shape
    cd = compute_dtype(delta.dtype)
    clean, delta = clean.to(cd).contiguous(), delta.to(cd).contiguous()
    l2 = torch.empty(T, dtype=cd, device=delta.device)
    cosd = torch.empty(T, dtype=cd, device=delta.device)
    if T == 0:
        return l2, cosd
    BLOCK_T = 32
    _vector_distances[(triton.cdiv(T, BLOCK_T),)](clean, delta, l2, cosd, T, N, ACC=_acc(cd),
                                                  BLOCK_T=BLOCK_T, BLOCK_N=256)
    return l2, cosd
