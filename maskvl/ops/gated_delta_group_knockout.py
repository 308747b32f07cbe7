"""Gated-delta-rule knockout of position SETS for the final position (group runs at Qwen3.5's linear layers).

As ``gated_delta_knockout`` (read its docstring for the layer, the inputs and the notation), but each row
skips the writes of a whole group of positions ``M`` at once (``g_p = 0``, ``beta_p = 0`` for every
``p in M``), for the final readout only. Skipping several writes is not the sum of skipping each (a skipped
write changes what the later writes of the group see), so there is no one-scan closed form over all
positions; instead every group's state DIFFERENCE is carried forward exactly.

Derivation (one value head; clean states ``S_t``, ``a_t = exp(g_t)``, ``A_t = a_t (I - beta_t k_t k_t^T)``,
the group's states ``S'_t``, ``E_t = S'_t - S_t``, ``E_{-1} = 0``)::

    t not in M:  S'_t = a_t S'_{t-1} + beta_t k_t (v_t - a_t S'^T_{t-1} k_t)^T   =>  E_t = A_t E_{t-1}
    t in M:      S'_t = S'_{t-1}                                                  =>  E_t = E_{t-1} - D_t
    D_t = S_t - S_{t-1} = -expm1(g_t) S_{t-1} + k_t w_t^T,   w_t = beta_t (v_t - a_t S_{t-1}^T k_t)

    delta = o^(-M) - o = E_{T-1}^T q_hat

One forward scan of the clean state with the groups' differences beside it: O(NG T dk dv) per head, the
cost of NG clean forwards, with no difference of two readouts of size ``|o|`` (the same numerics as the
single-position op: ``1 - a`` as ``-expm1(g)``). A group's difference stays zero until its first member.

Implementations: :func:`gated_delta_group_knockout_reference` (PyTorch, vectorized over groups and heads;
every backend runs it: group runs are few rows, the per-position op is the hot one), and
:func:`gated_delta_group_knockout_naive`, the oracle the tests compare with: one literal recurrence per
group. Groups are CSR ``members [M]``, ``offsets [NG + 1]`` (int64), as ``loo_group_attention`` takes them.
"""

from __future__ import annotations

import torch

from .gated_delta_knockout import prepare_inputs

#: Bytes of group state differences kept at once; the groups are processed in chunks beyond that.
CHUNK_BYTES = 256 * 2**20


def _membership(members: torch.Tensor, offsets: torch.Tensor, T: int) -> torch.Tensor:
    """``[NG, T]`` bool: position ``t`` is in group ``g``."""
    NG = offsets.numel() - 1
    counts = (offsets[1:] - offsets[:-1]).cpu()
    gid = torch.repeat_interleave(torch.arange(NG), counts)
    inside = torch.zeros(NG, T, dtype=torch.bool)
    inside[gid, members.cpu()] = True
    return inside


def check_groups(members: torch.Tensor, offsets: torch.Tensor, T: int) -> None:
    """Raise ``ValueError`` unless the CSR groups are non-empty sets of positions in ``[0, T)``."""
    if offsets.dim() != 1 or offsets.numel() < 1 or int(offsets[0]) != 0 or int(offsets[-1]) != members.numel():
        raise ValueError("gated_delta_group_knockout: offsets must start at 0 and end at len(members)")
    if bool((offsets[1:] <= offsets[:-1]).any()):
        raise ValueError("gated_delta_group_knockout: every group needs at least one member")
    if members.numel() and (int(members.min()) < 0 or int(members.max()) >= T):
        raise ValueError(f"gated_delta_group_knockout: a member is outside the positions 0-{T - 1}")


