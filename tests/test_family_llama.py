"""Llama (text-only, Llama 3 chat format and RoPE scaling; here with attention biases) against the naive oracle."""

from __future__ import annotations

import pytest
import torch

from maskvl.models import adapter_class, load_model
from maskvl.models.llama import LlamaAdapter
from text_family_support import BACKENDS, check_engine, cli_sweep, oracle

PROMPT = "Name three colors."
WINDOW = 2
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    d = adapter_class("llama").write_tiny_model(tmp_path_factory.mktemp("models") / "llama", seed=5, num_layers=3,
                                                num_heads=6, num_kv_heads=2, head_dim=24, hidden_size=48,
                                                attention_bias=True, rope_parameters=LLAMA3_ROPE)
    return load_model(str(d), torch.float64)


@pytest.fixture(scope="module")
def ref(adapter):
    return oracle(adapter, PROMPT, window=WINDOW)


def test_adapter(adapter):
    assert isinstance(adapter, LlamaAdapter)
    prep = adapter.prepare(PROMPT, [], [])
    # The chat template writes <|begin_of_text|> once and ends with the assistant header.
    texts = adapter.token_texts(prep.input_ids[0].tolist())
    assert texts[0] == "<|begin_of_text|>" and texts.count("<|begin_of_text|>") == 1
    assert texts[-3:] == ["<|end_header_id|>", "Ċ", "Ċ"] or "".join(texts[-3:]).endswith("\n\n")
    assert adapter.tokenizer.convert_tokens_to_ids("<|eot_id|>") in adapter.stop_token_ids()
    assert adapter.o_proj_bias(0) is not None
    assert adapter.text_config.rope_parameters["rope_type"] == "llama3"


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_equals_naive(adapter, ref, backend):
    check_engine(adapter, PROMPT, ref, backend, window=WINDOW)


def test_cli(tmp_path, run_main):
    cli_sweep("llama", tmp_path, run_main)
