"""The distance formulas: equal to the textbook definitions, and stable where those are not."""

from __future__ import annotations

import pytest
import torch

from maskvl import measures


@pytest.mark.parametrize("n", [1, 7, 97, 2560], ids=lambda n: f"N{n}")
def test_moments_match_direct_definition_float64(n):
    g = torch.Generator().manual_seed(n)
    c = torch.randn(64, n, generator=g, dtype=torch.float64)
    m = c + torch.randn(64, n, generator=g, dtype=torch.float64) * torch.logspace(-3, 1, 64, dtype=torch.float64)[:, None]
    l2, cos = measures.vector_distances_direct(c, m)
    torch.testing.assert_close(l2, (m - c).norm(dim=-1), rtol=1e-12, atol=0)
    want = 1 - (c * m).sum(-1) / (c.norm(dim=-1) * m.norm(dim=-1))
    torch.testing.assert_close(cos, want, rtol=1e-9, atol=1e-15)


def test_cosine_distance_keeps_precision_for_tiny_changes():
    # 1 - cos computed directly in float32 returns 0 here; the moment form keeps ~7 digits.
    g = torch.Generator().manual_seed(0)
    c64 = torch.randn(512, generator=g, dtype=torch.float64)
    d64 = torch.randn(512, generator=g, dtype=torch.float64) * 1e-5
    _, want = measures.vector_distances_direct(c64, c64 + d64)
    A = (c64 * c64).sum().float()
    B = (c64 * d64).sum().float()
    C = (d64 * d64).sum().float()
    _, got = measures.distances_from_moments(A, B, C)
    assert abs(got.double().item() - want.item()) / want.item() < 1e-5
    naive = 1 - torch.nn.functional.cosine_similarity(c64.float(), (c64 + d64).float(), dim=0)
    assert abs(naive.double().item() - want.item()) / want.item() > 0.5  # the naive form is garbage here


def test_degenerate_conventions():
    z = torch.zeros(1, dtype=torch.float64)
    one = torch.ones(1, dtype=torch.float64)
    l2, cos = measures.distances_from_moments(z, z, z)  # both zero
    assert l2.item() == 0 and cos.item() == 0
    l2, cos = measures.distances_from_moments(z, z, one)  # clean zero, masked not
    assert l2.item() == 1 and cos.item() == 1
    l2, cos = measures.distances_from_moments(one, -one, one)  # masked zero
    assert l2.item() == 1 and cos.item() == 1


def test_variant_order():
    names = ["Head_10", "Logits", "Head_2", "Attn", "Full", "Head_0"]
    assert sorted(names, key=measures.variant_sort_key) == ["Full", "Attn", "Head_0", "Head_2", "Head_10", "Logits"]
    assert measures.variant_names(3, logits=True) == ["Full", "Attn", "Head_0", "Head_1", "Head_2", "Logits"]
