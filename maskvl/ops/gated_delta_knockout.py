"""Gated-delta-rule knockout for the final position: schema, fake kernel, reference, naive oracle, dispatch.

Qwen3.5's linear-attention layers (Gated DeltaNet; transformers'
``models/qwen3_5/modeling_qwen3_5.py``, ``torch_recurrent_gated_delta_rule``) keep one state per value
head. This op returns the final position's clean readout and, for every position ``p``, how that readout
changes when position ``p``'s write is skipped (``g_p = 0`` and ``beta_p = 0``, so ``S_p = S_{p-1}``),
for the final readout only.

Inputs, after the layer's short causal convolution (``Hk`` key heads, ``Hv`` value heads, ``G = Hv / Hk``;
value head ``h`` reads key head ``h // G``, transformers' ``repeat_interleave``)::

    q    [Hk, dk]   the final position's query          k    [T, Hk, dk]   keys of all positions
    v    [T, Hv, dv] values                              g    [T, Hv]       log-decays (<= 0)
    beta [T, Hv]    write strengths in (0, 1)

    q_hat = scale * q / sqrt(|q|^2 + eps),  k_t <- k_t / sqrt(|k_t|^2 + eps)   (if ``qk_l2norm``; eps 1e-6)

Outputs: ``o [Hv, dv]`` the clean readout and ``delta [T, Hv, dv]`` (knocked out minus clean), like
``loo_attention``, in the compute dtype (float64 for float64 inputs, float32 otherwise: bf16/fp16 are
upcast; ``g`` and ``beta`` are cast to the compute dtype of ``q``).

Derivation (one value head; states ``S_t [dk, dv]``, ``a_t = exp(g_t)``)::

    S_{-1} = 0,   S_t = a_t S_{t-1} + k_t w_t^T,   w_t = beta_t (v_t - a_t S_{t-1}^T k_t),   o = S_{T-1}^T q_hat

This is transformers' update (decay, ``kv_mem = S^T k``, ``delta = beta (v - kv_mem)``, ``S += k delta^T``).
Equivalently ``S_t = A_t S_{t-1} + beta_t k_t v_t^T`` with the symmetric transition
``A_t = a_t (I - beta_t k_t k_t^T)``. Skipping ``p``'s write gives ``S'_p = S_{p-1}`` and, for ``t > p``, the
same affine steps: the difference ``E_t = S_t - S'_t`` follows ``E_t = A_t E_{t-1}`` (the writes cancel)
from ``E_p = S_p - S_{p-1}``. Hence::

    o - o^(-p) = E_{T-1}^T q_hat = E_p^T (A_{T-1} ... A_{p+1})^T q_hat = E_p^T u_p,
    u_p = A_{p+1} A_{p+2} ... A_{T-1} q_hat        (transposing the product reverses it; each A is symmetric)

``u`` is a reverse scan from the final query: ``u_{T-1} = q_hat``,
``u_{p-1} = A_p u_p = a_p (u_p - beta_p c_p k_p)`` with ``c_p = k_p^T u_p``: O(dk) per step, a rank-1
update of one vector (no product of A's is ever formed). With ``E_p = (a_p - 1) S_{p-1} + k_p w_p^T``::

    delta_p = o^(-p) - o = -E_p^T u_p = -expm1(g_p) z_p - c_p w_p,
    z_p = S_{p-1}^T u_p,   w_p = beta_p (v_p - a_p x_p),   x_p = S_{p-1}^T k_p

So one reverse scan (``u [T, dk]`` and ``c [T]``: the size of ``k``, no states) and one forward scan that
reads ``x_p`` and ``z_p`` off the state before step ``p`` gives every position: O(T dk dv) per head, the
cost of one clean forward, with one state in memory, instead of T recurrences. ``T == 1``: ``S_{-1} = 0``
so ``delta_0 = -c_0 w_0 = -o`` (the masked readout is zero).

Numerics: ``delta`` is formed from its own terms, never as the difference of two readouts of size
``|o|``; ``1 - a_p`` is ``-expm1(g_p)``, exact for gates near 1 (``g -> 0``) where ``1 - exp(g)``
would cancel; for gates near 0 (``g << 0``) ``u`` decays towards 0 going back, which is the exact
answer (a write that is forgotten does not matter) and underflows harmlessly. Compute dtype as above.

Implementations: :func:`gated_delta_knockout_reference` (here, vectorized over heads),
``csrc/gated_delta_knockout.cpp`` (CPU), ``kernels/gated_delta_knockout.py`` (Triton, chunked).
:func:`gated_delta_knockout_naive` is the oracle the tests compare them with: T + 1 literal recurrences.
"""

from __future__ import annotations

from types import ModuleType

