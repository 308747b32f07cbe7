"""Browser tests of the viewer on large files: 10 million rows, and 62 million (a 4096x4096 image's sweep).

The files are written once per test session with pyarrow straight (tests/viewer_support.py:
synthetic but format-correct rows, zstd, no model). The 62M-row file takes ~30-60 s to write on a
2-core machine; MASKVL_SKIP_BIG=1 skips both tests (select them alone with
`pytest tests/test_viewer_large.py`). Timings are taken in the page with performance.now();
memory with CDP (JS heap) and /proc (the renderer's resident set, which holds the typed arrays).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

try:  # tests/ as a package (repo root on sys.path) or as a plain folder (pytest's prepend mode)
    from tests.viewer_support import (  # noqa: F401  (browser, viewer: fixtures)
        browser, js_heap_used_mb, keys_to_drawn_ms, make_large_file, make_maskvl_file, needs_chromium, press_all,
        renderer_memory_mb, set_view, viewer,
    )
except ImportError:
    from viewer_support import (  # type: ignore[no-redef]  # noqa: F401
        browser, js_heap_used_mb, keys_to_drawn_ms, make_large_file, make_maskvl_file, needs_chromium, press_all,
        renderer_memory_mb, set_view, viewer,
    )

skip_big = pytest.mark.skipif(os.environ.get("MASKVL_SKIP_BIG") == "1", reason="MASKVL_SKIP_BIG=1")


# ------------------------------------------------------------ 10M rows

@pytest.fixture(scope="session")
def ten_million(tmp_path_factory):
    # 36 layers x 34 variants x ~1070 positions x 8 steps = 10.4M rows, zstd, one row group per
    # step (the writer's older layout); ~4 s to write here.
    d = tmp_path_factory.mktemp("big")
    return make_maskvl_file(d / "ten_million.parquet", grids=((32, 32),), num_layers=36, num_heads=32,
                            num_steps=8, logits=False, compression="zstd", keep_tables=False, extra_text=20)


@needs_chromium
@skip_big
def test_ten_million_rows_open_under_8s(viewer, ten_million):
    n = pq.ParquetFile(ten_million.path).metadata.num_rows
    assert n >= 10_000_000
    v = viewer().goto()
    t = time.perf_counter()
    load = v.open(ten_million.path)
    wall = time.perf_counter() - t
    assert load["rows"] == n and load["mode"] == "lazy"
    assert load["totalMs"] < 8000, load
    assert wall < 10, wall  # includes the file picker's round trip
    vals = v.values()
    assert [(im["rows"], im["cols"]) for im in vals["images"]] == [(32, 32)]
    # it fits the cache: read ahead whole in the background, then every key is instant
    v.page.wait_for_function("window.maskvlViewer.perf.backgroundDone", timeout=60000)
    assert v.page.evaluate("window.maskvlViewer.dataset.allLoaded") is True
    times = press_all(v, ["ArrowRight", "ArrowDown", "ArrowDown", "v", "s", "ArrowLeft", "ArrowUp"])
    assert max(times) < 30, times
    assert max(keys_to_drawn_ms(v, ["ArrowRight", "ArrowDown", "v", "ArrowLeft", "ArrowUp"])) < 30
    # another metric: its column is read per row group when first shown
    drawn = keys_to_drawn_ms(v, ["m"])
    assert v.state()["metric"] == "cosine_distance" and drawn[0] < 2000, drawn


# ------------------------------------------------------------ 62M rows

@pytest.fixture(scope="session")
def sixty_two_million(tmp_path_factory):
    d = tmp_path_factory.mktemp("huge")
    t = time.perf_counter()
    info = make_large_file(d / "sixty_two_million.parquet")
    info["write_s"] = time.perf_counter() - t
    return info


def _check_grid(v, f, step: int, layer: int, variant: str):
    got = v.values()
    im = got["images"][0]
    cells = np.array([np.nan if x is None else x for x in got["image"][:im["count"]]], dtype=np.float64)
    want = f["values"](step, layer, variant)
    np.testing.assert_allclose(cells, want[im["start"]:im["start"] + im["count"]], rtol=1e-6)


JUMP_JS = """async ([layer, step]) => { const mv = window.maskvlViewer; const t = performance.now();
  mv.state.layer = layer; if (step !== null) mv.state.step = step; mv.render(); await mv.whenDrawn();
  return performance.now() - t; }"""


@needs_chromium
@skip_big
def test_sixty_two_million_rows(viewer, browser, sixty_two_million):
    f = sixty_two_million
    md = pq.ParquetFile(f["path"]).metadata
    assert md.num_rows >= 60_000_000 and md.num_row_groups == 36 * 3  # one row group per (step, layer)
    seen: dict = {"rows": md.num_rows, "file_mb": round(f["path"].stat().st_size / 2**20), "write_s": round(f["write_s"], 1)}
    v = viewer().goto()
    # first without reading ahead, so that every change below is read from the file
    v.page.evaluate("window.maskvlViewer.config.prefetch = false")
    t = time.perf_counter()
    load = v.open(f["path"])
    seen["open_wall_s"] = round(time.perf_counter() - t, 2)
    seen["first_grid_ms"] = round(load["totalMs"])
    assert load["mode"] == "lazy" and load["rows"] == md.num_rows
    _check_grid(v, f, 0, 0, "Full")
    # changing layer: the row groups of the new view are read and drawn
    cold = [v.page.evaluate(JUMP_JS, [layer, None]) for layer in (1, 17, 35, 8, 9, 30)]
    cold += keys_to_drawn_ms(v, ["ArrowLeft", "ArrowRight", "ArrowRight"])  # real keys: layers 29, 30 (cached), 31
    seen["cold_layer_ms"] = [round(x) for x in cold]
    _check_grid(v, f, 0, 31, "Full")
    # changing step: the new step's positions are decoded too (once per step)
    steps = [v.page.evaluate(JUMP_JS, [20, 2])] + keys_to_drawn_ms(v, ["ArrowUp"])
    seen["cold_step_ms"] = [round(x) for x in steps]
    _check_grid(v, f, 1, 20, "Full")
    # a variant of the same (step, layer): no read at all
    seen["variant_ms"] = [round(x) for x in keys_to_drawn_ms(v, ["v", "v", "V"])]
    _check_grid(v, f, 1, 20, "Attn")  # Full -> Attn -> Head_0 -> Attn
    seen["heap_mb_cold"] = round(js_heap_used_mb(v))
    # now read ahead while idle: the whole file's l2 fits the cache (positions shared per step)
    v.page.evaluate("""() => { const mv = window.maskvlViewer; mv.config.prefetch = true; mv.render(); }""")
    t = time.perf_counter()
    v.page.wait_for_function("window.maskvlViewer.perf.backgroundDone", timeout=240000)
    seen["read_ahead_s"] = round(time.perf_counter() - t, 1)
    ds = v.page.evaluate("""() => { const d = window.maskvlViewer.dataset;
        return { all: !!d.allLoaded, cacheMB: d.cacheBytes / 2 ** 20, groups: d.stats.groupsRead,
                 readMB: d.stats.bytesRead / 2 ** 20 }; }""")
    seen["cache_mb"] = round(ds["cacheMB"])
    seen["read_mb"] = round(ds["readMB"])
    warm = keys_to_drawn_ms(v, ["ArrowRight", "ArrowRight", "ArrowDown", "ArrowLeft", "ArrowUp", "ArrowRight"])
    seen["warm_keys_ms"] = [round(x) for x in warm]
    # the pinned cell's chart over all 36 layers x 3 steps (from the cache now)
    st = v.state()
    q = f["meta"]["images"][0]["token_start"] + 64 * 128 + 64
    set_view(v, pinned=q)
    v.page.wait_for_function("window.maskvlViewer.pinnedSeries().remaining === 0", timeout=120000)
    series = np.array(v.page.evaluate("window.maskvlViewer.pinnedSeries().values"), dtype=np.float64)
    variant = f["variants"][st["variant"]]
    want = np.array([[f["values"](s, layer, variant)[q] for layer in range(36)] for s in range(3)])
    np.testing.assert_allclose(series, want, rtol=1e-6)
    press_all(v, ["Escape"])
    # another metric: its column is read on demand for the groups shown
    seen["metric_switch_ms"] = [round(x) for x in keys_to_drawn_ms(v, ["m", "ArrowRight", "ArrowRight"])]
    seen["heap_mb"] = round(js_heap_used_mb(v))
    seen.update({k: round(x) for k, x in renderer_memory_mb(browser).items()})
    print("\n62M-row viewer:", json.dumps(seen))
    # goals: first grid under 2 s, a change of layer under 300 ms, memory under 1 GB
    assert seen["first_grid_ms"] < 2000, seen
    assert seen["open_wall_s"] < 3, seen  # from the file picker to the first grid, round trips included
    # A change of layer (all but one read from the file) under 300 ms: the median, since on a
    # shared 2-core machine one sample can stall behind other processes; none may take twice that.
    assert sorted(cold)[len(cold) // 2] < 300 and max(cold) < 600, seen
    assert max(steps) < 600, seen
    assert max(seen["variant_ms"]) < 100, seen
    assert max(warm) < 50, seen
    assert max(seen["metric_switch_ms"]) < 300, seen
    assert ds["all"] and ds["cacheMB"] < 400, ds
    assert seen["heap_mb"] < 1024, seen
    assert seen.get("rss_max_mb", 0) < 1024, seen
