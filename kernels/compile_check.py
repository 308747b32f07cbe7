"""Compile every Triton kernel ahead of time for sm_80 and sm_90, without a GPU, and judge the result.

    python -m kernels.compile_check              # the CI selection (make compile-check)
    python -m kernels.compile_check --full       # every T for every dtype and arch
    python -m kernels.compile_check --only decode_attention --arch 90 --json out.json

Each case calls a project launcher (``kernels/<op>.py``) with meta tensors (no memory) of the shapes,
dtypes and strides of a real Qwen3-VL-4B sweep (32 heads, 8 KV heads, head_dim 128, hidden 2560,
vocabulary 151,936; KV caches as the engine hands them over: transposed views of ``[KV, S, D]``; the
gated-delta-rule knockout at Qwen3.5's linear-attention shapes: 16 key heads, 32 value heads, 128 x 128) inside
``kernels._launch.compile_only()``, with a Triton driver that reports the target GPU (compute capability
8.0 or 9.0) and launches nothing: every kernel is compiled exactly as a real run would specialize it,
through Triton's own pipeline down to ptxas. A row FAILS on:

* a compile error (Triton or ptxas);
* shared memory above the target's per-block limit (163 KB on sm_80, 227 KB on sm_90);
* register spills on a bf16 / fp16 / fp32 path (fp64 spills are reported, not failed);
* a grid beyond CUDA's limits (2^31 - 1 programs on axis 0, 65,535 on axes 1 and 2);
* a 32-bit product of two runtime integers inside an address computation (read from the kernel's
  Triton IR): such offsets overflow once an index space passes 2^31 elements, e.g. ``row * N`` over
  the Logits rows at a vocabulary of 151,936 from row 14,135 on.

The CI selection compiles every kernel for both targets in every accepted dtype at T = 16,384 (20,000
Logits rows), and T = 1 and T = 100 (the other integer specializations Triton makes: a size of 1, and
one not divisible by 16) on sm_90 for the default CUDA dtype (bf16; float32 for the distance ops, which
receive the compute dtype). ``--full`` adds every T for every dtype and target. Nothing is cached
between runs (a fresh Triton cache directory, removed at exit). This module is a tool: nothing in maskvl
imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any, Callable

import torch


def _prepare_environment() -> str:
    """Before triton is imported: compiled kernels (not the interpreter), every compile run in full (so
    that ptxas runs and prints its register and spill report, captured below), a private cache
    directory (returned; removed at the end). Importing this module has no such side effects: only
    :func:`main` calls this."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_check: triton was already imported for the interpreter (TRITON_INTERPRET=1); "
                         "run it in a fresh process without TRITON_INTERPRET")
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    cache = tempfile.mkdtemp(prefix="maskvl-compile-check-")
    os.environ["TRITON_CACHE_DIR"] = cache
    return cache


def _kernel_module(name: str) -> ModuleType:
    """A submodule of this package (imports triton)."""
    return importlib.import_module(f"{__package__}.{name}")


# Qwen3-VL-4B (text decoder).
HEADS, KV_HEADS, HEAD_DIM, HIDDEN, VOCAB = 32, 8, 128, 2560, 151_936
LOGITS_ROWS = 20_000
BIG_T = 16_384
ARCHS = (80, 90)
# Largest dynamic shared memory per block (CUDA C++ Programming Guide, compute capabilities table).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
GRID_LIMIT = (2**31 - 1, 65_535, 65_535)
# Qwen3.5 linear-attention (Gated DeltaNet) layers.
GDN_K_HEADS, GDN_V_HEADS, GDN_DIM = 16, 32, 128
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
SPILLS_ALLOWED = {"fp64"}


# ------------------------------------------------------------------------------------------ driver
class CompileOnlyDriver:
    """A Triton driver for a GPU that is not there: it reports the target and device 'arch' (so each
    target gets its own per-device kernel caches), stream 0, and CPU as the torch device."""

    def __init__(self, arch: int) -> None:
        self.arch = arch

    def is_active(self) -> bool:
        return True

    def get_current_target(self) -> Any:
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self) -> int:
        return self.arch

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


# ------------------------------------------------------------------------------------------- cases
def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _cache_view(T: int, dtype: torch.dtype) -> torch.Tensor:
    """``[T, KV, D]`` as the engine passes K/V: a transposed view of one layer's cache ``[KV, S, D]``."""
    return _meta(KV_HEADS, T + 1, HEAD_DIM, dtype=dtype).transpose(0, 1)[:T]


