"""LLaVA-OneVision: a tiny random hub-like model written offline (Qwen2 decoder, SigLIP tower of 32 px views in
8 px patches, tiny pinpoints), the engine against the naive oracle (transformers' own forward with one
attention entry removed) in float64, every backend, one and two non-square images and text only; the
prompt and pixels against transformers' own LlavaOnevisionProcessor; the grids (base view, tiles of the
unpadded canvas with the newline stride, boxes covering the image), also for a canvas the model shrinks."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from maskvl.errors import InputError, ModelLoadError
from maskvl.inputs import load_image
from maskvl.models import load_model
from maskvl.models.llava_onevision import LlavaOnevisionAdapter, _unpad
from naive_support import assert_file_matches, cli_sweep_one_image, compare_with_naive

# GQA 6:2, head_dim 12, hidden 56 (q width 72 != hidden), three layers.
SHAPE = dict(num_layers=3, num_heads=6, num_kv_heads=2, head_dim=12, hidden_size=56, intermediate_size=80)
SIDE = 4  # 32 px views / 8 px patches
# With the tiny pinpoints the wide 96x64 image goes into 1x2 tiles of 32 px (a 4x8 canvas, unpadded to 4x6),
# the tall 64x128 into 2x1 tiles (an 8x4 canvas, nothing to unpad).
CANVAS = {"wide": (4, 6), "tall": (8, 4)}
TILES = {"wide": [(4, 3), (4, 3)], "tall": [(4, 4), (4, 4)]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return LlavaOnevisionAdapter.write_tiny_model(tmp_path_factory.mktemp("models") / "llava_onevision", seed=3,
                                                  **SHAPE)


@pytest.fixture(scope="module")
def adapter(model_dir: Path):
    return load_model(str(model_dir), torch.float64, "cpu")


def check_grids(prep, image_paths) -> None:
    """Every grid cell is an image-kind position, every image-kind position is in exactly one grid, the
    positions of an image's range outside its grids are text-kind separators (the newlines), the base view's
    box is the whole image and the tile boxes cover it without gaps or overlaps (pixel centres)."""
    S = prep.input_ids.shape[1]
    count = np.zeros(S, np.int64)
    for im, path in zip(prep.images, image_paths):
        w, h = im.original_size
        assert (w, h) == load_image(str(path)).size
        inside = np.zeros(S, bool)
        for g in im.grids:
            pos = g.positions()
            assert len(pos) == g.rows * g.cols and min(pos) >= im.token_start and max(pos) < im.token_end
            assert prep.is_image[pos].all()
            count[pos] += 1
            inside[pos] = True
        span = np.arange(im.token_start, im.token_end)
        seps = span[~inside[span]]
        # The separators carry the image token id (the model writes image_newline there) but are text-kind.
        assert (prep.input_ids[0, seps] == prep_image_token(prep)).all() and not prep.is_image[seps].any()
        kinds = [g.kind for g in im.grids]
        if kinds[0] == "base":
            assert im.grids[0].box == (0.0, 0.0, float(w), float(h)) and set(kinds[1:]) == {"tile"}
            tiles = im.grids[1:]
            # One newline after every canvas row: the rows of the tiles in the first tile column.
            first_col = [g for g in tiles if (g.token_start - tiles[0].token_start) % g.row_stride == 0]
            assert len(seps) == sum(g.rows for g in first_col)
            assert all(p + 1 - tiles[0].token_start in range(0, 10**6, tiles[0].row_stride) for p in seps)
            ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
            hits = np.zeros((h, w), np.int64)
            for g in tiles:
                x0, y0, x1, y1 = g.box
                hits += (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
            assert (hits == 1).all(), "tile boxes must cover the image exactly once"
            assert [g.token_start for g in im.grids] == sorted(g.token_start for g in im.grids)
        else:
            assert kinds == ["image"] and len(seps) == 1 and seps[0] == im.token_end - 1
            x0, y0, x1, y1 = im.grids[0].box
            assert x0 <= 0 and y0 <= 0 and x1 >= w and y1 >= h and x1 - x0 == y1 - y0  # the square padding
    assert (count <= 1).all()
    np.testing.assert_array_equal(count.astype(bool), prep.is_image.numpy())


def prep_image_token(prep) -> int:
    return int(prep.input_ids[0, prep.images[0].token_start])


def test_directory_config_defaults_and_processor(model_dir: Path, adapter, images, monkeypatch) -> None:
    """The hub-like directory; the config's SigLIP defaults (strategy "full", feature layer -1); the prompt,
    pixels and image sizes equal to transformers' LlavaOnevisionProcessor's chat-template path."""
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
                 "processor_config.json", "chat_template.json"):
        assert (model_dir / name).exists(), name
    cfg = adapter.model.config
    assert cfg.model_type == "llava_onevision" and isinstance(adapter, LlavaOnevisionAdapter)
    assert (cfg.vision_feature_select_strategy, cfg.vision_feature_layer) == ("full", -1)
    assert type(adapter.model.model.vision_tower).__name__ == "SiglipVisionModel"
    assert type(adapter.image_processor).__name__ == "LlavaOnevisionImageProcessorPil"
    attn = adapter.layers[0].self_attn
    assert attn.q_proj.bias is not None and adapter.head_dim == 12 and adapter.hidden_size == 56

    from transformers import LlavaOnevisionProcessor
    from transformers.processing_utils import ProcessorMixin

    # The processor's constructor insists on a video processor class (which needs torchvision).
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
    proc = LlavaOnevisionProcessor(image_processor=adapter.image_processor, tokenizer=adapter.tokenizer,
                                   video_processor=None, num_image_tokens=SIDE * SIDE,
                                   vision_feature_select_strategy="full", chat_template=adapter.tokenizer.chat_template)
    for names in (["wide"], ["tall"], ["wide", "tall"]):
        pil = [load_image(str(images[n])) for n in names]
        prep = adapter.prepare("What is in this image?", pil, [None] * len(pil))
        msg = [{"role": "user", "content": [{"type": "image"} for _ in pil]
                + [{"type": "text", "text": "What is in this image?"}]}]
        text = proc.apply_chat_template(msg, add_generation_prompt=True, tokenize=False)
        want = proc(images=[pil], text=text, return_tensors="pt")
        assert torch.equal(want["input_ids"], prep.input_ids)
        assert torch.equal(want["pixel_values"].to(torch.float64), prep.model_inputs["pixel_values"])
        assert torch.equal(want["image_sizes"], prep.model_inputs["image_sizes"])
        assert want["batch_num_images"].tolist() == prep.model_inputs["batch_num_images"].tolist() == [len(pil)]


def test_float64_one_image_every_variant_two_steps(adapter, images, run_main, model_dir: Path, tmp_path: Path) -> None:
    prep, fast, worst = compare_with_naive(adapter, [images["wide"]], "What is in this image?", "both", 2, 1e-9, 1e-6,
                                           logits=True)
    print(f"LlavaOnevisionAdapter: worst relative error vs the naive oracle {worst:.2e}")
    im = prep.images[0]
    rows, cols = CANVAS["wide"]
    assert [(g.kind, g.rows, g.cols, g.row_stride) for g in im.grids] == \
        [("base", SIDE, SIDE, SIDE)] + [("tile", r, c, cols + 1) for r, c in TILES["wide"]]
    assert im.token_end - im.token_start == SIDE * SIDE + rows * (cols + 1)
    # The 96x64 image resized into 64x32 px keeping its aspect (64x43, padded above and below by 8 px = one
    # feature row; the unpadding cuts one feature column each side of the 8-column canvas instead: the
    # image's aspect 1.5 is below the canvas' 2): the two tiles cover the left and right halves.
    assert [g.box for g in im.grids[1:]] == [(0.0, 0.0, 48.0, 64.0), (48.0, 0.0, 96.0, 64.0)]
    assert im.grids[2].token_start == im.grids[1].token_start + 3
    check_grids(prep, [images["wide"]])
    assert [len(f.layers[0].positions) for f in fast] == [prep.input_ids.shape[1], prep.input_ids.shape[1] + 1]
    # The command line on the same directory writes what the engine computed, and the grids.
    out = tmp_path / "cli.parquet"
    md = cli_sweep_one_image(run_main, model_dir, images["wide"], out)
    assert md["complete"] and md["images"][0]["grids"] == [g.to_dict() for g in im.grids]
    assert_file_matches(out, fast)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_float64_backends_against_naive(adapter, images, backend: str) -> None:
    from maskvl.ops.testing import compiled_backend

    be, _ = compiled_backend(backend)
    # Layer 0 with Logits: the masked rows go on through layers 1 and 2.
    prep, _, _ = compare_with_naive(adapter, [images["tall"]], "Which way?", "both", 2, 1e-9, 1e-6, logits=True,
                                    layers=[0], backend=be)
    im = prep.images[0]
    rows, cols = CANVAS["tall"]
    assert [(g.kind, g.rows, g.cols, g.row_stride) for g in im.grids] == \
        [("base", SIDE, SIDE, SIDE)] + [("tile", r, c, cols + 1) for r, c in TILES["tall"]]
    assert [g.box for g in im.grids[1:]] == [(0.0, 0.0, 64.0, 64.0), (0.0, 64.0, 64.0, 128.0)]
    check_grids(prep, [images["tall"]])


def test_float64_two_images_vision_mode(adapter, images) -> None:
    """Several images in one prompt: each a single view of its square-padded image plus one newline."""
    paths = [images["wide"], images["tall"]]
    prep, fast, _ = compare_with_naive(adapter, paths, "Compare them.", "vision", 2, 1e-9, 1e-6, logits=True,
                                       window=2)
    assert [[(g.kind, g.rows, g.cols) for g in im.grids] for im in prep.images] == [[("image", SIDE, SIDE)]] * 2
    assert [im.grids[0].box for im in prep.images] == [(0.0, -16.0, 96.0, 80.0), (-32.0, 0.0, 96.0, 128.0)]
    assert [im.token_end - im.token_start for im in prep.images] == [SIDE * SIDE + 1] * 2
    assert len(fast[0].layers[0].positions) == 2 * SIDE * SIDE
    check_grids(prep, paths)


def test_float64_text_only(adapter) -> None:
    target = adapter.tokenize(" image")[0]
    prep, _, _ = compare_with_naive(adapter, [], "Explain rotary embeddings.", "text", 2, 1e-9, 1e-6, logits=True,
                                    target=target)
    assert not prep.images and not prep.model_inputs
    assert prep.prompt_text == "<|im_start|>user \nExplain rotary embeddings.<|im_end|><|im_start|>assistant\n"


def test_shrunk_canvas_grids_and_oracle(model_dir: Path, images) -> None:
    """A canvas beyond vision_aspect_ratio's tile budget is shrunk bilinearly by the model: the grids follow the
    shrunk cells (each in the tile its centre falls in), the token count is the model's, the boxes still
    cover the image; the engine agrees with the oracle there too."""
    a = load_model(str(model_dir), torch.float64, "cpu")
    a.model.config.vision_aspect_ratio = "anyres_max_1"  # one tile's worth: the 8x4 canvas shrinks to 5x2
    prep, _, _ = compare_with_naive(a, [images["tall"]], "Which way?", "vision", 1, 1e-9, 1e-6, logits=True,
                                    layers=[1])
    im = prep.images[0]
    assert [(g.kind, g.rows, g.cols, g.row_stride) for g in im.grids] == \
        [("base", SIDE, SIDE, SIDE), ("tile", 2, 2, 3), ("tile", 3, 2, 3)]
    # Shrunk rows are 8/5 canvas rows (12.8 px of the 128 px image) each; the first two belong to the top tile.
    assert [g.box for g in im.grids[1:]] == [(0.0, 0.0, 64.0, 51.2), (0.0, 51.2, 64.0, 128.0)]
    check_grids(prep, [images["tall"]])


def test_refused_inputs_and_configs(model_dir: Path, adapter, images, tmp_path: Path) -> None:
    pil = [load_image(str(images["wide"]))]
    with pytest.raises(InputError, match="max_pixels"):
        adapter.prepare("Hi", pil, [None], max_pixels=4096)
    with pytest.raises(InputError, match="1 image slots for 0 images"):
        adapter.prepare("Look: <image>", [], [])
    # "default" drops the first feature as a CLS token; SigLIP has none, so the anyres canvas cannot be packed.
    from transformers import LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    model.config.vision_feature_select_strategy = "default"
    with pytest.raises(ModelLoadError, match="vision_feature_select_strategy"):
        LlavaOnevisionAdapter.from_loaded(model, adapter.tokenizer, adapter.image_processor)
    # A checkpoint whose tokenizer has no chat template (the hub keeps it in chat_template.json).
    copy = tmp_path / "no-tokenizer-template"
    shutil.copytree(model_dir, copy)
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    tc = json.loads((copy / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(tc))
    a = load_model(str(copy), torch.float32, "cpu")
    assert a.tokenizer.chat_template == adapter.tokenizer.chat_template
    assert torch.equal(a.prepare("Hi", pil, [None]).input_ids, adapter.prepare("Hi", pil, [None]).input_ids)


def test_make_tiny_model_cli(run_main, tmp_path: Path) -> None:
    code, _, err = run_main(["make-tiny-model", str(tmp_path / "m"), "--family", "llava_onevision", "--layers", "2"])
    assert code == 0, err
    a = load_model(str(tmp_path / "m"))
    assert isinstance(a, LlavaOnevisionAdapter) and a.num_layers == 2 and (a.num_heads, a.head_dim) == (4, 16)


def test_hub_geometry_token_counts_and_boxes() -> None:
    """The hub's geometry (384 px views in 14 px patches: 27x27 features, pinpoints up to 6x6 tiles,
    anyres_max_9) without a model: every image's token count equals LlavaOnevisionProcessor's, including
    canvases the model shrinks; the tile boxes tile the canvas (shared edges, no overlap) and reach the
    image's edges up to less than one feature cell (the unpadding's truncation)."""
    import types

    from transformers import LlavaOnevisionConfig
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    cfg = LlavaOnevisionConfig()
    fake = types.SimpleNamespace(model=types.SimpleNamespace(config=cfg), side=27, tile=384)
    proc = object.__new__(LlavaOnevisionProcessor)  # only its token-count arithmetic is used
    proc.image_processor = types.SimpleNamespace(image_grid_pinpoints=cfg.image_grid_pinpoints)
    proc.num_image_tokens, proc.vision_aspect_ratio = 27 * 27, "anyres_max_9"
    rng = np.random.default_rng(0)
    sizes = [tuple(int(v) for v in s) for s in rng.integers(20, 4000, (150, 2))]
    sizes += [(640, 480), (1920, 1080), (100, 3000), (3000, 100), (384, 384), (768, 383), (20, 20)]
    shrunk = 0
    for w, h in sizes:
        grids, n, (bw, bh) = LlavaOnevisionAdapter._anyres_grids(fake, 0, w, h)
        assert n == proc._get_number_of_features(h, w, 384, 384), (w, h)
        tiles = grids[1:]
        stride = tiles[0].row_stride
        rows = sum(g.rows for g in tiles if (g.token_start - tiles[0].token_start) % stride == 0)
        assert n == 27 * 27 + rows * stride
        _, _, hu, wu = _unpad(h, w, bh // 384 * 27, bw // 384 * 27)
        shrunk += (rows, stride - 1) != (hu, wu)  # the model shrank the unpadded canvas
        # Cells: each canvas position in exactly one tile.
        cells = sorted(p for g in tiles for p in g.positions())
        assert cells == [27 * 27 + r * stride + c for r in range(rows) for c in range(stride - 1)]
        # Boxes: a product of column edges and row edges, meeting exactly.
        xs = sorted({(g.box[0], g.box[2]) for g in tiles})
        ys = sorted({(g.box[1], g.box[3]) for g in tiles})
        assert all(a[1] == b[0] for a, b in zip(xs, xs[1:])) and all(a[1] == b[0] for a, b in zip(ys, ys[1:]))
        assert len(tiles) == len(xs) * len(ys)
        cell_w, cell_h = 14 * w / min(bw, math.ceil(w * bh / h)), 14 * h / min(bh, math.ceil(h * bw / w))
        assert xs[0][0] < cell_w and xs[-1][1] > w - cell_w and ys[0][0] < cell_h and ys[-1][1] > h - cell_h
    assert shrunk > 10


def test_api_with_a_loaded_model(model_dir: Path, adapter, images) -> None:
    """An already-loaded transformers model with its tokenizer and image processor gives the adapter's rows."""
    import maskvl
    from transformers import LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    t = maskvl.sweep(model, [images["tall"]], "Which way?", mask_mode="vision", layers="2",
                     tokenizer=adapter.tokenizer, image_processor=adapter.image_processor)
    ref = maskvl.sweep(adapter, [images["tall"]], "Which way?", mask_mode="vision", layers="2")
    assert t.table.column("l2_distance").to_pylist() == ref.table.column("l2_distance").to_pylist()
    # Every variant (Full, Attn, six heads) at each image cell of the base view and the 8x4 canvas.
    assert len(t.table) == 8 * (SIDE * SIDE + 8 * 4)
    assert sorted(set(t.table.column("grid_index").to_pylist())) == [0, 1, 2]
