"""Qwen3 (dense) through transformers' ``Qwen3ForCausalLM``.

Per-head RMSNorm on queries and keys before RoPE (``q_norm``/``k_norm``); with ``use_sliding_window`` the
layers that ``config.layer_types`` marks ``sliding_attention`` attend within ``sliding_window`` keys.
"""

from __future__ import annotations

from .registry import register
from .text import TextDecoderAdapter


@register
class Qwen3Adapter(TextDecoderAdapter):
    """Adapter over a loaded ``Qwen3ForCausalLM`` and its tokenizer."""

    MODEL_TYPES = ("qwen3",)
    WINDOWS = "layer_types"
