"""Qwen3.5's linear-attention layers (transformers' ``Qwen3_5GatedDeltaNet``) as the knockout op sees them.

The pieces the Qwen3.5 adapter (``maskvl/models/qwen3_5.py``) reads a linear-attention layer with, the
write-skipping hook its naive oracle runs transformers' own layer with, and the float64 forward hook
(:class:`ExactLinear`) that float64 runs use. One layer, batch 1,
``T`` positions, ``Hk`` key heads of ``dk``, ``Hv`` value heads of ``dv``::

    x [T, hidden]  -> in_proj_qkv -> causal depthwise conv (kernel K, left zero padding) -> act
                   -> q, k [T, Hk, dk], v [T, Hv, dv]
                   -> beta = sigmoid(in_proj_b x) [T, Hv],  g = -exp(A_log) softplus(in_proj_a x + dt_bias) [T, Hv]
                   -> gated delta rule (``maskvl.ops.gated_delta_knockout``: q, k L2-normalised, q scaled
                      by dk^-1/2) -> core [T, Hv, dv]
    out = out_proj( rmsnorm(core) * weight * silu(z) ),  z = in_proj_z x [T, Hv, dv]   (norm per value head)

transformers computes g, the rule and the gated norm's normalisation in float32 whatever the model's
dtype; :func:`linear_inputs` and :func:`linear_output` compute in the input's dtype (float64 stays
float64), so against transformers' float64 layer they agree to float32's resolution only.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


def linear_inputs(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The gated delta rule's inputs for every position of one layer.

    ``x [T, hidden]`` is the layer's input (after the decoder layer's input norm). Returns
    ``q, k [T, Hk, dk]``, ``v [T, Hv, dv]`` (after the conv and its activation, before the L2 norms),
    ``g, beta [T, Hv]`` and the output gate ``z [T, Hv, dv]``, all in ``x``'s dtype.
    """
    q, k, v, g, beta = rule_inputs(module, module.in_proj_qkv(x), module.in_proj_a(x), module.in_proj_b(x))
    return q, k, v, g, beta, module.in_proj_z(x).reshape(x.shape[0], module.num_v_heads, module.head_v_dim)


def linear_scale(module: nn.Module) -> float:
    """The query scale transformers' rule applies after the L2 norm: ``dk ** -0.5``."""
    return module.head_k_dim ** -0.5


