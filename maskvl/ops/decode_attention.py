"""Shared-prefix batched decode attention: schema, fake kernel, reference and backend dispatch.

B single-token decode steps (one per masked variant) that share one clean K/V prefix. Variant ``b``
has its own query ``q[b] [H, D]`` and its own key/value row ``k_own[b], v_own[b] [KV, D]`` for the
final position, and may exclude one key, or a set of keys:

    keys_b = [k_prefix[0], ..., k_prefix[T-1], k_own[b]]      (T + 1 keys)
    exclude[b] = -1: none; 0 <= e < T: prefix key e; e == T: its own row
    exclude_set[b] = -1: none; n >= 0: also every key j with exclude_sets[n, j] (optional)
    out[b, h] = softmax_j(scale * <q[b, h], keys_b[j]>) @ values_b     (excluded keys at -inf)

The sets (``exclude_sets [N, T + 1]`` bool, shared by the rows that name them) serve group knockout,
where a row leaves out a whole group of keys; rows that name no set cost what the single-key path
costs. A row whose every key is excluded has no output (NaN, as a softmax over nothing).

The prefix is never copied or expanded per variant. Arithmetic in float64 for float64 inputs, else
float32. Implementations: :func:`decode_attention_reference` (here), ``csrc/decode_attention.cpp``
(CPU), ``kernels/decode_attention.py`` (Triton).
"""

from __future__ import annotations

from types import ModuleType

import torch

from ..numerics import compute_dtype
from ._library import define

OP = define("decode_attention", "(Tensor q, Tensor k_prefix, Tensor v_prefix, Tensor k_own, Tensor v_own, "
            "float scale, Tensor exclude, Tensor? exclude_sets=None, Tensor? exclude_set=None) -> Tensor")


@torch.library.register_fake(OP)
def _fake(q, k_prefix, v_prefix, k_own, v_own, scale, exclude, exclude_sets=None, exclude_set=None):
    return q.new_empty(q.shape, dtype=compute_dtype(q.dtype))


def check_exclude_sets(exclude_sets: torch.Tensor | None, exclude_set: torch.Tensor | None, B: int, T: int,
                       what: str = "decode_attention") -> None:
    """Raise ``ValueError`` unless both are None, or ``exclude_sets [N, T + 1]`` bool and ``exclude_set [B]``
    integer with values below N."""
    if exclude_sets is None and exclude_set is None:
        return
    if exclude_sets is None or exclude_set is None:
        raise ValueError(f"{what}: exclude_sets and exclude_set go together")
    if exclude_sets.dtype != torch.bool or exclude_sets.dim() != 2 or exclude_sets.shape[1] != T + 1:
        raise ValueError(f"{what}: exclude_sets must be bool [N, {T + 1}], got {exclude_sets.dtype} "
                         f"{tuple(exclude_sets.shape)}")
    if exclude_set.shape != (B,) or exclude_set.dtype.is_floating_point:
        raise ValueError(f"{what}: exclude_set must be integer [{B}], got {tuple(exclude_set.shape)}")
    if B and int(exclude_set.max()) >= exclude_sets.shape[0]:
        raise ValueError(f"{what}: exclude_set names set {int(exclude_set.max())} of {exclude_sets.shape[0]}")


def decode_attention_reference(
    q: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    k_own: torch.Tensor,
    v_own: torch.Tensor,
    scale: float,
    exclude: torch.Tensor,
    exclude_sets: torch.Tensor | None = None,
    exclude_set: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch shared-prefix decode attention.

    Args:
        q: ``[B, H, D]`` queries.
        k_prefix, v_prefix: ``[T, KV, D]`` the shared clean prefix.
        k_own, v_own: ``[B, KV, D]`` each variant's own final-position key/value.
        scale: softmax scale.
        exclude: ``[B]`` int64, the key each variant leaves out (-1 none, T its own row).
        exclude_sets: ``[N, T + 1]`` bool, optional key sets (column T: the own row).
        exclude_set: ``[B]`` int64, the set each variant also leaves out (-1 none); with ``exclude_sets``.
        sinks: ``[H]`` optional sink logits: one more softmax column per head with no value (the
            backends apply them with ``maskvl/ops/sinks.py``; this is the plain reference).

    Returns:
        ``[B, H, D]`` attention outputs in the compute dtype.
    """
    B, H, D = q.shape
    T, KV, _ = k_prefix.shape
    check_exclude_sets(exclude_sets, exclude_set, B, T)
    cd = compute_dtype(q.dtype)
    group = H // KV
    qg = q.to(cd).reshape(B, KV, group, D)
    s_pre = torch.einsum("bkgd,tkd->bkgt", qg, k_prefix.to(cd)) * scale  # [B, KV, g, T]
    s_own = torch.einsum("bkgd,bkd->bkg", qg, k_own.to(cd)).unsqueeze(-1) * scale  # [B, KV, g, 1]
    s = torch.cat([s_pre, s_own], dim=-1)  # [B, KV, g, T+1]
    ex = exclude.to(q.device).long()
    cols = torch.arange(T + 1, device=q.device)
    drop = (cols.unsqueeze(0) == ex.unsqueeze(1))  # [B, T+1]
    if exclude_sets is not None and exclude_sets.shape[0]:
        idx = exclude_set.to(q.device).long()
        named = idx >= 0
        drop = drop | (exclude_sets.to(q.device)[idx.clamp_min(0)] & named.unsqueeze(1))
    s = s.masked_fill(drop[:, None, None, :], float("-inf"))
    if sinks is not None:
        c = sinks.to(device=q.device, dtype=cd).reshape(1, KV, group, 1).expand(B, KV, group, 1)
        a = torch.softmax(torch.cat([s, c], dim=-1), dim=-1)[..., :T + 1]
    else:
        a = torch.softmax(s, dim=-1)
    out = torch.einsum("bkgt,tkd->bkgd", a[..., :T], v_prefix.to(cd))
    out = out + a[..., T:] * v_own.to(cd).unsqueeze(2)
    return out.reshape(B, H, D)


# --- backend dispatch (maskvl/ops/backends.py calls these) ------------------------------------------
def run_cpp(q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor, k_own: torch.Tensor,
            v_own: torch.Tensor, scale: float, exclude: torch.Tensor, exclude_sets: torch.Tensor | None = None,
            exclude_set: torch.Tensor | None = None) -> torch.Tensor:
    """The C++ CPU kernel, through the dispatcher."""
    return torch.ops.maskvl.decode_attention(q, k_prefix, v_prefix, k_own, v_own, float(scale), exclude,
                                             exclude_sets, exclude_set)


def run_triton(kernels: ModuleType, q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor,
               k_own: torch.Tensor, v_own: torch.Tensor, scale: float, exclude: torch.Tensor,
               exclude_sets: torch.Tensor | None = None, exclude_set: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel: through the dispatcher for CUDA tensors, the launcher (interpreter) otherwise."""
    if q.is_cuda:
        return torch.ops.maskvl.decode_attention(q, k_prefix, v_prefix, k_own, v_own, float(scale), exclude,
                                                 exclude_sets, exclude_set)
    return kernels.decode_attention.decode_attention(q, k_prefix, v_prefix, k_own, v_own, float(scale), exclude,
                                                     exclude_sets, exclude_set)


def cuda_kernel(kernels: ModuleType):
    """The launcher registered as this op's CUDA kernel."""
    return kernels.decode_attention.decode_attention
