"""Qwen2-VL and Qwen2.5-VL: tiny random hub-like models written offline, the engine against the naive
oracle (transformers' own forward with one attention entry removed) in float64, every backend, one and
two non-square images and text only, the MRoPE positions, and one CLI run each."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from maskvl.inputs import load_image
from maskvl.models import adapter_class, load_model
from naive_support import assert_file_matches, cli_sweep_one_image, compare_with_naive

# Odd shapes per family: Qwen2-VL GQA 6:2 with head_dim 12, three layers; Qwen2.5-VL GQA 4:1 with
# head_dim 20, tied embeddings (as the 3B checkpoint), two layers.
SHAPES = {
    "qwen2_vl": dict(num_layers=3, num_heads=6, num_kv_heads=2, hidden_size=72, intermediate_size=88),
    "qwen2_5_vl": dict(num_layers=2, num_heads=4, num_kv_heads=1, hidden_size=80, intermediate_size=72,
                       tie_word_embeddings=True),
}
# The hub's processor settings (patch 14, merge 2): 96x64 px -> 84x56 -> a 2x3 merged grid; 64x128 -> 56x140 -> 5x2.
GRIDS = {"wide": (2, 3), "tall": (5, 2)}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_dir(family: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return adapter_class(family).write_tiny_model(tmp_path_factory.mktemp("models") / family, seed=2,
                                                  **SHAPES[family])


@pytest.fixture(scope="module")
def adapter(model_dir: Path):
    return load_model(str(model_dir), torch.float64, "cpu")


@pytest.fixture(scope="module")
def one_image_run(adapter, images) -> tuple[Any, list[Any]]:
    """The engine (reference backend) against the naive oracle: one wide image, every position and layer,
    two steps, Logits on. Returns the prepared inputs and the engine's steps."""
    prep, fast, worst = compare_with_naive(adapter, [images["wide"]], "What is in this image?", "both", 2, 1e-9, 1e-6,
                                           logits=True)
    print(f"{type(adapter).__name__}: worst relative error vs the naive oracle {worst:.2e}")
    return prep, fast


def test_directory_is_hub_like(family: str, model_dir: Path, adapter) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json"):
        assert (model_dir / name).exists(), name
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == family
    pre = json.loads((model_dir / "preprocessor_config.json").read_text())
    assert (pre["patch_size"], pre["merge_size"], pre["min_pixels"], pre["max_pixels"]) == (14, 2, 3136, 12845056)
    assert type(adapter).MODEL_TYPES == (family,) and adapter.supports_images
    # The text decoder: q/k/v biases, no q/k norms, head_dim = hidden / heads.
    attn = adapter.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None
    assert getattr(attn, "q_norm", None) is None and getattr(attn, "k_norm", None) is None
    assert adapter.head_dim == SHAPES[family]["hidden_size"] // SHAPES[family]["num_heads"]


def test_float64_one_image_every_variant_two_steps(one_image_run) -> None:
    prep, fast = one_image_run
    im = prep.images[0]
    assert (im.grid_rows, im.grid_cols) == GRIDS["wide"] and im.resized_size == (84, 56)
    # The hub's chat template: default system turn, image pads between vision start and end.
    assert prep.prompt_text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert "<|vision_start|>" + "<|image_pad|>" * 6 + "<|vision_end|>" in prep.prompt_text
    S = prep.input_ids.shape[1]
    assert [len(f.layers[0].positions) for f in fast] == [S, S + 1]
    assert fast[0].layers[0].variants[-1] == "Logits"


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_float64_backends_against_naive(adapter, images, backend: str) -> None:
    from maskvl.ops.testing import compiled_backend

    be, _ = compiled_backend(backend)
    # Layer 0 with Logits: the masked rows go on through every later layer's decode attention.
    compare_with_naive(adapter, [images["tall"]], "Which way?", "both", 2, 1e-9, 1e-6, logits=True, layers=[0],
                       backend=be)


def test_float64_two_images_vision_mode(adapter, images) -> None:
    prep, fast, _ = compare_with_naive(adapter, [images["wide"], images["tall"]], "Compare them.", "vision", 2, 1e-9,
                                       1e-6, logits=True, window=2)
    assert [(im.grid_rows, im.grid_cols) for im in prep.images] == [GRIDS["wide"], GRIDS["tall"]]
    assert len(fast[0].layers[0].positions) == 6 + 10


