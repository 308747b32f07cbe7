"""Triton gated-delta-rule knockout for the final position (``maskvl::gated_delta_knockout`` for CUDA tensors).

Same math as ``csrc/gated_delta_knockout.cpp`` and ``maskvl/ops/gated_delta_knockout.py`` (where the closed
form is derived): ``q [Hk, dk]``, ``k [T, Hk, dk]``, ``v [T, Hv, dv]``, ``g, beta [T, Hv]`` -> ``o [Hv, dv]``,
``delta [T, Hv, dv]`` in the compute dtype; value head ``h`` reads key head ``h // (Hv / Hk)``. Per value head
(``a_t = exp(g_t)``, keys and query L2-normalised in the kernel, the query scaled)::

    u_{T-1} = q,  u_{p-1} = a_p (u_p - beta_p c_p k_p),  c_p = <k_p, u_p>            (reverse scan)
    w_p = beta_p (v_p - a_p S_{p-1}^T k_p),  S_p = a_p S_{p-1} + k_p w_p^T             (forward scan)
    delta_p = -expm1(g_p) S_{p-1}^T u_p - c_p w_p,  o = S_{T-1}^T q

Two launches, both chunked over T in chunks of ``BLOCK_T = 16`` positions (the smallest ``tl.dot`` tile):

1. ``_reverse``  grid (Hv,): the reverse scan, chunks from last to first, carrying ``r`` = u at the chunk's
   last position. Inside a chunk (local positions i, j; ``D[i, j] = exp(g_{i+1} + ... + g_j)`` for j > i,
   ``e_i = exp(g_{i+1} + ... + g_{BT-1})``), unrolling the recurrence gives
   ``u_i = e_i r - sum_{j > i} D[i, j] beta_j c_j k_j`` and ``c_j = e_j <k_j, r> - sum_{l > j} D[j, l] beta_l
   <k_j, k_l> c_l``: a unit upper-triangular system for ``c`` (back substitution over the 16 positions),
   then ``U = e r^T - (D * beta c) K`` by one ``tl.dot``; the carry into the previous chunk is
   ``exp(g_0 + ... + g_{BT-1}) r - sum_j exp(g_0 + ... + g_j) beta_j c_j k_j``. Writes ``u [T, Hv, dk]``.
2. ``_forward``  grid (Hv, dv blocks of BV = 32 or less): the forward scan of one state block ``S [dk, BV]``
   (the columns of S evolve independently). Inside a chunk with start state ``S0``, ``gamma_i = exp(g_0 +
   ... + g_i)``, ``Din[i, j] = exp(g_{j+1} + ... + g_i)``, ``Dex[i, j] = exp(g_{j+1} + ... + g_{i-1})``
   (j < i): ``(I + beta Din * KK^T) W = beta (V - gamma K S0)`` (strictly lower; the WY/UT form of the
   delta rule, as in transformers' ``torch_chunk_gated_delta_rule``), solved by inverting the unit
   lower-triangular 16 x 16 matrix by forward substitution; then ``Z = S_{i-1}^T u_i = gamma_{i-1} U S0 +
   (Dex * U K^T) W``, ``delta = -expm1(g) Z - c W`` and ``S <- gamma_{BT-1} S0 + (e K)^T W``. After the
   last chunk ``o = S^T q``. The block lives in a global scratch, two buffers (chunk c reads one, writes the
   other; a barrier ends each chunk), and every contraction over dk runs ``DKB = 16`` rows of S at a time,
   with the key norms applied after the raw products: float32 ``tl.dot`` in IEEE precision lowers to FMAs
   whose operands sit in registers whole, so ``K S`` over all 128 rows of a register-held state spilled
   ~16 KB per thread on sm_80/sm_90, and spills nothing this way (``kernels/compile_check.py``). The
   scratch is ``Hv * dk * dv * 2`` numbers, read twice and written once per chunk of 16 positions.

Every log-decay sum above is formed from only the gates it spans (a masked ``tl.cumsum``, with the gate
vector loaded once more shifted by one position where the range starts after j), never as a difference
of two prefix sums, whose rounding would grow with the chunk's total decay. ``1 - a`` is ``-expm1(g)``
(Taylor series for ``|g| < 1/4``, Triton having no portable expm1). Padding positions (t >= T) are
identity steps (k = u = v = 0, g = beta = 0). Everything after the loads runs in float32 (float64 for
float64 inputs); ``tl.dot`` with ``input_precision="ieee"`` (no TF32). Offsets are 64-bit (program ids and
positions are widened first). This module imports nothing from ``maskvl``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import acc_type, compute_dtype

BLOCK_T = 16
DKB = 16  # dk columns per step of the forward kernel's contractions (see _forward)
# transformers' l2norm epsilon (models/qwen3_5/modeling_qwen3_5.py); maskvl.ops.gated_delta_knockout.L2NORM_EPS.
L2NORM_EPS = 1e-6


@triton.jit
def _expm1(x):
    """exp(x) - 1 without cancellation: the Taylor series x (1 + x/2 (1 + x/3 (...))) to x^14 / 14! for
    |x| < 1/4 (truncation below 2e-19 relative), else exp(x) - 1."""
    r = tl.full(x.shape, 1.0, x.dtype)
    for n in tl.static_range(14, 1, -1):
        r = 1.0 + x * r / n
    return tl.where(tl.abs(x) < 0.25, x * r, tl.exp(x) - 1.0)


@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    """IEEE square root: ``tl.sqrt`` is exact for float64 but approximate for float32 on the GPU."""
    if ACC == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _load_query(q_ptr, kh, dk, sqh, scale, eps, L2NORM: tl.constexpr, ACC: tl.constexpr, DK: tl.constexpr):
    offs_d = tl.arange(0, DK)
    q = tl.load(q_ptr + kh * sqh + offs_d, mask=offs_d < dk, other=0.0).to(ACC)
    if L2NORM:
        q = q * (1.0 / _sqrt(tl.sum(q * q, axis=0) + eps, ACC))
    return q * scale


@triton.jit
def _load_keys(k_ptr, t, kh, T, dk, skt, skh, eps, L2NORM: tl.constexpr, ACC: tl.constexpr, DK: tl.constexpr):
    """Rows ``t [BT]`` of key head ``kh``, L2-normalised: ``[BT, DK]``, zero outside ``t < T, d < dk``."""
    offs_d = tl.arange(0, DK)
    mask = (t < T)[:, None] & (offs_d < dk)[None, :]
    K = tl.load(k_ptr + t[:, None] * skt + kh * skh + offs_d[None, :], mask=mask, other=0.0).to(ACC)
    if L2NORM:
        K = K * (1.0 / _sqrt(tl.sum(K * K, axis=1) + eps, ACC))[:, None]
    return K


@triton.jit
def _load_gate(ptr, t, ok, h, sgt, sgh, ACC: tl.constexpr):
    return tl.load(ptr + t * sgt + h * sgh, mask=ok, other=0.0).to(ACC)


@triton.jit
def _reverse(q_ptr, k_ptr, g_ptr, b_ptr, u_ptr, prm_ptr, T, dk, Hv, sqh, skt, skh, sgt, sgh, sbt, sbh,
             G: tl.constexpr, L2NORM: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, DK: tl.constexpr):
    h = tl.program_id(0).to(tl.int64)
    kh = h // G
    scale = tl.load(prm_ptr)
    eps = tl.load(prm_ptr + 1)
    offs_d = tl.arange(0, DK)
    md = offs_d < dk
    i = tl.arange(0, BLOCK_T)
    i64 = i.to(tl.int64)  # positions are 64-bit before they meet a stride
    upper = i[None, :] > i[:, None]  # [i, j]: j > i
    r = _load_query(q_ptr, kh, dk, sqh, scale, eps, L2NORM, ACC, DK)  # u at the chunk's last position
    NC = tl.cdiv(T, BLOCK_T)
    for cc in range(0, NC):
        t = (NC - 1 - cc) * BLOCK_T + i64
        mt = t < T
        K = _load_keys(k_ptr, t, kh, T, dk, skt, skh, eps, L2NORM, ACC, DK)
        g = _load_gate(g_ptr, t, mt, h, sgt, sgh, ACC)
        beta = _load_gate(b_ptr, t, mt, h, sbt, sbh, ACC)
        gnext = _load_gate(g_ptr, t + 1, (i + 1 < BLOCK_T) & (t + 1 < T), h, sgt, sgh, ACC)  # g_{i+1}
        # D[i, j] = exp(g_{i+1} + ... + g_j) for j > i; e_i = exp(g_{i+1} + ... + g_{BT-1}).
        D = tl.where(upper, tl.exp(tl.cumsum(tl.where(upper, g[None, :], 0.0), axis=1)), 0.0)
        e = tl.exp(tl.cumsum(gnext, axis=0, reverse=True))
        KK = tl.dot(K, tl.trans(K), input_precision="ieee")
        N = D * KK * beta[None, :]
        # Back substitution: c_j = e_j <k_j, r> - sum_{l > j} N[j, l] c_l, from j = BT-1 down.
        c = e * tl.sum(K * r[None, :], axis=1)
        for s in tl.static_range(BLOCK_T):
            j = BLOCK_T - 1 - s
            n_row = tl.sum(tl.where(i[:, None] == j, N, 0.0), axis=0)
            cj = tl.sum(tl.where(i == j, c, 0.0), axis=0) - tl.sum(n_row * c, axis=0)
            c = tl.where(i == j, cj, c)
        bc = beta * c
        U = e[:, None] * r[None, :] - tl.dot(D * bc[None, :], K, input_precision="ieee")
        tl.store(u_ptr + (t[:, None] * Hv + h) * dk + offs_d[None, :], U, mask=mt[:, None] & md[None, :])
        gin = tl.exp(tl.cumsum(g, axis=0))  # exp(g_0 + ... + g_j)
        r = tl.exp(tl.sum(g, axis=0)) * r - tl.sum((gin * bc)[:, None] * K, axis=0)


@triton.jit
def _forward(q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, u_ptr, s_ptr, prm_ptr, o_ptr, delta_ptr, T, dk, dv, Hv, NV,
             sqh, skt, skh, svt, svh, sgt, sgh, sbt, sbh,
             G: tl.constexpr, L2NORM: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, DKB: tl.constexpr,
             NDK: tl.constexpr, BV: tl.constexpr):
    h = tl.program_id(0).to(tl.int64)
    vb = tl.program_id(1).to(tl.int64)
    kh = h // G
    eps = tl.load(prm_ptr + 1)
    offs_b = tl.arange(0, DKB)
    offs_v = vb * BV + tl.arange(0, BV)
    mv = offs_v < dv
    sv = tl.arange(0, BV)
    i = tl.arange(0, BLOCK_T)
    i64 = i.to(tl.int64)  # positions are 64-bit before they meet a stride
    lower = i[None, :] < i[:, None]  # [i, j]: j < i
    eye = (i[:, None] == i[None, :]).to(ACC)
    # This program's state block, two buffers [2, NDK * DKB, BV] (chunk c reads buffer c % 2, writes the other).
    s_base = s_ptr + (h * NV + vb) * (2 * NDK * DKB * BV)
    NC = tl.cdiv(T, BLOCK_T)
    for ci in range(0, NC):
        t = ci * BLOCK_T + i64
        mt = t < T
        s_rd = s_base + (ci % 2) * (NDK * DKB * BV)
        s_wr = s_base + ((ci + 1) % 2) * (NDK * DKB * BV)
        V = tl.load(v_ptr + t[:, None] * svt + h * svh + offs_v[None, :], mask=mt[:, None] & mv[None, :],
                    other=0.0).to(ACC)
        g = _load_gate(g_ptr, t, mt, h, sgt, sgh, ACC)
        beta = _load_gate(b_ptr, t, mt, h, sbt, sbh, ACC)
        gnext = _load_gate(g_ptr, t + 1, (i + 1 < BLOCK_T) & (t + 1 < T), h, sgt, sgh, ACC)  # g_{i+1}
        gprev = _load_gate(g_ptr, t - 1, (i >= 1) & (t - 1 < T), h, sgt, sgh, ACC)  # g_{i-1}
        # The contractions over dk, DKB columns at a time (raw keys; their norms are applied after).
        ss = tl.zeros([BLOCK_T], ACC)
        cr = tl.zeros([BLOCK_T], ACC)
        KKr = tl.zeros([BLOCK_T, BLOCK_T], ACC)
        UKr = tl.zeros([BLOCK_T, BLOCK_T], ACC)
        KSr = tl.zeros([BLOCK_T, BV], ACC)
        US = tl.zeros([BLOCK_T, BV], ACC)
        for b in range(0, NDK):
            d = b * DKB + offs_b
            m = mt[:, None] & (d < dk)[None, :]
            Kb = tl.load(k_ptr + t[:, None] * skt + kh * skh + d[None, :], mask=m, other=0.0).to(ACC)
            Ub = tl.load(u_ptr + (t[:, None] * Hv + h) * dk + d[None, :], mask=m, other=0.0)
            Sb = tl.load(s_rd + d[:, None] * BV + sv[None, :])
            KbT = tl.trans(Kb)
            ss += tl.sum(Kb * Kb, axis=1)
            cr += tl.sum(Ub * Kb, axis=1)
            KKr += tl.dot(Kb, KbT, input_precision="ieee")
            UKr += tl.dot(Ub, KbT, input_precision="ieee")  # [i, j] = <u_i, k_j>
            KSr += tl.dot(Kb, Sb, input_precision="ieee")
            US += tl.dot(Ub, Sb, input_precision="ieee")
        if L2NORM:
            rk = 1.0 / _sqrt(ss + eps, ACC)
        else:
            rk = tl.full([BLOCK_T], 1.0, ACC)
        KK = rk[:, None] * KKr * rk[None, :]
        UK = UKr * rk[None, :]
        KS = rk[:, None] * KSr
        c = cr * rk
        gam = tl.exp(tl.cumsum(g, axis=0))  # exp(g_0 + ... + g_i)
        gam_ex = tl.exp(tl.cumsum(gprev, axis=0))  # exp(g_0 + ... + g_{i-1})
        e = tl.exp(tl.cumsum(gnext, axis=0, reverse=True))  # exp(g_{i+1} + ... + g_{BT-1})
        # Din[i, j] = exp(g_{j+1} + ... + g_i), Dex[i, j] = exp(g_{j+1} + ... + g_{i-1}) for j < i: reverse
        # cumsums over m of g_{m+1} restricted to m <= i-1 (resp. i-2), read at column j.
        Din = tl.where(lower, tl.exp(tl.cumsum(tl.where(i[None, :] <= i[:, None] - 1, gnext[None, :], 0.0),
                                               axis=1, reverse=True)), 0.0)
        Dex = tl.where(lower, tl.exp(tl.cumsum(tl.where(i[None, :] <= i[:, None] - 2, gnext[None, :], 0.0),
                                               axis=1, reverse=True)), 0.0)
        A = beta[:, None] * Din * KK
        # (I + A)^{-1} by forward substitution (rows j < s are final when row s is formed).
        Ainv = eye
        for s in range(1, BLOCK_T):
            a_row = tl.sum(tl.where(i[:, None] == s, A, 0.0), axis=0)
            new = tl.where(i == s, 1.0, 0.0) - tl.sum(a_row[:, None] * Ainv, axis=0)
            Ainv = tl.where(i[:, None] == s, new[None, :], Ainv)
        W = tl.dot(Ainv, beta[:, None] * (V - gam[:, None] * KS), input_precision="ieee")
        Z = gam_ex[:, None] * US + tl.dot(Dex * UK, W, input_precision="ieee")
        dlt = (-_expm1(g))[:, None] * Z - c[:, None] * W
        tl.store(delta_ptr + (t[:, None] * Hv + h) * dv + offs_v[None, :], dlt, mask=mt[:, None] & mv[None, :])
        # S <- gamma_{BT-1} S + (e K)^T W, DKB rows at a time, into the other buffer.
        decay = tl.exp(tl.sum(g, axis=0))
        ek = e * rk
        for b in range(0, NDK):
            d = b * DKB + offs_b
            m = mt[:, None] & (d < dk)[None, :]
            Kb = tl.load(k_ptr + t[:, None] * skt + kh * skh + d[None, :], mask=m, other=0.0).to(ACC)
            Sb = tl.load(s_rd + d[:, None] * BV + sv[None, :])
            Sb = decay * Sb + tl.dot(tl.trans(ek[:, None] * Kb), W, input_precision="ieee")
            tl.store(s_wr + d[:, None] * BV + sv[None, :], Sb)
        tl.debug_barrier()  # the next chunk reads what other threads of this program just wrote
    # o = S_{T-1}^T q_hat, from the buffer the last chunk wrote.
    s_fin = s_base + (NC % 2) * (NDK * DKB * BV)
    qss = tl.zeros([DKB], ACC)
    for b in range(0, NDK):
        d = b * DKB + offs_b
        qb = tl.load(q_ptr + kh * sqh + d, mask=d < dk, other=0.0).to(ACC)
        qss += qb * qb
    scale = tl.load(prm_ptr)
    if L2NORM:
        scale = scale * (1.0 / _sqrt(tl.sum(qss, axis=0) + eps, ACC))
    o = tl.zeros([BV], ACC)
    for b in range(0, NDK):
        d = b * DKB + offs_b
        qb = tl.load(q_ptr + kh * sqh + d, mask=d < dk, other=0.0).to(ACC) * scale
        Sb = tl.load(s_fin + d[:, None] * BV + sv[None, :])
        o += tl.sum(Sb * qb[:, None], axis=0)
    tl.store(o_ptr + h * dv + offs_v, o, mask=mv)


def gated_delta_knockout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                         scale: float, qk_l2norm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the gated-delta-rule knockout kernels on the inputs' device.

    Args:
        q: ``[Hk, dk]``; k: ``[T, Hk, dk]``; v: ``[T, Hv, dv]`` (any strides with a contiguous last dim;
        q, k, v of one dtype); g, beta: ``[T, Hv]`` (any strides); scale: query scale; qk_l2norm: L2-normalise
        q and k first.

    Returns:
        ``o [Hv, dv]`` and ``delta [T, Hv, dv]`` in the compute dtype, on q's device.
    """
    ok = q.dim() == 2 and k.dim() == 3 and v.dim() == 3 and g.dim() == 2 and beta.dim() == 2
    if ok:
        T, Hk, dk = k.shape
        Hv, dv = v.shape[1], v.shape[2]
        ok = (tuple(q.shape) == (Hk, dk) and v.shape[0] == T and tuple(g.shape) == (T, Hv)
              and tuple(beta.shape) == (T, Hv))
    if not ok:
        raise ValueError(f"gated_delta_knockout: need q [Hk, dk], k [T, Hk, dk], v [T, Hv, dv], g = beta [T, Hv]; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(g.shape)}, "
                         f"{tuple(beta.shape)}")
    if T < 1 or Hk < 1 or Hv % Hk:
        raise ValueError(f"gated_delta_knockout: need T >= 1 and Hv ({Hv}) a multiple of Hk ({Hk})")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"gated_delta_knockout: q, k, v must share one dtype (got {q.dtype}, {k.dtype}, {v.dtype})")
    cd = compute_dtype(q.dtype)
    _launch.check_float64(cd)
    dev = q.device
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    g, beta = g.to(cd), beta.to(cd)  # [T, Hv]; any strides
    DK = max(16, triton.next_power_of_2(dk))
    NDK = triton.cdiv(dk, DKB)
    BV = max(16, min(32, triton.next_power_of_2(dv)))
    NV = triton.cdiv(dv, BV)
    acc = acc_type(cd)
    prm = torch.tensor([scale, L2NORM_EPS], dtype=cd, device=dev)  # float kernel arguments would be fp32
    # NaN-filled, so that an element a kernel failed to write can never pass for a result.
    u = torch.full((T, Hv, dk), float("nan"), dtype=cd, device=dev)
    o = torch.full((Hv, dv), float("nan"), dtype=cd, device=dev)
    delta = torch.full((T, Hv, dv), float("nan"), dtype=cd, device=dev)
    state = torch.zeros(Hv * NV * 2 * NDK * DKB * BV, dtype=cd, device=dev)  # S_{-1} = 0
    G = Hv // Hk
    _launch.launch(_reverse, (Hv,), q, k, g, beta, u, prm, T, dk, Hv, q.stride(0), k.stride(0), k.stride(1),
                   g.stride(0), g.stride(1), beta.stride(0), beta.stride(1),
                   G=G, L2NORM=bool(qk_l2norm), ACC=acc, BLOCK_T=BLOCK_T, DK=DK)
    _launch.launch(_forward, (Hv, NV), q, k, v, g, beta, u, state, prm, o, delta, T, dk, dv, Hv, NV,
                   q.stride(0), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                   g.stride(0), g.stride(1), beta.stride(0), beta.stride(1),
                   G=G, L2NORM=bool(qk_l2norm), ACC=acc, BLOCK_T=BLOCK_T, DKB=DKB, NDK=NDK, BV=BV)
    return o, delta
