"""Per-head residual-space distances without materializing ``[T, H, D_model]``: schema, fake kernel,
reference and backend dispatch.

Head h's contribution to the residual stream is ``c_h = W_h o_h`` with ``W_h = W_o[:, hD:(h+1)D]``
(``[D_model, D]``); masked, it is ``c_h + W_h delta[p, h]``. With the head Gram matrices
``G_h = W_h^T W_h`` (``[H, D, D]``, computed once per layer) the three moments of
:func:`maskvl.numerics.distances_from_moments` are

    A_h    = o_h^T G_h o_h
    B_ph   = o_h^T G_h delta[p, h]
    C_ph   = delta[p, h]^T G_h delta[p, h]

so the cost is ``O(T H D^2)`` instead of ``O(T H D D_model)``. Implementations:
:func:`head_distances_reference` (here), ``csrc/head_distances.cpp`` (CPU),
``kernels/head_distances.py`` (Triton). Plain vectors (``Attn``, ``Full``, ``Logits``) go through
``maskvl/ops/vector_distances.py``.
"""

from __future__ import annotations

from types import ModuleType

import torch

from ..numerics import compute_dtype, distances_from_moments
from ._library import define

OP = define("head_distances", "(Tensor o, Tensor delta, Tensor gram) -> (Tensor, Tensor)")


@torch.library.register_fake(OP)
def _fake(o, delta, gram):
    T, H, _ = delta.shape
    cd = compute_dtype(delta.dtype)
    return delta.new_empty((T, H), dtype=cd), delta.new_empty((T, H), dtype=cd)


def head_grams(o_proj_weight: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Gram matrices ``G_h = W_h^T W_h`` of o_proj's per-head column blocks.

    Args:
        o_proj_weight: ``[D_model, H * D]`` (nn.Linear layout).
        num_heads: H.
        dtype: the compute dtype.

    Returns:
        ``[H, D, D]``.
    """
    d_model, hd = o_proj_weight.shape
    D = hd // num_heads
    W = o_proj_weight.to(dtype).reshape(d_model, num_heads, D).transpose(0, 1)  # [H, D_model, D]
    return W.transpose(1, 2) @ W


def head_distances_reference(
    o: torch.Tensor, delta: torch.Tensor, gram: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 and cosine distances of every head's residual contribution, for every masked key.

    Args:
        o: ``[H, D]`` clean head outputs.
        delta: ``[T, H, D]`` masked minus clean head outputs.
        gram: ``[H, D, D]`` head Gram matrices (see :func:`head_grams`).

    Returns:
        ``(l2 [T, H], cosine_distance [T, H])`` in the dtype of ``delta``.
    """
    Gd = torch.einsum("hde,the->thd", gram, delta)  # [T, H, D]
    C = (delta * Gd).sum(-1)
    B = (o.unsqueeze(0) * Gd).sum(-1)
    A = torch.einsum("hd,hde,he->h", o, gram, o).unsqueeze(0)
    return distances_from_moments(A, B, C)


# --- backend dispatch (maskvl/ops/backends.py calls these) ------------------------------------------
def run_cpp(o: torch.Tensor, delta: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ CPU kernel, through the dispatcher."""
    l2, cosd = torch.ops.maskvl.head_distances(o, delta, gram)
    return l2, cosd


def run_triton(kernels: ModuleType, o: torch.Tensor, delta: torch.Tensor,
               gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel: through the dispatcher for CUDA tensors, the launcher (interpreter) otherwise."""
    if delta.is_cuda:
        l2, cosd = torch.ops.maskvl.head_distances(o, delta, gram)
        return l2, cosd
    return kernels.head_distances.head_distances(o, delta, gram)


def cuda_kernel(kernels: ModuleType):
    """The launcher registered as this op's CUDA kernel."""
    return kernels.head_distances.head_distances
