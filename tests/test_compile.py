"""``make compile-check`` (kernels/compile_check.py): its judging rules on known inputs, and real
ahead-of-time compiles for sm_90 without a GPU in a fresh process (the test process runs triton's
interpreter), including a kernel with the 32-bit row offsets that once overflowed at Logits sizes, a
kernel that spills registers and one that does not compile: each must be reported as a failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kernels import compile_check as cc

ROOT = Path(__file__).resolve().parent.parent

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_decode' for 'sm_90a'
ptxas info    : Function properties for _decode
    6544 bytes stack frame, 10352 bytes spill stores, 12192 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 6544 bytes cumulative stack size
ptxas info    : Compiling entry function '_stats' for 'sm_90a'
ptxas info    : Function properties for _stats
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers
"""


def test_parse_ptxas_log():
    got = cc.parse_ptxas_log(PTXAS_LOG)
    assert got == {"_decode": {"stack": 6544, "spill_stores": 10352, "spill_loads": 12192, "registers": 255},
                   "_stats": {"stack": 0, "spill_stores": 0, "spill_loads": 0, "registers": 40}}


def _row(**kw):
    base = dict(arch=90, op="decode_attention", kernel="_decode", dtype="bf16", T=16384, label="",
                grid=[8, 2500], num_warps=8, registers=132, shared=26752, spill_stores=0, spill_loads=0, stack=0)
    base.update(kw)
    return cc.Row(**base)


def test_judge_passes_a_clean_kernel():
    assert cc.judge(_row()) == []


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_judge_fails_spills_on_the_16_and_32_bit_paths(dtype):
    problems = cc.judge(_row(dtype=dtype, spill_stores=456, spill_loads=388))
    assert problems and "register spills" in problems[0]


def test_judge_reports_but_passes_fp64_spills():
    assert cc.judge(_row(dtype="fp64", spill_stores=48, spill_loads=48)) == []


def test_judge_shared_memory_limits_per_target():
    """200 KB fits an H100 (227 KB per block) but not an A100 (163 KB)."""
    assert cc.judge(_row(arch=90, shared=200 * 1024)) == []
    problems = cc.judge(_row(arch=80, shared=200 * 1024))
    assert problems == [f"shared memory {200 * 1024} B > {163 * 1024} B (sm_80)"]


def test_judge_grid_limits_and_missing_report():
    assert cc.judge(_row(grid=[8, 70_000])) == ["grid axis 1 = 70000 > 65535"]
    assert cc.judge(_row(registers=None)) == ["no ptxas report for this kernel"]


# Triton IR of `d_ptr + offs_t[:, None] * N` (the row-offset pattern of the old _vector_distances), with
# 32-bit and with 64-bit row indices, and of a product with a compile-time constant.
TTIR_I32 = """\
    %offs_t = tt.get_program_id x : i32 loc(#loc1)
    %c32 = arith.constant 32 : i32 loc(#loc1)
    %base = arith.muli %offs_t, %c32 : i32 loc(#loc1)
    %r = tt.make_range {end = 32 : i32, start = 0 : i32} : tensor<32xi32> loc(#loc2)
    %b = tt.splat %base : i32 -> tensor<32xi32> loc(#loc2)
    %rows = arith.addi %b, %r : tensor<32xi32> loc(#loc2)
    %e = tt.expand_dims %rows {axis = 1 : i32} : tensor<32xi32> -> tensor<32x1xi32> loc(#loc3)
    %n = tt.splat %N : i32 -> tensor<32x1xi32> loc(#loc3)
    %off = arith.muli %e, %n : tensor<32x1xi32> loc(#loc3)
    %p = tt.splat %d_ptr : !tt.ptr<f32> -> tensor<32x1x!tt.ptr<f32>> loc(#loc4)
    %q = tt.addptr %p, %off : tensor<32x1x!tt.ptr<f32>>, tensor<32x1xi32> loc(#loc4)
"""
TTIR_I64 = TTIR_I32.replace("%off = arith.muli %e, %n : tensor<32x1xi32>",
                            "%off = arith.muli %e, %n : tensor<32x1xi64>")


def test_narrow_address_products_on_ir():
    assert cc.narrow_address_products(TTIR_I32) == ["%off = arith.muli %e, %n : tensor<32x1xi32>"]
    assert cc.narrow_address_products(TTIR_I64) == []  # 64-bit product
    # pid * BLOCK_T (a constant) alone is not flagged
    only_const = TTIR_I32.replace("%q = tt.addptr %p, %off", "%q = tt.addptr %p, %b")
    assert cc.narrow_address_products(only_const) == []


