"""The gated-delta-rule knockout (reference, cpp, triton: under TRITON_INTERPRET=1 on CPU) against T + 1
literal recurrences (the naive oracle), against transformers' own Qwen3.5 gated delta rule (clean readout
and skipped writes), and against itself on strided and bf16 inputs."""

from __future__ import annotations

import functools

import pytest
import torch

from maskvl.numerics import compute_dtype
from maskvl.ops import Backend
from maskvl.ops.gated_delta_knockout import gated_delta_knockout_naive, gated_delta_knockout_reference
from maskvl.ops.testing import (
    GATES,
    assert_rows_close,
    compiled_backend,
    gated_delta_inputs,
    gated_delta_naive_atol,
    gated_delta_row_bound,
    rtol,
)

BACKENDS = ["reference", "cpp", pytest.param("triton", marks=pytest.mark.cuda)]
# Each row's error relative to its term bound (gated_delta_row_bound): float64 results to 1e-10; float32
# ones against the float64 oracle to 1e-5 (measured: 6e-7 at worst, for T = 1025 with gates near 1).
RTOL_F64, RTOL_F32 = 1e-10, 1e-5


def _shape(T: int) -> tuple[int, int, int, int]:
    """``(Hk, Hv, dk, dv)``: grouped heads (each key head serves two value heads), odd head dims; smaller at
    T = 1025, where the naive oracle's T recurrences cost O(T^2 dk dv)."""
    return (2, 4, 48, 40) if T <= 97 else (1, 2, 24, 20)


CASES = [(T, gates, dt) for T in (1, 2, 97, 1025) for gates in GATES for dt in (torch.float64, torch.float32)]


def _case_id(T: int, gates: str, dtype: torch.dtype) -> str:
    Hk, Hv, dk, dv = _shape(T)
    return f"T{T}-Hk{Hk}-Hv{Hv}-dk{dk}-dv{dv}-{gates}-{str(dtype).removeprefix('torch.')}"


def _backend(name: str) -> tuple[Backend, torch.device]:
    if name == "reference":
        return Backend(), torch.device("cpu")
    return compiled_backend(name)


def _tol(dtype: torch.dtype, dev: torch.device) -> float:
    """IEEE arithmetic (references, C++, the interpreter) as above; compiled Triton float32 on a GPU by the
    ratio of the compiled to the IEEE bound of maskvl.ops.testing."""
    base = RTOL_F64 if dtype == torch.float64 else RTOL_F32
    return base * rtol(dtype, dev) / rtol(dtype, "cpu")


@functools.lru_cache(maxsize=None)
def _oracle(T: int, gates: str):
    """Inputs (float64 holding float32 values), the naive oracle's ``o, delta``, the row bounds and the
    oracle's absolute resolution; shared by every backend and dtype of a case."""
    Hk, Hv, dk, dv = _shape(T)
    q, k, v, g, beta = gated_delta_inputs(T, Hk, Hv, dk, dv, gates, seed=10 * T + list(GATES).index(gates))
    q = q[-1]
    threads = torch.get_num_threads()
    # The naive oracle's steps are small tensor ops: on a shared machine extra intra-op threads only slow it.
    torch.set_num_threads(1)
    try:
        o, delta = gated_delta_knockout_naive(q, k, v, g, beta, dk ** -0.5)
        bound = gated_delta_row_bound(q, k, v, g, beta, dk ** -0.5)
    finally:
        torch.set_num_threads(threads)
    return (q, k, v, g, beta), o, delta, bound, gated_delta_naive_atol(o, delta)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("T,gates,dtype", CASES, ids=[_case_id(*c) for c in CASES])
def test_gated_delta_knockout_matches_naive(backend_name, T, gates, dtype):
    """Every row of delta (skipping one position's write, minus clean) and the clean readout against T + 1
    literal recurrences in float64: relative to the row's term bound, down to the oracle's own absolute
    resolution (a float64 difference of two readouts). float32 runs get the same (float32) numbers."""
    backend, dev = _backend(backend_name)
    inputs, no, ndelta, bound, atol = _oracle(T, gates)
    cd = compute_dtype(dtype)
    o, delta = backend.gated_delta_knockout(*(x.to(dtype).to(dev) for x in inputs), _shape(T)[2] ** -0.5, True)
    o, delta = o.cpu(), delta.cpu()
    assert o.dtype == delta.dtype == cd
    tol = _tol(cd, dev)
    # Not vacuous: the last position's write moves the readout by more than the oracle's resolution.
    assert float(ndelta[-1].abs().max()) > 1e6 * atol
    assert_rows_close(o, no.to(cd), tol, "o", atol=atol)
    assert_rows_close(delta, ndelta.to(cd), tol, "delta", atol=tol * bound + atol)


