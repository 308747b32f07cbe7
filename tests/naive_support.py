"""The engine against the naive oracle, as a reusable assertion for every model family's tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from maskvl.engine import Engine, SweepConfig
from maskvl.inputs import load_image
from maskvl.models.base import ModelAdapter
from maskvl.naive import naive_sweep, relative_l2_error


def compare_with_naive(adapter: ModelAdapter, image_paths: list[Any], prompt: str, mode: str, steps: int, tol: float,
                       row_tol: float, layers: list[int] | None = None, logits: bool = False, window: int = 1,
                       target: int | None = None, backend: str = "reference",
                       groups: Any = None, ref: list[Any] | None = None) -> tuple[Any, list[Any], float]:
    """Run the engine and the naive oracle on the same inputs and assert they agree.

    ``ref``: the oracle's steps (``naive_sweep``) for these same inputs, when already computed (one oracle
    run checked against several backends).

    Every variant's values over the masked positions must match to ``tol`` relative L2 error, every
    L2 row to ``row_tol`` relative; with ``logits`` the Logits row's L2, cosine, KL and target
    probability change too. ``groups``: position sets removed together (then ``mode`` is unused), or a
    callable from the prepared inputs to them. Returns ``(prepared, engine steps, worst relative error)``.
    """
    imgs = [load_image(str(p)) for p in image_paths]
    prep = adapter.prepare(prompt, imgs, [str(p) for p in image_paths])
    if callable(groups):
        groups = groups(prep)
    cfg = SweepConfig(mask_mode=mode, num_tokens=steps, layers=layers, logits=logits, knockout_window=window,
                      target_token=target, groups=groups)
    fast = list(Engine(adapter, backend).run(prep, cfg))
    if ref is None:
        ref = naive_sweep(adapter, prep, mode, steps, layers, knockout_window=window, groups=groups)
    assert [f.generated_id for f in fast] == [r.generated_id for r in ref]
    assert len(fast) == len(ref) == steps
    worst = 0.0
    for f, r in zip(fast, ref):
        for lr in f.layers:
            np.testing.assert_array_equal(lr.positions, r.positions)
            if groups is not None:
                np.testing.assert_array_equal(lr.group_index, np.arange(len(groups)))
                np.testing.assert_array_equal(r.group_index, np.arange(len(groups)))
            if logits:
                # The Logits variant is the last row: L2, cosine, KL and target-probability change.
                m = r.logits_measures(lr.layer, target)
                for name, got in (("l2", lr.l2[-1]), ("cos", lr.cos[-1]), ("kl", lr.kl[-1]), ("tpd", lr.tpd[-1])):
                    err = relative_l2_error(got, m[name])
                    assert err <= tol, ("Logits", f.step, lr.layer, name, err)
                assert np.isnan(lr.kl[:-1]).all()
                lr_l2, lr_cos = lr.l2[:-1], lr.cos[:-1]
            else:
                lr_l2, lr_cos = lr.l2, lr.cos
            for name, got, want in (("l2", lr_l2, r.l2[lr.layer]), ("cos", lr_cos, r.cos[lr.layer])):
                assert got.shape == want.shape
                assert np.isfinite(got).all()
                # Per variant: relative L2 error over the masked positions.
                for v in range(got.shape[0]):
                    err = relative_l2_error(got[v], want[v])
                    worst = max(worst, err)
                    assert err <= tol, (f.step, lr.layer, v, name, err)
                if name == "l2":
                    rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-300)
                    assert rel.max() <= row_tol, (f.step, lr.layer, rel.max())
    return prep, fast, worst


def small_image_processor(path: Path) -> Path:
    """Keep a Qwen-style model directory's processor settings except a smaller minimum size, so that small
    test images tokenize to a few patches (the oracle runs one forward per masked token)."""
    cfg_file = Path(path) / "preprocessor_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["size"] = {"shortest_edge": 4096, "longest_edge": 16777216}
    cfg_file.write_text(json.dumps(cfg))
    return Path(path)


def assert_file_matches(path: Path, fast: list[Any]) -> Any:
    """The rows of a written sweep file equal the engine's steps ``fast`` (positions, L2 and cosine, every
    variant each layer has, and no others). Returns the rows as a DataFrame."""
    df = pq.read_table(path).to_pandas()
    for f in fast:
        for lr in f.layers:
            at = df[(df.generation_step == f.step) & (df.layer == lr.layer)]
            assert set(at.variant) == set(lr.variants), (f.step, lr.layer)
            for v, name in enumerate(lr.variants):
                rows = at[at.variant == name]
                np.testing.assert_array_equal(rows.token_position.to_numpy(), lr.positions)
                np.testing.assert_allclose(rows.l2_distance.to_numpy(), lr.l2[v], rtol=1e-9, atol=0)
                np.testing.assert_allclose(rows.cosine_distance.to_numpy(), lr.cos[v], rtol=1e-9, atol=1e-300)
    return df


def cli_sweep_one_image(run_main: Any, model_dir: Path, image: Path, out: Path,
                        prompt: str = "What is in this image?") -> dict[str, Any]:
    """``maskvl sweep`` of one image on a model directory (float64, both, 2 tokens, Logits) into ``out``:
    asserts exit 0 and returns the file's metadata."""
    from maskvl.io import read_metadata

    code, _, err = run_main(["sweep", "--model", str(model_dir), "--image", str(image), "--prompt", prompt,
                             "--dtype", "float64", "--mask-mode", "both", "--num-tokens", "2", "--logits", "-q",
                             "-o", str(out)])
    assert code == 0, err
    return read_metadata(out)
