"""Large runs: a whole sweep from 1,024 to 16,384 image tokens, and one grid read back from a file of
62 million rows.

    python benchmarks/bench_large.py --json benchmarks/results/large_cpu.json --plot benchmarks/large.png

Part 1, **sweep**: for each image-token count, a fresh Python process builds a small random Qwen3-VL
(``benchmarks.models``: hidden 64, 4 layers, 4 query / 2 KV heads, a one-block vision tower, 262,144
positions; SDPA attention), makes a random image of exactly that many merged tokens, and times
``maskvl.api.run_sweep`` (image processor, vision tower, prefill and decode, every layer's masked
variants, Parquet written to a temporary folder) with ``mask_mode="vision"``. Memory is the process RSS
high-water mark over the sweep (``VmHWM``, reset just before it through ``/proc/self/clear_refs``;
``benchmarks.bench_sweep.PeakMemory``), beside the RSS just before it (model loaded) and the peak of
pyarrow's memory pool (the rows in flight). Each size runs in its own process so one size's peak
cannot hide another's.

Part 2, **layers**: the same at 2,048 image tokens for several layer counts, with the Logits measure, to
show which memory grows with tokens x layers.

Part 3, **read**: writes a synthetic, format-correct file once (:func:`write_synthetic`: the real
writer, ``maskvl.io.rows_table`` and ``ParquetSink``, fed random values; 16,384 image tokens of a
128x128 grid plus text, 36 layers, 32 heads + Full, Attn and Logits, 3 steps: about 62 million rows),
then in a fresh process times ``maskvl.open`` and ``Sweep.grid`` (and a few other reads) on it.

``--sizes``/``--layers-series``/``--skip`` choose the parts; ``--smoke`` runs a tiny version of all
three (the test suite's check that this script works).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

PROMPT = "What is in this image? Describe the picture."


def _child(args: list[str], timeout: float) -> dict[str, Any]:
    """Run this script with ``args`` in a fresh interpreter; its last stdout line is a JSON record."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(REPO))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _arrow_peak_mb() -> float:
    import pyarrow as pa

    return pa.default_memory_pool().max_memory() / 2**20


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------------- part 1 and 2
def sweep_once(tokens: int, layers: int, steps: int, logits: bool, hidden: int = 64) -> dict[str, Any]:
    """One sweep in this process (call it in a fresh one): seconds, memory, rows."""
    import torch

    from benchmarks.bench_sweep import PeakMemory
    from benchmarks.models import Shape, build_adapter, make_image
    from maskvl.api import run_sweep

    torch.set_num_threads(1)  # as the other CPU presets: a shared 2-core machine times 1 thread stably
    shape = Shape("large", hidden, layers, 4, 2, 16, 2 * hidden, vision_depth=1, deepstack=(0,))
    adapter = build_adapter(shape)
    image = make_image(tokens)
    opts = {"mask_mode": "vision", "num_tokens": steps, "logits": logits,
            "max_pixels": image.size[0] * image.size[1]}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "large.parquet"
        rss_before = _rss_mb()
        with PeakMemory(torch.device("cpu")) as peak:
            t0 = time.perf_counter()
            res = run_sweep(adapter, [image], PROMPT, opts, output=out)
            seconds = time.perf_counter() - t0
        file_mb = out.stat().st_size / 2**20
    seq = len(res.metadata["tokens"])
    return {"image_tokens": tokens, "layers": layers, "steps": steps, "logits": logits, "hidden": hidden,
            "seq": seq, "rows": res.num_rows, "seconds": round(seconds, 3), "rss_before_mb": round(rss_before, 1),
            "peak_rss_mb": round(peak.mb, 1), "growth_mb": round(peak.mb - rss_before, 1),
            "arrow_peak_mb": round(_arrow_peak_mb(), 1), "memory_kind": peak.kind, "file_mb": round(file_mb, 1),
            "model": shape.describe()}


