"""Region and group knockout (``mask_groups``): specs and their resolution, the engine against the naive
oracle with each whole set removed, the file format, the option's entry points and ``render``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import maskvl
from maskvl import io, options
from maskvl.batch import load_spec
from maskvl.errors import InputError
from maskvl.groups import GroupSpecError, parse_specs, resolve_groups
from maskvl.inputs import load_image
from maskvl.models.base import ImageInfo
from maskvl.naive import naive_sweep
from maskvl.render import image_grid, read_sweep, render
from naive_support import compare_with_naive

SPECS = ["blocks:2x2", "images", "box:1:0,0,40,70"]


def _resolve(prep, specs, mask_mode=None):
    return [list(g.positions) for g in resolve_groups(parse_specs(specs), prep.images, prep.is_image, mask_mode)]


# ------------------------------------------------------------------ the engine against the naive oracle
TWO_IMAGES_PROMPT = "Compare the two pictures."


@pytest.fixture(scope="module")
def two_image_naive(adapter64, images):
    """The naive oracle for SPECS over the two test images (2 steps, window 2), computed once."""
    paths = [images["wide"], images["tall"]]
    prep = adapter64.prepare(TWO_IMAGES_PROMPT, [load_image(str(p)) for p in paths], [str(p) for p in paths])
    return naive_sweep(adapter64, prep, num_tokens=2, knockout_window=2, groups=_resolve(prep, SPECS))


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_float64_groups_match_naive(adapter64, images, two_image_naive, backend):
    """blocks:2x2, images and a box over two non-square images: every variant and Logits (window 2, so
    group rows also leave the whole group out at the next layer), 2 steps, 1e-9 relative."""
    if backend != "reference":
        from maskvl.ops.testing import compiled_backend

        backend, _ = compiled_backend(backend)
    prep, fast, _ = compare_with_naive(adapter64, [images["wide"], images["tall"]], TWO_IMAGES_PROMPT, "both",
                                       2, 1e-9, 1e-6, logits=True, window=2, backend=backend,
                                       groups=lambda p: _resolve(p, SPECS), ref=two_image_naive)
    wide, tall = prep.images
    # wide 2x3 -> blocks (rows 0-1, cols 0-1) and (rows 0-1, col 2); tall 4x2 -> two 2x2 blocks; then
    # one group per image; the box takes tall's cells of x < 40 px, y < 70 px: all 2 cols, rows 0-2.
    groups = _resolve(prep, SPECS)
    assert [len(g) for g in groups] == [4, 2, 4, 4, 6, 8, 6]
    assert groups[4] == list(range(wide.token_start, wide.token_end))
    assert groups[6] == list(range(tall.token_start, tall.token_start + 6))
    assert all(lr.l2.shape[1] == 7 for s in fast for lr in s.layers)


def test_float64_explicit_sets_own_key_text_and_nearly_everything(adapter64, images):
    """Position sets from Python: one holding the final position of step 0 (its own key), a text set, a
    set of image and text positions, and every position but the final one (the group holds nearly all
    the attention mass: the direct recompute), with the knockout window over every later layer."""
    def groups(prep):
        S = prep.input_ids.shape[1]
        im = prep.images[0]
        return [[S - 1, 0], [1, 2, 3], [im.token_start, im.token_end - 1, S - 2], list(range(S - 1))]

    compare_with_naive(adapter64, [images["tall"]], "What is this?", "both", 2, 1e-9, 1e-6, logits=True, window=3,
                       backend="cpp" if _cpp_ok() else "reference", groups=groups)


def test_float32_groups_within_1e4(adapter32, images):
    compare_with_naive(adapter32, [images["wide"]], "What color is it?", "both", 2, 1e-4, 1e-2, layers=[0, 2],
                       groups=lambda p: _resolve(p, ["blocks:2x2", "images"]))


SLIDING_PROMPT = "Name three colors."


@pytest.fixture(scope="module")
def sliding(tmp_path_factory):
    """A tiny Mistral (every layer a 5-key sliding window), its prompt's groups and the naive oracle's
    sweep of them: one group before every window, one straddling the window's start, one inside, and the
    final position (its own key at step 0) with position 0."""
    from maskvl.models import adapter_class, load_model

    d = adapter_class("mistral").write_tiny_model(tmp_path_factory.mktemp("models") / "mistral", seed=2,
                                                  num_layers=3, num_heads=6, num_kv_heads=2, head_dim=24,
                                                  hidden_size=48, sliding_window=5)
    adapter = load_model(str(d), torch.float64)
    S = adapter.prepare(SLIDING_PROMPT, [], []).input_ids.shape[1]
    assert S > 8
    groups = [[0, 1, 2], [S - 7, S - 6, S - 5, S - 4], [S - 3, S - 2], [S - 1, 0]]
    prep = adapter.prepare(SLIDING_PROMPT, [], [])
    return adapter, groups, naive_sweep(adapter, prep, num_tokens=2, knockout_window=2, groups=groups)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_groups_under_sliding_windows(sliding, backend):
    """At a sliding-window layer only a group's keys inside the final query's window are removed: the
    engine equals the oracle (which masks the whole set under transformers' own window mask), and a group
    with no key in any window of the knockout window is an exact zero in every variant, Logits included."""
    adapter, groups, ref = sliding
    if backend != "reference":
        from maskvl.ops.testing import compiled_backend

        backend, _ = compiled_backend(backend)
    _, fast, _ = compare_with_naive(adapter, [], SLIDING_PROMPT, "both", 2, 1e-9, 1e-6, logits=True, window=2,
                                    backend=backend, groups=groups, ref=ref)
    for f in fast:
        for lr in f.layers:
            assert (lr.l2[:, 0] == 0).all() and (lr.cos[:, 0] == 0).all() and lr.kl[-1, 0] == 0
            assert (lr.l2[0, 1:] > 0).all() and (lr.l2[-1, 1:] > 0).all()


def _cpp_ok() -> bool:
    from maskvl import _ext

    return _ext.load_error() is None


# ------------------------------------------------------------------------- the file, end to end
def test_cli_blocks_sweep_file_matches_naive(tiny_dir, images, adapter64, run_main, tmp_path):
    """`maskvl sweep --mask-groups blocks:2x2` in float64: every row of the file equals the naive oracle
    with that block removed; group rows carry group_index and the metadata describes each block."""
    out = tmp_path / "blocks.parquet"
    prompt = "Compare the two pictures."
    code, _, err = run_main(["sweep", "--model", str(tiny_dir), "--image", str(images["wide"]), "--image",
                             str(images["tall"]), "--prompt", prompt, "--mask-groups", "blocks:2x2", "--num-tokens",
                             "2", "--logits", "--dtype", "float64", "-q", "-o", str(out)])
    assert code == 0, err
    md = json.loads(pq.ParquetFile(out).metadata.metadata[b"maskvl"])
    assert md["mask_groups"] == ["blocks:2x2"] and md["mask_mode"] is None
    groups = md["groups"]
    assert [(g["image_index"], g["row_range"], g["col_range"]) for g in groups] == [
        (0, [0, 2], [0, 2]), (0, [0, 2], [2, 3]), (1, [0, 2], [0, 2]), (1, [2, 4], [0, 2])]
    wide_w, wide_h = md["images"][0]["original_size"]
    assert groups[1]["box"] == [pytest.approx(2 * wide_w / 3), 0.0, pytest.approx(wide_w), pytest.approx(wide_h)]
    table = pq.read_table(out)
    df = table.to_pandas()
    assert df["token_position"].isna().all() and df["patch_row"].isna().all()
    assert set(df["token_kind"]) == {"group"}
    assert (df["token_masked"] == df["group_index"].map(lambda g: groups[g]["label"])).all()
    assert (df["image_index"] == df["group_index"].map(lambda g: groups[g]["image_index"])).all()
    H = adapter64.num_heads
    assert len(df) == 2 * adapter64.num_layers * (H + 3) * len(groups)

    paths = [str(images["wide"]), str(images["tall"])]
    prep = adapter64.prepare(prompt, [load_image(p) for p in paths], paths)
    ref = naive_sweep(adapter64, prep, num_tokens=2, groups=[g["positions"] for g in groups])
    names = md["variants"]
    for r in ref:
        for layer in range(adapter64.num_layers):
            rows = df[(df.generation_step == r.step) & (df.layer == layer)]
            for v, name in enumerate(names):
                got = rows[rows.variant == name].sort_values("group_index")
                assert list(got.group_index) == list(range(len(groups)))
                if name == "Logits":
                    m = r.logits_measures(layer)
                    want = {"l2_distance": m["l2"], "cosine_distance": m["cos"], "kl_divergence": m["kl"],
                            "target_prob_delta": m["tpd"]}
                else:
                    want = {"l2_distance": r.l2[layer][v], "cosine_distance": r.cos[layer][v]}
                for col, w in want.items():
                    err = np.abs(got[col].to_numpy() - w) / np.maximum(np.abs(w), 1e-300)
                    assert err.max() <= 1e-6, (r.step, layer, name, col, err.max())
    # One group's l2 map over its grid: render draws each block's value over all of its cells.
    data = read_sweep(out, "Full", "l2")
    im0 = md["images"][0]
    grid = image_grid(data, 1, 2, 0, im0["grid_rows"], im0["grid_cols"], "blocks:2x2")
    for g in groups[:2]:
        value = df[(df.generation_step == 1) & (df.layer == 2) & (df.variant == "Full")
                   & (df.group_index == g["index"])]["l2_distance"].item()
        (r0, r1), (c0, c1) = g["row_range"], g["col_range"]
        assert (grid[r0:r1, c0:c1] == value).all()
    assert not np.isnan(grid).any()


def test_render_group_file_with_overlapping_specs_and_text_groups(tiny_dir, images, tmp_path):
    """images + blocks overlap: one panel row per spec; a text group is a labelled chip; PNG written."""
    out = tmp_path / "mixed.parquet"
    maskvl.sweep(str(tiny_dir), [images["wide"]], "Describe it.",
                 mask_groups=["images", "blocks:1x1", [0, 1, 2]], num_tokens=1, layers="0,2", output=out)
    data = read_sweep(out, "Attn", "cosine")
    md = data.metadata
    specs = [g["spec"] for g in md["groups"]]
    assert specs == ["images"] + ["blocks:1x1"] * 6 + ["positions:0-2"]
    im = md["images"][0]
    whole = image_grid(data, 0, 2, 0, im["grid_rows"], im["grid_cols"], "images")
    assert np.unique(whole).size == 1 and not np.isnan(whole).any()
    cells = image_grid(data, 0, 2, 0, im["grid_rows"], im["grid_cols"], "blocks:1x1")
    assert np.unique(cells).size == 6
    assert md["groups"][-1]["image_index"] is None and md["groups"][-1]["label"] == "positions 0-2"
    written = render(out, output=str(tmp_path / "mixed.png"), variant="Attn", metric="cosine")
    assert written[0].stat().st_size > 10_000


def test_sweep_object_reads_group_runs(tiny_dir, images, tmp_path):
    """maskvl.open on a group run: grid()/maps() put each group's value (from the file) over its cells,
    spec= chooses among overlapping specs, per-token readers say what to use instead, plot() draws."""
    out = tmp_path / "mixed.parquet"
    maskvl.sweep(str(tiny_dir), [images["wide"]], "Describe it.",
                 mask_groups=["images", "blocks:2x2", [0, 1, 2]], num_tokens=2, layers="0,2", output=out)
    sw = maskvl.open(out)
    df = pq.read_table(out).to_pandas()
    im = sw.images[0]
    assert [g["spec"] for g in sw.groups] == ["images", "blocks:2x2", "blocks:2x2", "positions:0-2"]
    with pytest.raises(InputError, match="several specs"):
        sw.grid(0, step=1, layer=2)
    with pytest.raises(InputError, match="no groups of spec 'blocks:3x3'"):
        sw.grid(0, spec="blocks:3x3")
    grid = sw.grid(0, step=1, layer=2, variant="Attn", metric="cosine", spec="blocks:2x2")
    assert grid.shape == (im["grid_rows"], im["grid_cols"]) and not np.isnan(grid).any()
    for g in sw.groups[1:3]:
        want = df[(df.group_index == g["index"]) & (df.generation_step == 1) & (df.layer == 2)
                  & (df.variant == "Attn")]["cosine_distance"].item()
        cells = np.asarray(g["positions"]) - im["token_start"]
        assert np.array_equal(grid.reshape(-1)[cells], np.full(len(cells), want))
    maps = sw.maps(0, variant="Full", spec="images")
    assert maps.shape == (2, 2, im["grid_rows"], im["grid_cols"])
    assert all(np.unique(maps[s, l]).size == 1 for s in range(2) for l in range(2))
    with pytest.raises(InputError, match="group run"):
        sw.text()
    top = sw.top(3, variant="Attn", metric="cosine")
    assert list(top.columns) == ["generation_step", "layer", "group_index", "label", "spec", "image_index", "size",
                                 "cosine_distance"]
    want = df[df.variant == "Attn"].nlargest(3, "cosine_distance")["cosine_distance"].to_numpy()
    assert np.array_equal(top["cosine_distance"].to_numpy(), want)
    assert all(sw.groups[g]["label"] == lab for g, lab in zip(top.group_index, top.label))
    text_groups = sw.top(10, kind="text")
    assert set(text_groups.group_index) == {3} and text_groups.image_index.isna().all()
    assert set(sw.top(50, kind="image").group_index) == {0, 1, 2}
    fig = sw.plot(layers=[2], variant="Attn")
    assert len(fig.axes) >= 2


def test_per_token_files_without_group_index_still_render(tiny_dir, images, tmp_path):
    """Files written before group runs lack the group_index column: render reads them as per-token."""
    out = tmp_path / "old.parquet"
    maskvl.sweep(str(tiny_dir), [images["tall"]], "Hi", mask_mode="both", layers="1", output=out)
    table = pq.read_table(out)
    assert table["group_index"].null_count == table.num_rows
    old = tmp_path / "old-format.parquet"
    md = io.read_metadata(out)
    for key in ("mask_groups", "groups"):
        md.pop(key)
    pq.write_table(table.drop(["group_index"]).replace_schema_metadata({"maskvl": json.dumps(md)}), old)
    assert "group_index" not in pq.read_schema(old).names
    data = read_sweep(old, "Full", "l2")
    assert (data.group == -1).all()
    im = md["images"][0]
    assert not np.isnan(image_grid(data, 0, 1, 0, im["grid_rows"], im["grid_cols"])).any()
    assert render(old, output=str(tmp_path / "old.png"))[0].exists()


# ----------------------------------------------------------------------------- specs, resolution
def _image(index=0, rows=7, cols=10, start=5, size=(300, 200)):
    return ImageInfo(index, None, rows, cols, start, start + rows * cols, size, (cols * 32, rows * 32))


def _flags(images, length):
    flags = torch.zeros(length, dtype=torch.bool)
    for im in images:
        flags[im.token_start:im.token_end] = True
    return flags


def test_blocks_cover_each_grid_with_smaller_edge_blocks():
    ims = [_image(0, 7, 10, 5), _image(1, 3, 2, 80, (40, 70))]
    groups = resolve_groups(parse_specs("blocks:4x4"), ims, _flags(ims, 90))
    assert [(g.image_index, g.row_range, g.col_range, len(g.positions)) for g in groups] == [
        (0, (0, 4), (0, 4), 16), (0, (0, 4), (4, 8), 16), (0, (0, 4), (8, 10), 8),
        (0, (4, 7), (0, 4), 12), (0, (4, 7), (4, 8), 12), (0, (4, 7), (8, 10), 6), (1, (0, 3), (0, 2), 6)]
    # Every image token in exactly one block; positions follow token_start + r * cols + c.
    members = sorted(p for g in groups for p in g.positions)
    assert members == list(range(5, 75)) + list(range(80, 86))
    assert groups[1].positions[:5] == (9, 10, 11, 12, 19)
    assert groups[2].box == (240.0, 0.0, 300.0, pytest.approx(800 / 7, abs=1e-3))
    assert groups[-1].label == "image 1 rows 0-2 cols 0-1"
    assert [len(g.positions) for g in resolve_groups(parse_specs("blocks:3"), ims, _flags(ims, 90))][:4] == [9, 9, 9, 3]


BOXES = [
    # original 300x200, grid 7 rows x 10 cols: a cell is 30 px wide, 200/7 px high
    ("box:0:30,0,60,10", [(0, 1)]),  # touches cols 0 and 2 only at their edges: not in
    ("box:0:29.9,0,60.1,10", [(0, 0), (0, 1), (0, 2)]),  # overlaps them by 0.1 px: in
    ("box:0:-50,-50,15,15", [(0, 0)]),  # clipped to the image
    ("box:0:295,190,400,400", [(6, 9)]),
    ("box:0:0,0,300,200", [(r, c) for r in range(7) for c in range(10)]),
]


@pytest.mark.parametrize("spec,cells", BOXES, ids=[b[0] for b in BOXES])
def test_box_takes_the_tokens_whose_patch_area_intersects_it(spec, cells):
    im = _image()
    (g,) = resolve_groups(parse_specs(spec), [im], _flags([im], 80))
    assert sorted(divmod(p - im.token_start, im.grid_cols) for p in g.positions) == cells
    assert g.box[0] >= 0 and g.box[2] <= 300 and g.image_index == 0


@pytest.mark.parametrize("specs,match", [
    ("box:0:400,0,500,10", "covers no token of image 0"),
    ("box:2:0,0,10,10", "the sweep has 1 image"),
    ([[3, 90]], "position 90 is outside the prompt"),
], ids=["box-outside", "no-such-image", "position-past-end"])
def test_resolution_errors(specs, match):
    im = _image()
    with pytest.raises(GroupSpecError, match=match):
        resolve_groups(parse_specs(specs), [im], _flags([im], 80))


def test_blocks_without_images_is_an_error():
    with pytest.raises(GroupSpecError, match="blocks:2x2 needs at least one image"):
        resolve_groups(parse_specs("blocks:2"), [], torch.zeros(9, dtype=torch.bool))


def test_mask_mode_filters_group_members():
    im = _image(0, 2, 2, 3, (64, 64))
    flags = _flags([im], 10)
    mixed = [[0, 3, 4, 9]]
    (g,) = resolve_groups(parse_specs(mixed), [im], flags)
    assert g.image_index is None and g.box is None  # text and image positions
    (g,) = resolve_groups(parse_specs(mixed), [im], flags, "vision")
    assert g.positions == (3, 4) and g.image_index == 0 and g.row_range == (0, 1) and g.col_range == (0, 2)
    assert g.box == (0.0, 0.0, 64.0, 32.0)
    (g,) = resolve_groups(parse_specs(mixed), [im], flags, "text")
    assert g.positions == (0, 9)
    assert len(resolve_groups(parse_specs("blocks:1"), [im], flags, "vision")) == 4
    with pytest.raises(GroupSpecError, match="no position left under mask_mode text"):
        resolve_groups(parse_specs("images"), [im], flags, "text")


def test_specs_are_checked_and_written_canonically():
    assert parse_specs(None) is None and parse_specs(()) is None
    assert parse_specs(["BLOCKS:4", " images ", "box:0:1,2.50,3,4", "positions:5,3-4", [9, 2, 2], range(3)]) == (
        "blocks:4x4", "images", "box:0:1,2.5,3,4", (3, 4, 5), (2, 9), (0, 1, 2))
    assert parse_specs(np.array([[1, 2]])) == ((1, 2),)


# ----------------------------------------------------------------------------- the option itself
BAD = [
    ("blockz:4x4", "mask_groups (--mask-groups): bad group 'blockz:4x4': expected blocks:RxC, images, "
                   "box:IMAGE:x0,y0,x1,y1 or positions:LIST"),
    ("box:0:5,5,1,9", "mask_groups (--mask-groups): bad box 'box:0:5,5,1,9': need x0 < x1 and y0 < y1"),
    ("blocks:0x2", "mask_groups (--mask-groups): bad group 'blocks:0x2'"),
]


@pytest.mark.parametrize("value,message", BAD, ids=["unknown", "empty-box", "zero-block"])
def test_a_bad_spec_gets_the_same_message_everywhere(tmp_path, run_main, value, message):
    with pytest.raises(InputError) as api_err:
        maskvl.sweep(str(tmp_path / "no-model"), prompt="Hi", mask_groups=[value])
    assert message in str(api_err.value)
    jobs = tmp_path / "jobs.yaml"
    import yaml

    jobs.write_text(yaml.safe_dump({"model": "m", "jobs": [{"name": "a", "prompt": "p", "mask_groups": [value]}]}))
    with pytest.raises(InputError) as job_err:
        load_spec(jobs)
    assert message in str(job_err.value)
    code, _, err = run_main(["sweep", "--model", str(tmp_path / "no-model"), "--prompt", "Hi", "-q",
                             "--mask-groups", "images", "--mask-groups", value])
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_image_groups_without_images_fail_before_loading(tmp_path, run_main):
    message = "mask_groups (--mask-groups) images needs at least one image"
    with pytest.raises(InputError, match=r"mask_groups \(--mask-groups\) images needs at least one image"):
        maskvl.sweep(str(tmp_path / "no-model"), prompt="Hi", mask_groups="images")
    code, _, err = run_main(["sweep", "--model", str(tmp_path / "no-model"), "--prompt", "Hi", "--mask-groups",
                             "images"])
    assert code == 2 and message in err


def test_out_of_range_positions_are_a_one_line_error(tiny_dir, run_main, tmp_path):
    code, _, err = run_main(["sweep", "--model", str(tiny_dir), "--prompt", "Hi", "-q", "--mask-groups",
                             "positions:2,5000", "-o", str(tmp_path / "x.parquet")])
    assert code == 2 and err.count("\n") == 1
    assert "mask_groups (--mask-groups): positions:2,5000: position 5000 is outside the prompt" in err


def test_mask_mode_defaults_and_fingerprints():
    plain = options.resolve({})
    assert plain["mask_mode"] == "text" and plain["mask_groups"] is None
    # Per-token jobs keep the fingerprint they had before mask_groups existed.
    assert "mask_groups" not in options.fingerprint(plain)
    grouped = options.resolve({"mask_groups": ("blocks:2", [4, 3])})
    assert grouped["mask_mode"] is None
    fp = options.fingerprint(grouped)
    assert fp["mask_groups"] == ["blocks:2x2", [3, 4]]
    assert json.loads(json.dumps(fp)) == fp  # what a batch compares with the file's metadata
    assert options.resolve({"mask_groups": ["images"], "mask_mode": "vision"})["mask_mode"] == "vision"


def test_rows_are_groups_in_the_table_returned(tiny_dir, images):
    table = maskvl.sweep(str(tiny_dir), [images["wide"]], "Hi", mask_groups=[[0, 1], [2]], layers="0").table
    assert isinstance(table, pa.Table)
    md = json.loads(table.schema.metadata[b"maskvl"])
    assert [g["positions"] for g in md["groups"]] == [[0, 1], [2]]
    assert table["group_index"].to_pylist()[:2] == [0, 1]
    assert table["token_position"].null_count == table.num_rows


# ---------------------------------------------------------------------------------------- viewer
try:  # tests/ as a package (repo root on sys.path) or as a plain folder (pytest's prepend mode)
    from tests.viewer_support import browser, needs_chromium, viewer  # noqa: F401  (fixtures)
except ImportError:
    from viewer_support import browser, needs_chromium, viewer  # type: ignore[no-redef]  # noqa: F401


@needs_chromium
def test_viewer_draws_groups_as_blocks(viewer, tiny_dir, images, tmp_path):
    """A group run in the viewer: one grid per (image, spec), every cell of a group holding the group's
    value from the file, a text group as a labelled chip, hover and pin name the group; also through
    `maskvl view`'s self-contained page."""
    from maskvl.view import write_page

    out = tmp_path / "groups.parquet"
    maskvl.sweep(str(tiny_dir), [images["wide"], images["tall"]], "Compare them.",
                 mask_groups=["images", "blocks:2x2", [0, 1, 2]], num_tokens=2, layers="0,2", logits=True, output=out)
    md = io.read_metadata(out)
    groups = md["groups"]
    df = pq.read_table(out).to_pandas()
    v = viewer().goto()
    v.open(out)
    for step, layer, variant, metric in [(0, 0, "Full", "l2_distance"), (1, 1, "Logits", "kl_divergence")]:
        v.page.evaluate(
            """([s, l, vn, m]) => { const st = window.maskvlViewer.state, ds = window.maskvlViewer.dataset;
                 st.step = s; st.layer = l; st.variant = ds.variants.indexOf(vn); st.metric = m; window.maskvlViewer.render(); }""",
            [step, layer, variant, metric])
        got = v.values()
        # images: one grid for "images" and one for "blocks:2x2" per image
        assert [(im["index"], im["spec"]) for im in got["images"]] == [(0, "images"), (1, "images"),
                                                                       (0, "blocks:2x2"), (1, "blocks:2x2")]
        rows = df[(df.generation_step == step) & (df.layer == [0, 2][layer]) & (df.variant == variant)]
        for g, grp in enumerate(groups):
            want = rows[rows.group_index == g][metric].item()
            if grp["image_index"] is None:
                assert got["textPositions"] == [g]
                assert got["text"][0] == pytest.approx(want, rel=1e-6)
                continue
            im = next(x for x in got["images"] if x["index"] == grp["image_index"] and x["spec"] == grp["spec"])
            info = md["images"][grp["image_index"]]
            for p in grp["positions"]:
                cell = got["image"][im["cellBase"] + p - info["token_start"]]
                assert cell == pytest.approx(want, rel=1e-6), (g, p)
    chips = v.page.eval_on_selector_all("#view-a .chip .t", "ns => ns.map(n => n.textContent)")
    assert chips == ["positions 0-2"]
    # hover a cell of the first block of image 0, then click it: the block is pinned by its group index
    canvas = v.page.query_selector_all("#view-a .image-block canvas")[2]
    box = canvas.bounding_box()
    v.page.mouse.move(box["x"] + 2, box["y"] + 2)
    tip = v.page.text_content("#tooltip")
    first_block = next(g for g, grp in enumerate(groups) if grp["spec"] == "blocks:2x2")
    assert groups[first_block]["label"] in tip and f"group {first_block}" in tip, tip
    v.page.mouse.click(box["x"] + 2, box["y"] + 2)
    assert v.state()["pinned"] == first_block
    assert f"at group {first_block}" in v.page.text_content("#pin-title")
    # the pinned series follows the view's variant and metric (Logits, KL after the loop above)
    series = v.page.evaluate("window.maskvlViewer.pinnedSeries()")["values"]
    want = df[(df.group_index == first_block) & (df.variant == "Logits") & (df.generation_step == 1)]
    assert series[1][1] == pytest.approx(want[want.layer == 2]["kl_divergence"].item(), rel=1e-6)
    # the self-contained page opens the same file
    page = write_page(out, tmp_path / "groups.html")
    v2 = viewer().goto(page.as_uri())
    v2.page.wait_for_function("window.maskvlViewer.perf.load && window.maskvlViewer.perf.load.ok", timeout=60000)
    assert len(v2.values()["images"]) == 4
