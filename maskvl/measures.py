"""The measures maskvl reports: their names, their formulas, and the one numerically stable way to
compute the two distances. Everything else in maskvl refers to this module.

Setting
-------
Generation step ``s`` measures the sequence ``prompt + s`` greedily generated tokens, of length ``S``;
the *final position* is ``S - 1``. For decoder layer ``L`` and key position ``p`` (``0 <= p < S``),
"masking p" removes key ``p`` from the softmax of the final query row at layer ``L`` only. Nothing at
any other position or layer changes. Let ``x`` be layer L's input at the final position,
``a_hj`` the final query's attention weights of head ``h`` and ``o_h = sum_j a_hj v_j`` its output.
With key ``p`` removed (closed form, exact):

    o_h^(-p) = (o_h - a_hp v_p) / (1 - a_hp)

(the one key per head with ``a_hp > 1/2`` is recomputed directly, since ``1 - a_hp`` cancels there).

Variants (the ``variant`` column)
---------------------------------
``Attn``
    the attention block's output at the final position, ``o_proj(concat_h o_h)``.
``Head_N``
    head N's contribution to the residual stream: ``W_o[:, N*D:(N+1)*D] @ o_N`` (o_proj applied to
    head N's slice alone; Qwen3's o_proj has no bias).
``Full``
    the layer's update of the residual stream: layer output minus layer input,
    ``Attn + MLP(post_attention_norm(x + Attn))``.
``Logits``
    the next-token logits after the final position is run on through the remaining layers, the final
    norm and the LM head (``maskvl/engine.py``, the Logits batches); also carries ``kl_divergence`` and
    ``target_prob_delta``.

Metrics (columns), for a clean vector ``c`` and its masked counterpart ``m = c + d``
-----------------------------------------------------------------------------------
``l2_distance``      ``||m - c||_2 = ||d||_2``
``cosine_distance``  ``1 - <c, m> / (||c|| ||m||)``

Both are computed in float32 or better whatever the model's dtype (float64 for float64 models).
The cosine distance is evaluated from the three moments ``A = ||c||^2``, ``B = <c, d>``,
``C = ||d||^2`` in the cancellation-free form

    ||m|| - ||c|| = (2B + C) / (||c|| + ||m||)
    cosine_distance = (C - (||m|| - ||c||)^2) / (2 ||c|| ||m||)

which is algebraically identical to ``1 - cos`` but keeps full relative precision when ``d`` is tiny
(where ``1 - cos`` computed directly loses everything to rounding). By convention the cosine distance
is 0 when both vectors are zero and 1 when exactly one is.
"""

from __future__ import annotations

import re

import torch

# The two numeric helpers live in maskvl/numerics.py, where the ops use them without importing the
# measure definitions; measures re-exports them (this module's docstring keeps the formulas).
from .numerics import compute_dtype, distances_from_moments  # noqa: F401

FULL = "Full"
ATTN = "Attn"
LOGITS = "Logits"
HEAD_PREFIX = "Head_"

DEFINITIONS: dict[str, str] = {
    FULL: "layer output minus layer input at the final position: Attn + MLP(post_attention_norm(x + Attn))",
    ATTN: "o_proj output at the final position",
    "Head_N": "head N's contribution to the residual stream: o_proj applied to head N's output slice alone",
    LOGITS: "next-token logits after running the final position through the remaining layers, norm and lm_head",
    "l2_distance": "||clean - masked||_2, computed in float32 or better",
    "cosine_distance": "1 - cos(clean, masked), computed in float32 or better (cancellation-free form)",
    "kl_divergence": "KL(softmax(clean logits) || softmax(masked logits)) in nats (Logits rows only)",
    "target_prob_delta": "p_clean(t) - p_masked(t) for the target token t (Logits rows only)",
    "masking": "key p is removed from the final query row's softmax at layer L only; "
    "o^(-p) = (o - a_p v_p) / (1 - a_p), argmax key recomputed directly",
}


def head_variant(n: int) -> str:
    """The variant name of head ``n``: ``Head_n``."""
    return f"{HEAD_PREFIX}{n}"


def variant_names(num_heads: int, logits: bool = False) -> list[str]:
    """All variant names in their natural order: Full, Attn, Head_0 … Head_{H-1}, then Logits."""
    names = [FULL, ATTN] + [head_variant(h) for h in range(num_heads)]
    if logits:
        names.append(LOGITS)
    return names


_HEAD_RE = re.compile(r"^Head_(\d+)$")


def variant_sort_key(name: str) -> tuple[int, int, str]:
    """Natural order of variant names (Full, Attn, Head_0, Head_1, …, Head_10, …, Logits, others)."""
    if name == FULL:
        return (0, 0, "")
    if name == ATTN:
        return (1, 0, "")
    m = _HEAD_RE.match(name)
    if m:
        return (2, int(m.group(1)), "")
    if name == LOGITS:
        return (3, 0, "")
    return (4, 0, name)


def logits_effects(clean: torch.Tensor, masked: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KL divergence and target-probability change of masked next-token distributions.

    Args:
        clean: ``[V]`` clean logits; masked: ``[B, V]`` masked logits (both in the compute dtype).
        target: the token t whose probability change is reported.

    Returns:
        ``kl [B]`` = ``sum_v p_c(v) (log p_c(v) - log p_m(v))`` (nats) and
        ``target_prob_delta [B]`` = ``p_c(t) - p_m(t)``.
    """
    lc = torch.log_softmax(clean, dim=-1)
    lm = torch.log_softmax(masked, dim=-1)
    kl = (lc.exp().unsqueeze(0) * (lc.unsqueeze(0) - lm)).sum(-1).clamp_min(0)
    tpd = lc[target].exp() - lm[:, target].exp()
    return kl, tpd


def vector_distances_direct(clean: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances between explicit vectors ``clean [..., N]`` and ``masked [..., N]`` (the naive path).

    Used by the brute-force reference: the same formula as :func:`distances_from_moments` applied
    to ``d = masked - clean``.
    """
    d = masked - clean
    A = (clean * clean).sum(-1)
    B = (clean * d).sum(-1)
    C = (d * d).sum(-1)
    return distances_from_moments(A, B, C)