def _loo(dt: torch.dtype, T: int) -> None:
    # q is the captured final query (model dtype); K and V the cache of all T positions.
    kv = _meta(KV_HEADS, T, HEAD_DIM, dtype=dt).transpose(0, 1)
    _kernel_module("loo_attention").loo_attention(_meta(HEADS, HEAD_DIM, dtype=dt), kv, kv, HEAD_DIM ** -0.5)


def _groups(dt: torch.dtype, T: int) -> None:
    # Group knockout as --mask-groups blocks:4x4 hands it over: T / 16 groups of 16 positions (CSR, int64).
    kv = _meta(KV_HEADS, T, HEAD_DIM, dtype=dt).transpose(0, 1)
    ng, size = max(1, T // 16), min(16, T)
    members, offsets = _meta(ng * size, dtype=torch.int64), _meta(ng + 1, dtype=torch.int64)
    _kernel_module("loo_group_attention").loo_group_attention(_meta(HEADS, HEAD_DIM, dtype=dt), kv, kv,
                                                              HEAD_DIM ** -0.5, members, offsets)


def _head(dt: torch.dtype, T: int) -> None:
    o, delta, gram = _meta(HEADS, HEAD_DIM, dtype=dt), _meta(T, HEADS, HEAD_DIM, dtype=dt), _meta(
        HEADS, HEAD_DIM, HEAD_DIM, dtype=dt)
    _kernel_module("head_distances").head_distances(o, delta, gram)


def _vector(dt: torch.dtype, T: int, N: int) -> None:
    _kernel_module("vector_distances").vector_distances(_meta(N, dtype=dt), _meta(T, N, dtype=dt))


def _decode(dt: torch.dtype, T: int, B: int, sets: int = 0) -> None:
    # Queries and own rows come from the replayed layer in the compute dtype; the prefix is the cache.
    # With ``sets``, the group rows' key sets (exclude_sets [sets, T + 1] bool, exclude_set [B]).
    cd = _kernel_module("_launch").compute_dtype(dt)
    kp = _cache_view(T, dt)
    own = _meta(B, 2, KV_HEADS, HEAD_DIM, dtype=cd)
    q, exclude = _meta(B, HEADS, HEAD_DIM, dtype=cd), _meta(B, dtype=torch.int64)
    extra = (_meta(sets, T + 1, dtype=torch.bool), _meta(B, dtype=torch.int64)) if sets else ()
    _kernel_module("decode_attention").decode_attention(q, kp, kp, own[:, 0], own[:, 1], HEAD_DIM ** -0.5, exclude,
                                                        *extra)


def _gated_delta(dt: torch.dtype, T: int) -> None:
    # q, k, v as the layer makes them (model dtype, contiguous per position); g float32 (float64 in a
    # float64 model), beta in the model dtype.
    q, k = _meta(GDN_K_HEADS, GDN_DIM, dtype=dt), _meta(T, GDN_K_HEADS, GDN_DIM, dtype=dt)
    v = _meta(T, GDN_V_HEADS, GDN_DIM, dtype=dt)
    g = _meta(T, GDN_V_HEADS, dtype=torch.float64 if dt == torch.float64 else torch.float32)
    beta = _meta(T, GDN_V_HEADS, dtype=dt)
    _kernel_module("gated_delta_knockout").gated_delta_knockout(q, k, v, g, beta, GDN_DIM ** -0.5, True)


@dataclass(frozen=True)
class Case:
    """One launcher call: ``op`` at model dtype ``dtype`` and sequence length ``T`` (``label`` adds what
    else sets the shapes)."""

    op: str
    dtype: str
    T: int
    label: str
    run: Callable[[], None] = field(compare=False, repr=False)


def all_cases(full: bool = False) -> list[tuple[int, list[Case]]]:
    """``[(arch, cases)]``: the CI selection, or with ``full`` every T for every dtype and target."""
    def cases_for(dtypes_attn: list[str], dtypes_dist: list[str], Ts: list[int]) -> list[Case]:
        out: list[Case] = []
        for d in dtypes_attn:
            dt = DTYPES[d]
            for T in Ts:
                out.append(Case("loo_attention", d, T, f"T={T}", lambda dt=dt, T=T: _loo(dt, T)))
                out.append(Case("loo_group_attention", d, T, f"T={T} groups={max(1, T // 16)}",
                                lambda dt=dt, T=T: _groups(dt, T)))
        for d in dtypes_dist:
            dt = DTYPES[d]
            for T in Ts:
                out.append(Case("head_distances", d, T, f"rows={T}", lambda dt=dt, T=T: _head(dt, T)))
                out.append(Case("vector_distances", d, T, f"rows={T} N={HIDDEN}",
                                lambda dt=dt, T=T: _vector(dt, T, HIDDEN)))
            if BIG_T in Ts:
                out.append(Case("vector_distances", d, LOGITS_ROWS, f"rows={LOGITS_ROWS} N={VOCAB}",
                                lambda dt=dt: _vector(dt, LOGITS_ROWS, VOCAB)))
        for d in dtypes_attn:
            dt = DTYPES[d]
            for T in Ts:
                B = LOGITS_ROWS if T == BIG_T else T + 1
                out.append(Case("decode_attention", d, T, f"prefix={T} rows={B}",
                                lambda dt=dt, T=T, B=B: _decode(dt, T, B)))
                n = max(1, T // 16)  # group rows: one per group plus the clean row, each naming its set
                out.append(Case("decode_attention", d, T, f"prefix={T} sets={n}",
                                lambda dt=dt, T=T, n=n: _decode(dt, T, n + 1, n)))
        for d in dtypes_attn:
            dt = DTYPES[d]
            for T in Ts:
                out.append(Case("gated_delta_knockout", d, T, f"T={T}", lambda dt=dt, T=T: _gated_delta(dt, T)))
        return out

    attn, dist = list(DTYPES), ["fp32", "fp64"]  # the distance ops receive the compute dtype
    if full:
        return [(arch, cases_for(attn, dist, [1, 100, BIG_T])) for arch in ARCHS]
    plan = [(arch, cases_for(attn, dist, [BIG_T])) for arch in ARCHS]
    plan.append((90, cases_for(["bf16"], ["fp32"], [1, 100])))
    return plan


# ------------------------------------------------------------------------------------------ judging
@dataclass
class Row:
    """One compiled kernel (or one failed launcher call) with what the checks found."""

    arch: int
    op: str
    kernel: str
    dtype: str
    T: int
    label: str
    grid: list[int] = field(default_factory=list)
    num_warps: int = 0
    registers: int | None = None
    shared: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    narrow_offsets: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log: str) -> dict[str, dict[str, int]]:
    """``{function: {registers, stack, spill_stores, spill_loads}}`` from ``ptxas -v`` output."""
    out: dict[str, dict[str, int]] = {}
    name = None
    for line in log.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            name = m.group(1)
            out[name] = {}
            continue
        if name is None:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            out[name].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _PTXAS_REGS.search(line)
        if m:
            out[name]["registers"] = int(m.group(1))
    return out


def run_ptxas(ptx: str, arch: int) -> str:
    """``ptxas -v`` on ``ptx`` with the ptxas of the triton wheel (when Triton did not print its own log)."""
    import subprocess

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
                              "-o", os.path.join(d, "k.o")], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {res.stderr.strip()}")
    return res.stderr + res.stdout


