"""Triton leave-group-out attention of the final query (``maskvl::loo_group_attention`` for CUDA tensors).

Same math as ``csrc/loo_group_attention.cpp`` and ``maskvl/ops/loo_group_attention.py``: ``q [H, D]``,
``k, v [T, KV, D]``, groups as CSR ``members [M]``, ``offsets [NG + 1]`` -> ``o [H, D]``,
``delta [NG, H, D]`` in the compute dtype. Launches:

1. ``_scores``     (from ``loo_attention.py``) grid (KV, T blocks): s[h, t] = scale <q_h, k_t>.
2. ``_softmax``    grid (H,): a[h, t] = exp(s - max) / sum.
3. ``_weighted_v`` grid (KV, T blocks): per-block partial sums of o = sum_t a_t v_t;
   ``_sum_blocks`` grid (H,) adds them in block order (deterministic).
4. ``_groups``     grid (NG, H): A = sum_{j in G} a_j, U = sum_{j in G} a_j v_j over the group's members,
                   delta = (A o - U) / (1 - A); flags the pairs with A > 1/2.
5. ``_direct``     grid (flagged pairs,): where A > 1/2 (1 - A cancels), the remaining keys' softmax
                   directly from the scores, with a keep-mask row built by the launcher; no key left
                   gives the masked output 0 (delta = -o).

Everything after the loads runs in float32 (float64 for float64 inputs); compiled float32 divides and
exponentiates with the approximate instructions described in ``kernels/_launch.py``. No ``tl.dot``, so no
tile-shape constraints beyond powers of two. Offsets are 64-bit (program ids widened first, members
loaded as int64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import acc_type, compute_dtype
from .loo_attention import BLOCK_T, TILE_WARPS, _scores

BLOCK_M = 32  # group members per step of _groups
DIRECT_ABOVE = tl.constexpr(0.5)  # removed mass above which a (head, group) pair is recomputed directly


@triton.jit
def _softmax(s_ptr, a_ptr, T, ACC: tl.constexpr, BLOCK_T: tl.constexpr):
    h = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    mx = tl.full([BLOCK_T], float("-inf"), ACC)
    for t0 in range(0, T, BLOCK_T):
        idx = t0 + offs
        mx = tl.maximum(mx, tl.load(s_ptr + h * T + idx, mask=idx < T, other=float("-inf")))
    m = tl.max(mx, axis=0)
    z = tl.zeros([BLOCK_T], ACC)
    for t0 in range(0, T, BLOCK_T):
        idx = t0 + offs
        s = tl.load(s_ptr + h * T + idx, mask=idx < T, other=float("-inf"))
        z += tl.where(idx < T, tl.exp(s - m), 0.0)
    zs = tl.sum(z, axis=0)
    for t0 in range(0, T, BLOCK_T):
        idx = t0 + offs
        s = tl.load(s_ptr + h * T + idx, mask=idx < T, other=float("-inf"))
        tl.store(a_ptr + h * T + idx, tl.exp(s - m) / zs, mask=idx < T)


@triton.jit
def _weighted_v(v_ptr, a_ptr, part_ptr, T, D, NB, svt, svh,
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
        w = tl.load(a_ptr + h * T + idx, mask=mt, other=0.0)
        tl.store(part_ptr + (h * NB + tb) * D + offs_d, tl.sum(w[:, None] * vt, axis=0), mask=md)


@triton.jit
def _sum_blocks(part_ptr, o_ptr, D, NB, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    h = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    md = offs_d < D
    u = tl.zeros([BLOCK_D], ACC)
    for n0 in range(0, NB, BLOCK_N):
        n = n0 + offs_n
        p = tl.load(part_ptr + (h * NB + n[:, None]) * D + offs_d[None, :], mask=(n < NB)[:, None] & md[None, :],
                    other=0.0)
        u += tl.sum(p, axis=0)
    tl.store(o_ptr + h * D + offs_d, u, mask=md)


@triton.jit
def _groups(v_ptr, a_ptr, o_ptr, mem_ptr, off_ptr, delta_ptr, big_ptr, T, H, D, svt, svh,
            G: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    grp = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    kv = h // G
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    md = offs_d < D
    i0 = tl.load(off_ptr + grp)
    i1 = tl.load(off_ptr + grp + 1)
    wsum = tl.zeros([BLOCK_M], ACC)
    u = tl.zeros([BLOCK_D], ACC)
    for i in range(i0, i1, BLOCK_M):
        mi = (i + offs_m) < i1
        t = tl.load(mem_ptr + i + offs_m, mask=mi, other=0)
        w = tl.load(a_ptr + h * T + t, mask=mi, other=0.0)
        vt = tl.load(v_ptr + t[:, None] * svt + kv * svh + offs_d[None, :], mask=mi[:, None] & md[None, :],
                     other=0.0).to(ACC)
        wsum += w
        u += tl.sum(w[:, None] * vt, axis=0)
    A = tl.sum(wsum, axis=0)
    o = tl.load(o_ptr + h * D + offs_d, mask=md, other=0.0)
    big = A > DIRECT_ABOVE
    # Flagged pairs are overwritten by _direct; their denominator is set to 1 so no inf/nan is formed.
    d = (A * o - u) / tl.where(big, 1.0, 1.0 - A)
    tl.store(delta_ptr + (grp * H + h) * D + offs_d, d, mask=md)
    tl.store(big_ptr + grp * H + h, big.to(tl.int8))


@triton.jit
def _direct(v_ptr, s_ptr, o_ptr, keep_ptr, head_ptr, grp_ptr, delta_ptr, T, H, D, svt, svh,
            G: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    h = tl.load(head_ptr + i).to(tl.int64)
    grp = tl.load(grp_ptr + i).to(tl.int64)
    kv = h // G
    offs = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    md = offs_d < D
    ninf = float("-inf")
    mx = tl.full([BLOCK_T], ninf, ACC)
    for t0 in range(0, T, BLOCK_T):
        idx = (t0 + offs).to(tl.int64)
        kept = tl.load(keep_ptr + i * T + idx, mask=idx < T, other=0) != 0
        s = tl.load(s_ptr + h * T + idx, mask=idx < T, other=ninf)
        mx = tl.maximum(mx, tl.where(kept, s, ninf))
    m = tl.max(mx, axis=0)
    ms = tl.where(m == ninf, 0.0, m)  # no key kept: every weight below is 0
    z = tl.zeros([BLOCK_T], ACC)
    u = tl.zeros([BLOCK_D], ACC)
    for t0 in range(0, T, BLOCK_T):
        idx = (t0 + offs).to(tl.int64)
        mt = idx < T
        kept = tl.load(keep_ptr + i * T + idx, mask=mt, other=0) != 0
        s = tl.load(s_ptr + h * T + idx, mask=mt, other=ninf)
        e = tl.where(kept, tl.exp(s - ms), 0.0)
        vt = tl.load(v_ptr + idx[:, None] * svt + kv * svh + offs_d[None, :], mask=mt[:, None] & md[None, :],
                     other=0.0).to(ACC)
        z += e
        u += tl.sum(e[:, None] * vt, axis=0)
    zs = tl.sum(z, axis=0)
    o = tl.load(o_ptr + h * D + offs_d, mask=md, other=0.0)
    masked = tl.where(zs > 0, u / tl.where(zs > 0, zs, 1.0), 0.0)
    tl.store(delta_ptr + (grp * H + h) * D + offs_d, masked - o, mask=md)


def _keep_rows(members: torch.Tensor, offsets: torch.Tensor, groups: torch.Tensor, T: int) -> torch.Tensor:
    """``[n, T]`` uint8: 1 except at the members of ``groups[i]`` in row i (vectorised CSR gather)."""
    start = offsets[groups]
    size = offsets[groups + 1] - start
    row = torch.repeat_interleave(torch.arange(groups.numel(), device=members.device), size)
    first = torch.cumsum(size, 0) - size
    inner = torch.arange(row.numel(), device=members.device) - first[row]
    keep = torch.ones(groups.numel(), T, dtype=torch.uint8, device=members.device)
    keep[row, members[start[row] + inner]] = 0
    return keep


def loo_group_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, members: torch.Tensor,
                        offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the leave-group-out attention kernels.

    Args:
        q: ``[H, D]``; k, v: ``[T, KV, D]`` (any strides with a contiguous last dim); scale: softmax scale;
        members: ``[M]`` int, the groups' distinct positions in ``[0, T)``, group after group;
        offsets: ``[NG + 1]`` int, group ``g`` is ``members[offsets[g]:offsets[g + 1]]``.

    Returns:
        ``o [H, D]`` and ``delta [NG, H, D]`` in the compute dtype, on q's device.
    """
    if q.dim() != 2 or k.dim() != 3 or k.shape != v.shape or k.shape[2] != q.shape[1]:
        raise ValueError(f"loo_group_attention: need q [H, D], k = v [T, KV, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    H, D = q.shape
    T, KV, _ = k.shape
    if T < 1 or H % KV:
        raise ValueError(f"loo_group_attention: need T >= 1 and H ({H}) a multiple of KV ({KV})")
    if (members.dim() != 1 or offsets.dim() != 1 or offsets.numel() < 1 or members.dtype.is_floating_point
            or offsets.dtype.is_floating_point):
        raise ValueError("loo_group_attention: need integer members [M] and offsets [NG + 1]")
    dev = q.device
    members = members.to(device=dev, dtype=torch.int64).contiguous()
    offsets = offsets.to(device=dev, dtype=torch.int64).contiguous()
    if members.device.type != "meta":  # meta: a compile-only run has no values to check
        off_cpu = offsets.cpu()
        if int(off_cpu[0]) != 0 or int(off_cpu[-1]) != members.numel() or bool((off_cpu.diff() < 0).any()):
            raise ValueError(f"loo_group_attention: offsets must rise from 0 to len(members) = {members.numel()}")
        if members.numel() and (int(members.min()) < 0 or int(members.max()) >= T):
            raise ValueError(f"loo_group_attention: members must lie in [0, {T})")
    NG = offsets.numel() - 1
    G = H // KV
    cd = compute_dtype(q.dtype)
    _launch.check_float64(cd)
    acc = acc_type(cd)
    q = q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    BLOCK_D = triton.next_power_of_2(D)
    NB = triton.cdiv(T, BLOCK_T)
    s = torch.empty(H, T, dtype=cd, device=dev)
    a = torch.empty(H, T, dtype=cd, device=dev)
    part = torch.empty(H, NB, D, dtype=cd, device=dev)
    o = torch.empty(H, D, dtype=cd, device=dev)
    delta = torch.empty(NG, H, D, dtype=cd, device=dev)
    scale_t = torch.full((1,), scale, dtype=cd, device=dev)  # a float kernel argument would be fp32
    _launch.launch(_scores, (KV, NB), q, k, s, scale_t, T, D, k.stride(0), k.stride(1),
                   G=G, ACC=acc, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D)
    _launch.launch(_softmax, (H,), s, a, T, ACC=acc, BLOCK_T=256)
    _launch.launch(_weighted_v, (KV, NB), v, a, part, T, D, NB, v.stride(0), v.stride(1),
                   G=G, ACC=acc, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=TILE_WARPS)
    _launch.launch(_sum_blocks, (H,), part, o, D, NB, ACC=acc, BLOCK_N=16, BLOCK_D=BLOCK_D)
    if NG == 0:
        return o, delta
    big = torch.empty(NG, H, dtype=torch.int8, device=dev)
    _launch.launch(_groups, (NG, H), v, a, o, members, offsets, delta, big, T, H, D, v.stride(0), v.stride(1),
                   G=G, ACC=acc, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=TILE_WARPS)
    if big.device.type == "meta":  # a compile-only run (kernels/compile_check.py): compile _direct too
        gs = hs = torch.empty(H, dtype=torch.int64, device=dev)
        keep = torch.empty(H, T, dtype=torch.uint8, device=dev)
    else:
        gs, hs = torch.nonzero(big, as_tuple=True)  # few: at most one group per head when groups are disjoint
        keep = _keep_rows(members, offsets, gs, T) if gs.numel() else None
    if gs.numel():
        _launch.launch(_direct, (gs.numel(),), v, s, o, keep, hs.to(torch.int32).contiguous(),
                       gs.to(torch.int32).contiguous(), delta, T, H, D, v.stride(0), v.stride(1),
                       G=G, ACC=acc, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=TILE_WARPS)
    return o, delta
