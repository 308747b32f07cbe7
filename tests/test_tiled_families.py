"""Every tiled family end to end: a tiny model written by ``write_tiny_model``, a float64 sweep with two
non-square images, and the file's grids: the tile boxes cover each image (a box may reach into the
processor's padding, never leave a gap), a base view or thumbnail covers the whole image, every image token is
in exactly one grid and separators are text; the viewer opens the file offline and draws every grid.

(Each family's own test file checks it against the naive oracle.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import maskvl
from maskvl.io import read_metadata
from maskvl.models import adapter_class, load_model, supported_model_types
from naive_support import compare_with_naive

TILED = [t for t in ("llava_onevision", "gemma3", "idefics3", "smolvlm", "internvl") if t in supported_model_types()]


@pytest.fixture(scope="module", params=TILED)
def tiled_adapter(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any]:
    family = request.param
    d = tmp_path_factory.mktemp(family)
    adapter_class(family).write_tiny_model(d / "model", seed=3, num_layers=2)
    return family, load_model(str(d / "model"), torch.float64, "cpu")


@pytest.fixture(scope="module")
def tiled_run(tiled_adapter, tmp_path_factory: pytest.TempPathFactory, images) -> tuple[str, Path, dict]:
    family, adapter = tiled_adapter
    out = tmp_path_factory.mktemp(f"{family}-run") / "run.parquet"
    maskvl.sweep(adapter, [images["wide"], images["tall"]], "Compare the two pictures.", mask_mode="both",
                 num_tokens=2, logits=True, output=out)
    return family, out, read_metadata(out)


GROUP_SPECS = ["blocks:2x2", "box:0:10,8,60,40"]


@pytest.fixture(scope="module")
def group_run(tiled_adapter, tmp_path_factory: pytest.TempPathFactory, images) -> tuple[str, Path, dict]:
    """Blocks of every grid and a pixel box across grids on a tiled image, against the naive oracle (the
    whole set removed at once), then written through the API."""
    from maskvl.groups import parse_specs, resolve_groups

    family, adapter = tiled_adapter
    compare_with_naive(adapter, [images["wide"]], "What is it?", "both", 1, 1e-9, 1e-6, logits=True,
                       groups=lambda prep: [list(g.positions) for g in resolve_groups(
                           parse_specs(GROUP_SPECS), prep.images, prep.is_image)])
    out = tmp_path_factory.mktemp(f"{family}-groups") / "groups.parquet"
    maskvl.sweep(adapter, [images["wide"]], "What is it?", mask_groups=GROUP_SPECS, logits=True, output=out)
    return family, out, read_metadata(out)


def _covered(w: int, h: int, boxes: list[list[float]]) -> np.ndarray:
    """Which pixel centres of a w x h image some box covers: ``[h, w]`` bool."""
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    cover = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in boxes:
        cover |= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    return cover


def test_grids_cover_each_image(tiled_run) -> None:
    family, out, md = tiled_run
    assert md["format_version"] == 2 and len(md["images"]) == 2
    kinds = {t["position"]: t["kind"] for t in md["tokens"]}
    seen: set[int] = set()
    for im in md["images"]:
        w, h = im["original_size"]
        grids = im["grids"]
        assert grids, family
        tiles = [g["box"] for g in grids if g["kind"] == "tile"]
        whole = [g["box"] for g in grids if g["kind"] != "tile"]
        for box in whole:  # a base view, a thumbnail or the one grid: the whole image
            assert _covered(w, h, [box]).all(), (family, box)
        if tiles:
            assert _covered(w, h, tiles).all(), (family, tiles)
        for g in grids:
            stride = g["row_stride"]
            cells = {g["token_start"] + r * stride + c for r in range(g["rows"]) for c in range(g["cols"])}
            assert not cells & seen, family  # each image token in one grid
            seen |= cells
            assert all(kinds[p] == "image" for p in cells), family
            assert g["token_start"] >= im["token_start"] and g["token_end"] <= im["token_end"]
    image_tokens = {p for p, k in kinds.items() if k == "image"}
    assert image_tokens == seen, family  # separators and markers are text
    df = pq.read_table(out, columns=["image_index", "grid_index", "token_kind"]).to_pandas()
    assert (df.grid_index.isna() == (df.token_kind != "image")).all()


def test_render_draws_every_grid(tiled_run, tmp_path: Path) -> None:
    from maskvl.render import read_sweep, render, tiled_panels

    family, out, md = tiled_run
    data = read_sweep(out, "Full", "l2")
    for i, im in enumerate(md["images"]):
        if data.tiled(i):  # every grid in exactly one panel
            assert sorted(g for _, gs in tiled_panels(data, i) for g in gs) == list(range(len(im["grids"])))
    written = render(out, str(tmp_path / "r.png"), layers="1", steps="0")
    assert all(p.stat().st_size > 5_000 for p in written), family


try:
    from tests.viewer_support import browser, needs_chromium, set_view, viewer  # noqa: F401  (fixtures)
except ImportError:
    from viewer_support import browser, needs_chromium, set_view, viewer  # type: ignore[no-redef]  # noqa: F401


@needs_chromium
def test_viewer_draws_every_grid(tiled_run, viewer) -> None:
    family, out, md = tiled_run
    v = viewer().goto()
    v.open(out)
    set_view(v, step=1, layer=1, variant="Full")
    got = v.values()
    drawn = {}
    for e in got["images"]:
        parts = e["parts"] or [{"grid": 0, "offset": 0, "rows": e["rows"], "cols": e["cols"]}]
        for p in parts:  # an image drawn as one grid (kind image) has no grid index of its own: grid 0
            drawn[(e["index"], p["grid"] if p["grid"] is not None else 0)] = [got["image"][e["cellBase"] + p["offset"] + k]
                                              for k in range(p["rows"] * p["cols"])]
    expected = {(i, gi) for i, im in enumerate(md["images"]) for gi in range(len(im["grids"]))}
    assert set(drawn) == expected, family
    assert all(x is not None for cells in drawn.values() for x in cells), family


def test_groups_on_tiled_images(group_run, tmp_path: Path) -> None:
    """Every block lies in one grid and the blocks of a spec cover every image token once; the box's group
    lies in the image; render draws it."""
    from maskvl.render import render

    family, out, md = group_run
    im = md["images"][0]
    blocks = [g for g in md["groups"] if g["spec"] == "blocks:2x2"]
    assert all(g["image_index"] == 0 and g["grid_index"] is not None for g in blocks), family
    cells = sorted(p for g in blocks for p in g["positions"])
    stride = {gi: g["row_stride"] for gi, g in enumerate(im["grids"])}
    assert cells == sorted(g["token_start"] + r * stride[gi] + c for gi, g in enumerate(im["grids"])
                           for r in range(g["rows"]) for c in range(g["cols"])), family
    (box,) = [g for g in md["groups"] if g["spec"].startswith("box:")]
    assert box["image_index"] == 0 and box["positions"], family
    written = render(out, str(tmp_path / "g.png"))
    assert all(p.stat().st_size > 5_000 for p in written), family


@needs_chromium
def test_viewer_draws_groups_on_tiled_images(group_run, viewer) -> None:
    """Each group's value fills all of its cells, in whichever panel (tile mosaic, base view, thumbnail)
    draws them."""
    family, out, md = group_run
    df = pq.read_table(out).to_pandas()
    v = viewer().goto()
    v.open(out)
    set_view(v, step=0, layer=1, variant="Full")
    got = v.values()
    rows = df[(df.generation_step == 0) & (df.layer == 1) & (df.variant == "Full")].set_index("group_index")
    layout = v.page.evaluate("""() => { const L = window.maskvlViewer.layout;
        return Array.from(L.posCells, (c) => (c ? Array.from(c) : null)); }""")
    for g in md["groups"]:
        cells = layout[g["index"]]
        assert cells and len(cells) == len(g["positions"]), (family, g["label"])
        assert all(got["image"][c] == pytest.approx(rows.loc[g["index"], "l2_distance"], rel=1e-6) for c in cells)
