"""Browser tests of the viewer's on-demand reading: row groups read from the File when a view needs them.

Large maskvl files are read this way (the footer first, then the row groups of the (step, layer) on
screen, found by their generation_step / layer statistics). Here small files are forced into that mode
(`window.maskvlViewer.config.lazyMinRows = 0`) and compared value by value with the file, for each
row-group layout a reader meets: one group per (step, layer) (the writer's), one per step (older
files), and groups that cut through layers and variants (any other writer).
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

try:  # tests/ as a package (repo root on sys.path) or as a plain folder (pytest's prepend mode)
    from tests.viewer_support import (  # noqa: F401  (browser, viewer: fixtures)
        SynthFile, VIEWER_INDEX, Viewer, browser, make_maskvl_file, needs_chromium, press_all, set_view, viewer,
    )
except ImportError:
    from viewer_support import (  # type: ignore[no-redef]  # noqa: F401
        SynthFile, VIEWER_INDEX, Viewer, browser, make_maskvl_file, needs_chromium, press_all, set_view, viewer,
    )

LAYOUTS = ["step_layer", "step", 700]


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda x: f"groups-{x}")
def layout_file(request, tmp_path_factory) -> SynthFile:
    d = tmp_path_factory.mktemp("lazy")
    return make_maskvl_file(d / "f.parquet", grids=((5, 6), (3, 4)), num_layers=5, num_heads=3, num_steps=3,
                            row_groups=request.param)


def open_lazy(v: Viewer, path, *, cache_bytes: int | None = None, prefetch: bool = True) -> dict:
    v.page.evaluate("""([c, p]) => { const k = window.maskvlViewer.config; k.lazyMinRows = 0;
        if (c !== null) k.cacheBytes = c; k.prefetch = p; }""", [cache_bytes, prefetch])
    load = v.open(path)
    assert load["mode"] == "lazy", load
    return load


def assert_view_is(v: Viewer, f: SynthFile, step: int, layer: int, variant: str, metric: str, which: str = "a"):
    got = v.page.evaluate("(w) => window.maskvlViewer.currentValues(w)", which)
    want = f.values(step, layer, variant, metric)
    for im in got["images"]:
        cells = np.array([np.nan if x is None else x for x in got["image"][im["cellBase"]:im["cellBase"] + im["count"]]])
        np.testing.assert_allclose(cells, want[im["start"]:im["start"] + im["count"]], rtol=1e-6)
    text = np.array([np.nan if x is None else x for x in got["text"]])
    tp = np.array(got["textPositions"])
    seq = f.prompt_len + step
    np.testing.assert_allclose(text[tp < seq], want[tp[tp < seq]], rtol=1e-6)
    assert np.isnan(text[tp >= seq]).all()  # tokens of later steps have no value yet


VIEWS = [(0, 0, "Full", "l2_distance"), (2, 4, "Head_2", "cosine_distance"), (1, 3, "Logits", "kl_divergence"),
         (1, 1, "Logits", "target_prob_delta"), (2, 0, "Attn", "l2_distance"), (0, 4, "Head_0", "l2_distance")]


@needs_chromium
def test_lazy_views_equal_the_file(viewer, layout_file):
    f = layout_file
    groups = pq.ParquetFile(f.path).metadata.num_row_groups
    v = viewer().goto()
    # a cache of 1 byte holds only the groups on screen: every view below is read from the file
    open_lazy(v, f.path, cache_bytes=1, prefetch=False)
    assert_view_is(v, f, 0, 0, "Full", "l2_distance")
    for step, layer, variant, metric in VIEWS:
        set_view(v, step=step, layer=layer, variant=variant, metric=metric)
        assert_view_is(v, f, step, layer, variant, metric)
    ds = v.page.evaluate("""() => { const d = window.maskvlViewer.dataset;
        return { cached: d.cache.size, groups: d.groups.length, read: d.stats.groupsRead }; }""")
    assert ds["groups"] == groups and ds["cached"] <= max(2, groups // 3) and ds["read"] >= min(len(VIEWS), groups)
    # while a view's groups are read, the status says so; the view then comes
    status = v.page.evaluate("""() => { const mv = window.maskvlViewer; mv.state.layer = 2; mv.state.step = 1;
        mv.render(); return document.getElementById('status').textContent; }""")
    assert "Reading layer 2 of step 1 from the file" in status, status
    v.page.evaluate("window.maskvlViewer.whenDrawn()")
    assert "Reading" not in v.status() and "Layer 2 (3 of 5)" in v.status()
    # side by side: the second view's (step, layer) is read too
    v.page.select_option("#compare-select", "layer")
    v.page.evaluate("window.maskvlViewer.whenDrawn()")
    st = v.state()
    assert (st["step"], st["layer"], st["compareWith"]) == (1, 2, 3)
    assert_view_is(v, f, 1, 2, "Head_0", "l2_distance", "a")
    assert_view_is(v, f, 1, 3, "Head_0", "l2_distance", "b")
    v.page.select_option("#compare-select", "off")
    # all heads: drawn from the same groups as the view
    set_view(v, heads=True, variant="Head_1")
    assert len(v.page.query_selector_all("#heads-grid .head-tile")) == 3


@needs_chromium
def test_lazy_first_view_from_the_url_hash(viewer, layout_file):
    f = layout_file
    v = viewer().goto(VIEWER_INDEX.as_uri() + "#step=2&layer=3&variant=Head_2&metric=cosine&cmp=layer:4")
    open_lazy(v, f.path, cache_bytes=1, prefetch=False)
    st = v.state()
    assert (st["step"], st["layer"], st["metric"], st["compare"], st["compareWith"]) == (2, 3, "cosine_distance", "layer", 4)
    assert_view_is(v, f, 2, 3, "Head_2", "cosine_distance", "a")
    assert_view_is(v, f, 2, 4, "Head_2", "cosine_distance", "b")
    v.page.wait_for_function("location.hash.includes('layer=3') && location.hash.includes('cmp=layer%3A4')")


@needs_chromium
def test_lazy_pin_chart_reads_every_layer(viewer, layout_file):
    f = layout_file
    v = viewer().goto()
    open_lazy(v, f.path, cache_bytes=1, prefetch=False)
    set_view(v, variant="Head_1", metric="cosine_distance", layer=2)
    q = f.meta["images"][1]["token_start"] + 5
    set_view(v, pinned=q)
    # the chart fills in the background, one row group at a time, without caching them
    v.page.wait_for_function("window.maskvlViewer.pinnedSeries().remaining === 0", timeout=30000)
    got = v.page.evaluate("window.maskvlViewer.pinnedSeries().values")
    for s in range(3):
        want = [f.values(s, layer, "Head_1", "cosine_distance")[q] for layer in range(5)]
        np.testing.assert_allclose(np.array(got[s], dtype=float), want, rtol=1e-6)
    assert "reading the file" not in v.page.text_content("#pin-title")
    # the lines are drawn: one colour per step
    chart = v.page.evaluate("""() => { const c = document.getElementById('pin-chart'); const d = c.getContext('2d')
        .getImageData(0, 0, c.width, c.height).data; const s = new Set(); for (let i = 0; i < d.length; i += 4)
        s.add(d[i] + ',' + d[i+1] + ',' + d[i+2]); return [...s]; }""")
    assert {"31,119,180", "214,39,40", "44,160,44"} <= set(chart)


@needs_chromium
def test_lazy_file_that_fits_is_read_ahead(viewer, tmp_path):
    f = make_maskvl_file(tmp_path / "fits.parquet", grids=((4, 5),), num_layers=6, num_heads=2, num_steps=2,
                         row_groups="step_layer")
    v = viewer().goto()
    open_lazy(v, f.path)
    v.page.wait_for_function("window.maskvlViewer.perf.backgroundDone", timeout=30000)
    ds = v.page.evaluate("""() => { const d = window.maskvlViewer.dataset;
        return { all: !!d.allLoaded, cached: d.cache.size, groups: d.groups.length }; }""")
    assert ds == {"all": True, "cached": 12, "groups": 12}
    # every key is now drawn at once (no wait for data), with the file's values
    for key, (step, layer) in [("ArrowRight", (0, 1)), ("ArrowRight", (0, 2)), ("ArrowDown", (1, 2)), ("ArrowLeft", (1, 1))]:
        press_all(v, [key])
        assert "Reading" not in v.status()
        assert_view_is(v, f, step, layer, "Full", "l2_distance")
    # the positions of a step are decoded once and shared by its layers' groups
    shared = v.page.evaluate("""() => { const d = window.maskvlViewer.dataset; const seen = new Set();
        for (const e of d.cache.values()) seen.add(e.pos); return seen.size; }""")
    assert shared == 2


@needs_chromium
def test_lazy_broken_row_group_gives_a_message(viewer, tmp_path):
    f = make_maskvl_file(tmp_path / "broken.parquet", grids=((4, 4),), num_layers=4, num_heads=2, num_steps=1,
                         row_groups="step_layer")
    md = pq.ParquetFile(f.path).metadata
    col = [md.row_group(3).column(i).path_in_schema for i in range(md.num_columns)].index("l2_distance")
    chunk = md.row_group(3).column(col)
    data = bytearray(f.path.read_bytes())
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data[start:start + 24] = b"\xff" * 24  # the page header of layer 3's l2_distance
    f.path.write_bytes(bytes(data))
    v = viewer().goto()
    open_lazy(v, f.path, prefetch=False)
    assert_view_is(v, f, 0, 0, "Full", "l2_distance")
    set_view(v, layer=3)
    assert v.page.is_visible("#error")
    assert "row group 3" in v.page.text_content("#error"), v.page.text_content("#error")
    # the other layers still open
    set_view(v, layer=1)
    assert_view_is(v, f, 0, 1, "Full", "l2_distance")
