"""``maskvl batch``: the jobs file, resume after SIGKILL, per-job failures, partial/CSV repair, torchrun sharding."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from maskvl import io
from maskvl.batch import Job, completed_rows, format_summary, JobResult, load_spec
from maskvl.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores: no oversubscription
    return env


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3-VL whose image processor makes few patches (fast sweeps)."""
    from maskvl.models import write_tiny_model

    path = write_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=1, num_layers=3)
    cfg_path = path / "preprocessor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["size"]["shortest_edge"] = 4096
    cfg_path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with two small non-square images and one corrupt file."""
    import numpy as np
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(d / "wide.png")
    Image.fromarray(rng.integers(0, 255, (100, 50, 3), dtype=np.uint8)).save(d / "tall.png")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    return d


def _write_jobs(path: Path, model: Path | str, jobs: list[dict], defaults: dict | None = None) -> Path:
    import yaml

    doc: dict = {"model": str(model), "jobs": jobs}
    if defaults is not None:
        doc["defaults"] = defaults
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path



def _summary(out: str) -> dict[str, list[str]]:
    """job name -> [status, rows, seconds, ...] from the summary table."""
    lines = out.strip().splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["job", "status"])
    return {line.split()[0]: line.split()[1:] for line in lines[head + 1:-1]}


def _check_complete(path: Path) -> int:
    """Assert a complete maskvl file with unique (step, layer, variant, position); returns its rows."""
    md = io.read_metadata(path)
    assert md is not None and md["complete"] is True
    t = pq.read_table(path, columns=["generation_step", "layer", "variant", "token_position"])
    keys = set(zip(*(t[c].to_pylist() for c in t.column_names)))
    assert len(keys) == t.num_rows > 0
    return t.num_rows


# ---------------------------------------------------------------------------------- jobs file
def test_spec_resolves_defaults_overrides_and_relative_images(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    spec_path = _write_jobs(tmp_path / "sub" / "jobs.yaml", "builtin:tiny-qwen3-vl", [
        {"name": "a", "image": "x.png", "prompt": "hi"},
        {"name": "b", "images": ["../y.png", str(tmp_path / "z.png")], "prompt": "hi", "num_tokens": 3,
         "layers": "0-1", "mask_mode": "text"},
        {"name": "c", "prompt": "text only", "layers": [2, 0], "csv": True},
    ], defaults={"mask_mode": "both", "num_tokens": 2, "dtype": "float32", "max_pixels": 5000})
    spec = load_spec(spec_path)
    assert spec.model == "builtin:tiny-qwen3-vl" and spec.dtype == "float32" and spec.device is None
    a, b, c = spec.jobs
    assert a == Job(0, "a", "hi", (str(tmp_path / "sub" / "x.png"),),
               {"mask_mode": "both", "num_tokens": 2, "max_pixels": 5000})
    assert b.images == (str(tmp_path / "y.png"), str(tmp_path / "z.png"))
    assert (b.resolved()["mask_mode"], b.resolved()["num_tokens"], b.resolved()["layers"]) == ("text", 3, (0, 1))
    c_opts = c.resolved()
    assert (c.images, c_opts["layers"], c_opts["csv"], c_opts["mask_mode"]) == ((), (2, 0), True, "both")


def test_spec_model_directory_is_relative_to_the_jobs_file(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    spec = load_spec(_write_jobs(tmp_path / "jobs.yaml", "ckpt", [{"name": "a", "prompt": "p"}]))
    assert spec.model == str((tmp_path / "ckpt").resolve())


@pytest.mark.parametrize("doc, message", [
    ("- just\n- a list\n", "must be a mapping"),
    ("", "must be a mapping"),
    ("model: m\njobs: [\n", "not valid YAML at line"),
    ("model: m\njobs:\n  - {name: a, prompt: p}\nextra: 1\n", "unknown key 'extra'"),
    ("model: m\ndefaults: {mask_mod: text}\njobs:\n  - {name: a, prompt: p}\n", "defaults: unknown key 'mask_mod'"),
    ("model: m\njobs:\n  - {name: a, prompt: p, colour: red}\n", "job 'a': unknown key 'colour'"),
    ("model: m\njobs:\n  - {prompt: p}\n", "jobs[0]: the job has no name"),
    ("model: m\njobs:\n  - {name: a, prompt: p}\n  - {name: A, prompt: q}\n", "duplicate job name"),
    ("model: m\njobs:\n  - {name: ../evil, prompt: p}\n", "bad job name"),
    ("model: m\njobs:\n  - {name: x.partial, prompt: p}\n", "bad job name"),
    ("model: m\njobs:\n  - {name: a, prompt: '  '}\n", "prompt is missing or empty"),
    ("model: m\njobs:\n  - {name: a}\n", "prompt is missing or empty"),
    ("model: m\njobs:\n  - {name: a, prompt: p, mask_mode: pixels}\n", "job 'a': mask_mode (--mask-mode) must be one of text, vision, both (got 'pixels')"),
    ("model: m\njobs:\n  - {name: a, prompt: p, num_tokens: 0}\n", "num_tokens (--num-tokens) must be an integer of at least 1"),
    ("model: m\njobs:\n  - {name: a, prompt: p, num_tokens: true}\n", "num_tokens (--num-tokens) must be an integer of at least 1 (got True)"),
    ("model: m\njobs:\n  - {name: a, prompt: p, layers: 3-1}\n", "bad layer list"),
    ("model: m\njobs:\n  - {name: a, prompt: p, dtype: float64}\n", "dtype can only be set under defaults"),
    ("model: m\njobs:\n  - {name: a, prompt: p, image: x.png, images: [y.png]}\n", "either image or images"),
    ("model: m\njobs:\n  - {name: a, prompt: p, mask_mode: vision}\n", "mask_mode (--mask-mode) vision needs at least one image"),
    ("model: m\njobs:\n  - {name: a, prompt: p, max_pixels: -4}\n", "max_pixels (--max-pixels) must be an integer of at least 1 (got -4)"),
    ("model: m\njobs: []\n", "jobs must be a non-empty list"),
    ("jobs:\n  - {name: a, prompt: p}\n", "model is missing"),
    ("model: m\njobs:\n  - just a string\n", "a job must be a mapping"),
])
def test_spec_errors(tmp_path: Path, doc: str, message: str) -> None:
    path = tmp_path / "jobs.yaml"
    path.write_text(doc)
    with pytest.raises(InputError) as info:
        load_spec(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_summary_table_lists_every_job() -> None:
    text = format_summary([JobResult("b", 1, "failed", 0, 0.5, "image not found: x"),
                           JobResult("a", 0, "done", 12, 1.25)])
    lines = text.splitlines()
    assert lines[0].split() == ["job", "status", "rows", "seconds", "note"]
    assert lines[1].split() == ["a", "done", "12", "1.25"]
    assert lines[2].split()[:4] == ["b", "failed", "0", "0.50"] and lines[2].endswith("image not found: x")
    assert lines[3] == "1 done, 0 skipped, 1 failed"


# ---------------------------------------------------------------------------------- running
def test_acceptance_sigkill_then_rerun_completes_each_job_once(tmp_path: Path, tiny_model: Path,
                                                               images: Path) -> None:
    """Four jobs (two images, vision-only, text-only), SIGKILL after the first file, rerun: four clean files."""
    jobs = _write_jobs(tmp_path / "jobs.yaml", tiny_model, [
        {"name": "first", "image": str(images / "wide.png"), "prompt": "What is this?", "num_tokens": 1,
         "layers": "0"},
        {"name": "two-images", "images": [str(images / "wide.png"), str(images / "tall.png")],
         "prompt": "What differs?", "num_tokens": 3},
        {"name": "vision-only", "image": str(images / "tall.png"), "prompt": "Describe it.",
         "mask_mode": "vision", "num_tokens": 3},
        {"name": "text-only", "prompt": "Explain the picture.", "mask_mode": "text", "num_tokens": 3},
    ], defaults={"mask_mode": "both"})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "maskvl.cli", "batch", str(jobs), "--output-dir", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = out / "first.parquet"
    deadline = time.monotonic() + 90
    while not first.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the first job never finished"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    finals = sorted(p.name for p in out.glob("*.parquet"))
    # The kill landed part-way: the slow jobs had not all finished.
    assert "text-only.parquet" not in finals, finals
    for p in out.iterdir():
        if not p.name.startswith("."):  # whatever holds a final name is complete
            assert p.name.endswith(".parquet") and ".partial" not in p.name
            _check_complete(p)
    first_mtime = first.stat().st_mtime_ns

    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    summary = _summary(rerun.stdout)
    assert summary["first"][0] == "skipped"
    assert all(summary[n][0] in ("done", "skipped") for n in ("two-images", "vision-only", "text-only"))
    assert summary["text-only"][0] == "done"
    assert first.stat().st_mtime_ns == first_mtime
    names = sorted(p.name for p in out.iterdir())
    assert names == ["first.parquet", "text-only.parquet", "two-images.parquet", "vision-only.parquet"]
    for name in names:
        rows = _check_complete(out / name)
        assert str(rows) == summary[name[:-len(".parquet")]][1]
    md = {n: io.read_metadata(out / n) for n in names}
    assert len(md["two-images.parquet"]["images"]) == 2
    assert md["vision-only.parquet"]["mask_mode"] == "vision"
    assert md["text-only.parquet"]["images"] == []


def test_failing_jobs_are_reported_and_the_others_run(tmp_path: Path, tiny_model: Path, images: Path,
                                                      capsys: pytest.CaptureFixture[str], run_main) -> None:
    jobs = _write_jobs(tmp_path / "jobs.yaml", tiny_model, [
        {"name": "missing", "image": "nope.png", "prompt": "What?"},
        {"name": "ok", "image": str(images / "wide.png"), "prompt": "What?", "csv": True},
        {"name": "corrupt", "image": str(images / "corrupt.png"), "prompt": "What?"},
        # The tiny model has 4096 positions; this prompt is far longer.
        {"name": "too-long", "prompt": "what is this image " * 1200},
        {"name": "bad-layer", "prompt": "What?", "layers": "7"},
    ], defaults={"layers": "0-1"})
    out = tmp_path / "out"
    code, stdout, stderr = run_main(["batch", str(jobs), "--output-dir", str(out), "-q"])
    assert code == 1
    summary = _summary(stdout)
    assert summary["ok"][0] == "done"
    assert {n: summary[n][0] for n in ("missing", "corrupt", "too-long", "bad-layer")} == dict.fromkeys(
        ("missing", "corrupt", "too-long", "bad-layer"), "failed")
    assert "image not found" in " ".join(summary["missing"])
    assert "not an image" in " ".join(summary["corrupt"])
    assert "over the model's 4096 positions" in " ".join(summary["too-long"])
    assert "out of range" in " ".join(summary["bad-layer"])
    assert "job 'corrupt' failed" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in out.iterdir()) == ["ok.csv", "ok.parquet"]

    # Resume repairs a CSV lost between the Parquet publish and the CSV write (a kill in that gap).
    (out / "ok.csv").unlink()
    code, stdout, _ = run_main(["batch", str(jobs), "--output-dir", str(out), "-q"])
    assert code == 1 and _summary(stdout)["ok"][0] == "skipped"
    assert (out / "ok.csv").read_text().startswith('"generation_step",')


def test_changed_jobs_are_redone_and_stale_partials_replaced(tmp_path: Path, tiny_model: Path, images: Path,
                                                             capsys: pytest.CaptureFixture[str], run_main) -> None:
    img = tmp_path / "pic.png"
    img.write_bytes((images / "wide.png").read_bytes())
    base = [{"name": "a", "image": str(img), "prompt": "What?"}, {"name": "b", "prompt": "Why?"}]
    out = tmp_path / "out"
    jobs = _write_jobs(tmp_path / "jobs.yaml", tiny_model, base, defaults={"layers": "0"})
    code, stdout, _ = run_main(["batch", str(jobs), "--output-dir", str(out), "-q"])
    assert code == 0 and {v[0] for v in _summary(stdout).values()} == {"done"}

    # A stale partial file and a temp file of a killed run; a changed prompt for b.
    (out / "b.partial.parquet").write_bytes((out / "b.parquet").read_bytes())
    (out / f".b.parquet{io.TEMP_MARKER}abc123").write_bytes(b"junk")
    jobs = _write_jobs(tmp_path / "jobs.yaml", tiny_model,
                       [base[0], {"name": "b", "prompt": "Why not?"}], defaults={"layers": "0"})
    code, stdout, _ = run_main(["batch", str(jobs), "--output-dir", str(out), "-q"])
    summary = _summary(stdout)
    assert code == 0 and summary["a"][0] == "skipped" and summary["b"][0] == "done"
    assert io.read_metadata(out / "b.parquet")["prompt"] == "Why not?"
    assert sorted(p.name for p in out.iterdir()) == ["a.parquet", "b.parquet"]

    # Other layers, or an image edited after the run, make a result stale; --force redoes everything.
    jobs = _write_jobs(tmp_path / "jobs.yaml", tiny_model,
                       [base[0], {"name": "b", "prompt": "Why not?"}], defaults={"layers": "0-1"})
    code, stdout, _ = run_main(["batch", str(jobs), "--output-dir", str(out), "-q"])
    assert {n: v[0] for n, v in _summary(stdout).items()} == {"a": "done", "b": "done"}
    later = (out / "a.parquet").stat().st_mtime + 5
    os.utime(img, (later, later))
    code, stdout, _ = run_main(["batch", str(jobs), "--output-dir", str(out), "-q"])
    assert {n: v[0] for n, v in _summary(stdout).items()} == {"a": "done", "b": "skipped"}
    code, stdout, _ = run_main(["batch", str(jobs), "--output-dir", str(out), "-q", "--force"])
    assert {n: v[0] for n, v in _summary(stdout).items()} == {"a": "done", "b": "done"}


def test_completed_rows_rejects_incomplete_and_foreign_files(tmp_path: Path, tiny_model: Path) -> None:
    from maskvl.models import load_model

    adapter = load_model(str(tiny_model))
    job = Job(0, "t", "Hello?", options={"layers": (0,)})
    path = tmp_path / "t.parquet"
    assert completed_rows(path, job, adapter) is None  # missing
    path.write_bytes(b"PAR1 not really")
    assert completed_rows(path, job, adapter) is None  # unreadable
    from maskvl.api import run_sweep

    run_sweep(adapter, [], "Hello?", {"layers": [0]}, output=path)
    assert completed_rows(path, job, adapter) is None  # complete, but not written for this job (no fingerprint)
    run_sweep(adapter, [], "Hello?", {"layers": [0]}, output=path, extra_metadata={"job": job.fingerprint()})
    rows = completed_rows(path, job, adapter)
    assert rows == pq.ParquetFile(path).metadata.num_rows > 0
    assert completed_rows(path, Job(0, "t", "Hello?", options={"layers": (0,), "max_pixels": 4096}), adapter) is None
    assert completed_rows(path, Job(0, "t", "Hello?", options={"layers": (0,), "num_tokens": 2}), adapter) is None
    assert completed_rows(path, Job(0, "t", "Hello?", options={"layers": (0,), "mask_mode": "both"}), adapter) is None
    # The same rows with complete: false (what an interrupted run would say) are not a result.
    md = io.read_metadata(path)
    md["complete"] = False
    table = pq.read_table(path).replace_schema_metadata(None)
    with pq.ParquetWriter(path, table.schema) as w:
        w.write_table(table)
        w.add_key_value_metadata({io.METADATA_KEY: json.dumps(md)})
    assert completed_rows(path, job, adapter) is None


def test_torchrun_two_ranks_shard_jobs(tmp_path: Path, tiny_model: Path, images: Path) -> None:
    jobs = _write_jobs(tmp_path / "jobs.yaml", tiny_model, [
        {"name": f"j{i}", "prompt": f"Question {i}?", **({"image": str(images / "wide.png")} if i == 1 else {})}
        for i in range(4)
    ] + [{"name": "broken", "image": str(images / "corrupt.png"), "prompt": "What?"}],
        defaults={"layers": "0", "device": "cpu"})
    out = tmp_path / "out"
    out.mkdir()
    (out / f".j2.parquet{io.TEMP_MARKER}zz").write_bytes(b"left by a killed run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "maskvl.cli", "batch", str(jobs), "--output-dir", str(out), "-q"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode != 0, res.stderr  # the broken job fails the launch
    summary = _summary(res.stdout)
    assert res.stdout.count("0 skipped, 1 failed") == 1  # only rank 0 prints
    # Deterministic assignment: job i on rank i % 2.
    assert {n: (v[0], v[3]) for n, v in summary.items()} == {
        "j0": ("done", "0"), "j1": ("done", "1"), "j2": ("done", "0"), "j3": ("done", "1"),
        "broken": ("failed", "0")}
    assert "[rank 0] job 'broken' failed: not an image" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["j0.parquet", "j1.parquet", "j2.parquet", "j3.parquet"]
    for i in range(4):
        _check_complete(out / f"j{i}.parquet")
