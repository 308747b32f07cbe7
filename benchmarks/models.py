"""Random-weight Qwen3-VL models of named shapes, built in memory, and inputs with an exact image-token count.

Shapes go from ``tiny`` (the test model's size) to the published Qwen3-VL-2B/4B/8B text and vision
configurations (random weights: the benchmark measures time and memory, not answers). Shapes with
``num_experts`` are Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration``): every decoder layer's MLP is a
sparse mixture of experts, as in the published 30B-A3B and 235B-A22B checkpoints. Every model gets
the small byte-level tokenizer of ``maskvl.models.tiny`` (prompt ids stay small; the vocabulary of the
real shapes is the real 151936, so embedding and lm_head have their real size) and the hub's
image-processor settings through ``Qwen2VLImageProcessorPil``.

Text-only shapes (``text_only=True``, names ``text-*``) are a Qwen3 text decoder (``Qwen3ForCausalLM``)
of the same decoder shape with no vision tower; their inputs are prompts of an exact token count
(:func:`prepare_text`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from maskvl.models.qwen3 import Qwen3Adapter
from maskvl.models.qwen3_vl import Qwen3VLAdapter
from maskvl.models.qwen3_vl_moe import Qwen3VLMoeAdapter
from maskvl.models.tiny import PREPROCESSOR_CONFIG, SPECIAL_TOKENS, build_tokenizer


@dataclass(frozen=True)
class Shape:
    """A Qwen3-VL shape: text decoder and vision tower. ``vocab_size=None`` uses the tokenizer's size.

    ``num_experts > 0`` makes it Qwen3-VL-MoE: ``experts_per_tok`` experts of width ``moe_intermediate_size``
    per token in every layer (``intermediate_size`` is then unused).
    """

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int | None = None
    tie_word_embeddings: bool = False
    vision_depth: int = 3
    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_heads: int = 2
    deepstack: tuple[int, ...] = (0, 1, 2)
    mrope_section: tuple[int, int, int] | None = None  # None: sized to head_dim / 2
    num_experts: int = 0
    experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    text_only: bool = False  # a Qwen3 text decoder (Qwen3ForCausalLM): the vision fields are unused

    def describe(self) -> dict[str, Any]:
        return asdict(self)


_VISION_2B_4B = dict(vision_depth=24, vision_hidden=1024, vision_intermediate=4096, vision_heads=16,
                     deepstack=(5, 11, 17))

SHAPES: dict[str, Shape] = {
    "tiny": Shape("tiny", 64, 4, 4, 2, 16, 128),
    # The CI preset's model: mid-size, GQA, DeepStack, small vision tower.
    "mid": Shape("mid", 512, 8, 8, 4, 64, 1536, vision_hidden=64, vision_intermediate=128),
    # The test MoE model's size (8 experts, top-2).
    "tiny-moe": Shape("tiny-moe", 64, 3, 4, 2, 16, 128, num_experts=8, experts_per_tok=2, moe_intermediate_size=32),
    # The CI preset's MoE model: Qwen3-VL-30B-A3B's proportions scaled down (GQA 8:1, query width twice
    # the hidden size, top-8 of many narrow experts), 4 layers.
    "moe": Shape("moe", 256, 4, 16, 2, 32, 1024, vision_hidden=64, vision_intermediate=128, num_experts=64,
                 experts_per_tok=8, moe_intermediate_size=96),
    "2b": Shape("2b", 2048, 28, 16, 8, 128, 6144, vocab_size=151936, tie_word_embeddings=True,
                mrope_section=(24, 20, 20), **_VISION_2B_4B),
    "4b": Shape("4b", 2560, 36, 32, 8, 128, 9728, vocab_size=151936, tie_word_embeddings=True,
                mrope_section=(24, 20, 20), **_VISION_2B_4B),
    "8b": Shape("8b", 4096, 36, 32, 8, 128, 12288, vocab_size=151936, tie_word_embeddings=False,
                mrope_section=(24, 20, 20), vision_depth=27, vision_hidden=1152, vision_intermediate=4304,
                vision_heads=16, deepstack=(8, 16, 24)),
    # Text-only: the tiny and mid decoders as Qwen3ForCausalLM.
    "text-tiny": Shape("text-tiny", 64, 4, 4, 2, 16, 128, text_only=True),
    "text-mid": Shape("text-mid", 512, 8, 8, 4, 64, 1536, text_only=True),
}


def get_shape(name: str, num_layers: int | None = None) -> Shape:
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r} (choose from {', '.join(SHAPES)})")
    shape = SHAPES[name]
    return replace(shape, num_layers=num_layers) if num_layers else shape


def qwen3_vl_config(shape: Shape, tokenizer) -> Any:
    """The transformers config of ``shape``: ``Qwen3VLConfig``, or ``Qwen3VLMoeConfig`` for MoE shapes."""
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    special = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    half = shape.head_dim // 2
    if shape.mrope_section is None:
        hw = half // 4
        mrope = [half - 2 * hw, hw, hw]
    else:
        mrope = list(shape.mrope_section)
    vocab = shape.vocab_size or len(tokenizer)
    text = {
        "model_type": "qwen3_vl_text", "vocab_size": vocab, "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size, "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads, "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim, "hidden_act": "silu", "max_position_embeddings": 262144,
        "initializer_range": 0.02, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": mrope,
                            "mrope_interleaved": True},
        "attention_bias": False, "bos_token_id": None, "eos_token_id": special["<|im_end|>"],
        "tie_word_embeddings": shape.tie_word_embeddings,
    }
    vision = {
        "model_type": "qwen3_vl_vision", "depth": shape.vision_depth, "hidden_size": shape.vision_hidden,
        "hidden_act": "gelu_pytorch_tanh", "intermediate_size": shape.vision_intermediate,
        "num_heads": shape.vision_heads, "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "out_hidden_size": shape.hidden_size, "num_position_embeddings": 2304,
        "deepstack_visual_indexes": list(shape.deepstack), "initializer_range": 0.02,
    }
    config_class = Qwen3VLConfig
    if shape.num_experts:
        config_class = Qwen3VLMoeConfig
        text.update(model_type="qwen3_vl_moe_text", num_experts=shape.num_experts,
                    num_experts_per_tok=shape.experts_per_tok, moe_intermediate_size=shape.moe_intermediate_size,
                    decoder_sparse_step=1, mlp_only_layers=[])
        vision["model_type"] = "qwen3_vl_moe_vision"
    return config_class(
        text_config=text, vision_config=vision, image_token_id=special["<|image_pad|>"],
        video_token_id=special["<|video_pad|>"], vision_start_token_id=special["<|vision_start|>"],
        vision_end_token_id=special["<|vision_end|>"], tie_word_embeddings=shape.tie_word_embeddings,
        eos_token_id=special["<|im_end|>"],
    )


def qwen3_text_config(shape: Shape, tokenizer) -> Any:
    """A ``Qwen3Config`` with ``shape``'s decoder (RoPE and norms as ``qwen3_vl_config``'s text part)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=shape.vocab_size or len(tokenizer), hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads, head_dim=shape.head_dim,
        hidden_act="silu", max_position_embeddings=262144, initializer_range=0.02, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0}, attention_bias=False,
        bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tie_word_embeddings=shape.tie_word_embeddings,
    )


