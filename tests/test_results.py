"""The result object (``maskvl.open``, ``maskvl.sweep``, ``maskvl.iter_sweep``): values equal the file's,
lazy reading by (step, layer) row group, files of the older one-row-group-per-step layout, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import maskvl
from maskvl import io, measures, results
from maskvl.api import run_sweep

ROOT = Path(__file__).resolve().parent.parent

PROMPT = "What differs <b>here</b>?"
METRIC_COLUMNS = {"l2": "l2_distance", "cosine": "cosine_distance", "kl": "kl_divergence",
                  "target_prob": "target_prob_delta"}


def write_old_layout(src: Path, dst: Path) -> Path:
    """``src`` rewritten as maskvl wrote files before (step, layer) row groups: one row group per step."""
    table = pq.read_table(src)
    md = io.read_metadata(src)
    with pq.ParquetWriter(dst, io.schema(pa.types.is_float64(table.schema.field("l2_distance").type)),
                          compression="zstd") as w:
        for step in sorted(set(table.column("generation_step").to_pylist())):
            part = table.filter(pa.compute.equal(table["generation_step"], step))
            w.write_table(part, row_group_size=part.num_rows)
        w.add_key_value_metadata({io.METADATA_KEY: json.dumps(md)})
    return dst


@pytest.fixture(scope="module")
def files(adapter64, images, tmp_path_factory) -> dict[str, Path]:
    """float64 sweeps of the tiny model: two non-square images, both modes, 2 steps, Logits (new and
    old layout); one image measuring text tokens only; a text-only prompt."""
    root = tmp_path_factory.mktemp("results")
    two = run_sweep(adapter64, [str(images["wide"]), str(images["tall"])], PROMPT,
                    {"mask_mode": "both", "num_tokens": 2, "logits": True}, output=root / "two.parquet")
    text_mode = run_sweep(adapter64, [str(images["wide"])], "Hi", {"mask_mode": "text", "num_tokens": 1},
                          output=root / "textmode.parquet")
    text_only = run_sweep(adapter64, [], "Explain this.", {"mask_mode": "text", "num_tokens": 2},
                          output=root / "textonly.parquet")
    (root / "old").mkdir()
    # Same name as the new-layout file: render titles its figure with the file name.
    return {"two": two.path, "old": write_old_layout(two.path, root / "old" / "two.parquet"),
            "text_mode": text_mode.path, "text_only": text_only.path}


def expected_grid(df, image: dict, step: int, layer: int, variant: str, column: str) -> np.ndarray:
    """The grid built straight from the file's rows with pandas (docs/FORMAT.md's patch placement)."""
    out = np.full((image["grid_rows"], image["grid_cols"]), np.nan)
    sel = df[(df.generation_step == step) & (df.layer == layer) & (df.variant == variant)
             & (df.image_index == image["index"])]
    out[sel.patch_row.astype(int), sel.patch_col.astype(int)] = sel[column].to_numpy(np.float64)
    return out


@pytest.mark.parametrize("layout", ["two", "old"], ids=["step-layer-row-groups", "old-step-row-groups"])
def test_grid_equals_the_file_for_every_step_layer_variant(files, layout):
    f = files[layout]
    df = pq.read_table(f).to_pandas()
    assert str(pq.read_schema(f).field("l2_distance").type) == "double"
    s = maskvl.open(f)
    md = io.read_metadata(f)
    assert s.steps == [0, 1] and s.layers == [0, 1, 2] and s.variants == md["variants"]
    assert s.variants[-1] == "Logits" and s.grids == [(2, 3), (4, 2)] and s.metrics == list(METRIC_COLUMNS)
    checked = 0
    for step in s.steps:
        for layer in s.layers:
            for variant in s.variants:
                metrics = list(METRIC_COLUMNS) if variant == "Logits" else ["l2", "cosine"]
                for metric in metrics:
                    for im in md["images"]:
                        got = s.grid(image=im["index"], step=step, layer=layer, variant=variant, metric=metric)
                        want = expected_grid(df, im, step, layer, variant, METRIC_COLUMNS[metric])
                        assert got.dtype == np.float64 and got.shape == (im["grid_rows"], im["grid_cols"])
                        assert not np.isnan(want).any()  # mask_mode both: every patch was measured
                        np.testing.assert_array_equal(got, want)
                        checked += 1
    assert checked == 2 * 3 * (8 * 2 + 4) * 2
    # maps() is the stack of grids; the column names work as metric names.
    maps = s.maps(image=1, variant="Head_3", metric="cosine_distance")
    assert maps.shape == (2, 3, 4, 2)
    for i, step in enumerate(s.steps):
        for j, layer in enumerate(s.layers):
            np.testing.assert_array_equal(maps[i, j], s.grid(1, step, layer, "Head_3", "cosine"))
    np.testing.assert_array_equal(s.maps(0, steps=1, layers=[2, 0])[0, 1], s.grid(0, 1, 2))


def test_nan_where_not_measured(files):
    s = maskvl.open(files["text_mode"])  # mask_mode text: no image token was masked
    assert s.grids == [(2, 3)]
    assert np.isnan(s.grid(layer=0)).all() and np.isnan(s.maps()).all()
    txt = s.text(step=0, layer=1)
    assert len(txt) and np.isfinite(txt.l2_distance).all()
    vis = maskvl.open(files["two"]).text(step=0, layer=0, variant="Logits", metric="kl")
    assert np.isfinite(vis.kl_divergence).all()


def test_text_tokens_follow_the_sequence_of_each_step(files):
    s = maskvl.open(files["text_only"])
    df = pq.read_table(files["text_only"]).to_pandas()
    assert s.images == [] and s.grids == []
    for step in s.steps:
        t = s.text(step=step, layer=2, variant="Attn", metric="cosine")
        assert list(t.columns) == ["position", "token", "cosine_distance"]
        rows = df[(df.generation_step == step) & (df.layer == 2) & (df.variant == "Attn")]
        assert t.position.tolist() == rows.token_position.tolist() == list(range(s.seq_len(step)))
        assert t.token.tolist() == rows.token_masked.tolist()
        np.testing.assert_array_equal(t.cosine_distance.to_numpy(), rows.cosine_distance.to_numpy())
    # Step 1 measures the prompt plus the token generated at step 0, which is its last text token.
    assert s.seq_len(1) == s.seq_len(0) + 1
    assert s.text(step=1).token.iloc[-1] == s.generated[0]["text"]


def test_top_and_to_pandas_select_like_pandas(files):
    s = maskvl.open(files["two"])
    df = pq.read_table(files["two"]).to_pandas()
    full = df[df.variant == "Full"]
    top = s.top(7)
    want = full.sort_values("l2_distance", ascending=False, kind="stable").head(7)
    assert top.l2_distance.tolist() == want.l2_distance.tolist()
    assert top.token_position.tolist() == want.token_position.tolist()
    assert top.token.tolist() == want.token_masked.astype(str).tolist()
    img = s.top(3, steps=1, layers=[0, 2], variant="Logits", metric="target_prob", kind="image")
    sel = df[(df.variant == "Logits") & (df.generation_step == 1) & df.layer.isin([0, 2])
             & (df.token_kind == "image")]
    assert img.target_prob_delta.tolist() == sorted(sel.target_prob_delta, reverse=True)[:3]
    assert (img.token_kind == "image").all() and img.patch_row.notna().all()
    assert (s.top(4, kind="text").token_kind == "text").all()
    part = s.to_pandas(steps=1, layers=2, variants=["Attn", "Head_0"], columns=["token_position", "l2_distance"])
    sel = df[(df.generation_step == 1) & (df.layer == 2) & df.variant.isin(["Attn", "Head_0"])]
    assert list(part.columns) == ["token_position", "l2_distance"]
    assert part.l2_distance.tolist() == sel.l2_distance.tolist()
    assert s.to_pandas().equals(df) and s.table.equals(pq.read_table(files["two"]).replace_schema_metadata(
        {io.METADATA_KEY: json.dumps(io.read_metadata(files["two"]))}))


@pytest.fixture
def reads(monkeypatch):
    """Every ``ParquetFile.read_row_groups`` call as (row groups, columns); whole-file reads fail."""
    calls: list[tuple[list[int], list[str]]] = []
    original = pq.ParquetFile.read_row_groups

    def spy(self, row_groups, columns=None, **kwargs):
        calls.append((list(row_groups), list(columns)))
        return original(self, row_groups, columns=columns, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("a lazy read touched the whole file")

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", refuse)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", refuse)
    monkeypatch.setattr(pq, "read_table", refuse)
    return calls


def groups_holding(path: Path) -> dict[tuple[int, int], int]:
    """(step, layer) -> row group index, from the footer's statistics, each group holding one pair."""
    md = pq.ParquetFile(path).metadata
    out = {}
    for i in range(md.num_row_groups):
        step, layer = md.row_group(i).column(0).statistics, md.row_group(i).column(1).statistics
        assert step.min == step.max and layer.min == layer.max
        out[(step.min, layer.min)] = i
    return out


