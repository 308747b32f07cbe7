"""Qwen3.5's linear-attention layers (transformers' ``Qwen3_5GatedDeltaNet``) as the knockout op sees them.

Not a registered family yet: these are the pieces a Qwen3.5 adapter reads a linear-attention layer
with, and the write-skipping hook its naive oracle runs transformers' own layer with. One layer, batch 1,
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
    T = x.shape[0]
    mixed = module.in_proj_qkv(x).transpose(0, 1)[None]  # [1, C, T]
    mixed = ACT2FN[module.activation](module.conv1d(mixed)[..., :T])[0].transpose(0, 1)  # [T, C]
    q, k, v = torch.split(mixed, [module.key_dim, module.key_dim, module.value_dim], dim=-1)
    q = q.reshape(T, module.num_k_heads, module.head_k_dim)
    k = k.reshape(T, module.num_k_heads, module.head_k_dim)
    v = v.reshape(T, module.num_v_heads, module.head_v_dim)
    beta = module.in_proj_b(x).sigmoid()
    g = -module.A_log.to(x.dtype).exp() * F.softplus(module.in_proj_a(x) + module.dt_bias.to(x.dtype))
    z = module.in_proj_z(x).reshape(T, module.num_v_heads, module.head_v_dim)
    return q, k, v, g, beta, z


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
def skip_write(module: nn.Module, p: int) -> Iterator[None]:
    """Run transformers' own layer with position ``p``'s write skipped: ``g_p = 0`` and ``beta_p = 0``.

    Forward hooks set row ``p`` of ``in_proj_a`` and ``in_proj_b`` to ``-inf``: transformers' own
    ``softplus(-inf) = 0`` and ``sigmoid(-inf) = 0`` then give exactly ``g_p = -0.0`` and ``beta_p = 0``
    (``S_p = S_{p-1}``). Every position after ``p`` reads the changed state, so a caller keeps only
    the final position's output. Hooks are removed on exit.
    """
    def hook(_mod, _args, out):
        out = out.clone()
        out[..., p, :] = float("-inf")
        return out

    handles = [module.in_proj_a.register_forward_hook(hook), module.in_proj_b.register_forward_hook(hook)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    # transformers' l2norm (eps 1e-6 inside the root), as maskvl.ops.gated_delta_knockout.
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)


def prefix_state(module: nn.Module, x_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean states the final position's step starts from, given the inputs of every earlier position.

    ``x_prev [T-1, hidden]`` (``T-1`` may be 0). Returns the conv tail ``[K-1, C]`` (in_proj_qkv of the
    last ``K-1`` earlier positions, zero rows before the sequence's start) and the recurrent state
    ``S [Hv, dk, dv]`` after position ``T-2`` (zeros for an empty prefix), in ``x_prev``'s dtype: a
    plain recurrence, O(T dk dv) per head.
    """
    K = module.conv_kernel_size
    C = module.conv_dim
    S = x_prev.new_zeros(module.num_v_heads, module.head_k_dim, module.head_v_dim)
    tail = x_prev.new_zeros(K - 1, C)
    n = x_prev.shape[0]
    if n == 0:
        return tail, S
    pre = module.in_proj_qkv(x_prev)
    m = min(K - 1, n)
    tail[K - 1 - m:] = pre[n - m:]
    _q, k, v, g, beta, _z = linear_inputs(module, x_prev)
    k = _l2norm(k).repeat_interleave(module.num_v_heads // module.num_k_heads, dim=1)
    for t in range(n):
        a = g[t].exp()[:, None, None]
        S = a * S
        w = beta[t][:, None] * (v[t] - torch.einsum("hkv,hk->hv", S, k[t]))
        S = S + k[t][:, :, None] * w[:, None, :]
    return tail, S


def final_step(module: nn.Module, x_rows: torch.Tensor, tail: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """The layer's output at the final position for ``N`` alternative inputs of that position.

    ``x_rows [N, hidden]``: the final position's layer input, one row per alternative (for Logits rows:
    each masked row's own input); ``tail [K-1, C]`` and ``S [Hv, dk, dv]`` from :func:`prefix_state`,
    shared by every row (no row copies the state). Each row's single step::

        c = act(conv over tail and the row's own in_proj_qkv),  q, k, v, g, beta, z from it
        o = a S^T q + (k . q) beta (v - a S^T k),   a = exp(g)       (= (a S + k w^T)^T q)

    Returns ``[N, hidden]``: O(N Hv dk dv), like one decode step per row.
    """
    N = x_rows.shape[0]
    weight = module.conv1d.weight[:, 0, :].to(x_rows.dtype)  # [C, K]
    pre = module.in_proj_qkv(x_rows)  # [N, C]
    conv = (tail * weight[:, :-1].T).sum(0) + pre * weight[:, -1]
    if module.conv1d.bias is not None:
        conv = conv + module.conv1d.bias
    conv = ACT2FN[module.activation](conv)
    q, k, v = torch.split(conv, [module.key_dim, module.key_dim, module.value_dim], dim=-1)
    G = module.num_v_heads // module.num_k_heads
    q = (_l2norm(q.reshape(N, module.num_k_heads, module.head_k_dim)) * linear_scale(module)).repeat_interleave(G, 1)
    k = _l2norm(k.reshape(N, module.num_k_heads, module.head_k_dim)).repeat_interleave(G, 1)
    v = v.reshape(N, module.num_v_heads, module.head_v_dim)
    beta = module.in_proj_b(x_rows).sigmoid()
    a = (-module.A_log.to(x_rows.dtype).exp()
         * F.softplus(module.in_proj_a(x_rows) + module.dt_bias.to(x_rows.dtype))).exp()  # [N, Hv]
    z = module.in_proj_z(x_rows).reshape(N, module.num_v_heads, module.head_v_dim)
    Sq = torch.einsum("hkv,nhk->nhv", S, q)
    Sk = torch.einsum("hkv,nhk->nhv", S, k)
    w = beta[..., None] * (v - a[..., None] * Sk)
    o = a[..., None] * Sq + (k * q).sum(-1, keepdim=True) * w
    return linear_output(module, o, z)
