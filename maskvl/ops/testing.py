"""Test support for the compiled ops: brute-force float64 references, input builders and the
row-wise relative comparison the op tests use. Imported by ``tests/test_op_*.py``; no pytest here.
"""

from __future__ import annotations

import os

import torch

from ..numerics import compute_dtype

# Relative tolerances per compute dtype for IEEE arithmetic (the references, the C++ kernels, the Triton
# interpreter): the closed form against explicit masking measured 1.7e-16 (float64) and 8.9e-8
# (float32); these bounds leave room for longer reductions.
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}
# Compiled Triton code on a GPU (the numerics are in kernels/_launch.py): float64 is IEEE as above;
# float32 exponentials carry up to 2 + 1.173 |x| ulp (1.3e-5 relative at |x| = 87, the end of the
# float32 range) and divisions 2 ulp, once or twice per output: 3e-5.
RTOL_COMPILED = {torch.float64: 1e-12, torch.float32: 3e-5}


def rtol(dtype: torch.dtype, device: torch.device | str) -> float:
    """The relative tolerance for results in compute dtype ``dtype`` computed on ``device``: the
    compiled bound on CUDA (the Triton kernels), the IEEE one elsewhere."""
    return (RTOL_COMPILED if torch.device(device).type == "cuda" else RTOL)[dtype]


def backend_params() -> list:
    """``["cpp", "triton"]`` for ``pytest.mark.parametrize``, the triton case marked ``cuda`` so that
    ``make gpu-check`` (``pytest -m cuda``) selects it; on a machine without CUDA it runs under the
    Triton interpreter like any other test."""
    import pytest

    return ["cpp", pytest.param("triton", marks=pytest.mark.cuda)]


def case_id(T: int, D: int, H: int, KV: int, dtype: torch.dtype) -> str:
    """Readable parametrize id, e.g. ``T97-D48-H8-KV2-float64``."""
    return f"T{T}-D{D}-H{H}-KV{KV}-{str(dtype).removeprefix('torch.')}"


def device_for(backend_name: str) -> torch.device:
    """Where a backend's test tensors live: CPU for cpp; CUDA for triton if there is one, else CPU
    (the Triton interpreter)."""
    if backend_name == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def compiled_backend(name: str):
    """``(backend, device)`` for the op tests of a compiled backend; skips the test (or fails it, if
    ``name`` is in ``MASKVL_REQUIRE_BACKENDS``) with the reason when the backend is unavailable."""
    import pytest

    from . import backend_status, get_backend

    dev = device_for(name)
    reason = backend_status(dev)[name]
    if reason is not None:
        if name in required_backends():
            pytest.fail(f"backend {name!r} is required (MASKVL_REQUIRE_BACKENDS) but unavailable: {reason}")
        pytest.skip(f"backend {name!r} unavailable on {dev}: {reason}")
    return get_backend(name, dev), dev


def shape_cases() -> list[tuple[int, int, int, int]]:
    """``(T, D, H, KV)``: T in {1, 2, 97, 1025}, head_dim in {48, 64, 128}, GQA ratios 1 and 4. The
    T = 1025 cases have fewer heads to keep the Triton interpreter fast."""
    out = []
    for T in (1, 2, 97, 1025):
        for D in (48, 64, 128):
            for ratio in (1, 4):
                if T == 1025:
                    H, KV = (2, 2) if ratio == 1 else (4, 1)
                else:
                    H, KV = (4, 4) if ratio == 1 else (8, 2)
                out.append((T, D, H, KV))
    return out


def required_backends() -> set[str]:
    """Backends named in ``MASKVL_REQUIRE_BACKENDS`` (comma separated): their tests fail, rather than
    skip, when the backend is unavailable (for CI that must exercise them)."""
    return {x.strip() for x in os.environ.get("MASKVL_REQUIRE_BACKENDS", "").split(",") if x.strip()}