_SSA = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)?\s*=\s*\"?([\w.]+)\"?(.*)$")
_OPERAND = re.compile(r"%[\w.$-]+")


def narrow_address_products(ttir: str) -> list[str]:
    """The 32-bit ``arith.muli`` of two runtime values that feed a ``tt.addptr`` offset in ``ttir``.

    Walks each address offset back through the integer ops that compute it (loads, function and loop
    arguments are leaves); a product is harmless when one side is a compile-time constant (block sizes,
    the stats row width), and a 64-bit product cannot overflow at any size that fits in memory. Each
    finding is returned as ``"%name = arith.muli ... : type"``.
    """
    defs: dict[str, tuple[str, list[str], str]] = {}
    addptr_offsets: list[str] = []
    for line in ttir.splitlines():
        m = _SSA.match(line)
        if not m:
            continue
        name, op, rest = m.group(1), m.group(2), m.group(3)
        body = rest.split(" loc(")[0]
        operand_part, _, types = body.partition(" : ")
        operands = [x.split("#")[0] for x in _OPERAND.findall(operand_part)]
        defs[name] = (op, operands, types.strip())
        if op == "tt.addptr" and len(operands) == 2:
            addptr_offsets.append(operands[1])

    const_memo: dict[str, bool] = {}

    def constant(v: str) -> bool:
        if v not in const_memo:
            const_memo[v] = False  # cycles (loop-carried values) are runtime
            d = defs.get(v)
            if d is not None:
                op, ops, _ = d
                const_memo[v] = op == "arith.constant" or (
                    op in ("tt.splat", "tt.broadcast", "tt.expand_dims", "arith.extsi", "arith.extui")
                    and all(constant(o) for o in ops))
        return const_memo[v]

    found: list[str] = []
    seen: set[str] = set()

    def walk(v: str) -> None:
        if v in seen:
            return
        seen.add(v)
        d = defs.get(v)
        if d is None:
            return  # a function or loop argument
        op, ops, types = d
        if op in ("tt.load", "scf.for", "scf.while", "scf.if", "tt.call", "tt.reduce", "tt.scan"):
            return  # a value computed elsewhere: its own addresses are checked where they are formed
        if op == "arith.muli" and re.search(r"(^|[^0-9])i32>?$", types) and not any(constant(o) for o in ops):
            found.append(f"{v} = arith.muli {', '.join(ops)} : {types}")
        for o in ops:
            walk(o)

    for off in addptr_offsets:
        walk(off)
    return found


