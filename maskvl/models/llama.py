"""Llama (1, 2, 3.x) and Llama-architecture checkpoints through transformers' ``LlamaForCausalLM``.

No per-head q/k norms, no sliding windows; ``attention_bias`` puts a bias on q/k/v and on o_proj (``Attn``
includes o_proj's bias, ``Head_N`` does not). The tiny model speaks Llama 3's chat format.
"""

from __future__ import annotations

from .registry import register
from .text import TextDecoderAdapter


@register
class LlamaAdapter(TextDecoderAdapter):
    """Adapter over a loaded ``LlamaForCausalLM`` and its tokenizer."""

    MODEL_TYPES = ("llama",)
    TOKENIZER_STYLE = "llama3"
