"""Idefics3 and SmolVLM through transformers' ``Idefics3ForConditionalGeneration`` and
``SmolVLMForConditionalGeneration``.

SmolVLM is Idefics3's architecture (transformers generates its modeling code from Idefics3's), so one
file registers both model types:

* vision: a SigLIP-style tower on square sub-images of ``vision_config.image_size`` pixels, then the
  connector's pixel shuffle (``scale_factor``) and projection, giving ``image_seq_len = (image_size /
  patch_size)^2 / scale_factor^2`` tokens per sub-image, a ``sqrt(image_seq_len)`` square grid in
  row-major order (the shuffle merges ``scale_factor x scale_factor`` blocks of patches);
* the image processor (the family's PIL class) resizes the image to ``size["longest_edge"]``, rounds the
  canvas up to multiples of ``max_image_size["longest_edge"]`` (M), cuts it into ``rows x cols`` tiles of
  M x M, and appends the whole canvas resized to M x M (the global image);
* the processor writes, per tile, ``<fake_token_around_image><row_i_col_j>`` + ``<image>`` *
  image_seq_len, a ``\\n`` after each row of tiles, then ``\\n<fake_token_around_image><global-img>`` +
  ``<image>`` * image_seq_len + ``<fake_token_around_image>``; an image that fits in one tile (or with
  splitting off) is only the global part. The model scatters the sub-images' features into the ``<image>``
  positions in order;
* the language model is Llama (no q/k norms, no sliding windows): the shared decoder adapter replays it.

The two processors differ only in where the marker strings come from: Idefics3's are fixed (and it adds
``<fake_token_around_image>``, ``<image>`` and ``<end_of_utterance>`` to the tokenizer when missing),
SmolVLM's are read from the tokenizer's attributes (``image_token``, ``fake_image_token``,
``global_image_token``) with the same defaults. The chat templates differ in their first token
(``<|begin_of_text|>`` vs ``<|im_start|>``).

Grids: each tile is one grid of kind ``tile`` whose box is the tile's part of the resized canvas mapped
back to original-image pixels (the canvas is the whole image stretched, so the tiles cover it exactly);
the global image is one grid of kind ``thumbnail`` with the whole image as its box (kind ``image`` when
there are no tiles). Markers and newlines are text-kind tokens.
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
from .llama import LlamaAdapter
from .loading import checkpoint_json, load_image_processor, load_pretrained, load_tokenizer
from .registry import register
from .tiny import _CORPUS, write_hub_dir

log = logging.getLogger("maskvl")

ROW_COL_TOKENS = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]

# The hub's Idefics3 chat template (HuggingFaceM4/Idefics3-8B-Llama3): "User:<image>text<end_of_utterance>\n".
IDEFICS3_CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# SmolVLM's (transformers' processing_smolvlm.DEFAULT_CHAT_TEMPLATE, the hub's SmolVLM-Instruct template).
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# family -> (special tokens, bos, eos, pad, chat template) of the tiny model's tokenizer.
TOKENIZERS: dict[str, tuple[list[str], str, str, str, str]] = {
    "idefics3": (["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<fake_token_around_image>",
                  "<image>", "<end_of_utterance>", "<global-img>"] + ROW_COL_TOKENS,
                 "<|begin_of_text|>", "<end_of_utterance>", "<|finetune_right_pad_id|>", IDEFICS3_CHAT_TEMPLATE),
    "smolvlm": (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>",
                 "<end_of_utterance>", "<global-img>", "<video>"] + ROW_COL_TOKENS,
                "<|im_start|>", "<end_of_utterance>", "<|im_end|>", SMOLVLM_CHAT_TEMPLATE),
}


def build_tokenizer(family: str, vocab_size: int = 448):
    """A byte-level BPE tokenizer with the family's special tokens (markers, row/col tags) and chat template.

    The corpus has paragraph breaks so that ``"\\n\\n"`` is one token, as in the hub's tokenizers (the
    processor's ``\\n`` after the last row of tiles and the ``\\n`` before the global image then merge).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special, bos, eos, pad, template = TOKENIZERS[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = _CORPUS.splitlines()
    tok.train_from_iterator(lines + [line + "\n\n" for line in lines] + ["\n\n"] * 8, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   additional_special_tokens=[t for t in special if t not in (bos, eos, pad)])
    fast.chat_template = template
    return fast