def judge(row: Row) -> list[str]:
    """The problems of one compiled kernel (an empty list: it passes)."""
    problems = list(row.problems)
    limit = SHARED_LIMIT[row.arch]
    if row.shared is not None and row.shared > limit:
        problems.append(f"shared memory {row.shared} B > {limit} B (sm_{row.arch})")
    spills = (row.spill_stores or 0) + (row.spill_loads or 0)
    if spills and row.dtype not in SPILLS_ALLOWED:
        problems.append(f"register spills ({row.spill_stores} B stored, {row.spill_loads} B loaded per thread)")
    if row.registers is None and not row.problems:
        problems.append("no ptxas report for this kernel")
    for axis, (n, lim) in enumerate(zip(row.grid, GRID_LIMIT)):
        if n > lim:
            problems.append(f"grid axis {axis} = {n} > {lim}")
    if row.narrow_offsets:
        problems.append("32-bit address products: " + "; ".join(row.narrow_offsets))
    return problems


# ---------------------------------------------------------------------------------------- compiling
def compile_case(arch: int, case: Case, logs: dict[int, dict[str, int]]) -> list[Row]:
    """Run one case's launcher in compile-only mode for ``arch``; one :class:`Row` per kernel."""
    from triton.runtime import driver

    driver.set_active(CompileOnlyDriver(arch))
    out = io.StringIO()
    t0 = time.perf_counter()
    try:
        with _kernel_module("_launch").compile_only() as compiled, contextlib.redirect_stdout(out):
            case.run()
    except Exception as exc:  # a compile error: the row fails with Triton's message
        text = " ".join(line.strip() for line in str(exc).strip().splitlines()[:3])
        first = f"{type(exc).__name__}: {text}"
        return [Row(arch, case.op, "-", case.dtype, case.T, case.label, problems=[f"compile error: {first}"],
                    seconds=time.perf_counter() - t0)]
    seconds = time.perf_counter() - t0
    printed = parse_ptxas_log(out.getvalue())
    rows = []
    if not compiled:
        # loo_attention at T = 1 has a closed form in the launcher: nothing to compile.
        return [Row(arch, case.op, "(no kernel)", case.dtype, case.T, f"{case.op} {case.label}", registers=0,
                    seconds=seconds)]
    for c in compiled:
        k = c.kernel
        key = id(k)
        if key not in logs:
            stats = printed.get(c.name) or parse_ptxas_log(run_ptxas(k.asm["ptx"], arch)).get(c.name, {})
            stats["narrow"] = narrow_address_products(k.asm["ttir"])
            logs[key] = stats
        stats = logs[key]
        row = Row(arch, case.op, c.name, case.dtype, case.T, case.label, grid=list(c.grid),
                  num_warps=k.metadata.num_warps, registers=stats.get("registers"), shared=k.metadata.shared,
                  spill_stores=stats.get("spill_stores"), spill_loads=stats.get("spill_loads"),
                  stack=stats.get("stack"), narrow_offsets=list(stats["narrow"]), seconds=seconds / len(compiled))
        rows.append(row)
    return rows


_JOBS: list[tuple[int, list[Case]]] = []  # set before the worker processes fork (cases hold closures)


def _run_job(index: int) -> list[dict[str, Any]]:
    arch, cases = _JOBS[index]
    logs: dict[int, dict[str, int]] = {}  # by id() of compiled kernels, which Triton's caches keep alive
    rows = []
    for case in cases:
        for row in compile_case(arch, case, logs):
            row.problems = judge(row)
            rows.append(asdict(row))
    return rows


