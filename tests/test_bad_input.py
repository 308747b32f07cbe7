"""Bad input everywhere: one line on stderr, exit code 2, no traceback, nothing under a final name."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG signature and IHDR claiming ``width x height``, no pixel data: a cheap decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of good, corrupt, truncated and bomb images."""
    from PIL import Image

    d = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(d / "ok.png")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (d / "truncated.png").write_bytes((d / "ok.png").read_bytes()[:60])
    _png_header_only(d / "bomb.png", 40000, 40000)
    return d



def _assert_one_line_error(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert err.startswith("maskvl: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert "Traceback" not in err


def test_the_bomb_is_tiny_on_disk_and_huge_in_its_header(inputs: Path) -> None:
    from PIL import Image

    data = (inputs / "bomb.png").read_bytes()
    assert len(data) < 100 and struct.unpack(">II", data[16:24]) == (40000, 40000)
    with pytest.raises(Image.DecompressionBombError):  # PIL itself refuses it on open
        Image.open(inputs / "bomb.png")


@pytest.mark.parametrize("extra, message", [
    (["--image", "{d}/missing.png"], "image not found"),
    (["--image", "{d}/corrupt.png"], "not an image PIL can read"),
    (["--image", "{d}/truncated.png"], "cannot read image"),
    (["--image", "{d}"], "image path is a directory"),
    (["--image", "{d}/bomb.png"], "over the pixel cap"),
    (["--model", "{d}/no-such-model-dir"], "model directory not found"),
    (["--model", "{d}"], "has no config.json"),
    (["--mask-mode", "pixels"], "mask_mode (--mask-mode) must be one of text, vision, both (got 'pixels')"),
    (["--num-tokens", "0"], "num_tokens (--num-tokens) must be an integer of at least 1 (got 0)"),
    (["--num-tokens", "-3"], "num_tokens (--num-tokens) must be an integer of at least 1 (got -3)"),
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "   "], "the prompt is empty"),
    (["--layers", "1-x"], "bad layer list"),
    (["--mask-mode", "vision"], "mask_mode (--mask-mode) vision needs at least one image"),
])
def test_sweep_bad_input(tmp_path: Path, inputs: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
                         message: str, run_main) -> None:
    out = tmp_path / "out" / "result.parquet"
    argv = ["sweep", "--prompt", "What is this?", "-o", str(out), "-q"] + [a.format(d=inputs) for a in extra]
    code, _, err = run_main(argv)
    _assert_one_line_error(code, err, message)
    assert not out.parent.exists()


GOOD_JOB = "  - {name: a, prompt: What is in it}\n"


@pytest.mark.parametrize("doc, message", [
    ("just a string\n", "must be a mapping"),
    ("- name: a\n  prompt: p\n", "must be a mapping"),
    ("model: {model}\njobs:\n  - {{prompt: p}}\n", "the job has no name"),
    ("model: {model}\njobs:\n" + GOOD_JOB + GOOD_JOB, "duplicate job name"),
    ("model: {model}\nworkers: 3\njobs:\n" + GOOD_JOB, "unknown key 'workers'"),
    ("model: {model}\njobs:\n  - {{name: a, prompt: p, imgs: [x.png]}}\n", "unknown key 'imgs'"),
    ("model: {model}\ndefaults: {{num_tokens: 0}}\njobs:\n" + GOOD_JOB, "num_tokens (--num-tokens) must be an integer of at least 1 (got 0)"),
    ("model: {model}\njobs:\n  - {{name: a, prompt: ''}}\n", "prompt is missing or empty"),
    ("model: {model}\njobs:\n  - {{name: a, prompt: p, mask_mode: all}}\n", "mask_mode (--mask-mode) must be one of text, vision, both (got 'all')"),
    ("model: {model}\njobs: [\n", "not valid YAML"),
])
def test_batch_jobs_file_errors_fail_before_the_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             doc: str, message: str, run_main) -> None:
    # The model directory does not exist: had the model load come first, its error would show instead.
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(doc.replace("{model}", str(tmp_path / "no-model")).replace("{{", "{").replace("}}", "}"))
    out = tmp_path / "out"
    code, stdout, err = run_main(["batch", str(jobs), "--output-dir", str(out)])
    _assert_one_line_error(code, err, message)
    assert "loading" not in err and stdout == ""
    assert not out.exists()


def test_batch_missing_jobs_file_and_model(tmp_path: Path, capsys: pytest.CaptureFixture[str], run_main) -> None:
    code, _, err = run_main(["batch", str(tmp_path / "nope.yaml"), "--output-dir", str(tmp_path / "o")])
    _assert_one_line_error(code, err, "jobs file not found")
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(f"model: {tmp_path}/no-model\njobs:\n" + GOOD_JOB)
    code, _, err = run_main(["batch", str(jobs), "--output-dir", str(tmp_path / "o"), "-q"])
    _assert_one_line_error(code, err, "model directory not found")
    assert list((tmp_path / "o").iterdir()) == []
    (tmp_path / "file").write_text("x")
    code, _, err = run_main(["batch", str(jobs), "--output-dir", str(tmp_path / "file")])
    _assert_one_line_error(code, err, "exists and is not a directory")


def _subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "maskvl.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def test_real_process_stderr_is_one_line(tmp_path: Path, inputs: Path) -> None:
    """The same contract end to end in a fresh interpreter (no pytest capture in between)."""
    res = _subprocess(["sweep", "--image", str(inputs / "bomb.png"), "--prompt", "hi", "-o", "r.parquet"], tmp_path)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "over the pixel cap" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "jobs.yaml").write_text("[1, 2]\n")
    res = _subprocess(["batch", "jobs.yaml", "--output-dir", "out"], tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "must be a mapping" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.yaml"]
