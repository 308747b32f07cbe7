"""Qwen3-VL-MoE (Qwen3-VL-30B-A3B, 235B-A22B) through transformers' ``Qwen3VLMoeForConditionalGeneration``.

Qwen3-VL with a sparse mixture-of-experts MLP in its decoder layers: the vision tower, DeepStack, 3D
MRoPE, q/k norms, chat template and image processor are Qwen3-VL's, so the adapter is
:class:`~maskvl.models.qwen3_vl.Qwen3VLAdapter` with two differences:

* the post-attention step runs the layer's own ``Qwen3VLMoeTextSparseMoeBlock`` (or its dense MLP in
  ``mlp_only_layers``) on all masked rows at once. The router scores every row on its own and picks
  its top-k experts, and each expert's output reaches only the rows routed to it, so a masked row whose
  residual moved to other experts is computed with those experts, exactly as the model's forward
  would (never with the clean row's routing);
* float64 runs load the experts with transformers' ``eager`` implementation: the default
  ``grouped_mm`` rejects float64 matrices.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import InputError
from .qwen3_vl import Qwen3VLAdapter
from .registry import register
from .tiny import PREPROCESSOR_CONFIG, SPECIAL_TOKENS, VIDEO_PREPROCESSOR_CONFIG, build_tokenizer, tiny_config_dict, \
    write_hub_dir

log = logging.getLogger("maskvl")


class SparseMoeRows:
    """The MoE part of a Qwen MoE adapter (mixed in before the dense family's adapter).

    * float64 runs use transformers' ``eager`` experts (its default ``grouped_mm`` rejects float64): asked
      for when loading, switched to on an already-loaded model;
    * :meth:`post_attention` runs the layer's own sparse block on all masked rows at once: its router
      scores each row on its own and routes it to its own experts (and a shared expert, where the family
      has one), exactly as the model's forward would route that row.
    """

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, model_id: str):
        if next(model.parameters()).dtype == torch.float64 and model.config._experts_implementation != "eager":
            # An already-loaded model (the API's path); load() asks for eager experts up front.
            log.info("switching the experts of %s to the eager implementation: grouped_mm rejects float64",
                     model_id)
            model.set_experts_implementation("eager")
        super().__init__(model, tokenizer, image_processor, model_id)  # type: ignore[call-arg]

    @classmethod
    def _from_pretrained_options(cls, dtype: torch.dtype) -> dict[str, Any]:
        return {"experts_implementation": "eager"} if dtype == torch.float64 else {}

    def post_attention(self, layer: int, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Post-attention norm and the layer's MoE block (or dense MLP) for rows ``h [N, d_model]``: ``[N, d_model]``.

        The sparse block takes ``[batch, seq, d]``; the N rows go in as one sequence, which the router
        and the experts treat row by row.
        """
        lay = self.layers[layer]  # type: ignore[attr-defined]
        normed = self._run(lay.post_attention_layernorm, h, dtype)  # type: ignore[attr-defined]
        return self._run(lay.mlp, normed.unsqueeze(0), dtype)[0]  # type: ignore[attr-defined]


@register
class Qwen3VLMoeAdapter(SparseMoeRows, Qwen3VLAdapter):
    """Adapter over a loaded ``Qwen3VLMoeForConditionalGeneration`` and its tokenizer / image processor."""

    MODEL_TYPES = ("qwen3_vl_moe",)
    MODEL_CLASS: ClassVar[str] = "Qwen3VLMoeForConditionalGeneration"
    FAMILY: ClassVar[str] = "Qwen3-VL-MoE"

    @classmethod
    def write_tiny_model(cls, directory: str | os.PathLike, seed: int = 0, **shape: Any) -> Path:
        """A tiny random Qwen3-VL-MoE as a hub-like directory (Qwen3-VL's tokenizer, template and processors).

        ``shape``: Qwen3-VL's keys (num_layers, num_heads, num_kv_heads, head_dim, hidden_size,
        intermediate_size, vision_depth, deepstack, ...) plus num_experts (8), num_experts_per_tok (2),
        moe_intermediate_size (32) and mlp_only_layers (none: every layer sparse, as in the published
        checkpoints).
        """
        from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

        if shape.get("head_dim", 16) % 8:
            raise InputError("head_dim must be a multiple of 8 (MRoPE sections)")
        moe = {
            "num_experts": shape.pop("num_experts", 8),
            "num_experts_per_tok": shape.pop("num_experts_per_tok", 2),
            "moe_intermediate_size": shape.pop("moe_intermediate_size", 32),
            "mlp_only_layers": list(shape.pop("mlp_only_layers", [])),
            "decoder_sparse_step": 1,
            "router_aux_loss_coef": 0.001,
        }
        shape.setdefault("deepstack", tuple(range(min(3, shape.get("num_layers", 4)))))
        tokenizer = build_tokenizer()
        special = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        cfg = tiny_config_dict(vocab_size=len(tokenizer), special_ids=special, **shape)
        cfg["text_config"].update(moe, model_type="qwen3_vl_moe_text")
        cfg["vision_config"]["model_type"] = "qwen3_vl_moe_vision"
        cfg.pop("model_type")
        cfg.pop("architectures")
        config = Qwen3VLMoeConfig(**cfg)
        torch.manual_seed(seed)
        model = Qwen3VLMoeForConditionalGeneration(config).to(torch.float32).eval()
        return write_hub_dir(directory, model, tokenizer, {
            "preprocessor_config.json": PREPROCESSOR_CONFIG,
            "video_preprocessor_config.json": VIDEO_PREPROCESSOR_CONFIG,
        })
