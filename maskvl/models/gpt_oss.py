"""GPT-OSS (gpt-oss-20b, gpt-oss-120b) through transformers' ``GptOssForCausalLM``.

What differs from the common decoder (:mod:`maskvl.models.decoder`):

* Learned attention sinks: one logit per head (``self_attn.sinks``) in every softmax denominator, with
  no value. The adapter reports them (:meth:`attention_sinks`); the engine keeps them in the
  denominator of the clean and of every masked softmax (``maskvl/ops/sinks.py``), so removing a key
  renormalises over the remaining keys *and* the sink, as the model would.
* Alternating sliding-window (``layer_types``) and full-attention layers.
* A sparse MoE MLP (top-k router with a bias, experts with biases): the batched post-attention step runs
  the model's own router and experts on every masked row (float64 runs use the eager experts).
* Biases on q/k/v and o_proj (``Attn`` includes o_proj's, ``Head_N`` does not); YaRN rotary tables,
  handed to the layers at half width (``_rope_table`` widens them to the ``rotate_half`` form, the same
  arithmetic). transformers has no sdpa for GPT-OSS: the clean pass runs its eager attention.
"""

from __future__ import annotations

from typing import Any

import torch

from .registry import register
from .text import TextDecoderAdapter


@register
class GptOssAdapter(TextDecoderAdapter):
    """Adapter over a loaded ``GptOssForCausalLM`` and its tokenizer."""

    MODEL_TYPES = ("gpt_oss",)
    MOE = True
    WINDOWS = "layer_types"
    TOKENIZER_STYLE = "harmony"
    ATTN_IMPLEMENTATION = "eager"
    STOP_TOKENS = ("<|return|>", "<|call|>", "<|endoftext|>")
    TINY_CONFIG = {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 6, "attention_bias": True,
                   "rope_parameters": {"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                       "truncate": False, "original_max_position_embeddings": 512,
                                       "rope_theta": 150000.0}}

    @classmethod
    def tiny_config(cls, tokenizer: Any, **shape: Any) -> dict[str, Any]:
        cfg = super().tiny_config(tokenizer, **shape)
        cfg.pop("hidden_act", None)
        cfg["intermediate_size"] = cfg["hidden_size"]
        n = cfg["num_hidden_layers"]
        cfg["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        return cfg

    @classmethod
    def _tiny_weights(cls, model: Any) -> None:
        # The initialiser leaves the sinks near 0, a few percent of the mass: give them the weight of a
        # few keys, as in the real models, so that the tests see them.
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(1.0, 1.5)

    def attention_sinks(self, layer: int) -> torch.Tensor:
        return self.layers[layer].self_attn.sinks.detach()

    def _rope_table(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [x1 cos - x2 sin, x2 cos + x1 sin] == x * cat(cos, cos) + rotate_half(x) * cat(sin, sin), exactly
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)

    def post_attention(self, layer: int, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        lay = self.layers[layer]
        x = self._run(lay.post_attention_layernorm, h, dtype)
        # The MoE block takes [batch, seq, d_model] and returns (output, router scores); the rows go in as
        # one sequence, each routed on its own.
        out, _router_scores = self._run(lay.mlp, x.unsqueeze(0), dtype)
        return out[0]
