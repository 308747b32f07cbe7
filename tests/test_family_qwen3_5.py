"""Qwen3.5 and Qwen3.5-MoE: tiny random hub-like models written offline, the engine against the naive oracle
in float64 on every backend (Triton under the interpreter), one and two non-square images and text only, 2
steps, with Logits.

At the linear-attention layers the oracle is transformers' own layer run once more with the knocked-out
position's write skipped (g_p = 0, beta_p = 0), only the final position's output spliced in; a float64
model computes those layers in float64 (``ExactLinear``), since transformers' rule runs in float32. The
float32 test runs the oracle through transformers' own float32 rule, untouched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from maskvl.engine import Engine, SweepConfig
from maskvl.errors import InputError
from maskvl.models import load_model
from maskvl.models.qwen3_5 import Qwen3_5Adapter, Qwen3_5MoeAdapter
from maskvl.models.qwen3_5_linear import ExactLinear
from naive_support import assert_file_matches, cli_sweep_one_image, compare_with_naive, small_image_processor

# Layers 0-2 linear attention (3 key heads of 16, 6 value heads of 8: more heads than the attention layers),
# layer 3 full attention (GQA 4:2, head_dim 32, rotary on its first 8 dims).
SHAPE = dict(num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, hidden_size=48, intermediate_size=80,
             linear_num_key_heads=3, linear_num_value_heads=6, linear_key_head_dim=16, linear_value_head_dim=8)
LINEAR, FULL = [0, 1, 2], [3]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_image_processor(Qwen3_5Adapter.write_tiny_model(tmp_path_factory.mktemp("models") / "qwen3_5", seed=5,
                                                         **SHAPE))


@pytest.fixture(scope="module")
def adapter(model_dir: Path):
    return load_model(str(model_dir), torch.float64, "cpu")


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_image_processor(Qwen3_5MoeAdapter.write_tiny_model(
        tmp_path_factory.mktemp("models") / "qwen3_5_moe", seed=6, num_layers=4, num_heads=4, num_kv_heads=2,
        head_dim=32, hidden_size=40, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
        shared_expert_intermediate_size=20))


def test_directory_and_layers(model_dir: Path, adapter) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
                 "video_preprocessor_config.json"):
        assert (model_dir / name).exists(), name
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "qwen3_5"
    assert isinstance(adapter, Qwen3_5Adapter)
    assert [adapter.layer_kind(i) for i in range(4)] == ["linear"] * 3 + ["attention"]
    assert [adapter.layer_heads(i) for i in range(4)] == [6, 6, 6, 4]
    # float64 runs compute the linear layers in float64; other dtypes run transformers' forward untouched.
    assert len(adapter._exact) == 3
    assert load_model(str(model_dir), torch.float32, "cpu")._exact == []


def test_float64_one_image_every_variant_two_steps(adapter, images, run_main, model_dir: Path,
                                                   tmp_path: Path) -> None:
    prep, fast, worst = compare_with_naive(adapter, [images["wide"]], "What is in this image?", "both", 2, 1e-9,
                                           1e-6, logits=True)
    print(f"Qwen3_5Adapter: worst relative error vs the naive oracle {worst:.2e}")
    assert (prep.images[0].grid_rows, prep.images[0].grid_cols) == (2, 3)
    S = prep.input_ids.shape[1]
    assert [len(f.layers[0].positions) for f in fast] == [S, S + 1]
    # Per-layer heads: six at the linear layers, four at the attention layer.
    assert [len(lr.variants) for lr in fast[0].layers] == [2 + 6 + 1] * 3 + [2 + 4 + 1]
    # Early positions still reach the final readout of the linear layers (slow decays): the oracle
    # comparison covers non-trivial rows there.
    for lr in fast[0].layers[:3]:
        assert (lr.l2[0] > 0).sum() >= S - 1
    # The command line on the same directory writes what the engine computed; render and view take it.
    out = tmp_path / "cli.parquet"
    md = cli_sweep_one_image(run_main, model_dir, images["wide"], out)
    assert md["complete"] and [(g["grid_rows"], g["grid_cols"]) for g in md["images"]] == [(2, 3)]
    assert md["layer_types"] == ["linear"] * 3 + ["attention"] and md["layer_heads"] == [6, 6, 6, 4]
    assert md["variants"] == ["Full", "Attn"] + [f"Head_{h}" for h in range(6)] + ["Logits"]
    assert_file_matches(out, fast)  # each layer has its own heads' rows and no others
    # The result API: a head a layer lacks is a one-line error for one layer, NaN across layers.
    import maskvl

    sw = maskvl.open(out)
    assert np.isfinite(sw.grid(step=1, layer=0, variant="Head_5")).all()
    with pytest.raises(InputError, match="not at layer 3: that attention layer has 4 heads"):
        sw.grid(step=1, layer=3, variant="Head_5")
    maps = sw.maps(0, variant="Head_5")
    assert np.isnan(maps[:, 3]).all() and np.isfinite(maps[:, :3]).all()
    code, _, err = run_main(["render", str(out), "-o", str(tmp_path / "r.png"), "--variant", "Head_5"])
    assert code == 0 and (tmp_path / "r.png").stat().st_size > 5_000, err
    code, _, err = run_main(["view", str(out), "-o", str(tmp_path / "v.html")])
    assert code == 0 and (tmp_path / "v.html").stat().st_size > 10_000, err


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_float64_backends_against_naive(adapter, images, backend: str) -> None:
    from maskvl.ops.testing import compiled_backend

    be, _ = compiled_backend(backend)
    # Layer 0 with Logits: the masked rows go on through the linear layers 1, 2 and the attention layer 3.
    compare_with_naive(adapter, [images["tall"]], "Which way?", "both", 2, 1e-9, 1e-6, logits=True, layers=[0, 3],
                       backend=be)


def test_float64_two_images_vision_mode(adapter, images) -> None:
    prep, fast, _ = compare_with_naive(adapter, [images["wide"], images["tall"]], "Compare them.", "vision", 2, 1e-9,
                                       1e-6, logits=True)
    assert [(im.grid_rows, im.grid_cols) for im in prep.images] == [(2, 3), (4, 2)]
    assert len(fast[0].layers[0].positions) == 6 + 8


def test_float64_text_only_with_window_at_attention_layers(adapter) -> None:
    """Text only, a target token, and a knockout window of 2 from layer 2 (linear) into layer 3 (attention)."""
    target = adapter.tokenize(" image")[0]
    prep, _, _ = compare_with_naive(adapter, [], "Explain rotary embeddings.", "text", 2, 1e-9, 1e-6, logits=True,
                                    target=target, layers=[2, 3], window=2)
    assert not prep.images


def test_float32_against_transformers_own_arithmetic(model_dir: Path, images) -> None:
    """float32: no float64 forward installed, the oracle's linear layers are transformers' own float32 rule
    (chunked for the whole sequence, with the write skipped); the engine's closed form agrees to float32's
    resolution of the distances: per variant over the positions (single rows of tiny effect carry
    float32's noise of the whole readout, so the per-row bound is loose)."""
    a32 = load_model(str(model_dir), torch.float32, "cpu")
    _, _, worst = compare_with_naive(a32, [images["wide"]], "What color is it?", "both", 2, 1e-4, 0.5)
    print(f"float32 vs transformers' own float32 layers: worst relative error per variant {worst:.2e}")


def test_unsupported_combinations_are_one_line_errors(adapter, model_dir: Path, run_main, tmp_path: Path) -> None:
    prep = adapter.prepare("Hello there", [], [])
    with pytest.raises(InputError, match="linear-attention layer after measured layer 1"):
        list(Engine(adapter, "reference").run(prep, SweepConfig(mask_mode="text", logits=True, knockout_window=2,
                                                                layers=[1])))
    code, _, err = run_main(["sweep", "--model", str(model_dir), "--prompt", "Hi", "--logits", "--knockout-window",
                             "3", "-q", "-o", str(tmp_path / "x.parquet")])
    assert code == 2 and err.startswith("maskvl: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "x.parquet").exists()


def test_float64_groups_at_linear_and_attention_layers(adapter, images) -> None:
    """Group knockout (every write of a set skipped together at a linear layer; the set's keys removed at
    the attention layer) against the oracle, which runs transformers' layer with the whole set's writes
    skipped: image blocks, the whole image and a scattered text set, 2 steps, Logits."""
    from maskvl.groups import parse_specs, resolve_groups

    def groups(prep):
        found = resolve_groups(parse_specs(["blocks:1x2", "images"]), prep.images, prep.is_image)
        return [list(g.positions) for g in found] + [[0, 3, prep.input_ids.shape[1] - 1]]

    compare_with_naive(adapter, [images["wide"]], "What is in this image?", "both", 2, 1e-9, 1e-6, logits=True,
                       groups=groups)


def test_exact_linear_against_transformers_layer(adapter, model_dir: Path) -> None:
    """The float64 forward hook computes transformers' layer: float64 logits of the whole model equal the
    float32 model's to float32's resolution, prefill and decode agree, and the hook comes off."""
    a32 = load_model(str(model_dir), torch.float32, "cpu")
    prep = adapter.prepare("Describe the picture.", [], [])
    c64, c32 = adapter.new_cache(), a32.new_cache()
    l64, l32 = adapter.prefill(prep, c64).logits, a32.prefill(prep, c32).logits
    torch.testing.assert_close(l64, l32.double(), rtol=0, atol=1e-4 * float(l64.abs().max()))
    tok = int(l64.argmax())
    torch.testing.assert_close(adapter.decode(tok, c64).logits, adapter.forward_full(prep, [tok]), rtol=1e-12,
                               atol=1e-12)
    m = adapter.layers[0].linear_attn
    x = torch.randn(1, 9, adapter.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        hooked = m(x)
        extra = ExactLinear(m)
        assert torch.equal(m(x), hooked)
        extra.remove()
        for e in adapter._exact:
            if e.module is m:
                e.remove()
        try:
            plain = m(x)
        finally:
            adapter._exact = [e for e in adapter._exact if e.module is not m] + [ExactLinear(m)]
    assert not torch.equal(plain, hooked)
    torch.testing.assert_close(hooked, plain, rtol=0, atol=1e-5 * float(hooked.abs().max()))


def test_moe_float64_against_naive(moe_dir: Path, images) -> None:
    a = load_model(str(moe_dir), torch.float64, "cpu")
    assert isinstance(a, Qwen3_5MoeAdapter) and a.model.config._experts_implementation == "eager"
    assert all(type(lay.mlp).__name__ == "Qwen3_5MoeSparseMoeBlock" for lay in a.layers)
    prep, fast, worst = compare_with_naive(a, [images["wide"]], "What is in this image?", "both", 2, 1e-9, 1e-6,
                                           logits=True)
    print(f"Qwen3_5MoeAdapter: worst relative error vs the naive oracle {worst:.2e}")
    # The masked rows are routed by the model's own router, row by row: some move to other experts.
    calls: list[torch.Tensor] = []
    h = a.layers[0].mlp.gate.register_forward_hook(lambda mod, args, out: calls.append(out[2].detach().clone()))
    try:
        list(Engine(a, "reference").run(prep, SweepConfig(mask_mode="both", layers=[0])))
    finally:
        h.remove()
    _prefill, clean, masked = calls
    assert clean.shape[0] == 1 and masked.shape[0] == prep.input_ids.shape[1]
    assert sum(set(r.tolist()) != set(clean[0].tolist()) for r in masked) > 0


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_make_tiny_model_cli(run_main, tmp_path: Path, family: str) -> None:
    code, _, err = run_main(["make-tiny-model", str(tmp_path / "m"), "--family", family, "--layers", "4"])
    assert code == 0, err
    a = load_model(str(tmp_path / "m"))
    assert a.num_layers == 4 and [a.layer_kind(i) for i in range(4)] == ["linear"] * 3 + ["attention"]
    code, out, err = run_main(["info"])
    assert code == 0 and family in out


try:
    from tests.viewer_support import browser, needs_chromium, set_view, viewer  # noqa: F401  (fixtures)
except ImportError:
    from viewer_support import browser, needs_chromium, set_view, viewer  # type: ignore[no-redef]  # noqa: F401


@needs_chromium
def test_viewer_per_layer_heads(viewer, adapter, images, tmp_path: Path) -> None:
    """The viewer on a Qwen3.5 file: Head_5 draws at a linear layer, and at the attention layer (4 heads)
    the status line says why there is nothing to draw."""
    import maskvl

    out = tmp_path / "q35.parquet"
    maskvl.sweep(adapter, [images["wide"]], "What is it?", mask_mode="both", output=out)
    v = viewer().goto()
    v.open(out)
    set_view(v, layer=0, variant="Head_5")
    assert "is not at layer" not in v.status() and "No rows" not in v.status()
    set_view(v, layer=3, variant="Head_5")
    assert "Head_5 is not at layer 3: this attention layer has 4 heads (Head_0 … Head_3)." in v.status()
    set_view(v, layer=3, variant="Head_3")
    assert "is not at layer" not in v.status()
