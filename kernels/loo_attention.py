"""Triton leave-one-out attention of the final query (``maskvl::loo_attention`` for CUDA tensors).

Same math as ``csrc/loo_attention.cpp`` and ``maskvl/ops/loo_attention.py``: ``q [H, D]``,
``k, v [T, KV, D]`` -> ``o [H, D]``, ``delta [T, H, D]`` in the compute dtype. Five small launches:

1. ``_scores``   grid (KV, T blocks): s[h, t] = scale <q_h, k_t>; a K tile is loaded once per GQA group.
2. ``_stats``    grid (H,): argmax j1 (first occurrence), its score m1, the best other score m2,
                 Z' = sum_{t != j1} exp(s_t - m2) (>= 1, so no underflow even behind a sink).
3. ``_pv``       grid (KV, T blocks): per-block partial sums of U' = sum_{t != j1} exp(s_t - m2) v_t.
4. ``_finalize`` grid (H,): U' (block partials summed in block order: deterministic),
                 o = (U' r + v_j1) / Z with r = exp(m2 - m1), Z = Z' r + 1, and o_wo = U' / Z'.
5. ``_delta``    grid (KV, T blocks): delta[t, h] = e_t / (Z - e_t) (o - v_t), e_t = exp(s_t - m1);
                 delta[j1, h] = o_wo - o (the argmax key recomputed directly).

Scratch: scores [H, T], partials [H, T/BLOCK_T, D]: small next to K and V. Everything after the
loads runs in float32 (float64 for float64 inputs): the Triton interpreter gets bf16 arithmetic wrong,
and the reference upcasts too. Compiled float32 divides and exponentiates with the approximate
instructions described in ``kernels/_launch.py`` (float64 and the interpreter are IEEE / libm-accurate).
No tl.dot here, so no tile-shape constraints beyond powers of two. Row offsets are formed in 64 bits
(program ids and row indices are widened first): ``T * H * D`` passes 2^31 at T = 524,288 for
Qwen3-VL-4B's 32 x 128.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import acc_type, compute_dtype

BLOCK_T = 64
# _pv and _delta hold [BLOCK_T, BLOCK_D] tiles of V (and of 64-bit delta addresses): at four warps
# _delta spills for bf16/fp16 on sm_90 (make compile-check); eight halve the registers per thread.
TILE_WARPS = 8


@triton.jit
def _scores(q_ptr, k_ptr, s_ptr, scale_ptr, T, D, skt, skh,
            G: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    kv = tl.program_id(0).to(tl.int64)
    idx = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mt = idx < T
    md = offs_d < D
    kt = tl.load(k_ptr + idx[:, None] * skt + kv * skh + offs_d[None, :], mask=mt[:, None] & md[None, :],
                 other=0.0).to(ACC)
    scale = tl.load(scale_ptr)
    for g in tl.static_range(G):
        h = kv * G + g
        qh = tl.load(q_ptr + h * D + offs_d, mask=md, other=0.0).to(ACC)
        s = tl.sum(kt * qh[None, :], axis=1) * scale
        tl.store(s_ptr + h * T + idx, s, mask=mt)


@triton.jit
def _stats(s_ptr, stat_ptr, j_ptr, T, ACC: tl.constexpr, BLOCK_T: tl.constexpr):
    h = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    m1 = tl.full([], float("-inf"), ACC)
    m2 = tl.full([], float("-inf"), ACC)
    j1 = tl.full([], 0, tl.int32)
    for t0 in range(0, T, BLOCK_T):
        idx = t0 + offs
        s = tl.load(s_ptr + h * T + idx, mask=idx < T, other=float("-inf"))
        bm = tl.max(s, axis=0)
        bi = tl.argmax(s, axis=0, tie_break_left=True)
        bm2 = tl.max(tl.where(offs == bi, float("-inf"), s), axis=0)
        better = bm > m1  # strict: an earlier block keeps the argmax on ties (first occurrence)
        m2 = tl.where(better, tl.maximum(m1, bm2), tl.maximum(m2, bm))
        j1 = tl.where(better, t0 + bi, j1)
        m1 = tl.where(better, bm, m1)
    z = tl.zeros([BLOCK_T], ACC)
    for t0 in range(0, T, BLOCK_T):
        idx = t0 + offs
        s = tl.load(s_ptr + h * T + idx, mask=idx < T, other=float("-inf"))
        z += tl.where((idx == j1) | (idx >= T), 0.0, tl.exp(s - m2))
    zp = tl.sum(z, axis=0)
    zfull = zp * tl.exp(m2 - m1) + 1.0
    tl.store(stat_ptr + h * 4 + 0, m1)
    tl.store(stat_ptr + h * 4 + 1, m2)
    tl.store(stat_ptr + h * 4 + 2, zp)
    tl.store(stat_ptr + h * 4 + 3, zfull)
    tl.store(j_ptr + h, j1)


@triton.jit
def _pv(v_ptr, s_ptr, stat_ptr, j_ptr, part_ptr, T, D, NB, svt, svh,
        G: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    kv = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1).to(tl.int64)
    idx = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mt = idx < T
    md = offs_d < D
    vt = tl.load(v_ptr + idx[:, None] * svt + kv * svh + offs_d[None, :], mask=mt[:, None] & md[None, :],
                 other=0.0).to(ACC)
    for g in tl.static_range(G):
        h = kv * G + g
        s = tl.load(s_ptr + h * T + idx, mask=mt, other=float("-inf"))
        m2 = tl.load(stat_ptr + h * 4 + 1)
        j1 = tl.load(j_ptr + h)
        e = tl.where((idx == j1) | (~mt), 0.0, tl.exp(s - m2))
        u = tl.sum(e[:, None] * vt, axis=0)
        tl.store(part_ptr + (h * NB + tb) * D + offs_d, u, mask=md)


@triton.jit
def _finalize(v_ptr, part_ptr, stat_ptr, j_ptr, o_ptr, owo_ptr, D, NB, svt, svh,
              G: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    h = tl.program_id(0).to(tl.int64)
    kv = h // G
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    md = offs_d < D
    u = tl.zeros([BLOCK_D], ACC)
    for n0 in range(0, NB, BLOCK_N):
        n = n0 + offs_n
        p = tl.load(part_ptr + (h * NB + n[:, None]) * D + offs_d[None, :], mask=(n < NB)[:, None] & md[None, :],
                    other=0.0)
        u += tl.sum(p, axis=0)
    m1 = tl.load(stat_ptr + h * 4 + 0)
    m2 = tl.load(stat_ptr + h * 4 + 1)
    zp = tl.load(stat_ptr + h * 4 + 2)
    zfull = tl.load(stat_ptr + h * 4 + 3)
    j1 = tl.load(j_ptr + h).to(tl.int64)
    vb = tl.load(v_ptr + j1 * svt + kv * svh + offs_d, mask=md, other=0.0).to(ACC)
    o = (u * tl.exp(m2 - m1) + vb) / zfull
    owo = u / zp
    tl.store(o_ptr + h * D + offs_d, o, mask=md)
    tl.store(owo_ptr + h * D + offs_d, owo, mask=md)


@triton.jit
def _delta(v_ptr, s_ptr, stat_ptr, j_ptr, o_ptr, owo_ptr, delta_ptr, T, H, D, svt, svh,
           G: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    kv = tl.program_id(0).to(tl.int64)
    idx = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mt = idx < T
    md = offs_d < D
    mask = mt[:, None] & md[None, :]
    vt = tl.load(v_ptr + idx[:, None] * svt + kv * svh + offs_d[None, :], mask=mask, other=0.0).to(ACC)
    for g in tl.static_range(G):
        h = kv * G + g
        o = tl.load(o_ptr + h * D + offs_d, mask=md, other=0.0)
        owo = tl.load(owo_ptr + h * D + offs_d, mask=md, other=0.0)
        s = tl.load(s_ptr + h * T + idx, mask=mt, other=float("-inf"))
        m1 = tl.load(stat_ptr + h * 4 + 0)
        zfull = tl.load(stat_ptr + h * 4 + 3)
        j1 = tl.load(j_ptr + h)
        is_j1 = idx == j1
        e = tl.exp(s - m1)
        # w = a_t / (1 - a_t) without cancellation: only j1 can have a_t > 1/2, and its row is replaced
        # below (its denominator is set to 1 so that no inf/nan is formed at all).
        w = e / tl.where(is_j1, 1.0, zfull - e)
        d = w[:, None] * (o[None, :] - vt)
        d = tl.where(is_j1[:, None], (owo - o)[None, :], d)
        tl.store(delta_ptr + (idx[:, None] * H + h) * D + offs_d[None, :], d, mask=mask)


def loo_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the leave-one-out attention kernels on the inputs' device.

    Args:
        q: ``[H, D]``; k, v: ``[T, KV, D]`` (any strides with a contiguous last dim); scale: softmax scale.

    Returns:
        ``o [H, D]`` and ``delta [T, H, D]`` in the compute dtype, on q's device.
    """
    if q.dim() != 2 or k.dim() != 3 or k.shape != v.shape or k.shape[2] != q.shape[1]:
        raise ValueError(f"loo_attention: need q [H, D], k = v [T, KV, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    H, D = q.shape
    T, KV, _ = k.shape
    if T < 1 or H % KV:
        raise ValueError(f"loo_attention: need T >= 1 and H ({H}) a multiple of KV ({KV})")
    G = H // KV
    cd = compute_dtype(q.dtype)
    _launch.check_float64(cd)
    dev = q.device
    q = q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    if T == 1:  # removing the only key leaves nothing to attend to: masked output 0, delta = -o
        o = v[0].to(cd).repeat_interleave(G, dim=0)
        return o, (-o).unsqueeze(0)
    BLOCK_D = triton.next_power_of_2(D)
    NB = triton.cdiv(T, BLOCK_T)
    acc = acc_type(cd)
    s = torch.empty(H, T, dtype=cd, device=dev)
    stats = torch.empty(H, 4, dtype=cd, device=dev)  # m1, m2, Z', Z
    j1 = torch.empty(H, dtype=torch.int32, device=dev)
    part = torch.empty(H, NB, D, dtype=cd, device=dev)
    o = torch.empty(H, D, dtype=cd, device=dev)
    owo = torch.empty(H, D, dtype=cd, device=dev)
    delta = torch.empty(T, H, D, dtype=cd, device=dev)
    scale_t = torch.full((1,), scale, dtype=cd, device=dev)  # a float kernel argument would be fp32
    _launch.launch(_scores, (KV, NB), q, k, s, scale_t, T, D, k.stride(0), k.stride(1),
                   G=G, ACC=acc, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D)
    _launch.launch(_stats, (H,), s, stats, j1, T, ACC=acc, BLOCK_T=256)
    _launch.launch(_pv, (KV, NB), v, s, stats, j1, part, T, D, NB, v.stride(0), v.stride(1),
                   G=G, ACC=acc, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=TILE_WARPS)
    _launch.launch(_finalize, (H,), v, part, stats, j1, o, owo, D, NB, v.stride(0), v.stride(1),
                   G=G, ACC=acc, BLOCK_N=16, BLOCK_D=BLOCK_D)
    _launch.launch(_delta, (KV, NB), v, s, stats, j1, o, owo, delta, T, H, D, v.stride(0), v.stride(1),
                   G=G, ACC=acc, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=TILE_WARPS)
    return o, delta
