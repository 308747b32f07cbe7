"""Idefics3 and SmolVLM: tiny random hub-like models written offline (Llama decoder, SigLIP-style tower on 32 px
sub-images, patch 8, pixel shuffle 2 -> 4 tokens per sub-image; the processor resizes to 96 px and tiles by
32 px, so the 96x64 image is 2 x 3 tiles plus the global image). The inputs against transformers' own
processor code, the grids (tiles and thumbnail) with their boxes, and the engine against the naive oracle
(transformers' forward with one attention entry removed) in float64, every backend, one and two non-square
images and text only; the command line for both model types."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from maskvl.inputs import load_image
from maskvl.models import load_model
from maskvl.models.idefics3 import Idefics3Adapter, SmolVLMAdapter
from naive_support import assert_file_matches, cli_sweep_one_image, compare_with_naive

FAMILIES = {"idefics3": Idefics3Adapter, "smolvlm": SmolVLMAdapter}
# GQA 6:2, head_dim 12 with hidden 48 (not heads x head_dim: Llama's o_proj maps 72 -> 48).
SHAPE = dict(num_layers=3, num_heads=6, num_kv_heads=2, head_dim=12, hidden_size=48, intermediate_size=80)
PROMPT = "What is in this image?"


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: cls.write_tiny_model(root / name, seed=3, **SHAPE) for name, cls in FAMILIES.items()}


@pytest.fixture(scope="module")
def adapters(model_dirs) -> dict[str, object]:
    return {name: load_model(str(path), torch.float64, "cpu") for name, path in model_dirs.items()}


@pytest.fixture(scope="module")
def adapter(adapters, family):
    return adapters[family]


def _pil(paths):
    return [load_image(str(p)) for p in paths]


def check_grids(prep) -> None:
    """Grids are image-kind, every image-kind position is in exactly one grid, tiles cover the image without
    gaps or overlaps, the thumbnail is the whole image, the separators are text-kind."""
    S = prep.input_ids.shape[1]
    counts = np.zeros(S, dtype=int)
    for im in prep.images:
        W, H = im.original_size
        assert (im.grid_rows, im.grid_cols) == (im.grids[0].rows, im.grids[0].cols)
        for g in im.grids:
            pos = g.positions()
            assert prep.is_image[pos].all()
            assert im.token_start <= min(pos) and max(pos) < im.token_end
            counts[pos] += 1
        tiles = [g.box for g in im.grids if g.kind == "tile"]
        rest = [g for g in im.grids if g.kind != "tile"]
        assert len(rest) == 1 and rest[0] is im.grids[-1]  # the global image comes last
        assert rest[0].box == (0.0, 0.0, float(W), float(H))
        assert rest[0].kind == ("thumbnail" if tiles else "image")
        if tiles:
            for x0, y0, x1, y1 in tiles:
                assert 0 <= x0 < x1 <= W + 1e-9 and 0 <= y0 < y1 <= H + 1e-9
            area = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in tiles)
            assert area == pytest.approx(W * H, rel=1e-12)
            for i, a in enumerate(tiles):
                for b in tiles[i + 1:]:
                    overlap = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
                    assert overlap <= 1e-9
        # Markers and newlines inside the image's span are text-kind.
        span = prep.is_image[im.token_start:im.token_end]
        assert int(span.sum()) == sum(g.rows * g.cols for g in im.grids) < len(span)
    assert (counts == prep.is_image.numpy().astype(int)).all()
    assert counts.max(initial=0) <= 1


def hf_inputs(adapter, images, prompt: str, **image_kwargs):
    """What transformers' own processor gives: Idefics3Processor itself; for SmolVLM (whose processor needs
    torchvision for its video processor) its replace_image_token on the image processor's output and the
    shared ProcessorMixin text expansion, tokenized as its apply_chat_template does (no BOS added twice)."""
    tok = adapter.tokenizer
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    add = not text.startswith(tok.bos_token)
    if isinstance(adapter, SmolVLMAdapter):
        from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor

        if not images:
            return tok(text, add_special_tokens=add, return_tensors="pt"), None
        out = adapter.image_processor(images, return_tensors="pt", return_row_col_info=True, **image_kwargs)
        this = types.SimpleNamespace(
            image_seq_len=adapter.image_seq_len,
            fake_image_token=getattr(tok, "fake_image_token", "<fake_token_around_image>"),
            image_token=getattr(tok, "image_token", "<image>"),
            global_image_token=getattr(tok, "global_image_token", "<global-img>"))
        reps = [SmolVLMProcessor.replace_image_token(this, out, i) for i in range(len(images))]
        pieces = text.split(this.image_token)
        text = pieces[0] + "".join(r + pieces[i + 1] for i, r in enumerate(reps))
        return tok(text, add_special_tokens=add, return_tensors="pt"), out
    from transformers import Idefics3Processor

    proc = Idefics3Processor(adapter.image_processor, tok, image_seq_len=adapter.image_seq_len)
    kw = {"images_kwargs": image_kwargs} if image_kwargs else {}
    out = proc(text=text, images=images or None, return_tensors="pt", add_special_tokens=add, **kw)
    return out, (out if images else None)


@pytest.mark.parametrize("which", [["wide"], ["wide", "tall"], []])
def test_inputs_as_transformers_processor(adapter, images, which) -> None:
    paths = [images[w] for w in which]
    imgs = _pil(paths)
    prep = adapter.prepare(PROMPT, imgs, [str(p) for p in paths])
    text_ids, pix = hf_inputs(adapter, imgs, PROMPT)
    assert torch.equal(prep.input_ids, text_ids["input_ids"])
    if pix is not None:
        assert torch.equal(prep.model_inputs["pixel_values"], pix["pixel_values"].to(torch.float64))
        assert torch.equal(prep.model_inputs["pixel_attention_mask"], pix["pixel_attention_mask"])
    else:
        assert prep.model_inputs == {} and not prep.is_image.any()
    check_grids(prep)
    # Layout: 96x64 -> 96x64 canvas, 2 x 3 tiles; 64x128 -> 64x96 canvas, 3 x 2 tiles.
    layouts = {"wide": ((96, 64), 6), "tall": ((64, 96), 6)}
    for im, w in zip(prep.images, which):
        assert im.resized_size == layouts[w][0]
        assert [g.kind for g in im.grids] == ["tile"] * layouts[w][1] + ["thumbnail"]
        assert all((g.rows, g.cols, g.row_stride) == (2, 2, 2) for g in im.grids)
    if which == ["wide", "tall"]:
        tall = prep.images[1]
        assert [g.box for g in tall.grids[:2]] == [(0.0, 0.0, 32.0, 128 / 3), (32.0, 0.0, 64.0, 128 / 3)]
        assert tall.grids[-2].box == (32.0, 256 / 3, 64.0, 128.0)


def test_max_pixels_and_single_global_image(adapter, images) -> None:
    """max_pixels lowers the processor's resize; at one tile's size the image is only the global part
    (one grid of kind image), as the processor writes it."""
    img = _pil([images["wide"]])
    prep = adapter.prepare(PROMPT, img, [None], max_pixels=64 * 64 + 5)  # longest edge 64: 64x42 -> 2 x 2 tiles
    ids, pix = hf_inputs(adapter, img, PROMPT, size={"longest_edge": 64})
    assert torch.equal(prep.input_ids, ids["input_ids"])
    assert torch.equal(prep.model_inputs["pixel_values"], pix["pixel_values"].to(torch.float64))
    assert prep.images[0].resized_size == (64, 64) and len(prep.images[0].grids) == 5
    check_grids(prep)
    prep = adapter.prepare(PROMPT, img, [None], max_pixels=100)  # at least one tile: 32 px
    ids, _ = hf_inputs(adapter, img, PROMPT, size={"longest_edge": 32})
    assert torch.equal(prep.input_ids, ids["input_ids"])
    im = prep.images[0]
    assert [g.kind for g in im.grids] == ["image"] and im.resized_size == (32, 32)
    assert prep.is_image.sum() == 4 and im.token_end - im.token_start == 4 + 3
    check_grids(prep)


def test_float64_one_image_every_variant_two_steps(adapter, family, images, run_main, model_dirs, capsys,
                                                   tmp_path: Path) -> None:
    prep, fast, worst = compare_with_naive(adapter, [images["wide"]], PROMPT, "both", 2, 1e-9, 1e-6, logits=True)
    with capsys.disabled():  # run_main captures the output
        print(f"{type(adapter).__name__}: worst relative error vs the naive oracle {worst:.2e}")
    assert [len(f.layers[0].positions) for f in fast] == [prep.input_ids.shape[1], prep.input_ids.shape[1] + 1]
    check_grids(prep)
    # The command line on the same directory writes what the engine computed, with the grids.
    out = tmp_path / "cli.parquet"
    md = cli_sweep_one_image(run_main, model_dirs[family], images["wide"], out, prompt=PROMPT)
    assert md["complete"]
    assert md["images"] == [im.to_dict() for im in prep.images]
    grids = md["images"][0]["grids"]
    assert [g["kind"] for g in grids] == ["tile"] * 6 + ["thumbnail"]
    assert grids[4]["box"] == [32.0, 32.0, 64.0, 64.0] and grids[-1]["box"] == [0.0, 0.0, 96.0, 64.0]
    assert_file_matches(out, fast)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_float64_backends_against_naive(adapters, images, backend: str) -> None:
    from maskvl.ops.testing import compiled_backend

    be, _ = compiled_backend(backend)
    for name, adapter in adapters.items():
        # Layer 0 with Logits: the masked rows go on through layers 1 and 2.
        compare_with_naive(adapter, [images["tall"]], "Which way?", "both", 2, 1e-9, 1e-6, logits=True, layers=[0],
                           backend=be)


def test_float64_two_images_vision_mode(adapter, images) -> None:
    prep, fast, _ = compare_with_naive(adapter, [images["wide"], images["tall"]], "Compare them.", "vision", 2, 1e-9,
                                       1e-6, logits=True, window=2)
    assert [len(im.grids) for im in prep.images] == [7, 7]
    assert len(fast[0].layers[0].positions) == 2 * 7 * 4
    np.testing.assert_array_equal(fast[0].layers[0].positions, torch.nonzero(prep.is_image).flatten().numpy())
    check_grids(prep)


def test_float64_text_only(adapter) -> None:
    target = adapter.tokenize(" image")[0]
    prep, _, _ = compare_with_naive(adapter, [], "Explain rotary embeddings.", "text", 2, 1e-9, 1e-6, logits=True,
                                    target=target)
    assert not prep.images


def test_float32_within_1e4(model_dirs, images) -> None:
    a32 = load_model(str(model_dirs["smolvlm"]), torch.float32, "cpu")
    compare_with_naive(a32, [images["tall"]], "What color is it?", "both", 2, 1e-4, 1e-2, layers=[0, 2])


def test_stop_tokens_and_markers(adapter, family) -> None:
    tok = adapter.tokenizer
    assert tok.convert_tokens_to_ids("<end_of_utterance>") in adapter.stop_token_ids()
    assert adapter.image_seq_len == 4 and adapter.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert json.loads((Path(adapter.model.name_or_path) / "processor_config.json").read_text())["image_seq_len"] == 4
    start = {"idefics3": "<|begin_of_text|>", "smolvlm": "<|im_start|>"}[family]
    assert adapter.prepare("Hi", [], []).prompt_text == f"{start}User: Hi<end_of_utterance>\nAssistant:"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_make_tiny_model_cli(run_main, tmp_path: Path, name: str) -> None:
    code, _, err = run_main(["make-tiny-model", str(tmp_path / "m"), "--family", name, "--layers", "2"])
    assert code == 0, err
    a = load_model(str(tmp_path / "m"))
    assert isinstance(a, FAMILIES[name]) and type(a) is FAMILIES[name] and a.num_layers == 2
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.hidden_size) == (4, 2, 16, 64)
