"""A tiny random Qwen3-VL, built offline, written as a hub-like checkpoint directory.

``builtin:tiny-qwen3-vl`` is this model with its default settings: random weights from a fixed seed,
several layers, GQA, DeepStack on, the hub's image-processor settings, and a small byte-level BPE
tokenizer that carries the Qwen special tokens and a Qwen-style chat template. It is written to disk
and loaded back through the same directory-loading path as a real checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

BUILTIN_PREFIX = "builtin:"
BUILTIN_TINY = "builtin:tiny-qwen3-vl"

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen3-VL's template, reduced to what a single-turn image+text prompt needs: images where they occur
# in the content, each as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The hub's Qwen3-VL preprocessor_config.json settings.
PREPROCESSOR_CONFIG: dict[str, Any] = {
    "image_processor_type": "Qwen2VLImageProcessorFast",
    "processor_class": "Qwen3VLProcessor",
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "rescale_factor": 1 / 255,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "size": {"shortest_edge": 65536, "longest_edge": 16777216},
}

VIDEO_PREPROCESSOR_CONFIG: dict[str, Any] = {
    "video_processor_type": "Qwen3VLVideoProcessor",
    "processor_class": "Qwen3VLProcessor",
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "size": {"shortest_edge": 4096, "longest_edge": 25165824},
}

_CORPUS = """\
What is in this image? Describe the picture. How many animals are there? What color is the cat?
The image shows a red square on a blue background, a green circle, and a yellow triangle.
There are two dogs and one cat sitting on the grass near a tree. The sky is bright and clear.
Answer briefly. Be brief. Yes. No. It is a photo of a person with brown hair and a white shirt.
Count the objects, name the colors, read the text, and explain what is happening in the scene.
left right top bottom center corner small large bright dark one two three four five six seven
user assistant user assistant this this image image picture picture
"""


def tiny_config_dict(
    *,
    vocab_size: int,
    special_ids: dict[str, int],
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 128,
    vision_depth: int = 3,
    deepstack: tuple[int, ...] = (0, 1, 2),
    initializer_range: float = 0.1,
    tie_word_embeddings: bool = False,
) -> dict[str, Any]:
    """A Qwen3VLConfig dict for a tiny model. ``mrope_section`` is sized to ``head_dim / 2``."""
    half = head_dim // 2
    hw = half // 4
    mrope = [half - 2 * hw, hw, hw]
    return {
        "model_type": "qwen3_vl",
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "image_token_id": special_ids["<|image_pad|>"],
        "video_token_id": special_ids["<|video_pad|>"],
        "vision_start_token_id": special_ids["<|vision_start|>"],
        "vision_end_token_id": special_ids["<|vision_end|>"],
        "tie_word_embeddings": tie_word_embeddings,
        "text_config": {
            "model_type": "qwen3_vl_text",
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "initializer_range": initializer_range,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": mrope,
                "mrope_interleaved": True,
            },
            "attention_bias": False,
            "bos_token_id": None,
            "eos_token_id": special_ids["<|im_end|>"],
            "tie_word_embeddings": tie_word_embeddings,
        },
        "vision_config": {
            "model_type": "qwen3_vl_vision",
            "depth": vision_depth,
            "hidden_size": 32,
            "hidden_act": "gelu_pytorch_tanh",
            "intermediate_size": 64,
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": hidden_size,
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": list(deepstack),
            "initializer_range": initializer_range,
        },
        "eos_token_id": special_ids["<|im_end|>"],
    }


# Llama 3's chat format (header tokens, <|eot_id|> ending each turn), without the default system turn.
LLAMA3_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>"]
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Mistral's instruct format: <s>[INST] user [/INST] answer</s>.
MISTRAL_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Gemma's turns: <start_of_turn>user ... <end_of_turn>, the answer after <start_of_turn>model.
GEMMA_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n'"
    " + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# OLMo 2 Instruct's turns: <|user|>, <|assistant|>, each answer ending with <|endoftext|> (also BOS).
OLMO2_SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
OLMO2_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# GPT-OSS's harmony format: <|start|>role<|message|>text<|end|>; the answer ends with <|return|>.
HARMONY_SPECIAL_TOKENS = ["<|endoftext|>", "<|start|>", "<|message|>", "<|end|>", "<|return|>", "<|channel|>",
                          "<|call|>"]
HARMONY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|start|>' + message['role'] + '<|message|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start|>assistant' }}{% endif %}"
)

# style -> (special tokens, bos, eos, pad, chat template)
TOKENIZER_STYLES: dict[str, tuple[list[str], str | None, str, str | None, str]] = {
    "qwen": (SPECIAL_TOKENS, None, "<|im_end|>", "<|endoftext|>", CHAT_TEMPLATE),
    "llama3": (LLAMA3_SPECIAL_TOKENS, "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", LLAMA3_CHAT_TEMPLATE),
    "mistral": (MISTRAL_SPECIAL_TOKENS, "<s>", "</s>", None, MISTRAL_CHAT_TEMPLATE),
    "gemma": (GEMMA_SPECIAL_TOKENS, "<bos>", "<eos>", "<pad>", GEMMA_CHAT_TEMPLATE),
    "olmo2": (OLMO2_SPECIAL_TOKENS, "<|endoftext|>", "<|endoftext|>", "<|pad|>", OLMO2_CHAT_TEMPLATE),
    "harmony": (HARMONY_SPECIAL_TOKENS, None, "<|return|>", "<|endoftext|>", HARMONY_CHAT_TEMPLATE),
}


def build_tokenizer(vocab_size: int = 384, style: str = "qwen"):
    """A byte-level BPE tokenizer trained on a fixed corpus, with one chat format's special tokens and template.

    ``style``: ``qwen`` (ChatML: ``<|im_start|>``/``<|im_end|>`` and the vision tokens; the default),
    ``llama3`` (header tokens, ``<|eot_id|>``), ``mistral`` (``[INST]``, ``<s>``/``</s>``), ``gemma``
    (``<start_of_turn>``/``<end_of_turn>``), ``olmo2`` (``<|user|>``/``<|assistant|>``) or ``harmony``
    (GPT-OSS: ``<|start|>``/``<|message|>``/``<|end|>``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if style not in TOKENIZER_STYLES:
        raise ValueError(f"unknown tokenizer style {style!r} (available: {', '.join(TOKENIZER_STYLES)})")
    special, bos, eos, pad, template = TOKENIZER_STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    named = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **{k: v for k, v in named.items() if v is not None},
        additional_special_tokens=[t for t in special if t not in (bos, pad)],
    )
    fast.chat_template = template
    return fast


