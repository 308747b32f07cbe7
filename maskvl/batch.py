"""``maskvl batch JOBS.yaml --output-dir DIR``: many sweeps over one loaded model, resumable.

The jobs file (read with ``yaml.safe_load``)::

    model: Qwen/Qwen3-VL-4B-Instruct      # loaded once for every job
    defaults:                             # any sweep option; jobs may override all but dtype/device
      mask_mode: both
      num_tokens: 2
      dtype: bfloat16
    jobs:
      - name: cat                         # the output is DIR/cat.parquet
        image: images/cat.png             # relative to this file's folder
        prompt: What is in the image?
      - name: two
        images: [a.png, b.png]
        prompt: What differs?
        layers: 0-5,20
      - name: text-only
        prompt: Explain RoPE.
        mask_mode: text

Resume rules. Each job's output is published atomically by :class:`maskvl.io.ParquetSink` (hidden temp
file, then ``os.replace``), so a final name only ever holds a complete file. A rerun skips a job whose
file says ``complete: true`` and whose recorded parameters (model, dtype, prompt, mask mode, number of
steps, layers, image paths) match the job and whose images are not newer than the file; every other job
is redone from scratch, replacing any ``.partial.parquet`` left by an interrupted or failed attempt.
Temp files of a killed run are removed when the next run starts.

Failures. Problems with the jobs file itself (not a mapping, unknown keys, missing or duplicate names,
bad option values) end the command with exit code 2 before the model loads. Problems that only show when
a job runs (an unreadable image, a prompt longer than the model's positions, ...) fail that job only;
the other jobs run, and the command exits 1 after the summary.

Sharding. Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` > 1) job ``i`` runs on rank
``i % WORLD_SIZE``; each rank loads the model on its own GPU (``cuda:LOCAL_RANK``) or the CPU, writes to
the shared output directory, and rank 0 prints the summary of all ranks.
"""

from __future__ import annotations

import datetime
import os
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow.parquet as pq
import torch
import yaml
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from . import io, options
from .api import run_sweep
from .engine import SweepConfig
from .errors import InputError, MaskvlError
from .models import load_model, resolve_device, resolve_dtype
from .options import OPTIONS

TOP_KEYS = ("model", "defaults", "jobs")
SWEEP_KEYS = tuple(OPTIONS)
# The model loads once, so what it loads with cannot vary per job.
MODEL_KEYS = tuple(name for name, opt in OPTIONS.items() if opt.model_level)
JOB_KEYS = ("name", "image", "images", "prompt") + tuple(k for k in SWEEP_KEYS if k not in MODEL_KEYS)

# A job name becomes a file name: no separators, no leading dot (hidden temp files start with one), and
# no ``.partial`` suffix, which would collide with another job's partial file.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")

# The final barrier waits for the slowest rank; gloo/nccl's 30-minute default would kill long batches.
DIST_TIMEOUT = datetime.timedelta(hours=float(os.environ.get("MASKVL_DIST_TIMEOUT_HOURS", "168")))


# ------------------------------------------------------------------------------------------ jobs file
@dataclass(frozen=True)
class Job:
    """One sweep of a batch: its prompt, absolute image paths and its sweep options (the jobs file's
    defaults merged with the job's own, checked by ``maskvl.options``; model-level options excluded)."""

    index: int
    name: str
    prompt: str
    images: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> dict[str, Any]:
        """Every sweep option of this job, defaults filled in."""
        return options.resolve(self.options, has_images=bool(self.images))

    def fingerprint(self) -> dict[str, Any]:
        """Every option that shapes the result; stored in the output's metadata to decide reruns."""
        return {"prompt": self.prompt, "images": list(self.images), **options.fingerprint(self.resolved())}


@dataclass
class BatchSpec:
    """A parsed, validated jobs file."""

    source: Path
    model: str
    dtype: str | None
    device: str | None
    jobs: list[Job]


def _where(source: Path, context: str) -> str:
    return f"{source.name}: {context}" if context else source.name


