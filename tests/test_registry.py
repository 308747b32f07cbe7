"""The adapter contract and the family registry: a second family plugs in without touching the engine or
the API, and unsupported model types get a one-line error naming the supported ones."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import maskvl
from maskvl.errors import ModelLoadError
from maskvl.models import ModelAdapter, Prepared, load_model, registry, supported_model_types
from maskvl.models.decoder import TransformersDecoderAdapter
from maskvl.models.qwen3 import Qwen3Adapter
from maskvl.models.tiny import build_tokenizer, write_hub_dir
from naive_support import compare_with_naive


class TinyQwen3TextAdapter(TransformersDecoderAdapter):
    """A minimal text-only family for this test: transformers' Qwen3ForCausalLM.

    maskvl's own Qwen3 family (``maskvl.models.qwen3``) handles ``qwen3``; the tests register this one in
    its place for a block (``registry.registered`` replaces and restores), so it stands for a family the
    engine and the API have never seen.
    """

    MODEL_TYPES = ("qwen3",)

    def __init__(self, model: Any, tokenizer: Any, model_id: str):
        self._setup(model, tokenizer, model_id, model.model, model.lm_head, model.config)

    @classmethod
    def load(cls, path: str, model_id: str, dtype: torch.dtype, device: torch.device,
             verbose: bool = False) -> "TinyQwen3TextAdapter":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        return cls(model.to(device).eval(), AutoTokenizer.from_pretrained(path), model_id)

    @classmethod
    def write_tiny_model(cls, directory: str | os.PathLike, seed: int = 0, **shape: Any) -> Path:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        tok = build_tokenizer()
        cfg = Qwen3Config(vocab_size=len(tok), hidden_size=shape.get("hidden_size", 40), intermediate_size=56,
                          num_hidden_layers=shape.get("num_layers", 3), num_attention_heads=shape.get("num_heads", 6),
                          num_key_value_heads=shape.get("num_kv_heads", 2), head_dim=shape.get("head_dim", 24),
                          max_position_embeddings=512, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                          tie_word_embeddings=False)
        torch.manual_seed(seed)
        return write_hub_dir(directory, Qwen3ForCausalLM(cfg).eval(), tok)

    @classmethod
    def from_loaded(cls, model: Any, tokenizer: Any, image_processor: Any = None,
                    model_id: str | None = None) -> "TinyQwen3TextAdapter":
        return cls(model, tokenizer, model_id or "loaded")

    def prepare(self, prompt: str, images: list[Any], image_paths: list[str | None],
                max_pixels: int | None = None) -> Prepared:
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
        return Prepared(ids, {}, torch.zeros(ids.shape[1], dtype=torch.bool), [], text)


@pytest.fixture(scope="module")
def qwen3_text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3 (text-only) written as a hub-like directory."""
    return TinyQwen3TextAdapter.write_tiny_model(tmp_path_factory.mktemp("models") / "qwen3-text", seed=3)


def test_the_contract_lists_everything_the_engine_uses() -> None:
    abstract = ModelAdapter.__abstractmethods__
    for name in ("load", "from_loaded", "prepare", "token_texts", "detokenize", "tokenize", "stop_token_ids",
                 "write_tiny_model", "new_cache", "prefill", "decode", "kv", "o_proj_weight", "post_attention", "replay_layer",
                 "final_logits", "forward_full", "decoder_layer", "o_proj", "attention_config"):
        assert name in abstract, name
    for attr in ("model_id", "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "vocab_size",
                 "max_positions", "scale", "dtype", "device", "supports_images"):
        assert attr in inspect.get_annotations(ModelAdapter), attr
    # Hooks with a default that keeps plain causal decoders as they are: a family overrides them.
    for name in ("attention_window", "o_proj_bias"):
        assert name not in abstract and callable(getattr(ModelAdapter, name)), name
    with pytest.raises(TypeError):
        ModelAdapter()  # type: ignore[abstract]


def test_unsupported_model_type_is_one_line_naming_the_supported(tmp_path: Path, run_main) -> None:
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert "gpt2" not in supported_model_types()
    with pytest.raises(ModelLoadError, match=r"unsupported model type 'gpt2' \(supported: .*llama.*qwen3_vl"):
        load_model(str(d))
    code, _, err = run_main(["sweep", "--model", str(d), "--prompt", "Hi", "-q"])
    assert code == 2 and err.startswith("maskvl: error: unsupported model type 'gpt2'") and err.count("\n") == 1


def test_a_second_family_registers_without_touching_engine_or_api(qwen3_text_dir: Path, tmp_path: Path) -> None:
    with registry.registered(TinyQwen3TextAdapter):
        assert registry.adapter_class("qwen3") is TinyQwen3TextAdapter
        adapter = load_model(str(qwen3_text_dir), torch.float64)
        assert isinstance(adapter, TinyQwen3TextAdapter)
        # The engine against the naive oracle, float64, every variant and Logits, two steps.
        compare_with_naive(adapter, [], "Explain rotary embeddings.", "both", 2, 1e-9, 1e-6, logits=True, window=2)
        # The API end to end, by directory and with the loaded transformers objects.
        out = tmp_path / "q3.parquet"
        result = maskvl.sweep(str(qwen3_text_dir), prompt="Hello there", mask_mode="both", num_tokens=2, logits=True,
                              dtype="float64", output=out)
        md = json.loads(result.table.schema.metadata[b"maskvl"])
        assert md["complete"] and md["images"] == [] and out.exists()
        again = maskvl.sweep(adapter.model, prompt="Hello there", mask_mode="both", num_tokens=2, logits=True,
                             tokenizer=adapter.tokenizer)
        assert again.table.column("l2_distance").to_pylist() == result.table.column("l2_distance").to_pylist()
    assert registry.adapter_class("qwen3") is Qwen3Adapter  # restored


def test_make_tiny_model_family_option(tmp_path: Path, run_main) -> None:
    code, _, err = run_main(["make-tiny-model", str(tmp_path / "x"), "--family", "nope"])
    assert code == 2 and err.startswith("maskvl: error: unsupported model type 'nope' (supported: ")
    with registry.registered(TinyQwen3TextAdapter):
        code, out, err = run_main(["make-tiny-model", str(tmp_path / "q3"), "--family", "qwen3", "--layers", "2"])
        assert code == 0, err
        assert load_model(str(tmp_path / "q3")).num_layers == 2