@register
class Idefics3Adapter(VisionDecoderAdapter):
    """Adapter over a loaded ``Idefics3ForConditionalGeneration`` and its tokenizer / image processor."""

    MODEL_TYPES = ("idefics3",)
    MODEL_CLASS: ClassVar[str] = "Idefics3ForConditionalGeneration"
    FAMILY: ClassVar[str] = "Idefics3"
    #: The family's PIL image processor (module under transformers.models, class).
    PIL_PROCESSOR: ClassVar[tuple[str, str]] = ("idefics3.image_processing_pil_idefics3", "Idefics3ImageProcessorPil")
    PROCESSOR_CLASS: ClassVar[str] = "Idefics3Processor"
    STOP_TOKENS = ("<end_of_utterance>", "<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>")
    SHAPE_KEYS: ClassVar[frozenset[str]] = frozenset({
        "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "intermediate_size", "vision_depth",
        "vision_image_size", "vision_patch_size", "scale_factor", "longest_edge", "max_image_size",
        "initializer_range", "tie_word_embeddings"})

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, model_id: str):
        cfg = model.config
        text_type = getattr(cfg.text_config, "model_type", None)
        if text_type != "llama":
            raise ModelLoadError(f"{model_id}: {self.FAMILY} with a {text_type!r} language model is not supported "
                                 f"(maskvl knows the Llama one)")
        self._setup(model, tokenizer, model_id, model.model.text_model, model.lm_head, cfg.text_config)
        self.image_processor = image_processor
        self.image_token_id = cfg.image_token_id
        self.image_seq_len = int(model.model.image_seq_len)
        self.side = math.isqrt(self.image_seq_len)
        if self.side * self.side != self.image_seq_len:
            raise ModelLoadError(f"{model_id}: image_seq_len {self.image_seq_len} is not a square")
        self.fake_token, self.image_token, self.global_token = self._marker_strings(tokenizer)
        tid = tokenizer.convert_tokens_to_ids(self.image_token)
        if tid != self.image_token_id:
            raise ModelLoadError(f"{model_id}: the tokenizer's {self.image_token} is id {tid}, the config's "
                                 f"image_token_id is {self.image_token_id}")

    def _marker_strings(self, tokenizer: Any) -> tuple[str, str, str]:
        """``(<fake_token_around_image>, <image>, <global-img>)`` as the family's processor names them.

        Idefics3Processor's are fixed and it adds the first two (and ``<end_of_utterance>``) to the tokenizer
        as special tokens when the tokenizer lacks them.
        """
        fake, image = "<fake_token_around_image>", "<image>"
        missing = [t for t in (fake, image, "<end_of_utterance>") if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing},
                                         replace_extra_special_tokens=False)
        return fake, image, "<global-img>"

    # ---------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str, model_id: str, dtype: torch.dtype, device: torch.device,
             verbose: bool = False) -> "Idefics3Adapter":
        import importlib

        import transformers

        model = load_pretrained(getattr(transformers, cls.MODEL_CLASS), path, model_id, dtype, device,
                                attn_implementation="sdpa")
        module, name = cls.PIL_PROCESSOR
        pil_class = getattr(importlib.import_module(f"transformers.models.{module}"), name)
        adapter = cls(model, load_tokenizer(path, model_id),
                      load_image_processor(path, model_id, pil_class, verbose, auto_first=True), model_id)
        proc = checkpoint_json(path, "processor_config.json") or {}
        if proc.get("image_seq_len") is not None and int(proc["image_seq_len"]) != adapter.image_seq_len:
            raise ModelLoadError(f"{model_id}: processor_config.json's image_seq_len {proc['image_seq_len']} is not "
                                 f"the model's {adapter.image_seq_len}")
        return adapter

    # ------------------------------------------------------------------------------- tiny model
    @classmethod
    def write_tiny_model(cls, directory: str | os.PathLike, seed: int = 0, **shape: Any) -> Path:
        """A tiny random model of the family as a hub-like directory: config, weights, a byte-level BPE
        tokenizer with the family's special tokens and chat template, ``preprocessor_config.json`` (the hub's
        settings with small sizes) and ``processor_config.json`` (``image_seq_len``).

        ``shape`` (:attr:`SHAPE_KEYS`): num_layers (3), num_heads (4), num_kv_heads (2), head_dim (16),
        hidden_size (64), intermediate_size, vision_depth (2), vision_image_size (32: the sub-image side),
        vision_patch_size (8), scale_factor (2: 4 tokens per sub-image), longest_edge (96: the processor's
        resize), max_image_size (the tile side, = vision_image_size), initializer_range, tie_word_embeddings.
        A 96 x 64 image then gives 2 x 3 tiles and the global image.
        """
        import transformers

        unknown = sorted(set(shape) - cls.SHAPE_KEYS)
        if unknown:
            raise TypeError(f"{cls.__name__}.write_tiny_model() got unexpected shape keys {unknown}")
        family = cls.MODEL_TYPES[0]
        tokenizer = build_tokenizer(family)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in TOKENIZERS[family][0]}
        heads, kv = shape.get("num_heads", 4), shape.get("num_kv_heads", 2)
        if heads % kv:
            raise InputError("num_heads must be a multiple of num_kv_heads")
        head_dim = shape.get("head_dim", 16)
        hidden = shape.get("hidden_size", 64)
        image_size = shape.get("vision_image_size", 32)
        patch = shape.get("vision_patch_size", 8)
        scale = shape.get("scale_factor", 2)
        if image_size % patch or (image_size // patch) % scale:
            raise InputError("vision_image_size / vision_patch_size must be a multiple of scale_factor")
        tie = bool(shape.get("tie_word_embeddings", False))
        init = shape.get("initializer_range", 0.1)
        _, bos, eos, pad, _ = TOKENIZERS[family]
        # Llama's tiny decoder (maskvl.models.llama), with this family's special tokens.
        text = LlamaAdapter.tiny_config(
            tokenizer, num_layers=shape.get("num_layers", 3), num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
            hidden_size=hidden, model_type="llama", intermediate_size=shape.get("intermediate_size", 2 * hidden),
            initializer_range=init, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
            bos_token_id=ids[bos], eos_token_id=ids[eos], pad_token_id=ids[pad], tie_word_embeddings=tie)
        vision = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": shape.get("vision_depth", 2),
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
            "initializer_range": init,
        }
        try:
            config = getattr(transformers, cls.MODEL_CLASS.replace("ForConditionalGeneration", "Config"))(
                text_config=text, vision_config=vision, scale_factor=scale, image_token_id=ids["<image>"],
                tie_word_embeddings=tie, pad_token_id=ids[pad])
        except Exception as exc:  # the config classes validate the shape (huggingface_hub strict dataclasses)
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            reason = lines[-1].split(": ", 1)[-1] if lines else str(exc)
            raise InputError(f"invalid {family} shape: {reason}") from exc
        torch.manual_seed(seed)
        model = getattr(transformers, cls.MODEL_CLASS)(config).to(torch.float32).eval()
        model.generation_config.eos_token_id = [ids[eos]]
        model.generation_config.bos_token_id = ids[bos]
        model.generation_config.pad_token_id = ids[pad]
        preprocessor = {
            "image_processor_type": f"{cls.PROCESSOR_CLASS.replace('Processor', '')}ImageProcessor",
            "processor_class": cls.PROCESSOR_CLASS,
            "do_convert_rgb": True,
            "do_resize": True,
            "size": {"longest_edge": shape.get("longest_edge", 3 * image_size)},
            "resample": 1,  # LANCZOS
            "do_image_splitting": True,
            "max_image_size": {"longest_edge": shape.get("max_image_size", image_size)},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "do_pad": True,
        }
        seq_len = (image_size // patch) ** 2 // scale ** 2
        return write_hub_dir(directory, model, tokenizer, {
            "preprocessor_config.json": preprocessor,
            "processor_config.json": {"image_seq_len": seq_len, "processor_class": cls.PROCESSOR_CLASS},
        })

    # ----------------------------------------------------------------------------------- inputs
    def image_prompt(self, rows: int, cols: int) -> str:
        """The processor's text for one image split into ``rows x cols`` tiles (0 x 0: not split)."""
        sub = self.image_token * self.image_seq_len
        glob = f"{self.fake_token}{self.global_token}{sub}{self.fake_token}"
        if rows == 0 and cols == 0:
            return glob
        text = ""
        for r in range(rows):
            for c in range(cols):
                text += f"{self.fake_token}<row_{r + 1}_col_{c + 1}>{sub}"
            text += "\n"
        return text + "\n" + glob

    def _canvas(self, width: int, height: int, longest: int, tile: int, split: bool) -> tuple[int, int]:
        """The image processor's resized canvas ``(width, height)`` for an image of that size: the resize to
        ``longest`` (even short side, at most 4096), then up to multiples of the tile side (``split``), or
        the tile itself without splitting."""
        module = __import__(f"transformers.models.{self.PIL_PROCESSOR[0]}", fromlist=["_"])
        if not split:
            return tile, tile
        h, w = module._resize_output_size_rescale_to_max_len(height, width, max_len=longest)
        h, w = module._resize_output_size_scale_below_upper_bound(h, w, max_len=module.MAX_IMAGE_SIZE)
        # resize_for_vision_encoder
        aspect = w / h
        if w >= h:
            w = math.ceil(w / tile) * tile
            h = math.ceil(int(w / aspect) / tile) * tile
        else:
            h = math.ceil(h / tile) * tile
            w = math.ceil(int(h * aspect) / tile) * tile
        return w, h

    def prepare(self, prompt: str, images: list[Any], image_paths: list[str | None],
                max_pixels: int | None = None) -> Prepared:
        """Chat-template the prompt with its images, run the image processor, expand each ``<image>`` into
        the processor's tiles-and-global text, and tokenize.

        ``max_pixels`` lowers the processor's resize (``size["longest_edge"]``) to the largest multiple of
        the tile side whose square is at most ``max_pixels`` (at least one tile).
        """
        text = self._chat_text(prompt, len(images))
        if text.count(self.image_token) != len(images):
            raise InputError(f"the prompt has {text.count(self.image_token)} {self.image_token} tokens for "
                             f"{len(images)} images")
        model_inputs: dict[str, Any] = {}
        layout: list[tuple[int, int, tuple[int, int]]] = []
        if images:
            ip = self.image_processor
            longest = int(dict(ip.size)["longest_edge"])
            tile = int(dict(ip.max_image_size)["longest_edge"])
            kwargs: dict[str, Any] = {"return_tensors": "pt", "return_row_col_info": True}
            if max_pixels is not None:
                longest = min(longest, max(tile, math.isqrt(int(max_pixels)) // tile * tile))
                kwargs["size"] = {"longest_edge": longest}
            out = ip(images=images, **kwargs)
            rows, cols = out["rows"][0], out["cols"][0]
            split = bool(ip.do_image_splitting)
            for img, r, c in zip(images, rows, cols):
                canvas = self._canvas(img.size[0], img.size[1], longest, tile, split)
                want = (canvas[1] // tile, canvas[0] // tile) if canvas != (tile, tile) else (0, 0)
                if (r, c) != want:
                    raise InputError(f"the image processor split a {img.size[0]}x{img.size[1]} image into {r}x{c} "
                                     f"tiles; expected {want[0]}x{want[1]} from a {canvas[0]}x{canvas[1]} canvas")
                layout.append((int(r), int(c), canvas))
            pieces = text.split(self.image_token)
            text = pieces[0] + "".join(self.image_prompt(r, c) + pieces[i + 1] for i, (r, c, _) in enumerate(layout))
            model_inputs["pixel_values"] = out["pixel_values"].to(self.device, self.dtype)
            if "pixel_attention_mask" in out:
                model_inputs["pixel_attention_mask"] = out["pixel_attention_mask"].to(self.device)
        # As the processor: no special tokens added when the template already starts with BOS.
        bos = getattr(self.tokenizer, "bos_token", None)
        add = not (bos is not None and text.startswith(bos))
        ids = self.tokenizer(text, add_special_tokens=add, return_tensors="pt")["input_ids"]
        input_ids = ids.to(self.device)
        is_image = torch.zeros(input_ids.shape[1], dtype=torch.bool)
        infos = self._grids(input_ids[0].tolist(), images, image_paths, layout, is_image) if images else []
        return Prepared(input_ids=input_ids, model_inputs=model_inputs, is_image=is_image, images=infos,
                        prompt_text=text)

    def _grids(self, ids: list[int], images: list[Any], image_paths: list[str | None],
               layout: list[tuple[int, int, tuple[int, int]]], is_image: torch.Tensor) -> list[ImageInfo]:
        """Each image's grids from the token ids: its runs of ``<image>`` in order, each checked against the
        marker before it (``<row_i_col_j>`` or ``<global-img>``), marked image-kind in ``is_image``."""
        tok = self.tokenizer.convert_tokens_to_ids
        fake, glob = tok(self.fake_token), tok(self.global_token)
        runs: list[int] = []
        i = 0
        while i < len(ids):
            if ids[i] == self.image_token_id:
                j = i
                while j < len(ids) and ids[j] == self.image_token_id:
                    j += 1
                if (j - i) % self.image_seq_len:
                    raise InputError(f"a run of {j - i} {self.image_token} tokens at {i} is not a multiple of "
                                     f"image_seq_len {self.image_seq_len}")
                runs.extend(range(i, j, self.image_seq_len))
                i = j
            else:
                i += 1
        infos: list[ImageInfo] = []
        k = 0
        s = self.side
        for n, (img, (rows, cols, (cw, ch))) in enumerate(zip(images, layout)):
            W, H = img.size
            sx, sy = W / cw, H / ch
            tile = cw // max(cols, 1)
            grids: list[GridInfo] = []
            for r in range(rows):
                for c in range(cols):
                    start = runs[k]
                    k += 1
                    if ids[start - 1] != tok(f"<row_{r + 1}_col_{c + 1}>") or ids[start - 2] != fake:
                        raise InputError(f"tile ({r + 1}, {c + 1}) of image {n + 1} is not where the processor puts it")
                    box = (c * tile * sx, r * tile * sy, (c + 1) * tile * sx, (r + 1) * tile * sy)
                    grids.append(GridInfo(s, s, start, box, "tile"))
            start = runs[k]
            k += 1
            if ids[start - 1] != glob or ids[start - 2] != fake or ids[start + self.image_seq_len] != fake:
                raise InputError(f"the global image of image {n + 1} is not where the processor puts it")
            grids.append(GridInfo(s, s, start, (0.0, 0.0, float(W), float(H)), "thumbnail" if rows else "image"))
            for g in grids:
                is_image[g.token_start:g.token_start + self.image_seq_len] = True
            infos.append(ImageInfo(
                index=n, path=image_paths[n] if n < len(image_paths) else None,
                grid_rows=grids[0].rows, grid_cols=grids[0].cols,
                token_start=grids[0].token_start - 2, token_end=start + self.image_seq_len + 1,
                original_size=(W, H), resized_size=(cw, ch), grids=grids))
        if k != len(runs):
            raise InputError(f"the prompt has {len(runs) - k} more {self.image_token} blocks than its images")
        return infos


@register
class SmolVLMAdapter(Idefics3Adapter):
    """Adapter over a loaded ``SmolVLMForConditionalGeneration``: Idefics3's architecture and layout, SmolVLM's
    tokens and chat template."""

    MODEL_TYPES = ("smolvlm",)
    MODEL_CLASS: ClassVar[str] = "SmolVLMForConditionalGeneration"
    FAMILY: ClassVar[str] = "SmolVLM"
    PIL_PROCESSOR: ClassVar[tuple[str, str]] = ("smolvlm.image_processing_pil_smolvlm", "SmolVLMImageProcessorPil")
    PROCESSOR_CLASS: ClassVar[str] = "SmolVLMProcessor"

    def _marker_strings(self, tokenizer: Any) -> tuple[str, str, str]:
        """SmolVLMProcessor reads the markers from the tokenizer's attributes, with these defaults."""
        return (getattr(tokenizer, "fake_image_token", None) or "<fake_token_around_image>",
                getattr(tokenizer, "image_token", None) or "<image>",
                getattr(tokenizer, "global_image_token", None) or "<global-img>")
