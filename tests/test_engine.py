"""The engine against the naive method: real transformers forwards with one attention entry masked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from maskvl.engine import Engine, SweepConfig
from maskvl.inputs import load_image
from maskvl.naive import naive_sweep, relative_l2_error
from naive_support import compare_with_naive

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mode", ["both"])
def test_float64_nonsquare_image_two_steps(adapter64, images, mode):
    prep, fast, worst = compare_with_naive(adapter64, [images["wide"]], "What is in this image?", mode, 2, 1e-9, 1e-6,
                                 logits=True)
    assert prep.images[0].grid_rows == 2 and prep.images[0].grid_cols == 3
    # Step 1 measures one more key than step 0, and `both` masks every position.
    assert len(fast[1].layers[0].positions) == len(fast[0].layers[0].positions) + 1 == prep.input_ids.shape[1] + 1


def test_float64_two_images_vision_mode(adapter64, images):
    prep, fast, _ = compare_with_naive(adapter64, [images["wide"], images["tall"]], "Compare the two pictures.", "vision",
                             2, 1e-9, 1e-6, logits=True, window=2)
    assert [(im.grid_rows, im.grid_cols) for im in prep.images] == [(2, 3), (4, 2)]
    assert len(fast[0].layers[0].positions) == 6 + 8


def test_float64_text_only(adapter64):
    target = adapter64.tokenize(" image")[0]
    prep, fast, _ = compare_with_naive(adapter64, [], "Explain what a rotary embedding is.", "text", 2, 1e-9, 1e-6,
                             logits=True, window=3, target=target)
    assert not prep.images and not bool(prep.is_image.any())


def test_float32_within_1e4(adapter32, images):
    compare_with_naive(adapter32, [images["tall"]], "What color is it?", "both", 2, 1e-4, 1e-2, layers=[0, 2])


def test_layer_subset_and_order(adapter64, images):
    imgs = [load_image(str(images["wide"]))]
    prep = adapter64.prepare("Hi", imgs, [None])
    res = list(Engine(adapter64, "reference").run(prep, SweepConfig(mask_mode="text", num_tokens=1, layers=[2, 0])))
    assert [lr.layer for lr in res[0].layers] == [0, 2]
    # text mode skips exactly the image pads
    assert not set(res[0].layers[0].positions.tolist()) & set(range(prep.images[0].token_start,
                                                                     prep.images[0].token_end))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_each_backend_equals_reference_on_builtin_model(backend):
    """End to end: the sweep with a compiled backend equals the reference backend (float64, Logits on)."""
    import torch

    from maskvl.models import BUILTIN_TINY, load_model
    from maskvl.ops.testing import compiled_backend

    be, _ = compiled_backend(backend)
    a = load_model(BUILTIN_TINY, torch.float64, "cpu")
    prep = a.prepare("What is in this picture?", [load_image(str(ROOT / "examples" / "sample.png"))], [None],
                     max_pixels=128 * 128)
    cfg = SweepConfig(mask_mode="both", num_tokens=2, logits=True, layers=[0, 3])
    ref = list(Engine(a, "reference").run(prep, cfg))
    got = list(Engine(a, be).run(prep, cfg))
    assert [r.generated_id for r in ref] == [g.generated_id for g in got]
    for r, g in zip(ref, got):
        for lr, lg in zip(r.layers, g.layers):
            for x, y in ((lr.l2, lg.l2), (lr.cos, lg.cos), (lr.kl[-1], lg.kl[-1]), (lr.tpd[-1], lg.tpd[-1])):
                assert relative_l2_error(y, x) <= 1e-10


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_each_backend_against_brute_force(adapter64, images, backend):
    from maskvl.ops.testing import compiled_backend

    be, _ = compiled_backend(backend)
    imgs = [load_image(str(images["tall"]))]
    prep = adapter64.prepare("Which way?", imgs, [None])
    fast = list(Engine(adapter64, be).run(prep, SweepConfig(mask_mode="both", num_tokens=1, logits=True,
                                                             layers=[1])))
    ref = naive_sweep(adapter64, prep, "both", 1, [1])
    lr = fast[0].layers[0]
    m = ref[0].logits_measures(1)
    assert relative_l2_error(lr.l2[:-1], ref[0].l2[1]) <= 1e-9
    assert relative_l2_error(lr.cos[:-1], ref[0].cos[1]) <= 1e-9
    assert relative_l2_error(lr.l2[-1], m["l2"]) <= 1e-9
    assert relative_l2_error(lr.kl[-1], m["kl"]) <= 1e-9
