"""Qwen2-VL and Qwen2.5-VL through transformers' ``Qwen2VLForConditionalGeneration`` and
``Qwen2_5_VLForConditionalGeneration``.

Both generations share everything maskvl touches, so one file registers both model types:

* inputs: the chat template puts each image as ``<|vision_start|><|image_pad|><|vision_end|>``, the image
  processor (patch 14, merge 2, ``min_pixels``/``max_pixels``) gives the grid, and the pads are expanded to
  one per merged token, as for Qwen3-VL (:class:`~maskvl.models.qwen3_vl.Qwen3VLAdapter`, whose input
  pipeline these adapters inherit);
* positions: 3D MRoPE from the model's own ``get_rope_index`` (text after an image resumes at its start
  plus max(h, w) / merge; Qwen2.5-VL spaces video frames in time, which images do not use). It runs
  inside the model's forward when ``mm_token_type_ids`` is passed, which ``prepare`` always does
  (Qwen2.5-VL would otherwise silently fall back to 1-D positions);
* the text decoder: Qwen2 layers, q/k/v projections with biases, no q/k norms, head_dim = hidden /
  heads, a dense MLP; no DeepStack. The shared decoder adapter handles all of it (the query is captured
  after ``q_proj``, bias included).

They differ only in the vision tower, which runs inside the model's own forward: Qwen2.5-VL's has
window attention (windows of ``window_size`` pixels, full attention in ``fullatt_block_indexes``),
RMSNorm and a gated MLP.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import InputError, ModelLoadError
from .qwen3_vl import Qwen3VLAdapter
from .registry import register
from .tiny import SPECIAL_TOKENS, build_tokenizer, write_hub_dir

# The hub's Qwen2-VL / Qwen2.5-VL chat template (a default system turn; images and videos where they
# occur in the content, optionally labelled "Picture N: " with add_vision_id).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def preprocessor_config(processor_class: str) -> dict[str, Any]:
    """The hub's ``preprocessor_config.json`` of Qwen2-VL / Qwen2.5-VL (CLIP mean and std, patch 14)."""
    return {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": processor_class,
    }


def _text_config(model_type: str, vocab_size: int, special_ids: dict[str, int], shape: dict[str, Any]
                 ) -> dict[str, Any]:
    """The text decoder of a tiny Qwen2-VL / Qwen2.5-VL; ``mrope_section`` in the hub's 1:1.5:1.5 proportion."""
    heads = shape.get("num_heads", 4)
    hidden = shape.get("hidden_size")
    head_dim = shape.get("head_dim")
    if hidden is None:
        hidden = heads * (head_dim or 16)
    if hidden % heads or (head_dim is not None and head_dim * heads != hidden):
        raise InputError(f"Qwen2-VL and Qwen2.5-VL have head_dim = hidden_size / num_heads: hidden_size {hidden}, "
                         f"num_heads {heads}" + (f", head_dim {head_dim}" if head_dim is not None else ""))
    half = hidden // heads // 2
    if half < 3:
        raise InputError("head_dim must be at least 6 (three MRoPE sections)")
    hw = max(1, half * 3 // 8)
    return {
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": shape.get("intermediate_size", 2 * hidden),
        "num_hidden_layers": shape.get("num_layers", 3),
        "num_attention_heads": heads,
        "num_key_value_heads": shape.get("num_kv_heads", 2),
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "initializer_range": shape.get("initializer_range", 0.1),
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [half - 2 * hw, hw, hw]},
        "use_sliding_window": False,
        "bos_token_id": special_ids["<|endoftext|>"],
        "eos_token_id": special_ids["<|im_end|>"],
    }