def test_lazy_reads_only_the_row_groups_and_columns_needed(files, reads):
    s = maskvl.open(files["two"])
    assert reads == []  # opening reads the footer only
    where = groups_holding(files["two"])
    assert len(where) == s.num_row_groups == 2 * 3
    s.grid(image=1, step=1, layer=2, variant="Head_4", metric="cosine")
    assert [g for g, _ in reads] == [[where[(1, 2)]]]
    # The group holds one (step, layer): those columns need not be read to filter it.
    assert set(reads[0][1]) == {"variant", "cosine_distance", "image_index", "patch_row", "patch_col"}
    reads.clear()
    s.maps(image=0, steps=[1], layers=[0, 2])
    assert sorted(g for gs, _ in reads for g in gs) == sorted([where[(1, 0)], where[(1, 2)]])
    reads.clear()
    s.text(step=0, layer=1)
    s.top(3, steps=0, layers=1)
    assert {g for gs, _ in reads for g in gs} == {where[(0, 1)]}
    assert all("token_masked" not in cols for _, cols in reads)  # token text comes from the metadata
    # The old layout: the step's one row group, filtered to the layer.
    reads.clear()
    old = maskvl.open(files["old"])
    assert old.num_row_groups == 2
    np.testing.assert_array_equal(old.grid(1, 1, 2, "Head_4", "cosine"), s.grid(1, 1, 2, "Head_4", "cosine"))
    assert [g for g, _ in reads] == [[1], [where[(1, 2)]]]
    assert {"generation_step", "layer"} <= set(reads[0][1])  # the old group is filtered to the layer


