"""Numeric helpers shared by the ops (``maskvl/ops``) and the measures (``maskvl/measures.py``).

They live here, apart from the measure definitions, so that the ops need not import those. The
formulas are derived in ``maskvl/measures.py``'s docstring (which re-exports both helpers); the C++
kernels (``csrc/common.h``) and the Triton kernels (``kernels/distances.py``, ``kernels/_launch.py``)
repeat them operation for operation.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype measures are computed in: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def distances_from_moments(
    A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 and cosine distance of ``c`` and ``m = c + d`` from ``A = |c|^2``, ``B = <c,d>``, ``C = |d|^2``.

    Shapes broadcast together (e.g. ``A [1, H]``, ``B [T, H]``, ``C [T, H]``). Returns
    ``(l2, cosine_distance)`` in the dtype of the inputs; see ``maskvl/measures.py`` for the formula.
    """
    A, B, C = torch.broadcast_tensors(A, B, C)
    C = C.clamp_min(0)
    nc = A.clamp_min(0).sqrt()
    nm = (A + 2 * B + C).clamp_min(0).sqrt()
    l2 = C.sqrt()
    denom = nc + nm
    safe = denom > 0
    diff = torch.where(safe, (2 * B + C) / torch.where(safe, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    prod = nc * nm
    both = prod > 0
    cos = (C - diff * diff) / torch.where(both, 2 * prod, torch.ones_like(prod))
    cos = cos.clamp(0, 2)
    # Degenerate cases: one vector zero -> 1 (orthogonal by convention); both zero -> 0 (identical).
    cos = torch.where(both, cos, torch.where(safe, torch.ones_like(cos), torch.zeros_like(cos)))
    return l2, cos