@register
class Qwen2VLAdapter(Qwen3VLAdapter):
    """Adapter over a loaded ``Qwen2VLForConditionalGeneration`` and its tokenizer / image processor."""

    MODEL_TYPES = ("qwen2_vl",)
    MODEL_CLASS: ClassVar[str] = "Qwen2VLForConditionalGeneration"
    FAMILY: ClassVar[str] = "Qwen2-VL"
    PROCESSOR_CLASS: ClassVar[str] = "Qwen2VLProcessor"
    #: The ``shape`` keys :meth:`write_tiny_model` takes.
    SHAPE_KEYS: ClassVar[frozenset[str]] = frozenset({
        "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "intermediate_size", "vision_depth",
        "initializer_range", "tie_word_embeddings"})

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, model_id: str):
        sliding = [i for i, t in enumerate(getattr(model.config.text_config, "layer_types", None) or [])
                   if t != "full_attention"]
        if sliding:
            # use_sliding_window is off in every published Qwen2-VL / Qwen2.5-VL checkpoint.
            raise ModelLoadError(f"{model_id}: sliding-window layers ({', '.join(map(str, sliding))}; "
                                 f"use_sliding_window) are not supported for {self.FAMILY}")
        super().__init__(model, tokenizer, image_processor, model_id)

    @classmethod
    def _vision_config(cls, hidden_size: int, shape: dict[str, Any]) -> dict[str, Any]:
        """Qwen2-VL's vision tower, tiny: full attention within each image, LayerNorm, a GELU MLP."""
        return {
            "model_type": "qwen2_vl_vision",
            "depth": shape.get("vision_depth", 2),
            "embed_dim": 32,
            "hidden_size": hidden_size,  # the merger's output: the text model's width
            "hidden_act": "quick_gelu",
            "mlp_ratio": 2,
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "initializer_range": shape.get("initializer_range", 0.1),
        }

    @classmethod
    def write_tiny_model(cls, directory: str | os.PathLike, seed: int = 0, **shape: Any) -> Path:
        """A tiny random model of this family as a hub-like directory: config, weights, a byte-level BPE
        tokenizer with the family's chat template, and the hub's ``preprocessor_config.json``.

        ``shape`` (:attr:`SHAPE_KEYS`): num_layers, num_heads, num_kv_heads, head_dim or hidden_size (head_dim =
        hidden_size / num_heads), intermediate_size, vision_depth, initializer_range, tie_word_embeddings;
        Qwen2.5-VL also window_size (pixels).
        """
        import transformers

        unknown = sorted(set(shape) - cls.SHAPE_KEYS)
        if unknown:
            raise TypeError(f"{cls.__name__}.write_tiny_model() got unexpected shape keys {unknown}")
        tokenizer = build_tokenizer()
        tokenizer.chat_template = CHAT_TEMPLATE
        special = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        text = _text_config(f"{cls.MODEL_TYPES[0]}_text", len(tokenizer), special, shape)
        tie = bool(shape.get("tie_word_embeddings", False))
        text["tie_word_embeddings"] = tie
        config_class = getattr(transformers, cls.MODEL_CLASS.replace("ForConditionalGeneration", "Config"))
        config = config_class(
            text_config=text, vision_config=cls._vision_config(text["hidden_size"], shape),
            image_token_id=special["<|image_pad|>"], video_token_id=special["<|video_pad|>"],
            vision_start_token_id=special["<|vision_start|>"], vision_end_token_id=special["<|vision_end|>"],
            tie_word_embeddings=tie, eos_token_id=special["<|im_end|>"],
        )
        torch.manual_seed(seed)
        model = getattr(transformers, cls.MODEL_CLASS)(config).to(torch.float32).eval()
        return write_hub_dir(directory, model, tokenizer,
                             {"preprocessor_config.json": preprocessor_config(cls.PROCESSOR_CLASS)})


@register
class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Adapter over a loaded ``Qwen2_5_VLForConditionalGeneration``: Qwen2-VL's text side, a windowed vision tower."""

    MODEL_TYPES = ("qwen2_5_vl",)
    MODEL_CLASS: ClassVar[str] = "Qwen2_5_VLForConditionalGeneration"
    FAMILY: ClassVar[str] = "Qwen2.5-VL"
    PROCESSOR_CLASS: ClassVar[str] = "Qwen2_5_VLProcessor"
    SHAPE_KEYS: ClassVar[frozenset[str]] = Qwen2VLAdapter.SHAPE_KEYS | {"window_size"}

    @classmethod
    def _vision_config(cls, hidden_size: int, shape: dict[str, Any]) -> dict[str, Any]:
        """Qwen2.5-VL's vision tower, tiny: RMSNorm, a gated SiLU MLP, window attention.

        Windows are 56 px (2 x 2 merged tokens) instead of the hub's 112 px so that the small test images
        span several windows; the last block attends over the whole image, as the hub's every eighth does.
        """
        depth = shape.get("vision_depth", 3)
        return {
            "model_type": "qwen2_5_vl_vision",
            "depth": depth,
            "hidden_size": 32,
            "intermediate_size": 64,
            "hidden_act": "silu",
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": shape.get("window_size", 56),
            "fullatt_block_indexes": [depth - 1],
            "out_hidden_size": hidden_size,
            "initializer_range": shape.get("initializer_range", 0.1),
        }
