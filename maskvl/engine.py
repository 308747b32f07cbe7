"""The sweep engine: greedy generation with a KV cache, and every masked variant of every layer.

For each generation step the engine runs ONE clean forward of the model (the prefill for step 0, a
single-token decode step against the KV cache after that), capturing each layer's input and query at
the final position. Then, per measured layer, it computes all masked variants at once:

1. leave-one-out attention (one pass over that layer's cached K and V) gives the clean head outputs
   ``o [H, D]`` and, for every masked key p, ``delta [P, H, D]`` (see ``maskvl.ops.loo_attention``);
2. one batched o_proj gives ``Attn`` for all P rows; per-head distances come from the o_proj head
   Gram matrices without materializing ``[P, H, d_model]``;
3. one batched post-attention block (norm + MLP) over the P masked residual rows gives ``Full``.

All measure arithmetic is in float32, or float64 for float64 models (``maskvl.measures``). The
engine speaks only to a :class:`maskvl.models.ModelAdapter` and a :class:`maskvl.ops.Backend`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from . import measures
from .errors import InputError
from .models.base import Capture, ModelAdapter, Prepared
from .ops import Backend, get_backend, head_grams

MASK_MODES = ("text", "vision", "both")


@dataclass
class SweepConfig:
    """What to measure. ``layers=None`` means every layer."""

    mask_mode: str = "text"
    num_tokens: int = 1
    layers: list[int] | None = None
    backend: str = "auto"

    def validate(self, num_layers: int) -> list[int]:
        if self.mask_mode not in MASK_MODES:
            raise InputError(f"unknown mask mode {self.mask_mode!r} (choose from {', '.join(MASK_MODES)})")
        if self.num_tokens < 1:
            raise InputError(f"--num-tokens must be at least 1 (got {self.num_tokens})")
        layers = list(range(num_layers)) if self.layers is None else sorted(set(self.layers))
        bad = [layer for layer in layers if not 0 <= layer < num_layers]
        if bad:
            raise InputError(f"layer {bad[0]} is out of range: the model has layers 0-{num_layers - 1}")
        if not layers:
            raise InputError("no layers selected")
        return layers


def parse_layers(spec: str | None) -> list[int] | None:
    """``"0-5,20"`` -> ``[0, 1, 2, 3, 4, 5, 20]``; ``None``/``"all"`` -> ``None`` (every layer)."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return None
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise InputError(f"bad layer list {spec!r}: expected e.g. 0-5,20") from None
    return out


@dataclass
class LayerResult:
    """All variants of one layer at one step, for the masked positions ``positions [P]``.

    ``l2`` and ``cos`` are ``[V, P]`` with variants in :func:`maskvl.measures.variant_names` order.
    """

    layer: int
    positions: np.ndarray
    l2: np.ndarray
    cos: np.ndarray


@dataclass
class StepResult:
    """One generation step: its layers' results and the token generated after it."""

    step: int
    seq_len: int
    layers: list[LayerResult]
    generated_id: int
    seconds: float


@dataclass
class SweepState:
    """Everything known about a run so far (for metadata and progress)."""

    token_ids: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    steps: list[StepResult] = field(default_factory=list)


def mask_positions(is_image: torch.Tensor, mode: str) -> torch.Tensor:
    """Positions to mask for ``mode`` given the sequence's image flags ``[S]``: ``[P]`` int64, ascending."""
    if mode == "text":
        sel = ~is_image
    elif mode == "vision":
        sel = is_image
    else:
        sel = torch.ones_like(is_image)
    return torch.nonzero(sel).flatten()


