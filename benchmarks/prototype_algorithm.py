"""The prototype's algorithm, done right: the baseline maskvl is benchmarked against.

The prototype maskvl descends from (a script that swept Qwen3-VL one masked pass at a time) ran, per
generation step, a fresh prefill of the whole sequence (no KV-cache reuse), and then, for every decoder
layer L and every masked position p, one masked pass of layer L over the WHOLE sequence: attention
recomputed for every query, o_proj and the MLP over every position, of which only the final position
was used. This module keeps that algorithm (and its cost) and fixes what the prototype got wrong:

* layer inputs are captured from the model's own forward (pre-hooks), so image features, 3D MRoPE
  positions and the DeepStack additions are the real ones (the prototype embedded the image pads
  themselves, used 1-D positions and skipped DeepStack);
* the replayed attention uses the model's q/k norms (where it has them) and rotary embedding and a
  causal mask (with the layer's sliding window, if any); key p is removed for the final query row only
  (the prototype skipped the norms and let image tokens attend to each other both ways);
* distances are computed in float32, or float64 for float64 models (the prototype used bf16); nothing
  is caught and replaced by zeros (its out-of-memory fallback wrote zeros as results).

It computes the same variants as maskvl (Full, Attn, Head_N; l2 and cosine distance), so its output can
be checked against the engine's (``tests/test_benchmarks.py``), which keeps the comparison honest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from maskvl import measures
from maskvl.engine import mask_positions
from maskvl.models.base import Prepared


@dataclass
class PrototypeStep:
    """One step: per measured layer ``l2``/``cos`` ``[V, P]`` (variants in maskvl's order)."""

    step: int
    seq_len: int
    positions: np.ndarray
    l2: dict[int, np.ndarray]
    cos: dict[int, np.ndarray]
    generated_id: int
    prefill_s: float = 0.0
    layer_s: dict[int, float] = field(default_factory=dict)


def _prefill(adapter: Any, prepared: Prepared, generated: list[int]):
    """A fresh, cache-less forward of prompt + ``generated``; every layer's full input and the rope tables.

    Returns ``(inputs [n_layers] of [1, S, d], (cos, sin), logits [V])``.
    """
    n = adapter.num_layers
    xs: list[torch.Tensor | None] = [None] * n
    rope: list[Any] = [None]
    handles = []

    def pre(i):
        def hook(module, args, kw):
            xs[i] = (args[0] if args else kw["hidden_states"]).detach()
            rope[0] = kw["position_embeddings"]
        return hook

    for i in range(n):
        handles.append(adapter.decoder_layer(i).register_forward_pre_hook(pre(i), with_kwargs=True))
    try:
        logits = adapter.forward_full(prepared, generated)
    finally:
        for h in handles:
            h.remove()
    return xs, rope[0], logits


def _repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def layer_pass(layer: torch.nn.Module, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
               allowed: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """Decoder layer ``layer`` over the whole sequence ``h [1, S, d]`` with the boolean mask ``allowed [S, S]``.

    Returns the final position's ``(layer output - input [d], o_proj output [d], head outputs [H, D])``.
    """
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

    attn = layer.self_attn
    S = h.shape[1]
    x = layer.input_layernorm(h)
    q = attn.q_proj(x).view(1, S, num_heads, head_dim)
    k = attn.k_proj(x).view(1, S, num_kv_heads, head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = attn.v_proj(x).view(1, S, num_kv_heads, head_dim).transpose(1, 2)
    cos, sin = rope
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    group = num_heads // num_kv_heads
    o = F.scaled_dot_product_attention(q, _repeat_kv(k, group), _repeat_kv(v, group), attn_mask=allowed,
                                       scale=attn.scaling)  # [1, H, S, D]
    o = o.transpose(1, 2).reshape(1, S, num_heads * head_dim)
    a = attn.o_proj(o)
    h2 = h + a
    y = h2 + layer.mlp(layer.post_attention_layernorm(h2))
    return y[0, -1] - h[0, -1], a[0, -1], o[0, -1].view(num_heads, head_dim)


def _vectors(adapter: Any, layer: int, out, cd: torch.dtype) -> torch.Tensor:
    """``[V, d]``: Full, Attn, then every head's residual contribution (o_proj on its slice alone)."""
    full, attn, o = out
    H, D = adapter.num_heads, adapter.head_dim
    w = adapter.o_proj_weight(layer).to(cd)
    heads = torch.einsum("dhk,hk->hd", w.view(w.shape[0], H, D), o.to(cd))
    return torch.cat([full.to(cd).unsqueeze(0), attn.to(cd).unsqueeze(0), heads], 0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prototype_sweep(adapter: Any, prepared: Prepared, mask_mode: str = "vision", num_tokens: int = 1,
                    layers: list[int] | None = None, max_positions: int | None = None,
                    on_step: Callable[[PrototypeStep], None] | None = None) -> list[PrototypeStep]:
    """Run the baseline; returns one :class:`PrototypeStep` per generation step (greedy, stop tokens honoured).

    ``layers`` restricts the measured layers (all by default); ``max_positions`` measures only that many
    masked positions per layer, evenly spread (for timing a subset; the results then cover only those).
    Generation always uses the full model. Per-step timings (``prefill_s``, ``layer_s``) are synchronized.
    """
    layers = list(range(adapter.num_layers)) if layers is None else list(layers)
    cd = measures.compute_dtype(adapter.dtype)
    dev = adapter.device
    H, KV, D = adapter.num_heads, adapter.num_kv_heads, adapter.head_dim
    stops = adapter.stop_token_ids()
    generated: list[int] = []
    is_image = prepared.is_image.clone()
    steps: list[PrototypeStep] = []
    for step in range(num_tokens):
        _sync(dev)
        t0 = time.perf_counter()
        xs, rope, logits = _prefill(adapter, prepared, generated)
        _sync(dev)
        prefill_s = time.perf_counter() - t0
        S = xs[0].shape[1]
        positions = mask_positions(is_image, mask_mode)
        if max_positions is not None and max_positions < len(positions):
            idx = torch.linspace(0, len(positions) - 1, max_positions).round().long().unique()
            positions = positions[idx]
        causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril_()
        res = PrototypeStep(step, S, positions.numpy(), {}, {}, -1, prefill_s)
        for layer in layers:
            t1 = time.perf_counter()
            mod = adapter.decoder_layer(layer)
            window = adapter.attention_window(layer)
            allowed = causal if window is None else causal.triu(1 - window)  # keys i - window < j <= i
            clean = _vectors(adapter, layer, layer_pass(mod, xs[layer], rope, allowed, H, KV, D), cd)
            l2_rows, cos_rows = [], []
            for p in positions.tolist():
                allowed[S - 1, p] = False
                masked = _vectors(adapter, layer, layer_pass(mod, xs[layer], rope, allowed, H, KV, D), cd)
                allowed[S - 1, p] = True
                l2, cos = measures.vector_distances_direct(clean, masked)
                l2_rows.append(l2)
                cos_rows.append(cos)
            res.l2[layer] = torch.stack(l2_rows, 1).cpu().numpy()
            res.cos[layer] = torch.stack(cos_rows, 1).cpu().numpy()
            _sync(dev)
            res.layer_s[layer] = time.perf_counter() - t1
        token = int(logits.argmax())
        res.generated_id = token
        steps.append(res)
        if on_step is not None:
            on_step(res)
        del xs
        if token in stops:
            break
        generated.append(token)
        is_image = torch.cat([is_image, torch.zeros(1, dtype=torch.bool)])
    return steps
