"""Per-head residual-space distances without materializing ``[T, H, D_model]``: the reference.

Head h's contribution to the residual stream is ``c_h = W_h o_h`` with ``W_h = W_o[:, hD:(h+1)D]``
(``[D_model, D]``); masked, it is ``c_h + W_h delta[p, h]``. With the head Gram matrices
``G_h = W_h^T W_h`` (``[H, D, D]``, computed once per layer) the three moments of
:func:`maskvl.measures.distances_from_moments` are

    A_h    = o_h^T G_h o_h
    B_ph   = o_h^T G_h delta[p, h]
    C_ph   = delta[p, h]^T G_h delta[p, h]

so the cost is ``O(T H D^2)`` instead of ``O(T H D D_model)``.

``vector_distances`` is the same for plain vectors (``Attn``, ``Full``, ``Logits``):
``A = |c|^2, B = <c, d_p>, C = |d_p|^2``.
"""

from __future__ import annotations

import torch

from ..measures import distances_from_moments


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


def vector_distances_reference(clean: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 and cosine distances of ``clean [N]`` against ``clean + delta[t]`` for every row of ``delta [T, N]``.

    Returns ``(l2 [T], cosine_distance [T])``.
    """
    A = (clean * clean).sum().reshape(1)
    B = delta @ clean
    C = (delta * delta).sum(-1)
    return distances_from_moments(A, B, C)
