"""maskvl against the naive methods, side by side, in the same run.

    python benchmarks/run.py --device cpu --preset ci --json out.json
    python benchmarks/run.py --device cuda --preset gpu --json gpu.json
    python benchmarks/run.py --shape mid --tokens 16,64,256 --steps 1 --json custom.json

Presets (``--list`` prints their cases):

* ``ci``: CPU, float32, one torch thread, a random mid-size Qwen3-VL (hidden 512, 8 layers, GQA 8/4,
  DeepStack), 256 image tokens (281-token sequence), 1 step (baseline measured on 4 of the 8 layers)
  and 3 steps (baseline measured on 1 of the 8 layers), extrapolated to all layers to keep the run
  short; the ``scaling`` preset measures the same 1-step case fully. Plus one Qwen3-VL-MoE case: a
  random ``moe`` shape (hidden 256, 4 layers, GQA 16/2, 64 experts, top-8 routing), 128 image tokens,
  1 step, baseline measured on 1 of the 4 layers; and one text-only case: the same decoder as ``mid``
  as a Qwen3 text model (``Qwen3ForCausalLM``), a 256-token prompt, every text position masked, 1 step
  (baseline measured on 1 of the 8 layers). And one op case at Qwen3.5's linear-attention shape: the
  gated-delta-rule knockout (``benchmarks/bench_gated_delta.py``) over 256 positions against transformers'
  own recurrence run once per position (timed on 4 positions, extrapolated).

The CPU presets pin torch to one intra-op thread on both sides: on a shared 2-core container, OpenMP's
spin-waiting under oversubscription made the same sweep vary from 0.7 to 4.4 s with 2 threads (0.19 to
0.24 s with 1). ``--threads 0`` keeps torch's default.
* ``scaling``: CPU, the mid model and the tiny model, 16 to 4096 image tokens (the plot's data).
* ``shapes``: CPU, 64 image tokens across shapes up to the real Qwen3-VL-2B shape (about 10 GB RAM).
* ``gpu`` (``make gpu-check``): CUDA, bfloat16, a random-weight model of Qwen3-VL-4B's shapes, one
  1024x1024 image (1024 image tokens), 3 steps, every variant (Full, Attn, Head_0..Head_31) with and
  without Logits; the prototype's algorithm timed in the same run on 4 of the 36 layers and 128 of the
  masked positions, extrapolated (the records and the table say so); peak GPU memory recorded.
* ``gpu-scaling``: CUDA, bfloat16: the 4B shape at 16 (with the brute force), 1024 (1 step) and 16384
  image tokens, and the 2B and 8B shapes at 1024.

Where a case times the baseline on a subset of layers and/or positions, its records carry
``naive_extrapolated: true`` and name the subset; ``--full-baseline`` measures every case fully.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.bench_sweep import Case, available_backends, run_cases  # noqa: E402
from benchmarks.models import get_shape  # noqa: E402

PRESETS: dict[str, dict] = {
    "ci": {
        "device": "cpu", "dtype": "float32", "repeats": 3, "threads": 1,
        "cases": [
            Case("ci-mid-img256-s1", "mid", 256, 1, naive_layers=4),
            Case("ci-mid-img256-s3", "mid", 256, 3, naive_layers=1),
            Case("ci-moe-img128-s1", "moe", 128, 1, naive_layers=1),
            Case("ci-text-mid-tok256-s1", "text-mid", 0, 1, naive_layers=1, mask_mode="text", prompt_tokens=256),
        ],
        # Qwen3.5's linear-attention layers: the gated-delta-rule knockout op (positions T) against the naive
        # per-position recurrence (bench_gated_delta.run_case).
        "gated_delta": [256],
    },
    "scaling": {
        "device": "cpu", "dtype": "float32", "repeats": 3, "threads": 1,
        "cases": [
            Case("tiny-img16-s1", "tiny", 16, 1, bruteforce=True),
            Case("tiny-img64-s1", "tiny", 64, 1),
            Case("tiny-img256-s1", "tiny", 256, 1),
            Case("tiny-img1024-s1", "tiny", 1024, 1, naive_layers=1, naive_positions=64),
            Case("mid-img16-s1", "mid", 16, 1, bruteforce=True),
            Case("mid-img64-s1", "mid", 64, 1),
            Case("mid-img64-s3", "mid", 64, 3),
            Case("mid-img256-s1", "mid", 256, 1),
            Case("mid-img1024-s1", "mid", 1024, 1, naive_layers=1, naive_positions=32),
            Case("mid-img4096-s1", "mid", 4096, 1, naive_layers=1, naive_positions=4),
        ],
    },
    "shapes": {
        "device": "cpu", "dtype": "float32", "repeats": 1, "threads": 0,
        "cases": [
            Case("shapes-tiny-img64-s1", "tiny", 64, 1),
            Case("shapes-mid-img64-s1", "mid", 64, 1),
            Case("shapes-2b-img64-s1", "2b", 64, 1, naive_layers=1, naive_positions=8),
        ],
    },
    "gpu": {
        "device": "cuda", "dtype": "bfloat16", "repeats": 3, "threads": 0,
        "cases": [
            Case("gpu-4b-img1024-s3", "4b", 1024, 3, naive_layers=4, naive_positions=128),
        ],
        "gated_delta": [4096],
    },
    "gpu-scaling": {
        "device": "cuda", "dtype": "bfloat16", "repeats": 3, "threads": 0,
        "cases": [
            Case("gpu-4b-img16-s1", "4b", 16, 1, bruteforce=True),
            Case("gpu-4b-img1024-s1", "4b", 1024, 1, naive_layers=4),
            Case("gpu-4b-img16384-s1", "4b", 16384, 1, naive_layers=1, naive_positions=16),
            Case("gpu-2b-img1024-s1", "2b", 1024, 1, naive_layers=4),
            Case("gpu-8b-img1024-s1", "8b", 1024, 1, naive_layers=4),
        ],
    },
}

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _ints(spec: str) -> list[int]:
    return [int(x) for x in spec.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a named set of cases")
    ap.add_argument("--shape", help="custom cases: model shape (tiny, mid, 2b, 4b, 8b; tiny-moe, moe; "
                                    "text-tiny, text-mid)")
    ap.add_argument("--layers", type=int, help="custom cases: override the shape's number of layers")
    ap.add_argument("--tokens", default="16,64",
                    help="custom cases: image-token counts, or prompt lengths for a text-only shape (comma-separated)")
    ap.add_argument("--steps", default="1", help="custom cases: generation steps (comma-separated)")
    ap.add_argument("--naive-layers", type=int, help="custom cases: time the baseline on this many layers")
    ap.add_argument("--naive-positions", type=int, help="custom cases: ... and this many masked positions")
    ap.add_argument("--bruteforce", action="store_true", help="custom cases: also time the brute force")
    ap.add_argument("--mask-mode", choices=("text", "vision", "both"),
                    help="override the cases' mask mode (default: each preset case's own; custom cases: vision, "
                         "text for a text-only shape)")
    ap.add_argument("--device", help="cpu or cuda (default: the preset's)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="model dtype (default: the preset's)")
    ap.add_argument("--backends", help="comma-separated maskvl backends (default: every available one)")
    ap.add_argument("--repeats", type=int, help="timed repeats of each maskvl sweep (median reported)")
    ap.add_argument("--threads", type=int,
                    help="torch intra-op threads for both sides (0: torch's default; default: the preset's)")
    ap.add_argument("--full-baseline", action="store_true", help="time the baseline on every layer and position")
    ap.add_argument("--cases", help="only the preset's cases whose name contains one of these (comma-separated)")
    ap.add_argument("--json", help="write the records (a JSON list) here")
    ap.add_argument("--list", action="store_true", help="print the preset's cases and exit")
    args = ap.parse_args(argv)

    if args.preset:
        preset = PRESETS[args.preset]
        cases = list(preset["cases"])
        if args.cases:
            keys = args.cases.split(",")
            cases = [c for c in cases if any(k in c.name for k in keys)]
    elif args.shape:
        preset = {"device": "cpu", "dtype": "float32", "repeats": 1, "threads": 0}
        try:
            text = get_shape(args.shape).text_only
        except ValueError as exc:
            ap.error(str(exc))
        cases = [Case(f"{args.shape}{'-L' + str(args.layers) if args.layers else ''}-{'tok' if text else 'img'}{t}-s{s}",
                      args.shape, 0 if text else t, s, num_layers=args.layers, naive_layers=args.naive_layers,
                      naive_positions=args.naive_positions, bruteforce=args.bruteforce,
                      mask_mode="text" if text else "vision", prompt_tokens=t if text else None)
                 for t in _ints(args.tokens) for s in _ints(args.steps)]
    else:
        ap.error("give --preset or --shape")
    if args.mask_mode:
        cases = [dataclasses.replace(c, mask_mode=args.mask_mode) for c in cases]
    if args.list:
        for c in cases:
            print(c)
        for T in (preset.get("gated_delta", []) if args.preset else []):
            print(f"gdn-T{T}: the gated-delta-rule knockout op, {T} positions (benchmarks/bench_gated_delta.py)")
        return 0
    device = torch.device(args.device or preset["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype or preset["dtype"]]
    backends = args.backends.split(",") if args.backends else available_backends(device)
    repeats = args.repeats or preset["repeats"]
    threads = preset["threads"] if args.threads is None else args.threads
    if threads > 0:
        torch.set_num_threads(threads)
    print(f"device {device}, dtype {dtype}, backends {backends}, threads {torch.get_num_threads()}")
    records = run_cases(cases, device, dtype, backends, repeats, json_path=args.json,
                        full_baseline=args.full_baseline, log=lambda m: print(m, flush=True))
    print()
    print(f"{'name':48s} {'naive_s':>10s} {'fast_s':>9s} {'speedup':>9s} {'tok/s':>10s} {'peak MB':>8s}  note")
    for r in records:
        note = "naive extrapolated" if r["naive_extrapolated"] else ""
        print(f"{r['name']:48s} {r['naive_s']:10.2f} {r['fast_s']:9.3f} {r['speedup']:9.1f} "
              f"{r['tokens_per_s']:10.0f} {r['peak_mem_mb']:8.0f}  {note}")
    op_records = []
    if args.preset:
        from benchmarks import bench_gated_delta

        # --cases selects them by name too (gdn-T<positions>)
        op_T = [T for T in preset.get("gated_delta", [])
                if not args.cases or any(key in f"gdn-T{T}" for key in args.cases.split(","))]
        for T in op_T:
            rec = bench_gated_delta.run_case(T, args.dtype or preset["dtype"], device.type, repeat=repeats)
            print(bench_gated_delta.format_record(rec), flush=True)
            op_records.append(rec)
    if args.json:
        if op_records:
            from maskvl.io import atomic_write_text

            atomic_write_text(args.json, json.dumps(records + op_records, indent=1))
        print(f"wrote {len(records) + len(op_records)} records to {os.path.abspath(args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