def test_float64_text_only(adapter) -> None:
    target = adapter.tokenize(" image")[0]
    prep, _, _ = compare_with_naive(adapter, [], "Explain rotary embeddings.", "text", 2, 1e-9, 1e-6, logits=True,
                                    target=target)
    assert not prep.images and "image_grid_thw" not in prep.model_inputs


def test_mrope_positions_are_the_models_own(adapter, images) -> None:
    """The clean pass uses get_rope_index's 3D positions (not token indices), also after an image."""
    prep = adapter.prepare("Describe both.", [load_image(str(images["wide"])), load_image(str(images["tall"]))],
                           [None, None])
    inner = adapter.model.model
    pos, delta = inner.get_rope_index(prep.input_ids, prep.model_inputs["mm_token_type_ids"],
                                      prep.model_inputs["image_grid_thw"])
    S = prep.input_ids.shape[1]
    # Each image advances the text position by max(rows, cols) merged tokens, not by its token count.
    assert int(pos[0, 0, -1]) == S - 1 - (6 - 3) - (10 - 5) and int(delta) == -8
    cache = adapter.new_cache()
    cap = adapter.prefill(prep, cache)
    x = torch.zeros(1, 1, adapter.hidden_size, dtype=adapter.dtype)
    cos, sin = adapter.text_model.rotary_emb(x, pos[:, :, -1:])
    assert torch.equal(cap.rope[0], cos[0, -1]) and torch.equal(cap.rope[1], sin[0, -1])
    # The decode step continues from there.
    cap1 = adapter.decode(int(cap.logits.argmax()), cache)
    cos1, _ = adapter.text_model.rotary_emb(x, pos[:, :, -1:] + 1)
    assert torch.equal(cap1.rope[0], cos1[0, -1])


def test_vision_tower_attention_windows(family: str, adapter, images) -> None:
    """Qwen2-VL's vision blocks attend over the whole image; the tiny Qwen2.5-VL's window attention is in
    play (the test image spans several windows) except in its last, full-attention block."""
    visual = adapter.model.model.visual
    seen: list[int] = []

    def hook(module, args, kwargs):
        seen.append(len(kwargs["cu_seqlens"]) - 1)  # attention segments in this block

    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in visual.blocks]
    try:
        adapter.forward_full(adapter.prepare("Hi", [load_image(str(images["tall"]))], [None]), [])
    finally:
        for h in handles:
            h.remove()
    if family == "qwen2_vl":
        assert seen == [1] * len(visual.blocks)
    else:
        # 5x2 merged tokens in windows of 2x2 merged tokens: 3 windows.
        assert seen == [3] * (len(visual.blocks) - 1) + [1]


def test_cli_sweep_float64_both_logits(model_dir: Path, images, one_image_run, run_main, tmp_path: Path) -> None:
    """`maskvl sweep` on the directory writes what the engine computed (itself checked against the oracle)."""
    prep, fast = one_image_run
    out = tmp_path / "cli.parquet"
    md = cli_sweep_one_image(run_main, model_dir, images["wide"], out)
    assert md["complete"] and md["dtype"] == "float64"
    assert [(g["grid_rows"], g["grid_cols"]) for g in md["images"]] == [GRIDS["wide"]]
    assert_file_matches(out, fast)


def test_make_tiny_model_cli(family: str, run_main, capsys, tmp_path: Path) -> None:
    code, _, err = run_main(["make-tiny-model", str(tmp_path / "m"), "--family", family, "--layers", "1"])
    assert code == 0, err
    a = load_model(str(tmp_path / "m"))
    assert type(a).MODEL_TYPES == (family,) and a.num_layers == 1 and (a.num_heads, a.head_dim) == (4, 16)
    # head_dim is hidden_size / num_heads in this family: a contradicting shape is a one-line error.
    capsys.readouterr()  # drop the loader's progress output
    code, _, err = run_main(["make-tiny-model", str(tmp_path / "bad"), "--family", family, "--heads", "6"])
    assert code == 2 and err.startswith("maskvl: error: Qwen2-VL and Qwen2.5-VL have head_dim = hidden_size / "
                                        "num_heads") and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()
