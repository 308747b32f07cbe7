"""The reference ops against explicit, obviously-correct computations (float64, odd shapes)."""

from __future__ import annotations

import pytest
import torch

from maskvl.ops import head_grams
from maskvl.ops.decode_attention import decode_attention_reference
from maskvl.ops.head_distances import head_distances_reference
from maskvl.ops.vector_distances import vector_distances_reference
from maskvl.ops.loo_attention import loo_attention_reference
from maskvl.measures import vector_distances_direct


def _explicit_masked(q, k, v, scale, p):
    H = q.shape[0]
    heads = torch.arange(H) // (H // k.shape[1])
    s = torch.einsum("hd,thd->ht", q, k[:, heads]) * scale
    if p is not None:
        s[:, p] = float("-inf")
    return torch.einsum("ht,thd->hd", torch.softmax(s, -1), v[:, heads])


@pytest.mark.parametrize("T,H,KV,D", [(1, 4, 4, 48), (2, 4, 1, 48), (97, 8, 2, 48), (33, 6, 6, 64)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("sink", [0.0, 15.0, 30.0], ids=lambda s: f"gap{s:g}")
def test_loo_attention_reference(T, H, KV, D, sink):
    g = torch.Generator().manual_seed(T * 100 + H)
    q = torch.randn(H, D, generator=g, dtype=torch.float64)
    k = torch.randn(T, KV, D, generator=g, dtype=torch.float64)
    v = torch.randn(T, KV, D, generator=g, dtype=torch.float64)
    scale = D ** -0.5
    if sink:
        # key 0 gets a score `sink` above the rest for every head: an attention sink
        heads = torch.arange(H) // (H // KV)
        for h in range(H):
            k[0, heads[h]] = q[h] / q[h].norm() * (sink / scale / q[h].norm()) + 0 * k[0, heads[h]]
    o, delta = loo_attention_reference(q, k, v, scale)
    torch.testing.assert_close(o, _explicit_masked(q, k, v, scale, None), rtol=1e-12, atol=1e-12)
    for p in range(T):
        want = torch.zeros_like(o) if T == 1 else _explicit_masked(q, k, v, scale, p)
        torch.testing.assert_close(o + delta[p], want, rtol=1e-10, atol=1e-12)


def test_loo_attention_float32_sink_accuracy():
    g = torch.Generator().manual_seed(0)
    H, T, D = 2, 50, 64
    q = torch.randn(H, D, generator=g, dtype=torch.float64)
    k = torch.randn(T, 1, D, generator=g, dtype=torch.float64) * 0.01
    v = torch.randn(T, 1, D, generator=g, dtype=torch.float64)
    k[7, 0] = q[0] * (20 / (q[0] @ q[0]) * D ** 0.5)  # score gap ~20 for head 0
    _, d64 = loo_attention_reference(q, k, v, D ** -0.5)
    _, d32 = loo_attention_reference(q.float(), k.float(), v.float(), D ** -0.5)
    rel = (d32[7].double() - d64[7]).norm() / d64[7].norm()
    assert rel < 1e-5


def test_head_distances_reference_matches_materialized():
    g = torch.Generator().manual_seed(3)
    H, D, d, T = 6, 24, 40, 17
    w = torch.randn(d, H * D, generator=g, dtype=torch.float64)
    o = torch.randn(H, D, generator=g, dtype=torch.float64)
    delta = torch.randn(T, H, D, generator=g, dtype=torch.float64) * 0.1
    l2, cos = head_distances_reference(o, delta, head_grams(w, H, torch.float64))
    for h in range(H):
        W = w[:, h * D:(h + 1) * D]
        clean = W @ o[h]
        masked = (o[h] + delta[:, h]) @ W.T
        l2w, cosw = vector_distances_direct(clean.expand_as(masked), masked)
        torch.testing.assert_close(l2[:, h], l2w, rtol=1e-10, atol=0)
        torch.testing.assert_close(cos[:, h], cosw, rtol=1e-8, atol=1e-14)
    c = torch.randn(d, generator=g, dtype=torch.float64)
    dd = torch.randn(T, d, generator=g, dtype=torch.float64)
    l2v, cosv = vector_distances_reference(c, dd)
    l2w, cosw = vector_distances_direct(c.expand_as(dd), c + dd)
    torch.testing.assert_close(l2v, l2w, rtol=1e-12, atol=0)
    torch.testing.assert_close(cosv, cosw, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("B,T,H,KV,D", [(1, 1, 2, 2, 16), (5, 97, 8, 2, 48)], ids=lambda x: str(x))
def test_decode_attention_reference(B, T, H, KV, D):
    g = torch.Generator().manual_seed(B + T)
    q = torch.randn(B, H, D, generator=g, dtype=torch.float64)
    kp = torch.randn(T, KV, D, generator=g, dtype=torch.float64)
    vp = torch.randn(T, KV, D, generator=g, dtype=torch.float64)
    ko = torch.randn(B, KV, D, generator=g, dtype=torch.float64)
    vo = torch.randn(B, KV, D, generator=g, dtype=torch.float64)
    ex = torch.tensor([(-1, 0, T, T // 2, -1)[b % 5] for b in range(B)])
    out = decode_attention_reference(q, kp, vp, ko, vo, D ** -0.5, ex)
    for b in range(B):
        k = torch.cat([kp, ko[b:b + 1]])
        v = torch.cat([vp, vo[b:b + 1]])
        p = None if ex[b] < 0 else int(ex[b])
        if p is not None and T == 0:
            continue
        torch.testing.assert_close(out[b], _explicit_masked(q[b], k, v, D ** -0.5, p), rtol=1e-12, atol=1e-12)
