"""The command line as a user meets it: real runs, and one-line errors with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "maskvl.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_sweep_from_directory_with_csv(tiny_dir, images, tmp_path):
    out = tmp_path / "o.parquet"
    r = run("sweep", "--model", str(tiny_dir), "--image", str(images["wide"]), "--prompt", "What is it?",
            "--mask-mode", "vision", "--num-tokens", "2", "--layers", "0,2", "--csv", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "image grids 2x3" in r.stdout and str(out) in r.stdout
    t = pq.read_table(out).to_pandas()
    assert set(t.layer) == {0, 2} and set(t.token_kind) == {"image"} and set(t.generation_step) <= {0, 1}
    assert out.with_suffix(".csv").exists()


def test_make_tiny_model_and_builtin(tmp_path):
    d = tmp_path / "m"
    r = run("make-tiny-model", str(d), "--layers", "2")
    assert r.returncode == 0, r.stderr
    for f in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
              "video_preprocessor_config.json"):
        assert (d / f).exists(), f
    r = run("sweep", "--prompt", "Hello", "-q", "-o", str(tmp_path / "b.parquet"))  # builtin model
    assert r.returncode == 0, r.stderr


@pytest.fixture
def bad_files(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return {"corrupt": corrupt}


@pytest.mark.parametrize("case", ["missing-image", "corrupt-image", "missing-model", "bad-mask-mode",
                                  "num-tokens-0", "empty-prompt", "bad-layers", "vision-without-image"])
def test_bad_input_one_line_exit_2(case, tiny_dir, images, bad_files, tmp_path):
    base = ["sweep", "--model", str(tiny_dir), "--prompt", "Hi", "-o", str(tmp_path / "x.parquet")]
    args = {
        "missing-image": base + ["--image", str(tmp_path / "nope.png")],
        "corrupt-image": base + ["--image", str(bad_files["corrupt"])],
        "missing-model": ["sweep", "--model", str(tmp_path / "no-such-dir"), "--prompt", "Hi"],
        "bad-mask-mode": base + ["--mask-mode", "pixels"],
        "num-tokens-0": base + ["--num-tokens", "0"],
        "empty-prompt": ["sweep", "--model", str(tiny_dir), "--prompt", "  "],
        "bad-layers": base + ["--layers", "0-99"],
        "vision-without-image": base + ["--mask-mode", "vision"],
    }[case]
    r = run(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("loading ")]
    assert len(lines) == 1 and lines[0].startswith("maskvl: error: "), r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "x.parquet").exists()


def test_oversized_image_is_refused(tiny_dir, tmp_path):
    from maskvl.errors import InputError
    from maskvl.inputs import load_image

    p = tmp_path / "big.png"
    Image.new("L", (64, 64)).save(p)
    with pytest.raises(InputError, match="over the cap"):
        load_image(str(p), max_input_pixels=1000)
