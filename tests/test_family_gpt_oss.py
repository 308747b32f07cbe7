"""GPT-OSS (text-only: learned attention sinks in the softmax denominator, alternating sliding-window
layers, sparse MoE with biases, YaRN rotary tables) against the naive oracle."""

from __future__ import annotations

import pytest
import torch

from maskvl.models import adapter_class, load_model
from maskvl.models.gpt_oss import GptOssAdapter
from maskvl.naive import naive_sweep
from text_family_support import BACKENDS, check_engine, cli_sweep, oracle

PROMPT = "Name three colors."
WINDOW = 2  # Logits leave the key out at a local and a global layer


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    d = adapter_class("gpt_oss").write_tiny_model(tmp_path_factory.mktemp("models") / "gpt_oss", seed=6,
                                                  num_layers=3, num_heads=6, num_kv_heads=2, head_dim=16,
                                                  hidden_size=40, sliding_window=7)
    return load_model(str(d), torch.float64)


@pytest.fixture(scope="module")
def ref(adapter):
    return oracle(adapter, PROMPT, window=WINDOW)


def test_adapter(adapter):
    assert isinstance(adapter, GptOssAdapter)
    assert [adapter.attention_window(i) for i in range(3)] == [7, None, 7]
    assert adapter.o_proj_bias(0) is not None
    sinks = adapter.attention_sinks(1)
    assert sinks.shape == (6,) and float(sinks.abs().max()) > 0.5  # sinks that carry real mass
    assert adapter.prepare(PROMPT, [], []).input_ids.shape[1] > 7 + 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_equals_naive(adapter, ref, backend):
    check_engine(adapter, PROMPT, ref, backend, window=WINDOW)


def test_the_oracle_sees_the_sinks(adapter, ref):
    """Without its sinks the model computes something else: the oracle (and so the check above) is not
    blind to them."""
    layers = [at.self_attn for at in adapter.layers]
    saved = [at.sinks.detach().clone() for at in layers]
    try:
        with torch.no_grad():
            for at in layers:
                at.sinks.fill_(-1e4)
        other = naive_sweep(adapter, adapter.prepare(PROMPT, [], []), "both", 1, [1], knockout_window=WINDOW)
    finally:
        with torch.no_grad():
            for at, s in zip(layers, saved):
                at.sinks.copy_(s)
    assert not torch.allclose(torch.as_tensor(other[0].l2[1]), torch.as_tensor(ref[0].l2[1]), rtol=1e-3)


def test_cli(tmp_path, run_main):
    cli_sweep("gpt_oss", tmp_path, run_main)


def test_groups_keep_the_sink_in_the_denominator(adapter):
    """Whole sets removed at once (a few positions, the most recent ones, every key but the final one):
    the sink stays in the denominator, Logits leave the set out over the knockout window."""
    from naive_support import compare_with_naive

    def groups(prep):
        S = prep.input_ids.shape[1]
        return [[0, 1, 2], list(range(S - 4, S)), list(range(S - 1))]

    compare_with_naive(adapter, [], PROMPT, "both", 2, 1e-9, 1e-6, logits=True, window=WINDOW, backend="reference",
                       groups=groups)