# ------------------------------------------------------------------------------------------- part 3
def write_synthetic(path: str | os.PathLike, image_tokens: int = 16384, layers: int = 36, heads: int = 32,
                    steps: int = 3, seed: int = 0) -> dict[str, Any]:
    """A format-correct sweep file with random values, written by maskvl's own writer.

    One square image of ``image_tokens`` merged tokens between a few text tokens, ``mask_mode`` both
    (every position masked), Full, Attn, ``heads`` heads and Logits, ``steps`` steps; returns a
    description (rows, seconds, size).
    """
    import math

    import numpy as np

    from maskvl import io, measures
    from maskvl.engine import LayerResult
    from maskvl.models.base import ImageInfo

    side = math.isqrt(image_tokens)
    if side * side != image_tokens:
        raise ValueError("image_tokens must be a square number")
    before = ["<|im_start|>", "user", "\n", "<|vision_start|>"]
    after = ["<|vision_end|>", "What", " is", " in", " this", " image", "?", "<|im_end|>", "\n", "<|im_start|>",
             "assistant", "\n"]
    texts = before + ["<|image_pad|>"] * image_tokens + after
    info = ImageInfo(0, None, side, side, len(before), len(before) + image_tokens, (side * 32, side * 32),
                     (side * 32, side * 32))
    image = info.to_dict()
    tokens = io.TokenTable.build(texts, [info])
    ids = list(range(len(texts)))
    variants = measures.variant_names(heads, logits=True)
    rng = np.random.default_rng(seed)
    meta = io.base_metadata(model="synthetic", dtype="float32", device="cpu", backend="none", prompt="What is in "
                            "this image?", mask_mode="both", num_layers=layers, num_heads=heads,
                            layers=list(range(layers)), variants=variants, images=[image], target={"mode": "greedy"},
                            logits=True, knockout_window=1, num_steps=steps, steps_completed=0, complete=False)
    generated = []
    t0 = time.perf_counter()
    sink = io.ParquetSink(path)
    try:
        for step in range(steps):
            P = len(tokens.texts)
            positions = np.arange(P)
            nan = np.full((len(variants) - 1, P), np.nan, np.float32)
            for layer in range(layers):
                l2 = rng.random((len(variants), P), dtype=np.float32)
                cos = rng.random((len(variants), P), dtype=np.float32) * 0.1
                kl = np.concatenate([nan, rng.random((1, P), dtype=np.float32)])
                tpd = np.concatenate([nan, rng.random((1, P), dtype=np.float32) - 0.5])
                lr = LayerResult(layer, variants, positions, l2, cos, kl, tpd)
                sink.write(io.rows_table(step, [lr], tokens, float64=False))
            generated.append({"step": step, "id": 1000 + step, "text": f" w{step}"})
            if step + 1 < steps:
                tokens.append(f" w{step}")
                ids.append(1000 + step)
        meta.update(tokens=tokens.to_list(ids), generated=generated, steps_completed=steps, complete=True,
                    generated_text="".join(g["text"] for g in generated),
                    synthetic={"write_s": round(time.perf_counter() - t0, 1), "seed": seed})
        out = sink.close(meta)
    except BaseException:
        sink.abort(meta)
        raise
    import pyarrow.parquet as pq

    md = pq.ParquetFile(out).metadata
    return {"path": str(out), "rows": md.num_rows, "row_groups": md.num_row_groups,
            "size_mb": round(out.stat().st_size / 2**20, 1), "write_s": round(time.perf_counter() - t0, 1),
            "image_tokens": image_tokens, "layers": layers, "variants": len(variants), "steps": steps}


