"""Leave-one-out attention for the final query: schema, fake kernel, reference and backend dispatch.

For one query row ``q [H, D]`` against keys/values ``k, v [T, KV, D]`` (GQA: head ``h`` reads KV head
``h // (H // KV)``), returns the clean head outputs and, for every key ``p``, the change of every
head's output when key ``p`` is removed from the softmax:

    a_hj   = softmax_j(scale * <q_h, k_j>)
    o_h    = sum_j a_hj v_j
    delta[p, h] = o_h^(-p) - o_h = a_hp (o_h - v_p) / (1 - a_hp)

The closed form cancels when ``a_hp -> 1``; only the argmax key of each head can have ``a_hp > 1/2``,
so that one key is recomputed directly with a softmax that leaves it out. With a single key (``T == 1``)
removing it leaves nothing to attend to; the masked output is defined as zero (``delta = -o``).

Arithmetic is in float64 for float64 inputs and float32 otherwise (bf16/fp16 are upcast).
Implementations: :func:`loo_attention_reference` (here), ``csrc/loo_attention.cpp`` (CPU),
``kernels/loo_attention.py`` (Triton).
"""

from __future__ import annotations

from types import ModuleType

import torch

from ..numerics import compute_dtype
from ._library import define

OP = define("loo_attention", "(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)")


@torch.library.register_fake(OP)
def _fake(q, k, v, scale):
    H, D = q.shape
    T = k.shape[0]
    cd = compute_dtype(q.dtype)
    return q.new_empty((H, D), dtype=cd), q.new_empty((T, H, D), dtype=cd)


def loo_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch leave-one-out attention.

    Args:
        q: ``[H, D]`` the final position's query (after q_norm and RoPE).
        k: ``[T, KV, D]`` keys of all positions (after k_norm and RoPE).
        v: ``[T, KV, D]`` values of all positions.
        scale: softmax scale (``head_dim ** -0.5`` for Qwen3).

    Returns:
        ``o [H, D]`` clean head outputs and ``delta [T, H, D]`` (masked minus clean), in the compute
        dtype (float64 for float64 inputs, else float32).
    """
    H, D = q.shape
    T, KV, _ = k.shape
    if H % KV:
        raise ValueError(f"{H} query heads are not a multiple of {KV} KV heads")
    cd = compute_dtype(q.dtype)
    group = H // KV
    kv_of_head = torch.arange(H, device=q.device) // group
    qf = q.to(cd)
    kh = k.to(cd)[:, kv_of_head, :].transpose(0, 1)  # [H, T, D]
    vh = v.to(cd)[:, kv_of_head, :].transpose(0, 1)  # [H, T, D]
    s = torch.einsum("hd,htd->ht", qf, kh) * scale  # [H, T]
    a = torch.softmax(s, dim=-1)
    o = torch.einsum("ht,htd->hd", a, vh)  # [H, D]
    if T == 1:
        return o, (-o).unsqueeze(0)
    delta = (a / (1 - a)).unsqueeze(-1) * (o.unsqueeze(1) - vh)  # [H, T, D]
    # The argmax key of each head: recompute its masked output directly (no 1 - a_p cancellation).
    j = a.argmax(dim=-1)  # [H]
    heads = torch.arange(H, device=q.device)
    s_wo = s.clone()
    s_wo[heads, j] = float("-inf")
    o_wo = torch.einsum("ht,htd->hd", torch.softmax(s_wo, dim=-1), vh)
    delta[heads, j] = o_wo - o
    return o, delta.transpose(0, 1).contiguous()


# --- backend dispatch (maskvl/ops/backends.py calls these) ------------------------------------------
def run_cpp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ CPU kernel, through the dispatcher."""
    o, delta = torch.ops.maskvl.loo_attention(q, k, v, float(scale))
    return o, delta


def run_triton(kernels: ModuleType, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernels: through the dispatcher for CUDA tensors, the launcher (interpreter) otherwise."""
    if q.is_cuda:
        o, delta = torch.ops.maskvl.loo_attention(q, k, v, float(scale))
        return o, delta
    return kernels.loo_attention.loo_attention(q, k, v, float(scale))


def cuda_kernel(kernels: ModuleType):
    """The launcher registered as this op's CUDA kernel."""
    return kernels.loo_attention.loo_attention
