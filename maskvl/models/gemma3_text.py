"""Gemma 3's language model (``gemma3_text``: Gemma 3 1B, and the decoder of the multimodal Gemma 3)
through transformers' ``Gemma3ForCausalLM``.

What differs from the common decoder (:mod:`maskvl.models.decoder`):

* Norms around both branches: ``input_layernorm`` → attention → ``post_attention_layernorm`` → residual,
  then ``pre_feedforward_layernorm`` → MLP → ``post_feedforward_layernorm`` → residual. The norm after
  attention is the adapter's :meth:`attention_norm`: ``Full`` (the layer's update) goes through it,
  ``Attn`` and ``Head_N`` are o_proj's output before it, as for every family.
* The softmax scale is ``query_pre_attn_scalar ** -0.5`` (read from the attention module), not
  ``head_dim ** -0.5``; per-head q/k norms as Qwen3.
* Sliding-window layers from ``config.layer_types`` (five local layers to one global in the real
  models), with their own rotary base (``rope_parameters`` per layer type): each layer's rotary table is captured
  and replayed per layer.
* Embeddings scaled by ``sqrt(hidden_size)`` inside the model's embedding module (the engine never
  embeds: it reads the layers' inputs from the model's own forward); tied LM head; the final logits
  soft-capped with ``tanh`` where ``final_logit_softcapping`` is set.
* ``attn_logit_softcapping`` is not applied by transformers' Gemma 3 attention (only Gemma 2 used it),
  so it is not applied here either; a bidirectional config (``use_bidirectional_attention``, the
  embedding models) is refused: the final query would not be causal.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from .registry import register
from .text import TextDecoderAdapter


class GemmaLayers:
    """Gemma 3's decoder-layer arithmetic, shared by the text-only and the multimodal adapters.

    Mixed into a :class:`maskvl.models.decoder.TransformersDecoderAdapter` subclass.
    """

    has_attention_norm = True
    STOP_TOKENS = ("<end_of_turn>", "<eos>")

    def _check_gemma(self, text_config: Any) -> None:
        if getattr(text_config, "use_bidirectional_attention", False):
            raise InputError("this Gemma 3 config uses bidirectional attention (an embedding model): "
                             "maskvl measures causal decoders")

    def _final_query(self, out: torch.Tensor) -> torch.Tensor:
        return out[0, :, -1]  # Gemma 3's q_norm runs on [1, H, S, D]

    def attention_norm(self, layer: int, attn: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._run(self.layers[layer].post_attention_layernorm, attn, dtype)

    def post_attention(self, layer: int, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        lay = self.layers[layer]
        x = self._run(lay.pre_feedforward_layernorm, h, dtype)
        return self._run(lay.post_feedforward_layernorm, self._run(lay.mlp, x, dtype), dtype)

    def final_logits(self, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        logits = super().final_logits(h, dtype)
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        if cap is not None:
            # The same three operations as Gemma3ForCausalLM.forward.
            logits = torch.tanh(logits / cap) * cap
        return logits


@register
class Gemma3TextAdapter(GemmaLayers, TextDecoderAdapter):
    """Adapter over a loaded ``Gemma3ForCausalLM`` and its tokenizer."""

    MODEL_TYPES = ("gemma3_text",)
    WINDOWS = "layer_types"
    TOKENIZER_STYLE = "gemma"
    # Every other layer local, so that the tiny model has both kinds; local rotary base as the real ones.
    TINY_CONFIG = {"query_pre_attn_scalar": 20, "sliding_window": 6,
                   "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                       "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
                   "sliding_window_pattern": 2, "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh",
                   "final_logit_softcapping": 30.0}

    def __init__(self, model: Any, tokenizer: Any, model_id: str):
        self._check_gemma(model.config)
        super().__init__(model, tokenizer, model_id)

    @classmethod
    def tiny_config(cls, tokenizer: Any, **shape: Any) -> dict[str, Any]:
        cfg = super().tiny_config(tokenizer, **shape)
        cfg.pop("hidden_act", None)
        n = cfg["num_hidden_layers"]
        every = cfg.pop("sliding_window_pattern")
        cfg["layer_types"] = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]
        return cfg
