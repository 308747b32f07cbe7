"""Qwen3-VL-MoE: a tiny random hub-like model written offline, the engine against the naive oracle
(transformers' own forward with one attention entry removed) in float64, every backend, one and two
non-square images and text only; the masked rows are routed by the model's own router, row by row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from maskvl.engine import Engine, SweepConfig
from maskvl.inputs import load_image
from maskvl.models import load_model
from maskvl.models.qwen3_vl_moe import Qwen3VLMoeAdapter
from naive_support import assert_file_matches, cli_sweep_one_image, compare_with_naive, small_image_processor

# GQA 6:2, head_dim 24, hidden 40; 8 experts, top-2; layer 1 dense (mlp_only_layers), 0 and 2 sparse.
SHAPE = dict(num_layers=3, num_heads=6, num_kv_heads=2, head_dim=24, hidden_size=40, intermediate_size=72,
             vision_depth=2, deepstack=(0, 1), num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
             mlp_only_layers=[1])
SPARSE = [0, 2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_image_processor(Qwen3VLMoeAdapter.write_tiny_model(tmp_path_factory.mktemp("models") / "qwen3_vl_moe",
                                                                    seed=4, **dict(SHAPE)))


@pytest.fixture(scope="module")
def adapter(model_dir: Path):
    return load_model(str(model_dir), torch.float64, "cpu")


def test_directory_and_experts(model_dir: Path, adapter) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
                 "video_preprocessor_config.json"):
        assert (model_dir / name).exists(), name
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "qwen3_vl_moe"
    assert isinstance(adapter, Qwen3VLMoeAdapter)
    kinds = [type(layer.mlp).__name__ for layer in adapter.layers]
    assert kinds == ["Qwen3VLMoeTextSparseMoeBlock", "Qwen3VLMoeTextMLP", "Qwen3VLMoeTextSparseMoeBlock"]
    # float64 needs transformers' eager experts (grouped_mm rejects float64 matrices).
    assert adapter.model.config._experts_implementation == "eager"


def test_float64_one_image_every_variant_two_steps(adapter, images, run_main, model_dir: Path, tmp_path: Path) -> None:
    prep, fast, worst = compare_with_naive(adapter, [images["wide"]], "What is in this image?", "both", 2, 1e-9, 1e-6,
                                           logits=True)
    print(f"Qwen3VLMoeAdapter: worst relative error vs the naive oracle {worst:.2e}")
    assert (prep.images[0].grid_rows, prep.images[0].grid_cols) == (2, 3)
    assert [len(f.layers[0].positions) for f in fast] == [prep.input_ids.shape[1], prep.input_ids.shape[1] + 1]
    # The command line on the same directory writes what the engine computed.
    out = tmp_path / "cli.parquet"
    md = cli_sweep_one_image(run_main, model_dir, images["wide"], out)
    assert md["complete"] and [(g["grid_rows"], g["grid_cols"]) for g in md["images"]] == [(2, 3)]
    assert_file_matches(out, fast)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_float64_backends_against_naive(adapter, images, backend: str) -> None:
    from maskvl.ops.testing import compiled_backend

    be, _ = compiled_backend(backend)
    # Layer 0 with Logits: the masked rows go on through the dense layer 1 and the sparse layer 2.
    compare_with_naive(adapter, [images["tall"]], "Which way?", "both", 2, 1e-9, 1e-6, logits=True, layers=[0],
                       backend=be)


def test_float64_two_images_vision_mode(adapter, images) -> None:
    prep, fast, _ = compare_with_naive(adapter, [images["wide"], images["tall"]], "Compare them.", "vision", 2, 1e-9,
                                       1e-6, logits=True, window=2)
    assert [(im.grid_rows, im.grid_cols) for im in prep.images] == [(2, 3), (4, 2)]
    assert len(fast[0].layers[0].positions) == 6 + 8


def test_float64_text_only(adapter) -> None:
    target = adapter.tokenize(" image")[0]
    prep, _, _ = compare_with_naive(adapter, [], "Explain rotary embeddings.", "text", 2, 1e-9, 1e-6, logits=True,
                                    target=target)
    assert not prep.images


def test_masked_rows_are_routed_row_by_row(adapter, images) -> None:
    """The batched post-attention step routes each masked row itself, and routing does move: some masked
    rows pick other experts than the clean row (so the oracle comparisons above would catch a step that
    reused the clean row's routing)."""
    prep = adapter.prepare("What is in this image?", [load_image(str(images["wide"]))], [None])
    calls: dict[int, list[torch.Tensor]] = {layer: [] for layer in SPARSE}
    handles = []
    for layer in SPARSE:
        def hook(module, args, out, layer=layer):
            calls[layer].append(out[2].detach().clone())  # router_indices [rows, top_k]
        handles.append(adapter.layers[layer].mlp.gate.register_forward_hook(hook))
    try:
        res = list(Engine(adapter, "reference").run(prep, SweepConfig(mask_mode="both", num_tokens=1, layers=SPARSE)))
    finally:
        for h in handles:
            h.remove()
    S = prep.input_ids.shape[1]
    moved = 0
    for layer in SPARSE:
        prefill, clean, masked = calls[layer]  # the model's forward, the engine's clean row, its masked rows
        assert prefill.shape[0] == S and clean.shape[0] == 1 and masked.shape[0] == len(res[0].layers[0].positions)
        # The engine's clean row is routed exactly as the model's own forward routed the final position.
        assert set(clean[0].tolist()) == set(prefill[-1].tolist())
        moved += sum(set(row.tolist()) != set(clean[0].tolist()) for row in masked)
    assert moved > 0


def test_float32_default_experts_within_1e4(model_dir: Path, images) -> None:
    """float32 keeps transformers' default experts implementation; the engine still matches the oracle."""
    a32 = load_model(str(model_dir), torch.float32, "cpu")
    assert a32.model.config._experts_implementation != "eager"
    compare_with_naive(a32, [images["tall"]], "What color is it?", "both", 2, 1e-4, 1e-2, layers=[0, 2])


def test_api_with_a_loaded_float64_model(model_dir: Path, adapter) -> None:
    """An already-loaded float64 model with the default (grouped_mm) experts is switched to eager experts."""
    import maskvl
    from transformers import Qwen3VLMoeForConditionalGeneration

    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    assert model.config._experts_implementation != "eager"
    t = maskvl.sweep(model, prompt="Hello there", mask_mode="text", layers="2", logits=True,
                     tokenizer=adapter.tokenizer, image_processor=adapter.image_processor)
    assert model.config._experts_implementation == "eager"
    ref = maskvl.sweep(adapter, prompt="Hello there", mask_mode="text", layers="2", logits=True)
    assert t.table.column("l2_distance").to_pylist() == ref.table.column("l2_distance").to_pylist()


def test_make_tiny_model_cli(run_main, tmp_path: Path) -> None:
    code, _, err = run_main(["make-tiny-model", str(tmp_path / "m"), "--family", "qwen3_vl_moe", "--layers", "2"])
    assert code == 0, err
    a = load_model(str(tmp_path / "m"))
    assert isinstance(a, Qwen3VLMoeAdapter) and a.num_layers == 2
    assert all(type(layer.mlp).__name__ == "Qwen3VLMoeTextSparseMoeBlock" for layer in a.layers)
