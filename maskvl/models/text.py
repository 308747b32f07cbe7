"""Text-only transformers decoders (``*ForCausalLM``): what the text families share.

Llama, Qwen2, Qwen3, Mistral and Qwen3-MoE checkpoints load with ``AutoModelForCausalLM`` into one
layout: ``model.model`` holds ``embed_tokens``, ``layers`` and ``norm``, ``model.lm_head`` the LM head,
and each layer is the decoder block :class:`maskvl.models.decoder.TransformersDecoderAdapter` replays.
:class:`TextDecoderAdapter` adds what a text-only model needs: chat-templated prompts without images, the
family's sliding-window layers, and a tiny random model for the tests. A family module subclasses it and
says what differs (its model types, tokenizer style, where its windows come from, its tiny config).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import InputError
from .base import Prepared
from .decoder import TransformersDecoderAdapter
from .loading import load_pretrained, load_tokenizer
from .tiny import build_tokenizer, write_hub_dir


class TextDecoderAdapter(TransformersDecoderAdapter):
    """Adapter over a loaded transformers ``*ForCausalLM`` text decoder and its tokenizer."""

    supports_images = False

    #: Where the family's sliding windows come from: None (no sliding-window layers), ``"all"``
    #: (``config.sliding_window`` on every layer, when set) or ``"layer_types"`` (``config.sliding_window``
    #: on the layers whose ``config.layer_types`` entry is ``"sliding_attention"``). It must say what the
    #: family's modeling code does with its config: that code, not the config alone, builds the masks.
    WINDOWS: ClassVar[str | None] = None
    #: The chat format of the tiny model's tokenizer (``maskvl.models.tiny.build_tokenizer``).
    TOKENIZER_STYLE: ClassVar[str] = "qwen"
    #: Config values of the tiny model beyond the shared ones (see :meth:`tiny_config`).
    TINY_CONFIG: ClassVar[dict[str, Any]] = {}
    STOP_TOKENS = TransformersDecoderAdapter.STOP_TOKENS + ("<|eot_id|>",)
    #: transformers' attention implementation for the clean pass (the measured numbers do not depend on
    #: it: maskvl recomputes the final query's attention itself); "eager" where a family has no sdpa.
    ATTN_IMPLEMENTATION: ClassVar[str] = "sdpa"
    #: Whether the family has transformers' MoE experts (float64 runs switch them to the eager loop).
    MOE: ClassVar[bool] = False

    def __init__(self, model: Any, tokenizer: Any, model_id: str):
        for part in ("model", "lm_head"):
            if not hasattr(model, part):
                raise InputError(f"expected a transformers *ForCausalLM model (with .model and .lm_head), "
                                 f"got {type(model).__name__}")
        if self.MOE and next(model.parameters()).dtype == torch.float64:
            # transformers' default experts kernel (grouped_mm) rejects float64; the eager loop over the
            # experts is the same computation.
            model.set_experts_implementation("eager")
        self._setup(model, tokenizer, model_id, model.model, model.lm_head, model.config)
        self._windows = [self._config_window(i) for i in range(self.num_layers)]

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str, model_id: str, dtype: torch.dtype, device: torch.device,
             verbose: bool = False) -> "TextDecoderAdapter":
        """Load the model and its tokenizer from a local hub-like directory or a hub id."""
        # The modeling code is imported only when the family is used.
        from transformers import AutoModelForCausalLM

        model = load_pretrained(AutoModelForCausalLM, path, model_id, dtype, device,
                                attn_implementation=cls.ATTN_IMPLEMENTATION)
        # A base model has no chat template: its prompt is tokenized as plain text.
        return cls(model, load_tokenizer(path, model_id, require_chat_template=False, verbose=verbose), model_id)

    @classmethod
    def from_loaded(cls, model: Any, tokenizer: Any, image_processor: Any = None,
                    model_id: str | None = None) -> "TextDecoderAdapter":
        if tokenizer is None:
            raise InputError(f"pass tokenizer= with an already-loaded {type(model).__name__}")
        if image_processor is not None:
            raise InputError(f"{type(model).__name__} is a text-only model: it takes no image_processor")
        return cls(model, tokenizer, model_id or getattr(model, "name_or_path", None) or "model")

    # ------------------------------------------------------------------------------ tiny model
    @classmethod
    def tiny_config(cls, tokenizer: Any, num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 2,
                    head_dim: int = 16, hidden_size: int = 64, **overrides: Any) -> dict[str, Any]:
        """The tiny model's config values: the shared shape, then :attr:`TINY_CONFIG`, then ``overrides``."""
        cfg: dict[str, Any] = {
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            # Wider than the usual 0.02 so that a tiny model's attention is far from uniform.
            "initializer_range": 0.1,
            "rms_norm_eps": 1e-6,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": False,
        }
        cfg.update(cls.TINY_CONFIG)
        cfg.update(overrides)
        return cfg

    @classmethod
    def write_tiny_model(cls, directory: str | os.PathLike, seed: int = 0, **shape: Any) -> Path:
        """A tiny random model of the family (``AutoModelForCausalLM.from_config``) as a hub-like directory.

        ``shape`` takes the shared shape keys and any config value of the family (e.g. ``sliding_window``).
        """
        from transformers import AutoConfig, AutoModelForCausalLM

        if shape.get("num_heads", 4) % shape.get("num_kv_heads", 2):
            raise InputError("num_heads must be a multiple of num_kv_heads")
        tokenizer = build_tokenizer(style=cls.TOKENIZER_STYLE)
        try:
            config = AutoConfig.for_model(cls.MODEL_TYPES[0], **cls.tiny_config(tokenizer, **shape))
        except Exception as exc:  # the config class validates the shape (huggingface_hub strict dataclasses)
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            reason = lines[-1].split(": ", 1)[-1] if lines else str(exc)  # without "ValueError: "
            raise InputError(f"invalid {cls.MODEL_TYPES[0]} shape: {reason}") from exc
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
        cls._tiny_weights(model)
        return write_hub_dir(directory, model, tokenizer)

    @classmethod
    def _tiny_weights(cls, model: Any) -> None:
        """Adjust the tiny random model's weights where the initialiser leaves a feature near inactive."""

    # ---------------------------------------------------------------------------------- inputs
    def prepare(self, prompt: str, images: list[Any], image_paths: list[str | None],
                max_pixels: int | None = None) -> Prepared:
        """The prompt as the user turn of the chat template, with the generation prompt: ``input_ids [1, S]``.

        A tokenizer without a chat template (a base model) gets the plain prompt, with the special tokens
        its tokenizer adds (e.g. BOS).
        """
        if images:
            raise InputError(f"{self.model_id} is a text-only model: it takes no images")
        if getattr(self.tokenizer, "chat_template", None):
            try:
                text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                          add_generation_prompt=True, tokenize=False)
            except Exception as exc:
                raise InputError(f"the tokenizer's chat template failed: {exc}") from exc
            # The template writes the special tokens (BOS included) itself.
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        else:
            text = prompt
            ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        input_ids = ids.to(self.device)
        return Prepared(input_ids=input_ids, model_inputs={},
                        is_image=torch.zeros(input_ids.shape[1], dtype=torch.bool), images=[], prompt_text=text)

    def stop_token_ids(self) -> set[int]:
        stops = super().stop_token_ids()
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if isinstance(eos, int):
            stops.add(eos)
        return stops

    # ------------------------------------------------------------------------ sliding windows
    def _config_window(self, layer: int) -> int | None:
        window = getattr(self.text_config, "sliding_window", None)
        if self.WINDOWS is None or window is None:
            return None
        if self.WINDOWS == "all":
            return int(window)
        if self.WINDOWS == "layer_types":
            types = getattr(self.text_config, "layer_types", None) or []
            return int(window) if layer < len(types) and types[layer] == "sliding_attention" else None
        raise ValueError(f"{type(self).__name__}.WINDOWS must be None, 'all' or 'layer_types'")

    def attention_window(self, layer: int) -> int | None:
        return self._windows[layer]
