"""Qwen3-VL through Hugging Face transformers' ``Qwen3VLForConditionalGeneration``.

Everything Qwen-specific lives here: chat template and image-pad expansion, the image processor (with
the PIL fallback when torchvision is missing), the clean forwards and what they capture, and the
per-layer pieces the engine replays. The clean pass is the model's own forward, so image features,
3D MRoPE positions, DeepStack additions, the causal mask and the q/k norms are exactly the model's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import InputError
from .base import Capture, ImageInfo, Prepared
from .decoder import VisionDecoderAdapter
from .loading import load_image_processor, load_pretrained, load_tokenizer
from .registry import register
from .tiny import write_tiny_model


@register
class Qwen3VLAdapter(VisionDecoderAdapter):
    """Adapter over a loaded ``Qwen3VLForConditionalGeneration`` and its tokenizer/image processor."""

    MODEL_TYPES = ("qwen3_vl",)
    #: The transformers class that loads the checkpoint, and the family's name in messages (the sibling
    #: Qwen VL families subclass this adapter and name theirs).
    MODEL_CLASS: ClassVar[str] = "Qwen3VLForConditionalGeneration"
    FAMILY: ClassVar[str] = "Qwen3-VL"

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, model_id: str):
        cfg = model.config
        self._setup(model, tokenizer, model_id, model.model.language_model, model.lm_head, cfg.text_config)
        self.image_processor = image_processor
        self.image_token_id = cfg.image_token_id
        self.merge_size = cfg.vision_config.spatial_merge_size
        self.patch_size = cfg.vision_config.patch_size

    @classmethod
    def load(cls, path: str, model_id: str, dtype: torch.dtype, device: torch.device,
             verbose: bool = False) -> "Qwen3VLAdapter":
        """Load model, tokenizer and image processor from a local directory or a hub id."""
        # The family's modeling code is imported only when the family is used.
        import transformers
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        model = load_pretrained(getattr(transformers, cls.MODEL_CLASS), path, model_id, dtype, device,
                                attn_implementation="sdpa", **cls._from_pretrained_options(dtype))
        tokenizer = load_tokenizer(path, model_id)
        # The hub names the Fast class (torchvision); without torchvision, the PIL class with its settings.
        image_processor = load_image_processor(path, model_id, Qwen2VLImageProcessorPil, verbose, auto_first=True)
        return cls(model, tokenizer, image_processor, model_id)

    @classmethod
    def _from_pretrained_options(cls, dtype: torch.dtype) -> dict[str, Any]:
        """Extra ``from_pretrained`` keywords for this family (none for Qwen3-VL)."""
        return {}

    @classmethod
    def write_tiny_model(cls, directory: str | os.PathLike, seed: int = 0, **shape: Any) -> Path:
        if shape.get("head_dim", 16) % 8:
            raise InputError("head_dim must be a multiple of 8 (MRoPE sections)")
        shape.setdefault("deepstack", tuple(range(min(3, shape.get("num_layers", 4)))))
        return write_tiny_model(directory, seed=seed, **shape)

    # ----------------------------------------------------------------------------------- inputs
    def prepare(self, prompt: str, images: list[Any], image_paths: list[str | None],
                max_pixels: int | None = None) -> Prepared:
        """Chat-template the prompt with its images, run the image processor, expand the image pads.

        Returns a :class:`Prepared` with ``input_ids [1, S]`` and the model's multimodal inputs.
        """
        text = self._chat_text(prompt, len(images))
        pad = "<|image_pad|>"
        model_inputs: dict[str, Any] = {}
        infos: list[ImageInfo] = []
        if images:
            kwargs: dict[str, Any] = {"return_tensors": "pt"}
            if max_pixels is not None:
                size = dict(getattr(self.image_processor, "size", {}) or {})
                size["longest_edge"] = int(max_pixels)
                size.setdefault("shortest_edge", min(56 * 56, int(max_pixels)))
                size["shortest_edge"] = min(size["shortest_edge"], int(max_pixels))
                kwargs["size"] = size
            out = self.image_processor(images=images, **kwargs)
            grid = out["image_grid_thw"]
            if text.count(pad) != len(images):
                raise InputError(f"the chat template produced {text.count(pad)} image slots for {len(images)} images")
            pieces = text.split(pad)
            merged = [int(g.prod()) // self.merge_size**2 for g in grid]
            text = pieces[0] + "".join(pad * n + pieces[i + 1] for i, n in enumerate(merged))
            model_inputs["pixel_values"] = out["pixel_values"].to(self.device, self.dtype)
            model_inputs["image_grid_thw"] = grid.to(self.device)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        input_ids = ids.to(self.device)
        is_image = (input_ids[0] == self.image_token_id).cpu()
        if images:
            model_inputs["mm_token_type_ids"] = (input_ids == self.image_token_id).to(torch.int32)
            # Image pads come in one contiguous run per image, in prompt order.
            pos = torch.nonzero(is_image).flatten().tolist()
            start = 0
            for i, (img, g) in enumerate(zip(images, model_inputs["image_grid_thw"].tolist())):
                _, gh, gw = g
                n = gh * gw // self.merge_size**2
                token_start = pos[start]
                if pos[start + n - 1] != token_start + n - 1:
                    raise InputError(f"image pad tokens are not contiguous; the chat template is not {self.FAMILY}'s")
                infos.append(ImageInfo(
                    index=i, path=image_paths[i] if i < len(image_paths) else None,
                    grid_rows=gh // self.merge_size, grid_cols=gw // self.merge_size,
                    token_start=token_start, token_end=token_start + n,
                    original_size=tuple(img.size), resized_size=(gw * self.patch_size, gh * self.patch_size),
                ))
                start += n
        return Prepared(input_ids=input_ids, model_inputs=model_inputs, is_image=is_image, images=infos,
                        prompt_text=text)

    def prefill(self, prepared: Prepared, cache) -> Capture:
        # rope_deltas is state the model keeps between calls; a stale value from an earlier prompt
        # would shift this one's decode positions.
        self.model.model.rope_deltas = None
        return self._forward_capture(input_ids=prepared.input_ids, past_key_values=cache, **prepared.model_inputs)

    def _full_inputs(self, prepared: Prepared, generated: list[int]) -> tuple[torch.Tensor, dict[str, Any]]:
        ids, inputs = super()._full_inputs(prepared, generated)
        if "mm_token_type_ids" in inputs:
            tt = inputs["mm_token_type_ids"]
            inputs["mm_token_type_ids"] = torch.cat([tt, tt.new_zeros((1, ids.shape[1] - tt.shape[1]))], dim=1)
        # A fresh forward recomputes the MRoPE offset (see prefill).
        self.model.model.rope_deltas = None
        return ids, inputs

