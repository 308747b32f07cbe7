"""Qwen2 (text-only, q/k/v biases) with a sliding-window layer between two full ones, against the naive oracle."""

from __future__ import annotations

import pytest
import torch

from maskvl.models import adapter_class, load_model
from maskvl.models.qwen2 import Qwen2Adapter
from text_family_support import BACKENDS, check_engine, cli_sweep, oracle, outside_rows

PROMPT = "Name three colors."
# Knockout window 2: a key before layer 1's window still reaches the logits through layer 2 (full), and one
# before layer 0's... layer 0 is full: every Logits row is nonzero, while layer 1's Full/Attn/Head rows are not.
WINDOW = 2


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    d = adapter_class("qwen2").write_tiny_model(
        tmp_path_factory.mktemp("models") / "qwen2", seed=3, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=24,
        hidden_size=48, use_sliding_window=True, sliding_window=4,
        layer_types=["full_attention", "sliding_attention", "full_attention"])
    return load_model(str(d), torch.float64)


@pytest.fixture(scope="module")
def ref(adapter):
    return oracle(adapter, PROMPT, window=WINDOW)


def test_windows_follow_layer_types(adapter):
    assert isinstance(adapter, Qwen2Adapter)
    assert [adapter.attention_window(i) for i in range(3)] == [None, 4, None]
    assert adapter.layers[0].self_attn.q_proj.bias is not None and adapter.o_proj_bias(0) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_equals_naive(adapter, ref, backend):
    prep, fast = check_engine(adapter, PROMPT, ref, backend, window=WINDOW)
    n_layer, n_logits = outside_rows(adapter, fast, ref, WINDOW)
    S = prep.input_ids.shape[1]
    assert n_layer == (S - 4) + (S + 1 - 4) and n_logits == 0


def test_cli(tmp_path, run_main):
    md = cli_sweep("qwen2", tmp_path, run_main)
    assert md["attention_windows"] == [None, None, None]