def _check_keys(mapping: dict[Any, Any], allowed: tuple[str, ...], source: Path, context: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise InputError(f"{_where(source, context)}: unknown key {key!r} (allowed: {', '.join(allowed)})")


def _sweep_options(raw: dict[str, Any], source: Path, context: str) -> dict[str, Any]:
    """The sweep options present in ``raw``, checked by ``maskvl.options`` (messages prefixed with where)."""
    try:
        return options.check_options({k: v for k, v in raw.items() if k in SWEEP_KEYS})
    except InputError as exc:
        raise InputError(f"{_where(source, context)}: {exc}") from None


def _job_images(raw: dict[str, Any], base: Path, where: str) -> tuple[str, ...]:
    if "image" in raw and "images" in raw:
        raise InputError(f"{where}: give either image or images, not both")
    if "image" in raw:
        items = [raw["image"]]
    else:
        items = raw.get("images") or []
        if not isinstance(items, list):
            raise InputError(f"{where}: images must be a list of paths")
    paths = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise InputError(f"{where}: an image must be a path (got {item!r})")
        p = Path(os.path.expanduser(item))
        paths.append(os.path.abspath(p if p.is_absolute() else base / p))
    return tuple(paths)


def load_spec(path: str | os.PathLike) -> BatchSpec:
    """Read and validate a jobs file; raises :class:`InputError` with a one-line message naming the problem."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"jobs file not found: {source}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read jobs file {source}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{source.name}: not valid YAML{at}: {problem}") from None
    if not isinstance(data, dict):
        raise InputError(f"{source.name}: the jobs file must be a mapping with model and jobs "
                         f"(got {type(data).__name__})")
    _check_keys(data, TOP_KEYS, source, "")
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InputError(f"{source.name}: model is missing (a hub id, a directory, or builtin:tiny-qwen3-vl)")
    base = source.resolve().parent
    # A local directory named relative to the jobs file; hub ids and builtin: specs stay as written.
    if not model.startswith("builtin:") and (base / os.path.expanduser(model)).is_dir():
        model = str((base / os.path.expanduser(model)).resolve())
    defaults_raw = data.get("defaults") or {}
    if not isinstance(defaults_raw, dict):
        raise InputError(f"{source.name}: defaults must be a mapping of sweep options")
    _check_keys(defaults_raw, SWEEP_KEYS, source, "defaults")
    defaults = _sweep_options(defaults_raw, source, "defaults")
    jobs_raw = data.get("jobs")
    if not isinstance(jobs_raw, list) or not jobs_raw:
        raise InputError(f"{source.name}: jobs must be a non-empty list")
    jobs: list[Job] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(jobs_raw):
        context = f"jobs[{i}]"
        if not isinstance(raw, dict):
            raise InputError(f"{_where(source, context)}: a job must be a mapping (got {type(raw).__name__})")
        name = raw.get("name")
        if name is None:
            raise InputError(f"{_where(source, context)}: the job has no name")
        if not isinstance(name, str) or not _NAME.match(name) or name.endswith(".partial"):
            raise InputError(f"{_where(source, context)}: bad job name {name!r} (use letters, digits, _ . + -; "
                             f"it becomes the file name)")
        context = f"job {name!r}"
        where = _where(source, context)
        for key in MODEL_KEYS:
            if key in raw:
                raise InputError(f"{where}: {key} can only be set under defaults (the model loads once)")
        _check_keys(raw, JOB_KEYS, source, context)
        # Case-insensitive: on macOS/Windows file systems "Cat" and "cat" are the same file.
        if name.casefold() in seen:
            raise InputError(f"{where}: duplicate job name (also jobs[{seen[name.casefold()]}])")
        seen[name.casefold()] = i
        prompt = raw.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{where}: the prompt is missing or empty")
        opts = {k: v for k, v in {**defaults, **_sweep_options(raw, source, context)}.items()
                if k not in MODEL_KEYS}
        job = Job(index=i, name=name, prompt=prompt, images=_job_images(raw, base, where), options=opts)
        try:
            job.resolved()  # the checks that span options (e.g. vision without images)
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        jobs.append(job)
    return BatchSpec(source=source, model=model.strip(), dtype=defaults.get("dtype"), device=defaults.get("device"),
                     jobs=jobs)


# --------------------------------------------------------------------------------------- running
@dataclass
class JobResult:
    """What happened to one job (picklable: ranks send these to rank 0)."""

    name: str
    index: int
    status: str  # "done", "skipped" or "failed"
    rows: int = 0
    seconds: float = 0.0
    error: str = ""
    rank: int = 0


def output_path(out_dir: Path, job: Job) -> Path:
    """Where a job's result goes."""
    return out_dir / f"{job.name}.parquet"


def _dtype_name(adapter: Any) -> str:
    return str(adapter.dtype).replace("torch.", "")


def completed_rows(path: Path, job: Job, adapter: Any) -> int | None:
    """Rows of ``path`` if it holds this job's complete result; None if the job must be (re)done."""
    if not path.is_file():
        return None
    try:
        md = io.read_metadata(path)
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception:  # unreadable or foreign file under our name: redo it
        return None
    if not md or md.get("complete") is not True:
        return None
    opts = job.resolved()
    try:
        layers = SweepConfig.from_options(opts).validate(adapter.num_layers)
    except InputError:  # the job cannot run on this model; running it reports why
        return None
    expected = {"model": adapter.model_id, "dtype": _dtype_name(adapter), "prompt": job.prompt,
                "mask_mode": opts["mask_mode"], "num_steps": opts["num_tokens"], "layers": layers}
    if any(md.get(k) != v for k, v in expected.items()):
        return None
    if md.get("job") != job.fingerprint():
        return None
    if [im.get("path") for im in md.get("images") or []] != list(job.images):
        return None
    # An image edited after the run makes the result stale (the make rule: sources newer than target).
    mtime = path.stat().st_mtime
    try:
        if any(os.stat(p).st_mtime > mtime for p in job.images):
            return None
    except OSError:
        return None
    return rows


def run_job(adapter: Any, job: Job, out_dir: Path,
            on_progress: Callable[[int, int], None] | None = None, verbose: bool = False) -> JobResult:
    """Run one job into ``out_dir``; never raises for a job-level problem (returns a failed result)."""
    final = output_path(out_dir, job)
    t0 = time.perf_counter()
    try:
        # A redo starts clean: the partial file of an earlier attempt describes a run we are replacing.
        io.partial_path(final).unlink(missing_ok=True)
        res = run_sweep(adapter, list(job.images), job.prompt, job.options, output=final, on_progress=on_progress,
                        extra_metadata={"job": job.fingerprint()})
        return JobResult(job.name, job.index, "done", res.table.num_rows, time.perf_counter() - t0)
    except MaskvlError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    except Exception as exc:  # a bug or an environment failure (e.g. out of memory) in one job
        if verbose:
            traceback.print_exc(file=sys.stderr)
        first = str(exc).splitlines()[0] if str(exc) else ""
        msg = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return JobResult(job.name, job.index, "failed", 0, time.perf_counter() - t0, msg)


def ensure_csv(path: Path) -> None:
    """Write the CSV beside a complete Parquet file if a killed run published the Parquet but not the CSV."""
    csv_path = path.with_suffix(".csv")
    if not csv_path.exists():
        io.write_csv(path, csv_path)


@dataclass
class _Dist:
    """This process's place in a torchrun launch (world_size 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False
    results: list[Any] = field(default_factory=list)


def _dist_env() -> _Dist:
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise InputError("RANK/WORLD_SIZE/LOCAL_RANK must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"bad RANK/WORLD_SIZE: {rank}/{world}")
    return _Dist(rank=rank, world_size=world, local_rank=local)


def _device_for(dist_info: _Dist, device: str | None) -> str | None:
    """Under torchrun each rank takes its own GPU; an explicit cpu stays cpu."""
    if dist_info.world_size == 1:
        return device
    if device in (None, "auto"):
        return f"cuda:{dist_info.local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return f"cuda:{dist_info.local_rank}"
    return device


def _all_gather(dist_info: _Dist, obj: Any) -> list[Any]:
    if not dist_info.active:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist_info.world_size
    dist.all_gather_object(out, obj)
    return out


def format_summary(results: list[JobResult], show_rank: bool = False) -> str:
    """The summary table: job, status, rows, seconds (and the error of failed jobs)."""
    head = ["job", "status", "rows", "seconds"] + (["rank"] if show_rank else []) + ["note"]
    rows = [[r.name, r.status, str(r.rows), f"{r.seconds:.2f}"] + ([str(r.rank)] if show_rank else []) + [r.error]
            for r in sorted(results, key=lambda r: r.index)]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head] + rows]
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    lines.append(f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed")
    return "\n".join(lines)


@dataclass
class BatchOutcome:
    """What a batch run did: every rank's job results; ``lead`` is True on the rank that reports."""

    results: list[JobResult]
    lead: bool = True
    world_size: int = 1

    @property
    def failed(self) -> bool:
        return any(r.status == "failed" for r in self.results)


def run_batch(jobs_file: str | os.PathLike, output_dir: str | os.PathLike, force: bool = False,
              verbose: bool = False, quiet: bool = False) -> BatchOutcome:
    """Run the sweeps of a jobs file over one loaded model into ``output_dir``; rerun to resume.

    Each job writes ``<output_dir>/<name>.parquet`` atomically. A rerun skips jobs whose file is
    complete and matches the job (``force`` redoes them), and redoes the rest. A failing job does not
    stop the others. Under torchrun, jobs are sharded across ranks. Raises :class:`MaskvlError` for a
    bad jobs file or a model that does not load; progress goes to stderr unless ``quiet``.
    """
    spec = load_spec(jobs_file)  # every jobs-file problem surfaces here, before the slow model load
    out_dir = Path(output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output directory {output_dir} exists and is not a directory")
    dist_info = _dist_env()
    dev = resolve_device(_device_for(dist_info, spec.device))
    dt = resolve_dtype(spec.dtype, dev)
    if dist_info.world_size > 1:
        import torch.distributed as dist

        if dev.type == "cuda":
            torch.cuda.set_device(dev)  # nccl's object collectives use the current device
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=DIST_TIMEOUT)
        dist_info.active = True
    try:
        return _run_batch(spec, out_dir, dist_info, dev, dt, force, verbose, quiet)
    finally:
        if dist_info.active:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run_batch(spec: BatchSpec, out_dir: Path, dist_info: _Dist, dev: Any, dt: Any, force: bool, verbose: bool,
               quiet: bool) -> BatchOutcome:
    lead = dist_info.rank == 0
    setup_error = ""
    adapter = None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if lead:
            # Only rank 0 cleans, and before the gather below, so no rank is writing a temp file yet.
            removed = io.clean_stale_temps(out_dir)
            if removed and not quiet:
                print(f"removed {len(removed)} temporary file(s) of an interrupted run", file=sys.stderr)
        if not quiet and lead:
            print(f"loading {spec.model} ({str(dt).replace('torch.', '')} on {dev}) ...", file=sys.stderr)
        if not verbose:
            # transformers' per-shard loading bar is noise next to our own progress bars.
            hf_logging.disable_progress_bar()
        adapter = load_model(spec.model, dt, dev, verbose=verbose)
    except MaskvlError as exc:
        setup_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    except OSError as exc:
        setup_error = f"cannot use the output directory {out_dir}: {exc.strerror or exc}"
    # Every rank learns whether all ranks loaded, so none waits forever for a rank that gave up.
    errors = [e for e in _all_gather(dist_info, setup_error) if e]
    if errors:
        raise MaskvlError(errors[0])
    assert adapter is not None

    mine = [j for j in spec.jobs if j.index % dist_info.world_size == dist_info.rank]
    results: list[JobResult] = []
    show = not quiet and lead
    overall = tqdm(total=len(mine), unit="job", desc="jobs", position=0, file=sys.stderr, disable=not show,
                   dynamic_ncols=True)

    def report(message: str) -> None:
        # tqdm.write keeps the bars intact; other ranks have no bars and print plainly.
        prefix = f"[rank {dist_info.rank}] " if dist_info.world_size > 1 else ""
        tqdm.write(f"maskvl: {prefix}{message}", file=sys.stderr)

    try:
        for job in mine:
            final = output_path(out_dir, job)
            rows = None if force else completed_rows(final, job, adapter)
            if rows is not None:
                if job.resolved()["csv"]:
                    ensure_csv(final)
                results.append(JobResult(job.name, job.index, "skipped", rows, 0.0, "already complete",
                                         dist_info.rank))
                overall.update(1)
                continue
            bar = tqdm(total=None, unit="layer", desc=job.name, position=1, leave=False, file=sys.stderr,
                       disable=not show, dynamic_ncols=True)

            def progress(done: int, total: int, bar: Any = bar) -> None:
                if bar.total != total:
                    bar.total = total
                bar.update(done - bar.n)

            try:
                res = run_job(adapter, job, out_dir, progress, verbose)
            finally:
                bar.close()
            res.rank = dist_info.rank
            if res.status == "failed":
                report(f"job {job.name!r} failed: {res.error}")
            results.append(res)
            overall.update(1)
    finally:
        overall.close()

    gathered = _all_gather(dist_info, [asdict(r) for r in results])
    all_results = [JobResult(**d) for part in gathered for d in part]
    if dist_info.active:
        import torch.distributed as dist

        # Ranks leave together: torchrun stops the remaining workers as soon as one exits non-zero.
        dist.barrier()
    return BatchOutcome(all_results, lead=lead, world_size=dist_info.world_size)
