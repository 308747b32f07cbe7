"""Attention sinks (GPT-OSS): a learned logit per head in the softmax denominator that carries no value.

With scores ``s_hj = scale <q_h, k_j>`` and the sink logit ``c_h``:

    a'_hj = exp(s_hj) / (Z_h + exp(c_h)),   Z_h = sum_j exp(s_hj)
    o'_h  = sum_j a'_hj v_j = f_h o_h,      f_h = Z_h / (Z_h + e^{c_h}) = sigmoid(lse_h - c_h)

where ``o_h`` is the sink-free attention output the kernels compute (``lse_h = log Z_h``). The sink
stays in the denominator when keys are removed: removing a set G (one key: G = {p}) leaves
``Z_-G = Z (1 - m_G)`` with ``m_G = sum_{j in G} a_hj`` the sink-free attention mass of G, so

    o'^(-G) = f_G o^(-G),   f_G = Z_-G / (Z_-G + e^c)
    delta'_G = o'^(-G) - o' = f_G delta_G + (f_G - f) o

(``delta_G = o^(-G) - o`` from the sink-free op, exact there including its own a -> 1 safeguard), and

    f_G - f = - m_G b / ((1 - m_G) + B),   b = e^c / (Z + e^c) = sigmoid(c - lse),  B = e^{c - lse}

a product of positive terms, so no cancellation, while ``m_G <= 1/2``. Where ``m_G > 1/2`` (at most one
key per head; for groups, a group holding most of the mass) ``1 - m_G`` cancels, so ``log Z_-G`` is
computed directly as a logsumexp over the remaining keys. A set holding every key leaves only the sink:
the masked output is zero (``f_G = 0``).

For the decode rows of the Logits replay, each row's output is scaled by ``sigmoid(lse_b - c)`` over the
keys that row attends to (a row with no key left outputs zero).

The sink-free kernels of every backend run unchanged; these corrections are O(H T) (plus the scores,
O(H T D), the cost of the op's own first pass) and are written in PyTorch, so they run on any device.
:func:`masked_outputs_reference` (the sink as one more softmax column, every removal done explicitly)
is the plain reference they are tested against.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..numerics import compute_dtype
from .loo_group_attention import DIRECT_ABOVE, member_pairs

#: Elements of a decode score block [rows, H, T + 1] computed at once for the rows' log-sum-exp.
DECODE_BLOCK = 1 << 24


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, cd: torch.dtype) -> torch.Tensor:
    """``q [H, D]``, ``k [T, KV, D]`` -> ``s [H, T]`` in ``cd`` (GQA: head h reads KV head h // (H // KV))."""
    H, D = q.shape
    T, KV, _ = k.shape
    qg = q.to(cd).reshape(KV, H // KV, D)
    return torch.einsum("kgd,tkd->kgt", qg, k.to(cd)).reshape(H, T) * scale


def _combine(o: torch.Tensor, delta: torch.Tensor, s: torch.Tensor, c: torch.Tensor, mass: torch.Tensor,
             direct_lse: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The sink correction of ``o [H, D]``, ``delta [N, H, D]`` given the sets' sink-free masses
    ``mass [H, N]``; ``direct_lse(hs, ns)`` -> log Z_-G for the (head, set) pairs with mass > 1/2."""
    lse = torch.logsumexp(s, dim=-1)  # [H]
    x = lse - c
    f = torch.sigmoid(x)  # the sink-free share of the denominator
    b = torch.sigmoid(-x)  # the sink's share
    B = torch.exp(-x)  # e^c / Z (inf when the sink dominates beyond the dtype's range: then f_G - f -> 0)
    df = -mass * b.unsqueeze(1) / ((1 - mass) + B.unsqueeze(1))  # [H, N]
    hs, ns = torch.nonzero(mass > DIRECT_ABOVE, as_tuple=True)
    if hs.numel():
        lz = direct_lse(hs, ns)  # -inf where no key is left
        df[hs, ns] = torch.sigmoid(lz - c[hs]) - f[hs]
    fg = f.unsqueeze(1) + df  # [H, N]
    delta_s = fg.T.unsqueeze(-1) * delta + df.T.unsqueeze(-1) * o.unsqueeze(0)
    return f.unsqueeze(-1) * o, delta_s


def loo_attention(o: torch.Tensor, delta: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float,
                  sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the sinks to a leave-one-out result.

    Args:
        o: ``[H, D]``, delta: ``[T, H, D]`` the sink-free ``loo_attention`` outputs (compute dtype).
        q: ``[H, D]``; k: ``[T, KV, D]``; scale: the softmax scale; sinks: ``[H]`` sink logits.

    Returns:
        ``(o' [H, D], delta' [T, H, D])`` with the sinks in the denominator.
    """
    cd = o.dtype
    s = _scores(q, k, scale, cd)  # [H, T]
    c = sinks.to(device=o.device, dtype=cd)
    a = torch.softmax(s, dim=-1)

    def direct(hs: torch.Tensor, ps: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(s[hs].index_put((torch.arange(hs.numel(), device=s.device), ps),
                                               torch.tensor(float("-inf"), dtype=cd, device=s.device)), dim=-1)

    return _combine(o, delta, s, c, a, direct)


def loo_group_attention(o: torch.Tensor, delta: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float,
                        members: torch.Tensor, offsets: torch.Tensor, sinks: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the sinks to a leave-group-out result: ``o [H, D]``, ``delta [NG, H, D]`` from
    ``loo_group_attention`` with the groups as CSR ``members [M]``, ``offsets [NG + 1]``; ``sinks [H]``."""
    cd = o.dtype
    dev = o.device
    s = _scores(q, k, scale, cd)  # [H, T]
    c = sinks.to(device=dev, dtype=cd)
    a = torch.softmax(s, dim=-1)
    members = members.to(dev, torch.int64)
    offsets = offsets.to(dev, torch.int64)
    NG = offsets.numel() - 1
    gid, pos = member_pairs(members, offsets, torch.arange(NG, device=dev))
    mass = a.new_zeros(s.shape[0], NG).index_add_(1, gid, a[:, pos])  # [H, NG]

    def direct(hs: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
        row, col = member_pairs(members, offsets, gs)
        return torch.logsumexp(s[hs].index_put((row, col), torch.tensor(float("-inf"), dtype=cd, device=dev)), -1)

    return _combine(o, delta, s, c, mass, direct)


def decode_attention(out: torch.Tensor, q: torch.Tensor, k_prefix: torch.Tensor, k_own: torch.Tensor, scale: float,
                     exclude: torch.Tensor, exclude_sets: torch.Tensor | None, exclude_set: torch.Tensor | None,
                     sinks: torch.Tensor) -> torch.Tensor:
    """Apply the sinks to shared-prefix decode rows: ``out [B, H, D]`` from ``decode_attention`` for
    ``q [B, H, D]`` against ``k_prefix [T, KV, D]`` and ``k_own [B, KV, D]`` with the rows' exclusions
    (see ``decode_attention.py``); ``sinks [H]``. Returns ``[B, H, D]``."""
    B, H, D = q.shape
    T, KV, _ = k_prefix.shape
    cd = out.dtype
    dev = out.device
    c = sinks.to(device=dev, dtype=cd)
    cols = torch.arange(T + 1, device=dev)
    scaled = torch.empty_like(out)
    # Rows in blocks: the scores of all rows at once would be [B, H, T + 1].
    step = max(1, DECODE_BLOCK // max(1, H * (T + 1)))
    kp = k_prefix.to(cd)
    for i in range(0, B, step):
        j = min(B, i + step)
        qg = q[i:j].to(cd).reshape(j - i, KV, H // KV, D)
        s = torch.cat([torch.einsum("bkgd,tkd->bkgt", qg, kp),
                       torch.einsum("bkgd,bkd->bkg", qg, k_own[i:j].to(cd)).unsqueeze(-1)], -1) * scale
        drop = cols.unsqueeze(0) == exclude[i:j].to(dev).long().unsqueeze(1)  # [b, T + 1]
        if exclude_sets is not None and exclude_sets.shape[0]:
            idx = exclude_set[i:j].to(dev).long()
            drop = drop | (exclude_sets.to(dev)[idx.clamp_min(0)] & (idx >= 0).unsqueeze(1))
        s = s.masked_fill(drop[:, None, None, :], float("-inf"))
        lse = torch.logsumexp(s, dim=-1).reshape(j - i, H)  # -inf for a row with no key left
        f = torch.sigmoid(lse - c)
        # A row with no key left: only the sink remains, so its output is zero (the kernels give NaN).
        scaled[i:j] = torch.where(torch.isneginf(lse).unsqueeze(-1), 0.0, f.unsqueeze(-1) * out[i:j])
    return scaled


def masked_outputs_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sinks: torch.Tensor,
                             removed: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain reference: attention with the sink as one more softmax column (value zero), clean and
    with each set of ``removed`` keys masked out explicitly. ``q [H, D]``, ``k, v [T, KV, D]``,
    ``sinks [H]`` -> ``(o' [H, D], delta' [N, H, D])`` in the compute dtype. O(N H T D): for tests."""
    H, D = q.shape
    T, KV, _ = k.shape
    cd = compute_dtype(q.dtype)
    heads = torch.arange(H, device=q.device) // (H // KV)
    s = _scores(q, k, scale, cd)  # [H, T]
    vh = v.to(cd)[:, heads].transpose(0, 1)  # [H, T, D]
    c = sinks.to(device=q.device, dtype=cd).unsqueeze(1)

    def attend(mask: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(torch.cat([s.masked_fill(~mask, float("-inf")), c], dim=1), dim=1)[:, :T]
        return torch.einsum("ht,htd->hd", a, vh)

    everything = torch.ones(T, dtype=torch.bool, device=q.device)
    o = attend(everything)
    out = []
    for group in removed:
        keep = everything.clone()
        keep[torch.as_tensor(group, dtype=torch.long, device=q.device)] = False
        out.append(attend(keep) - o)
    return o, torch.stack(out) if out else o.new_zeros((0, H, D))


def check_sinks(sinks: torch.Tensor, H: int) -> None:
    """Raise ``ValueError`` unless ``sinks`` is a floating ``[H]`` tensor."""
    if sinks.shape != (H,) or not sinks.dtype.is_floating_point:
        raise ValueError(f"sinks must be a floating [{H}] tensor, got {sinks.dtype} {tuple(sinks.shape)}")