def write_tiny_model(directory: str | os.PathLike, seed: int = 0, **config_overrides: Any) -> Path:
    """Build a tiny random Qwen3-VL and write it as a hub-like directory; returns the directory.

    The directory holds ``config.json``, ``model.safetensors``, the tokenizer files with the chat
    template, ``preprocessor_config.json`` (naming ``Qwen2VLImageProcessorFast``, as on the hub) and
    ``video_preprocessor_config.json``. The write is atomic: a temporary sibling directory is renamed.
    """
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tokenizer = build_tokenizer()
    special_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    cfg = tiny_config_dict(vocab_size=len(tokenizer), special_ids=special_ids, **config_overrides)
    config = Qwen3VLConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).to(torch.float32).eval()
    return write_hub_dir(directory, model, tokenizer, {
        "preprocessor_config.json": PREPROCESSOR_CONFIG,
        "video_preprocessor_config.json": VIDEO_PREPROCESSOR_CONFIG,
    })


def write_hub_dir(directory: str | os.PathLike, model: Any, tokenizer: Any,
                  json_files: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write ``model`` (``save_pretrained``), ``tokenizer`` and extra JSON files as a hub-like directory.

    The write is atomic: everything goes into a temporary sibling directory that is then renamed onto
    ``directory`` (replacing an earlier one). Every family's tiny-model writer ends here.
    """
    out = Path(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, content in (json_files or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def builtin_dir(name: str) -> Path:
    """Where a built-in model lives on disk (built on first use, then reused)."""
    if name != BUILTIN_TINY:
        raise ValueError(f"unknown built-in model {name!r} (available: {BUILTIN_TINY})")
    from .. import __version__

    root = Path(os.environ.get("MASKVL_CACHE", Path.home() / ".cache" / "maskvl"))
    path = root / f"tiny-qwen3-vl-{__version__}"
    if not (path / "config.json").exists():
        write_tiny_model(path)
    return path