GROUPINGS = [(1, 1), (2, 4), (1, 3)]


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("Hk,Hv", GROUPINGS, ids=[f"Hk{a}-Hv{b}" for a, b in GROUPINGS])
@pytest.mark.parametrize("T", [1, 97])
def test_gated_delta_knockout_matches_transformers(backend_name, Hk, Hv, T):
    """The readout against transformers' torch_recurrent_gated_delta_rule and torch_chunk_gated_delta_rule
    (Qwen3.5's own layer functions, with their L2 norm, query scaling and head grouping; they compute in
    float32), and delta at a few positions against transformers' recurrence run with that position's
    g = 0 and beta = 0: all within float32's resolution of the readout."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import (
        torch_chunk_gated_delta_rule,
        torch_recurrent_gated_delta_rule,
    )

    backend, dev = _backend(backend_name)
    dk, dv = 48, 40
    q, k, v, g, beta = gated_delta_inputs(T, Hk, Hv, dk, dv, "mixed", seed=11 * T + Hv, dtype=torch.float32)

    def final(fn, g, beta):
        out, _ = fn(q[None], k[None], v[None], g=g[None], beta=beta[None], use_qk_l2norm_in_kernel=True)
        return out[0, -1].double()  # [Hv, dv]

    o, delta = backend.gated_delta_knockout(*(x.double().to(dev) for x in (q[-1], k, v, g, beta)), dk ** -0.5, True)
    o, delta = o.cpu(), delta.cpu()
    o_rec = final(torch_recurrent_gated_delta_rule, g, beta)
    atol = 1e-5 * float(o_rec.abs().max())
    assert_rows_close(o, o_rec, 0.0, "o vs transformers recurrent", atol=atol)
    assert_rows_close(o, final(torch_chunk_gated_delta_rule, g, beta), 0.0, "o vs transformers chunked", atol=atol)
    big = int(delta.abs().amax(dim=(1, 2)).argmax())
    for p in sorted({0, T // 2, T - 1, big}):
        g2, b2 = g.clone(), beta.clone()
        g2[p], b2[p] = 0.0, 0.0
        skipped = final(torch_recurrent_gated_delta_rule, g2, b2) - o_rec
        assert_rows_close(delta[p], skipped, 0.0, f"delta[{p}] vs transformers with g_p = beta_p = 0", atol=atol)
    assert float(delta[T - 1].abs().max()) > 1e3 * atol  # the final position's own write matters


@pytest.mark.parametrize("backend_name", ["cpp", pytest.param("triton", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_gated_delta_knockout_strided_inputs_give_identical_results(backend_name, dtype):
    """q, k, v as views into one projection buffer ``[T, 2 Hk dk + Hv dv]`` (rows with a contiguous last
    dim), g and beta transposed views: bitwise the results of contiguous copies, and close to the
    reference on those."""
    backend, dev = compiled_backend(backend_name)
    T, Hk, Hv, dk, dv = 37, 2, 4, 48, 40
    q, k, v, g, beta = gated_delta_inputs(T, Hk, Hv, dk, dv, "mixed", seed=5, dtype=dtype)
    q = q[-1]
    W = 2 * Hk * dk + Hv * dv
    buf = torch.cat([torch.zeros(T, Hk * dk, dtype=dtype), k.reshape(T, -1), v.reshape(T, -1)], dim=1).to(dev)
    buf[-1, :Hk * dk] = q.reshape(-1).to(dev)
    qs, ks, vs = buf[-1, :Hk * dk].view(Hk, dk), buf[:, Hk * dk:2 * Hk * dk].view(T, Hk, dk), buf[:, 2 * Hk * dk:W].view(T, Hv, dv)
    gs, bs = g.T.contiguous().to(dev).T, beta.T.contiguous().to(dev).T
    assert not ks.is_contiguous() and not vs.is_contiguous() and not gs.is_contiguous()
    o1, d1 = backend.gated_delta_knockout(qs, ks, vs, gs, bs, dk ** -0.5, True)
    o2, d2 = backend.gated_delta_knockout(*(x.contiguous().to(dev) for x in (q, k, v, g, beta)), dk ** -0.5, True)
    assert torch.equal(o1, o2) and torch.equal(d1, d2)
    ro, rd = gated_delta_knockout_reference(q, k, v, g, beta, dk ** -0.5)
    cd = compute_dtype(dtype)
    tol = _tol(cd, dev)
    bound = gated_delta_row_bound(q, k, v, g, beta, dk ** -0.5)
    assert_rows_close(o1.cpu(), ro, tol, "o vs reference")
    assert_rows_close(d1.cpu(), rd, tol, "delta vs reference", atol=tol * bound)


@pytest.mark.parametrize("backend_name", ["cpp", pytest.param("triton", marks=pytest.mark.cuda)])
def test_gated_delta_knockout_without_l2norm(backend_name):
    """qk_l2norm=False: the keys and query are used as given (here already normalised, so that the
    recurrence is contractive), against the reference."""
    backend, dev = compiled_backend(backend_name)
    T, Hk, Hv, dk, dv = 40, 1, 2, 32, 24
    q, k, v, g, beta = gated_delta_inputs(T, Hk, Hv, dk, dv, "mixed", seed=3)
    q, k = q[-1] / q[-1].norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    o, d = backend.gated_delta_knockout(*(x.to(dev) for x in (q, k, v, g, beta)), 0.3, False)
    ro, rd = gated_delta_knockout_reference(q, k, v, g, beta, 0.3, False)
    bound = gated_delta_row_bound(q, k, v, g, beta, 0.3, False)
    assert_rows_close(o.cpu(), ro, RTOL_F64, "o")
    assert_rows_close(d.cpu(), rd, RTOL_F64, "delta", atol=RTOL_F64 * bound)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_gated_delta_knockout_rejects_bad_inputs(backend_name):
    backend, dev = _backend(backend_name)
    T, dk, dv = 5, 16, 16
    r = lambda *s: torch.randn(*s, device=dev)  # noqa: E731
    with pytest.raises((RuntimeError, ValueError), match="multiple"):  # 3 value heads, 2 key heads
        backend.gated_delta_knockout(r(2, dk), r(T, 2, dk), r(T, 3, dv), r(T, 3), r(T, 3), 0.25, True)
    with pytest.raises((RuntimeError, ValueError), match="g = beta"):  # g has the wrong length
        backend.gated_delta_knockout(r(2, dk), r(T, 2, dk), r(T, 4, dv), r(T + 1, 4), r(T, 4), 0.25, True)
    with pytest.raises((RuntimeError, ValueError), match="share one"):
        backend.gated_delta_knockout(r(2, dk).double(), r(T, 2, dk), r(T, 4, dv), r(T, 4), r(T, 4), 0.25, True)
