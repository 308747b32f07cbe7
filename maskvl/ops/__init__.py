"""The engine's hot operations, behind one backend interface.

Each op has a plain PyTorch reference here (``maskvl/ops/<op>.py``); compiled backends (the C++
extension ``maskvl._C`` on the CPU, Triton kernels on CUDA) implement the same functions and are tested
against these references. The engine only ever calls a :class:`Backend`.
"""

from __future__ import annotations

import torch

from .decode_attention import decode_attention_reference
from .head_distances import head_distances_reference, head_grams, vector_distances_reference
from .loo_attention import loo_attention_reference

BACKENDS = ("auto", "reference", "cpp", "triton")


class Backend:
    """The reference backend: plain PyTorch on any device. Subclasses override the ops."""

    name = "reference"

    def loo_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
        """``q [H, D]``, ``k, v [T, KV, D]`` -> ``(o [H, D], delta [T, H, D])``; see ``loo_attention.py``."""
        return loo_attention_reference(q, k, v, scale)

    def head_distances(self, o: torch.Tensor, delta: torch.Tensor, gram: torch.Tensor):
        """``o [H, D]``, ``delta [T, H, D]``, ``gram [H, D, D]`` -> ``(l2 [T, H], cos [T, H])``."""
        return head_distances_reference(o, delta, gram)

    def vector_distances(self, clean: torch.Tensor, delta: torch.Tensor):
        """``clean [N]``, ``delta [T, N]`` -> ``(l2 [T], cos [T])``."""
        return vector_distances_reference(clean, delta)

    def decode_attention(self, q, k_prefix, v_prefix, k_own, v_own, scale: float, exclude):
        """``q [B, H, D]``, prefix ``[T, KV, D]``, own ``[B, KV, D]``, ``exclude [B]`` -> ``[B, H, D]``."""
        return decode_attention_reference(q, k_prefix, v_prefix, k_own, v_own, scale, exclude)


def backend_status(device: torch.device | str) -> dict[str, str | None]:
    """For each concrete backend: ``None`` if usable on ``device``, else the reason it is not."""
    return {"reference": None, "cpp": "not built yet", "triton": "not built yet"}


def get_backend(name: str = "auto", device: torch.device | str = "cpu") -> Backend:
    """The backend called ``name`` for ``device``; ``auto`` picks triton on CUDA, cpp on CPU, else reference."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    status = backend_status(device)
    if name == "auto":
        dev = torch.device(device)
        preferred = "triton" if dev.type == "cuda" else "cpp"
        name = preferred if status.get(preferred) is None else "reference"
    if status.get(name) is not None:
        raise ValueError(f"backend {name!r} is unavailable: {status[name]}")
    return Backend()


__all__ = ["BACKENDS", "Backend", "backend_status", "get_backend", "head_grams"]
