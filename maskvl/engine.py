"""The sweep engine: greedy generation with a KV cache, and every masked variant of every layer.

For each generation step the engine runs ONE clean forward of the model (the prefill for step 0, a
single-token decode step against the KV cache after that), capturing each layer's input and query at
the final position. Then, per measured layer, it computes all masked variants at once:

1. leave-one-out attention (one pass over that layer's cached K and V) gives the clean head outputs
   ``o [H, D]`` and, for every masked key p, ``delta [P, H, D]`` (see ``maskvl.ops.loo_attention``);
2. one batched o_proj gives ``Attn`` for all P rows; per-head distances come from the o_proj head
   Gram matrices without materializing ``[P, H, d_model]``;
3. one batched post-attention block (norm + MLP) over the P masked residual rows gives ``Full``.

At a sliding-window layer (``ModelAdapter.attention_window``) the final query sees only the keys of
its window: those are measured, and every key before the window is reported with exact zeros (removing
it changes nothing at that layer). The Logits replay attends over each later layer's window too, and a
key before the window of every layer of its knockout window gets an exactly zero Logits row.

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
from .errors import InputError, OutOfMemory
from .models.base import Capture, ModelAdapter, Prepared
from .ops import Backend, get_backend, head_grams
from .options import OPTIONS

@dataclass
class SweepConfig:
    """What the engine measures: the engine's view of the sweep options (``maskvl.options``).

    ``layers=None`` means every layer; ``target_token`` is a token id (None: the greedy token).
    Build it with :meth:`from_options` from resolved options rather than by hand.
    """

    mask_mode: str = "text"
    num_tokens: int = 1
    layers: list[int] | None = None
    backend: str = "auto"
    logits: bool = False
    knockout_window: int = 1
    target_token: int | None = None
    max_batch_rows: int = 4096

    @classmethod
    def from_options(cls, opts: dict[str, Any], target_token: int | None = None) -> "SweepConfig":
        """From :func:`maskvl.options.resolve`'s output; ``target_token`` is the resolved token id."""
        layers = opts["layers"]
        return cls(mask_mode=opts["mask_mode"], num_tokens=opts["num_tokens"],
                   layers=list(layers) if layers is not None else None, backend=opts["backend"],
                   logits=opts["logits"], knockout_window=opts["knockout_window"], target_token=target_token,
                   max_batch_rows=opts["max_batch_rows"])

    def validate(self, num_layers: int) -> list[int]:
        """The measured layers, ascending, checked against the model's ``num_layers``."""
        layers = list(range(num_layers)) if self.layers is None else sorted(set(self.layers))
        bad = [layer for layer in layers if not 0 <= layer < num_layers]
        if bad:
            raise InputError(f"{OPTIONS['layers'].label}: layer {bad[0]} is out of range: the model has layers "
                             f"0-{num_layers - 1}")
        if not layers:
            raise InputError(f"{OPTIONS['layers'].label} selects no layer")
        return layers


@dataclass
class LayerResult:
    """All variants of one layer at one step, for the masked positions ``positions [P]``.

    ``l2`` and ``cos`` are ``[V, P]``, row ``i`` being variant ``variants[i]``; with the Logits
    measure, ``kl`` and ``tpd`` are ``[V, P]`` too, NaN except on the Logits row.
    """

    layer: int
    variants: list[str]
    positions: np.ndarray
    l2: np.ndarray
    cos: np.ndarray
    kl: np.ndarray | None = None
    tpd: np.ndarray | None = None


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


@dataclass
class _LogitsBatch:
    """The rows of one starting layer on their way to the LM head: row 0 clean, then one per masked key.

    ``exclude [1 + P]`` is each row's masked key (-1 for the clean row), used inside the knockout window.
    ``cols [P]``: which of the layer's masked positions the rows are (None: all of them, in order).
    """

    start: int
    h: torch.Tensor
    exclude: torch.Tensor
    cols: torch.Tensor | None = None


