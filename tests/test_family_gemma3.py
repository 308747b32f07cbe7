"""Gemma 3 with images (``gemma3``): a tiny random hub-like model written offline (SigLIP tower, 2 x 2
pooled soft tokens, Gemma 3's language model with local and global layers), the engine against the naive
oracle in float64 (one and two non-square images, text only, cpp/triton, pan-and-scan crops), the
tokenization against transformers' own Gemma3Processor, and the grids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskvl.errors import InputError
from maskvl.inputs import load_image
from maskvl.models import load_model
from maskvl.models.gemma3 import CHAT_TEMPLATE, Gemma3Adapter
from maskvl.naive import naive_sweep
from naive_support import assert_file_matches, cli_sweep_one_image, compare_with_naive
from text_family_support import outside_rows

# GQA 4:2, head_dim 24, hidden 40; layers 0 and 2 local (window 7), layer 1 global.
SHAPE = dict(num_layers=3, num_heads=4, num_kv_heads=2, head_dim=24, hidden_size=40, sliding_window=7)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Gemma3Adapter.write_tiny_model(tmp_path_factory.mktemp("models") / "gemma3", seed=3, **SHAPE)


@pytest.fixture(scope="module")
def adapter(model_dir: Path):
    return load_model(str(model_dir), torch.float64, "cpu")


@pytest.fixture(scope="module")
def pas_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model with pan-and-scan switched on in its image processor config."""
    d = tmp_path_factory.mktemp("models") / "gemma3-pas"
    shutil.copytree(model_dir, d)
    cfg_file = d / "preprocessor_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["do_pan_and_scan"] = True
    cfg_file.write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def big_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Images large enough for pan-and-scan's 256-pixel minimum crop: 1000x300 (3 crops, the last one
    narrower), 256x600 (2 crops), 300x300 (none)."""
    d = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(5)
    out = {}
    for name, (w, h) in {"wide3": (1000, 300), "tall2": (256, 600), "square": (300, 300)}.items():
        out[name] = d / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out[name])
    return out


def check_grids(prep) -> None:
    """Every grid cell is an image token, every image token is in exactly one grid; the base/image grid
    covers the whole image; the tiles cover [0, W] x [0, H] without gaps or overlaps."""
    is_image = prep.is_image.numpy()
    count = np.zeros(len(is_image), dtype=int)
    for im in prep.images:
        W, H = im.original_size
        assert im.grids[0].kind in ("image", "base")
        assert im.grids[0].box == (0.0, 0.0, float(W), float(H))
        assert (im.grid_rows, im.grid_cols) == (im.grids[0].rows, im.grids[0].cols)
        assert im.token_start == im.grids[0].token_start and im.token_end == im.grids[-1].token_end
        assert [g.token_start for g in im.grids] == sorted(g.token_start for g in im.grids)
        for g in im.grids:
            for p in g.positions():
                assert is_image[p], (im.index, g.kind, p)
                count[p] += 1
        tiles = [g for g in im.grids if g.kind == "tile"]
        assert (im.grids[0].kind == "base") == bool(tiles)
        if tiles:
            area = 0.0
            for t in tiles:
                x0, y0, x1, y1 = t.box
                assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
                area += (x1 - x0) * (y1 - y0)
            for i, a in enumerate(tiles):
                for b in tiles[i + 1:]:
                    ox = min(a.box[2], b.box[2]) - max(a.box[0], b.box[0])
                    oy = min(a.box[3], b.box[3]) - max(a.box[1], b.box[1])
                    assert ox <= 0 or oy <= 0, (a.box, b.box)
            assert area == W * H  # disjoint, inside, and as large as the image: they cover it
    assert (count[is_image] == 1).all() and (count[~is_image] == 0).all()


def test_directory_and_adapter(model_dir: Path, adapter) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
                 "processor_config.json"):
        assert (model_dir / name).exists(), name
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["model_type"] == "gemma3" and cfg["mm_tokens_per_image"] == 4
    assert isinstance(adapter, Gemma3Adapter) and adapter.has_attention_norm and adapter.supports_images
    assert type(adapter.image_processor).__name__ == "Gemma3ImageProcessorPil"
    assert [adapter.attention_window(i) for i in range(3)] == [7, None, 7]
    assert adapter.scale == pytest.approx(20 ** -0.5)
    # The projector is random (transformers initialises it to zeros).
    assert adapter.model.model.multi_modal_projector.mm_input_projection_weight.abs().min() > 0
    # Set in the tiny config, but Gemma3ForConditionalGeneration applies no final soft-capping: neither
    # does the adapter (the Logits comparisons below would catch it).
    assert adapter.text_config.final_logit_softcapping == 30.0


@pytest.mark.parametrize("pas", [False, True])
def test_prepare_equals_gemma3_processor(adapter, pas_dir: Path, big_images, pas: bool) -> None:
    """input_ids, token_type_ids and pixel_values are the HF processor's (its apply_chat_template, with
    do_pan_and_scan as the config says); the grids follow the soft-token runs."""
    from transformers import Gemma3Processor

    a = load_model(str(pas_dir), torch.float64, "cpu") if pas else adapter
    paths = [big_images["wide3"], big_images["tall2"], big_images["square"]]
    imgs = [load_image(str(p)) for p in paths]
    proc = Gemma3Processor(image_processor=a.image_processor, tokenizer=a.tokenizer, chat_template=CHAT_TEMPLATE,
                           image_seq_length=4)
    msgs = [{"role": "user", "content": [{"type": "image", "image": im} for im in imgs]
             + [{"type": "text", "text": "Compare them."}]}]
    want = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                    return_tensors="pt", processor_kwargs={"do_pan_and_scan": pas})
    prep = a.prepare("Compare them.", imgs, [str(p) for p in paths])
    assert torch.equal(prep.input_ids, want["input_ids"])
    assert torch.equal(prep.model_inputs["token_type_ids"], want["token_type_ids"])
    assert torch.equal(prep.model_inputs["pixel_values"], want["pixel_values"].to(torch.float64))
    check_grids(prep)
    kinds = [[g.kind for g in im.grids] for im in prep.images]
    if not pas:
        assert kinds == [["image"]] * 3 and int(prep.is_image.sum()) == 3 * 4
        return
    assert kinds == [["base", "tile", "tile", "tile"], ["base", "tile", "tile"], ["image"]]
    assert [g.box for g in prep.images[0].grids[1:]] == [(0, 0, 334, 300), (334, 0, 668, 300), (668, 0, 1000, 300)]
    assert [g.box for g in prep.images[1].grids[1:]] == [(0, 0, 256, 300), (0, 300, 256, 600)]
    # Soft tokens only are image-kind: <start_of_image>/<end_of_image> and the newlines are text.
    boi, eoi = a.tokenizer.convert_tokens_to_ids(["<start_of_image>", "<end_of_image>"])
    ids = prep.input_ids[0]
    for im in prep.images:
        for g in im.grids:
            assert ids[g.token_start - 1] == boi and ids[g.token_end] == eoi
    assert not prep.is_image[(ids == boi) | (ids == eoi)].any()


def test_float64_one_image_every_variant_two_steps(adapter, images, run_main, model_dir: Path, tmp_path: Path) -> None:
    imgs = [images["wide"]]
    prep = adapter.prepare("What is in this image?", [load_image(str(p)) for p in imgs], [str(p) for p in imgs])
    ref = naive_sweep(adapter, prep, "both", 2, None)
    prep, fast, worst = compare_with_naive(adapter, imgs, "What is in this image?", "both", 2, 1e-9, 1e-6,
                                           logits=True, ref=ref)
    print(f"Gemma3Adapter: worst relative error vs the naive oracle {worst:.2e}")
    check_grids(prep)
    assert [(g.kind, g.rows, g.cols, g.box) for g in prep.images[0].grids] == [("image", 2, 2, (0, 0, 96, 64))]
    S = prep.input_ids.shape[1]
    assert S > 7 + 2 and [len(f.layers[0].positions) for f in fast] == [S, S + 1]
    # Keys before a local layer's window: exact zeros in the engine and the oracle (the image tokens among them).
    n_layer, _ = outside_rows(adapter, fast, ref, 1)
    assert n_layer > 0
    # The command line on the same directory writes what the engine computed, with the grids.
    out = tmp_path / "cli.parquet"
    md = cli_sweep_one_image(run_main, model_dir, images["wide"], out)
    assert md["complete"] and [(g["grid_rows"], g["grid_cols"]) for g in md["images"]] == [(2, 2)]
    assert md["images"][0]["grids"] == [g.to_dict() for g in prep.images[0].grids]
    assert md["attention_windows"] == [7, None, 7]
    assert_file_matches(out, fast)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_float64_backends_against_naive(adapter, images, backend: str) -> None:
    from maskvl.ops.testing import compiled_backend

    be, _ = compiled_backend(backend)
    # Layer 1 (global) with Logits: the masked rows go on through the local layer 2.
    compare_with_naive(adapter, [images["tall"]], "Which way?", "both", 2, 1e-9, 1e-6, logits=True, layers=[1],
                       backend=be)


def test_float64_two_images_vision_mode(adapter, images) -> None:
    prep, fast, _ = compare_with_naive(adapter, [images["wide"], images["tall"]], "Compare them.", "vision", 2, 1e-9,
                                       1e-6, logits=True, window=2)
    check_grids(prep)
    assert [im.original_size for im in prep.images] == [(96, 64), (64, 128)]
    assert [[(g.kind, g.box) for g in im.grids] for im in prep.images] == [[("image", (0, 0, 96, 64))],
                                                                          [("image", (0, 0, 64, 128))]]
    assert len(fast[0].layers[0].positions) == 4 + 4
    # At the local layers 0 and 2 every image token is before the final query's window (7 keys): all rows
    # are exact zeros there (the engine measures no key at all: an empty batch), also the Logits row of layer 2
    # (its knockout window ends there); layer 1 (global) sees them, and so does layer 0's Logits row.
    for f in fast:
        assert f.seq_len - 7 > max(im.token_end for im in prep.images)
        assert (f.layers[0].l2[:-1] == 0).all() and (f.layers[2].l2 == 0).all() and (f.layers[1].l2 > 0).all()


def test_float64_pan_and_scan_vision_mode(pas_dir: Path, big_images) -> None:
    a = load_model(str(pas_dir), torch.float64, "cpu")
    prep, fast, worst = compare_with_naive(a, [big_images["wide3"]], "Read it.", "vision", 2, 1e-9, 1e-6,
                                           logits=True, layers=[0, 1])
    print(f"Gemma3Adapter pan-and-scan: worst relative error vs the naive oracle {worst:.2e}")
    check_grids(prep)
    assert [g.kind for g in prep.images[0].grids] == ["base", "tile", "tile", "tile"]
    assert len(fast[0].layers[0].positions) == 4 * 4


def test_float64_text_only(adapter) -> None:
    target = adapter.tokenize(" image")[0]
    prep, _, _ = compare_with_naive(adapter, [], "Explain rotary embeddings.", "text", 2, 1e-9, 1e-6, logits=True,
                                    target=target)
    assert not prep.images and "token_type_ids" not in prep.model_inputs


def test_image_block_is_bidirectional(adapter, images) -> None:
    """The clean pass is the model's own forward with token_type_ids: image tokens see their whole block.
    Without them the cached keys of the image block differ (so the oracle agreement above depends on it)."""
    prep = adapter.prepare("What is in this image?", [load_image(str(images["wide"]))], [None])
    cache = adapter.new_cache()
    cap = adapter.prefill(prep, cache)
    with torch.no_grad():
        own = adapter.model(input_ids=prep.input_ids, **prep.model_inputs).logits[0, -1]
    torch.testing.assert_close(cap.logits, own, rtol=1e-12, atol=1e-12)
    inputs = {k: v for k, v in prep.model_inputs.items() if k != "token_type_ids"}
    causal = adapter.new_cache()
    with torch.no_grad():
        adapter.model(input_ids=prep.input_ids, past_key_values=causal, use_cache=True, **inputs)
    first = int(torch.nonzero(prep.is_image)[0])
    k_bi, _ = adapter.kv(cache, 1)
    k_c, _ = adapter.kv(causal, 1)
    assert torch.equal(k_bi[:first], k_c[:first])
    assert not torch.allclose(k_bi[first:first + 3], k_c[first:first + 3])


def test_bad_inputs(adapter, images) -> None:
    img = load_image(str(images["wide"]))
    with pytest.raises(InputError, match="max_pixels"):
        adapter.prepare("Hi", [img], [None], max_pixels=1000)
    with pytest.raises(InputError, match="start_of_image"):
        adapter.prepare("Look <start_of_image> here", [img], [None])
    with pytest.raises(InputError, match="image_soft_token"):
        adapter.prepare("Look <image_soft_token> here", [], [])
    assert adapter.prepare("Hi", [img], [None], max_pixels=64 * 64).images[0].resized_size == (64, 64)


def test_make_tiny_model_cli(run_main, tmp_path: Path) -> None:
    code, _, err = run_main(["make-tiny-model", str(tmp_path / "m"), "--family", "gemma3", "--layers", "2",
                             "--heads", "4", "--kv-heads", "1", "--head-dim", "8", "--hidden", "32"])
    assert code == 0, err
    a = load_model(str(tmp_path / "m"))
    assert isinstance(a, Gemma3Adapter) and (a.num_layers, a.num_heads, a.num_kv_heads, a.head_dim) == (2, 4, 1, 8)
    assert [a.attention_window(i) for i in range(2)] == [6, None]
