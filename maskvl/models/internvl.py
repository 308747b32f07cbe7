"""InternVL (InternVL3, InternVL2.5) through transformers' native ``InternVLForConditionalGeneration``.

* inputs: the hub's chat template writes each image as ``<IMG_CONTEXT>\\n``; ``InternVLProcessor`` replaces
  every ``<IMG_CONTEXT>`` with ``<img>`` + ``<IMG_CONTEXT>`` x ``image_seq_length`` x ``num_patches`` +
  ``</img>`` and tokenizes the text as it is (the tokenizer's own special tokens added, none for Qwen2's).
  The image processor (``GotOcr2ImageProcessorPil``; the processor always asks it to ``crop_to_patches``)
  picks a grid of ``cols x rows`` tiles of the tile size among the allowed aspect ratios
  (``min_patches``..``max_patches`` tiles), stretches the image onto that canvas, cuts the tiles row-major
  and, when there is more than one tile, appends a thumbnail (the whole image resized to one tile).
  :meth:`InternVLAdapter.prepare` does the same with the image processor and the tokenizer directly;
* vision: each tile (and the thumbnail) goes through ``InternVLVisionModel`` on its own; the patch
  features (CLS dropped) are pixel-shuffled by ``downsample_ratio`` to ``sqrt(image_seq_length)`` squared
  tokens per tile, row-major, and projected: the tile's tokens are one contiguous ``s x s`` grid;
* grids: each tile is one grid of kind ``tile`` (box: its part of the ``cols*tile x rows*tile`` canvas
  mapped back to the original image), the thumbnail one of kind ``thumbnail`` (the whole image); an image
  that gets a single tile (a 1x1 canvas, no thumbnail) is one grid of kind ``image``. ``<img>``/``</img>``
  are text-kind tokens inside the image's token span;
* the text decoder: transformers' decoder of ``text_config`` (Qwen2 for InternVL3, Llama for some
  InternVL2.5 / InternVL3-9B, Qwen3 for InternVL3.5) with 1-D RoPE; the shared decoder adapter replays
  its layers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import InputError, ModelLoadError
from .base import GridInfo, ImageInfo, Prepared
from .decoder import VisionDecoderAdapter
from .loading import checkpoint_json, load_image_processor, load_pretrained, load_tokenizer
from .registry import adapter_class, register
from .tiny import build_tokenizer, write_hub_dir

log = logging.getLogger("maskvl")

START_IMAGE = "<img>"
END_IMAGE = "</img>"
CONTEXT_IMAGE = "<IMG_CONTEXT>"
VIDEO = "<video>"

# The hub's InternVL3-*-hf chat template (no default system turn; an image is "<IMG_CONTEXT>\n").
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)


def preprocessor_config(tile: int = 448, max_patches: int = 12) -> dict[str, Any]:
    """The hub's InternVL3-*-hf ``preprocessor_config.json`` (ImageNet mean/std, bicubic), tile size ``tile``."""
    return {
        "image_processor_type": "GotOcr2ImageProcessorFast",
        "processor_class": "InternVLProcessor",
        "crop_to_patches": False,  # the processor passes crop_to_patches=True itself
        "min_patches": 1,
        "max_patches": max_patches,
        "do_resize": True,
        "size": {"height": tile, "width": tile},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "do_convert_rgb": True,
    }


def build_internvl_tokenizer():
    """The tiny byte-level BPE tokenizer (Qwen's ChatML tokens) with InternVL's image tokens, named as the
    hub's tokenizer names them (``start_image_token``, ``end_image_token``, ``context_image_token``,
    ``video_token``: what ``InternVLProcessor`` reads), and the hub's chat template."""
    from transformers import PreTrainedTokenizerFast

    base = build_tokenizer(style="qwen")
    base.add_special_tokens({"extra_special_tokens": [START_IMAGE, END_IMAGE, CONTEXT_IMAGE, VIDEO]},
                            replace_extra_special_tokens=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"start_image_token": START_IMAGE, "end_image_token": END_IMAGE,
                              "context_image_token": CONTEXT_IMAGE, "video_token": VIDEO})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _processor_seq_length(path: str) -> int | None:
    """``image_seq_length`` from the checkpoint's ``processor_config.json``, where there is one."""
    value = (checkpoint_json(path, "processor_config.json") or {}).get("image_seq_length")
    return int(value) if value is not None else None