import torch

from ..numerics import compute_dtype
from ._library import define

OP = define("gated_delta_knockout",
            "(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, float scale, bool qk_l2norm) -> (Tensor, Tensor)")

# transformers' l2norm (``modeling_qwen3_5.l2norm``, aligned with flash-linear-attention): x * rsqrt(|x|^2 + eps).
L2NORM_EPS = 1e-6


@torch.library.register_fake(OP)
def _fake(q, k, v, g, beta, scale, qk_l2norm):
    T, Hv, dv = v.shape
    cd = compute_dtype(q.dtype)
    return v.new_empty((Hv, dv), dtype=cd), v.new_empty((T, Hv, dv), dtype=cd)


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``q [Hk, dk]``, ``k [T, Hk, dk]``, ``v [T, Hv, dv]``, ``g, beta [T, Hv]``
    with ``T >= 1``, ``Hv`` a multiple of ``Hk``, and ``q, k, v`` of one floating dtype."""
    ok = q.dim() == 2 and k.dim() == 3 and v.dim() == 3 and g.dim() == 2 and beta.dim() == 2
    if ok:
        T, Hk, dk = k.shape
        Hv = v.shape[1]
        ok = (tuple(q.shape) == (Hk, dk) and v.shape[0] == T and tuple(g.shape) == (T, Hv)
              and tuple(beta.shape) == (T, Hv))
    if not ok:
        raise ValueError(f"gated_delta_knockout: need q [Hk, dk], k [T, Hk, dk], v [T, Hv, dv], g = beta [T, Hv]; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(g.shape)}, "
                         f"{tuple(beta.shape)}")
    if T < 1 or Hk < 1 or Hv % Hk:
        raise ValueError(f"gated_delta_knockout: need T >= 1 and Hv ({Hv}) a multiple of Hk ({Hk})")
    if not (q.dtype == k.dtype == v.dtype and q.is_floating_point()
            and g.is_floating_point() and beta.is_floating_point()):
        raise ValueError(f"gated_delta_knockout: q, k, v must share one floating dtype (got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}); g, beta floating (got {g.dtype}, {beta.dtype})")


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + L2NORM_EPS)


def prepare_inputs(q, k, v, g, beta, scale: float, qk_l2norm: bool):
    """Upcast to the compute dtype, L2-normalise q and k (if asked), scale q and repeat the key heads to
    the value heads. Returns ``q_hat [Hv, dk]``, ``k [T, Hv, dk]``, ``v [T, Hv, dv]``, ``g, beta [T, Hv]``."""
    check_shapes(q, k, v, g, beta)
    cd = compute_dtype(q.dtype)
    Hk, Hv = k.shape[1], v.shape[1]
    qf, kf = q.to(cd), k.to(cd)
    if qk_l2norm:
        qf, kf = _l2norm(qf), _l2norm(kf)
    qf = qf * scale
    if Hv != Hk:
        qf = qf.repeat_interleave(Hv // Hk, dim=0)
        kf = kf.repeat_interleave(Hv // Hk, dim=1)
    return qf, kf, v.to(cd), g.to(cd), beta.to(cd)


def reverse_scan(qh: torch.Tensor, kh: torch.Tensor, g: torch.Tensor,
                 beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``u_p = A_{p+1} ... A_{T-1} q_hat`` and ``c_p = <k_p, u_p>`` from prepared inputs (``q_hat [Hv, dk]``,
    ``k [T, Hv, dk]``, ``g, beta [T, Hv]``): ``u [T, Hv, dk]``, ``c [T, Hv]``."""
    T, Hv, dk = kh.shape
    a = g.exp()
    u = torch.full((T, Hv, dk), float("nan"), dtype=qh.dtype, device=qh.device)
    c = torch.full((T, Hv), float("nan"), dtype=qh.dtype, device=qh.device)
    cur = qh
    for p in range(T - 1, -1, -1):
        u[p] = cur
        c[p] = (kh[p] * cur).sum(-1)
        cur = a[p, :, None] * (cur - (beta[p] * c[p])[:, None] * kh[p])
    return u, c