def test_reading_a_grid_imports_neither_torch_nor_pandas(files):
    """Opening a file and reading grids stays light: no torch (seconds to import), no pandas (about one)."""
    code = (f"import sys, maskvl; s = maskvl.open({str(files['two'])!r}); s.grid(layer=1); s.maps(image=1); "
            "s.text(); print(sorted(m for m in ('torch', 'pandas', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "['pandas']"  # text() returns a DataFrame; grid and maps need no pandas
    code = code.replace(" s.text();", "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("kind", ["int32", "float32", "float64", "int16"])
def test_numpy_columns_from_arrow_buffers(kind):
    """The buffer reader behind grid(): nulls, slices (offsets) and several chunks, as pyarrow's own conversion."""
    rng = np.random.default_rng(0)
    values = (rng.random(203) * 100).astype(kind)
    mask = rng.random(203) < 0.3
    arr = pa.array(values, mask=mask)
    col = pa.chunked_array([arr.slice(3, 50), arr.slice(61, 100), arr.slice(0, 0), pa.nulls(5, arr.type)])
    want = np.concatenate([np.where(mask, np.nan, values)[3:53], np.where(mask, np.nan, values)[61:161],
                           np.full(5, np.nan)])
    got = results._numpy(col)
    if kind.startswith("int"):
        want = np.where(np.isnan(want), -1, want)
        assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)
    assert results._member(np.array([-1, 0, 3, 7, 9, 2]), [3, 2, 7]).tolist() == [False, False, True, True, False, True]
    assert not results._member(np.array([0, 1]), []).any()


def test_old_layout_files_open_in_view_and_render(files, tmp_path, run_main):
    code, _, err = run_main(["render", str(files["old"]), "-o", str(tmp_path / "old.png")])
    assert code == 0, err
    code, _, err = run_main(["render", str(files["two"]), "-o", str(tmp_path / "new.png")])
    assert code == 0, err
    # Same rows, same metadata, same picture, whatever the row groups.
    assert np.array_equal(np.asarray(Image.open(tmp_path / "old.png")), np.asarray(Image.open(tmp_path / "new.png")))
    code, _, err = run_main(["view", str(files["old"]), "-o", str(tmp_path / "old.html")])
    assert code == 0, err
    assert (tmp_path / "old.html").stat().st_size > (files["old"]).stat().st_size


@pytest.mark.filterwarnings("ignore:Glyph .* missing")  # tokens DejaVu Sans lacks draw as boxes
def test_plot_draws_what_render_draws(files, tmp_path, run_main):
    s = maskvl.open(files["two"])
    code, _, err = run_main(["render", str(files["two"]), "-o", str(tmp_path / "r.png"), "--steps", "1",
                             "--layers", "0,2", "--variant", "Attn", "--metric", "cosine"])
    assert code == 0, err
    fig = s.plot(steps=1, layers=[0, 2], variant="Attn", metric="cosine")
    fig.savefig(tmp_path / "p.png", format="png", dpi=110)
    rendered = np.asarray(Image.open(tmp_path / "r.png"))
    plotted = np.asarray(Image.open(tmp_path / "p.png"))
    assert rendered.shape == plotted.shape and np.array_equal(rendered, plotted)
    from matplotlib import pyplot as plt

    assert fig.number not in plt.get_fignums()  # handed over, not left open in pyplot
    # The Logits measures draw too (their column names label the figure).
    s.plot(steps=0, variant="Logits", metric="kl").savefig(tmp_path / "kl.png")
    assert len(np.unique(np.asarray(Image.open(tmp_path / "kl.png")).reshape(-1, 4), axis=0)) > 100


def test_logits_name_matches_the_measures():
    assert results.LOGITS == measures.LOGITS  # results.py spells it out to stay free of torch


def test_summary_for_notebooks(files):
    s = maskvl.open(files["two"])
    page = s._repr_html_()
    assert "two.parquet" in page and "What differs &lt;b&gt;here&lt;/b&gt;?" in page and "<b>here" not in page
    assert "0-1 (2 of 2, complete)" in page and "Head_0 \u2026 Head_5, Logits" in page and "2x3 grid" in page
    assert repr(s).startswith("<maskvl.Sweep two.parquet:") and "steps 0-1, layers 0-2, 9 variants" in repr(s)
    with maskvl.open(files["two"]) as again:
        assert again.grid(layer=0).shape == (2, 3)
    assert again._src.pf.closed


@pytest.mark.parametrize("call, message", [
    (lambda s: s.grid(layer=7), "layer 7 is not in this sweep (it measured layers 0-2)"),
    (lambda s: s.grid(step=2), "step 2 is not in this sweep (it has steps 0-1)"),
    (lambda s: s.grid(step="0"), "step '0' is not in this sweep"),
    (lambda s: s.grid(variant="Head_6"),
     "variant 'Head_6' is not in this sweep (it has Full, Attn, Head_0 \u2026 Head_5, Logits)"),
    (lambda s: s.grid(metric="dot"), "metric 'dot' is not one of l2, cosine, kl, target_prob"),
    (lambda s: s.grid(metric="kl"), "metric 'kl' is measured for the Logits variant only"),
    (lambda s: s.grid(image=2), "image 2 is not in this sweep (it has images 0-1)"),
    (lambda s: s.maps(layers=[]), "an empty selection selects nothing"),
    (lambda s: s.top(0), "k must be a positive integer"),
    (lambda s: s.top(3, kind="video"), "kind must be 'image', 'text' or None"),
    (lambda s: s.to_pandas(columns=["nope"]), "column 'nope' is not in this sweep"),
    (lambda s: s.plot(cmap="nope"), "unknown colour map 'nope'"),
], ids=["layer", "step", "step-type", "variant", "metric", "logits-metric", "image", "empty", "top-k", "kind",
        "column", "cmap"])
def test_bad_arguments_name_the_valid_ones(files, call, message):
    with pytest.raises(ValueError) as info:
        call(maskvl.open(files["two"]))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_files_and_missing_measures(files, tmp_path):
    with pytest.raises(FileNotFoundError, match="file not found"):
        maskvl.open(tmp_path / "none.parquet")
    with pytest.raises(ValueError, match="is a directory"):
        maskvl.open(tmp_path)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="cannot read .* as a maskvl Parquet file"):
        maskvl.open(tmp_path / "junk.parquet")
    pq.write_table(pa.table({"a": [1]}), tmp_path / "plain.parquet")
    with pytest.raises(ValueError, match="has no maskvl metadata"):
        maskvl.open(tmp_path / "plain.parquet")
    with pytest.raises(ValueError, match="this sweep has no images"):
        maskvl.open(files["text_only"]).grid()
    with pytest.raises(ValueError, match="needs the Logits measure, which this sweep did not run"):
        maskvl.open(files["text_only"]).text(metric="kl")


