"""Qwen3.5 (dense and MoE) through transformers' ``Qwen3_5ForConditionalGeneration`` and
``Qwen3_5MoeForConditionalGeneration``.

Qwen3.5 is natively multimodal and hybrid: of every four decoder layers three are Gated DeltaNet
linear attention (``layer_types`` ``linear_attention``) and one is softmax attention (``full_attention``).
Its inputs, vision tower and 3D MRoPE are Qwen3-VL's (without DeepStack), so the adapter is
:class:`~maskvl.models.qwen3_vl.Qwen3VLAdapter` with these differences:

* full-attention layers: ``q_proj`` gives each head its query and an output gate; the attention output is
  multiplied by ``sigmoid(gate)`` before o_proj. The gate comes from the final position's own input, so
  removing a key leaves it alone: the engine scales the clean output and every delta by the captured gate
  (``Capture.gate``), and ``Attn`` / ``Head_N`` are o_proj of the gated output. Rotary embeddings cover
  only the first ``partial_rotary_factor`` of each head (``_apply_rope``);
* linear-attention layers (``layer_kind`` ``"linear"``): knocking out position p skips p's write to the
  recurrent state (``g_p = 0``, ``beta_p = 0``) for the final position's readout only, computed for every
  p at once by ``maskvl.ops.gated_delta_knockout``; then the gated norm and out_proj (``Attn``), each value
  head's share (``Head_N``, ``Hv`` heads), the MLP (``Full``). The clean pass records the layer's own
  in_proj outputs (``linear_state`` rebuilds the rule's inputs from them); Logits rows take their own
  single step on the shared clean conv tail and state (``replay_linear``); a group run skips every write
  of a group together (``maskvl.ops.gated_delta_group_knockout``);
* float64 models: transformers runs the rule, ``g`` and the gated norm in float32 whatever the dtype, so
  the adapter installs :class:`~maskvl.models.qwen3_5_linear.ExactLinear` on every linear layer of the
  loaded model (a forward hook computing the same layer in float64) and a float64 run is float64 through;
* ``qwen3_5_moe``: a sparse MoE block with a gated shared expert after every layer, run on all masked rows
  at once with the model's own router (each row routed by itself); float64 loads eager experts.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch

from ..errors import InputError
from . import qwen3_5_linear as lin
from .base import AttendFn, Capture, LinearState
from .decoder import rotate_half
from .qwen3_vl import Qwen3VLAdapter
from .qwen3_vl_moe import SparseMoeRows
from .registry import register
from .tiny import PREPROCESSOR_CONFIG, SPECIAL_TOKENS, VIDEO_PREPROCESSOR_CONFIG, build_tokenizer, write_hub_dir


@register
class Qwen3_5Adapter(Qwen3VLAdapter):
    """Adapter over a loaded ``Qwen3_5ForConditionalGeneration`` and its tokenizer / image processor."""

    MODEL_TYPES = ("qwen3_5",)
    MODEL_CLASS: ClassVar[str] = "Qwen3_5ForConditionalGeneration"
    FAMILY: ClassVar[str] = "Qwen3.5"

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, model_id: str):
        super().__init__(model, tokenizer, image_processor, model_id)
        self.layer_types = list(self.text_config.layer_types)
        self._exact: list[lin.ExactLinear] = []
        if self.dtype == torch.float64:
            self._exact = [lin.ExactLinear(lay.linear_attn) for lay in self.layers
                           if getattr(lay, "linear_attn", None) is not None]

    # ------------------------------------------------------------------------------ layers
    def layer_kind(self, layer: int) -> str:
        return self.LINEAR if self.layer_types[layer] == "linear_attention" else self.ATTENTION

    def _linear(self, layer: int) -> torch.nn.Module:
        return self.layers[layer].linear_attn

    def layer_heads(self, layer: int) -> int:
        return self._linear(layer).num_v_heads if self.layer_kind(layer) == self.LINEAR else self.num_heads

    def o_proj(self, layer: int) -> torch.nn.Module:
        if self.layer_kind(layer) == self.LINEAR:
            return self._linear(layer).out_proj
        return super().o_proj(layer)

    def o_proj_weight(self, layer: int) -> torch.Tensor:
        return self.o_proj(layer).weight

    def o_proj_bias(self, layer: int) -> torch.Tensor | None:
        return self.o_proj(layer).bias

    def _apply_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # Partial rotary embeddings: the tables cover the first r dims of each head, the rest pass through
        # (transformers' apply_rotary_pos_emb in modeling_qwen3_5).
        r = cos.shape[-1]
        x_rot, x_pass = x[..., :r], x[..., r:]
        return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)

    def _final_query(self, out: torch.Tensor) -> torch.Tensor:
        return out[0, -1]  # q_norm's output [1, S, H, D]

    # -------------------------------------------------------------------------- clean pass
    def _forward_capture(self, **kwargs: Any) -> Capture:
        """The model's own forward; besides what every decoder captures, the full-attention layers' output
        gates at the final position and the linear layers' own in_proj outputs of every new position
        (kept beside the cache, on its ``_maskvl_linear`` attribute, for :meth:`linear_state`)."""
        cache = kwargs.get("past_key_values")
        records = cache.__dict__.setdefault("_maskvl_linear", {}) if cache is not None else {}
        gates: list[torch.Tensor | None] = [None] * self.num_layers
        H, D = self.num_heads, self.head_dim
        handles = []

        def gate_hook(i):
            def hook(_mod, _args, out):
                gates[i] = torch.sigmoid(out[0, -1].detach().view(H, 2 * D)[:, D:])
            return hook

        def record(rec, name, last_only=False):
            def hook(_mod, _args, out):
                if last_only:
                    rec[name] = out[0, -1].detach().clone()
                else:
                    rec.setdefault(name, []).append(out[0].detach().clone())
            return hook

        for i, lay in enumerate(self.layers):
            if self.layer_kind(i) == self.ATTENTION:
                handles.append(lay.self_attn.q_proj.register_forward_hook(gate_hook(i)))
            else:
                rec = records.setdefault(i, {})
                m = lay.linear_attn
                for name in ("in_proj_qkv", "in_proj_a", "in_proj_b"):
                    handles.append(getattr(m, name).register_forward_hook(record(rec, name)))
                handles.append(m.in_proj_z.register_forward_hook(record(rec, "in_proj_z", last_only=True)))
        try:
            cap = super()._forward_capture(**kwargs)
        finally:
            for h in handles:
                h.remove()
        cap.gate = gates
        return cap

    def _record(self, cache: Any, layer: int) -> dict[str, Any]:
        rec = getattr(cache, "_maskvl_linear", {}).get(layer)
        if rec is None or not rec.get("in_proj_qkv"):
            raise RuntimeError(f"layer {layer}: no clean pass recorded on this cache")
        for name in ("in_proj_qkv", "in_proj_a", "in_proj_b"):
            if len(rec[name]) > 1:  # one tensor per forward so far: join them once
                rec[name] = [torch.cat(rec[name])]
        return rec

    def linear_state(self, cache: Any, layer: int, dtype: torch.dtype) -> LinearState:
        rec = self._record(cache, layer)
        pre = rec["in_proj_qkv"][0]
        key = (pre.shape[0], dtype)
        if rec.get("state_key") != key:
            m = self._linear(layer)
            q, k, v, g, beta = lin.rule_inputs(m, pre.to(dtype), rec["in_proj_a"][0].to(dtype),
                                               rec["in_proj_b"][0].to(dtype))
            z = rec["in_proj_z"].to(dtype).view(m.num_v_heads, m.head_v_dim)
            rec["state"] = LinearState(q[-1], k, v, g, beta, z, lin.linear_scale(m))
            rec["state_key"] = key
        return rec["state"]

    def linear_norm(self, layer: int, core: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return lin.gated_norm(self._linear(layer), core.to(dtype), z.to(dtype))

    def _linear_prefix(self, cache: Any, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean conv tail ``[K-1, C]`` and recurrent state ``[Hv, dk, dv]`` before the final position,
        in ``dtype``; the state is advanced incrementally from one step to the next."""
        m = self._linear(layer)
        st = self.linear_state(cache, layer, dtype)
        rec = self._record(cache, layer)
        T = st.k.shape[0]
        n, S = rec.get("prefix", (0, None))
        if S is None or S.dtype != dtype or n > T - 1:
            n, S = 0, st.k.new_zeros(m.num_v_heads, m.head_k_dim, m.head_v_dim)
        if n < T - 1:
            S, _ = lin.advance(m, S, st.k[n:T - 1], st.v[n:T - 1], st.g[n:T - 1], st.beta[n:T - 1])
            n = T - 1
        rec["prefix"] = (n, S)
        return lin.conv_tail(m, rec["in_proj_qkv"][0][:T - 1].to(dtype)), S

    def replay_linear(self, layer: int, h: torch.Tensor, cache: Any, dtype: torch.dtype) -> torch.Tensor:
        tail, S = self._linear_prefix(cache, layer, dtype)
        h = h.to(dtype)
        h = h + lin.final_step(self._linear(layer), self.input_norm(layer, h, dtype), tail, S)
        return h + self.post_attention(layer, h, dtype)

    def replay_layer(self, layer: int, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                     k_prefix: torch.Tensor, v_prefix: torch.Tensor, exclude: torch.Tensor,
                     attend: AttendFn, dtype: torch.dtype) -> torch.Tensor:
        # Gated attention: q_proj gives each head [query | gate]; o_proj reads attention * sigmoid(gate).
        at = self.layers[layer].self_attn
        B, H, KV, D = h.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        x = self.input_norm(layer, h, dtype)
        qg = self._run(at.q_proj, x, dtype).view(B, H, 2 * D)
        q = self._run(at.q_norm, qg[..., :D], dtype)
        gate = qg[..., D:].reshape(B, H * D)
        k = self._run(at.k_norm, self._run(at.k_proj, x, dtype).view(B, KV, D), dtype)
        v = self._run(at.v_proj, x, dtype).view(B, KV, D)
        cos, sin = (t.to(dtype) for t in rope)
        q, k = self._apply_rope(q, cos, sin), self._apply_rope(k, cos, sin)
        o = attend(q, k_prefix, v_prefix, k, v, self.scale, exclude).to(dtype).reshape(B, H * D)
        h = h.to(dtype) + self._run(at.o_proj, o * torch.sigmoid(gate), dtype)
        return h + self.post_attention(layer, h, dtype)

    # ----------------------------------------------------------------------- naive oracle
    @contextlib.contextmanager
    def knockout_linear(self, layer: int, positions: list[int] | None) -> Iterator[None]:
        if positions is None:
            yield
            return
        m = self._linear(layer)
        busy = [False]

        def splice(mod, args, kwargs, out):
            if busy[0]:
                return None
            busy[0] = True
            try:
                with lin.skip_write(mod, list(positions)):
                    knocked = mod(*args, **kwargs)
            finally:
                busy[0] = False
            out = out.clone()
            out[:, -1] = knocked[:, -1]
            return out

        handle = m.register_forward_hook(splice, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    # ------------------------------------------------------------------------- tiny model
    #: ``shape`` keys :meth:`write_tiny_model` takes.
    SHAPE_KEYS: ClassVar[frozenset[str]] = frozenset({
        "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "intermediate_size", "vision_depth",
        "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
        "linear_conv_kernel_dim", "full_attention_interval", "partial_rotary_factor", "initializer_range",
        "tie_word_embeddings"})

    @classmethod
    def _text_config(cls, vocab_size: int, special: dict[str, int], shape: dict[str, Any]) -> dict[str, Any]:
        head_dim = shape.get("head_dim", 32)
        # The hub's 0.25, or as much as three MRoPE sections of a small head need (8 rotary dims).
        partial = shape.get("partial_rotary_factor", max(0.25, min(1.0, 8 / head_dim)))
        half = int(head_dim * partial) // 2
        if half < 3:
            raise InputError(f"head_dim {head_dim} x partial_rotary_factor {partial} leaves fewer than 6 rotary "
                             f"dims (three MRoPE sections)")
        hw = max(1, half // 4)
        layers = shape.get("num_layers", 4)
        interval = shape.get("full_attention_interval", 4)
        heads = shape.get("num_heads", 4)
        hidden = shape.get("hidden_size", 64)
        return {
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": shape.get("intermediate_size", 2 * hidden),
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": shape.get("num_kv_heads", 2),
            "head_dim": head_dim,
            "linear_num_key_heads": shape.get("linear_num_key_heads", 2),
            "linear_num_value_heads": shape.get("linear_num_value_heads", 4),
            "linear_key_head_dim": shape.get("linear_key_head_dim", 16),
            "linear_value_head_dim": shape.get("linear_value_head_dim", 12),
            "linear_conv_kernel_dim": shape.get("linear_conv_kernel_dim", 4),
            # The hub's pattern: three linear-attention layers, then one full-attention layer.
            "layer_types": ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)],
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "initializer_range": shape.get("initializer_range", 0.1),
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial,
                                "mrope_section": [half - 2 * hw, hw, hw], "mrope_interleaved": True},
            "eos_token_id": special["<|im_end|>"],
            "tie_word_embeddings": bool(shape.get("tie_word_embeddings", False)),
        }

    @classmethod
    def _vision_config(cls, hidden_size: int, shape: dict[str, Any]) -> dict[str, Any]:
        return {
            "depth": shape.get("vision_depth", 2), "hidden_size": 32, "hidden_act": "gelu_pytorch_tanh",
            "intermediate_size": 64, "num_heads": 2, "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "out_hidden_size": hidden_size, "num_position_embeddings": 256,
            "initializer_range": shape.get("initializer_range", 0.1),
        }

    @classmethod
    def write_tiny_model(cls, directory: str | os.PathLike, seed: int = 0, **shape: Any) -> Path:
        """A tiny random model of this family as a hub-like directory: config, weights, a byte-level BPE
        tokenizer with the Qwen chat template, Qwen3-VL's preprocessor configs.

        ``shape`` (:attr:`SHAPE_KEYS`): num_layers (4: layers 0-2 linear, 3 full), num_heads, num_kv_heads,
        head_dim (32), hidden_size, intermediate_size, vision_depth, the linear layers' heads and dims, the
        conv kernel, full_attention_interval, partial_rotary_factor (0.25, the hub's; more for heads under
        32 dims, so that the three MRoPE sections get 8 rotary dims), initializer_range,
        tie_word_embeddings. The linear layers' decay rates are drawn small (A_log in [-3, -1]) so that
        early positions still reach the final readout.
        """
        import transformers

        unknown = sorted(set(shape) - cls.SHAPE_KEYS)
        if unknown:
            raise TypeError(f"{cls.__name__}.write_tiny_model() got unexpected shape keys {unknown}")
        tokenizer = build_tokenizer()
        special = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        text = cls._text_config(len(tokenizer), special, shape)
        prefix = cls.MODEL_CLASS.replace("ForConditionalGeneration", "")
        config = getattr(transformers, f"{prefix}Config")(
            text_config=text, vision_config=cls._vision_config(text["hidden_size"], shape),
            image_token_id=special["<|image_pad|>"], video_token_id=special["<|video_pad|>"],
            vision_start_token_id=special["<|vision_start|>"], vision_end_token_id=special["<|vision_end|>"],
            tie_word_embeddings=text["tie_word_embeddings"], eos_token_id=special["<|im_end|>"],
        )
        torch.manual_seed(seed)
        model = getattr(transformers, cls.MODEL_CLASS)(config).to(torch.float32).eval()
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            for lay in model.model.language_model.layers:
                m = getattr(lay, "linear_attn", None)
                if m is not None:
                    m.A_log.copy_(torch.empty(m.A_log.shape).uniform_(-3.0, -1.0, generator=g))
                    m.dt_bias.copy_(torch.empty(m.dt_bias.shape).uniform_(-1.0, 1.0, generator=g))
                    m.norm.weight.copy_(torch.empty(m.norm.weight.shape).uniform_(0.5, 1.5, generator=g))
        return write_hub_dir(directory, model, tokenizer, {
            "preprocessor_config.json": PREPROCESSOR_CONFIG,
            "video_preprocessor_config.json": VIDEO_PREPROCESSOR_CONFIG,
        })


@register
class Qwen3_5MoeAdapter(SparseMoeRows, Qwen3_5Adapter):
    """Adapter over a loaded ``Qwen3_5MoeForConditionalGeneration``: Qwen3.5 with a sparse MoE block."""

    MODEL_TYPES = ("qwen3_5_moe",)
    MODEL_CLASS: ClassVar[str] = "Qwen3_5MoeForConditionalGeneration"
    FAMILY: ClassVar[str] = "Qwen3.5-MoE"
    SHAPE_KEYS: ClassVar[frozenset[str]] = Qwen3_5Adapter.SHAPE_KEYS | {
        "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"}

    @classmethod
    def _text_config(cls, vocab_size: int, special: dict[str, int], shape: dict[str, Any]) -> dict[str, Any]:
        cfg = super()._text_config(vocab_size, special, shape)
        cfg.update(num_experts=shape.get("num_experts", 8), num_experts_per_tok=shape.get("num_experts_per_tok", 2),
                   moe_intermediate_size=shape.get("moe_intermediate_size", 32),
                   shared_expert_intermediate_size=shape.get("shared_expert_intermediate_size", 32))
        return cfg
