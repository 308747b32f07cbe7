"""Gemma 3 with images (``gemma3``: Gemma 3 4B/12B/27B) through transformers' ``Gemma3ForConditionalGeneration``.

The language model is Gemma 3's (:mod:`maskvl.models.gemma3_text`, whose layer arithmetic
:class:`~maskvl.models.gemma3_text.GemmaLayers` this adapter shares: norms after attention and the MLP,
``query_pre_attn_scalar``, q/k norms, local sliding-window layers with their own rotary base). What the
multimodal model adds:

* inputs: the chat template puts ``<start_of_image>`` where an image goes; the processor
  (``Gemma3Processor``) replaces it with ``\\n\\n<start_of_image>`` + ``<image_soft_token>`` x
  ``mm_tokens_per_image`` + ``<end_of_image>\\n\\n``. The image processor
  (``Gemma3ImageProcessorPil``) squashes every image to ``image_size`` square; the SigLIP tower's patches
  are average-pooled to a ``sqrt(mm_tokens_per_image)`` square grid (16 x 16 on the hub), row-major. Only
  the soft tokens are image-kind; ``<start_of_image>``, ``<end_of_image>`` and the newlines are text.
* pan-and-scan (``do_pan_and_scan`` in the image processor's config): the image processor also cuts a wide
  or tall image into 2..``pan_and_scan_max_num_crops`` crops along its long side, each squashed to the same
  square; the processor writes "Here is the original image <full image> and here are some crops to help
  you see better <crop> <crop> ...". The full image's grid is kind ``base``, each crop's kind ``tile`` with
  its box in original pixels, read off the image processor's own crop code. Crop settings the config leaves
  null take ``Gemma3Processor``'s defaults (min crop 256 px, at most 4 crops, aspect ratio 1.2). NOTE:
  transformers' ``Gemma3Processor`` call itself pans and scans only when ``do_pan_and_scan=True`` is passed
  to it (its defaults override the image processor's config); maskvl follows the config.
* attention: image tokens attend to every token of their own image block bidirectionally
  (``token_type_ids``); the model builds that mask in its own forward (the clean pass, and the naive
  oracle's forward, whose mask transformers builds). The final position is text, so its query is causal
  (and windowed at local layers) as in the text model.
* the logits: ``Gemma3ForConditionalGeneration`` applies no ``final_logit_softcapping`` (only
  ``Gemma3ForCausalLM`` does), so neither does this adapter.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import InputError, ModelLoadError
from .base import GridInfo, ImageInfo, Prepared
from .decoder import VisionDecoderAdapter
from .gemma3_text import Gemma3TextAdapter, GemmaLayers
from .loading import load_image_processor, load_pretrained, load_tokenizer
from .registry import register
from .tiny import build_tokenizer, write_hub_dir

log = logging.getLogger("maskvl")

BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"

# The hub's Gemma 3 (instruction-tuned) chat template: a system turn is folded into the first user turn,
# each image part is <start_of_image>, text parts are trimmed.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception(\"Invalid content type\") }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}"
)

#: ``Gemma3Processor.images_kwargs`` (what its call passes to the image processor unless told otherwise).
PROCESSOR_IMAGE_DEFAULTS: dict[str, Any] = {
    "do_convert_rgb": True,
    "do_pan_and_scan": False,
    "pan_and_scan_min_crop_size": 256,
    "pan_and_scan_max_num_crops": 4,
    "pan_and_scan_min_ratio_to_activate": 1.2,
}
PAN_AND_SCAN_KEYS = ("pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops", "pan_and_scan_min_ratio_to_activate")


def preprocessor_config(image_size: int, mm_tokens_per_image: int) -> dict[str, Any]:
    """The hub's Gemma 3 ``preprocessor_config.json`` (SigLIP mean/std 0.5, bilinear squash to a square;
    pan-and-scan settings null), at ``image_size``."""
    return {
        "image_processor_type": "Gemma3ImageProcessor",
        "processor_class": "Gemma3Processor",
        "do_convert_rgb": None,
        "do_normalize": True,
        "do_pan_and_scan": None,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_seq_length": mm_tokens_per_image,
        "pan_and_scan_max_num_crops": None,
        "pan_and_scan_min_crop_size": None,
        "pan_and_scan_min_ratio_to_activate": None,
        "resample": 2,
        "rescale_factor": 1 / 255,
        "size": {"height": image_size, "width": image_size},
    }


def crop_boxes(image_processor: Any, size: tuple[int, int], settings: dict[str, Any]) -> list[tuple[float, ...]]:
    """The pan-and-scan crops of an image of ``size`` (w, h) as original-pixel boxes ``(x0, y0, x1, y1)``,
    in the processor's order: its own ``pan_and_scan`` run on coordinate planes (zero-copy views), so the
    geometry is exactly the one that cut the pixels."""
    w, h = size
    xs = np.broadcast_to(np.arange(w, dtype=np.int64)[None, None, :], (1, h, w))
    ys = np.broadcast_to(np.arange(h, dtype=np.int64)[None, :, None], (1, h, w))
    kw = {k: settings[k] for k in PAN_AND_SCAN_KEYS}
    cx = image_processor.pan_and_scan(image=xs, **kw)
    cy = image_processor.pan_and_scan(image=ys, **kw)
    return [(float(x[0, 0, 0]), float(y[0, 0, 0]), float(x[0, 0, -1] + 1), float(y[0, -1, 0] + 1))
            for x, y in zip(cx, cy)]


@register
class Gemma3Adapter(GemmaLayers, VisionDecoderAdapter):
    """Adapter over a loaded ``Gemma3ForConditionalGeneration``, its tokenizer and image processor."""

    MODEL_TYPES = ("gemma3",)
    FAMILY: ClassVar[str] = "Gemma 3"
    #: The ``shape`` keys of :meth:`write_tiny_model` beyond the text config's (which go to
    #: :meth:`Gemma3TextAdapter.tiny_config`).
    VISION_KEYS: ClassVar[frozenset[str]] = frozenset({
        "mm_tokens_per_image", "image_size", "patch_size", "vision_depth", "vision_hidden_size"})

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, model_id: str):
        if not hasattr(model, "lm_head") or not hasattr(getattr(model, "model", None), "language_model"):
            raise InputError(f"expected a transformers Gemma3ForConditionalGeneration, got {type(model).__name__}")
        cfg = model.config
        self._check_gemma(cfg.text_config)
        self._setup(model, tokenizer, model_id, model.model.language_model, model.lm_head, cfg.text_config)
        self.image_processor = image_processor
        self.image_token_id = int(cfg.image_token_id)
        self.tokens_per_image = int(cfg.mm_tokens_per_image)
        self.side = math.isqrt(self.tokens_per_image)
        if self.side * self.side != self.tokens_per_image:
            raise ModelLoadError(f"{model_id}: mm_tokens_per_image {self.tokens_per_image} is not a square grid")
        # The expansion uses the token strings of the config's ids (the model checks ids, not strings).
        boi, eoi, soft = tokenizer.convert_ids_to_tokens([int(cfg.boi_token_id), int(cfg.eoi_token_id),
                                                          self.image_token_id])
        if not (boi and eoi and soft):
            raise ModelLoadError(f"{model_id}: the tokenizer lacks the image tokens of the config "
                                 f"({cfg.boi_token_id}, {cfg.eoi_token_id}, {self.image_token_id})")
        self.boi_token, self.eoi_token, self.soft_token = boi, eoi, soft
        self.full_image_sequence = f"\n\n{boi}{soft * self.tokens_per_image}{eoi}\n\n"
        types = list(getattr(cfg.text_config, "layer_types", None) or [])
        window = getattr(cfg.text_config, "sliding_window", None)
        self._windows = [int(window) if window is not None and i < len(types) and types[i] == "sliding_attention"
                         else None for i in range(self.num_layers)]

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str, model_id: str, dtype: torch.dtype, device: torch.device,
             verbose: bool = False) -> "Gemma3Adapter":
        from transformers import Gemma3ForConditionalGeneration
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        model = load_pretrained(Gemma3ForConditionalGeneration, path, model_id, dtype, device,
                                attn_implementation="sdpa")
        return cls(model, load_tokenizer(path, model_id),
                   load_image_processor(path, model_id, Gemma3ImageProcessorPil, verbose), model_id)

    # ------------------------------------------------------------------------------ tiny model
    @classmethod
    def build_tokenizer(cls) -> Any:
        """The tiny Gemma tokenizer (``build_tokenizer(style="gemma")``) with Gemma 3's image tokens, named
        as on the hub (``boi_token``, ``eoi_token``, ``image_token``), and the hub's chat template."""
        tok = build_tokenizer(style="gemma")
        tok.add_special_tokens({"additional_special_tokens": [BOI, EOI, SOFT]}, replace_extra_special_tokens=False)
        tok._set_model_specific_special_tokens({"boi_token": BOI, "eoi_token": EOI, "image_token": SOFT})
        tok.chat_template = CHAT_TEMPLATE
        return tok

    @classmethod
    def write_tiny_model(cls, directory: str | os.PathLike, seed: int = 0, **shape: Any) -> Path:
        """A tiny random Gemma 3 with images as a hub-like directory: config, weights, tokenizer with the
        hub's chat template, the hub's ``preprocessor_config.json`` and ``processor_config.json``.

        ``shape``: num_layers, num_heads, num_kv_heads, head_dim, hidden_size and any Gemma 3 text config
        value (as ``gemma3_text``'s tiny model: every other layer local, ``sliding_window`` 6), plus
        mm_tokens_per_image (4: a 2 x 2 grid), image_size (64), patch_size (16), vision_depth (2),
        vision_hidden_size (32).
        """
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration

        if shape.get("num_heads", 4) % shape.get("num_kv_heads", 2):
            raise InputError("num_heads must be a multiple of num_kv_heads")
        vision = {k: shape.pop(k) for k in list(shape) if k in cls.VISION_KEYS}
        mm = int(vision.get("mm_tokens_per_image", 4))
        image_size = int(vision.get("image_size", 64))
        patch = int(vision.get("patch_size", 16))
        side = math.isqrt(mm)
        if side * side != mm or image_size % patch or (image_size // patch) % side:
            raise InputError(f"mm_tokens_per_image must be a square whose side divides image_size / patch_size "
                             f"(got {mm}, {image_size}, {patch})")
        tokenizer = cls.build_tokenizer()
        text = Gemma3TextAdapter.tiny_config(tokenizer, **shape)
        text["model_type"] = "gemma3_text"
        vh = int(vision.get("vision_hidden_size", 32))
        vision_config = {
            "model_type": "siglip_vision_model", "hidden_size": vh, "intermediate_size": 2 * vh,
            "num_hidden_layers": int(vision.get("vision_depth", 2)), "num_attention_heads": 2,
            "image_size": image_size, "patch_size": patch, "layer_norm_eps": 1e-6, "vision_use_head": False,
            "hidden_act": "gelu_pytorch_tanh",
        }
        ids = tokenizer.convert_tokens_to_ids([BOI, EOI, SOFT])
        try:
            config = Gemma3Config(text_config=text, vision_config=vision_config, mm_tokens_per_image=mm,
                                  boi_token_index=ids[0], eoi_token_index=ids[1], image_token_index=ids[2],
                                  initializer_range=text["initializer_range"],
                                  tie_word_embeddings=text["tie_word_embeddings"],
                                  eos_token_id=[tokenizer.eos_token_id,
                                                tokenizer.convert_tokens_to_ids("<end_of_turn>")])
        except Exception as exc:  # the config classes validate the shape
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            reason = lines[-1].split(": ", 1)[-1] if lines else str(exc)
            raise InputError(f"invalid gemma3 shape: {reason}") from exc
        torch.manual_seed(seed)
        model = Gemma3ForConditionalGeneration(config).to(torch.float32).eval()
        with torch.no_grad():
            # transformers initialises the projector's matrix to zeros: every image token would carry the
            # same (zero) embedding. A random one makes the image tokens differ.
            w = model.model.multi_modal_projector.mm_input_projection_weight
            w.normal_(0.0, text["initializer_range"])
        return write_hub_dir(directory, model, tokenizer, {
            "preprocessor_config.json": preprocessor_config(image_size, mm),
            "processor_config.json": {"image_seq_length": mm, "processor_class": "Gemma3Processor"},
        })

    # ---------------------------------------------------------------------------------- inputs
    def image_settings(self) -> dict[str, Any]:
        """What ``Gemma3Processor`` passes to the image processor: its defaults, with the image processor
        config's ``do_pan_and_scan`` and crop settings where the config sets them (not null)."""
        settings = dict(PROCESSOR_IMAGE_DEFAULTS)
        for key in ("do_pan_and_scan",) + PAN_AND_SCAN_KEYS:
            value = getattr(self.image_processor, key, None)
            if value is not None:
                settings[key] = value
        settings["do_pan_and_scan"] = bool(settings["do_pan_and_scan"])
        return settings

    def prepare(self, prompt: str, images: list[Any], image_paths: list[str | None],
                max_pixels: int | None = None) -> Prepared:
        """Chat-template the prompt with its images, run the image processor, expand each
        ``<start_of_image>`` as ``Gemma3Processor`` does; the grids of soft tokens per image (and crop)."""
        text = self._chat_text(prompt, len(images))
        if text.count(self.boi_token) != len(images):
            raise InputError(f"the prompt has {text.count(self.boi_token)} {self.boi_token} for {len(images)} image(s)")
        model_inputs: dict[str, Any] = {}
        num_crops: list[int] = []
        settings = self.image_settings()
        if images:
            size = dict(getattr(self.image_processor, "size", None) or {})
            side_px = (int(size.get("width", 0)), int(size.get("height", 0)))
            if max_pixels is not None and side_px[0] * side_px[1] > max_pixels:
                raise InputError(f"Gemma 3 resizes every image to {side_px[0]}x{side_px[1]} pixels; "
                                 f"max_pixels (--max-pixels) {max_pixels} is below that")
            try:
                out = self.image_processor(images=images, return_tensors="pt", **settings)
            except Exception as exc:
                raise InputError(f"the image processor failed: {str(exc).splitlines()[0]}") from exc
            num_crops = [int(n) for n in out["num_crops"]]
            pieces = text.split(self.boi_token)
            parts = [pieces[0]]
            for i, n in enumerate(num_crops):
                if n:  # Gemma3Processor.replace_image_token
                    parts.append(f"Here is the original image {self.full_image_sequence} and here are some crops "
                                 f"to help you see better " + " ".join([self.full_image_sequence] * n))
                else:
                    parts.append(self.full_image_sequence)
                parts.append(pieces[i + 1])
            text = "".join(parts)
            model_inputs["pixel_values"] = out["pixel_values"].to(self.device, self.dtype)
        # Gemma 3's template starts with BOS; the processor then adds no special tokens.
        bos = getattr(self.tokenizer, "bos_token", None)
        add_special = not (bos is not None and text.startswith(bos))
        ids = self.tokenizer(text, add_special_tokens=add_special, return_tensors="pt")["input_ids"]
        input_ids = ids.to(self.device)
        is_image = (input_ids[0] == self.image_token_id).cpu()
        infos: list[ImageInfo] = []
        if images:
            # The processor's mm token types: 1 at the soft tokens (the model's bidirectional blocks).
            model_inputs["token_type_ids"] = (input_ids == self.image_token_id).to(torch.long)
            infos = self._image_infos(images, image_paths, is_image, num_crops, settings)
        elif bool(is_image.any()):
            raise InputError(f"the prompt contains {self.soft_token} without an image")
        return Prepared(input_ids=input_ids, model_inputs=model_inputs, is_image=is_image, images=infos,
                        prompt_text=text)

    def _image_infos(self, images: list[Any], image_paths: list[str | None], is_image: torch.Tensor,
                     num_crops: list[int], settings: dict[str, Any]) -> list[ImageInfo]:
        """One grid per run of soft tokens: the image, or its base view then its crops (tiles)."""
        pos = torch.nonzero(is_image).flatten().tolist()
        n = self.tokens_per_image
        runs = [pos[i] for i in range(0, len(pos), n)]
        if len(pos) != n * sum(1 + c for c in num_crops) or any(pos[i + n - 1] != pos[i] + n - 1 for i in range(0, len(pos), n)):
            raise InputError("the image soft tokens are not in runs of mm_tokens_per_image; the chat template "
                             "is not Gemma 3's")
        size = dict(getattr(self.image_processor, "size", None) or {})
        resized = (int(size.get("width", 0)), int(size.get("height", 0)))
        infos = []
        k = 0
        for i, (img, c) in enumerate(zip(images, num_crops)):
            w, h = img.size
            grids = [GridInfo(self.side, self.side, runs[k], (0.0, 0.0, float(w), float(h)),
                              kind="base" if c else "image")]
            if c:
                boxes = crop_boxes(self.image_processor, (w, h), settings)
                if len(boxes) != c:
                    raise InputError(f"image {i}: {len(boxes)} pan-and-scan crops computed, the processor made {c}")
                grids += [GridInfo(self.side, self.side, runs[k + 1 + j], box, kind="tile")
                          for j, box in enumerate(boxes)]
            k += 1 + c
            infos.append(ImageInfo(
                index=i, path=image_paths[i] if i < len(image_paths) else None,
                grid_rows=self.side, grid_cols=self.side, token_start=grids[0].token_start,
                token_end=grids[-1].token_end, original_size=(w, h), resized_size=resized, grids=grids))
        return infos

    # ------------------------------------------------------------------------------ clean pass
    def _full_inputs(self, prepared: Prepared, generated: list[int]) -> tuple[torch.Tensor, dict[str, Any]]:
        ids, inputs = super()._full_inputs(prepared, generated)
        if "token_type_ids" in inputs:
            tt = inputs["token_type_ids"]
            inputs["token_type_ids"] = torch.cat([tt, tt.new_zeros((1, ids.shape[1] - tt.shape[1]))], dim=1)
        return ids, inputs

    def attention_window(self, layer: int) -> int | None:
        return self._windows[layer]

    def final_logits(self, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # Gemma3ForConditionalGeneration.forward: lm_head(norm(h)), no soft-capping.
        return VisionDecoderAdapter.final_logits(self, h, dtype)