def test_sweep_returns_a_sweep_reading_its_file(adapter64, images, tmp_path):
    out = tmp_path / "api.parquet"
    res = run_sweep(adapter64, [str(images["tall"])], "Hi", {"mask_mode": "vision", "layers": [1]}, output=out)
    # Written to a file: the result reads from it; nothing but the count was kept.
    assert res.sweep.path == out and res.num_rows == pq.ParquetFile(out).metadata.num_rows == 8 * 8
    memory = run_sweep(adapter64, [str(images["tall"])], "Hi", {"mask_mode": "vision", "layers": [1]})
    assert memory.sweep.path is None and memory.num_rows == memory.table.num_rows == 64
    np.testing.assert_array_equal(memory.sweep.grid(layer=1), res.sweep.grid(layer=1))
    assert memory.sweep.generated_text == res.sweep.generated_text == res.generated_text
    assert res.sweep.metadata["generated_text"] == res.generated_text


def test_iter_sweep_yields_each_step_as_it_finishes(adapter64, images, tmp_path):
    out = tmp_path / "iter.parquet"
    steps = []
    for st in maskvl.iter_sweep(adapter64, [str(images["wide"])], "Hi", mask_mode="both", num_tokens=2,
                                output=out):
        # The step is yielded before the run ends: the file is not published yet.
        assert not out.exists() and st.metadata["steps_completed"] == len(steps) + 1
        assert st.steps == [len(steps)] and st.num_rows == st.table.num_rows > 0
        steps.append(st)
    final = maskvl.open(out)
    assert final.complete and final.steps == [0, 1]
    for st in steps:
        step = st.steps[0]
        assert set(st.table.column("generation_step").to_pylist()) == {step}
        for layer in final.layers:
            for variant in ("Full", "Head_5"):
                np.testing.assert_array_equal(st.grid(0, step, layer, variant), final.grid(0, step, layer, variant))
        with pytest.raises(ValueError, match=f"it has steps {step}"):
            st.grid(step=1 - step)