def assert_rows_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "",
                      atol: float | torch.Tensor = 0.0) -> None:
    """Every row (last dim) of ``actual`` within ``rtol`` of ``expected`` relative to the row's size:
    ``max|a - e| <= rtol * max|e| + atol`` per row (``atol`` broadcasts over the rows; 0 by default,
    so all-zero rows must match exactly). Also checks shape, dtype and that ``actual`` is finite
    wherever ``expected`` is.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    fin = torch.isfinite(e)
    assert torch.equal(torch.isfinite(a), fin), f"{what}: non-finite values where the reference is finite"
    a = torch.where(fin, a, 0.0)
    e = torch.where(fin, e, 0.0)
    if a.dim() == 0:
        a, e = a.reshape(1, 1), e.reshape(1, 1)
    elif a.dim() == 1:  # vectors of scalars (distances): compare elementwise
        a, e = a.unsqueeze(-1), e.unsqueeze(-1)
    err = (a - e).abs().amax(-1)
    size = e.abs().amax(-1)
    atol = torch.as_tensor(atol, dtype=torch.float64).expand_as(size)
    bad = err > rtol * size + atol
    if bool(bad.any()):
        rel = (err - atol).clamp_min(0) / size.clamp_min(torch.finfo(torch.float64).tiny)
        idx = tuple(int(i) for i in (rel == rel.max()).nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} rows off by more than rtol={rtol:g}; "
                             f"worst relative error {rel.max().item():.3g} at row {idx}")


def assert_elements_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "",
                          atol: float = 0.0) -> None:
    """Elementwise ``|a - e| <= rtol * |e| + atol`` (for distances, which are >= 0)."""
    assert_rows_close(actual.reshape(-1), expected.reshape(-1), rtol, what, atol=atol)


def make_sink(q: torch.Tensor, k: torch.Tensor, scale: float, key: int, gap: float) -> torch.Tensor:
    """A copy of ``k [T, KV, D]`` where key ``key`` scores ``gap`` above every other key, for every head.

    For each KV group the sink key is the least-norm solution of ``scale <q_h, x> = max_t s_ht + gap``
    over the group's query heads (exact: G <= D), computed in float64 and rounded to k's dtype.
    """
    H, D = q.shape
    T, KV, _ = k.shape
    G = H // KV
    q64, k64 = q.double(), k.double().clone()
    for kv in range(KV):
        Q = q64[kv * G:(kv + 1) * G]  # [G, D]
        s = scale * (Q @ k64[:, kv].T)  # [G, T]
        s[:, key] = float("-inf")
        target = (s.amax(-1) + gap) / scale  # [G]
        k64[key, kv] = torch.linalg.lstsq(Q, target.unsqueeze(-1)).solution.squeeze(-1)
    return k64.to(k.dtype)


def loo_bruteforce(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-one-out attention by explicit masking in float64: for every key p a full softmax with
    score p at -inf. ``O(T^2 H D)``; ``o [H, D]``, ``delta [T, H, D]`` in float64.

    Its own resolution is absolute, not relative: ``delta = masked - clean`` is a float64 difference of
    two outputs of size ``|o|``, so rows with ``|delta| << |o|`` carry an error of about
    ``T * eps64 * max|v|`` (see :func:`bruteforce_atol`)."""
    H, D = q.shape
    T, KV, _ = k.shape
    heads = torch.arange(H) // (H // KV)
    q64, kh, vh = q.double(), k.double()[:, heads], v.double()[:, heads]  # [T, H, D]
    s = torch.einsum("hd,thd->ht", q64, kh) * scale  # [H, T]
    o = torch.einsum("ht,thd->hd", torch.softmax(s, -1), vh)
    if T == 1:
        return o, (-o).unsqueeze(0)
    S = s.unsqueeze(0).repeat(T, 1, 1)  # [p, H, T]
    idx = torch.arange(T)
    S[idx, :, idx] = float("-inf")
    om = torch.einsum("pht,thd->phd", torch.softmax(S, -1), vh)
    return o, om - o


