"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B) through transformers' ``Qwen3MoeForCausalLM``.

Attention as Qwen3 (q/k norms). The MLP of most layers is a sparse mixture of experts
(``Qwen3MoeSparseMoeBlock``: a top-k router over ``num_experts`` experts; ``mlp_only_layers`` and
``decoder_sparse_step`` leave some layers dense): the batched post-attention step runs the model's own
router and experts on every masked row, each row routed on its own. ``config.sliding_window`` (only with
``use_sliding_window``) applies to every layer, as ``Qwen3MoeModel`` builds one mask for all of them.
"""

from __future__ import annotations

from typing import Any

import torch

from .registry import register
from .text import TextDecoderAdapter


@register
class Qwen3MoeAdapter(TextDecoderAdapter):
    """Adapter over a loaded ``Qwen3MoeForCausalLM`` and its tokenizer."""

    MODEL_TYPES = ("qwen3_moe",)
    MOE = True
    WINDOWS = "all"
    TINY_CONFIG = {"num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1}

    @classmethod
    def tiny_config(cls, tokenizer: Any, **shape: Any) -> dict[str, Any]:
        cfg = super().tiny_config(tokenizer, **shape)
        cfg.setdefault("moe_intermediate_size", cfg["hidden_size"])
        return cfg

    def post_attention(self, layer: int, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        lay = self.layers[layer]
        x = self._run(lay.post_attention_layernorm, h, dtype)
        # The sparse MoE block takes [batch, seq, d_model]; the rows go in as one sequence.
        return self._run(lay.mlp, x.unsqueeze(0), dtype)[0]
