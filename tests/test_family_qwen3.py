"""Qwen3 (text-only, q/k norms; here with attention biases, o_proj's included) against the naive oracle."""

from __future__ import annotations

import pytest
import torch

from maskvl.models import adapter_class, load_model
from maskvl.models.qwen3 import Qwen3Adapter
from text_family_support import BACKENDS, check_engine, cli_sweep, oracle

PROMPT = "Name three colors."
WINDOW = 2


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    d = adapter_class("qwen3").write_tiny_model(tmp_path_factory.mktemp("models") / "qwen3", seed=4, num_layers=3,
                                                num_heads=6, num_kv_heads=2, head_dim=24, hidden_size=48,
                                                attention_bias=True)
    return load_model(str(d), torch.float64)


@pytest.fixture(scope="module")
def ref(adapter):
    return oracle(adapter, PROMPT, window=WINDOW)


def test_adapter(adapter):
    assert isinstance(adapter, Qwen3Adapter) and not adapter.supports_images
    assert [adapter.attention_window(i) for i in range(3)] == [None, None, None]
    # Attn includes o_proj's bias (the oracle reads o_proj's real output), Head_N does not.
    assert adapter.o_proj_bias(1) is not None and adapter.layers[1].self_attn.q_norm is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_equals_naive(adapter, ref, backend):
    check_engine(adapter, PROMPT, ref, backend, window=WINDOW)


def test_cli(tmp_path, run_main):
    cli_sweep("qwen3", tmp_path, run_main)
