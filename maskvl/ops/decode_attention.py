"""Shared-prefix batched decode attention: schema, fake kernel, reference and backend dispatch.

B single-token decode steps (one per masked variant) that share one clean K/V prefix. Variant ``b``
has its own query ``q[b] [H, D]`` and its own key/value row ``k_own[b], v_own[b] [KV, D]`` for the
final position, and may exclude one key:

    keys_b = [k_prefix[0], ..., k_prefix[T-1], k_own[b]]      (T + 1 keys)
    exclude[b] = -1: none; 0 <= e < T: prefix key e; e == T: its own row
    out[b, h] = softmax_j(scale * <q[b, h], keys_b[j]>) @ values_b     (excluded key at -inf)

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
            "float scale, Tensor exclude) -> Tensor")


@torch.library.register_fake(OP)
def _fake(q, k_prefix, v_prefix, k_own, v_own, scale, exclude):
    return q.new_empty(q.shape, dtype=compute_dtype(q.dtype))


def decode_attention_reference(
    q: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    k_own: torch.Tensor,
    v_own: torch.Tensor,
    scale: float,
    exclude: torch.Tensor,
) -> torch.Tensor:
    """Plain PyTorch shared-prefix decode attention.

    Args:
        q: ``[B, H, D]`` queries.
        k_prefix, v_prefix: ``[T, KV, D]`` the shared clean prefix.
        k_own, v_own: ``[B, KV, D]`` each variant's own final-position key/value.
        scale: softmax scale.
        exclude: ``[B]`` int64, the key each variant leaves out (-1 none, T its own row).

    Returns:
        ``[B, H, D]`` attention outputs in the compute dtype.
    """
    B, H, D = q.shape
    T, KV, _ = k_prefix.shape
    cd = compute_dtype(q.dtype)
    group = H // KV
    qg = q.to(cd).reshape(B, KV, group, D)
    s_pre = torch.einsum("bkgd,tkd->bkgt", qg, k_prefix.to(cd)) * scale  # [B, KV, g, T]
    s_own = torch.einsum("bkgd,bkd->bkg", qg, k_own.to(cd)).unsqueeze(-1) * scale  # [B, KV, g, 1]
    s = torch.cat([s_pre, s_own], dim=-1)  # [B, KV, g, T+1]
    ex = exclude.to(q.device).long()
    cols = torch.arange(T + 1, device=q.device)
    drop = (cols.unsqueeze(0) == ex.unsqueeze(1))  # [B, T+1]
    s = s.masked_fill(drop[:, None, None, :], float("-inf"))
    a = torch.softmax(s, dim=-1)
    out = torch.einsum("bkgt,tkd->bkgd", a[..., :T], v_prefix.to(cd))
    out = out + a[..., T:] * v_own.to(cd).unsqueeze(2)
    return out.reshape(B, H, D)


# --- backend dispatch (maskvl/ops/backends.py calls these) ------------------------------------------
def run_cpp(q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor, k_own: torch.Tensor,
            v_own: torch.Tensor, scale: float, exclude: torch.Tensor) -> torch.Tensor:
    """The C++ CPU kernel, through the dispatcher."""
    return torch.ops.maskvl.decode_attention(q, k_prefix, v_prefix, k_own, v_own, float(scale), exclude)


def run_triton(kernels: ModuleType, q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor,
               k_own: torch.Tensor, v_own: torch.Tensor, scale: float, exclude: torch.Tensor) -> torch.Tensor:
    """The Triton kernel: through the dispatcher for CUDA tensors, the launcher (interpreter) otherwise."""
    if q.is_cuda:
        return torch.ops.maskvl.decode_attention(q, k_prefix, v_prefix, k_own, v_own, float(scale), exclude)
    return kernels.decode_attention.decode_attention(q, k_prefix, v_prefix, k_own, v_own, float(scale), exclude)


def cuda_kernel(kernels: ModuleType):
    """The launcher registered as this op's CUDA kernel."""
    return kernels.decode_attention.decode_attention