def read_once(path: str) -> dict[str, Any]:
    """Time reads of a big file in this process (call it in a fresh one)."""
    t0 = time.perf_counter()
    import maskvl
    import maskvl.results  # what maskvl.open imports on first use: numpy, pyarrow, maskvl.io

    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    s = maskvl.open(path)
    open_s = time.perf_counter() - t0
    layer = s.layers[len(s.layers) * 5 // 9]  # layer 20 of 36
    t0 = time.perf_counter()
    grid = s.grid(image=0, step=1, layer=layer, variant="Full", metric="l2")
    first_grid_s = time.perf_counter() - t0
    import numpy as np

    assert not np.isnan(grid).any()
    more = []
    heads = [v for v in s.variants if v.startswith("Head_")]
    for step, lay, variant in [(0, s.layers[0], "Attn"), (s.steps[-1], s.layers[-1], heads[len(heads) // 4]),
                               (1, layer, "Logits")]:
        t0 = time.perf_counter()
        s.grid(image=0, step=step, layer=lay, variant=variant, metric="l2")
        more.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    maps = s.maps(image=0, layers=[layer], variant="Full")
    maps_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    s.top(10, steps=1, layers=[layer])
    top_s = time.perf_counter() - t0
    import resource

    return {"rows": s.num_rows, "row_groups": s.num_row_groups, "grid_shape": list(grid.shape),
            "import_s": round(import_s, 3), "open_s": round(open_s, 3), "first_grid_s": round(first_grid_s, 3),
            "grid_median_s": round(statistics.median(more), 3), "maps_1_layer_3_steps_s": round(maps_s, 3),
            "maps_shape": list(maps.shape), "top10_1_layer_s": round(top_s, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "memory_kind": "process RSS high-water since start (ru_maxrss), imports included"}


# ---------------------------------------------------------------------------------------- reporting
def markdown(record: dict[str, Any]) -> str:
    """The RESULTS.md tables of a ``--json`` record."""
    lines = []
    sweeps = record.get("sweep") or []
    if sweeps:
        lines += ["| image tokens | seq | layers | steps | rows | sweep s | RSS before MB | peak RSS MB | "
                  "growth MB | arrow peak MB | file MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['image_tokens']:,} | {r['seq']:,} | {r['layers']} | {r['steps']} | {r['rows']:,} | "
                  f"{r['seconds']:.1f} | {r['rss_before_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['growth_mb']:.0f} | "
                  f"{r['arrow_peak_mb']:.1f} | {r['file_mb']:.1f} |" for r in sweeps]
    layers = record.get("layers") or []
    if layers:
        lines += ["", "| image tokens | layers | logits | sweep s | RSS before MB | peak RSS MB | growth MB | "
                  "arrow peak MB |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['image_tokens']:,} | {r['layers']} | {'yes' if r['logits'] else 'no'} | {r['seconds']:.1f} | "
                  f"{r['rss_before_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['growth_mb']:.0f} | "
                  f"{r['arrow_peak_mb']:.1f} |" for r in layers]
    read = record.get("read")
    if read:
        f = record["synthetic"]
        write = f"{f['write_s']:.0f}" if f.get("write_s") is not None else "?"
        lines += ["", "| file | rows | row groups | MB | written in s | imports s | open s | first grid s | "
                  "open + first grid s | more grids (median) s | maps 1 layer x 3 steps s | top-10 of 1 layer s | "
                  "peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
                  f"| synthetic: {f['image_tokens']:,} image tokens, {f['layers']} layers, {f['variants']} variants, "
                  f"{f['steps']} steps | {read['rows']:,} | {read['row_groups']} | {f['size_mb']:.0f} | {write} | "
                  f"{read['import_s']:.2f} | {read['open_s']:.3f} | {read['first_grid_s']:.3f} | "
                  f"{read['open_s'] + read['first_grid_s']:.3f} | {read['grid_median_s']:.3f} | "
                  f"{read['maps_1_layer_3_steps_s']:.3f} | {read['top10_1_layer_s']:.3f} | {read['peak_rss_mb']:.0f} |"]
    return "\n".join(lines)


def plot(record: dict[str, Any], out: str) -> None:
    """Log-log: sweep seconds and memory against image tokens."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    sweeps = sorted(record["sweep"], key=lambda r: r["image_tokens"])
    xs = [r["image_tokens"] for r in sweeps]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4.2))
    ax_t.plot(xs, [r["seconds"] for r in sweeps], "-o", label="whole sweep (run_sweep)")
    ax_m.plot(xs, [r["peak_rss_mb"] for r in sweeps], "-o", label="peak RSS (VmHWM)")
    ax_m.plot(xs, [r["growth_mb"] for r in sweeps], "-s", label="peak RSS - RSS before the sweep")
    ax_m.plot(xs, [r["arrow_peak_mb"] for r in sweeps], "-^", label="pyarrow pool peak (rows in flight)")
    for ax, ys in ((ax_t, [r["seconds"] for r in sweeps]), (ax_m, [r["growth_mb"] for r in sweeps])):
        # Guides through the last point: slope 1 (linear) and 2 (quadratic).
        x1, y1 = xs[-1], ys[-1]
        ax.plot(xs, [y1 * x / x1 for x in xs], ":", color="grey", label="\u221d tokens")
        ax.plot(xs, [y1 * (x / x1) ** 2 for x in xs], "--", color="lightgrey", label="\u221d tokens\u00b2")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("image tokens (masked positions per layer)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax_t.set_ylabel("seconds")
    ax_m.set_ylabel("MB")
    m = record.get("machine", {})
    r0 = sweeps[0]
    fig.suptitle(f"maskvl sweep, {r0['layers']} layers, hidden {r0['hidden']}, {r0['steps']} steps, mask_mode vision "
                 f"(CPU, {m.get('torch_threads', 1)} torch thread; {m.get('cpu', '')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1024,2048,4096,8192,16384", help="image-token counts of part 1")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the part 1 model")
    ap.add_argument("--steps", type=int, default=2, help="generation steps of every sweep")
    ap.add_argument("--layers-series", default="2,4,8", help="layer counts of part 2")
    ap.add_argument("--layers-tokens", type=int, default=2048, help="image tokens of part 2")
    ap.add_argument("--big-file", default=os.path.join(tempfile.gettempdir(), "maskvl-bench-62M.parquet"),
                    help="the synthetic file of part 3 (written if absent or of another size)")
    ap.add_argument("--big-tokens", type=int, default=16384)
    ap.add_argument("--big-layers", type=int, default=36)
    ap.add_argument("--big-heads", type=int, default=32)
    ap.add_argument("--big-steps", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: sweep, layers, read")
    ap.add_argument("--smoke", action="store_true", help="a tiny version of every part")
    ap.add_argument("--json", help="write the record here")
    ap.add_argument("--plot", help="write the log-log plot here (PNG)")
    ap.add_argument("--child-sweep", help=argparse.SUPPRESS)
    ap.add_argument("--child-read", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.child_sweep:
        tokens, layers, steps, logits = (int(x) for x in a.child_sweep.split(","))
        print(json.dumps(sweep_once(tokens, layers, steps, bool(logits))))
        return 0
    if a.child_read:
        print(json.dumps(read_once(a.child_read)))
        return 0

    import torch

    from benchmarks.bench_sweep import _loadavg, commit, machine, worktree_dirty

    smoke_dir = tempfile.TemporaryDirectory() if a.smoke else None
    if smoke_dir is not None:
        a.sizes, a.layers, a.steps, a.layers_series, a.layers_tokens = "16,64", 2, 2, "1,2", 16
        a.big_tokens, a.big_layers, a.big_heads, a.big_steps = 64, 3, 2, 2
        a.big_file = os.path.join(smoke_dir.name, "small.parquet")
    skip = {s for s in a.skip.split(",") if s}
    record: dict[str, Any] = {"benchmark": "bench_large",
                              "machine": {**machine(torch.device("cpu")), "torch_threads": 1},
                              "commit": commit(), "worktree_dirty": worktree_dirty(), "loadavg_before": _loadavg()}
    t_all = time.perf_counter()
    if "sweep" not in skip:
        record["sweep"] = []
        for n in (int(x) for x in a.sizes.split(",")):
            r = _child(["--child-sweep", f"{n},{a.layers},{a.steps},0"], timeout=1800)
            print(f"sweep {n:>6} image tokens: {r['seconds']:7.1f} s, peak RSS {r['peak_rss_mb']:7.0f} MB "
                  f"(growth {r['growth_mb']:.0f} MB), {r['rows']:,} rows", flush=True)
            record["sweep"].append(r)
    if "layers" not in skip:
        record["layers"] = []
        for n_layers in (int(x) for x in a.layers_series.split(",")):
            r = _child(["--child-sweep", f"{a.layers_tokens},{n_layers},{a.steps},1"], timeout=1800)
            print(f"layers {n_layers:>3} ({a.layers_tokens} tokens, logits): {r['seconds']:7.1f} s, peak RSS "
                  f"{r['peak_rss_mb']:7.0f} MB (growth {r['growth_mb']:.0f} MB)", flush=True)
            record["layers"].append(r)
    if "read" not in skip:
        from maskvl import io

        want = {"image_tokens": a.big_tokens, "layers": a.big_layers, "variants": a.big_heads + 3,
                "steps": a.big_steps}
        path = Path(a.big_file)
        md = io.read_metadata(path) if path.exists() else None
        if md is not None and md.get("model") == "synthetic" and [len(md["layers"]), len(md["variants"]),
                                                                  md["num_steps"]] == [a.big_layers, a.big_heads + 3,
                                                                                       a.big_steps] \
                and md["images"][0]["grid_rows"] ** 2 == a.big_tokens:
            import pyarrow.parquet as pq

            pm = pq.ParquetFile(path).metadata
            record["synthetic"] = {**want, "path": str(path), "rows": pm.num_rows, "row_groups": pm.num_row_groups,
                                   "size_mb": round(path.stat().st_size / 2**20, 1),
                                   "write_s": (md.get("synthetic") or {}).get("write_s")}
        else:
            record["synthetic"] = write_synthetic(path, a.big_tokens, a.big_layers, a.big_heads, a.big_steps)
        print(f"synthetic file: {record['synthetic']['rows']:,} rows, {record['synthetic']['size_mb']} MB", flush=True)
        record["read"] = _child(["--child-read", str(path)], timeout=600)
        r = record["read"]
        print(f"read: import {r['import_s']:.2f} s, open {r['open_s']:.3f} s, first grid {r['first_grid_s']:.3f} s, "
              f"more grids {r['grid_median_s']:.3f} s (median)", flush=True)
    record["total_s"] = round(time.perf_counter() - t_all, 1)
    record["loadavg_after"] = _loadavg()
    print(markdown(record))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(record, indent=1) + "\n")
    if a.plot and record.get("sweep"):
        plot(record, a.plot)
    if smoke_dir is not None:
        smoke_dir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
