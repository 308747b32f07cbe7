"""Triton shared-prefix batched decode attention (``maskvl::decode_attention`` for CUDA tensors).

``q [B, H, D]``, ``k_prefix, v_prefix [T, KV, D]`` shared, ``k_own, v_own [B, KV, D]``, ``exclude [B]``,
optionally ``exclude_sets [N, T + 1]`` bool with ``exclude_set [B]`` -> ``out [B, H, D]`` in the compute
dtype; same semantics as ``maskvl/ops/decode_attention.py`` (exclude -1 or any value outside [0, T]:
none; e < T: prefix key e; e == T: the variant's own row; exclude_set[b] = n >= 0: also every key j
with exclude_sets[n, j]). The set lookups are compiled only when sets are given (``HAS_SETS``), so the
single-key path is the same kernel as without them.

One program per (KV head, block of variants): its BLOCK_R query rows are (variant, head-of-group)
pairs, so every prefix tile is loaded once per program and used by all of them through ``tl.dot``
(full float32 products, ``input_precision="ieee"``, not TF32; float64 for float64 inputs); online softmax
over prefix tiles, then the own row. The prefix is never expanded per variant. Tiles: BLOCK_R >= 16,
BLOCK_T >= 16, BLOCK_D >= 16, powers of two. Offsets are 64-bit (program ids and rows widened first).
Numerics of the compiled code: ``kernels/_launch.py``.

The [BLOCK_R, BLOCK_D] accumulator, the query tile and the K/V tiles live in registers; tile rows,
warps and pipelining per prefix dtype are in :func:`launch_config` (``make compile-check`` prints the
register and spill counts).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import acc_type, compute_dtype


@triton.jit
def _decode(q_ptr, kp_ptr, vp_ptr, ko_ptr, vo_ptr, ex_ptr, scale_ptr, out_ptr, sets_ptr, set_ptr,
            B, H, T, D, skt, skh, svt, svh, skob, skoh, svob, svoh, sst,
            G: tl.constexpr, BB: tl.constexpr, ACC: tl.constexpr, HAS_SETS: tl.constexpr,
            BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    kv = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    bi = r // G
    b = tl.program_id(1).to(tl.int64) * BB + bi
    rv = (bi < BB) & (b < B)  # rows past BB * G or past the last variant are padding
    h = kv * G + r % G
    offs_d = tl.arange(0, BLOCK_D)
    md = offs_d < D
    rmask = rv[:, None] & md[None, :]
    q = tl.load(q_ptr + (b[:, None] * H + h[:, None]) * D + offs_d[None, :], mask=rmask, other=0.0).to(ACC)
    ex = tl.load(ex_ptr + b, mask=rv, other=-1)
    if HAS_SETS:
        es = tl.load(set_ptr + b, mask=rv, other=-1)  # the row's key set, -1: none (int64)
        has_set = es >= 0
    scale = tl.load(scale_ptr)
    ninf = float("-inf")
    m = tl.full([BLOCK_R], ninf, ACC)
    l = tl.zeros([BLOCK_R], ACC)
    acc = tl.zeros([BLOCK_R, BLOCK_D], ACC)
    for t0 in range(0, T, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        mt = offs_t < T
        tmask = mt[:, None] & md[None, :]
        k = tl.load(kp_ptr + offs_t[:, None] * skt + kv * skh + offs_d[None, :], mask=tmask, other=0.0).to(ACC)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [BLOCK_R, BLOCK_T]
        keep = mt[None, :] & (offs_t[None, :] != ex[:, None])
        if HAS_SETS:
            dropped = tl.load(sets_ptr + es[:, None] * sst + offs_t[None, :], mask=has_set[:, None] & mt[None, :],
                              other=0)
            keep = keep & (dropped == 0)
        s = tl.where(keep, s, ninf)
        mn = tl.maximum(m, tl.max(s, axis=1))
        # Rows that have seen no kept key yet keep mn = -inf: subtract 0 instead, so exp(-inf) = 0
        # rather than exp(nan).
        mns = tl.where(mn == ninf, 0.0, mn)
        alpha = tl.exp(m - mns)
        p = tl.where(keep, tl.exp(s - mns[:, None]), 0.0)
        v = tl.load(vp_ptr + offs_t[:, None] * svt + kv * svh + offs_d[None, :], mask=tmask, other=0.0).to(ACC)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m = mn
    # The variant's own final-position key/value row.
    ko = tl.load(ko_ptr + b[:, None] * skob + kv * skoh + offs_d[None, :], mask=rmask, other=0.0).to(ACC)
    vo = tl.load(vo_ptr + b[:, None] * svob + kv * svoh + offs_d[None, :], mask=rmask, other=0.0).to(ACC)
    so = tl.sum(q * ko, axis=1) * scale
    keep_o = ex != T
    if HAS_SETS:
        keep_o = keep_o & (tl.load(sets_ptr + es * sst + T, mask=has_set, other=0) == 0)
    so = tl.where(keep_o, so, ninf)
    mn = tl.maximum(m, so)
    mns = tl.where(mn == ninf, 0.0, mn)
    alpha = tl.exp(m - mns)
    po = tl.where(keep_o, tl.exp(so - mns), 0.0)
    l = l * alpha + po
    acc = acc * alpha[:, None] + po[:, None] * vo
    out = acc / l[:, None]
    tl.store(out_ptr + (b[:, None] * H + h[:, None]) * D + offs_d[None, :], out, mask=rmask)


def launch_config(prefix_dtype: torch.dtype) -> dict[str, int]:
    """Prefix tile rows, warps and pipeline stages of ``_decode`` for a prefix (KV cache) dtype.

    Chosen with ``make compile-check`` at Qwen3-VL-4B's shapes (BLOCK_R 32, D 128) for sm_80 and sm_90.
    float32: 32-row tiles, 8 warps, 3 stages (~110-130 registers). bf16/fp16 spill at 4 warps (~10 KB
    per thread) and still at 8 (~450 B) while their tiles are software-pipelined (the upcast copies of
    the tiles in flight overflow the registers): 16-row tiles, 8 warps, no pipelining fit (~130
    registers, none spilled). float64 takes the same, which also keeps it inside sm_80's 163 KB of
    shared memory (pipelined 32-row tiles need 169 KB).
    """
    if prefix_dtype == torch.float32:
        return {"BLOCK_T": 32, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_T": 16, "num_warps": 8, "num_stages": 1}


def decode_attention(q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor, k_own: torch.Tensor,
                     v_own: torch.Tensor, scale: float, exclude: torch.Tensor, exclude_sets: torch.Tensor | None = None,
                     exclude_set: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the shared-prefix decode attention kernel on the inputs' device; returns ``out [B, H, D]``
    in the compute dtype.

    ``exclude_sets [N, T + 1]`` bool and ``exclude_set [B]`` (optional, together): row b also leaves out
    every key j with ``exclude_sets[exclude_set[b], j]`` (none where ``exclude_set[b] < 0``).
    """
    if q.dim() != 3 or k_prefix.dim() != 3 or k_prefix.shape != v_prefix.shape or k_prefix.shape[2] != q.shape[2]:
        raise ValueError(f"decode_attention: need q [B, H, D], k_prefix = v_prefix [T, KV, D]; got {tuple(q.shape)}, "
                         f"{tuple(k_prefix.shape)}, {tuple(v_prefix.shape)}")
    B, H, D = q.shape
    T, KV, _ = k_prefix.shape
    if H % KV or k_own.shape != (B, KV, D) or v_own.shape != (B, KV, D) or exclude.shape != (B,):
        raise ValueError(f"decode_attention: need H ({H}) a multiple of KV ({KV}), k_own = v_own [{B}, {KV}, {D}], "
                         f"exclude [{B}]; got {tuple(k_own.shape)}, {tuple(v_own.shape)}, {tuple(exclude.shape)}")
    if (exclude_sets is None) != (exclude_set is None):
        raise ValueError("decode_attention: exclude_sets and exclude_set go together")
    has_sets = exclude_sets is not None
    if has_sets:
        if exclude_sets.dtype != torch.bool or exclude_sets.dim() != 2 or exclude_sets.shape[1] != T + 1:
            raise ValueError(f"decode_attention: exclude_sets must be bool [N, {T + 1}], got {exclude_sets.dtype} "
                             f"{tuple(exclude_sets.shape)}")
        if exclude_set.shape != (B,) or exclude_set.dtype.is_floating_point:
            raise ValueError(f"decode_attention: exclude_set must be integer [{B}], got {tuple(exclude_set.shape)}")
        if B and exclude_set.device.type != "meta" and int(exclude_set.max()) >= exclude_sets.shape[0]:
            raise ValueError(f"decode_attention: exclude_set names set {int(exclude_set.max())} of "
                             f"{exclude_sets.shape[0]}")
    G = H // KV
    cd = compute_dtype(q.dtype)
    _launch.check_float64(cd)
    dev = q.device
    q = q.contiguous()
    k_prefix, v_prefix, k_own, v_own = (x if x.stride(-1) == 1 else x.contiguous()
                                        for x in (k_prefix, v_prefix, k_own, v_own))
    exclude = exclude.to(device=dev, dtype=torch.int64).contiguous()
    if has_sets:
        # uint8 view: the kernel compares bytes (a bool pointer's int1 loads vary across Triton versions).
        sets = exclude_sets.to(dev).contiguous().view(torch.uint8)
        set_of = exclude_set.to(device=dev, dtype=torch.int64).contiguous()
    else:
        sets, set_of = exclude, exclude  # never read: HAS_SETS=False compiles the lookups out
    out = torch.empty(B, H, D, dtype=cd, device=dev)
    if B == 0:
        return out
    BLOCK_R = max(32, triton.next_power_of_2(G))
    BB = BLOCK_R // G  # variants per program
    BLOCK_D = max(16, triton.next_power_of_2(D))
    scale_t = torch.full((1,), scale, dtype=cd, device=dev)  # a float kernel argument would be fp32
    _launch.launch(
        _decode, (KV, triton.cdiv(B, BB)),
        q, k_prefix, v_prefix, k_own, v_own, exclude, scale_t, out, sets, set_of,
        B, H, T, D, k_prefix.stride(0), k_prefix.stride(1), v_prefix.stride(0), v_prefix.stride(1),
        k_own.stride(0), k_own.stride(1), v_own.stride(0), v_own.stride(1), sets.stride(0) if has_sets else 0,
        G=G, BB=BB, ACC=acc_type(cd), HAS_SETS=has_sets, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
        **launch_config(k_prefix.dtype))
    return out
