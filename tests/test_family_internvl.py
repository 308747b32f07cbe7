"""InternVL (transformers-native InternVL3): a tiny random hub-like model written offline, inputs against
transformers' InternVLProcessor, the tiles and thumbnail as grids with boxes, and the engine against the naive
oracle (transformers' own forward with one attention entry removed) in float64: one and two non-square images,
text only, every backend, Llama and Qwen3 text decoders (InternVL2.5 / InternVL3-9B, InternVL3.5)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskvl.inputs import load_image
from maskvl.models import load_model
from maskvl.models.internvl import InternVLAdapter
from naive_support import assert_file_matches, cli_sweep_one_image, compare_with_naive

# GQA 6:2, head_dim 24, hidden 40 (head_dim * heads != hidden); 32-pixel tiles of 2x2 tokens, at most 6 tiles.
SHAPE = dict(num_layers=3, num_heads=6, num_kv_heads=2, head_dim=24, hidden_size=40, intermediate_size=72,
             vision_depth=2)
PROMPT = "What is in this image?"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return InternVLAdapter.write_tiny_model(tmp_path_factory.mktemp("models") / "internvl", seed=5, **SHAPE)


@pytest.fixture(scope="module")
def adapter(model_dir: Path):
    return load_model(str(model_dir), torch.float64, "cpu")


def _processor(adapter, monkeypatch):
    """transformers' InternVLProcessor over the adapter's tokenizer and image processor (its video processor
    needs torchvision: the constructor's class check is skipped, nothing else)."""
    from transformers import InternVLProcessor
    from transformers.processing_utils import ProcessorMixin

    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
    seq = json.loads((Path(adapter.model_id) / "processor_config.json").read_text())["image_seq_length"]
    return InternVLProcessor(image_processor=adapter.image_processor, tokenizer=adapter.tokenizer,
                             image_seq_length=seq, chat_template=adapter.tokenizer.chat_template)


def test_directory_and_config(model_dir: Path, adapter) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
                 "processor_config.json"):
        assert (model_dir / name).exists(), name
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["model_type"] == "internvl" and cfg["text_config"]["model_type"] == "qwen2"
    assert isinstance(adapter, InternVLAdapter)
    assert type(adapter.image_processor).__name__ == "GotOcr2ImageProcessorPil"
    assert (adapter.image_seq_length, adapter.side, adapter.tile) == (4, 2, (32, 32))
    assert (adapter.num_layers, adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (3, 6, 2, 24)
    assert adapter.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v biases


@pytest.mark.parametrize("which", [["wide"], ["wide", "tall"], []])
def test_inputs_as_transformers_processor(adapter, images, monkeypatch, which) -> None:
    """input_ids and pixel_values equal InternVLProcessor's on the chat-templated prompt."""
    proc = _processor(adapter, monkeypatch)
    imgs = [load_image(str(images[w])) for w in which]
    prep = adapter.prepare(PROMPT, imgs, [str(images[w]) for w in which])
    content = [{"type": "image"} for _ in imgs] + [{"type": "text", "text": PROMPT}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                    tokenize=False)
    ref = proc(text=text, images=imgs or None, return_tensors="pt")
    assert torch.equal(ref["input_ids"], prep.input_ids)
    if imgs:
        assert torch.equal(ref["pixel_values"].to(torch.float64), prep.model_inputs["pixel_values"])
    else:
        assert "pixel_values" not in prep.model_inputs and not prep.images


def _check_grids(adapter, prep) -> None:
    """Grids are image-kind, every image-kind position is in exactly one grid, the tiles cover the image
    without gaps or overlaps, the thumbnail is the whole image, separators are text-kind."""
    ids = prep.input_ids[0].tolist()
    S = len(ids)
    count = np.zeros(S, int)
    start_id = adapter.tokenizer.convert_tokens_to_ids("<img>")
    end_id = adapter.tokenizer.convert_tokens_to_ids("</img>")
    for im in prep.images:
        W, H = im.original_size
        assert ids[im.token_start] == start_id and ids[im.token_end - 1] == end_id
        assert not prep.is_image[im.token_start] and not prep.is_image[im.token_end - 1]
        assert (im.grid_rows, im.grid_cols) == (im.grids[0].rows, im.grids[0].cols)
        starts = [g.token_start for g in im.grids]
        assert starts == sorted(starts)
        for g in im.grids:
            pos = g.positions()
            assert prep.is_image[pos].all()
            assert im.token_start < min(pos) and max(pos) < im.token_end
            count[pos] += 1
        tiles = [g for g in im.grids if g.kind == "tile"]
        others = [g for g in im.grids if g.kind != "tile"]
        assert len(others) == 1 and others[0].box == (0.0, 0.0, float(W), float(H))
        if tiles:
            assert others[0].kind == "thumbnail" and im.grids[-1] is others[0]
            # Tile boxes on one grid of column and row edges from 0 to W and 0 to H: no gaps, no overlaps.
            xs = sorted({b for g in tiles for b in (g.box[0], g.box[2])})
            ys = sorted({b for g in tiles for b in (g.box[1], g.box[3])})
            assert xs[0] == 0 and xs[-1] == W and ys[0] == 0 and ys[-1] == H
            cells = sorted((g.box[1], g.box[0]) for g in tiles)
            assert cells == [(y, x) for y in ys[:-1] for x in xs[:-1]]  # one tile per cell
            # Row-major tile order, as the image processor cuts them.
            assert [(g.box[1], g.box[0]) for g in tiles] == cells
            assert np.isclose(sum((g.box[2] - g.box[0]) * (g.box[3] - g.box[1]) for g in tiles), W * H)
            assert im.resized_size == ((len(xs) - 1) * adapter.tile[1], (len(ys) - 1) * adapter.tile[0])
        else:
            assert others[0].kind == "image"
    assert (count <= 1).all()
    np.testing.assert_array_equal(count == 1, prep.is_image.numpy())


def test_grids_tiles_and_thumbnail(adapter, images, tmp_path: Path) -> None:
    imgs = [load_image(str(images["wide"])), load_image(str(images["tall"]))]
    prep = adapter.prepare("Compare them.", imgs, [None, None])
    _check_grids(adapter, prep)
    wide, tall = prep.images
    # 96x64 -> a 3x2 canvas of 32-pixel tiles (6 tiles) + thumbnail; 64x128 -> 1x2 (2 tiles) + thumbnail.
    assert [g.kind for g in wide.grids] == ["tile"] * 6 + ["thumbnail"]
    assert [g.box for g in wide.grids[:3]] == [(0.0, 0.0, 32.0, 32.0), (32.0, 0.0, 64.0, 32.0), (64.0, 0.0, 96.0, 32.0)]
    assert [g.kind for g in tall.grids] == ["tile"] * 2 + ["thumbnail"]
    assert [g.box for g in tall.grids] == [(0.0, 0.0, 64.0, 64.0), (0.0, 64.0, 64.0, 128.0), (0.0, 0.0, 64.0, 128.0)]
    assert all((g.rows, g.cols, g.row_stride) == (2, 2, 2) for im in prep.images for g in im.grids)
    assert int(prep.is_image.sum()) == 4 * (7 + 3)
    # A square image fits one tile: no thumbnail, one grid of kind image. Stretching onto a non-square
    # canvas gives tile boxes in original pixels that are not squares.
    square = tmp_path / "sq.png"
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(square)
    odd = tmp_path / "odd.png"
    Image.fromarray(np.full((50, 70, 3), 30, np.uint8)).save(odd)
    prep2 = adapter.prepare("Hi", [load_image(str(square)), load_image(str(odd))], [None, None])
    _check_grids(adapter, prep2)
    sq, od = prep2.images
    assert [g.kind for g in sq.grids] == ["image"] and sq.resized_size == (32, 32)
    assert sq.token_end - sq.token_start == 4 + 2
    cols, rows = (od.resized_size[0] // 32, od.resized_size[1] // 32)
    assert cols * rows == len(od.grids) - 1 > 1
    assert od.grids[1].box[0] == pytest.approx(70 / cols)


def test_max_pixels_caps_the_tiles(adapter, images) -> None:
    from maskvl.errors import InputError

    img = load_image(str(images["wide"]))
    prep = adapter.prepare(PROMPT, [img], [None], max_pixels=3 * 32 * 32)
    _check_grids(adapter, prep)
    # At most 3 tiles: 2x1 (aspect 2) ties 1x1 (aspect 1) for 1.5 and the processor takes the larger.
    assert [g.kind for g in prep.images[0].grids] == ["tile"] * 2 + ["thumbnail"]
    assert prep.images[0].resized_size == (64, 32)
    prep = adapter.prepare(PROMPT, [img], [None], max_pixels=32 * 32)
    assert [g.kind for g in prep.images[0].grids] == ["image"]
    with pytest.raises(InputError, match="max_pixels"):
        adapter.prepare(PROMPT, [img], [None], max_pixels=1000)


def test_pixel_shuffle_keeps_row_major_cells(adapter) -> None:
    """The model's pixel shuffle turns a tile's patch grid into row-major cells of 2x2 patches: cell (r, c)
    holds exactly patches rows 2r..2r+1, columns 2c..2c+1 (what the grids' row-major order assumes)."""
    n, C = 4, 3
    rows = torch.arange(n).view(n, 1, 1).expand(n, n, C).to(torch.float64)
    cols = torch.arange(n).view(1, n, 1).expand(n, n, C).to(torch.float64)
    tag = (rows * 100 + cols)[None]  # [1, H, W, C]: each patch's feature names its (row, col)
    out = adapter.model.model.pixel_shuffle(tag, scale_factor=0.5)
    assert out.shape == (1, 2, 2, 4 * C)
    for r in range(2):
        for c in range(2):
            got = {int(v) for v in out[0, r, c].tolist()}
            assert got == {100 * (2 * r + i) + 2 * c + j for i in range(2) for j in range(2)}


def test_float64_one_image_every_variant_two_steps(adapter, images, run_main, model_dir: Path, tmp_path: Path) -> None:
    prep, fast, worst = compare_with_naive(adapter, [images["wide"]], PROMPT, "both", 2, 1e-9, 1e-6, logits=True)
    print(f"InternVLAdapter: worst relative error vs the naive oracle {worst:.2e}")
    assert len(prep.images[0].grids) == 7
    assert [len(f.layers[0].positions) for f in fast] == [prep.input_ids.shape[1], prep.input_ids.shape[1] + 1]
    # The command line on the same directory writes what the engine computed, and the grids.
    out = tmp_path / "cli.parquet"
    md = cli_sweep_one_image(run_main, model_dir, images["wide"], out, prompt=PROMPT)
    assert md["complete"]
    assert md["images"][0]["grids"] == [g.to_dict() for g in prep.images[0].grids]
    assert [g["kind"] for g in md["images"][0]["grids"]] == ["tile"] * 6 + ["thumbnail"]
    assert_file_matches(out, fast)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_float64_backends_against_naive(adapter, images, backend: str) -> None:
    from maskvl.ops.testing import compiled_backend

    be, _ = compiled_backend(backend)
    compare_with_naive(adapter, [images["tall"]], "Which way is up?", "both", 2, 1e-9, 1e-6, logits=True, layers=[0],
                       backend=be)


def test_float64_two_images_vision_mode(adapter, images) -> None:
    prep, fast, _ = compare_with_naive(adapter, [images["wide"], images["tall"]], "Compare them.", "vision", 2, 1e-9,
                                       1e-6, logits=True, window=2)
    _check_grids(adapter, prep)
    assert len(fast[0].layers[0].positions) == 4 * (7 + 3)
    np.testing.assert_array_equal(fast[0].layers[0].positions, np.flatnonzero(prep.is_image.numpy()))


def test_float64_text_only(adapter) -> None:
    target = adapter.tokenize(" image")[0]
    prep, _, _ = compare_with_naive(adapter, [], "Explain rotary embeddings.", "text", 2, 1e-9, 1e-6, logits=True,
                                    target=target)
    assert not prep.images and not prep.is_image.any()


@pytest.mark.parametrize("text_type", ["llama", "qwen3"])
def test_float64_other_text_decoders(tmp_path: Path, images, text_type: str) -> None:
    """InternVL2.5-2B/8B and InternVL3-9B carry a Llama text decoder (no q/k/v biases), InternVL3.5 a Qwen3
    one (per-head q/k norms)."""
    d = InternVLAdapter.write_tiny_model(tmp_path / f"internvl_{text_type}", seed=6, text_model_type=text_type,
                                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, hidden_size=48)
    a = load_model(str(d), torch.float64, "cpu")
    assert a.text_config.model_type == text_type and a.layers[0].self_attn.q_proj.bias is None
    assert (getattr(a.layers[0].self_attn, "q_norm", None) is not None) == (text_type == "qwen3")
    compare_with_naive(a, [images["tall"]], PROMPT, "both", 2, 1e-9, 1e-6, logits=True)


def test_make_tiny_model_cli(run_main, tmp_path: Path, images) -> None:
    code, _, err = run_main(["make-tiny-model", str(tmp_path / "m"), "--family", "internvl", "--layers", "2"])
    assert code == 0, err
    a = load_model(str(tmp_path / "m"))
    assert isinstance(a, InternVLAdapter) and a.num_layers == 2 and (a.num_heads, a.head_dim) == (4, 16)
    prep = a.prepare(PROMPT, [load_image(str(images["wide"]))], [None])
    _check_grids(a, prep)
