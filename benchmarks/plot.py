"""Plot time per sweep against image tokens (log-log), baseline and maskvl, from ``run.py --json`` records.

    python benchmarks/plot.py benchmarks/results/scaling_cpu.json -o benchmarks/scaling.png

One colour per model shape; solid lines: maskvl (one line per backend); dashed: the prototype's
algorithm; dotted: the brute force. Hollow markers: baseline times extrapolated from a measured subset
of layers/positions (the record says which). Only cases with the given number of steps are drawn.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def plot(records: list[dict], out: str, steps: int = 1, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in records if r["steps"] == steps and not r.get("logits")]
    if not records:
        raise SystemExit(f"no records with {steps} step(s)")
    shapes = sorted({r["shape"] for r in records}, key=lambda s: min(r["model"]["hidden_size"] for r in records
                                                                      if r["shape"] == s))
    colours = dict(zip(shapes, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, ax = plt.subplots(figsize=(7.5, 5.2))

    fast: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    naive: dict[tuple[str, str], dict[int, tuple[float, bool]]] = defaultdict(dict)
    for r in records:
        fast[(r["shape"], r["backend"])][r["image_tokens"]] = r["fast_s"]
        naive[(r["shape"], r["baseline"])][r["image_tokens"]] = (r["naive_s"], r["naive_extrapolated"])

    for (shape, backend), pts in sorted(fast.items()):
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], "-o", color=colours[shape], label=f"maskvl [{backend}], {shape}")
    styles = {"prototype": ("--s", "prototype algorithm"), "bruteforce": (":^", "brute force")}
    for (shape, baseline), pts in sorted(naive.items()):
        xs = sorted(pts)
        style, label = styles.get(baseline, ("-.x", baseline))
        ax.plot(xs, [pts[x][0] for x in xs], style[:-1], color=colours[shape], label=f"{label}, {shape}")
        for x in xs:
            t, extrapolated = pts[x]
            ax.plot([x], [t], style[-1], color=colours[shape], markerfacecolor="none" if extrapolated else colours[shape])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("image tokens (masked positions per layer)")
    ax.set_ylabel("seconds per sweep (all layers, warm)")
    machine = records[0].get("machine", {})
    desc = f"{records[0]['device']}, {records[0]['dtype']}, torch {machine.get('torch', '?')}, " \
           f"{machine.get('torch_threads', '?')} thread(s)"
    ax.set_title(title or f"maskvl vs baselines, {steps} step(s): {desc}\n"
                 "hollow markers: baseline extrapolated from a measured subset", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=130)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="record files written by run.py --json")
    ap.add_argument("-o", "--output", default=str(Path(__file__).with_name("scaling.png")))
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--title")
    args = ap.parse_args(argv)
    records = [r for f in args.json for r in json.loads(Path(f).read_text())]
    plot(records, args.output, args.steps, args.title)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