def build_adapter(shape: Shape, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  seed: int = 0) -> Any:
    """A random ``Qwen3VLForConditionalGeneration`` (``Qwen3VLMoeForConditionalGeneration`` for MoE shapes)
    of ``shape`` (SDPA attention) wrapped in maskvl's adapter (a ``Qwen3ForCausalLM`` in maskvl's Qwen3
    adapter for a text-only shape).

    Weights are initialized directly in ``dtype`` on ``device`` (no float32 copy of a big model). MoE
    experts keep transformers' default implementation (the adapter switches float64 models to eager).
    """
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_tokenizer()
    if shape.text_only:
        return _build_text_adapter(shape, tokenizer, dtype, device, seed)
    config = qwen3_vl_config(shape, tokenizer)
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    try:
        if dtype.is_floating_point:
            torch.set_default_dtype(dtype)
        with torch.device(device):
            model_class = Qwen3VLMoeForConditionalGeneration if shape.num_experts else Qwen3VLForConditionalGeneration
            model = model_class(config)
    finally:
        torch.set_default_dtype(prev)
    # Parameters are already in ``dtype``; no ``.to(dtype)``: it would also cast the rotary ``inv_freq``
    # buffers, which transformers keeps in float32 (as ``from_pretrained(dtype=...)`` does).
    bad = {p.dtype for p in model.parameters()} - {dtype}
    if bad:
        raise RuntimeError(f"parameters built in {bad}, expected {dtype}")
    model = model.eval()
    settings = {k: v for k, v in PREPROCESSOR_CONFIG.items() if k not in ("image_processor_type", "processor_class")}
    processor = Qwen2VLImageProcessorPil(**settings)
    if shape.num_experts:
        return Qwen3VLMoeAdapter(model, tokenizer, processor, f"random-qwen3-vl-moe-{shape.name}")
    return Qwen3VLAdapter(model, tokenizer, processor, f"random-qwen3-vl-{shape.name}")