def gated_norm(module: nn.Module, core: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``core, z [..., Hv, dv]`` -> the gated RMS norm per value head, ``[..., Hv, dv]``, in ``core``'s dtype."""
    norm = module.norm
    y = core * torch.rsqrt(core.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight.to(core.dtype) * y * F.silu(z.to(core.dtype))


def linear_output(module: nn.Module, core: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``core, z [..., Hv, dv]`` -> the layer's output ``[..., hidden]`` (gated norm, then out_proj)."""
    y = gated_norm(module, core, z)
    return module.out_proj(y.reshape(*y.shape[:-2], -1).to(module.out_proj.weight.dtype))


def head_output(module: nn.Module, normed: torch.Tensor, head: int) -> torch.Tensor:
    """``normed [..., Hv, dv]`` (after :func:`gated_norm`) -> value head ``head``'s share of out_proj,
    ``[..., hidden]`` (out_proj on that head's slice; the heads' shares sum to the output)."""
    dv = module.head_v_dim
    w = module.out_proj.weight[:, head * dv:(head + 1) * dv]
    return normed[..., head, :].to(w.dtype) @ w.T


@contextlib.contextmanager
def skip_write(module: nn.Module, p: int | list[int]) -> Iterator[None]:
    """Run transformers' own layer with position ``p``'s write skipped: ``g_p = 0`` and ``beta_p = 0``.

    Forward hooks set row ``p`` (or every row of a list) of ``in_proj_a`` and ``in_proj_b`` to ``-inf``:
    transformers' own ``softplus(-inf) = 0`` and ``sigmoid(-inf) = 0`` then give exactly ``g_p = -0.0``
    and ``beta_p = 0`` (``S_p = S_{p-1}``). Every position after ``p`` reads the changed state, so a
    caller keeps only the final position's output. The hooks run before any other hook on those modules
    (so :class:`ExactLinear` reads the skipped rows too) and are removed on exit.
    """
    rows = [p] if isinstance(p, int) else list(p)

    def hook(_mod, _args, out):
        out = out.clone()
        out[..., rows, :] = float("-inf")
        return out

    handles = [module.in_proj_a.register_forward_hook(hook, prepend=True),
               module.in_proj_b.register_forward_hook(hook, prepend=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    # transformers' l2norm (eps 1e-6 inside the root), as maskvl.ops.gated_delta_knockout.
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)


def _linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with the weight in ``x``'s dtype (a cast per call: these are the small projections
    of single rows; no hooks fire)."""
    return F.linear(x, module.weight.to(x.dtype), None if module.bias is None else module.bias.to(x.dtype))


def _gates(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``g = -exp(A_log) softplus(a + dt_bias)`` and ``beta = sigmoid(b)`` from in_proj_a / in_proj_b
    outputs ``[..., Hv]``, in their dtype."""
    return -module.A_log.to(a.dtype).exp() * F.softplus(a + module.dt_bias.to(a.dtype)), b.sigmoid()


def _heads(module: nn.Module, k: torch.Tensor, q: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Keys (and queries) ``[..., Hk, dk]`` as the rule reads them: L2-normalised (queries also scaled by
    :func:`linear_scale`), each key head repeated for its value heads: ``[..., Hv, dk]``."""
    G = module.num_v_heads // module.num_k_heads
    k = _l2norm(k).repeat_interleave(G, dim=-2)
    if q is None:
        return (k,)
    return k, (_l2norm(q) * linear_scale(module)).repeat_interleave(G, dim=-2)


def conv_tail(module: nn.Module, pre: torch.Tensor) -> torch.Tensor:
    """The conv's input before the next position: the last ``K-1`` rows of ``pre [n, C]`` (in_proj_qkv
    of the positions so far), zero rows before the sequence's start: ``[K-1, C]``."""
    K = module.conv_kernel_size
    tail = pre.new_zeros(K - 1, module.conv_dim)
    m = min(K - 1, pre.shape[0])
    if m:
        tail[K - 1 - m:] = pre[pre.shape[0] - m:]
    return tail


def conv_act(module: nn.Module, pre: torch.Tensor, tail: torch.Tensor | None = None) -> torch.Tensor:
    """The causal depthwise conv and its activation for ``pre [n, C]`` (in_proj_qkv outputs) following
    ``tail [K-1, C]`` (the ``K-1`` earlier positions' in_proj_qkv outputs; None: the sequence starts here,
    zeros as transformers pads). Returns ``[n, C]`` in ``pre``'s dtype."""
    K, C = module.conv_kernel_size, module.conv_dim
    w = module.conv1d.weight[:, 0, :].to(pre.dtype)  # [C, K]
    if tail is None:
        tail = pre.new_zeros(K - 1, C)
    full = torch.cat([tail.to(pre.dtype), pre]).T[None]  # [1, C, K-1+n]
    bias = None if module.conv1d.bias is None else module.conv1d.bias.to(pre.dtype)
    return ACT2FN[module.activation](F.conv1d(full, w[:, None, :], bias, groups=C))[0].T


def rule_inputs(module: nn.Module, pre: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                tail: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The gated delta rule's inputs from the layer's own projections of ``n`` positions.

    ``pre [n, C]`` (in_proj_qkv), ``a, b [n, Hv]`` (in_proj_a, in_proj_b), ``tail`` as in :func:`conv_act`;
    all in one dtype, which the result keeps. Returns ``q, k [n, Hk, dk]`` (before the L2 norms),
    ``v [n, Hv, dv]``, ``g, beta [n, Hv]``.
    """
    n = pre.shape[0]
    mixed = conv_act(module, pre, tail)
    q, k, v = torch.split(mixed, [module.key_dim, module.key_dim, module.value_dim], dim=-1)
    g, beta = _gates(module, a, b)
    return (q.reshape(n, module.num_k_heads, module.head_k_dim), k.reshape(n, module.num_k_heads, module.head_k_dim),
            v.reshape(n, module.num_v_heads, module.head_v_dim), g, beta)


def advance(module: nn.Module, S: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
            beta: torch.Tensor, q: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The plain recurrence over ``n`` positions from state ``S [..., Hv, dk, dv]``.

    ``k [..., n, Hk, dk]`` (before the L2 norm), ``v [..., n, Hv, dv]``, ``g, beta [..., n, Hv]``; with
    ``q [..., n, Hk, dk]`` also each position's readout. Returns the state after the last position and
    the readouts ``[..., n, Hv, dv]`` (None without ``q``): transformers' ``torch_recurrent_gated_delta_rule``
    in ``S``'s dtype. O(n dk dv) per head.
    """
    if q is None:
        (k,) = _heads(module, k)
    else:
        k, q = _heads(module, k, q)
    outs = []
    for t in range(k.shape[-3]):
        S = g[..., t, :].exp()[..., None, None] * S
        kt = k[..., t, :, :]
        w = beta[..., t, :, None] * (v[..., t, :, :] - torch.einsum("...hkv,...hk->...hv", S, kt))
        S = S + kt[..., :, None] * w[..., None, :]
        if q is not None:
            outs.append(torch.einsum("...hkv,...hk->...hv", S, q[..., t, :, :]))
    return S, (torch.stack(outs, dim=-3) if q is not None else None)


def prefix_state(module: nn.Module, x_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean states the final position's step starts from, given the inputs of every earlier position.

    ``x_prev [T-1, hidden]`` (``T-1`` may be 0). Returns the conv tail ``[K-1, C]`` (in_proj_qkv of the
    last ``K-1`` earlier positions, zero rows before the sequence's start) and the recurrent state
    ``S [Hv, dk, dv]`` after position ``T-2`` (zeros for an empty prefix), in ``x_prev``'s dtype: a
    plain recurrence, O(T dk dv) per head.
    """
    S = x_prev.new_zeros(module.num_v_heads, module.head_k_dim, module.head_v_dim)
    pre = _linear(module.in_proj_qkv, x_prev)
    if x_prev.shape[0] == 0:
        return conv_tail(module, pre), S
    _q, k, v, g, beta = rule_inputs(module, pre, _linear(module.in_proj_a, x_prev), _linear(module.in_proj_b, x_prev))
    S, _ = advance(module, S, k, v, g, beta)
    return conv_tail(module, pre), S


def final_step(module: nn.Module, x_rows: torch.Tensor, tail: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """The layer's output at the final position for ``N`` alternative inputs of that position.

    ``x_rows [N, hidden]``: the final position's layer input, one row per alternative (for Logits rows:
    each masked row's own input); ``tail [K-1, C]`` and ``S [Hv, dk, dv]`` from :func:`prefix_state`,
    shared by every row (no row copies the state). Each row's single step::

        c = act(conv over tail and the row's own in_proj_qkv),  q, k, v, g, beta, z from it
        o = a S^T q + (k . q) beta (v - a S^T k),   a = exp(g)       (= (a S + k w^T)^T q)

    Computed in ``x_rows``' dtype (weights cast). Returns ``[N, hidden]``: O(N Hv dk dv), like one decode
    step per row.
    """
    N = x_rows.shape[0]
    dt = x_rows.dtype
    weight = module.conv1d.weight[:, 0, :].to(dt)  # [C, K]
    pre = _linear(module.in_proj_qkv, x_rows)  # [N, C]
    conv = (tail.to(dt) * weight[:, :-1].T).sum(0) + pre * weight[:, -1]
    if module.conv1d.bias is not None:
        conv = conv + module.conv1d.bias.to(dt)
    conv = ACT2FN[module.activation](conv)
    q, k, v = torch.split(conv, [module.key_dim, module.key_dim, module.value_dim], dim=-1)
    k, q = _heads(module, k.reshape(N, module.num_k_heads, module.head_k_dim),
                  q.reshape(N, module.num_k_heads, module.head_k_dim))
    v = v.reshape(N, module.num_v_heads, module.head_v_dim)
    g, beta = _gates(module, _linear(module.in_proj_a, x_rows), _linear(module.in_proj_b, x_rows))
    a = g.exp()
    z = _linear(module.in_proj_z, x_rows).reshape(N, module.num_v_heads, module.head_v_dim)
    S = S.to(dt)
    Sq = torch.einsum("hkv,nhk->nhv", S, q)
    Sk = torch.einsum("hkv,nhk->nhv", S, k)
    w = beta[..., None] * (v - a[..., None] * Sk)
    o = a[..., None] * Sq + (k * q).sum(-1, keepdim=True) * w
    y = gated_norm(module, o, z)
    return _linear(module.out_proj, y.reshape(N, -1))


class ExactLinear:
    """A float64 forward for one linear-attention layer of a loaded model (installed by the adapter on
    float64 models only; :meth:`remove` takes it off).

    transformers runs the gated delta rule, ``g`` and the gated norm in float32 whatever the weights'
    dtype, so a float64 model is not float64 there, and its own prefill (chunked rule) and decode
    (recurrent rule) disagree at float32's resolution. A float64 run is maskvl's exactness check, so this
    forward hook replaces the layer's output by the same computation in float64: taps read the layer's
    own in_proj_qkv / in_proj_z / in_proj_a / in_proj_b outputs of the call (after any :func:`skip_write`
    hook), then the conv over the previous positions' tail, the recurrence (:func:`advance`), the gated
    norm and out_proj (called as a module, so hooks on it see these values last). The layer's own forward
    still runs, so transformers' cache stays as it keeps it; the float64 conv tail and state live beside
    it on the cache object (attribute ``_maskvl_exact``), and a call without a cache starts from zeros.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self._taps: dict[str, torch.Tensor] = {}
        self._handles = [getattr(module, name).register_forward_hook(self._tap(name))
                         for name in ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b")]
        self._handles.append(module.register_forward_hook(self._hook, with_kwargs=True))

    def _tap(self, name: str):
        def hook(_mod, _args, out):
            self._taps[name] = out
        return hook

    def _hook(self, mod, args, kwargs, out):
        m = self.module
        pre, z, a, b = (self._taps.pop(n) for n in ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b"))
        B, n, _ = pre.shape
        K = m.conv_kernel_size
        cache = kwargs.get("cache_params")
        store = cache.__dict__.setdefault("_maskvl_exact", {}) if cache is not None else {}
        tail, S = store.get(m.layer_idx, (pre.new_zeros(B, K - 1, m.conv_dim),
                                          pre.new_zeros(B, m.num_v_heads, m.head_k_dim, m.head_v_dim)))
        cores, states = [], []
        for i in range(B):
            q, k, v, g, beta = rule_inputs(m, pre[i], a[i], b[i], tail[i])
            S_i, core = advance(m, S[i], k, v, g, beta, q)
            cores.append(core)
            states.append(S_i)
        S = torch.stack(states)
        if cache is not None:
            store[m.layer_idx] = (torch.cat([tail, pre], dim=1)[:, -(K - 1):] if K > 1 else tail, S)
        core = torch.stack(cores)  # [B, n, Hv, dv]
        y = gated_norm(m, core, z.reshape(B, n, m.num_v_heads, m.head_v_dim))
        return m.out_proj(y.reshape(B, n, -1).to(m.out_proj.weight.dtype))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
