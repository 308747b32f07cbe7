"""Distances of plain vectors (``Full``, ``Attn``, ``Logits``): schema, fake kernel, reference and
backend dispatch.

For a clean vector ``clean [N]`` and the changes ``delta [T, N]`` of its T masked variants, the moments
of :func:`maskvl.numerics.distances_from_moments` are ``A = |c|^2``, ``B_t = <c, d_t>`` and
``C_t = |d_t|^2``. Implementations: :func:`vector_distances_reference` (here),
``csrc/vector_distances.cpp`` (CPU), ``kernels/vector_distances.py`` (Triton).
"""

from __future__ import annotations

from types import ModuleType

import torch

from ..numerics import compute_dtype, distances_from_moments
from ._library import define

OP = define("vector_distances", "(Tensor clean, Tensor delta) -> (Tensor, Tensor)")


@torch.library.register_fake(OP)
def _fake(clean, delta):
    T = delta.shape[0]
    cd = compute_dtype(delta.dtype)
    return delta.new_empty((T,), dtype=cd), delta.new_empty((T,), dtype=cd)


def vector_distances_reference(clean: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 and cosine distances of ``clean [N]`` against ``clean + delta[t]`` for every row of ``delta [T, N]``.

    Returns ``(l2 [T], cosine_distance [T])``.
    """
    A = (clean * clean).sum().reshape(1)
    B = delta @ clean
    C = (delta * delta).sum(-1)
    return distances_from_moments(A, B, C)


# --- backend dispatch (maskvl/ops/backends.py calls these) ------------------------------------------
def run_cpp(clean: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ CPU kernel, through the dispatcher."""
    l2, cosd = torch.ops.maskvl.vector_distances(clean, delta)
    return l2, cosd


def run_triton(kernels: ModuleType, clean: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel: through the dispatcher for CUDA tensors, the launcher (interpreter) otherwise."""
    if delta.is_cuda:
        l2, cosd = torch.ops.maskvl.vector_distances(clean, delta)
        return l2, cosd
    return kernels.vector_distances.vector_distances(clean, delta)


def cuda_kernel(kernels: ModuleType):
    """The launcher registered as this op's CUDA kernel."""
    return kernels.vector_distances.vector_distances
