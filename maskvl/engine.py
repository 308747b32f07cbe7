"""The sweep engine: greedy generation with a KV cache, and every masked variant of every layer.

For each generation step the engine runs ONE clean forward of the model (the prefill for step 0, a
single-token decode step against the KV cache after that), capturing each layer's input and query at
the final position. Then, per measured layer, it computes all masked variants at once:

1. leave-one-out attention (one pass over that layer's cached K and V) gives the clean head outputs
   ``o [H, D]`` and, for every masked key p, ``delta [P, H, D]`` (see ``maskvl.ops.loo_attention``);
   with groups (``SweepConfig.groups``), leave-group-out attention gives one row per group of keys
   removed together (``maskvl.ops.loo_group_attention``), and everything below is the same;
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

import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from . import measures
from .errors import InputError, OutOfMemory
from .groups import positions_text
from .models.base import Capture, ModelAdapter, Prepared
from .ops import Backend, get_backend, head_grams, sinks
from .options import OPTIONS


def _attend_with_sinks(decode_attention: Callable[..., torch.Tensor], sink: torch.Tensor, q: torch.Tensor,
                       k_prefix: torch.Tensor, v_prefix: torch.Tensor, k_own: torch.Tensor, v_own: torch.Tensor,
                       scale: float, exclude: torch.Tensor, exclude_sets: torch.Tensor | None = None,
                       exclude_set: torch.Tensor | None = None) -> torch.Tensor:
    """A backend's decode attention with the layer's sinks ``[H]`` in the denominator (``maskvl/ops/sinks.py``)."""
    out = decode_attention(q, k_prefix, v_prefix, k_own, v_own, scale, exclude, exclude_sets, exclude_set)
    return sinks.decode_attention(out, q, k_prefix, k_own, scale, exclude, exclude_sets, exclude_set, sink)

@dataclass
class SweepConfig:
    """What the engine measures: the engine's view of the sweep options (``maskvl.options``).

    ``layers=None`` means every layer; ``target_token`` is a token id (None: the greedy token).
    ``groups``: position sets removed together, one result row per set (group knockout), instead of
    one row per position of ``mask_mode`` (``maskvl.groups`` resolves the ``mask_groups`` option).
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
    groups: list[list[int]] | None = None

    @classmethod
    def from_options(cls, opts: dict[str, Any], target_token: int | None = None,
                     groups: Sequence[Sequence[int]] | None = None) -> "SweepConfig":
        """From :func:`maskvl.options.resolve`'s output; ``target_token`` is the resolved token id,
        ``groups`` the resolved position sets of ``mask_groups`` (``maskvl.groups.resolve_groups``)."""
        layers = opts["layers"]
        return cls(mask_mode=opts["mask_mode"] or "text", num_tokens=opts["num_tokens"],
                   layers=list(layers) if layers is not None else None, backend=opts["backend"],
                   logits=opts["logits"], knockout_window=opts["knockout_window"], target_token=target_token,
                   max_batch_rows=opts["max_batch_rows"],
                   groups=[list(g) for g in groups] if groups is not None else None)

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
    measure, ``kl`` and ``tpd`` are ``[V, P]`` too, NaN except on the Logits row. In a group run the
    P columns are groups: ``group_index [P]`` names them and ``positions`` is -1 (no single position).
    """

    layer: int
    variants: list[str]
    positions: np.ndarray
    l2: np.ndarray
    cos: np.ndarray
    kl: np.ndarray | None = None
    tpd: np.ndarray | None = None
    group_index: np.ndarray | None = None


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


class GroupSet:
    """Position sets removed together (group knockout), as the ops take them: CSR ``members [M]`` and
    ``offsets [NG + 1]`` (int64, on the model's device); group ``g`` is ``members[offsets[g]:offsets[g+1]]``."""

    def __init__(self, groups: Sequence[Sequence[int]], seq_len: int, device: torch.device):
        sets = [sorted(set(int(p) for p in g)) for g in groups]
        for i, g in enumerate(sets):
            if not g:
                raise InputError(f"{OPTIONS['mask_groups'].label}: group {i} is empty")
            if g[0] < 0 or g[-1] >= seq_len:
                raise InputError(f"{OPTIONS['mask_groups'].label}: group {i} holds position "
                                 f"{g[0] if g[0] < 0 else g[-1]}, outside the prompt (positions 0-{seq_len - 1})")
        self.count = len(sets)
        self.members = torch.tensor([p for g in sets for p in g], dtype=torch.int64, device=device)
        self.offsets = torch.tensor([0] + [len(g) for g in sets], dtype=torch.int64).cumsum(0).to(device)
        self._pairs = (torch.repeat_interleave(torch.arange(self.count), torch.tensor([len(g) for g in sets])),
                       torch.tensor([p for g in sets for p in g], dtype=torch.int64))
        self._last = torch.tensor([g[-1] for g in sets], dtype=torch.int64)  # each group's last position

    def within(self, lo: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The groups as seen from a sliding window that starts at key ``lo``: ``(members, offsets,
        inside)`` with members shifted by ``-lo`` and only the members ``>= lo`` kept, for the groups
        ``inside [NG_in]`` (indices) that keep any; ``inside`` is None when ``lo`` is 0 (all, unchanged)."""
        if not lo:
            return self.members, self.offsets, None
        gid, pos = self._pairs
        keep = pos >= lo
        counts = torch.zeros(self.count, dtype=torch.int64).index_add_(0, gid, keep.long())
        inside = torch.nonzero(counts > 0).flatten()
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts[inside].cumsum(0)])
        dev = self.members.device
        return (pos[keep] - lo).to(dev), offsets.to(dev), inside

    def reaching(self, first: int) -> torch.Tensor:
        """Indices of the groups with a member at ``first`` or later, ascending."""
        return torch.nonzero(self._last >= first).flatten()

    def key_sets(self, num_keys: int) -> torch.Tensor:
        """``[NG, num_keys]`` bool, True at each group's members (``decode_attention``'s ``exclude_sets``)."""
        sets = torch.zeros(self.count, num_keys, dtype=torch.bool)
        sets[self._pairs] = True
        return sets.to(self.members.device)


@dataclass
class _LogitsBatch:
    """The rows of one starting layer on their way to the LM head: row 0 clean, then one per masked key.

    ``exclude [1 + P]`` is each row's masked key (-1 for the clean row), used inside the knockout window.
    ``cols [P]``: which of the layer's masked positions the rows are (None: all of them, in order).
    In a group run the rows are groups (``cols`` indexes the step's groups): ``exclude`` is all -1 and
    ``exclude_set [1 + P]`` names each row's group (-1 for the clean row), a row of ``GroupSet.key_sets``.
    """

    start: int
    h: torch.Tensor
    exclude: torch.Tensor
    cols: torch.Tensor | None = None
    exclude_set: torch.Tensor | None = None


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
            self._grams[layer] = head_grams(self.adapter.o_proj_weight(layer), self.adapter.layer_heads(layer), self.cd)
        return self._grams[layer]

    def window_start(self, layer: int, seq_len: int) -> int:
        """The first key the final query (position ``seq_len - 1``) sees at ``layer``: 0 unless the layer
        has a sliding window shorter than the sequence."""
        w = self.adapter.attention_window(layer)
        return 0 if w is None else max(0, seq_len - w)

    def _attention_deltas(self, cap: Capture, cache: Any, layer: int, positions: torch.Tensor | None,
                          groups: GroupSet | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Softmax attention at ``layer``: the clean head outputs ``o [H, D]``, the masked rows' deltas
        ``[P, H, D]`` (P: the masked positions or groups inside the final query's window) and ``inside``
        (their indices among all, None when all are inside)."""
        a = self.adapter
        k, v = a.kv(cache, layer)  # [T, KV, D]
        lo = self.window_start(layer, k.shape[0])
        # Learned sinks (GPT-OSS) stay in the softmax denominator: the sink-free op's result is corrected
        # exactly (maskvl/ops/sinks.py).
        sink = a.attention_sinks(layer)
        if lo:
            k, v = k[lo:], v[lo:]  # the window: keys lo..T-1
        if groups is None:
            inside = None
            if lo:
                inside = torch.nonzero(positions >= lo).flatten()  # [P_in] indices into positions
                pos = positions[inside] - lo
            else:
                pos = positions
            o, delta = self.backend.loo_attention(cap.q[layer], k, v, a.scale)  # [H, D], [T, H, D]
            if sink is not None:
                o, delta = sinks.loo_attention(o, delta, cap.q[layer], k, a.scale, sink)
            pos = pos.to(delta.device)
            delta = delta.index_select(0, pos)  # [P, H, D]
        else:
            # Only a group's keys inside the window are there to remove; a group with none is an exact zero.
            members, offsets, inside = groups.within(lo)
            o, delta = self.backend.loo_group_attention(cap.q[layer], k, v, a.scale, members,
                                                        offsets)  # [H, D], [NG_in, H, D]
            if sink is not None:
                o, delta = sinks.loo_group_attention(o, delta, cap.q[layer], k, a.scale, members, offsets, sink)
        return o, delta, inside

    def measure_layer(self, cap: Capture, cache: Any, layer: int, positions: torch.Tensor | None,
                      groups: GroupSet | None = None) -> tuple[LayerResult, torch.Tensor, torch.Tensor]:
        """Every variant of ``layer`` for every masked position in ``positions [P]``, or, with
        ``groups``, for every group of positions removed together (then ``positions`` is unused).

        Also returns the clean layer update ``[d]`` and the masked updates' deltas ``[P, d]`` (the
        Logits measure continues from them). At a sliding-window layer only the keys inside the final
        query's window are measured; removing any other key changes nothing there, so its rows are
        exact zeros (l2 and cosine distance 0, delta 0).
        """
        a = self.adapter
        cd = self.cd
        inside = None
        if a.layer_kind(layer) == a.LINEAR:
            # Linear attention (Gated DeltaNet): removing p skips p's write to the state that the final
            # position reads (maskvl.ops.gated_delta_knockout); the readouts then go through the layer's
            # gated norm, so the deltas o_proj sees are of the normed rows.
            st = a.linear_state(cache, layer, cd)
            if groups is None:
                core, core_delta = self.backend.gated_delta_knockout(st.q, st.k, st.v, st.g, st.beta, st.scale, True)
                core_delta = core_delta.index_select(0, positions.to(core_delta.device))  # [P, Hv, dv]
            else:  # every write of a group skipped together
                core, core_delta = self.backend.gated_delta_group_knockout(
                    st.q, st.k, st.v, st.g, st.beta, st.scale, True, groups.members, groups.offsets)
            o = a.linear_norm(layer, core.unsqueeze(0), st.z, cd)[0]  # [Hv, dv]
            delta = self._in_chunks(core_delta.shape[0], lambda i, j: a.linear_norm(
                layer, core.unsqueeze(0) + core_delta[i:j], st.z, cd) - o)
        else:
            o, delta, inside = self._attention_deltas(cap, cache, layer, positions, groups)
        gate = cap.gate[layer] if cap.gate is not None else None
        if gate is not None:
            # An output gate (Qwen3.5) from the final position's own input: the same for every masked row.
            o, delta = o * gate.to(o.dtype), delta * gate.to(delta.dtype)
        P = delta.shape[0]
        # Cast per use, not cached: a compute-dtype copy of every layer's o_proj would cost GBs at 4B.
        wo = a.o_proj_weight(layer).to(self.cd)  # [d, H*D]
        attn_clean = wo @ o.reshape(-1)  # [d]
        bias = a.o_proj_bias(layer)
        if bias is not None:
            # Attn is o_proj's output, bias included; it cancels in the deltas.
            attn_clean = attn_clean + bias.to(self.cd)
        attn_delta = delta.reshape(P, wo.shape[1]) @ wo.T  # [P, d] (P may be 0: every key outside the window)
        x = cap.x[layer].to(cd)
        if a.has_attention_norm:
            # A norm after attention (Gemma 3, OLMo 2) sits between o_proj and the residual: Full goes
            # through it, Attn and Head_N stay before it.
            res_clean = a.attention_norm(layer, attn_clean.unsqueeze(0), cd)[0]
            res_delta = self._in_chunks(P, lambda i, j: a.attention_norm(
                layer, attn_clean.unsqueeze(0) + attn_delta[i:j], cd)) - res_clean if P else attn_delta
        else:
            res_clean, res_delta = attn_clean, attn_delta
        h_clean = x + res_clean
        mlp_clean = a.post_attention(layer, h_clean.unsqueeze(0), cd)[0]
        # Chunked so that the MLP's [rows, intermediate] activations stay bounded for long sequences.
        mlp_masked = self._in_chunks(P, lambda i, j: a.post_attention(
            layer, h_clean.unsqueeze(0) + res_delta[i:j], cd)) if P else res_delta  # [P, d]
        full_clean = res_clean + mlp_clean
        full_delta = res_delta + (mlp_masked - mlp_clean)
        if P:
            l2_full, cos_full = self.backend.vector_distances(full_clean, full_delta)
            l2_attn, cos_attn = self.backend.vector_distances(attn_clean, attn_delta)
            l2_head, cos_head = self.backend.head_distances(o, delta, self._gram(layer))  # [P, H]
            l2 = torch.cat([l2_full.unsqueeze(0), l2_attn.unsqueeze(0), l2_head.T], 0)
            cos = torch.cat([cos_full.unsqueeze(0), cos_attn.unsqueeze(0), cos_head.T], 0)
        else:  # every masked key is outside the window
            l2 = cos = full_clean.new_zeros((2 + a.layer_heads(layer), 0))
        if inside is not None:
            # Keys (groups) outside the window: exact zeros in every variant.
            n = len(positions) if groups is None else groups.count
            idx = inside.to(l2.device)
            l2 = l2.new_zeros((l2.shape[0], n)).index_copy_(1, idx, l2)
            cos = cos.new_zeros((cos.shape[0], n)).index_copy_(1, idx, cos)
            full_delta = full_delta.new_zeros((n, full_delta.shape[1])).index_copy_(
                0, inside.to(full_delta.device), full_delta)
        names = measures.variant_names(a.layer_heads(layer))
        if groups is None:
            result = LayerResult(layer, names, positions.cpu().numpy(), l2.cpu().numpy(), cos.cpu().numpy())
        else:
            result = LayerResult(layer, names, np.full(groups.count, -1, np.int64), l2.cpu().numpy(),
                                 cos.cpu().numpy(), group_index=np.arange(groups.count))
        return result, full_clean, full_delta

    def _propagate(self, layer: int, batches: list["_LogitsBatch"], cap: Capture, cache: Any, seq_len: int,
                   window: int, key_sets: torch.Tensor | None = None) -> None:
        """Run every started batch's rows through ``layer`` (single-position decode against the clean prefix).

        ``key_sets [NG, seq_len]`` bool: the groups of a group run (rows name theirs in ``exclude_set``).
        """
        a = self.adapter
        if a.layer_kind(layer) == a.LINEAR:
            # Every row takes its own single step on the shared clean conv tail and state (run() refuses a
            # knockout window that reaches a linear layer after the measured one).
            rows = torch.cat([b.h for b in batches])
            out = self._in_chunks(rows.shape[0], lambda i, j: a.replay_linear(layer, rows[i:j], cache, self.cd))
            self._hand_back(batches, out)
            return
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
        attend = self.backend.decode_attention
        sink = a.attention_sinks(layer)
        if sink is not None:
            attend = functools.partial(_attend_with_sinks, self.backend.decode_attention, sink)
        if key_sets is None:
            out = self._in_chunks(rows.shape[0], lambda i, j: a.replay_layer(
                layer, rows[i:j], cap.rope_at(layer), k_pre, v_pre, exclude[i:j], attend, self.cd))
        else:
            # Group rows leave out their whole group inside the knockout window (the adapter's attention
            # call is the same; the sets are bound here), the window's columns only.
            sets = torch.cat([b.exclude_set if layer - b.start < window else torch.full_like(b.exclude_set, -1)
                              for b in batches]).to(rows.device)
            key_sets = key_sets[:, lo:] if lo else key_sets
            out = self._in_chunks(rows.shape[0], lambda i, j: a.replay_layer(
                layer, rows[i:j], cap.rope_at(layer), k_pre, v_pre, exclude[i:j],
                functools.partial(attend, exclude_sets=key_sets, exclude_set=sets[i:j]),
                self.cd))
        self._hand_back(batches, out)

    @staticmethod
    def _hand_back(batches: list["_LogitsBatch"], out: torch.Tensor) -> None:
        """Give each batch its rows of ``out`` (the batches' rows replayed together, in order)."""
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

    def check_layer_kinds(self, config: SweepConfig, layers: list[int]) -> None:
        """Refuse what linear-attention layers do not support, with a one-line :class:`InputError`: a Logits
        knockout window reaching a linear layer after the measured one (each row would need its own copy of
        the state there)."""
        a = self.adapter
        linear = [layer for layer in range(a.num_layers) if a.layer_kind(layer) == a.LINEAR]
        if not linear:
            return
        if config.logits and config.knockout_window > 1:
            bad = [layer for layer in layers
                   if any(k in linear for k in range(layer + 1, min(layer + config.knockout_window, a.num_layers)))]
            if bad:
                raise InputError(f"{OPTIONS['knockout_window'].label} {config.knockout_window} reaches a "
                                 f"linear-attention layer after measured layer {bad[0]}; that is not supported "
                                 f"(linear-attention layers: {positions_text(linear, ', ')}): use window 1 or other layers")

    def run(self, prepared: Prepared, config: SweepConfig,
            on_layer: Callable[[int, int], None] | None = None,
            on_note: Callable[[str], None] | None = None) -> Iterator[StepResult]:
        """Generate greedily and yield one :class:`StepResult` per step (stops at a stop token).

        ``on_layer(step, layer)`` is called after each measured layer (progress reporting);
        ``on_note(text)`` receives remarks worth showing a user (e.g. that the Logits batch is chunked).
        """
        a = self.adapter
        layers = config.validate(a.num_layers)
        self.check_layer_kinds(config, layers)
        groups = None
        if config.groups is not None:
            groups = GroupSet(config.groups, prepared.input_ids.shape[1], a.device)
        elif config.mask_mode == "vision" and not bool(prepared.is_image.any()):
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
            positions = mask_positions(is_image, config.mask_mode) if groups is None else None
            n_rows = len(positions) if groups is None else groups.count
            # A group's keys, plus the final position's own column (key T of the Logits replay).
            key_sets = groups.key_sets(seq_len) if groups is not None and config.logits else None
            try:
                cap = a.prefill(prepared, cache) if step == 0 else a.decode(token, cache)
                if config.logits and on_note is not None:
                    rows = len(layers) * (n_rows + 1)
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
                            self._propagate(layer, batches, cap, cache, seq_len, config.knockout_window, key_sets)
                        if layer not in measured:
                            continue
                        lr, full_clean, full_delta = self.measure_layer(cap, cache, layer, positions, groups)
                        results[layer] = lr
                        if config.logits:
                            # Row 0 is this layer's clean output, replayed through the same arithmetic as
                            # the masked rows so that their difference is only the masking.
                            out = cap.x[layer].to(self.cd) + full_clean
                            # A key before every knockout layer's window has no effect anywhere: its
                            # Logits row is an exact zero and it is not replayed.
                            knocked = range(layer, min(layer + config.knockout_window, a.num_layers))
                            first = min(self.window_start(k, seq_len) for k in knocked)
                            if groups is None:
                                cols = torch.nonzero(positions >= first).flatten() if first else None
                                kept = positions if cols is None else positions[cols]
                            else:  # groups with a key in some knockout layer's window
                                cols = groups.reaching(first) if first else None
                            if cols is not None:
                                full_delta = full_delta.index_select(0, cols.to(full_delta.device))
                            h = torch.cat([out.unsqueeze(0), out.unsqueeze(0) + full_delta])
                            if groups is None:
                                ex = torch.cat([torch.tensor([-1]), kept.cpu()])
                                batches.append(_LogitsBatch(layer, h, ex, cols))
                            else:
                                ids = torch.arange(n_rows) if cols is None else cols.cpu()
                                batches.append(_LogitsBatch(layer, h, torch.full((1 + len(ids),), -1), cols,
                                                            torch.cat([torch.tensor([-1]), ids])))
                        if on_layer is not None:
                            on_layer(step, layer)
                    if config.logits:
                        target = config.target_token if config.target_token is not None else token
                        self._finish_logits(batches, results, target)
            except torch.OutOfMemoryError:
                # Chunked work has already been retried with smaller chunks (_in_chunks); what remains
                # does not fit. The caller keeps the completed steps (a .partial.parquet file).
                raise OutOfMemory(
                    f"out of memory at step {step} ({seq_len} tokens, {n_rows} masked "
                    f"{'positions' if groups is None else 'groups'}, "
                    f"{self.rows} rows per chunk): lower max_batch_rows (--max-batch-rows), use a smaller "
                    f"image (max_pixels (--max-pixels)) or measure fewer positions (mask_mode (--mask-mode))"
                ) from None
            yield StepResult(step, seq_len, [results[layer] for layer in layers], token, time.perf_counter() - t0)
            if token in stops:
                break
            is_image = torch.cat([is_image, torch.zeros(1, dtype=torch.bool)])
            seq_len += 1
