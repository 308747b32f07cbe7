"""Backend selection: get_backend's names and auto rules, backend_status reasons, describe(), the
extension loader's failure path, op registration (CUDA kernels, fake kernels)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import maskvl.ops as ops
from maskvl import _ext

ROOT = Path(__file__).resolve().parent.parent


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown backend 'cuda-magic'"):
        ops.get_backend("cuda-magic", "cpu")


def test_reference_is_always_available():
    for dev in ("cpu", "cuda"):
        b = ops.get_backend("reference", dev)
        assert type(b) is ops.Backend and b.name == "reference"
        assert ops.backend_status(dev)["reference"] is None


def test_auto_on_cpu_picks_cpp_when_built_else_reference():
    b = ops.get_backend("auto", "cpu")
    if _ext.load_error() is None:
        assert isinstance(b, ops.CppBackend) and b.name == "cpp"
    else:
        assert type(b) is ops.Backend
        assert ops.backend_status("cpu")["cpp"] == _ext.load_error()


def test_cpp_is_unavailable_for_cuda_tensors():
    assert "CPU tensors only" in ops.backend_status("cuda")["cpp"]
    with pytest.raises(ValueError, match="backend 'cpp' is unavailable on cuda"):
        ops.get_backend("cpp", "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA rules")
def test_auto_on_cuda_without_a_device_is_reference():
    status = ops.backend_status("cuda")
    assert status["triton"].startswith("no CUDA device") or status["triton"] == "triton not installed"
    assert type(ops.get_backend("auto", "cuda")) is ops.Backend
    with pytest.raises(ValueError, match="backend 'triton' is unavailable on cuda"):
        ops.get_backend("triton", "cuda")


def _status_in_subprocess(env_extra: dict[str, str | None]) -> str:
    env = dict(os.environ)
    for key, val in env_extra.items():
        if val is None:
            env.pop(key, None)
        else:
            env[key] = val
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    code = "from maskvl.ops import backend_status; print(backend_status('cpu')['triton'])"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA rules")
def test_triton_on_cpu_needs_the_interpreter():
    """A fresh process: without TRITON_INTERPRET the Triton backend is refused on CPU with the reason;
    with it (and triton installed) it is available."""
    without = _status_in_subprocess({"TRITON_INTERPRET": None})
    if without == "triton not installed":
        pytest.skip("triton not installed")
    assert without == "no CUDA device and TRITON_INTERPRET is not set"
    assert _status_in_subprocess({"TRITON_INTERPRET": "1"}) == "None"


def test_triton_backend_on_cpu_follows_status():
    reason = ops.backend_status("cpu")["triton"]
    if reason is None:
        b = ops.get_backend("triton", "cpu")
        assert isinstance(b, ops.TritonBackend)
        from maskvl.ops import load_kernels

        kernels = load_kernels()

        assert kernels._launch.interpreted()
    else:
        with pytest.raises(ValueError, match="backend 'triton' is unavailable on cpu"):
            ops.get_backend("triton", "cpu")


def test_triton_kernels_are_registered_for_cuda():
    if ops.backend_status("cpu")["triton"] is not None and not torch.cuda.is_available():
        pytest.skip(f"triton unavailable here: {ops.backend_status('cpu')['triton']}")
    from maskvl.ops import load_kernels

    load_kernels()

    for name in ("loo_attention", "loo_group_attention", "head_distances", "vector_distances", "decode_attention"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"maskvl::{name}", "CUDA"), name


def test_ext_load_failure_is_reported_not_raised(monkeypatch):
    """If maskvl._C cannot be imported, load() returns False, load_error() says why, and the cpp backend
    is refused with that reason (the reference path keeps working)."""
    monkeypatch.setattr(_ext, "_state", {"tried": False, "ok": False, "error": None, "warned": False})
    monkeypatch.setitem(sys.modules, "maskvl._C", None)  # makes `from . import _C` raise ImportError
    with pytest.warns(RuntimeWarning, match="maskvl._C not built"):
        assert _ext.load() is False
    assert _ext.load_error().startswith("maskvl._C not built: ")
    assert ops.backend_status("cpu")["cpp"] == _ext.load_error()
    with pytest.raises(ValueError, match="maskvl._C not built"):
        ops.get_backend("cpp", "cpu")
    assert type(ops.get_backend("auto", "cpu")) is ops.Backend


def test_ext_reports_a_stale_extension(monkeypatch):
    """A maskvl/_C*.so left from before the extension became maskvl._C_impl would shadow maskvl/_C.py:
    the loader refuses it with a reason that says what to do."""
    import importlib
    import types

    stale = types.ModuleType("maskvl._C")
    stale.__file__ = str(ROOT / "maskvl" / "_C.cpython-311-x86_64-linux-gnu.so")
    real = importlib.import_module
    monkeypatch.setattr(_ext, "_state", {"tried": False, "ok": False, "error": None, "warned": False})
    monkeypatch.setattr(_ext.importlib, "import_module", lambda name: stale if name == "maskvl._C" else real(name))
    assert _ext.load(warn=False) is False
    assert _ext.load_error().startswith("maskvl._C is a stale build (") and "rebuild" in _ext.load_error()


def test_describe():
    info = ops.describe()
    assert info["torch"] == torch.__version__
    assert set(info["auto"]) == {"cpu", "cuda"}
    assert info["auto"]["cpu"] in ("cpp", "reference")
    assert info["cpp"] == (_ext.load_error() or "loaded")
    assert info["cuda_device"] is None or isinstance(info["cuda_device"], str)
    assert set(info["status"]["cpu"]) == {"reference", "cpp", "triton"}


def _op_args():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    T, H, KV, D, B = 6, 4, 2, 16, 3
    return {
        "loo_attention": (r(H, D), r(T, KV, D), r(T, KV, D), 0.25),
        "head_distances": (r(H, D), r(T, H, D), r(H, D, D)),
        "vector_distances": (r(D), r(T, D)),
        "decode_attention": (r(B, H, D), r(T, KV, D), r(T, KV, D), r(B, KV, D), r(B, KV, D), 0.25,
                             torch.tensor([-1, 0, T])),
        "decode_attention_sets": (r(B, H, D), r(T, KV, D), r(T, KV, D), r(B, KV, D), r(B, KV, D), 0.25,
                                  torch.tensor([-1, 0, T]), torch.eye(2, T + 1, dtype=torch.bool),
                                  torch.tensor([1, -1, 0])),
        "loo_group_attention": (r(H, D), r(T, KV, D), r(T, KV, D), 0.25, torch.tensor([0, 4, 2, 5]),
                                torch.tensor([0, 1, 4])),
    }


@pytest.mark.parametrize("name", ["loo_attention", "loo_group_attention", "head_distances", "vector_distances",
                                  "decode_attention", "decode_attention_sets"])
def test_ops_trace_with_fake_tensors(name):
    """register_fake: the schema and fake kernel agree with the CPU kernel (torch.library.opcheck)."""
    if _ext.load_error() is not None:
        pytest.skip(_ext.load_error())
    op = getattr(torch.ops.maskvl, name.removesuffix("_sets"))
    torch.library.opcheck(op, _op_args()[name], test_utils=("test_schema", "test_faketensor"))
