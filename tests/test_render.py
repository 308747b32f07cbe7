"""``maskvl render``: grids from the rows, small multiples over non-square images, text strips, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from maskvl import io
from maskvl.render import _layout_chips, default_layers, image_grid, read_sweep


@pytest.fixture(scope="module")
def sweep_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Sweep files of a tiny model: two non-square images (mask both, 2 steps) and text-only."""
    from maskvl.api import run_sweep
    from maskvl.models import load_model, write_tiny_model

    root = tmp_path_factory.mktemp("render")
    model = write_tiny_model(root / "tiny", seed=2, num_layers=3)
    cfg = json.loads((model / "preprocessor_config.json").read_text())
    cfg["size"]["shortest_edge"] = 4096
    (model / "preprocessor_config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(1)
    wide, tall = root / "wide.png", root / "tall.png"
    Image.fromarray(rng.integers(0, 255, (60, 130, 3), dtype=np.uint8)).save(wide)
    Image.fromarray(rng.integers(0, 255, (100, 40, 3), dtype=np.uint8)).save(tall)
    adapter = load_model(str(model))
    two = run_sweep(adapter, [str(wide), str(tall)], "What differs?", {"mask_mode": "both", "num_tokens": 2},
                    output=root / "two.parquet").path
    text = run_sweep(adapter, [], "Explain this.", {"mask_mode": "text"}, output=root / "text.parquet").path
    return {"two": two, "text": text, "wide": wide, "tall": tall}



def test_image_grid_places_each_token_at_its_patch(sweep_files: dict[str, Path]) -> None:
    data = read_sweep(sweep_files["two"], "Full", "l2")
    md = data.metadata
    assert len(md["images"]) == 2
    table = pq.read_table(sweep_files["two"]).to_pylist()
    for im in md["images"]:
        rows, cols = im["grid_rows"], im["grid_cols"]
        assert rows != cols  # the images are not square
        grid = image_grid(data, 1, 2, im["index"], rows, cols)
        assert not np.isnan(grid).any()
        # FORMAT.md: token token_start + r * cols + c is patch (r, c).
        for r in range(rows):
            for c in range(cols):
                pos = im["token_start"] + r * cols + c
                want = [t["l2_distance"] for t in table if t["token_position"] == pos and t["layer"] == 2
                        and t["generation_step"] == 1 and t["variant"] == "Full"]
                assert want and grid[r, c] == pytest.approx(want[0], rel=1e-6)


def test_render_two_images_to_png(tmp_path: Path, sweep_files: dict[str, Path],
                                  capsys: pytest.CaptureFixture[str], run_main) -> None:
    target = tmp_path / "fig" / "out.png"
    code, out, err = run_main(["render", str(sweep_files["two"]), "-o", str(target), "--metric", "cosine",
                                "--variant", "Head_1", "--layers", "0,2"])
    assert code == 0, err
    assert out.strip() == str(target)
    with Image.open(target) as im:
        w, h = im.size
        assert im.format == "PNG"
        pixels = np.asarray(im.convert("RGB"))
    # Two steps x two images of small multiples plus text strips: a tall figure, not a blank one.
    assert h > w > 500
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.png"]  # no temp file left


def test_render_one_png_per_step_into_a_folder(tmp_path: Path, sweep_files: dict[str, Path],
                                               capsys: pytest.CaptureFixture[str], run_main) -> None:
    code, out, err = run_main(["render", str(sweep_files["two"]), "-o", str(tmp_path / "pngs"), "--steps", "0-1"])
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == ["two.step0.png", "two.step1.png"]


def test_render_text_only_file(tmp_path: Path, sweep_files: dict[str, Path],
                               capsys: pytest.CaptureFixture[str], run_main) -> None:
    code, _, err = run_main(["render", str(sweep_files["text"]), "-o", str(tmp_path / "t.png")])
    assert code == 0, err
    with Image.open(tmp_path / "t.png") as im:
        assert im.size[0] > im.size[1]  # strips only: wide and short


def test_render_with_moved_image_warns_and_accepts_image_option(tmp_path: Path, sweep_files: dict[str, Path],
                                                                capsys: pytest.CaptureFixture[str], run_main) -> None:
    # A copy of the file whose recorded image paths no longer exist.
    md = io.read_metadata(sweep_files["two"])
    for im in md["images"]:
        im["path"] = str(tmp_path / "gone" / Path(im["path"]).name)
    table = pq.read_table(sweep_files["two"]).replace_schema_metadata({io.METADATA_KEY: json.dumps(md)})
    moved = tmp_path / "moved.parquet"
    with pq.ParquetWriter(moved, table.schema) as w:
        w.write_table(table)
        w.add_key_value_metadata({io.METADATA_KEY: json.dumps(md)})
    code, _, err = run_main(["render", str(moved), "-o", str(tmp_path / "a.png")])
    assert code == 0 and err.count("warning: image") == 2
    code, _, err = run_main(["render", str(moved), "-o", str(tmp_path / "b.png"), "--image",
                              str(sweep_files["wide"]), "--image", str(sweep_files["tall"])])
    assert code == 0 and "warning" not in err
    # The background changes the picture.
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


@pytest.mark.parametrize("args, message", [
    (["--variant", "Head_9"], "variant 'Head_9' is not in"),
    (["--layers", "5"], "layer 5 is not in the file"),
    (["--steps", "3"], "step 3 is not in the file"),
    (["--steps", "x"], "bad --steps list"),
    (["--metric", "kl"], "Invalid value for '--metric'"),
    (["--image", "a.png", "--image", "b.png", "--image", "c.png"], "3 images given but the file has 2"),
    (["--image", "/no/such.png"], "image not found: /no/such.png"),
    (["--cmap", "nope"], "unknown colour map 'nope'"),
])
def test_render_bad_options(tmp_path: Path, sweep_files: dict[str, Path], capsys: pytest.CaptureFixture[str],
                            args: list[str], message: str, run_main) -> None:
    target = tmp_path / "x.png"
    code, _, err = run_main(["render", str(sweep_files["two"]), "-o", str(target), *args])
    assert code == 2
    assert err.startswith("maskvl: error: ") and message in err and err.count("\n") == 1
    assert not target.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    (b"not parquet at all", "cannot read"),
])
def test_render_bad_files(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None,
                          message: str, run_main) -> None:
    src = tmp_path / "in.parquet"
    if content is not None:
        src.write_bytes(content)
    code, _, err = run_main(["render", str(src), "-o", str(tmp_path / "x.png")])
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_render_refuses_parquet_without_maskvl_metadata(tmp_path: Path, sweep_files: dict[str, Path],
                                                        capsys: pytest.CaptureFixture[str], run_main) -> None:
    pq.write_table(pq.read_table(sweep_files["text"]).replace_schema_metadata(None), tmp_path / "plain.parquet")
    code, _, err = run_main(["render", str(tmp_path / "plain.parquet")])
    assert code == 2 and "no maskvl metadata" in err


def test_default_layers_and_chip_wrapping() -> None:
    assert default_layers([0, 1, 2]) == [0, 1, 2]
    picked = default_layers(list(range(36)))
    assert len(picked) == 8 and picked[0] == 0 and picked[-1] == 35 and picked == sorted(set(picked))
    placed, lines = _layout_chips(["word"] * 50, 3.0)
    assert lines > 1
    assert all(x + w <= 3.0 + 1e-9 for x, _, w in placed)
    assert [line for _, line, _ in placed] == sorted(line for _, line, _ in placed)