class Engine:
    """Runs sweeps for one loaded model with one backend."""

    def __init__(self, adapter: ModelAdapter, backend: str | Backend = "auto", max_rows: int = 4096):
        self.adapter = adapter
        # Rows per batched chunk (MLP, Logits replay, LM head); halved on out-of-memory (_in_chunks).
        self.rows = max_rows
        self.backend = backend if isinstance(backend, Backend) else get_backend(backend, adapter.device)
        self.cd = measures.compute_dtype(adapter.dtype)
        self._grams: dict[int, torch.Tensor] = {}
        self._note: Callable[[str], None] | None = None

    def _in_chunks(self, n: int, fn: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
        """``cat(fn(i, j))`` over row ranges ``[i, j)`` of at most ``self.rows`` of ``n`` rows.

        Out of memory, the chunk size halves and the whole call is redone, so a result is never
        partial or made up; only at one row per chunk does the error propagate.
        """
        while True:
            rows = self.rows
            try:
                if n == 0:
                    return fn(0, 0)
                return torch.cat([fn(i, min(i + rows, n)) for i in range(0, n, rows)])
            except torch.OutOfMemoryError:
                if rows == 1:
                    raise
                self.rows = rows // 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if self._note is not None:
                    self._note(f"out of memory with {rows} rows per chunk; retrying with {self.rows} "
                               f"(max_batch_rows (--max-batch-rows) sets the starting size)")

    def _gram(self, layer: int) -> torch.Tensor:
        if layer not in self._grams:
            self._grams[layer] = head_grams(self.adapter.o_proj_weight(layer), self.adapter.num_heads, self.cd)
        return self._grams[layer]

    def window_start(self, layer: int, seq_len: int) -> int:
        """The first key the final query (position ``seq_len - 1``) sees at ``layer``: 0 unless the layer
        has a sliding window shorter than the sequence."""
        w = self.adapter.attention_window(layer)
        return 0 if w is None else max(0, seq_len - w)

    def measure_layer(self, cap: Capture, cache: Any, layer: int, positions: torch.Tensor
                      ) -> tuple[LayerResult, torch.Tensor, torch.Tensor]:
        """Every variant of ``layer`` for every masked position in ``positions [P]``.

        Also returns the clean layer update ``[d]`` and the masked updates' deltas ``[P, d]`` (the
        Logits measure continues from them). At a sliding-window layer only the keys inside the final
        query's window are measured; removing any other key changes nothing there, so its rows are
        exact zeros (l2 and cosine distance 0, delta 0).
        """
        a = self.adapter
        cd = self.cd
        k, v = a.kv(cache, layer)  # [T, KV, D]
        lo = self.window_start(layer, k.shape[0])
        inside = None
        if lo:
            k, v = k[lo:], v[lo:]  # the window: keys lo..T-1
            inside = torch.nonzero(positions >= lo).flatten()  # [P_in] indices into positions
            pos = positions[inside] - lo
        else:
            pos = positions
        o, delta = self.backend.loo_attention(cap.q[layer], k, v, a.scale)  # [H, D], [T, H, D]
        pos = pos.to(delta.device)
        delta = delta.index_select(0, pos)  # [P, H, D]
        P = delta.shape[0]
        # Cast per use, not cached: a compute-dtype copy of every layer's o_proj would cost GBs at 4B.
        wo = a.o_proj_weight(layer).to(self.cd)  # [d, H*D]
        attn_clean = wo @ o.reshape(-1)  # [d]
        bias = a.o_proj_bias(layer)
        if bias is not None:
            # Attn is o_proj's output, bias included; it cancels in the deltas.
            attn_clean = attn_clean + bias.to(self.cd)
        attn_delta = delta.reshape(P, -1) @ wo.T  # [P, d]
        x = cap.x[layer].to(cd)
        h_clean = x + attn_clean
        mlp_clean = a.post_attention(layer, h_clean.unsqueeze(0), cd)[0]
        # Chunked so that the MLP's [rows, intermediate] activations stay bounded for long sequences.
        mlp_masked = self._in_chunks(P, lambda i, j: a.post_attention(
            layer, h_clean.unsqueeze(0) + attn_delta[i:j], cd)) if P else attn_delta  # [P, d]
        full_clean = attn_clean + mlp_clean
        full_delta = attn_delta + (mlp_masked - mlp_clean)
        if P:
            l2_full, cos_full = self.backend.vector_distances(full_clean, full_delta)
            l2_attn, cos_attn = self.backend.vector_distances(attn_clean, attn_delta)
            l2_head, cos_head = self.backend.head_distances(o, delta, self._gram(layer))  # [P, H]
            l2 = torch.cat([l2_full.unsqueeze(0), l2_attn.unsqueeze(0), l2_head.T], 0)
            cos = torch.cat([cos_full.unsqueeze(0), cos_attn.unsqueeze(0), cos_head.T], 0)
        else:  # every masked key is outside the window
            l2 = cos = full_clean.new_zeros((2 + a.num_heads, 0))
        if inside is not None:
            # Keys outside the window: exact zeros in every variant.
            n = len(positions)
            idx = inside.to(l2.device)
            l2 = l2.new_zeros((l2.shape[0], n)).index_copy_(1, idx, l2)
            cos = cos.new_zeros((cos.shape[0], n)).index_copy_(1, idx, cos)
            full_delta = full_delta.new_zeros((n, full_delta.shape[1])).index_copy_(
                0, inside.to(full_delta.device), full_delta)
        names = measures.variant_names(a.num_heads)
        result = LayerResult(layer, names, positions.cpu().numpy(), l2.cpu().numpy(), cos.cpu().numpy())
        return result, full_clean, full_delta

    def _propagate(self, layer: int, batches: list["_LogitsBatch"], cap: Capture, cache: Any, seq_len: int,
                   window: int) -> None:
        """Run every started batch's rows through ``layer`` (single-position decode against the clean prefix)."""
        a = self.adapter
        k, v = a.kv(cache, layer)
        T = seq_len - 1
        # At a sliding-window layer the final query sees only the prefix keys lo..T-1 (and its own).
        lo = self.window_start(layer, seq_len)
        # The replayed rows are in the compute dtype; a bf16/fp16 cache is upcast to match (every
        # backend's decode attention takes one dtype).
        k_pre, v_pre = k[lo:T].to(self.cd), v[lo:T].to(self.cd)
        rows = torch.cat([b.h for b in batches])
        # Rows still inside their knockout window leave their key out here too (the final position's
        # own key, p == T, is the own row of the decode attention).
        exclude = torch.cat([b.exclude if layer - b.start < window else torch.full_like(b.exclude, -1)
                             for b in batches]).to(rows.device)
        if lo:
            # Indices into the window's prefix; a key before the window is not there to leave out.
            exclude = torch.where(exclude >= lo, exclude - lo, torch.full_like(exclude, -1))
        out = self._in_chunks(rows.shape[0], lambda i, j: a.replay_layer(
            layer, rows[i:j], cap.rope, k_pre, v_pre, exclude[i:j], self.backend.decode_attention, self.cd))
        i = 0
        for b in batches:
            n = b.h.shape[0]
            b.h = out[i:i + n]
            i += n

    def _finish_logits(self, batches: list["_LogitsBatch"], results: dict[int, LayerResult], target: int) -> None:
        """Final norm + LM head for every batch; append the Logits row to each layer's result."""
        for b in batches:
            logits = self._in_chunks(b.h.shape[0], lambda i, j: self.adapter.final_logits(b.h[i:j], self.cd))
            clean, masked = logits[0], logits[1:]
            lr = results[b.start]
            if b.cols is None:
                l2, cos = self.backend.vector_distances(clean, masked - clean)
                kl, tpd = measures.logits_effects(clean, masked, target)
            else:
                # Rows left out of the replay (keys outside every knockout layer's window) are exact zeros.
                l2, cos, kl, tpd = (clean.new_zeros(lr.l2.shape[1]) for _ in range(4))
                if masked.shape[0]:
                    idx = b.cols.to(clean.device)
                    got = (tuple(self.backend.vector_distances(clean, masked - clean))
                           + tuple(measures.logits_effects(clean, masked, target)))
                    l2, cos, kl, tpd = (z.index_copy_(0, idx, g.to(z.dtype)) for z, g in zip((l2, cos, kl, tpd), got))
            nan = np.full((lr.l2.shape[0], lr.l2.shape[1]), np.nan)
            lr.variants = lr.variants + [measures.LOGITS]
            lr.l2 = np.concatenate([lr.l2, l2.cpu().numpy()[None]])
            lr.cos = np.concatenate([lr.cos, cos.cpu().numpy()[None]])
            lr.kl = np.concatenate([nan, kl.cpu().numpy()[None]])
            lr.tpd = np.concatenate([nan, tpd.cpu().numpy()[None]])

    def run(self, prepared: Prepared, config: SweepConfig,
            on_layer: Callable[[int, int], None] | None = None,
            on_note: Callable[[str], None] | None = None) -> Iterator[StepResult]:
        """Generate greedily and yield one :class:`StepResult` per step (stops at a stop token).

        ``on_layer(step, layer)`` is called after each measured layer (progress reporting);
        ``on_note(text)`` receives remarks worth showing a user (e.g. that the Logits batch is chunked).
        """
        a = self.adapter
        layers = config.validate(a.num_layers)
        if config.mask_mode == "vision" and not bool(prepared.is_image.any()):
            raise InputError(f"{OPTIONS['mask_mode'].label} vision needs at least one image")
        stops = a.stop_token_ids()
        cache = a.new_cache()
        is_image = prepared.is_image.clone()
        seq_len = prepared.input_ids.shape[1]
        token = -1
        self.rows = config.max_batch_rows
        self._note = on_note
        for step in range(config.num_tokens):
            t0 = time.perf_counter()
            positions = mask_positions(is_image, config.mask_mode)
            try:
                cap = a.prefill(prepared, cache) if step == 0 else a.decode(token, cache)
                if config.logits and on_note is not None:
                    rows = len(layers) * (len(positions) + 1)
                    if rows > config.max_batch_rows:
                        on_note(f"step {step}: Logits runs up to {rows} rows per layer in chunks of "
                                f"{config.max_batch_rows}")
                results: dict[int, LayerResult] = {}
                batches: list[_LogitsBatch] = []
                measured = set(layers)
                token = int(cap.logits.argmax())
                with torch.no_grad():
                    for layer in range(layers[0], a.num_layers if config.logits else layers[-1] + 1):
                        if batches:
                            self._propagate(layer, batches, cap, cache, seq_len, config.knockout_window)
                        if layer not in measured:
                            continue
                        lr, full_clean, full_delta = self.measure_layer(cap, cache, layer, positions)
                        results[layer] = lr
                        if config.logits:
                            # Row 0 is this layer's clean output, replayed through the same arithmetic as
                            # the masked rows so that their difference is only the masking.
                            out = cap.x[layer].to(self.cd) + full_clean
                            # A key before every knockout layer's window has no effect anywhere: its
                            # Logits row is an exact zero and it is not replayed.
                            knocked = range(layer, min(layer + config.knockout_window, a.num_layers))
                            first = min(self.window_start(k, seq_len) for k in knocked)
                            cols = torch.nonzero(positions >= first).flatten() if first else None
                            kept = positions if cols is None else positions[cols]
                            if cols is not None:
                                full_delta = full_delta.index_select(0, cols.to(full_delta.device))
                            h = torch.cat([out.unsqueeze(0), out.unsqueeze(0) + full_delta])
                            ex = torch.cat([torch.tensor([-1]), kept.cpu()])
                            batches.append(_LogitsBatch(layer, h, ex, cols))
                        if on_layer is not None:
                            on_layer(step, layer)
                    if config.logits:
                        target = config.target_token if config.target_token is not None else token
                        self._finish_logits(batches, results, target)
            except torch.OutOfMemoryError:
                # Chunked work has already been retried with smaller chunks (_in_chunks); what remains
                # does not fit. The caller keeps the completed steps (a .partial.parquet file).
                raise OutOfMemory(
                    f"out of memory at step {step} ({seq_len} tokens, {len(positions)} masked positions, "
                    f"{self.rows} rows per chunk): lower max_batch_rows (--max-batch-rows), use a smaller "
                    f"image (max_pixels (--max-pixels)) or measure fewer positions (mask_mode (--mask-mode))"
                ) from None
            yield StepResult(step, seq_len, [results[layer] for layer in layers], token, time.perf_counter() - t0)
            if token in stops:
                break
            is_image = torch.cat([is_image, torch.zeros(1, dtype=torch.bool)])
            seq_len += 1
