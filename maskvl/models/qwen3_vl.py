"""Qwen3-VL through Hugging Face transformers' ``Qwen3VLForConditionalGeneration``.

Everything Qwen-specific lives here: chat template and image-pad expansion, the image processor (with
the PIL fallback when torchvision is missing), the clean forwards and what they capture, and the
per-layer pieces the engine replays. The clean pass is the model's own forward, so image features,
3D MRoPE positions, DeepStack additions, the causal mask and the q/k norms are exactly the model's.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, ModelLoadError
from .base import Capture, ImageInfo, ModelAdapter, Prepared

log = logging.getLogger("maskvl")

MODEL_TYPES = ("qwen3_vl",)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    # The model's own rotate_half, so the replayed RoPE is the model's arithmetic.
    from transformers.models.qwen3_vl.modeling_qwen3_vl import rotate_half

    return rotate_half(x)


def _load_image_processor(path: str, verbose: bool):
    """The checkpoint's image processor; the PIL implementation with the same settings without torchvision."""
    from transformers import AutoImageProcessor

    named = None
    cfg_file = Path(path) / "preprocessor_config.json" if os.path.isdir(path) else None
    if cfg_file is not None and cfg_file.exists():
        named = json.loads(cfg_file.read_text()).get("image_processor_type")
    try:
        proc = AutoImageProcessor.from_pretrained(path)
    except Exception as exc:  # e.g. a transformers that insists on torchvision for the Fast class
        if cfg_file is None or not cfg_file.exists():
            raise ModelLoadError(f"cannot load the image processor of {path}: {exc}") from exc
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        settings = json.loads(cfg_file.read_text())
        settings = {k: v for k, v in settings.items() if k not in ("image_processor_type", "processor_class")}
        proc = Qwen2VLImageProcessorPil(**settings)
        if verbose:
            log.info("image processor %s unavailable (%s); using Qwen2VLImageProcessorPil with the same settings",
                     named, exc)
        return proc
    if verbose and named and type(proc).__name__ != named:
        log.info("image processor %s needs torchvision; using %s with the same settings", named, type(proc).__name__)
    return proc


