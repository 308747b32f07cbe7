"""Mistral (text-only, every layer a sliding window shorter than the prompt) against the naive oracle."""

from __future__ import annotations

import pytest
import torch

from maskvl.models import adapter_class, load_model
from maskvl.models.mistral import MistralAdapter
from text_family_support import BACKENDS, check_engine, cli_sweep, oracle, outside_rows

PROMPT = "Name three colors."
WINDOW = 1  # the Logits knockout window: a key before layer L's sliding window has an exactly zero Logits row


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    d = adapter_class("mistral").write_tiny_model(tmp_path_factory.mktemp("models") / "mistral", seed=2, num_layers=3,
                                                  num_heads=6, num_kv_heads=2, head_dim=24, hidden_size=48,
                                                  sliding_window=5)
    return load_model(str(d), torch.float64)


@pytest.fixture(scope="module")
def ref(adapter):
    return oracle(adapter, PROMPT, window=WINDOW)


def test_windows_come_from_the_config(adapter):
    assert isinstance(adapter, MistralAdapter)
    assert [adapter.attention_window(i) for i in range(3)] == [5, 5, 5]
    assert adapter.prepare(PROMPT, [], []).input_ids.shape[1] > 5 + 2  # the window is shorter than the prompt


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_equals_naive(adapter, ref, backend):
    prep, fast = check_engine(adapter, PROMPT, ref, backend, window=WINDOW)
    n_layer, n_logits = outside_rows(adapter, fast, ref, WINDOW)
    S = prep.input_ids.shape[1]
    # Every layer leaves out the same S - 5 keys (S - 4 at step 1); with knockout window 1 so does Logits.
    assert n_layer == n_logits == 3 * ((S - 5) + (S + 1 - 5))


def test_cli(tmp_path, run_main):
    md = cli_sweep("mistral", tmp_path, run_main, prompt="Count the objects and name the colors, briefly.")
    assert md["attention_windows"] == [16, 16, 16] and len(md["tokens"]) > 16