def gated_delta_knockout_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    scale: float, qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch closed form (one reverse and one forward scan, vectorized over heads).

    Args:
        q: ``[Hk, dk]`` the final position's query (after the short convolution; not yet normalised).
        k: ``[T, Hk, dk]`` keys of all positions; v: ``[T, Hv, dv]`` values.
        g: ``[T, Hv]`` log-decays; beta: ``[T, Hv]`` write strengths.
        scale: query scale (``dk ** -0.5`` in transformers).
        qk_l2norm: L2-normalise q and k first (transformers' ``use_qk_l2norm_in_kernel``, True in Qwen3.5).

    Returns:
        ``o [Hv, dv]`` clean readout and ``delta [T, Hv, dv]`` (skipping position p's write minus clean),
        in the compute dtype.
    """
    qh, kh, vh, gh, bh = prepare_inputs(q, k, v, g, beta, scale, qk_l2norm)
    T, Hv, dk = kh.shape
    dv = vh.shape[2]
    a = gh.exp()
    one_minus_a = -torch.expm1(gh)
    u, c = reverse_scan(qh, kh, gh, bh)
    # Forward scan: the state before step p gives x_p = S^T k_p and z_p = S^T u_p.
    S = torch.zeros(Hv, dk, dv, dtype=qh.dtype, device=qh.device)
    delta = torch.full((T, Hv, dv), float("nan"), dtype=qh.dtype, device=qh.device)
    for p in range(T):
        # Elementwise products and sums rather than einsum/bmm: these are tiny per step.
        x = (S * kh[p, :, :, None]).sum(1)
        z = (S * u[p, :, :, None]).sum(1)
        w = bh[p, :, None] * (vh[p] - a[p, :, None] * x)
        delta[p] = one_minus_a[p, :, None] * z - c[p, :, None] * w
        S = a[p, :, None, None] * S + kh[p, :, :, None] * w[:, None, :]
    o = (S * qh[:, :, None]).sum(1)
    return o, delta


def gated_delta_knockout_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    scale: float, qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: the clean recurrence and, for every p, the recurrence with ``g_p = 0, beta_p = 0``,
    each written literally as transformers' ``torch_recurrent_gated_delta_rule`` step (decay, read,
    write), in the compute dtype. Same arguments and returns as :func:`gated_delta_knockout_reference`.

    Vectorized over the runs: run ``p`` is bitwise the clean run before step ``p`` (the same operations
    on the same numbers), so it starts as a copy of the clean state at step ``p`` and then advances with
    the others. The runs sit side by side in one ``[Hv, dk, runs * dv]`` tensor so that each step's read
    and write are one batched matrix product per head. O(T^2 Hv dk dv) time, O(T Hv dk dv) memory:
    for tests only.
    """
    qh, kh, vh, gh, bh = prepare_inputs(q, k, v, g, beta, scale, qk_l2norm)
    T, Hv, dk = kh.shape
    dv = vh.shape[2]
    # Run 0 is the clean one; run 1 + p skips p (alive once step p is reached).
    states = torch.zeros(Hv, dk, T + 1, dv, dtype=qh.dtype, device=qh.device)
    for t in range(T):
        n = t + 2
        states[:, :, t + 1] = states[:, :, 0]
        gt = gh[t].expand(n, Hv).clone()
        bt = bh[t].expand(n, Hv).clone()
        gt[t + 1] = 0.0  # the run that skips t: no decay ...
        bt[t + 1] = 0.0  # ... and no write
        S = states[:, :, :n]  # [Hv, dk, n, dv]
        S.mul_(gt.exp().T[:, None, :, None])  # decay
        kv_mem = torch.bmm(kh[t, :, None, :], S.reshape(Hv, dk, n * dv)).view(Hv, n, dv)  # S^T k
        d = (vh[t, :, None, :] - kv_mem) * bt.T[:, :, None]
        S.view(Hv, dk, n * dv).baddbmm_(kh[t, :, :, None], d.reshape(Hv, 1, n * dv))  # S += k d^T
    outs = torch.bmm(qh[:, None, :], states.view(Hv, dk, (T + 1) * dv)).view(Hv, T + 1, dv).transpose(0, 1)
    o = outs[0]
    return o, outs[1:] - o


# --- backend dispatch (maskvl/ops/backends.py calls these) ------------------------------------------
def run_cpp(q, k, v, g, beta, scale: float, qk_l2norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ CPU kernel, through the dispatcher."""
    o, delta = torch.ops.maskvl.gated_delta_knockout(q, k, v, g, beta, float(scale), bool(qk_l2norm))
    return o, delta


def run_triton(kernels: ModuleType, q, k, v, g, beta, scale: float,
               qk_l2norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernels: through the dispatcher for CUDA tensors, the launcher (interpreter) otherwise."""
    if q.is_cuda:
        o, delta = torch.ops.maskvl.gated_delta_knockout(q, k, v, g, beta, float(scale), bool(qk_l2norm))
        return o, delta
    return kernels.gated_delta_knockout.gated_delta_knockout(q, k, v, g, beta, float(scale), bool(qk_l2norm))


def cuda_kernel(kernels: ModuleType):
    """The launcher registered as this op's CUDA kernel."""
    return kernels.gated_delta_knockout.gated_delta_knockout
