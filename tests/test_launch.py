"""The launch point of the Triton kernels (kernels/_launch.py): every launch runs under the device guard
of its tensors' device, float64 is refused where the installed Triton cannot compile it, and the
kernels' compute dtype rule is maskvl's. Run under the Triton interpreter on CPU."""

from __future__ import annotations

import contextlib

import pytest
import torch

from maskvl.errors import MaskvlError
from maskvl.numerics import compute_dtype
from maskvl.ops import TritonBackend, load_kernels
from maskvl.ops.testing import compiled_backend


@pytest.fixture
def K():
    _, dev = compiled_backend("triton")  # skips (or fails, in CI) when the interpreter is unavailable
    if dev.type != "cpu":
        pytest.skip("runs the launchers under the Triton interpreter on CPU")
    return load_kernels()


def _calls(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    T, H, KV, D, B = 20, 4, 2, 16, 3
    return {
        "loo_attention": lambda K: K.loo_attention.loo_attention(r(H, D), r(T, KV, D), r(T, KV, D), 0.25),
        # Groups {0, 1} and every key (the latter recomputed directly: a sixth launch).
        "loo_group_attention": lambda K: K.loo_group_attention.loo_group_attention(
            r(H, D), r(T, KV, D), r(T, KV, D), 0.25, torch.tensor([0, 1] + list(range(T))), torch.tensor([0, 2, T + 2])),
        "head_distances": lambda K: K.head_distances.head_distances(r(H, D), r(T, H, D), r(H, D, D)),
        "vector_distances": lambda K: K.vector_distances.vector_distances(r(D), r(T, D)),
        "decode_attention": lambda K: K.decode_attention.decode_attention(
            r(B, H, D), r(T, KV, D), r(T, KV, D), r(B, KV, D), r(B, KV, D), 0.25, torch.tensor([-1, 0, T])),
        "decode_attention_sets": lambda K: K.decode_attention.decode_attention(
            r(B, H, D), r(T, KV, D), r(T, KV, D), r(B, KV, D), r(B, KV, D), 0.25, torch.tensor([-1, 0, T]),
            torch.eye(2, T + 1, dtype=torch.bool), torch.tensor([1, -1, 0])),
    }


def test_every_launch_runs_under_the_device_guard(K, monkeypatch):
    """Triton launches on the *current* CUDA device, so each kernel must start inside
    ``device_guard(<its tensors' device>)``: counted at the interpreter's grid executor, every launch of
    every launcher (five for loo_attention, six for loo_group_attention with a group to recompute
    directly, one each for the others) is inside the guard."""
    from triton.runtime.interpreter import GridExecutor

    active: list[torch.device] = []

    @contextlib.contextmanager
    def recording_guard(device):
        active.append(device)
        try:
            yield
        finally:
            active.pop()

    launches: list[tuple[str, list[torch.device]]] = []
    real_call = GridExecutor.__call__

    def counting_call(self, *args, **kwargs):
        launches.append((self.fn.__name__, list(active)))
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(K._launch, "device_guard", recording_guard)
    monkeypatch.setattr(GridExecutor, "__call__", counting_call)
    for name, call in _calls(torch.float32).items():
        launches.clear()
        call(K)
        expected = {"loo_attention": 5, "loo_group_attention": 6}.get(name, 1)
        assert len(launches) == expected, (name, launches)
        assert all(devs == [torch.device("cpu")] for _, devs in launches), (name, launches)


def test_device_guard_makes_the_tensors_device_current(K):
    guard = K._launch.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(K._launch.device_guard(torch.device("cpu")), contextlib.nullcontext)


def test_compute_dtype_matches_maskvl(K):
    for dt in (torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64):
        assert K._launch.compute_dtype(dt) == compute_dtype(dt), dt


@pytest.mark.parametrize("op", ["loo_attention", "loo_group_attention", "head_distances", "vector_distances",
                                "decode_attention", "decode_attention_sets"])
def test_float64_refused_on_a_triton_that_cannot_compile_it(K, monkeypatch, op):
    """Compiled float64 tl.dot needs Triton >= 3.5: on an older one every launcher raises before any
    launch and the backend turns it into a one-line user error; float32 is not affected."""
    monkeypatch.setattr(K._launch, "TRITON_VERSION", (3, 4))
    monkeypatch.setattr(K._launch, "interpreted", lambda: False)  # as on a GPU
    with pytest.raises(RuntimeError, match=r"float64 through the Triton kernels needs triton >= 3\.5 \(installed: "):
        _calls(torch.float64)[op](K)
    backend = TritonBackend()
    args = {"loo_attention": (torch.zeros(2, 4, dtype=torch.float64), torch.zeros(3, 1, 4, dtype=torch.float64),
                              torch.zeros(3, 1, 4, dtype=torch.float64), 0.5),
            "head_distances": (torch.zeros(2, 4, dtype=torch.float64), torch.zeros(3, 2, 4, dtype=torch.float64),
                               torch.zeros(2, 4, 4, dtype=torch.float64)),
            "vector_distances": (torch.zeros(4, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64)),
            "decode_attention": (torch.zeros(1, 2, 4, dtype=torch.float64), torch.zeros(3, 1, 4, dtype=torch.float64),
                                 torch.zeros(3, 1, 4, dtype=torch.float64), torch.zeros(1, 1, 4, dtype=torch.float64),
                                 torch.zeros(1, 1, 4, dtype=torch.float64), 0.5, torch.tensor([-1]))}
    args["loo_group_attention"] = args["loo_attention"] + (torch.tensor([1]), torch.tensor([0, 1]))
    args["decode_attention_sets"] = args["decode_attention"] + (torch.zeros(1, 4, dtype=torch.bool),
                                                                torch.tensor([0]))
    with pytest.raises(MaskvlError, match="upgrade triton or use the reference backend") as exc:
        getattr(backend, op.removesuffix("_sets"))(*args[op])
    assert "\n" not in str(exc.value)
    assert K._launch.float64_problem(torch.float32) is None
    monkeypatch.setattr(K._launch, "TRITON_VERSION", (3, 5))
    assert K._launch.float64_problem(torch.float64) is None


def test_the_interpreter_runs_float64_on_any_triton(K, monkeypatch):
    monkeypatch.setattr(K._launch, "TRITON_VERSION", (3, 3))
    assert K._launch.interpreted()
    l2, _ = _calls(torch.float64)["vector_distances"](K)
    assert l2.dtype == torch.float64