class Qwen3VLAdapter(ModelAdapter):
    """Adapter over a loaded ``Qwen3VLForConditionalGeneration`` and its tokenizer/image processor."""

    def __init__(self, model, tokenizer, image_processor, model_id: str):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_id = model_id
        cfg = model.config
        tc = cfg.text_config
        self.text_model = model.model.language_model
        self.layers = list(self.text_model.layers)
        self.num_layers = len(self.layers)
        self.num_heads = tc.num_attention_heads
        self.num_kv_heads = tc.num_key_value_heads
        self.head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        self.hidden_size = tc.hidden_size
        self.vocab_size = tc.vocab_size
        self.max_positions = getattr(tc, "max_position_embeddings", None)
        self.scale = self.layers[0].self_attn.scaling
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.image_token_id = cfg.image_token_id
        self.merge_size = cfg.vision_config.spatial_merge_size
        self.patch_size = cfg.vision_config.patch_size

    # ----------------------------------------------------------------------------------- inputs
    def prepare(self, prompt: str, images: list[Any], image_paths: list[str | None],
                max_pixels: int | None = None) -> Prepared:
        """Chat-template the prompt with its images, run the image processor, expand the image pads.

        Returns a :class:`Prepared` with ``input_ids [1, S]`` and the model's multimodal inputs.
        """
        content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
        content.append({"type": "text", "text": prompt})
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:
            raise InputError(f"the tokenizer's chat template failed: {exc}") from exc
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
                    raise InputError("image pad tokens are not contiguous; the chat template is not Qwen3-VL's")
                infos.append(ImageInfo(
                    index=i, path=image_paths[i] if i < len(image_paths) else None,
                    grid_rows=gh // self.merge_size, grid_cols=gw // self.merge_size,
                    token_start=token_start, token_end=token_start + n,
                    original_size=tuple(img.size), resized_size=(gw * self.patch_size, gh * self.patch_size),
                ))
                start += n
        return Prepared(input_ids=input_ids, model_inputs=model_inputs, is_image=is_image, images=infos,
                        prompt_text=text)

    def token_texts(self, ids: list[int]) -> list[str]:
        return self.tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                           clean_up_tokenization_spaces=False)

    def stop_token_ids(self) -> set[int]:
        stops: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config,
                    self.model.config.text_config):
            eos = getattr(src, "eos_token_id", None) if src is not None else None
            if isinstance(eos, int):
                stops.add(eos)
            elif isinstance(eos, (list, tuple)):
                stops.update(int(e) for e in eos)
        for tok in ("<|im_end|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != getattr(self.tokenizer, "unk_token_id", None):
                stops.add(tid)
        return stops

    # ----------------------------------------------------------------------------- clean pass
    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config.text_config)

    def _forward_capture(self, **kwargs: Any) -> Capture:
        n = self.num_layers
        xs: list[torch.Tensor | None] = [None] * n
        qs: list[torch.Tensor | None] = [None] * n
        rope: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n
        handles = []

        def layer_pre(i):
            def hook(module, args, kw):
                h = args[0] if args else kw["hidden_states"]
                xs[i] = h[0, -1].detach().clone()
                cos, sin = kw["position_embeddings"]
                rope[i] = (cos[0, -1].detach().clone(), sin[0, -1].detach().clone())
            return hook

        def q_post(i):
            def hook(module, args, out):
                qs[i] = out[0, -1].detach().clone()  # [H, D], after q_norm, before RoPE
            return hook

        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(layer_pre(i), with_kwargs=True))
            handles.append(layer.self_attn.q_norm.register_forward_hook(q_post(i)))
        try:
            with torch.no_grad():
                out = self.model(**kwargs, use_cache=True, logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()
        q_rot = []
        for q, (cos, sin) in zip(qs, rope):
            # The model's apply_rotary_pos_emb on the final row: q * cos + rotate_half(q) * sin.
            q_rot.append((q * cos) + (_rotate_half(q) * sin))
        return Capture(x=xs, q=q_rot, logits=out.logits[0, -1].detach(), rope=rope[0])

    def prefill(self, prepared: Prepared, cache) -> Capture:
        # rope_deltas is state the model keeps between calls; a stale value from an earlier prompt
        # would shift this one's decode positions.
        self.model.model.rope_deltas = None
        return self._forward_capture(input_ids=prepared.input_ids, past_key_values=cache, **prepared.model_inputs)

    def decode(self, token_id: int, cache) -> Capture:
        ids = torch.tensor([[token_id]], device=self.device)
        return self._forward_capture(input_ids=ids, past_key_values=cache)

    def kv(self, cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        lay = cache.layers[layer]
        return lay.keys[0].transpose(0, 1), lay.values[0].transpose(0, 1)

    def forward_full(self, prepared: Prepared, generated: list[int]) -> torch.Tensor:
        """A fresh, cache-less forward of prompt + ``generated``; returns the final logits ``[V]``.

        The brute-force reference uses this: no state is shared with the engine's cached pass.
        """
        ids = prepared.input_ids
        inputs = dict(prepared.model_inputs)
        if generated:
            extra = torch.tensor([generated], device=ids.device, dtype=ids.dtype)
            ids = torch.cat([ids, extra], dim=1)
            if "mm_token_type_ids" in inputs:
                tt = inputs["mm_token_type_ids"]
                inputs["mm_token_type_ids"] = torch.cat([tt, torch.zeros_like(extra, dtype=tt.dtype)], dim=1)
        self.model.model.rope_deltas = None
        with torch.no_grad():
            out = self.model(input_ids=ids, use_cache=False, logits_to_keep=1, **inputs)
        return out.logits[0, -1]

    def decoder_layer(self, layer: int) -> torch.nn.Module:
        return self.layers[layer]

    def o_proj(self, layer: int) -> torch.nn.Module:
        return self.layers[layer].self_attn.o_proj

    def attention_config(self):
        """The config object whose ``_attn_implementation`` the decoder's attention modules read."""
        return self.text_model.config

    # ------------------------------------------------------------------------ replayed pieces
    def o_proj_weight(self, layer: int) -> torch.Tensor:
        return self.layers[layer].self_attn.o_proj.weight

    @staticmethod
    def _run(module: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Run ``module`` on ``x`` with its parameters in ``dtype`` (no copy when they already are)."""
        if all(p.dtype == dtype for p in module.parameters()):
            return module(x.to(dtype))
        params = {n: p.to(dtype) for n, p in module.named_parameters()}
        return torch.func.functional_call(module, params, (x.to(dtype),))

    def post_attention(self, layer: int, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        lay = self.layers[layer]
        return self._run(lay.mlp, self._run(lay.post_attention_layernorm, h, dtype), dtype)

    def replay_layer(self, layer: int, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                     k_prefix: torch.Tensor, v_prefix: torch.Tensor, exclude: torch.Tensor,
                     attend: Any, dtype: torch.dtype) -> torch.Tensor:
        # Qwen3VLTextDecoderLayer.forward for one position per row, with the KV cache's prefix shared
        # by all rows: input norm, q/k/v projections, per-head q/k RMSNorm, MRoPE, attention, o_proj,
        # residual, post-attention norm, MLP, residual.
        lay = self.layers[layer]
        at = lay.self_attn
        B = h.shape[0]
        x = self._run(lay.input_layernorm, h, dtype)
        q = self._run(at.q_norm, self._run(at.q_proj, x, dtype).view(B, self.num_heads, self.head_dim), dtype)
        k = self._run(at.k_norm, self._run(at.k_proj, x, dtype).view(B, self.num_kv_heads, self.head_dim), dtype)
        v = self._run(at.v_proj, x, dtype).view(B, self.num_kv_heads, self.head_dim)
        cos, sin = (t.to(dtype) for t in rope)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        o = attend(q, k_prefix, v_prefix, k, v, self.scale, exclude).to(dtype)
        h = h.to(dtype) + self._run(at.o_proj, o.reshape(B, -1), dtype)
        return h + self.post_attention(layer, h, dtype)

    def final_logits(self, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._run(self.model.lm_head, self._run(self.text_model.norm, h, dtype), dtype)


def load_qwen3_vl(path: str, model_id: str, dtype: torch.dtype, device: torch.device,
                  verbose: bool = False) -> Qwen3VLAdapter:
    """Load model, tokenizer and image processor from a local directory or a hub id."""
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    try:
        model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except OSError as exc:
        raise ModelLoadError(f"cannot load model {model_id!r}: {str(exc).splitlines()[0]}") from exc
    model = model.to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {model_id!r}: {str(exc).splitlines()[0]}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"the tokenizer of {model_id!r} has no chat template")
    image_processor = _load_image_processor(path, verbose)
    return Qwen3VLAdapter(model, tokenizer, image_processor, model_id)
