"""OLMo 2 (text-only: norms after attention and the MLP instead of before, q/k norms over the whole
projection) against the naive oracle."""

from __future__ import annotations

import pytest
import torch

from maskvl.errors import InputError
from maskvl.models import adapter_class, load_model
from maskvl.models.olmo2 import Olmo2Adapter
from text_family_support import BACKENDS, check_engine, cli_sweep, oracle

PROMPT = "Name three colors."
WINDOW = 3


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    d = adapter_class("olmo2").write_tiny_model(tmp_path_factory.mktemp("models") / "olmo2", seed=5, num_layers=3,
                                                num_heads=6, num_kv_heads=2, head_dim=8, hidden_size=48)
    return load_model(str(d), torch.float64)


@pytest.fixture(scope="module")
def ref(adapter):
    return oracle(adapter, PROMPT, window=WINDOW)


def test_adapter(adapter):
    assert isinstance(adapter, Olmo2Adapter) and adapter.has_attention_norm
    assert [adapter.attention_window(i) for i in range(3)] == [None, None, None]
    # q/k norms over the whole projection, not per head
    assert adapter.layers[0].self_attn.q_norm.weight.shape == (6 * 8,)
    assert adapter.layers[0].self_attn.k_norm.weight.shape == (2 * 8,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_equals_naive(adapter, ref, backend):
    check_engine(adapter, PROMPT, ref, backend, window=WINDOW)


def test_head_dim_must_fit_hidden(tmp_path):
    with pytest.raises(InputError, match="head_dim"):
        adapter_class("olmo2").write_tiny_model(tmp_path / "o", num_heads=4, head_dim=8, hidden_size=48)


def test_cli(tmp_path, run_main):
    cli_sweep("olmo2", tmp_path, run_main)