def random_gram(H: int, D: int, d_model: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Head Gram matrices of a random o_proj weight ``[d_model, H * D]``: ``[H, D, D]``, PSD."""
    from .head_distances import head_grams

    w = torch.randn(d_model, H * D, generator=gen, dtype=torch.float64) / d_model ** 0.5
    return head_grams(w, H, compute_dtype(dtype))


def bruteforce_atol(v: torch.Tensor, T: int) -> float:
    """The absolute resolution of :func:`loo_bruteforce`'s delta: a float64 difference of two softmax
    averages of the rows of ``v`` (with generous headroom for the T-term sums)."""
    return 4 * T * torch.finfo(torch.float64).eps * float(v.double().abs().max())


def csr_groups(groups: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(members [M], offsets [NG + 1])`` int64 of a list of position lists (order kept)."""
    members = torch.tensor([p for g in groups for p in g], dtype=torch.int64)
    sizes = torch.tensor([0] + [len(g) for g in groups], dtype=torch.int64)
    return members, torch.cumsum(sizes, 0)


def group_bruteforce(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, groups: list[list[int]]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-group-out attention by explicit masking in float64: for every group a full softmax with
    the group's scores at -inf (no key left: masked output 0). ``o [H, D]``, ``delta [NG, H, D]`` in
    float64, with :func:`bruteforce_atol`'s absolute resolution."""
    H, D = q.shape
    T, KV, _ = k.shape
    heads = torch.arange(H) // (H // KV)
    q64, kh, vh = q.double(), k.double()[:, heads], v.double()[:, heads]  # [T, H, D]
    s = torch.einsum("hd,thd->ht", q64, kh) * scale  # [H, T]
    o = torch.einsum("ht,thd->hd", torch.softmax(s, -1), vh)
    out = []
    for g in groups:
        if len(set(g)) == T:
            out.append(-o)
            continue
        sg = s.clone()
        sg[:, list(g)] = float("-inf")
        out.append(torch.einsum("ht,thd->hd", torch.softmax(sg, -1), vh) - o)
    return o, torch.stack(out) if out else o.new_zeros(0, H, D)


# --- gated_delta_knockout ---------------------------------------------------------------------------
# Log-decay ranges of the op tests: exp(g) spread over (0.05, 1); exp(g) ~ 1 (1 - exp(g) ~ 1e-4, where
# 1 - exp(g) cancels unless formed as -expm1(g), and nothing is forgotten over T = 1025 positions);
# exp(g) ~ 0 (each write nearly forgotten at the next step: u underflows a few positions back).
GATES: dict[str, tuple[float, float]] = {"mixed": (-3.0, 0.0), "near1": (-1e-4, 0.0), "near0": (-20.0, -5.0)}


def gated_delta_inputs(T: int, Hk: int, Hv: int, dk: int, dv: int, gates: str, seed: int,
                       dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    """Random ``q [T, Hk, dk]`` (all positions, for transformers; the op takes ``q[-1]``), ``k [T, Hk, dk]``,
    ``v [T, Hv, dv]``, ``g [T, Hv]`` uniform in ``GATES[gates]``, ``beta [T, Hv]`` uniform in (0, 1).
    Every value is a float32 number, so float32 and float64 cases see the same inputs."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = GATES[gates]
    q = torch.randn(T, Hk, dk, generator=gen, dtype=torch.float64)
    k = torch.randn(T, Hk, dk, generator=gen, dtype=torch.float64)
    v = torch.randn(T, Hv, dv, generator=gen, dtype=torch.float64)
    g = lo + (hi - lo) * torch.rand(T, Hv, generator=gen, dtype=torch.float64)
    beta = torch.rand(T, Hv, generator=gen, dtype=torch.float64)
    return tuple(x.to(torch.float32).to(dtype) for x in (q, k, v, g, beta))


def gated_delta_row_bound(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                          scale: float, qk_l2norm: bool = True) -> torch.Tensor:
    """``B [T, Hv]`` (float64): the bound on ``|delta_p|`` from the sizes of the terms it is formed from,

        B_p = |u_p| (|1 - a_p| |S_{p-1}|_F + beta_p |k_p| (|v_p| + a_p |k_p| |S_{p-1}|_F))

    (``delta_p = (1 - a_p) S_{p-1}^T u_p - <k_p, u_p> beta_p (v_p - a_p S_{p-1}^T k_p)``; see
    ``maskvl/ops/gated_delta_knockout.py``). Rounding in any implementation perturbs ``delta_p`` by a few
    ulps of these terms, so the op tests measure each row's error relative to ``B_p``: it is ``|delta_p|``
    itself unless the terms cancel, and it shrinks with ``|u_p|`` (a write forgotten by the final position).
    Same arguments as the op (``q [Hk, dk]``)."""
    from .gated_delta_knockout import prepare_inputs, reverse_scan

    qh, kh, vh, gh, bh = prepare_inputs(q.double(), k.double(), v.double(), g.double(), beta.double(), scale,
                                        qk_l2norm)
    T, Hv, dk = kh.shape
    a = gh.exp()
    u, _ = reverse_scan(qh, kh, gh, bh)
    un, kn, vn = u.norm(dim=-1), kh.norm(dim=-1), vh.norm(dim=-1)
    S = torch.zeros(Hv, dk, vh.shape[2], dtype=torch.float64)
    bound = torch.empty(T, Hv, dtype=torch.float64)
    for p in range(T):
        sn = S.flatten(1).norm(dim=-1)
        bound[p] = un[p] * ((-torch.expm1(gh[p])).abs() * sn + bh[p] * kn[p] * (vn[p] + a[p] * kn[p] * sn))
        w = bh[p, :, None] * (vh[p] - a[p, :, None] * (S * kh[p, :, :, None]).sum(1))
        S = a[p, :, None, None] * S + kh[p, :, :, None] * w[:, None, :]
    return bound


def gated_delta_naive_atol(o: torch.Tensor, delta: torch.Tensor) -> float:
    """The absolute resolution of :func:`~maskvl.ops.gated_delta_knockout.gated_delta_knockout_naive`'s
    ``delta [T, Hv, dv]``: a float64 difference of two readouts, each a T-step recurrence (with generous
    headroom for the T steps)."""
    T = delta.shape[0]
    return 4 * T * torch.finfo(torch.float64).eps * float(torch.maximum(o.abs().amax(), (o + delta).abs().amax()))