def test_iter_sweep_stopped_early_keeps_completed_steps(adapter64, images, tmp_path):
    out = tmp_path / "stop.parquet"
    it = maskvl.iter_sweep(adapter64, [str(images["wide"])], "Hi", mask_mode="vision", num_tokens=3, output=out)
    first = next(it)
    it.close()
    assert not out.exists()
    part = maskvl.open(io.partial_path(out))
    assert not part.complete and part.steps == [0]
    np.testing.assert_array_equal(part.grid(layer=2), first.grid(layer=2))


def test_iter_sweep_checks_options_at_the_call(tmp_path):
    with pytest.raises(ValueError, match="mask_mode"):
        maskvl.iter_sweep(str(tmp_path / "no-model"), prompt="Hi", mask_mode="everything")


def test_large_benchmark_smoke(tmp_path):
    """benchmarks/bench_large.py at its smallest: a sweep, the synthetic file, the reads, the report."""
    import torch

    from benchmarks import bench_large

    threads = torch.get_num_threads()
    try:
        sweep = bench_large.sweep_once(16, layers=1, steps=2, logits=True)
    finally:
        torch.set_num_threads(threads)
    assert sweep["rows"] == 2 * 1 * (2 + 4 + 1) * 16 and sweep["peak_rss_mb"] > 0 and sweep["seconds"] > 0
    synthetic = bench_large.write_synthetic(tmp_path / "big.parquet", image_tokens=64, layers=3, heads=2, steps=2)
    s = maskvl.open(synthetic["path"])
    assert s.grids == [(8, 8)] and s.num_row_groups == 2 * 3 == synthetic["row_groups"]
    assert synthetic["rows"] == s.num_rows == 3 * 5 * ((64 + 16) + (64 + 17))
    assert not np.isnan(s.grid(step=1, layer=2, variant="Logits", metric="kl")).any()
    read = bench_large.read_once(synthetic["path"])
    assert read["rows"] == s.num_rows and read["grid_shape"] == [8, 8] and read["maps_shape"] == [2, 1, 8, 8]
    record = {"sweep": [sweep], "layers": [sweep], "synthetic": synthetic, "read": read, "machine": {}}
    assert "| 16 |" in bench_large.markdown(record)
    bench_large.plot(record, str(tmp_path / "large.png"))
    assert Image.open(tmp_path / "large.png").size[0] > 500