def _jobs(plan: list[tuple[int, list[Case]]], only: set[str] | None) -> list[tuple[int, list[Case]]]:
    """One job per (arch, op, dtype): the cases of a job share kernels, so they compile in one process."""
    groups: dict[tuple[int, str, str], list[Case]] = {}
    for arch, cases in plan:
        for c in cases:
            if only and c.op not in only:
                continue
            groups.setdefault((arch, c.op, c.dtype), []).append(c)
    # Longest first (the five loo_attention kernels, then the fp64 ones) for a better parallel finish.
    order = sorted(groups.items(), key=lambda kv: (kv[0][1] != "loo_attention", kv[0][2] != "fp64"))
    return [(arch, cases) for (arch, _, _), cases in order]


def format_table(rows: list[dict[str, Any]]) -> str:
    """The report: one line per compiled kernel."""
    head = (f"{'arch':<6}{'kernel':<19}{'dtype':<6}{'shape':<25}{'grid':<18}{'warps':>5}{'regs':>6}"
            f"{'shared':>9}{'spill st/ld':>13}  result")
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["op"], r["kernel"], r["arch"], list(DTYPES).index(r["dtype"]), r["T"])):
        spill = "-" if r["spill_stores"] is None else f"{r['spill_stores']}/{r['spill_loads']}"
        regs = "-" if r["registers"] is None else str(r["registers"])
        shared = "-" if r["shared"] is None else str(r["shared"])
        grid = "x".join(map(str, r["grid"])) or "-"
        if r["problems"]:
            result = "FAIL: " + " | ".join(r["problems"])
        elif r["spill_stores"] or r["spill_loads"]:
            result = "ok (fp64 spills reported, not failed)"
        else:
            result = "ok"
        lines.append(f"sm_{r['arch']:<3}{r['kernel']:<19}{r['dtype']:<6}{r['label']:<25}{grid:<18}"
                     f"{r['num_warps']:>5}{regs:>6}{shared:>9}{spill:>13}  {result}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="every T for every dtype and target")
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 80,90")
    ap.add_argument("--only", help="comma-separated ops (default: all)")
    ap.add_argument("--dtype", help="comma-separated dtypes of the cases (bf16, fp16, fp32, fp64; default: all)")
    ap.add_argument("--T", help="comma-separated sequence lengths / row counts of the cases (default: all)")
    ap.add_argument("--jobs", type=int, default=0, help="parallel compile processes (default: the usable CPUs, <= 4)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    archs = {int(a) for a in args.arch.split(",") if a.strip()}
    unknown = archs - set(SHARED_LIMIT)
    if unknown:
        ap.error(f"unknown arch {sorted(unknown)} (choose from {sorted(SHARED_LIMIT)})")
    plan = [(a, cs) for a, cs in all_cases(args.full) if a in archs]
    if args.dtype or args.T:
        dts = set(args.dtype.split(",")) if args.dtype else set(DTYPES)
        Ts = {int(t) for t in args.T.split(",")} if args.T else None
        plan = [(a, [c for c in cs if c.dtype in dts and (Ts is None or c.T in Ts)]) for a, cs in plan]
    jobs = _jobs(plan, set(args.only.split(",")) if args.only else None)
    if not jobs:
        ap.error("no case matches the filters")
    cache = _prepare_environment()
    import triton
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(args.jobs or min(4, ncpu), len(jobs)))
    print(f"triton {triton.__version__}, torch {torch.__version__}: compiling {sum(len(c) for _, c in jobs)} "
          f"launcher calls for sm_{', sm_'.join(map(str, sorted(archs)))} in {workers} process(es)", flush=True)
    t0 = time.perf_counter()
    try:
        _JOBS[:] = jobs
        if workers == 1:
            results = [_run_job(i) for i in range(len(jobs))]
        else:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                results = pool.map(_run_job, range(len(jobs)), chunksize=1)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    rows = [r for rs in results for r in rs]
    print(format_table(rows))
    failed = [r for r in rows if r["problems"]]
    kernels = {(r["arch"], r["kernel"]) for r in rows if r["kernel"] not in ("-", "(no kernel)")}
    print(f"\n{len(rows)} kernels compiled ({len(kernels)} kernel x target pairs) in "
          f"{time.perf_counter() - t0:.0f} s; {len(failed)} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
