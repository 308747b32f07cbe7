"""Gemma 3's language model (text-only: norms after attention and the MLP, query_pre_attn_scalar, local
sliding-window layers with their own rotary base, tied and soft-capped logits) against the naive oracle."""

from __future__ import annotations

import pytest
import torch

from maskvl.errors import InputError
from maskvl.models import adapter_class, load_model
from maskvl.models.gemma3_text import Gemma3TextAdapter
from text_family_support import BACKENDS, check_engine, cli_sweep, oracle, outside_rows

PROMPT = "Name three colors."
WINDOW = 2  # Logits leave the key out at L and L+1: a local and a global layer


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    d = adapter_class("gemma3_text").write_tiny_model(tmp_path_factory.mktemp("models") / "gemma3", seed=3,
                                                      num_layers=3, num_heads=4, num_kv_heads=2, head_dim=24,
                                                      hidden_size=40, sliding_window=7)
    return load_model(str(d), torch.float64)


@pytest.fixture(scope="module")
def ref(adapter):
    return oracle(adapter, PROMPT, window=WINDOW)


def test_adapter(adapter):
    assert isinstance(adapter, Gemma3TextAdapter) and adapter.has_attention_norm
    assert [adapter.attention_window(i) for i in range(3)] == [7, None, 7]
    assert adapter.scale == pytest.approx(20 ** -0.5) and adapter.scale != adapter.head_dim ** -0.5
    assert adapter.text_config.final_logit_softcapping == 30.0
    assert adapter.prepare(PROMPT, [], []).input_ids.shape[1] > 7 + 2  # the window is shorter than the prompt
    # Local and global layers rotate with different bases: each layer's table is captured.
    cap = adapter.prefill(adapter.prepare(PROMPT, [], []), adapter.new_cache())
    assert cap.layer_rope is not None and not torch.equal(cap.rope_at(0)[0], cap.rope_at(1)[0])
    assert torch.equal(cap.rope_at(0)[0], cap.rope_at(2)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_equals_naive(adapter, ref, backend):
    check_engine(adapter, PROMPT, ref, backend, window=WINDOW)


def test_bidirectional_config_is_refused(tmp_path):
    d = adapter_class("gemma3_text").write_tiny_model(tmp_path / "g", num_layers=2, use_bidirectional_attention=True)
    with pytest.raises(InputError, match="bidirectional"):
        load_model(str(d), torch.float32)


def test_cli(tmp_path, run_main):
    md = cli_sweep("gemma3_text", tmp_path, run_main, prompt="Count the objects and name the colors, briefly.")
    assert md["attention_windows"] == [6, None, 6]
