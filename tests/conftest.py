"""Shared fixtures: a tiny hub-like Qwen3-VL directory (not the built-in one) and test images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # `make gpu-check` selects these with -m cuda; without CUDA they skip (or, for the Triton op
    # tests, run under the Triton interpreter).
    config.addinivalue_line("markers", "cuda: runs on a CUDA device when there is one (make gpu-check)")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # The built-in model is built into MASKVL_CACHE on first use; keep tests off the user's cache.
    os.environ.setdefault("MASKVL_CACHE", str(tmp_path_factory.mktemp("maskvl-cache")))
    yield


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen3-VL checkpoint directory with odd shapes: GQA 6:2, head_dim 24, hidden 40.

    Its image processor keeps the hub's settings except a smaller minimum size, so small test images
    tokenize to a few patches (the brute-force reference runs one forward per masked token).
    """
    from maskvl.models import write_tiny_model

    path = write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-odd", seed=1, hidden_size=40,
                            num_layers=3, num_heads=6, num_kv_heads=2, head_dim=24, intermediate_size=72,
                            vision_depth=3, deepstack=(0, 1, 2))
    cfg_file = path / "preprocessor_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["size"] = {"shortest_edge": 4096, "longest_edge": 16777216}
    cfg_file.write_text(json.dumps(cfg))
    return path


def _noise_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, Path]:
    """Non-square test images: 96x64 (2x3 merged grid) and 64x128 (4x2)."""
    d = tmp_path_factory.mktemp("images")
    out = {}
    for name, (w, h, seed) in {"wide": (96, 64, 0), "tall": (64, 128, 1)}.items():
        p = d / f"{name}.png"
        _noise_image(w, h, seed).save(p)
        out[name] = p
    return out


@pytest.fixture(scope="session")
def adapter64(tiny_dir):
    import torch

    from maskvl.models import load_model

    return load_model(str(tiny_dir), torch.float64, "cpu")


@pytest.fixture(scope="session")
def adapter32(tiny_dir):
    import torch

    from maskvl.models import load_model

    return load_model(str(tiny_dir), torch.float32, "cpu")


@pytest.fixture
def run_main(capsys):
    """Call the CLI's entry point in-process: ``run_main(argv) -> (exit code, stdout, stderr)``."""
    import sys

    from maskvl.cli import main

    def run(argv: list[str]) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as info:
            main(argv)
            sys.exit(0)
        out, err = capsys.readouterr()
        return int(info.value.code or 0), out, err

    return run