def gated_delta_group_knockout_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, scale: float,
    qk_l2norm: bool, members: torch.Tensor, offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean readout and each group's change: ``o [Hv, dv]``, ``delta [NG, Hv, dv]`` (compute dtype).

    ``q [Hk, dk]``, ``k [T, Hk, dk]``, ``v [T, Hv, dv]``, ``g, beta [T, Hv]`` as in
    ``gated_delta_knockout``; ``members [M]``, ``offsets [NG + 1]`` the groups.
    """
    qh, kh, vh, gh, bh = prepare_inputs(q, k, v, g, beta, scale, qk_l2norm)
    T, Hv, dk = kh.shape
    dv = vh.shape[2]
    check_groups(members, offsets, T)
    NG = offsets.numel() - 1
    inside = _membership(members, offsets, T).to(qh.device)
    a = gh.exp()
    one_minus_a = -torch.expm1(gh)
    per_group = Hv * dk * dv * qh.element_size()
    step = max(1, CHUNK_BYTES // per_group)
    delta = torch.full((NG, Hv, dv), float("nan"), dtype=qh.dtype, device=qh.device)
    o = None
    for lo in range(0, max(NG, 1), step):
        hi = min(NG, lo + step)
        mine = inside[lo:hi]  # [n, T]
        S = torch.zeros(Hv, dk, dv, dtype=qh.dtype, device=qh.device)
        E = torch.zeros(hi - lo, Hv, dk, dv, dtype=qh.dtype, device=qh.device)
        first = int(mine.any(0).nonzero().min()) if hi > lo else T
        for t in range(T):
            kt = kh[t]  # [Hv, dk]
            x = (S * kt[:, :, None]).sum(1)  # S^T k  [Hv, dv]
            w = bh[t, :, None] * (vh[t] - a[t, :, None] * x)
            if t >= first:
                # Groups without t: E <- A_t E = a (E - beta k (k^T E)); groups with t: E <- E - D_t.
                kE = (E * kt[None, :, :, None]).sum(2)  # [n, Hv, dv]
                AE = a[t, None, :, None, None] * (E - bh[t, None, :, None, None] * kt[None, :, :, None]
                                                  * kE[:, :, None, :])
                D = -one_minus_a[t, :, None, None] * S + kt[:, :, None] * w[:, None, :]
                E = torch.where(mine[:, t, None, None, None], E - D[None], AE)
            S = a[t, :, None, None] * S + kt[:, :, None] * w[:, None, :]
        delta[lo:hi] = (E * qh[None, :, :, None]).sum(2)
        o = (S * qh[:, :, None]).sum(1)
    if o is None:  # no group: the clean readout alone
        S = torch.zeros(Hv, dk, dv, dtype=qh.dtype, device=qh.device)
        for t in range(T):
            x = (S * kh[t][:, :, None]).sum(1)
            w = bh[t, :, None] * (vh[t] - a[t, :, None] * x)
            S = a[t, :, None, None] * S + kh[t][:, :, None] * w[:, None, :]
        o = (S * qh[:, :, None]).sum(1)
    return o, delta


def gated_delta_group_knockout_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, scale: float,
    qk_l2norm: bool, members: torch.Tensor, offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: the clean recurrence and, per group, the literal recurrence with ``g = 0, beta = 0`` at
    its members (transformers' decay, read, write); its readout minus the clean one. O(NG T dk dv)."""
    qh, kh, vh, gh, bh = prepare_inputs(q, k, v, g, beta, scale, qk_l2norm)
    T, Hv, dk = kh.shape
    dv = vh.shape[2]
    check_groups(members, offsets, T)
    inside = _membership(members, offsets, T)

    def readout(skip: torch.Tensor | None) -> torch.Tensor:
        S = torch.zeros(Hv, dk, dv, dtype=qh.dtype, device=qh.device)
        for t in range(T):
            gt, bt = (torch.zeros_like(gh[t]), torch.zeros_like(bh[t])) if skip is not None and skip[t] else (gh[t], bh[t])
            S = S * gt.exp()[:, None, None]
            kv_mem = (S * kh[t][:, :, None]).sum(1)
            d = (vh[t] - kv_mem) * bt[:, None]
            S = S + kh[t][:, :, None] * d[:, None, :]
        return (S * qh[:, :, None]).sum(1)

    o = readout(None)
    delta = torch.stack([readout(inside[i]) - o for i in range(inside.shape[0])]) if inside.shape[0] else \
        o.new_zeros((0, Hv, dv))
    return o, delta
