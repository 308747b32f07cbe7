"""The naive method, done right: one real forward of the transformers model per (step, layer, key).

For every generation step s, layer L and masked key p this runs the unmodified model on the whole
sequence (prompt + s greedy tokens, fresh, no cache) with exactly one attention entry removed: key p
for the final query row at layer L (for group knockout: every key of the group, for that row only).
At a linear-attention layer (Qwen3.5's Gated DeltaNet) removing p means skipping p's write to the state
for the final position's readout only: the adapter runs the layer's own forward once more with g_p = 0 and
beta_p = 0 and splices only the final position's output (``ModelAdapter.knockout_linear``).
The removal at softmax layers goes through transformers' attention-function registry (a registered attention
implementation named ``maskvl_knockout``, selected on the model's text config only for the duration of
the call), not by patching transformers. Layer L's attention is then computed
explicitly in float64 (float64 models) or float32 (others), under the attention mask transformers
built for that layer (causal, or causal with a sliding window); every other layer uses the model's own
SDPA attention. The clean vectors each masked forward is compared with come from the same forward
with nothing removed (layer L's attention computed the same explicit way), so a removal that changes
nothing (a key outside a sliding window) gives exact zeros. Hooks read the final position's layer
input and output, o_proj's input and output, and the final logits.

It is slow by design: it is the ground truth that the fast engine is tested against.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from . import measures
from .engine import mask_positions
from .options import MASK_MODES
from .models.base import ModelAdapter, Prepared

KNOCKOUT_ATTN = "maskvl_knockout"

_target = threading.local()


def _knockout_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention with key ``p`` (or every key of a set) removed for the final query row at the target
    layers only (``p`` None: nothing removed, the same explicit arithmetic).

    ``query [B, H, Sq, D]``, ``key/value [B, KV, Sk, D]``; returns ``([B, Sq, H, D], None)`` like
    transformers' attention functions.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    target = getattr(_target, "value", None)
    # Learned sinks (GPT-OSS's s_aux): a softmax column with no value, kept at every layer; sdpa has none.
    sink = kwargs.pop("s_aux", None)
    if sink is None and (target is None or module.layer_idx not in target[0]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    p = target[1] if target is not None and module.layer_idx in target[0] else None
    B, H, Sq, D = query.shape
    KV, Sk = key.shape[1], key.shape[2]
    cd = measures.compute_dtype(query.dtype)
    heads = torch.arange(H, device=query.device) // (H // KV)
    k = key.to(cd)[:, heads]
    v = value.to(cd)[:, heads]
    s = torch.matmul(query.to(cd), k.transpose(-1, -2)) * (scaling if scaling is not None else D ** -0.5)
    if attention_mask is None:
        qpos = torch.arange(Sk - Sq, Sk, device=query.device)
        allowed = (torch.arange(Sk, device=query.device)[None, :] <= qpos[:, None]).expand(B, 1, Sq, Sk)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[..., :Sk]
    else:
        allowed = attention_mask[..., :Sk] == 0
    allowed = allowed.clone()
    if p is not None:
        allowed[..., Sq - 1, torch.as_tensor(p, dtype=torch.long, device=allowed.device)] = False
    s = s.masked_fill(~allowed, float("-inf"))
    if sink is not None:
        c = sink.to(cd).reshape(1, H, 1, 1).expand(B, H, Sq, 1)
        out = torch.matmul(torch.softmax(torch.cat([s, c], dim=-1), dim=-1)[..., :Sk], v)
    else:
        out = torch.matmul(torch.softmax(s, dim=-1), v)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(KNOCKOUT_ATTN, _knockout_attention)
    AttentionMaskInterface.register(KNOCKOUT_ATTN, sdpa_mask)


@contextlib.contextmanager
def knockout(adapter: ModelAdapter, layers: Any, position: int | Sequence[int] | None) -> Iterator[None]:
    """Within the block, the decoder attention removes ``position`` for the final query at ``layers``.

    ``layers`` is a layer index or a collection of them (the Logits measure's knockout window);
    ``position`` a key position or a collection of them, removed together (group knockout); None computes
    those layers' attention the same explicit way without removing anything.
    """
    _register()
    cfg = adapter.attention_config()
    before = cfg._attn_implementation
    cfg._attn_implementation = KNOCKOUT_ATTN
    linear: list[int] = []
    if layers is None:
        _target.value = None
    else:
        keys = position if position is None or isinstance(position, int) else sorted(set(position))
        chosen = frozenset([layers] if isinstance(layers, int) else layers)
        _target.value = (chosen, keys)
        # Linear-attention layers (Qwen3.5): the layer's own forward with the writes skipped, only the
        # final position's output spliced in (the adapter's knockout_linear).
        if keys is not None:
            linear = sorted(layer for layer in chosen if adapter.layer_kind(layer) == adapter.LINEAR)
            keys_list = [keys] if isinstance(keys, int) else list(keys)
    try:
        with contextlib.ExitStack() as stack:
            for layer in linear:
                stack.enter_context(adapter.knockout_linear(layer, keys_list))
            yield
    finally:
        _target.value = None
        cfg._attn_implementation = before


@dataclass
class _Vectors:
    full: torch.Tensor  # [d]
    attn: torch.Tensor  # [d]
    heads: torch.Tensor  # [H, d]
    logits: torch.Tensor  # [V]


def _capture_forward(adapter: ModelAdapter, prepared: Prepared, generated: list[int], layers: list[int],
                     target: tuple[Any, Any] | None) -> dict[int, _Vectors]:
    """One full forward (with the knockout ``target`` if given); the final position's vectors per layer."""
    cd = measures.compute_dtype(adapter.dtype)
    store: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in layers}
    handles = []
    for layer in layers:
        s = store[layer]

        def pre(mod, args, kw, s=s):
            h = args[0] if args else kw["hidden_states"]
            s["x"] = h[0, -1].to(cd)

        def post(mod, args, kw, out, s=s):
            h = out[0] if isinstance(out, tuple) else out
            s["y"] = h[0, -1].to(cd)

        def o_in(mod, args, s=s):
            s["o"] = args[0][0, -1].to(cd)

        def o_out(mod, args, out, s=s):
            s["attn"] = out[0, -1].to(cd)

        handles.append(adapter.decoder_layer(layer).register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(adapter.decoder_layer(layer).register_forward_hook(post, with_kwargs=True))
        handles.append(adapter.o_proj(layer).register_forward_pre_hook(o_in))
        handles.append(adapter.o_proj(layer).register_forward_hook(o_out))
    try:
        with knockout(adapter, *(target if target else (None, None))):
            logits = adapter.forward_full(prepared, generated).to(cd)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for layer in layers:
        s = store[layer]
        w = adapter.o_proj(layer).weight.to(cd)  # [d, H*D]
        H = adapter.layer_heads(layer)  # a linear layer: its value heads, o_proj its output projection
        D = w.shape[1] // H
        o = s["o"].reshape(H, D)
        # Head h's contribution, materialized explicitly: o_proj applied to head h's slice alone.
        heads = torch.stack([w[:, h * D:(h + 1) * D] @ o[h] for h in range(H)])
        out[layer] = _Vectors(full=s["y"] - s["x"], attn=s["attn"], heads=heads, logits=logits)
    return out


@dataclass
class NaiveStep:
    """Brute-force results of one step: per layer ``l2``/``cos`` ``[V, P]`` (variant order as the engine).

    In a group run the P columns are the groups (``group_index [P]``) and ``positions`` is -1.
    """

    step: int
    positions: np.ndarray
    l2: dict[int, np.ndarray]
    cos: dict[int, np.ndarray]
    generated_id: int
    logits_clean: torch.Tensor  # [V], the model's own forward
    logits_masked: dict[int, torch.Tensor]  # layer -> [P, V]
    logits_unmasked: dict[int, torch.Tensor]  # layer -> [V], the same knockout forward removing nothing
    group_index: np.ndarray | None = None

    def logits_measures(self, layer: int, target: int | None = None) -> dict[str, np.ndarray]:
        """``l2``, ``cos``, ``kl``, ``tpd`` ``[P]`` of the Logits variant at ``layer`` (target: greedy token)."""
        t = self.generated_id if target is None else target
        m = self.logits_masked[layer]
        clean = self.logits_unmasked[layer]
        l2, cos = measures.vector_distances_direct(clean.expand_as(m), m)
        kl, tpd = measures.logits_effects(clean, m, t)
        return {k: x.cpu().numpy() for k, x in (("l2", l2), ("cos", cos), ("kl", kl), ("tpd", tpd))}


@torch.no_grad()
def naive_sweep(adapter: ModelAdapter, prepared: Prepared, mask_mode: str = "text", num_tokens: int = 1,
                layers: list[int] | None = None, knockout_window: int = 1,
                groups: Sequence[Sequence[int]] | None = None) -> list[NaiveStep]:
    """The naive method: a full masked forward per (step, layer, masked position).

    With ``knockout_window`` k the key is removed at layers L..L+k-1 (the Logits measure's window);
    layer L's own vectors do not depend on later layers, so Full/Attn/Head stay the single-layer ones.
    With ``groups`` (position sets) each forward removes a whole set instead, one column per set, and
    ``mask_mode`` is not used.
    """
    if mask_mode not in MASK_MODES:
        raise ValueError(f"unknown mask mode {mask_mode!r}")
    layers = list(range(adapter.num_layers)) if layers is None else layers
    stops = adapter.stop_token_ids()
    generated: list[int] = []
    is_image = prepared.is_image.clone()
    steps = []
    for step in range(num_tokens):
        logits_clean = adapter.forward_full(prepared, generated).to(measures.compute_dtype(adapter.dtype))
        positions = mask_positions(is_image, mask_mode).tolist() if groups is None else [-1] * len(groups)
        removed = [[p] for p in positions] if groups is None else [list(g) for g in groups]
        l2: dict[int, np.ndarray] = {}
        cos: dict[int, np.ndarray] = {}
        logits_masked: dict[int, torch.Tensor] = {}
        logits_unmasked: dict[int, torch.Tensor] = {}
        for layer in layers:
            rows_l2, rows_cos, rows_logits = [], [], []
            window = range(layer, min(layer + knockout_window, adapter.num_layers))
            c = _capture_forward(adapter, prepared, generated, [layer], (window, None))[layer]
            logits_unmasked[layer] = c.logits
            for keys in removed:
                m = _capture_forward(adapter, prepared, generated, [layer], (window, keys))[layer]
                pairs = [(c.full, m.full), (c.attn, m.attn)] + [(c.heads[h], m.heads[h])
                                                                for h in range(adapter.layer_heads(layer))]
                d = [measures.vector_distances_direct(a, b) for a, b in pairs]
                rows_l2.append(torch.stack([x[0] for x in d]))
                rows_cos.append(torch.stack([x[1] for x in d]))
                rows_logits.append(m.logits)
            l2[layer] = torch.stack(rows_l2, 1).cpu().numpy()
            cos[layer] = torch.stack(rows_cos, 1).cpu().numpy()
            logits_masked[layer] = torch.stack(rows_logits)
        token = int(logits_clean.argmax())
        steps.append(NaiveStep(step, np.array(positions), l2, cos, token, logits_clean, logits_masked,
                               logits_unmasked, None if groups is None else np.arange(len(groups))))
        if token in stops:
            break
        generated.append(token)
        is_image = torch.cat([is_image, torch.zeros(1, dtype=torch.bool)])
    return steps


def relative_l2_error(fast: Any, ref: Any) -> float:
    """``||fast - ref|| / ||ref||`` over all elements (0 when both are zero)."""
    fast = np.asarray(fast, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    den = np.linalg.norm(ref)
    num = np.linalg.norm(fast - ref)
    return float(num / den) if den > 0 else float(num)
