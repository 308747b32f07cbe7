"""Mistral through transformers' ``MistralForCausalLM``.

``config.sliding_window`` (when set: Mistral 7B v0.1 has 4096, later versions none) applies to every
layer: ``MistralModel`` builds one sliding-window causal mask for all of them and ignores ``layer_types``.
The tiny model speaks Mistral's ``[INST]`` format and has a window of 16 keys, shorter than most prompts.
"""

from __future__ import annotations

from .registry import register
from .text import TextDecoderAdapter


@register
class MistralAdapter(TextDecoderAdapter):
    """Adapter over a loaded ``MistralForCausalLM`` and its tokenizer."""

    MODEL_TYPES = ("mistral",)
    WINDOWS = "all"
    TOKENIZER_STYLE = "mistral"
    TINY_CONFIG = {"sliding_window": 16}
