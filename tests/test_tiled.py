"""Tiled images (format version 2): grids with boxes, the grid_index column, and every reader of them.

A file is written through maskvl's own writer (TokenTable, rows_table, ParquetSink, base_metadata) for two
tiled images laid out the way the tiled families lay them out: image 0 a base view then a canvas of 2 x 3
tiles of 2 x 2 cells with a newline token after every canvas row (LLaVA-OneVision's anyres), image 1 three
tiles of 2 x 2 cells in a column and then a thumbnail (InternVL). Each row's value is a known function of
its position, so every reader can be checked cell by cell."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import maskvl
from maskvl import io
from maskvl.engine import LayerResult
from maskvl.errors import InputError
from maskvl.groups import GroupSpecError, parse_specs, resolve_groups
from maskvl.models.base import GridInfo, ImageInfo

LAYERS, STEPS = [0, 1], 2


def _value(step: int, layer: int, variant: int, position: int) -> float:
    return 1.0 + position + 0.25 * layer + 0.5 * step + 0.01 * variant


def _layout() -> tuple[list[str], list[ImageInfo], set[int]]:
    """Token texts, the two images and the newline positions."""
    texts = ["<|im_start|>", "user", "\n", "<image>"]
    newlines: set[int] = set()
    # image 0 (120 x 80 px): base 3x3 (whole image), then the 4 x 6 tile canvas with a newline per row
    base0 = len(texts)
    texts += ["<image>"] * 9
    canvas = len(texts)
    for r in range(4):
        texts += ["<image>"] * 6
        newlines.add(len(texts))
        texts.append("<image_newline>")
    tiles0 = [GridInfo(2, 2, canvas + (2 * i) * 7 + 2 * j, (40.0 * j, 40.0 * i, 40.0 * j + 40, 40.0 * i + 40), "tile",
                       row_stride=7) for i in range(2) for j in range(3)]
    im0 = ImageInfo(0, None, 3, 3, base0, len(texts), (120, 80), (96, 64),
                    grids=[GridInfo(3, 3, base0, (0.0, 0.0, 120.0, 80.0), "base")] + tiles0)
    texts += ["</image>", " and", "<img>"]
    # image 1 (60 x 90 px): three tiles of 2x2 top to bottom (each 60 x 30 px), then a 2x2 thumbnail
    start1 = len(texts)
    tiles1 = [GridInfo(2, 2, start1 + 4 * k, (0.0, 30.0 * k, 60.0, 30.0 * k + 30), "tile") for k in range(3)]
    texts += ["<IMG_CONTEXT>"] * 16
    im1 = ImageInfo(1, None, 2, 2, start1, len(texts), (60, 90), (32, 96),
                    grids=tiles1 + [GridInfo(2, 2, start1 + 12, (0.0, 0.0, 60.0, 90.0), "thumbnail")])
    texts += ["</img>", " What", " differs", "?", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]
    return texts, [im0, im1], newlines


@pytest.fixture(scope="module")
def tiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[ImageInfo], set[int]]:
    d = tmp_path_factory.mktemp("tiled")
    texts, images, newlines = _layout()
    for im, (w, h) in zip(images, [(120, 80), (60, 90)]):
        p = d / f"image{im.index}.png"
        rng = np.random.default_rng(im.index)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        im.path = str(p)
    tokens = io.TokenTable.build(texts, images)
    variants = ["Full", "Attn", "Head_0"]
    out = d / "tiled.parquet"
    sink = io.ParquetSink(out)
    ids = list(range(100, 100 + len(texts)))
    generated = []
    for s in range(STEPS):
        n = len(texts) + s
        positions = np.arange(n)
        for layer in LAYERS:
            vals = np.array([[_value(s, layer, v, p) for p in positions] for v in range(len(variants))])
            lr = LayerResult(layer, variants, positions, vals, vals / 100)
            sink.write(io.rows_table(s, [lr], tokens, variants=variants))
        generated.append({"step": s, "id": 7 + s, "text": f" w{s}"})
        if s + 1 < STEPS:
            tokens.append(" w0")
            ids.append(7)
    meta = io.base_metadata(model="synthetic:tiled", dtype="float32", device="cpu", backend="reference",
                            prompt="What differs?", mask_mode="both", num_layers=2, num_heads=1, layers=LAYERS,
                            variants=variants, images=[im.to_dict() for im in images], num_steps=STEPS,
                            steps_completed=STEPS, complete=True, tokens=tokens.to_list(ids), generated=generated,
                            generated_text=" w0 w1")
    sink.close(meta)
    return out, texts, images, newlines


def test_grids_in_tokens_rows_and_metadata(tiled) -> None:
    out, texts, images, newlines = tiled
    md = io.read_metadata(out)
    assert md["format_version"] == 2
    g0 = md["images"][0]["grids"]
    assert [g["kind"] for g in g0] == ["base"] + ["tile"] * 6 and g0[1]["row_stride"] == 7
    assert md["images"][1]["grids"][-1]["kind"] == "thumbnail"
    # Each image's tile boxes cover it without gaps or overlaps; base and thumbnail cover the whole image.
    for im in images:
        w, h = im.original_size
        cover = np.zeros((h, w), np.int32)
        for g in im.grids:
            x0, y0, x1, y1 = (int(b) for b in g.box)
            if g.kind == "tile":
                cover[y0:y1, x0:x1] += 1
            else:
                assert g.box == (0.0, 0.0, float(w), float(h))
        assert (cover == 1).all()
    df = pq.read_table(out).to_pandas()
    step0 = df[(df.generation_step == 0) & (df.layer == 0) & (df.variant == "Full")].set_index("token_position")
    # Newline tokens inside image 0's range are text-kind rows without grid or image.
    for q in newlines:
        assert step0.loc[q, "token_kind"] == "text" and np.isnan(step0.loc[q, "grid_index"])
    # Tile (1, 2) of image 0: grid 6, cells at canvas row 2-3, cols 4-5.
    tile = images[0].grids[6]
    for k, q in enumerate(tile.positions()):
        row = step0.loc[q]
        assert (row.image_index, row.grid_index, row.patch_row, row.patch_col) == (0, 6, k // 2, k % 2)
    assert step0.loc[images[1].grids[3].token_start, "grid_index"] == 3
    assert int(df.grid_index.max()) == 6


def test_sweep_reads_each_grid(tiled) -> None:
    out, texts, images, newlines = tiled
    sw = maskvl.open(out)
    assert [g["kind"] for g in sw.image_grids(1)] == ["tile"] * 3 + ["thumbnail"]
    for im in images:
        for gi, g in enumerate(im.grids):
            got = sw.grid(image=im.index, step=1, layer=1, grid=gi)
            want = np.array([_value(1, 1, 0, q) for q in g.positions()]).reshape(g.rows, g.cols)
            np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(InputError, match="grid 7 is not in image 0"):
        sw.grid(image=0, grid=7)
    # The newlines are text: text() lists them with their values.
    t = sw.text(step=0, layer=0)
    assert set(newlines) <= set(t.position)
    # A version-1 file (no grids, no grid_index) reads as one grid per image.
    old = out.parent / "v1.parquet"
    table = pq.read_table(out).drop(["grid_index"])
    md = io.read_metadata(out)
    md.update(format_version=1, images=[{k: v for k, v in im.items() if k != "grids"} for im in md["images"]])
    pq.write_table(table.replace_schema_metadata({io.METADATA_KEY: json.dumps(md)}), old)
    assert maskvl.open(old).image_grids(0)[0]["kind"] == "image"


def test_render_draws_mosaic_and_base(tiled, tmp_path: Path, run_main) -> None:
    out, *_ = tiled
    from maskvl.render import read_sweep, tiled_panels

    data = read_sweep(out, "Full", "l2")
    assert tiled_panels(data, 0) == [("mosaic", [1, 2, 3, 4, 5, 6]), ("base", [0])]
    assert tiled_panels(data, 1) == [("mosaic", [0, 1, 2]), ("thumbnail", [3])]
    png = tmp_path / "r.png"
    code, _, err = run_main(["render", str(out), "-o", str(png), "--steps", "0"])
    assert code == 0, err
    img = np.asarray(Image.open(png))
    assert img.shape[0] > 400 and img.shape[1] > 400


def test_groups_on_tiled_images(tiled) -> None:
    import torch

    _, texts, images, _ = tiled
    is_image = torch.zeros(len(texts), dtype=torch.bool)
    is_image[[p for im in images for p in im.positions()]] = True
    groups = resolve_groups(parse_specs(["images"]), images, is_image)
    assert [sorted(g.positions) for g in groups] == [sorted(im.positions()) for im in images]
    assert [g.image_index for g in groups] == [0, 1] and {g.grid_index for g in groups} == {None}
    # blocks: every grid of every image cut into blocks, each within one grid, labelled with it
    blocks = resolve_groups(parse_specs(["blocks:2x2"]), images, is_image)
    assert len(blocks) == 4 + 6 + 3 + 1  # image 0: base 3x3 in 4 blocks, 6 tiles; image 1: 3 tiles, thumbnail
    assert sorted(p for g in blocks for p in g.positions) == sorted(p for im in images for p in im.positions())
    tile = blocks[4 + 5]  # image 0, grid 6 (its last tile, boxed 80..120 x 40..80)
    assert (tile.grid_index, tile.box, tile.label) == (6, (80.0, 40.0, 120.0, 80.0),
                                                       "image 0 grid 6 (tile) rows 0-1 cols 0-1")
    # box: the cells of every grid the box meets (the base view's and the tiles')
    (box,) = resolve_groups(parse_specs(["box:0:0,0,40,40"]), images, is_image)
    # base cells (0, 0) and (1, 0) (cells of 40 x 26.7 px), and all of tile (0, 0)
    want = {images[0].grids[0].token_start, images[0].grids[0].token_start + 3} | set(images[0].grids[1].positions())
    assert set(box.positions) == want and box.grid_index is None and box.image_index == 0
    (one,) = resolve_groups(parse_specs(["box:1:0,35,30,55"]), images, is_image)
    # image 1's tile 1 (y 30..60) rows 0..1 col 0, and its thumbnail's cells at y 35..55 of 90: rows 0..1 col 0
    assert set(one.positions) == {images[1].grids[1].positions()[k] for k in (0, 2)} | \
        {images[1].grids[3].positions()[k] for k in (0, 2)}
    with pytest.raises(GroupSpecError, match="covers no token"):
        resolve_groups(parse_specs(["box:1:61,0,70,10"]), images, is_image)


try:
    from tests.viewer_support import browser, needs_chromium, set_view, viewer  # noqa: F401  (fixtures)
except ImportError:
    from viewer_support import browser, needs_chromium, set_view, viewer  # type: ignore[no-redef]  # noqa: F401


@needs_chromium
def test_viewer_draws_tiles_at_their_boxes(viewer, tiled) -> None:
    """The viewer offline: image 0 as a mosaic of its six tiles over the picture with the base view beside it,
    image 1 as its three tiles and its thumbnail; every cell holds its position's value, the newlines are
    chips, hover names the tile, click pins the cell."""
    out, texts, images, newlines = tiled
    v = viewer().goto()
    v.open(out)
    set_view(v, step=1, layer=1, variant="Full")
    got = v.values()
    entries = got["images"]
    assert [(e["index"], e["kind"]) for e in entries] == [(0, "mosaic"), (0, "base"), (1, "mosaic"), (1, "thumbnail")]
    mosaic = entries[0]
    assert [p["grid"] for p in mosaic["parts"]] == [1, 2, 3, 4, 5, 6]
    # tile (i, j) of image 0 sits at x in [j/3, (j+1)/3], y in [i/2, (i+1)/2] of the mosaic
    for p in mosaic["parts"]:
        i, j = divmod(p["grid"] - 1, 3)
        np.testing.assert_allclose(p["rect"], [j / 3, i / 2, (j + 1) / 3, (i + 1) / 2], atol=1e-9)
    for e in entries:
        grids = images[e["index"]].grids
        for p in e["parts"]:
            for k, q in enumerate(grids[p["grid"]].positions()):
                assert got["image"][e["cellBase"] + p["offset"] + k] == pytest.approx(_value(1, 1, 0, q), rel=1e-6)
    assert set(newlines) <= set(got["textPositions"])
    # hover the centre of tile (1, 2)'s bottom-right cell: position canvas + 3*7 + 5
    canvas = v.page.locator("#view-a canvas[data-image='0']").first
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] * (2 / 3 + 0.75 / 3), box["y"] + box["height"] * (0.5 + 0.75 / 2)
    v.page.mouse.move(x, y)
    tip = v.page.text_content("#tooltip")
    q = images[0].grids[6].positions()[3]
    assert f"pos {q}" in tip and "image 0 tile 5 (grid 6) · row 1 col 1" in tip, tip
    v.page.mouse.click(x, y)
    assert v.state()["pinned"] == q
    # the mosaic's pixels at that cell carry its colour: different from the first tile's first cell
    assert v.pixel("#view-a canvas[data-image='0']", 2 / 3 + 0.75 / 3, 0.5 + 0.75 / 2) != \
        v.pixel("#view-a canvas[data-image='0']", 0.25 / 3, 0.25 / 2)
