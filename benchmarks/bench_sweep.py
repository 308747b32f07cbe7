"""Benchmark machinery: one case = one model shape, one image-token count (a prompt length for a
text-only shape), one number of steps.

For each case, on the same prepared inputs in the same process:

* maskvl's engine with every backend ``maskvl.ops.backend_status(device)`` reports usable (a backend
  added later is picked up with no change here), and again with ``logits`` when the engine's
  ``SweepConfig`` has such a field;
* the baseline: the prototype's algorithm done right (``benchmarks.prototype_algorithm``);
* for small cases, the brute force (``maskvl.naive.naive_sweep``).

One record per (case, baseline, backend, logits). Times exclude a warm-up; CUDA is synchronized around
every timed region. When a case times the baseline on a subset of layers and/or masked positions, the
record says so (``naive_extrapolated``, ``naive_layers_measured``, ``naive_positions_measured``,
``naive_measured_s``) and ``naive_s`` is the linear extrapolation described in :func:`extrapolate`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.models import build_adapter, get_shape, prepare, prepare_text
from benchmarks.prototype_algorithm import PrototypeStep, prototype_sweep
from maskvl import ops
from maskvl.engine import Engine, SweepConfig, mask_positions
from maskvl.naive import naive_sweep, relative_l2_error

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Case:
    """One benchmark case.

    ``naive_layers``: None measures the baseline on every layer; an int n on n layers evenly spread.
    ``naive_positions``: None measures every masked position; an int n on n positions evenly spread.
    ``bruteforce``: also time ``maskvl.naive.naive_sweep`` (every layer, every position).
    ``prompt_tokens``: for a text-only shape (``image_tokens`` 0), the prompt's length in tokens.
    """

    name: str
    shape: str
    image_tokens: int
    steps: int
    num_layers: int | None = None  # override the shape's layer count (None: the shape's own)
    naive_layers: int | None = None
    naive_positions: int | None = None
    bruteforce: bool = False
    mask_mode: str = "vision"
    prompt_tokens: int | None = None


# ------------------------------------------------------------------------------------------ helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def worktree_dirty() -> bool | None:
    """Whether tracked files differ from ``commit()`` (then the numbers are not exactly that commit's)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return bool(out.strip())


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    import transformers

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total_gb"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_mem_gb"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


class PeakMemory:
    """Peak memory over a block: CUDA ``max_memory_allocated``; on the CPU the RSS high-water mark.

    On Linux the RSS high-water mark (``VmHWM``) is reset at the start of the block through
    ``/proc/self/clear_refs``; where that is refused, the process-lifetime high-water mark is reported
    and ``kind`` says so.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.mb = float("nan")
        self.kind = ""
        self.cpu_s: Any = None  # process CPU seconds of the timed work (set by the timing functions)

    @staticmethod
    def _vmhwm_kb() -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated"
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.kind = "process RSS high-water (VmHWM, reset per block)"
            except OSError:
                self.kind = "process RSS high-water since start (ru_maxrss; could not reset)"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        kb = self._vmhwm_kb() if self.kind.startswith("process RSS high-water (VmHWM") else None
        if kb is None:
            import resource

            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.mb = kb / 1024


def available_backends(device: torch.device) -> list[str]:
    """Every concrete backend the ops layer reports usable on ``device``."""
    return [name for name, why in ops.backend_status(device).items() if why is None]


def engine_supports_logits() -> bool:
    return any(f.name == "logits" for f in dataclasses.fields(SweepConfig))


def spread(n_total: int, n: int | None) -> list[int]:
    """``n`` indices evenly spread over ``range(n_total)`` (all when ``n`` is None or large)."""
    if n is None or n >= n_total:
        return list(range(n_total))
    return sorted(set(np.linspace(0, n_total - 1, n).round().astype(int).tolist()))


def extrapolate(steps: list[PrototypeStep], num_layers: int, full_positions: list[int]) -> float:
    """The baseline's time for every layer and position, from a run on a subset.

    Per step: the prefill (always measured) plus, per measured layer, its time scaled by
    ``(P_full + 1) / (P_measured + 1)`` (a layer costs one clean pass plus one pass per masked
    position, all of the same shape), averaged over the measured layers and multiplied by the
    number of layers. With no subset this is exactly the measured time.
    """
    total = 0.0
    for st, p_full in zip(steps, full_positions):
        per_layer = [t * (p_full + 1) / (len(st.positions) + 1) for t in st.layer_s.values()]
        total += st.prefill_s + sum(per_layer) / len(per_layer) * num_layers
    return total


# ------------------------------------------------------------------------------------------- timing
def time_engine(adapter: Any, prepared: Any, config: SweepConfig, backend: str, repeats: int):
    """Warm up (one layer, one step), then time the full sweep ``repeats`` times.

    Returns ``(seconds per repeat, results of the last repeat, peak memory)``.
    """
    dev = adapter.device
    engine = Engine(adapter, backend)
    warm = dataclasses.replace(config, num_tokens=1, layers=[0])
    list(engine.run(prepared, warm))
    times, cpu = [], []
    results = []
    with PeakMemory(dev) as mem:
        for _ in range(repeats):
            sync(dev)
            t0, c0 = time.perf_counter(), time.process_time()
            results = list(engine.run(prepared, config))
            sync(dev)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    mem.cpu_s = cpu
    return times, results, mem


def time_prototype(adapter: Any, prepared: Any, case: Case, layers: list[int]):
    dev = adapter.device
    prototype_sweep(adapter, prepared, case.mask_mode, 1, layers=[layers[0]], max_positions=1)  # warm-up
    with PeakMemory(dev) as mem:
        sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        steps = prototype_sweep(adapter, prepared, case.mask_mode, case.steps, layers=layers,
                                max_positions=case.naive_positions)
        sync(dev)
        measured = time.perf_counter() - t0
    mem.cpu_s = time.process_time() - c0
    return measured, steps, mem


def time_bruteforce(adapter: Any, prepared: Any, case: Case):
    dev = adapter.device
    # No separate warm-up: the engine's warm-up already ran the model's forward on these inputs.
    with PeakMemory(dev) as mem:
        sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        steps = naive_sweep(adapter, prepared, case.mask_mode, case.steps)
        sync(dev)
        measured = time.perf_counter() - t0
    mem.cpu_s = time.process_time() - c0
    return measured, steps, mem


def agreement(fast: list[Any], naive_l2: list[dict[int, np.ndarray]], naive_cos: list[dict[int, np.ndarray]],
              naive_pos: list[np.ndarray]) -> tuple[float, float]:
    """Relative L2 error of maskvl's l2 and cosine distances against a baseline's, over what both measured."""
    f_l2, n_l2, f_cos, n_cos = [], [], [], []
    for res, l2, cos, pos in zip(fast, naive_l2, naive_cos, naive_pos):
        for lr in res.layers:
            if lr.layer not in l2:
                continue
            idx = np.searchsorted(lr.positions, pos)
            f_l2.append(lr.l2[:, idx].ravel())
            f_cos.append(lr.cos[:, idx].ravel())
            n_l2.append(l2[lr.layer].ravel())
            n_cos.append(cos[lr.layer].ravel())
    if not f_l2:
        return float("nan"), float("nan")
    return (relative_l2_error(np.concatenate(f_l2), np.concatenate(n_l2)),
            relative_l2_error(np.concatenate(f_cos), np.concatenate(n_cos)))


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------------------------- cases
def run_case(case: Case, adapter: Any, device: torch.device, dtype: torch.dtype, backends: list[str],
             repeats: int = 1, log: Callable[[str], None] = print, common: dict[str, Any] | None = None
             ) -> list[dict[str, Any]]:
    """Time one case; returns its records (see the module docstring)."""
    load_before = _loadavg()
    if get_shape(case.shape).text_only:
        prepared = prepare_text(adapter, case.prompt_tokens)
    else:
        prepared = prepare(adapter, case.image_tokens)
    seq_len = int(prepared.input_ids.shape[1])
    L = adapter.num_layers
    base = SweepConfig(mask_mode=case.mask_mode, num_tokens=case.steps)
    variants = [(b, False) for b in backends]
    logits_note = None
    if engine_supports_logits():
        variants += [(b, True) for b in backends]
    else:
        logits_note = "maskvl's SweepConfig has no 'logits' field in this commit: Logits not benchmarked"

    # maskvl, every backend (and with logits where supported)
    fast: dict[tuple[str, bool], tuple[list[float], list[Any], PeakMemory]] = {}
    for backend, logits in variants:
        config = dataclasses.replace(base, backend=backend, **({"logits": True} if logits else {}))
        times, results, mem = time_engine(adapter, prepared, config, backend, repeats)
        fast[(backend, logits)] = (times, results, mem)
        log(f"  maskvl[{backend}{'+logits' if logits else ''}]: {' '.join(f'{t:.3f}' for t in times)} s, "
            f"peak {mem.mb:.0f} MB")

    ref_results = fast[variants[0]][1]
    full_positions = [len(mask_positions(_is_image_at(prepared, s), case.mask_mode)) for s in range(len(ref_results))]
    masked_total = sum(full_positions) * L  # (step, layer, position) triples of the full sweep

    baselines = []
    # the prototype's algorithm, done right
    layers = spread(L, case.naive_layers)
    measured, steps, mem = time_prototype(adapter, prepared, case, layers)
    subset = len(layers) < L or case.naive_positions is not None and any(
        len(st.positions) < p for st, p in zip(steps, full_positions))
    naive_s = extrapolate(steps, L, full_positions) if subset else measured
    err = agreement(ref_results, [s.l2 for s in steps], [s.cos for s in steps], [s.positions for s in steps])
    log(f"  prototype: measured {measured:.2f} s" + (f", extrapolated to {naive_s:.2f} s" if subset else "")
        + f", peak {mem.mb:.0f} MB, rel err l2 {err[0]:.1e} cos {err[1]:.1e}")
    baselines.append(dict(
        baseline="prototype", naive_s=naive_s, naive_measured_s=measured, naive_extrapolated=subset,
        naive_layers_measured=layers if len(layers) < L else "all",
        naive_positions_measured=[len(s.positions) for s in steps] if subset else "all",
        naive_peak_mem_mb=mem.mb, naive_measured_cpu_s=mem.cpu_s, naive_steps_done=len(steps),
        naive_generated=[s.generated_id for s in steps], rel_err_l2=err[0], rel_err_cos=err[1],
    ))
    if case.bruteforce:
        measured, rsteps, mem = time_bruteforce(adapter, prepared, case)
        err = agreement(ref_results, [s.l2 for s in rsteps], [s.cos for s in rsteps], [s.positions for s in rsteps])
        log(f"  brute force: {measured:.2f} s, peak {mem.mb:.0f} MB, rel err l2 {err[0]:.1e} cos {err[1]:.1e}")
        baselines.append(dict(
            baseline="bruteforce", naive_s=measured, naive_measured_s=measured, naive_extrapolated=False,
            naive_layers_measured="all", naive_positions_measured="all", naive_peak_mem_mb=mem.mb,
            naive_measured_cpu_s=mem.cpu_s,
            naive_steps_done=len(rsteps), naive_generated=[s.generated_id for s in rsteps],
            rel_err_l2=err[0], rel_err_cos=err[1],
        ))
    load_after = _loadavg()

    records = []
    for b in baselines:
        for (backend, logits), (times, results, mem) in fast.items():
            fast_s = statistics.median(times)
            rec = {
                "name": f"{case.name}/{b['baseline']}/{backend}{'+logits' if logits else ''}",
                "case": case.name, "baseline": b["baseline"], "backend": backend, "logits": logits,
                "naive_s": b["naive_s"], "fast_s": fast_s, "speedup": b["naive_s"] / fast_s,
                "tokens_per_s": masked_total / fast_s,
                "naive_tokens_per_s": masked_total / b["naive_s"],
                "peak_mem_mb": mem.mb, "naive_peak_mem_mb": b["naive_peak_mem_mb"], "peak_mem_kind": mem.kind,
                "fast_repeats_s": times, "fast_cpu_s": mem.cpu_s,
                "naive_measured_cpu_s": b["naive_measured_cpu_s"],
                "naive_measured_s": b["naive_measured_s"], "naive_extrapolated": b["naive_extrapolated"],
                "naive_layers_measured": b["naive_layers_measured"],
                "naive_positions_measured": b["naive_positions_measured"],
                "rel_err_l2": b["rel_err_l2"], "rel_err_cos": b["rel_err_cos"],
                "same_tokens": [r.generated_id for r in results] == b["naive_generated"],
                "shape": case.shape, "model": get_shape(case.shape, adapter.num_layers).describe(),
                "image_tokens": case.image_tokens, "prompt_tokens": case.prompt_tokens, "seq_len": seq_len, "steps": case.steps,
                "steps_done": len(results), "layers": L, "mask_mode": case.mask_mode,
                "masked_per_step": full_positions, "masked_total": masked_total,
                "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                "loadavg_before": load_before, "loadavg_after": load_after,
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            if logits_note:
                rec["note"] = logits_note
            if common:
                rec.update(common)
            records.append(rec)
    return records


def _is_image_at(prepared: Any, step: int) -> torch.Tensor:
    """The image flags of the sequence at generation step ``step`` (generated tokens are text)."""
    return torch.cat([prepared.is_image, torch.zeros(step, dtype=torch.bool)])


def run_cases(cases: list[Case], device: torch.device, dtype: torch.dtype, backends: list[str] | None = None,
              repeats: int = 1, log: Callable[[str], None] = print, json_path: str | None = None,
              full_baseline: bool = False) -> list[dict[str, Any]]:
    """Run ``cases`` (models built once per shape); write the records to ``json_path`` after every case."""
    backends = backends or available_backends(device)
    common = {"commit": commit(), "commit_dirty": worktree_dirty(), "machine": machine(device)}
    records: list[dict[str, Any]] = []
    adapters: dict[tuple[str, int | None], Any] = {}
    for case in cases:
        if full_baseline:
            case = dataclasses.replace(case, naive_layers=None, naive_positions=None)
        key = (case.shape, case.num_layers)
        if key not in adapters:
            adapters.clear()  # one model in memory at a time
            if device.type == "cuda":
                torch.cuda.empty_cache()
            t0 = time.perf_counter()
            adapters[key] = build_adapter(get_shape(case.shape, case.num_layers), dtype, device)
            log(f"built {case.shape} ({dtype}, {device}) in {time.perf_counter() - t0:.1f} s")
        size = (f"{case.prompt_tokens}-token prompt" if get_shape(case.shape).text_only
                else f"{case.image_tokens} image tokens")
        log(f"{case.name}: {size}, {case.steps} step(s)")
        records.extend(run_case(case, adapters[key], device, dtype, backends, repeats, log, common))
        if json_path:
            Path(json_path).write_text(json.dumps(records, indent=1))
    return records
