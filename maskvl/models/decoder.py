"""What transformers decoders have in common, implemented once for the family adapters.

A transformers decoder keeps its blocks in ``language_model.layers``, each with ``input_layernorm``,
``self_attn`` (``q_proj``/``k_proj``/``v_proj``/``o_proj``, optional per-head ``q_norm``/``k_norm``),
``post_attention_layernorm`` and ``mlp``; it caches keys after norm and RoPE in a ``DynamicCache`` and
hands every layer the rotary ``position_embeddings``. :class:`TransformersDecoderAdapter` captures the
clean pass with hooks on those modules (so every captured number is the model's own arithmetic) and
replays single positions with the same modules. A family subclasses it, says where its language model
and LM head are, and implements input preparation (``prepare``) and anything its layers do differently.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, ClassVar

import torch

from ..errors import InputError
from .base import AttendFn, Capture, ModelAdapter, Prepared


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's rotate_half, the same arithmetic as transformers' (``cat(-x2, x1)``)."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class TransformersDecoderAdapter(ModelAdapter):
    """The common part of the adapters over transformers decoders.

    Subclasses call :meth:`_setup` from ``__init__`` with the language model (the module holding
    ``layers`` and ``norm``), the LM head and the text config.
    """

    #: Tokens that end a chat turn in addition to the config's EOS ids (looked up in the vocabulary).
    STOP_TOKENS: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>")

    def _setup(self, model: Any, tokenizer: Any, model_id: str, text_model: Any, lm_head: Any,
               text_config: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.text_model = text_model
        self.lm_head = lm_head
        self.text_config = text_config
        self.layers = list(text_model.layers)
        self.num_layers = len(self.layers)
        self.num_heads = text_config.num_attention_heads
        self.num_kv_heads = text_config.num_key_value_heads
        self.head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // self.num_heads
        self.hidden_size = text_config.hidden_size
        self.vocab_size = text_config.vocab_size
        self.max_positions = getattr(text_config, "max_position_embeddings", None)
        # The first softmax-attention layer (Qwen3.5 starts with linear-attention layers).
        self.scale = next(lay.self_attn.scaling for lay in self.layers if getattr(lay, "self_attn", None) is not None)
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device

    # ------------------------------------------------------------------------------ tokens
    def token_texts(self, ids: list[int]) -> list[str]:
        return self.tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                           clean_up_tokenization_spaces=False)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def stop_token_ids(self) -> set[int]:
        stops: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config, self.text_config):
            eos = getattr(src, "eos_token_id", None) if src is not None else None
            if isinstance(eos, int):
                stops.add(eos)
            elif isinstance(eos, (list, tuple)):
                stops.update(int(e) for e in eos)
        for tok in self.STOP_TOKENS:
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != getattr(self.tokenizer, "unk_token_id", None):
                stops.add(tid)
        return stops

    # -------------------------------------------------------------------------- clean pass
    def new_cache(self) -> Any:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        cache = DynamicCache(config=self.text_config)
        # A sliding-window cache layer drops keys that left the window; the engine reads every
        # position's key (kv), so those layers keep them all. The model's own attention mask still
        # applies the window (it is built from the config, not from the cache's length).
        for i, lay in enumerate(cache.layers):
            if isinstance(lay, DynamicSlidingWindowLayer):
                cache.layers[i] = DynamicLayer()
        return cache

    def _forward_capture(self, **kwargs: Any) -> Capture:
        """The model's own forward with hooks reading each layer's input, query and rotary tables."""
        n = self.num_layers
        xs: list[torch.Tensor | None] = [None] * n
        qs: list[torch.Tensor | None] = [None] * n
        rope: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n
        handles = []
        H, D = self.num_heads, self.head_dim

        def layer_pre(i):
            def hook(module, args, kw):
                h = args[0] if args else kw["hidden_states"]
                xs[i] = h[0, -1].detach().clone()
                cos, sin = self._rope_table(*kw["position_embeddings"])
                rope[i] = (cos[0, -1].detach().clone(), sin[0, -1].detach().clone())
            return hook

        def q_post(i):
            def hook(module, args, out):
                # The query before RoPE: q_norm's output where the model has one, else q_proj's.
                qs[i] = self._final_query(out).detach().reshape(H, D).clone()
            return hook

        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(layer_pre(i), with_kwargs=True))
            at = getattr(layer, "self_attn", None)
            if at is None:  # a linear-attention layer: no query (the family's adapter reads its inputs)
                continue
            q_module = getattr(at, "q_norm", None) or at.q_proj
            handles.append(q_module.register_forward_hook(q_post(i)))
        try:
            with torch.no_grad():
                out = self.model(**kwargs, use_cache=True, logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()
        # The model's apply_rotary_pos_emb on the final row.
        q_rot = [None if q is None else self._apply_rope(q, cos, sin) for q, (cos, sin) in zip(qs, rope)]
        same = all(torch.equal(c, rope[0][0]) and torch.equal(s_, rope[0][1]) for c, s_ in rope)
        return Capture(x=xs, q=q_rot, logits=out.logits[0, -1].detach(), rope=rope[0],
                       layer_rope=None if same else rope)

    def _apply_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE as the model applies it, ``x * cos + rotate_half(x) * sin`` over the last dim; a family with
        partial rotary embeddings (tables narrower than the head) overrides this."""
        return x * cos + rotate_half(x) * sin

    def _rope_table(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's rotary tables as ``x * cos + rotate_half(x) * sin`` uses them, ``[..., D]``; a family
        whose model hands over half-width tables overrides this."""
        return cos, sin

    def _final_query(self, out: torch.Tensor) -> torch.Tensor:
        """The final position's row of the hooked query module's output (``[1, S, H * D]`` or
        ``[1, S, H, D]``; a family whose q_norm runs after the heads are moved first overrides this)."""
        return out[0, -1]

    def prefill(self, prepared: Prepared, cache: Any) -> Capture:
        return self._forward_capture(input_ids=prepared.input_ids, past_key_values=cache, **prepared.model_inputs)

    def decode(self, token_id: int, cache: Any) -> Capture:
        ids = torch.tensor([[token_id]], device=self.device)
        return self._forward_capture(input_ids=ids, past_key_values=cache)

    def kv(self, cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        lay = cache.layers[layer]
        return lay.keys[0].transpose(0, 1), lay.values[0].transpose(0, 1)

    def _full_inputs(self, prepared: Prepared, generated: list[int]) -> tuple[torch.Tensor, dict[str, Any]]:
        """``input_ids [1, S + len(generated)]`` and the other forward inputs for a cache-less forward."""
        ids = prepared.input_ids
        if generated:
            extra = torch.tensor([generated], device=ids.device, dtype=ids.dtype)
            ids = torch.cat([ids, extra], dim=1)
        return ids, dict(prepared.model_inputs)

    def forward_full(self, prepared: Prepared, generated: list[int]) -> torch.Tensor:
        ids, inputs = self._full_inputs(prepared, generated)
        with torch.no_grad():
            out = self.model(input_ids=ids, use_cache=False, logits_to_keep=1, **inputs)
        return out.logits[0, -1]

    def decoder_layer(self, layer: int) -> torch.nn.Module:
        return self.layers[layer]

    def o_proj(self, layer: int) -> torch.nn.Module:
        return self.layers[layer].self_attn.o_proj

    def attention_config(self) -> Any:
        return self.text_model.config

    # --------------------------------------------------------------------- replayed pieces
    def o_proj_weight(self, layer: int) -> torch.Tensor:
        return self.layers[layer].self_attn.o_proj.weight

    def o_proj_bias(self, layer: int) -> torch.Tensor | None:
        return self.layers[layer].self_attn.o_proj.bias

    # Parameters cast to the compute dtype, kept while they are reused (the MLP and the replayed layer
    # run once per row chunk). Bounded in bytes: a copy of every layer (or of a 150k-row LM head) would
    # cost gigabytes at 4B; see _linear_out_chunked for the modules too large to cache.
    CAST_CACHE_BYTES = 512 * 2**20

    def _cast_params(self, module: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        cache: OrderedDict = self.__dict__.setdefault("_cast_cache", OrderedDict())
        key = (id(module), dtype)
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return hit[0]
        params = {n: p.to(dtype) for n, p in module.named_parameters()}
        size = sum(p.numel() * p.element_size() for p in params.values())
        if size <= self.CAST_CACHE_BYTES:
            cache[key] = (params, size)
            while sum(v[1] for v in cache.values()) > self.CAST_CACHE_BYTES:
                cache.popitem(last=False)
        return params

    def _run(self, module: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Run ``module`` on ``x`` with its parameters in ``dtype`` (no copy when they already are)."""
        if all(p.dtype == dtype for p in module.parameters()):
            return module(x.to(dtype))
        return torch.func.functional_call(module, self._cast_params(module, dtype), (x.to(dtype),))

    @staticmethod
    def _linear_out_chunked(linear: torch.nn.Linear, x: torch.Tensor, dtype: torch.dtype,
                            max_bytes: int = 64 * 2**20) -> torch.Tensor:
        """``linear(x)`` in ``dtype`` for a large Linear (the LM head), casting its weight in blocks of
        output rows of at most ``max_bytes`` instead of a whole copy. ``x [B, in]`` -> ``[B, out]``."""
        w, b = linear.weight, linear.bias
        x = x.to(dtype)
        if w.dtype == dtype:
            return torch.nn.functional.linear(x, w, b)
        rows = max(1, max_bytes // (w.shape[1] * torch.tensor([], dtype=dtype).element_size()))
        out = x.new_empty((x.shape[0], w.shape[0]))
        for i in range(0, w.shape[0], rows):
            out[:, i:i + rows] = x @ w[i:i + rows].to(dtype).T
        if b is not None:
            out += b.to(dtype)
        return out

    def post_attention(self, layer: int, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        lay = self.layers[layer]
        return self._run(lay.mlp, self._run(lay.post_attention_layernorm, h, dtype), dtype)

    def input_norm(self, layer: int, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The norm before attention of residual rows ``h [B, d_model]`` (a family without one overrides)."""
        return self._run(self.layers[layer].input_layernorm, h, dtype)

    def _project_qkv(self, layer: int, x: torch.Tensor, dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q [B, H, D]``, ``k, v [B, KV, D]`` of normed rows ``x [B, d_model]``, before RoPE."""
        at = self.layers[layer].self_attn
        B = x.shape[0]
        q = self._run(at.q_proj, x, dtype).view(B, self.num_heads, self.head_dim)
        k = self._run(at.k_proj, x, dtype).view(B, self.num_kv_heads, self.head_dim)
        if getattr(at, "q_norm", None) is not None:
            q = self._run(at.q_norm, q, dtype)
        if getattr(at, "k_norm", None) is not None:
            k = self._run(at.k_norm, k, dtype)
        v = self._run(at.v_proj, x, dtype).view(B, self.num_kv_heads, self.head_dim)
        return q, k, v

    def replay_layer(self, layer: int, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                     k_prefix: torch.Tensor, v_prefix: torch.Tensor, exclude: torch.Tensor,
                     attend: AttendFn, dtype: torch.dtype) -> torch.Tensor:
        # The decoder layer's forward for one position per row, with the KV cache's prefix shared by
        # all rows: input norm, q/k/v projections, per-head q/k norms, RoPE, attention, o_proj,
        # (norm after attention), residual, the MLP branch, residual.
        lay = self.layers[layer]
        B = h.shape[0]
        q, k, v = self._project_qkv(layer, self.input_norm(layer, h, dtype), dtype)
        cos, sin = (t.to(dtype) for t in rope)
        q = self._apply_rope(q, cos, sin)
        k = self._apply_rope(k, cos, sin)
        o = attend(q, k_prefix, v_prefix, k, v, self.scale, exclude).to(dtype)
        attn = self._run(lay.self_attn.o_proj, o.reshape(B, -1), dtype)
        if self.has_attention_norm:
            attn = self.attention_norm(layer, attn, dtype)
        h = h.to(dtype) + attn
        return h + self.post_attention(layer, h, dtype)

    def final_logits(self, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._linear_out_chunked(self.lm_head, self._run(self.text_model.norm, h, dtype), dtype)


class VisionDecoderAdapter(TransformersDecoderAdapter):
    """The common part of the vision-language adapters: a family's ``__init__`` takes
    ``(model, tokenizer, image_processor, model_id)`` and :attr:`FAMILY` names it in messages."""

    supports_images = True
    FAMILY: ClassVar[str] = ""

    def _chat_text(self, prompt: str, num_images: int) -> str:
        """The chat template's text of one user turn: ``num_images`` image parts, then ``prompt``, then the
        assistant's turn opened (the family then expands each image's placeholder)."""
        content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": prompt})
        try:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True, tokenize=False)
        except Exception as exc:
            raise InputError(f"the tokenizer's chat template failed: {exc}") from exc

    @classmethod
    def from_loaded(cls, model: Any, tokenizer: Any, image_processor: Any = None,
                    model_id: str | None = None) -> "VisionDecoderAdapter":
        if tokenizer is None or image_processor is None:
            raise InputError(f"pass tokenizer= and image_processor= with an already-loaded {cls.FAMILY} model")
        return cls(model, tokenizer, image_processor,  # type: ignore[call-arg]
                   model_id or getattr(model, "name_or_path", None) or "model")
