"""Qwen3-MoE (text-only, sparse MoE MLP with a dense layer among them, sliding window) against the naive oracle."""

from __future__ import annotations

import pytest
import torch

from maskvl.engine import Engine, SweepConfig
from maskvl.models import adapter_class, load_model
from maskvl.models.qwen3_moe import Qwen3MoeAdapter
from text_family_support import BACKENDS, check_engine, cli_sweep, oracle, outside_rows

PROMPT = "Name three colors."
WINDOW = 2


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    d = adapter_class("qwen3_moe").write_tiny_model(
        tmp_path_factory.mktemp("models") / "qwen3_moe", seed=6, num_layers=3, num_heads=6, num_kv_heads=2,
        head_dim=24, hidden_size=48, mlp_only_layers=[1], use_sliding_window=True, sliding_window=6)
    return load_model(str(d), torch.float64)


@pytest.fixture(scope="module")
def ref(adapter):
    return oracle(adapter, PROMPT, window=WINDOW)


def test_adapter(adapter):
    assert isinstance(adapter, Qwen3MoeAdapter)
    kinds = [type(lay.mlp).__name__ for lay in adapter.layers]
    assert kinds == ["Qwen3MoeSparseMoeBlock", "Qwen3MoeMLP", "Qwen3MoeSparseMoeBlock"]
    assert adapter.model.config._experts_implementation == "eager"  # float64 on the CPU
    assert [adapter.attention_window(i) for i in range(3)] == [6, 6, 6]


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_equals_naive(adapter, ref, backend):
    prep, fast = check_engine(adapter, PROMPT, ref, backend, window=WINDOW)
    n_layer, n_logits = outside_rows(adapter, fast, ref, WINDOW)
    S = prep.input_ids.shape[1]
    assert n_layer == n_logits == 3 * ((S - 6) + (S + 1 - 6))


def test_masked_rows_are_routed_one_by_one(adapter):
    """The batched post-attention step runs the model's router on every masked row: rows of one batch
    pick different experts (so a shared routing would be caught by the oracle comparison above)."""
    picks = []
    hook = adapter.layers[0].mlp.gate.register_forward_hook(lambda mod, args, out: picks.append(out[2]))
    try:
        prep = adapter.prepare(PROMPT, [], [])
        list(Engine(adapter, "reference").run(prep, SweepConfig(mask_mode="both", num_tokens=1, layers=[0])))
    finally:
        hook.remove()
    batches = [p for p in picks if p.shape[0] > 1]
    assert batches and any(len({tuple(sorted(r)) for r in p.tolist()}) > 1 for p in batches)


def test_cli(tmp_path, run_main):
    cli_sweep("qwen3_moe", tmp_path, run_main)
