"""The gated-delta-rule knockout (``maskvl::gated_delta_knockout``) against the naive per-position recurrence.

    python benchmarks/bench_gated_delta.py                       # the CI-sized case (T = 256)
    python benchmarks/bench_gated_delta.py --T 256 1024 --json out.json
    python benchmarks/bench_gated_delta.py --device cuda --dtype bfloat16 --T 4096

At the shape of Qwen3.5's linear-attention layers (16 key heads, 32 value heads, head dims 128 x 128; random
inputs: q, k, v normal, log-decays uniform in (-3, 0), beta uniform in (0, 1)), one layer, T positions:

* naive: what the knockout costs without the closed form: transformers' own Qwen3.5 gated delta rule
  (``torch_recurrent_gated_delta_rule`` or ``torch_chunk_gated_delta_rule``, whichever is faster here; the
  model's prefill uses the chunked one) run once clean and once per position ``p`` with ``g_p = 0`` and
  ``beta_p = 0``, the final readout kept. It is timed on ``--naive-positions`` positions (spread over the
  sequence) and extrapolated to all T + 1 runs; the records say so (``naive_extrapolated``).
* the closed form: one call of the op per backend (``reference``, ``cpp`` on CPU; ``triton`` on CUDA).

Each record also carries the largest error of the op's ``o + delta_p`` against the naive runs it timed,
relative to the clean readout's size (both in float32 on the CPU). On the CPU torch is pinned to one
intra-op thread by default on both sides (``--threads 0`` keeps torch's default), as in
``benchmarks/run.py``'s CPU presets. :func:`run_case` is the entry point for a preset.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from maskvl.ops import get_backend  # noqa: E402

# Qwen3.5 (transformers' Qwen3_5TextConfig defaults): linear_num_key_heads, linear_num_value_heads,
# linear_key_head_dim, linear_value_head_dim.
HK, HV, DK, DV = 16, 32, 128, 128
CI_CASE = {"T": 256, "dtype": "float32", "device": "cpu", "naive_positions": 4}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _median_time(fn, repeat: int, dev: torch.device) -> float:
    fn()  # warm-up (and Triton's compile)
    _sync(dev)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_inputs(T: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``q [T, HK, DK]`` (all positions, as transformers takes them), ``k``, ``v [T, HV, DV]``, ``g, beta [T, HV]``.
    g is float32 as the model computes it (float64 for float64)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(T, HK, DK, generator=gen)
    k = torch.randn(T, HK, DK, generator=gen)
    v = torch.randn(T, HV, DV, generator=gen)
    g = -3.0 * torch.rand(T, HV, generator=gen)
    beta = torch.rand(T, HV, generator=gen)
    gdt = torch.float64 if dtype == torch.float64 else torch.float32
    return (q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), g.to(device, gdt), beta.to(device, dtype))


def _transformers_final(fn, q, k, v, g, beta) -> torch.Tensor:
    out, _ = fn(q[None], k[None], v[None], g=g[None], beta=beta[None], use_qk_l2norm_in_kernel=True)
    return out[0, -1].float()  # [HV, DV]


def run_case(T: int, dtype: str = "float32", device: str = "cpu", naive_positions: int = 4, repeat: int = 3,
             backends: list[str] | None = None) -> dict:
    """Time one case; returns its record (seconds are medians over ``repeat`` runs)."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import (
        torch_chunk_gated_delta_rule,
        torch_recurrent_gated_delta_rule,
    )

    dev = torch.device(device)
    dt = DTYPES[dtype]
    q, k, v, g, beta = make_inputs(T, dt, dev)
    if backends is None:
        backends = ["reference", "cpp"] if dev.type == "cpu" else ["reference", "triton"]
    positions = sorted({round(i * (T - 1) / max(1, naive_positions - 1)) for i in range(naive_positions)})

    def skipped(fn, p):
        g2, b2 = g.clone(), beta.clone()
        g2[p], b2[p] = 0, 0
        return _transformers_final(fn, q, k, v, g2, b2)

    per_run = {}
    for name, fn in (("recurrent", torch_recurrent_gated_delta_rule), ("chunked", torch_chunk_gated_delta_rule)):
        per_run[name] = _median_time(lambda fn=fn: _transformers_final(fn, q, k, v, g, beta), repeat, dev)
    naive_name = min(per_run, key=per_run.get)
    naive_fn = torch_recurrent_gated_delta_rule if naive_name == "recurrent" else torch_chunk_gated_delta_rule
    t0 = time.perf_counter()
    clean = _transformers_final(naive_fn, q, k, v, g, beta)
    masked = {p: skipped(naive_fn, p) for p in positions}
    _sync(dev)
    measured = time.perf_counter() - t0
    naive_s = measured / (len(positions) + 1) * (T + 1)

    rec = {
        "case": f"gdn-T{T}-{dtype}-{device}", "T": T, "Hk": HK, "Hv": HV, "dk": DK, "dv": DV, "dtype": dtype,
        "device": device, "threads": torch.get_num_threads(), "naive_impl": f"transformers {naive_name} x (T + 1)",
        "naive_per_run_s": per_run, "naive_positions": positions,
        "naive_extrapolated": len(positions) < T, "naive_s": naive_s, "closed_s": {}, "speedup": {},
        "max_rel_err_vs_naive": {},
    }
    scale = DK ** -0.5
    for name in backends:
        be = get_backend(name, dev)
        rec["closed_s"][name] = _median_time(lambda be=be: be.gated_delta_knockout(q[-1], k, v, g, beta, scale, True),
                                             repeat, dev)
        rec["speedup"][name] = naive_s / rec["closed_s"][name]
        o, delta = be.gated_delta_knockout(q[-1], k, v, g, beta, scale, True)
        size = float(clean.abs().max())
        err = max([float((o.float() - clean).abs().max())]
                  + [float((o.float() + delta[p].float() - masked[p]).abs().max()) for p in positions])
        rec["max_rel_err_vs_naive"][name] = err / size
    return rec


def format_record(rec: dict) -> str:
    lines = [f"{rec['case']}: Hk {rec['Hk']}, Hv {rec['Hv']}, {rec['dk']} x {rec['dv']}, {rec['threads']} thread(s); "
             f"naive = {rec['naive_impl']} (per run: "
             + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in rec["naive_per_run_s"].items()) + ")"
             + (f", timed on {len(rec['naive_positions'])} positions and extrapolated" if rec["naive_extrapolated"] else "")]
    lines.append(f"  {'naive':<10}{rec['naive_s']:>12.3f} s")
    for name, s in rec["closed_s"].items():
        lines.append(f"  {name:<10}{s:>12.4f} s   {rec['speedup'][name]:>8.0f}x faster   "
                     f"max |error| / |o| vs naive {rec['max_rel_err_vs_naive'][name]:.1e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, nargs="+", default=[CI_CASE["T"]])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=CI_CASE["dtype"])
    ap.add_argument("--device", default=CI_CASE["device"])
    ap.add_argument("--naive-positions", type=int, default=CI_CASE["naive_positions"],
                    help="positions whose naive run is timed (the rest extrapolated)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--json", help="write the records here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)", flush=True)
    records = []
    for T in args.T:
        rec = run_case(T, args.dtype, args.device, args.naive_positions, args.repeat)
        print(format_record(rec), flush=True)
        records.append(rec)
    if args.json:
        from maskvl.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
