"""Markdown tables of ``run.py --json`` records (for RESULTS.md: numbers are pasted, never typed).

    python benchmarks/tables.py benchmarks/results/ci_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _subset(r: dict) -> str:
    if not r["naive_extrapolated"]:
        return "all measured"
    layers = r["naive_layers_measured"]
    layers = "all" if layers == "all" else f"{len(layers)}/{r['layers']}"
    pos = r["naive_positions_measured"]
    pos = "all" if pos == "all" else f"{pos[0]}/{r['masked_per_step'][0]}"
    return f"extrapolated from {r['naive_measured_s']:.2f} s (layers {layers}, positions {pos})"


def table(records: list[dict]) -> str:
    head = ("| case | shape | image tok | seq | steps | baseline | backend | baseline s | maskvl s | speedup "
            "| masked tok/s | peak MB (maskvl / baseline) | rel. err l2 / cos | baseline timing |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        lines.append(
            f"| {r['case']} | {r['shape']} | {r['image_tokens']} | {r['seq_len']} | {r['steps_done']} | "
            f"{r['baseline']} | {r['backend']}{' +logits' if r['logits'] else ''} | {r['naive_s']:.2f} | "
            f"{r['fast_s']:.3f} | {r['speedup']:.1f}x | {r['tokens_per_s']:.0f} | "
            f"{r['peak_mem_mb']:.0f} / {r['naive_peak_mem_mb']:.0f} | {r['rel_err_l2']:.1e} / {r['rel_err_cos']:.1e} | "
            f"{_subset(r)} |")
    return "\n".join(lines)


def describe(records: list[dict]) -> str:
    r = records[0]
    m = r["machine"]
    loads = [x for rec in records for x in (rec.get("loadavg_before") or [])[:1] + (rec.get("loadavg_after") or [])[:1]]
    load = f", 1-min load average during the run {min(loads):.1f}-{max(loads):.1f}" if loads else ""
    return (f"{r['device']}, {r['dtype']}; {m.get('cpu')} ({m.get('cpus_usable')} usable CPUs, "
            f"{m.get('torch_threads')} torch thread(s)), torch {m.get('torch')}, transformers "
            f"{m.get('transformers')}{', GPU ' + m['gpu'] if 'gpu' in m else ''}; commit {r['commit'][:10]}{load}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("json", nargs="+")
    args = ap.parse_args(argv)
    for f in args.json:
        records = json.loads(Path(f).read_text())
        print(f"<!-- {f} -->")
        print(describe(records))
        print()
        print(table(records))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
