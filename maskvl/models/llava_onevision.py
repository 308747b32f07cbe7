"""LLaVA-OneVision through transformers' ``LlavaOnevisionForConditionalGeneration``.

A SigLIP vision tower, a two-layer projector and a Qwen2 language model (the shared decoder adapter
replays its layers: q/k/v biases, no q/k norms, 1-D RoPE). What is family-specific is the image's tokens:

* one image in the prompt (anyres): the image processor makes a *base view* (the whole image resized to
  one tile, ``size``, without keeping its aspect) and *tiles*: the image resized into the best of
  ``image_grid_pinpoints`` keeping its aspect, centred with padding, cut into tiles of ``size``. The model
  puts the base view's ``side x side`` features first (``side = image_size / patch_size``), then packs the
  tiles' features into one canvas of ``tile rows * side`` by ``tile cols * side`` cells, cuts the padded
  rows (or columns) off (``unpad_image``), bilinearly shrinks the canvas when it exceeds
  ``vision_aspect_ratio`` (``anyres_max_9``: nine tiles' worth), and ends every canvas row with the
  ``image_newline`` feature. Grids: one of kind ``base`` (box: the whole image), then one of kind ``tile``
  per tile, in token order, each the canvas cells of that tile with the canvas' row stride (``cols + 1``:
  the newlines). The boxes are the cells' regions mapped back through the unpadding, the padding and the
  aspect-keeping resize to original-image pixels; edge tiles are partial after unpadding. When the canvas
  was shrunk, a cell belongs to the tile its centre falls in and boxes follow the shrunk cells' edges.
  The boxes are the kept cells' regions, so they can fall short of the image's edges by less than one
  feature cell: ``unpad_image`` truncates the image's extent in cells (``int(...)``) and may drop a
  row or column of cells that holds a sliver of the image besides padding (up to 0.8% of a side with
  the hub's pinpoints); they can also reach past the edges into the processor's padding;
* several images in one prompt (as the processor's chat-template path passes them: one sample with n
  images, ``batch_num_images = [n]``): each image is padded to a square (the mean colour, centred) and
  resized to one tile; its ``side x side`` features are one grid of kind ``image`` (its box extends past
  the image by the square padding) followed by one ``image_newline``.

Newline positions carry the image token id but are not grid cells: they are text-kind. The prompt is the
checkpoint's chat template (``<image>`` once per image, before the text), expanded to one ``<image>`` per
feature as ``LlavaOnevisionProcessor`` does. ``vision_feature_select_strategy="default"`` drops the first
feature, a CLS token SigLIP does not have: such a checkpoint is refused (the model itself cannot pack its
anyres features then).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import InputError, ModelLoadError
from .base import GridInfo, ImageInfo, Prepared
from .decoder import VisionDecoderAdapter
from .loading import load_image_processor, load_pretrained, load_tokenizer
from .qwen2 import Qwen2Adapter
from .registry import register
from .tiny import SPECIAL_TOKENS, build_tokenizer, write_hub_dir

log = logging.getLogger("maskvl")

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"

# The hub's LLaVA-OneVision chat template (llava-hf/llava-onevision-qwen2-*-hf chat_template.json): every
# image of a turn first, then its videos, then its text, each text after a newline.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Tiny pinpoints (height, width) in tiles of 32 px: one tile, or two or three side by side / stacked.
TINY_PINPOINTS = [[32, 32], [32, 64], [64, 32], [32, 96], [96, 32]]
TINY_TILE = 32


def tiny_preprocessor_config(tile: int = TINY_TILE, pinpoints: list[list[int]] | None = None) -> dict[str, Any]:
    """The hub's ``preprocessor_config.json`` of LLaVA-OneVision (SigLIP mean/std 0.5, bicubic), tiny tiles."""
    return {
        "image_processor_type": "LlavaOnevisionImageProcessor",
        "processor_class": "LlavaOnevisionProcessor",
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "image_grid_pinpoints": pinpoints or TINY_PINPOINTS,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": tile, "width": tile},
    }


def _unpad(orig_h: int, orig_w: int, cur_h: int, cur_w: int) -> tuple[int, int, int, int]:
    """``unpad_image``'s cut of a ``cur_h x cur_w`` feature canvas: (top, left, rows, cols) kept."""
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        pad = (cur_h - new_h) // 2
        return pad, 0, cur_h - 2 * pad, cur_w
    new_w = int(round(orig_w * (cur_h / orig_h), 7))
    pad = (cur_w - new_w) // 2
    return 0, pad, cur_h, cur_w - 2 * pad


