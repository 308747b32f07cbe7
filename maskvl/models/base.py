"""The interface between the engine and a model family.

The engine never touches a model's internals: it asks an adapter to prepare inputs, to run clean
forwards that capture what the measures need, and for the per-layer pieces it replays (o_proj, the
post-attention block, a single-position decoder layer, the head). One file per family implements it
(``maskvl/models/qwen3_vl.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ImageInfo:
    """Where one image sits in the sequence and how it was tokenized."""

    index: int
    path: str | None
    grid_rows: int  # merged-token grid
    grid_cols: int
    token_start: int  # first image pad position
    token_end: int  # exclusive
    original_size: tuple[int, int]  # (width, height)
    resized_size: tuple[int, int]  # (width, height) after the processor's resize

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "path": self.path,
            "grid_rows": self.grid_rows,
            "grid_cols": self.grid_cols,
            "token_start": self.token_start,
            "token_end": self.token_end,
            "original_size": list(self.original_size),
            "resized_size": list(self.resized_size),
        }


@dataclass
class Prepared:
    """A tokenized prompt with its images, ready for the clean prefill.

    ``input_ids`` is ``[1, S]``; ``model_inputs`` holds everything else the model's forward takes
    (pixel values, grids, token type ids). ``is_image`` is ``[S]`` bool (True on image pad tokens).
    """

    input_ids: torch.Tensor
    model_inputs: dict[str, Any]
    is_image: torch.Tensor
    images: list[ImageInfo] = field(default_factory=list)
    prompt_text: str = ""


@dataclass
class Capture:
    """What one clean forward leaves for the measures, at its final position.

    Attributes:
        x: per layer, the decoder layer's input at the final position, ``[d_model]`` (model dtype).
        q: per layer, the final position's query after q_norm and RoPE, ``[H, D]`` (model dtype).
        logits: the next-token logits at the final position, ``[V]``.
        rope: the final position's rotary ``(cos, sin)``, ``[D]`` each (model dtype).
    Keys and values of every position are read from the KV cache with :meth:`ModelAdapter.kv`.
    """

    x: list[torch.Tensor]
    q: list[torch.Tensor]
    logits: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor] | None = None


class ModelAdapter:
    """What the engine needs from a model family (see ``qwen3_vl.py`` for the implementation)."""

    model_id: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    dtype: torch.dtype
    device: torch.device
    scale: float

    def prepare(self, prompt: str, images: list[Any], image_paths: list[str | None]) -> Prepared:
        raise NotImplementedError

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token decoded on its own."""
        raise NotImplementedError

    def stop_token_ids(self) -> set[int]:
        raise NotImplementedError

    def new_cache(self) -> Any:
        raise NotImplementedError

    def prefill(self, prepared: Prepared, cache: Any) -> Capture:
        raise NotImplementedError

    def decode(self, token_id: int, cache: Any) -> Capture:
        raise NotImplementedError

    def kv(self, cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of all cached positions at ``layer``: ``[T, KV, D]`` each."""
        raise NotImplementedError

    def o_proj_weight(self, layer: int) -> torch.Tensor:
        """``[d_model, H * D]``."""
        raise NotImplementedError

    def post_attention(self, layer: int, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The layer's MLP branch for residual rows ``h [N, d_model]`` (norm + MLP), in ``dtype``."""
        raise NotImplementedError

    def replay_layer(self, layer: int, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                     k_prefix: torch.Tensor, v_prefix: torch.Tensor, exclude: torch.Tensor,
                     attend: Any, dtype: torch.dtype) -> torch.Tensor:
        """One decoder layer for B single-position rows ``h [B, d_model]`` at the final position.

        Attention runs through ``attend(q [B,H,D], k_prefix, v_prefix, k_own [B,KV,D], v_own, scale,
        exclude [B])`` against the shared clean prefix ``[T, KV, D]``. Returns ``[B, d_model]``.
        """
        raise NotImplementedError

    def final_logits(self, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Final norm and LM head for rows ``h [B, d_model]``: ``[B, V]``."""
        raise NotImplementedError