class Engine:
    """Runs sweeps for one loaded model with one backend."""

    def __init__(self, adapter: ModelAdapter, backend: str | Backend = "auto"):
        self.adapter = adapter
        self.backend = backend if isinstance(backend, Backend) else get_backend(backend, adapter.device)
        self.cd = measures.compute_dtype(adapter.dtype)
        self._grams: dict[int, torch.Tensor] = {}
        self._wo: dict[int, torch.Tensor] = {}

    def _gram(self, layer: int) -> torch.Tensor:
        if layer not in self._grams:
            self._grams[layer] = head_grams(self.adapter.o_proj_weight(layer), self.adapter.num_heads, self.cd)
        return self._grams[layer]

    def _o_proj(self, layer: int) -> torch.Tensor:
        if layer not in self._wo:
            # Kept in the compute dtype for the sweep: o_proj is small next to the MLP.
            self._wo[layer] = self.adapter.o_proj_weight(layer).to(self.cd)
        return self._wo[layer]

    def measure_layer(self, cap: Capture, cache: Any, layer: int, positions: torch.Tensor) -> LayerResult:
        """Every variant of ``layer`` for every masked position in ``positions [P]``."""
        a = self.adapter
        cd = self.cd
        k, v = a.kv(cache, layer)  # [T, KV, D]
        o, delta = self.backend.loo_attention(cap.q[layer], k, v, a.scale)  # [H, D], [T, H, D]
        pos = positions.to(delta.device)
        delta = delta.index_select(0, pos)  # [P, H, D]
        P = delta.shape[0]
        wo = self._o_proj(layer)  # [d, H*D]
        attn_clean = wo @ o.reshape(-1)  # [d]
        attn_delta = delta.reshape(P, -1) @ wo.T  # [P, d]
        x = cap.x[layer].to(cd)
        h_clean = x + attn_clean
        mlp_clean = a.post_attention(layer, h_clean.unsqueeze(0), cd)[0]
        mlp_masked = a.post_attention(layer, h_clean.unsqueeze(0) + attn_delta, cd)  # [P, d]
        full_clean = attn_clean + mlp_clean
        full_delta = attn_delta + (mlp_masked - mlp_clean)
        l2_full, cos_full = self.backend.vector_distances(full_clean, full_delta)
        l2_attn, cos_attn = self.backend.vector_distances(attn_clean, attn_delta)
        l2_head, cos_head = self.backend.head_distances(o, delta, self._gram(layer))  # [P, H]
        l2 = torch.cat([l2_full.unsqueeze(0), l2_attn.unsqueeze(0), l2_head.T], 0)
        cos = torch.cat([cos_full.unsqueeze(0), cos_attn.unsqueeze(0), cos_head.T], 0)
        return LayerResult(layer, positions.cpu().numpy(), l2.cpu().numpy(), cos.cpu().numpy())

    def run(self, prepared: Prepared, config: SweepConfig,
            on_layer: Callable[[int, int], None] | None = None) -> Iterator[StepResult]:
        """Generate greedily and yield one :class:`StepResult` per step (stops at a stop token).

        ``on_layer(step, layer)`` is called after each measured layer (progress reporting).
        """
        a = self.adapter
        layers = config.validate(a.num_layers)
        if config.mask_mode == "vision" and not bool(prepared.is_image.any()):
            raise InputError("--mask-mode vision needs at least one image")
        stops = a.stop_token_ids()
        cache = a.new_cache()
        is_image = prepared.is_image.clone()
        seq_len = prepared.input_ids.shape[1]
        token = -1
        for step in range(config.num_tokens):
            t0 = time.perf_counter()
            cap = a.prefill(prepared, cache) if step == 0 else a.decode(token, cache)
            positions = mask_positions(is_image, config.mask_mode)
            results = []
            with torch.no_grad():
                for layer in layers:
                    results.append(self.measure_layer(cap, cache, layer, positions))
                    if on_layer is not None:
                        on_layer(step, layer)
            token = int(cap.logits.argmax())
            yield StepResult(step, seq_len, results, token, time.perf_counter() - t0)
            if token in stops:
                break
            is_image = torch.cat([is_image, torch.zeros(1, dtype=torch.bool)])
            seq_len += 1