SCRIPT = '''
import json, sys
from kernels import compile_check as cc

cache = cc._prepare_environment()
import torch
import triton
import triton.language as tl
from triton.runtime import driver

from kernels import _launch

code = cc.main(["--only", "vector_distances", "--arch", "90", "--dtype", "fp32", "--T", "20000",
                "--jobs", "1", "--json", sys.argv[1] + "/rows.json"])


@triton.jit
def _rows_i32(d_ptr, out_ptr, T, N, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    # The row offsets of the old _vector_distances: row * N in 32 bits.
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, BLOCK_N)
    m = (offs_t < T)[:, None] & (offs_n < N)[None, :]
    d = tl.load(d_ptr + offs_t[:, None] * N + offs_n[None, :], mask=m, other=0.0)
    tl.store(out_ptr + offs_t, tl.sum(d, axis=1), mask=offs_t < T)


@triton.jit
def _big_tile(x_ptr, out_ptr, BLOCK: tl.constexpr):
    # Every element stays live across the reduction: 16384 floats on 32 threads cannot fit registers.
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr + offs, x * tl.sum(x, axis=0) + tl.cumsum(x, axis=0))


@triton.jit
def _does_not_compile(x_ptr, BLOCK: tl.constexpr):
    tl.static_assert(BLOCK < 16, "deliberate compile error")
    tl.store(x_ptr + tl.arange(0, BLOCK), 0.0)


driver.set_active(cc.CompileOnlyDriver(90))
meta = lambda *s: torch.empty(*s, dtype=torch.float32, device="meta")
out = {"main": code}
bad = cc.Case("test", "fp32", 0, "", lambda: _launch.launch(_does_not_compile, (1,), meta(32), BLOCK=32))
out["compile_error"] = cc.judge(cc.compile_case(90, bad, {})[0])
import contextlib, io
for name, run in (("rows_i32", lambda: _launch.launch(_rows_i32, (625,), meta(20000, 151936), meta(20000), 20000,
                                                      151936, BLOCK_T=32, BLOCK_N=256)),
                  ("big_tile", lambda: _launch.launch(_big_tile, (1,), meta(16384), meta(16384), BLOCK=16384,
                                                      num_warps=1))):
    log = io.StringIO()
    with _launch.compile_only() as got, contextlib.redirect_stdout(log):
        run()
    k = got[0].kernel
    stats = cc.parse_ptxas_log(log.getvalue())[got[0].name]
    row = cc.Row(90, "test", got[0].name, "fp32", 0, "", grid=list(got[0].grid), num_warps=k.metadata.num_warps,
                 registers=stats["registers"], shared=k.metadata.shared, spill_stores=stats["spill_stores"],
                 spill_loads=stats["spill_loads"], stack=stats["stack"],
                 narrow_offsets=cc.narrow_address_products(k.asm["ttir"]))
    out[name] = {"problems": cc.judge(row), "spill_stores": row.spill_stores}
print("RESULT " + json.dumps(out))
'''


def test_compiles_for_sm90_without_a_gpu(tmp_path):
    """In a fresh process (no interpreter): the real launcher compiles the Logits-size vector distances
    for sm_90 through Triton and ptxas and passes every check; the old 32-bit row-offset pattern, a
    register-spilling kernel and a kernel that fails to compile, compiled the same way, fail."""
    script = tmp_path / "check.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    res = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads(res.stdout.split("RESULT ", 1)[1])
    assert result["main"] == 0, res.stdout
    assert "sm_90 _vector_distances  fp32" in res.stdout and "rows=20000 N=151936" in res.stdout
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["kernel"] for r in rows] == ["_vector_distances"]
    assert rows[0]["problems"] == [] and rows[0]["registers"] > 0 and rows[0]["narrow_offsets"] == []
    assert rows[0]["grid"] == [625]
    narrow = result["rows_i32"]["problems"]
    assert len(narrow) == 1 and narrow[0].startswith("32-bit address products: ") and "xi32>" in narrow[0]
    spill = result["big_tile"]
    assert spill["spill_stores"] > 0 and any("register spills" in p for p in spill["problems"])
    (error,) = result["compile_error"]
    assert error.startswith("compile error: ") and "deliberate compile error" in error
