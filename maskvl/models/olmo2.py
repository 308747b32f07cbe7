"""OLMo 2 through transformers' ``Olmo2ForCausalLM``.

What differs from the common decoder (:mod:`maskvl.models.decoder`): no norm before attention or the
MLP; instead ``post_attention_layernorm`` normalises the attention output and
``post_feedforward_layernorm`` the MLP output, each before its residual add. The norm after attention
is the adapter's :meth:`attention_norm`: ``Full`` goes through it, ``Attn`` and ``Head_N`` are o_proj's
output before it. The q/k norms act on the whole projection (``[H * D]``, across heads) before it is
split into heads and rotated. No sliding windows.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from .registry import register
from .text import TextDecoderAdapter


@register
class Olmo2Adapter(TextDecoderAdapter):
    """Adapter over a loaded ``Olmo2ForCausalLM`` and its tokenizer."""

    MODEL_TYPES = ("olmo2",)
    TOKENIZER_STYLE = "olmo2"
    has_attention_norm = True

    @classmethod
    def tiny_config(cls, tokenizer: Any, **shape: Any) -> dict[str, Any]:
        cfg = super().tiny_config(tokenizer, **shape)
        # Olmo2Config has no head_dim: heads are hidden_size / num_attention_heads wide.
        if cfg.pop("head_dim") * cfg["num_attention_heads"] != cfg["hidden_size"]:
            raise InputError("olmo2: head_dim * num_heads must equal hidden_size")
        return cfg

    def input_norm(self, layer: int, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return h.to(dtype)  # attention reads the residual stream itself

    def _project_qkv(self, layer: int, x: torch.Tensor, dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        at = self.layers[layer].self_attn
        B = x.shape[0]
        q = self._run(at.q_norm, self._run(at.q_proj, x, dtype), dtype).view(B, self.num_heads, self.head_dim)
        k = self._run(at.k_norm, self._run(at.k_proj, x, dtype), dtype).view(B, self.num_kv_heads, self.head_dim)
        v = self._run(at.v_proj, x, dtype).view(B, self.num_kv_heads, self.head_dim)
        return q, k, v

    def attention_norm(self, layer: int, attn: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._run(self.layers[layer].post_attention_layernorm, attn, dtype)

    def post_attention(self, layer: int, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        lay = self.layers[layer]
        return self._run(lay.post_feedforward_layernorm, self._run(lay.mlp, h, dtype), dtype)
