"""Qwen2 / Qwen2.5 through transformers' ``Qwen2ForCausalLM``.

Biases on q/k/v (not on o_proj). With ``use_sliding_window`` the layers that ``config.layer_types`` marks
``sliding_attention`` (from ``max_window_layers`` on, unless given) attend within ``sliding_window`` keys.
"""

from __future__ import annotations

from .registry import register
from .text import TextDecoderAdapter


@register
class Qwen2Adapter(TextDecoderAdapter):
    """Adapter over a loaded ``Qwen2ForCausalLM`` and its tokenizer."""

    MODEL_TYPES = ("qwen2",)
    WINDOWS = "layer_types"