@register
class InternVLAdapter(VisionDecoderAdapter):
    """Adapter over a loaded ``InternVLForConditionalGeneration`` and its tokenizer / image processor."""

    MODEL_TYPES = ("internvl",)
    FAMILY: ClassVar[str] = "InternVL"
    #: The ``shape`` keys :meth:`write_tiny_model` takes.
    SHAPE_KEYS: ClassVar[frozenset[str]] = frozenset({
        "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "intermediate_size", "vision_depth",
        "initializer_range", "tie_word_embeddings", "text_model_type", "max_patches"})

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, model_id: str,
                 image_seq_length: int | None = None):
        cfg = model.config
        text_config = cfg.text_config
        sliding = [i for i, t in enumerate(getattr(text_config, "layer_types", None) or []) if t != "full_attention"]
        if sliding:
            raise ModelLoadError(f"{model_id}: sliding-window layers ({', '.join(map(str, sliding))}) are not "
                                 f"supported for {self.FAMILY}")
        if cfg.vision_feature_select_strategy != "default":
            raise ModelLoadError(f"{model_id}: vision_feature_select_strategy "
                                 f"{cfg.vision_feature_select_strategy!r} is not supported (only 'default')")
        self._setup(model, tokenizer, model_id, model.model.language_model, model.lm_head, text_config)
        self.image_processor = image_processor
        self.image_token_id = cfg.image_token_id
        for name in ("start_image_token", "end_image_token", "context_image_token"):
            if getattr(tokenizer, name, None) is None:
                raise ModelLoadError(f"the tokenizer of {model_id!r} does not name its {name} "
                                     f"(InternVLProcessor needs <img>, </img> and <IMG_CONTEXT>)")
        self.start_token, self.end_token = tokenizer.start_image_token, tokenizer.end_image_token
        self.context_token = tokenizer.context_image_token
        if tokenizer.convert_tokens_to_ids(self.context_token) != self.image_token_id:
            raise ModelLoadError(f"{model_id}: the tokenizer's {self.context_token} is not the config's image_token_id "
                                 f"{self.image_token_id}")
        # Tokens per tile: the vision tower's patch grid of one tile, pixel-shuffled by downsample_ratio.
        size = image_processor.size
        self.tile = (int(size.height), int(size.width))
        ph, pw = cfg.vision_config.patch_size
        side_h = self.tile[0] // ph * cfg.downsample_ratio
        side_w = self.tile[1] // pw * cfg.downsample_ratio
        if self.tile[0] != self.tile[1] or side_h != int(side_h) or side_h < 1:
            raise ModelLoadError(f"{model_id}: tile size {self.tile[1]}x{self.tile[0]} with patch {ph} and "
                                 f"downsample_ratio {cfg.downsample_ratio} gives no square token grid")
        self.side = int(side_h)
        seq = image_seq_length if image_seq_length is not None else cfg.image_seq_length
        if seq != self.side * int(side_w):
            raise ModelLoadError(f"{model_id}: image_seq_length {seq} does not match the {self.side}x{int(side_w)} "
                                 f"tokens a {self.tile[0]}-pixel tile gives")
        self.image_seq_length = seq

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str, model_id: str, dtype: torch.dtype, device: torch.device,
             verbose: bool = False) -> "InternVLAdapter":
        """Load model, tokenizer and image processor from a local directory or a hub id."""
        from transformers import InternVLForConditionalGeneration
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        model = load_pretrained(InternVLForConditionalGeneration, path, model_id, dtype, device,
                                attn_implementation="sdpa")
        return cls(model, load_tokenizer(path, model_id),
                   load_image_processor(path, model_id, GotOcr2ImageProcessorPil, verbose), model_id,
                   _processor_seq_length(path))

    @classmethod
    def write_tiny_model(cls, directory: str | os.PathLike, seed: int = 0, **shape: Any) -> Path:
        """A tiny random InternVL as a hub-like directory: config, weights, the tiny tokenizer with InternVL's
        image tokens and the hub's chat template, ``preprocessor_config.json`` (the hub's settings with
        32-pixel tiles and at most ``max_patches`` (6) tiles) and ``processor_config.json``.

        The vision tower sees 32-pixel tiles in 8-pixel patches; pixel shuffle (downsample_ratio 0.5) leaves
        2x2 = 4 tokens per tile. ``shape`` (:attr:`SHAPE_KEYS`): num_layers, num_heads, num_kv_heads,
        head_dim, hidden_size, intermediate_size, vision_depth, initializer_range, tie_word_embeddings,
        text_model_type (``qwen2``: InternVL3, the default; ``llama``: InternVL2.5-2B/8B, InternVL3-9B;
        ``qwen3``: InternVL3.5), max_patches.
        """
        from transformers import InternVLConfig, InternVLForConditionalGeneration

        unknown = sorted(set(shape) - cls.SHAPE_KEYS)
        if unknown:
            raise TypeError(f"{cls.__name__}.write_tiny_model() got unexpected shape keys {unknown}")
        heads, kv = shape.get("num_heads", 4), shape.get("num_kv_heads", 2)
        if heads % kv:
            raise InputError("num_heads must be a multiple of num_kv_heads")
        head_dim = shape.get("head_dim", 16)
        hidden = shape.get("hidden_size", heads * head_dim)
        text_type = shape.get("text_model_type", "qwen2")
        if text_type not in ("qwen2", "llama", "qwen3"):
            raise InputError(f"text_model_type must be qwen2, llama or qwen3 (got {text_type!r})")
        tokenizer = build_internvl_tokenizer()
        tie = bool(shape.get("tie_word_embeddings", False))
        init = shape.get("initializer_range", 0.1)
        # The text family's own tiny decoder (maskvl.models.qwen2 / llama / qwen3), with InternVL's tokens.
        text = adapter_class(text_type).tiny_config(
            tokenizer, num_layers=shape.get("num_layers", 3), num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
            hidden_size=hidden, model_type=text_type, intermediate_size=shape.get("intermediate_size", 2 * hidden),
            initializer_range=init, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=None, tie_word_embeddings=tie)
        if text_type in ("qwen2", "qwen3"):
            text["use_sliding_window"] = False
        tile, patch, ratio = 32, 8, 0.5
        vision = {
            "model_type": "internvl_vision",
            "hidden_size": 16,
            "num_hidden_layers": shape.get("vision_depth", 2),
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "hidden_act": "gelu",
            "attention_bias": True,
            "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6,
            "image_size": [tile, tile],
            "patch_size": [patch, patch],
            "use_absolute_position_embeddings": True,
            "layer_scale_init_value": 0.1,
            "initializer_range": init,
        }
        seq = int(tile // patch * ratio) ** 2
        config = InternVLConfig(
            text_config=text, vision_config=vision, image_token_id=tokenizer.convert_tokens_to_ids(CONTEXT_IMAGE),
            image_seq_length=seq, downsample_ratio=ratio, projector_hidden_act="gelu", vision_feature_layer=-1,
            vision_feature_select_strategy="default", tie_word_embeddings=tie,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        )
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config).to(torch.float32).eval()
        # The vision tower's init leaves the CLS token and position embeddings at zero and the layer scales
        # at 0.1; give them random values so that every part of the tower matters in the tests.
        with torch.no_grad():
            emb = model.model.vision_tower.embeddings
            emb.cls_token.normal_(0.0, init)
            emb.position_embeddings.normal_(0.0, init)
        return write_hub_dir(directory, model, tokenizer, {
            "preprocessor_config.json": preprocessor_config(tile, shape.get("max_patches", 6)),
            "processor_config.json": {"image_seq_length": seq, "processor_class": "InternVLProcessor"},
        })

    # ----------------------------------------------------------------------------------- inputs
    def _canvas(self, width: int, height: int, min_patches: int, max_patches: int) -> tuple[int, int]:
        """``(cols, rows)`` of tiles the image processor picks for a ``width x height`` image."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        if max_patches <= 1:
            return 1, 1
        return get_optimal_tiled_canvas((height, width), self.tile, min_patches, max_patches)

    def prepare(self, prompt: str, images: list[Any], image_paths: list[str | None],
                max_pixels: int | None = None) -> Prepared:
        """Chat-template the prompt with its images, tile them, expand each ``<IMG_CONTEXT>`` as
        ``InternVLProcessor`` does. ``max_pixels`` caps the tiled canvas (``cols * rows`` tiles, the thumbnail
        not counted): at most ``max_pixels // tile**2`` tiles."""
        text = self._chat_text(prompt, len(images))
        model_inputs: dict[str, Any] = {}
        canvases: list[tuple[int, int]] = []
        if text.count(self.context_token) != len(images):
            raise InputError(f"the chat template produced {text.count(self.context_token)} image slots for "
                             f"{len(images)} images")
        if images:
            proc = self.image_processor
            min_p, max_p = int(proc.min_patches), int(proc.max_patches)
            if max_pixels is not None:
                cap = int(max_pixels) // (self.tile[0] * self.tile[1])
                if cap < 1:
                    raise InputError(f"max_pixels (--max-pixels) {max_pixels} is below one {self.tile[1]}x"
                                     f"{self.tile[0]} tile, the smallest image {self.FAMILY} takes")
                max_p = min(max_p, cap)
                min_p = min(min_p, max_p)
            # InternVLProcessor always asks for crop_to_patches (its images_kwargs default).
            out = proc(images=images, crop_to_patches=True, min_patches=min_p, max_patches=max_p,
                       return_tensors="pt")
            num_patches = [int(n) for n in out["num_patches"]]
            for img, n in zip(images, num_patches):
                cols, rows = self._canvas(*img.size, min_p, max_p)
                if n != cols * rows + (cols * rows > 1):
                    raise InputError(f"the image processor made {n} patches for a {cols}x{rows} canvas")
                canvases.append((cols, rows))
            pieces = text.split(self.context_token)
            text = pieces[0] + "".join(
                self.start_token + self.context_token * (self.image_seq_length * n) + self.end_token + pieces[i + 1]
                for i, n in enumerate(num_patches))
            model_inputs["pixel_values"] = out["pixel_values"].to(self.device, self.dtype)
        # The processor tokenizes with the tokenizer's defaults (its special tokens added; none for Qwen2's).
        input_ids = self.tokenizer(text, return_tensors="pt")["input_ids"].to(self.device)
        ids = input_ids[0].cpu()
        is_image = ids == self.image_token_id
        infos: list[ImageInfo] = []
        if images:
            start_id = self.tokenizer.convert_tokens_to_ids(self.start_token)
            end_id = self.tokenizer.convert_tokens_to_ids(self.end_token)
            # One run of image tokens per image, between <img> and </img>, in prompt order.
            pos = torch.nonzero(is_image).flatten().tolist()
            k = 0
            for i, (img, (cols, rows)) in enumerate(zip(images, canvases)):
                ntiles = cols * rows
                n = self.image_seq_length * (ntiles + (ntiles > 1))
                first = pos[k]
                if (pos[k + n - 1] != first + n - 1 or first == 0 or int(ids[first - 1]) != start_id
                        or first + n >= len(ids) or int(ids[first + n]) != end_id):
                    raise InputError(f"image {i}'s tokens are not {self.start_token} + {n} x {self.context_token} "
                                     f"+ {self.end_token}; the chat template is not {self.FAMILY}'s")
                W, H = img.size
                s, q = self.side, self.image_seq_length
                grids: list[GridInfo] = []
                if ntiles == 1:
                    grids.append(GridInfo(s, s, first, (0.0, 0.0, float(W), float(H)), "image"))
                else:
                    # Tile t is row t // cols, column t % cols of the canvas the image was stretched onto.
                    for t in range(ntiles):
                        r, c = divmod(t, cols)
                        box = (c * W / cols, r * H / rows, (c + 1) * W / cols, (r + 1) * H / rows)
                        grids.append(GridInfo(s, s, first + t * q, box, "tile"))
                    grids.append(GridInfo(s, s, first + ntiles * q, (0.0, 0.0, float(W), float(H)), "thumbnail"))
                infos.append(ImageInfo(
                    index=i, path=image_paths[i] if i < len(image_paths) else None,
                    grid_rows=s, grid_cols=s, token_start=first - 1, token_end=first + n + 1,
                    original_size=(W, H), resized_size=(cols * self.tile[1], rows * self.tile[0]), grids=grids,
                ))
                k += n
            if k != len(pos):
                raise InputError(f"the prompt has {len(pos) - k} {self.context_token} tokens outside its images")
        return Prepared(input_ids=input_ids, model_inputs=model_inputs, is_image=is_image, images=infos,
                        prompt_text=text)
