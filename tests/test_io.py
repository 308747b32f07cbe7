"""The Parquet format: schema, order, metadata, step-by-step atomic writes, partial results."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from maskvl import io, measures
from maskvl.api import run_sweep
from maskvl.engine import SweepConfig

COLUMNS = ["generation_step", "layer", "token_masked", "token_position", "variant", "l2_distance",
           "cosine_distance", "token_kind", "image_index", "patch_row", "patch_col", "kl_divergence",
           "target_prob_delta", "group_index", "grid_index"]


def test_file_format(adapter32, images, tmp_path):
    out = tmp_path / "run.parquet"
    res = run_sweep(adapter32, [str(images["wide"]), str(images["tall"])], "What differs?",
                    {"mask_mode": "both", "num_tokens": 2, "csv": True}, output=out)
    assert res.path == out and out.exists() and out.with_suffix(".csv").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
    pf = pq.ParquetFile(out)
    assert pf.schema_arrow.names == COLUMNS
    # One row group per (step, layer), each holding that step and layer only (their statistics say so).
    assert pf.metadata.num_row_groups == 2 * 3
    for i in range(pf.metadata.num_row_groups):
        rg = pf.metadata.row_group(i)
        step, layer = rg.column(0).statistics, rg.column(1).statistics
        assert (step.min, step.max, layer.min, layer.max) == (i // 3, i // 3, i % 3, i % 3)
    t = pf.read().to_pandas()
    md = io.read_metadata(out)
    assert md["complete"] and md["steps_completed"] == 2 and md["format_version"] == 2
    assert md["mask_mode"] == "both" and md["variants"] == measures.variant_names(6)
    assert [(i["grid_rows"], i["grid_cols"]) for i in md["images"]] == [(2, 3), (4, 2)]
    assert md["images"][0]["original_size"] == [96, 64]
    assert len(md["tokens"]) == len(md["tokens"]) and md["generated"][0]["step"] == 0
    # sorted by step, layer, variant (natural), position
    key = list(zip(t.generation_step, t.layer, t.variant.map(measures.variant_sort_key), t.token_position))
    assert key == sorted(key)
    assert not t.duplicated(["generation_step", "layer", "variant", "token_position"]).any()
    n_seq0 = len(md["tokens"]) - 1
    assert len(t) == (n_seq0 + n_seq0 + 1) * 3 * (2 + 6)
    img = t[t.token_kind == "image"]
    assert img.image_index.notna().all() and set(img.image_index) == {0, 1}
    im0 = md["images"][0]
    first = img[(img.token_position == im0["token_start"] + 4)].iloc[0]
    assert (first.patch_row, first.patch_col) == (1, 1)
    assert t[t.token_kind == "text"].patch_row.isna().all()
    assert t.kl_divergence.isna().all()
    assert t.group_index.isna().all() and md["mask_groups"] is None and md["groups"] is None  # per-token run
    # token text is the token decoded alone
    assert t[t.token_position == 0].token_masked.iloc[0] == "<|im_start|>"


def test_interrupted_run_keeps_completed_steps(adapter32, images, tmp_path):
    out = tmp_path / "cut.parquet"
    calls = []

    def boom(done, total):
        calls.append(done)
        if done == 4:  # first layer of the second step: step 0 is complete
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(adapter32, [str(images["wide"])], "Hi", {"mask_mode": "both", "num_tokens": 3},
                  output=out, on_progress=boom)
    assert not out.exists()
    part = io.partial_path(out)
    assert part.exists()
    md = io.read_metadata(part)
    assert md["complete"] is False and md["steps_completed"] == 1
    t = pq.read_table(part)
    assert set(t.column("generation_step").to_pylist()) == {0}
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_clean_stale_temps(tmp_path):
    (tmp_path / f".x.parquet{io.TEMP_MARKER}abc").write_bytes(b"junk")
    (tmp_path / "keep.parquet").write_bytes(b"")
    removed = io.clean_stale_temps(tmp_path)
    assert len(removed) == 1 and sorted(os.listdir(tmp_path)) == ["keep.parquet"]


def test_float64_run_stores_float64(adapter64, images, tmp_path):
    out = tmp_path / "f64.parquet"
    run_sweep(adapter64, [], "Hi there", {"num_tokens": 1, "layers": [1]}, output=out)
    t = pq.read_table(out)
    assert str(t.schema.field("l2_distance").type) == "double"
    assert np.isfinite(t.column("l2_distance").to_numpy()).all()


def test_api_with_loaded_transformers_objects(adapter32, images):
    """maskvl.sweep takes a loaded model + tokenizer + image processor, not only an id."""
    import maskvl

    a = adapter32
    t = maskvl.sweep(a.model, images=[str(images["wide"])], prompt="Hi", mask_mode="vision", layers="1",
                     logits=True, tokenizer=a.tokenizer, image_processor=a.image_processor)
    df = t.to_pandas()
    assert set(df.layer) == {1} and set(df.token_kind) == {"image"}
    assert df[df.variant == "Logits"].kl_divergence.notna().all()
    md = json.loads(t.table.schema.metadata[b"maskvl"])
    assert md["variants"][-1] == "Logits" and md["complete"]


def test_logits_chunking_is_announced(adapter32, images):
    from maskvl.engine import Engine

    notes = []
    prep = adapter32.prepare("Hi", [], [])
    cfg = SweepConfig(mask_mode="both", logits=True, max_batch_rows=8)
    small = list(Engine(adapter32, "reference").run(prep, cfg, on_note=notes.append))
    big = list(Engine(adapter32, "reference").run(prep, SweepConfig(mask_mode="both", logits=True)))
    assert notes and "chunks of 8" in notes[0]
    np.testing.assert_allclose(small[0].layers[0].l2, big[0].layers[0].l2, rtol=1e-5)
