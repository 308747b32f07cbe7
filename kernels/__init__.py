"""Triton kernels of the maskvl ops.

Importing this package imports triton, so set ``TRITON_INTERPRET=1`` before importing it if the
kernels are to run on CPU tensors through the Triton interpreter (how CI tests them). On import the
launch functions are registered as the CUDA kernels of the ``maskvl::`` ops (schemas from
``maskvl/ops/_library.py``), so ``torch.ops.maskvl.<op>`` on CUDA tensors runs them.
"""

from __future__ import annotations

import torch
import triton

from maskvl.ops import _library  # noqa: F401  (defines the op schemas before the kernels register)

from .decode_attention import _decode, decode_attention
from .head_distances import head_distances, vector_distances
from .loo_attention import loo_attention

LAUNCHERS = {
    "loo_attention": loo_attention,
    "head_distances": head_distances,
    "vector_distances": vector_distances,
    "decode_attention": decode_attention,
}

for _name, _fn in LAUNCHERS.items():
    torch.library.register_kernel(f"maskvl::{_name}", "cuda", _fn)


def interpreted() -> bool:
    """True if the kernels were built for the Triton interpreter (``TRITON_INTERPRET=1`` at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_decode, InterpretedFunction)


__all__ = ["LAUNCHERS", "decode_attention", "head_distances", "interpreted", "loo_attention", "vector_distances",
           "triton"]