def _build_text_adapter(shape: Shape, tokenizer: Any, dtype: torch.dtype, device: str | torch.device,
                        seed: int) -> Qwen3Adapter:
    from transformers import Qwen3ForCausalLM

    config = qwen3_text_config(shape, tokenizer)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    try:
        if dtype.is_floating_point:
            torch.set_default_dtype(dtype)
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    # As for the vision model: no .to(dtype), which would cast the float32 rotary buffers.
    bad = {p.dtype for p in model.parameters()} - {dtype}
    if bad:
        raise RuntimeError(f"parameters built in {bad}, expected {dtype}")
    return Qwen3Adapter(model.eval(), tokenizer, f"random-qwen3-{shape.name}")


def grid_for(tokens: int) -> tuple[int, int]:
    """Merged-token grid ``(rows, cols)`` with ``rows * cols == tokens``, as square as possible."""
    if tokens < 1:
        raise ValueError("need at least one image token")
    rows = int(math.isqrt(tokens))
    while tokens % rows:
        rows -= 1
    return rows, tokens // rows


def make_image(tokens: int, seed: int = 0):
    """A random RGB image whose size maps to exactly ``tokens`` merged image tokens (32x32 px each)."""
    import numpy as np
    from PIL import Image

    rows, cols = grid_for(tokens)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(rows * 32, cols * 32, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


PROMPT = "What is in this image? Describe the picture."


def prepare(adapter: Qwen3VLAdapter, tokens: int, prompt: str = PROMPT, seed: int = 0):
    """Prepared inputs with exactly ``tokens`` image tokens.

    The image is already a multiple of 32 px; ``max_pixels`` = its pixel count keeps the processor
    from resizing it (``prepare`` lowers min_pixels to at most 56*56 when max_pixels is given, and
    the hub default of 65536 would otherwise upscale small images).
    """
    img = make_image(tokens, seed)
    prepared = adapter.prepare(prompt, [img], [None], max_pixels=img.size[0] * img.size[1])
    got = int(prepared.is_image.sum())
    if got != tokens:
        raise RuntimeError(f"asked for {tokens} image tokens, the processor gave {got}")
    return prepared


def prepare_text(adapter: Any, tokens: int, seed: int = 0):
    """Prepared text-only inputs: a chat-templated prompt of exactly ``tokens`` tokens.

    The prompt is "Describe" and then random words that the tokenizer keeps as one token each (the
    byte-level pre-tokenizer splits before every space, so each " word" is encoded on its own).
    """
    import numpy as np

    base = int(adapter.prepare("Describe", [], []).input_ids.shape[1])
    if tokens <= base:
        raise ValueError(f"need more than the {base} tokens of the chat template and 'Describe'")
    words = sorted({w for w in _WORDS if len(adapter.tokenize(" " + w)) == 1})
    rng = np.random.default_rng(seed)
    prompt = "Describe" + "".join(" " + words[i] for i in rng.integers(0, len(words), tokens - base))
    prepared = adapter.prepare(prompt, [], [])
    got = int(prepared.input_ids.shape[1])
    if got != tokens:
        raise RuntimeError(f"asked for a {tokens}-token prompt, the tokenizer gave {got}")
    return prepared


_WORDS = ("image picture color cat dog tree grass sky red blue green yellow white brown left right top bottom "
          "center corner small large bright dark one two three four five six seven the and is a of on").split()