def _runs(n_new: int, n_old: int, offset: int, side: int) -> list[tuple[int, int, float, float]]:
    """Along one axis of the (possibly shrunk) canvas of ``n_new`` cells over ``n_old`` unpadded cells that
    start ``offset`` cells into the padded canvas: the runs of cells in one tile, as
    ``(first, end, lo, hi)`` with ``lo, hi`` the run's edges in padded-canvas cells."""
    scale = n_old / n_new
    tile_of = [int(((i + 0.5) * scale + offset) // side) for i in range(n_new)]
    runs = []
    start = 0
    for i in range(1, n_new + 1):
        if i == n_new or tile_of[i] != tile_of[start]:
            runs.append((start, i, start * scale + offset, i * scale + offset))
            start = i
    return runs


@register
class LlavaOnevisionAdapter(VisionDecoderAdapter):
    """Adapter over a loaded ``LlavaOnevisionForConditionalGeneration`` and its tokenizer / image processor."""

    MODEL_TYPES = ("llava_onevision",)
    FAMILY: ClassVar[str] = "LLaVA-OneVision"
    #: The ``shape`` keys :meth:`write_tiny_model` takes.
    SHAPE_KEYS: ClassVar[frozenset[str]] = frozenset({
        "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "intermediate_size", "vision_depth",
        "initializer_range", "tie_word_embeddings", "image_grid_pinpoints", "vision_aspect_ratio",
        "vision_feature_select_strategy", "vision_feature_layer"})

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, model_id: str):
        cfg = model.config
        self._setup(model, tokenizer, model_id, model.model.language_model, model.lm_head, cfg.text_config)
        self.image_processor = image_processor
        self.image_token_id = cfg.image_token_id
        vc = cfg.vision_config
        self.tile = int(vc.image_size)
        self.side = vc.image_size // vc.patch_size
        # The features one view gives after the select strategy: the patches, a CLS token where the tower
        # has one (CLIP), minus the first with "default".
        emb = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower).embeddings
        n = self.side ** 2 + (1 if hasattr(emb, "class_embedding") else 0)
        if cfg.vision_feature_select_strategy == "default":
            n -= 1
        if n != self.side ** 2:
            raise ModelLoadError(
                f"{model_id}: vision_feature_select_strategy {cfg.vision_feature_select_strategy!r} leaves {n} "
                f"features per view, not the {self.side}x{self.side} patch grid (a {vc.model_type} tower "
                f"{'has' if n > self.side ** 2 else 'has no'} CLS token); not supported for {self.FAMILY}")
        sliding = [i for i, t in enumerate(getattr(cfg.text_config, "layer_types", None) or [])
                   if t != "full_attention"]
        self._windows = [int(cfg.text_config.sliding_window) if i in sliding else None for i in range(self.num_layers)]

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str, model_id: str, dtype: torch.dtype, device: torch.device,
             verbose: bool = False) -> "LlavaOnevisionAdapter":
        from transformers import LlavaOnevisionForConditionalGeneration
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import \
            LlavaOnevisionImageProcessorPil

        model = load_pretrained(LlavaOnevisionForConditionalGeneration, path, model_id, dtype, device,
                                attn_implementation="sdpa")
        # The hub keeps LLaVA-OneVision's chat template in chat_template.json (its tokenizer has none).
        return cls(model, load_tokenizer(path, model_id),
                   load_image_processor(path, model_id, LlavaOnevisionImageProcessorPil, verbose), model_id)

    @classmethod
    def from_loaded(cls, model: Any, tokenizer: Any, image_processor: Any = None,
                    model_id: str | None = None) -> "LlavaOnevisionAdapter":
        if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
            raise InputError(f"the tokenizer passed with the {cls.FAMILY} model has no chat template "
                             f"(set tokenizer.chat_template to the processor's)")
        return super().from_loaded(model, tokenizer, image_processor, model_id)  # type: ignore[return-value]

    @classmethod
    def write_tiny_model(cls, directory: str | os.PathLike, seed: int = 0, **shape: Any) -> Path:
        """A tiny random LLaVA-OneVision as a hub-like directory: a Qwen2 decoder, a 2-layer SigLIP of 32 px
        views in 8 px patches (4x4 features per view), tiny pinpoints (up to three tiles), the hub's template.

        ``shape`` (:attr:`SHAPE_KEYS`): num_layers, num_heads, num_kv_heads, head_dim, hidden_size,
        intermediate_size, vision_depth, initializer_range, tie_word_embeddings, and the config's
        image_grid_pinpoints, vision_aspect_ratio, vision_feature_select_strategy, vision_feature_layer.
        """
        from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

        unknown = sorted(set(shape) - cls.SHAPE_KEYS)
        if unknown:
            raise TypeError(f"{cls.__name__}.write_tiny_model() got unexpected shape keys {unknown}")
        heads, kv = shape.get("num_heads", 4), shape.get("num_kv_heads", 2)
        if heads % kv:
            raise InputError("num_heads must be a multiple of num_kv_heads")
        head_dim = shape.get("head_dim", 16)
        hidden = shape.get("hidden_size", heads * head_dim)
        tokenizer = build_tokenizer()
        tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:] + [IMAGE_TOKEN, VIDEO_TOKEN]})
        tokenizer.chat_template = CHAT_TEMPLATE
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + [IMAGE_TOKEN, VIDEO_TOKEN]}
        tie = bool(shape.get("tie_word_embeddings", False))
        pinpoints = [list(p) for p in shape.get("image_grid_pinpoints", TINY_PINPOINTS)]
        # Qwen2's tiny decoder (maskvl.models.qwen2), with this family's special tokens.
        text = Qwen2Adapter.tiny_config(
            tokenizer, num_layers=shape.get("num_layers", 3), num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
            hidden_size=hidden, model_type="qwen2", intermediate_size=shape.get("intermediate_size", 2 * hidden),
            initializer_range=shape.get("initializer_range", 0.1),
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, use_sliding_window=False,
            tie_word_embeddings=tie, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=None)
        vision = {
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": shape.get("vision_depth", 2),
            "num_attention_heads": 2,
            "image_size": TINY_TILE,
            "patch_size": 8,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
            "vision_use_head": False,
        }
        extra = {k: shape[k] for k in ("vision_aspect_ratio", "vision_feature_select_strategy",
                                       "vision_feature_layer") if k in shape}
        try:
            config = LlavaOnevisionConfig(
                text_config=text, vision_config=vision, image_token_index=ids[IMAGE_TOKEN],
                video_token_index=ids[VIDEO_TOKEN], image_grid_pinpoints=pinpoints, tie_word_embeddings=tie,
                eos_token_id=ids["<|im_end|>"], **extra)
        except Exception as exc:  # strict config validation
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise InputError(f"invalid llava_onevision shape: {lines[-1] if lines else exc}") from exc
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config).to(torch.float32).eval()
        processor = {"image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN, "num_image_tokens": (TINY_TILE // 8) ** 2,
                     "processor_class": "LlavaOnevisionProcessor",
                     "vision_feature_select_strategy": config.vision_feature_select_strategy,
                     "vision_aspect_ratio": config.vision_aspect_ratio}
        return write_hub_dir(directory, model, tokenizer, {
            "preprocessor_config.json": tiny_preprocessor_config(TINY_TILE, pinpoints),
            "processor_config.json": processor,
            "chat_template.json": {"chat_template": CHAT_TEMPLATE},
        })

    # ----------------------------------------------------------------------------------- inputs
    def _anyres_grids(self, start: int, orig_w: int, orig_h: int) -> tuple[list[GridInfo], int, tuple[int, int]]:
        """One image's grids in anyres (single-image) mode from token ``start``: the base view, then the
        tiles of the unpadded canvas. Returns the grids, the image's token count and the best resolution
        ``(width, height)`` the tiles were cut from."""
        from transformers.image_processing_utils import select_best_resolution

        cfg = self.model.config
        side, tile = self.side, self.tile
        grids = [GridInfo(side, side, start, (0.0, 0.0, float(orig_w), float(orig_h)), kind="base")]
        best_h, best_w = select_best_resolution((orig_h, orig_w), cfg.image_grid_pinpoints)
        cur_h, cur_w = best_h // tile * side, best_w // tile * side
        top, left, hu, wu = _unpad(orig_h, orig_w, cur_h, cur_w)
        max_tiles = int(cfg.vision_aspect_ratio.strip("anyres_max_"))
        ratio = math.sqrt(hu * wu / (max_tiles * side ** 2))
        hf, wf = (int(hu // ratio), int(wu // ratio)) if ratio > 1.1 else (hu, wu)
        # The processor's resize keeping the aspect, centred in the best resolution (pixels).
        scale_w, scale_h = best_w / orig_w, best_h / orig_h
        if scale_w < scale_h:
            new_w, new_h = best_w, min(math.ceil(orig_h * scale_w), best_h)
        else:
            new_h, new_w = best_h, min(math.ceil(orig_w * scale_h), best_w)
        paste_y, paste_x = (best_h - new_h) // 2, (best_w - new_w) // 2
        cell = tile / side  # pixels of the best-resolution canvas per feature cell

        def to_x(c: float) -> float:
            return (c * cell - paste_x) * orig_w / new_w

        def to_y(c: float) -> float:
            return (c * cell - paste_y) * orig_h / new_h

        canvas_start = start + side * side
        stride = wf + 1
        for r0, r1, y0, y1 in _runs(hf, hu, top, side):
            for c0, c1, x0, x1 in _runs(wf, wu, left, side):
                grids.append(GridInfo(r1 - r0, c1 - c0, canvas_start + r0 * stride + c0,
                                      (to_x(x0), to_y(y0), to_x(x1), to_y(y1)), kind="tile", row_stride=stride))
        return grids, side * side + hf * stride, (best_w, best_h)

    def prepare(self, prompt: str, images: list[Any], image_paths: list[str | None],
                max_pixels: int | None = None) -> Prepared:
        """Chat-template the prompt with its images, run the image processor, expand ``<image>`` to one
        token per feature (newlines included) as ``LlavaOnevisionProcessor`` does."""
        if images and max_pixels is not None:
            raise InputError(f"max_pixels (--max-pixels) is not supported for {self.FAMILY}: an image's tiles come "
                             f"from the model's image_grid_pinpoints")
        text = self._chat_text(prompt, len(images))
        if text.count(IMAGE_TOKEN) != len(images):
            raise InputError(f"the chat template produced {text.count(IMAGE_TOKEN)} image slots for {len(images)} "
                             f"images")
        model_inputs: dict[str, Any] = {}
        layouts: list[tuple[list[GridInfo], int, tuple[int, int]]] = []
        if images:
            proc = self.image_processor
            if [list(p) for p in proc.image_grid_pinpoints] != [list(p) for p in self.model.config.image_grid_pinpoints]:
                raise InputError(f"the image processor's image_grid_pinpoints differ from the model config's")
            size = proc.size
            if (size.get("height"), size.get("width")) != (self.tile, self.tile):
                raise InputError(f"the image processor's size {dict(size)} is not the vision tower's "
                                 f"{self.tile}x{self.tile} view")
            # The processor's chat-template path: one sample with all of the prompt's images.
            out = proc(images=[list(images)], return_tensors="pt")
            model_inputs["pixel_values"] = out["pixel_values"].to(self.device, self.dtype)
            model_inputs["image_sizes"] = out["image_sizes"].to(self.device)
            model_inputs["batch_num_images"] = out["batch_num_images"].to(self.device)
            # Token counts and grids relative to each image's first token (shifted below).
            for img in images:
                w, h = img.size
                if len(images) == 1:
                    layouts.append(self._anyres_grids(0, w, h))
                else:
                    m = max(w, h)
                    sx, sy = (m - w) // 2, (m - h) // 2
                    box = (float(-sx), float(-sy), float(m - sx), float(m - sy))
                    layouts.append(([GridInfo(self.side, self.side, 0, box, kind="image")], self.side ** 2 + 1,
                                    (self.tile, self.tile)))
            pieces = text.split(IMAGE_TOKEN)
            text = pieces[0] + "".join(IMAGE_TOKEN * n + pieces[i + 1] for i, (_, n, _) in enumerate(layouts))
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        input_ids = ids.to(self.device)
        is_image = torch.zeros(input_ids.shape[1], dtype=torch.bool)
        infos: list[ImageInfo] = []
        if images:
            pos = torch.nonzero(input_ids[0].cpu() == self.image_token_id).flatten().tolist()
            k = 0
            for i, (img, (grids, n, resized)) in enumerate(zip(images, layouts)):
                if len(pos) < k + n:
                    raise InputError("the image tokens were not tokenized one per <image>")
                start = pos[k]
                if pos[k + n - 1] != start + n - 1:
                    raise InputError(f"an image's tokens are not contiguous; the chat template is not {self.FAMILY}'s")
                shifted = [GridInfo(g.rows, g.cols, g.token_start + start, g.box, g.kind, g.row_stride) for g in grids]
                for g in shifted:
                    is_image[g.positions()] = True
                infos.append(ImageInfo(
                    index=i, path=image_paths[i] if i < len(image_paths) else None,
                    grid_rows=shifted[0].rows, grid_cols=shifted[0].cols, token_start=start, token_end=start + n,
                    original_size=tuple(img.size), resized_size=resized, grids=shifted,
                ))
                k += n
            if k != len(pos):
                raise InputError(f"the prompt has {len(pos) - k} image tokens beyond its images' features")
        elif (input_ids == self.image_token_id).any():
            raise InputError(f"the prompt contains the image token {IMAGE_TOKEN} but no image was given")
        return Prepared(input_ids=input_ids, model_inputs=model_inputs, is_image=is_image, images=infos,
                        prompt_text=text)

    def attention_window(self, layer: int) -> int | None:
        return self._windows[layer]
