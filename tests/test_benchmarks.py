"""The benchmark suite: its baseline computes what maskvl computes, and its records are what they say."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import run as bench_run
from benchmarks.bench_sweep import Case, available_backends, extrapolate, run_cases, spread
from benchmarks.models import build_adapter, get_shape, grid_for, prepare, prepare_text
from benchmarks.prototype_algorithm import PrototypeStep, prototype_sweep
from maskvl.engine import Engine, SweepConfig
from maskvl.naive import relative_l2_error


@pytest.fixture(scope="module")
def tiny64():
    return build_adapter(get_shape("tiny"), dtype=torch.float64, seed=1)


@pytest.mark.parametrize("mode,steps", [("vision", 2), ("both", 1)])
def test_prototype_algorithm_equals_engine_float64(tiny64, mode, steps):
    prepared = prepare(tiny64, 16)
    fast = list(Engine(tiny64, "reference").run(prepared, SweepConfig(mask_mode=mode, num_tokens=steps)))
    slow = prototype_sweep(tiny64, prepared, mode, steps)
    assert len(fast) == len(slow) == steps
    for f, s in zip(fast, slow):
        assert f.generated_id == s.generated_id
        assert sorted(s.l2) == [lr.layer for lr in f.layers] == list(range(tiny64.num_layers))
        for lr in f.layers:
            np.testing.assert_array_equal(lr.positions, s.positions)
            assert lr.l2.shape == s.l2[lr.layer].shape == (2 + tiny64.num_heads, len(s.positions))
            assert np.all(s.l2[lr.layer] > 0)  # every mask changes something: nothing is vacuous
            assert relative_l2_error(lr.l2, s.l2[lr.layer]) <= 1e-9
            assert relative_l2_error(lr.cos, s.cos[lr.layer]) <= 1e-9


def test_prototype_algorithm_equals_engine_moe_float64():
    """The baseline's layer pass runs the MoE model's own sparse blocks over the whole sequence."""
    moe = build_adapter(get_shape("tiny-moe"), dtype=torch.float64, seed=1)
    assert type(moe.layers[0].mlp).__name__ == "Qwen3VLMoeTextSparseMoeBlock"
    prepared = prepare(moe, 12)
    fast = list(Engine(moe, "reference").run(prepared, SweepConfig(mask_mode="both", num_tokens=2)))
    slow = prototype_sweep(moe, prepared, "both", 2)
    assert [f.generated_id for f in fast] == [s.generated_id for s in slow]
    for f, s in zip(fast, slow):
        for lr in f.layers:
            np.testing.assert_array_equal(lr.positions, s.positions)
            assert np.all(s.l2[lr.layer] > 0)
            assert relative_l2_error(lr.l2, s.l2[lr.layer]) <= 1e-9
            assert relative_l2_error(lr.cos, s.cos[lr.layer]) <= 1e-9


def test_prototype_algorithm_equals_engine_text_only_float64():
    """The text-only case's baseline (a Qwen3 text decoder, no q/k norm assumptions beyond the model's)."""
    adapter = build_adapter(get_shape("text-tiny"), dtype=torch.float64, seed=2)
    prepared = prepare_text(adapter, 24)
    assert prepared.input_ids.shape[1] == 24 and not bool(prepared.is_image.any())
    fast = list(Engine(adapter, "reference").run(prepared, SweepConfig(mask_mode="text", num_tokens=2)))
    slow = prototype_sweep(adapter, prepared, "text", 2)
    assert [f.generated_id for f in fast] == [s.generated_id for s in slow]
    for f, s in zip(fast, slow):
        for lr in f.layers:
            assert len(s.positions) == f.seq_len and np.all(s.l2[lr.layer] > 0)
            assert relative_l2_error(lr.l2, s.l2[lr.layer]) <= 1e-9
            assert relative_l2_error(lr.cos, s.cos[lr.layer]) <= 1e-9


def test_prototype_algorithm_sees_the_image(tiny64):
    """The baseline's results depend on the pixels (the prototype's sweep never saw the image: it embedded the image pads themselves)."""
    a = prototype_sweep(tiny64, prepare(tiny64, 4, seed=0), "vision", 1, layers=[1])[0]
    b = prototype_sweep(tiny64, prepare(tiny64, 4, seed=1), "vision", 1, layers=[1])[0]
    assert relative_l2_error(a.l2[1], b.l2[1]) > 1e-3


def test_image_token_counts_are_exact():
    assert grid_for(16) == (4, 4) and grid_for(288) == (16, 18) and grid_for(7) == (1, 7)
    adapter = build_adapter(get_shape("tiny"))
    for n in (1, 6, 16, 64):
        assert int(prepare(adapter, n).is_image.sum()) == n


def test_extrapolation_formula():
    st = PrototypeStep(0, 30, np.arange(4), {}, {}, 0, prefill_s=1.0, layer_s={0: 5.0, 3: 7.0})
    # per layer: 6 s measured over 4 + 1 passes -> (20 + 1) passes; 4 layers
    assert extrapolate([st], 4, [20]) == pytest.approx(1.0 + 6.0 * 21 / 5 * 4)
    assert spread(8, 2) == [0, 7] and spread(8, None) == list(range(8)) and spread(3, 5) == [0, 1, 2]


def test_suite_smoke(tmp_path):
    out = tmp_path / "out.json"
    cases = [Case("smoke-full", "tiny", 4, 2, num_layers=2, bruteforce=True),
             Case("smoke-subset", "tiny", 6, 1, num_layers=2, naive_layers=1, naive_positions=2),
             Case("smoke-text", "text-tiny", 0, 1, num_layers=2, naive_layers=1, mask_mode="text", prompt_tokens=20)]
    records = run_cases(cases, torch.device("cpu"), torch.float32, json_path=str(out), log=lambda m: None)
    assert json.loads(out.read_text()) == json.loads(json.dumps(records))
    backends = available_backends(torch.device("cpu"))
    assert "reference" in backends
    logits = 2 if any(r["logits"] for r in records) else 1
    assert len(records) == (2 + 1 + 1) * len(backends) * logits
    for r in records:
        for key in ("name", "naive_s", "fast_s", "speedup", "tokens_per_s", "peak_mem_mb", "device", "dtype",
                    "backend", "commit", "machine"):
            assert key in r, key
        assert r["speedup"] == r["naive_s"] / r["fast_s"]
        assert r["tokens_per_s"] == r["masked_total"] / r["fast_s"]
        assert r["fast_s"] > 0 and r["naive_s"] > 0 and r["peak_mem_mb"] > 0
        assert r["device"] == "cpu" and r["dtype"] == "float32" and r["backend"] in backends
        assert len(r["commit"]) == 40 or r["commit"] == "unknown"
        assert r["machine"]["torch"] == torch.__version__
        assert r["same_tokens"] and r["rel_err_l2"] < 1e-4 and r["rel_err_cos"] < 1e-3
    full = [r for r in records if r["case"] == "smoke-full"]
    assert {r["baseline"] for r in full} == {"prototype", "bruteforce"}
    assert all(not r["naive_extrapolated"] and r["naive_s"] == r["naive_measured_s"] for r in full)
    assert all(r["masked_total"] == 2 * 4 * 2 for r in full)  # 2 steps x 4 image tokens x 2 layers
    sub = [r for r in records if r["case"] == "smoke-subset"]
    assert all(r["naive_extrapolated"] and r["naive_layers_measured"] == [0] and r["naive_positions_measured"] == [2]
               for r in sub)
    assert all(r["naive_s"] > r["naive_measured_s"] for r in sub)
    text = [r for r in records if r["case"] == "smoke-text"]
    assert all(r["seq_len"] == 20 and r["masked_total"] == 20 * 2 and r["naive_extrapolated"] for r in text)

    from benchmarks.plot import plot

    png = tmp_path / "scaling.png"
    plot(records, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_custom_case(tmp_path, capsys):
    out = tmp_path / "cli.json"
    assert bench_run.main(["--shape", "tiny", "--layers", "1", "--tokens", "4", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert records and all(r["case"] == "tiny-L1-img4-s1" and r["image_tokens"] == 4 for r in records)
    assert "speedup" in capsys.readouterr().out


def test_presets_are_well_formed():
    for name, preset in bench_run.PRESETS.items():
        assert preset["cases"], name
        for c in preset["cases"]:
            shape = get_shape(c.shape)
            assert (c.prompt_tokens >= 1 and c.image_tokens == 0 and c.mask_mode == "text" if shape.text_only
                    else c.image_tokens >= 1) and c.steps >= 1
    # make gpu-check's preset: Qwen3-VL-4B shapes, one 1024x1024 image, 3 steps, the baseline extrapolated.
    (gpu,) = bench_run.PRESETS["gpu"]["cases"]
    assert (gpu.shape, gpu.image_tokens, gpu.steps, gpu.mask_mode) == ("4b", 1024, 3, "vision")
    assert gpu.naive_layers and bench_run.PRESETS["gpu"]["dtype"] == "bfloat16"
    assert any(c.image_tokens == 16384 for c in bench_run.PRESETS["gpu-scaling"]["cases"])
    ci = bench_run.PRESETS["ci"]["cases"]
    assert {"mid", "moe"} <= {c.shape for c in ci} and get_shape("moe").num_experts > 0
    assert any(get_shape(c.shape).text_only for c in ci)


def test_gated_delta_case_in_the_presets():
    """The CI and GPU presets time the gated-delta-rule knockout against the per-position recurrence; a
    small case runs here and its closed form agrees with the naive runs it timed."""
    from benchmarks import bench_gated_delta

    assert bench_run.PRESETS["ci"]["gated_delta"] and bench_run.PRESETS["gpu"]["gated_delta"]
    rec = bench_gated_delta.run_case(16, naive_positions=3, repeat=1, backends=["reference"])
    assert rec["naive_extrapolated"] and rec["naive_s"] > 0 and rec["speedup"]["reference"] > 0
    assert rec["max_rel_err_vs_naive"]["reference"] < 1e-4
    assert "gdn-T16" in bench_gated_delta.format_record(rec)
