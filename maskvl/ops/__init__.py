"""The engine's hot operations, behind one backend interface.

Each op has a plain PyTorch reference here (``maskvl/ops/<op>.py``); compiled backends (the C++
extension ``maskvl._C`` on the CPU, Triton kernels on CUDA) implement the same functions and are tested
against these references. The engine only ever calls a :class:`Backend`.

Backends:

``reference``  plain PyTorch, any device.
``cpp``        ``maskvl._C`` CPU kernels (``csrc/*.cpp``) through ``torch.ops.maskvl.*``; CPU tensors.
``triton``     the Triton kernels of the top-level ``kernels`` package; CUDA tensors (through
               ``torch.ops.maskvl.*``, where they are registered for CUDA), or CPU tensors when the
               kernels were imported with ``TRITON_INTERPRET=1`` (the interpreter; used by CI).

All backends return the compute dtype (float64 for float64 inputs, float32 otherwise). The compiled
ops also accept bf16/fp16 inputs and upcast them as they load (``head_distances`` and
``vector_distances`` cast their inputs to the compute dtype of ``delta`` first).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys

import torch

from .decode_attention import decode_attention_reference
from .head_distances import head_distances_reference, head_grams, vector_distances_reference
from .loo_attention import loo_attention_reference

BACKENDS = ("auto", "reference", "cpp", "triton")


class Backend:
    """The reference backend: plain PyTorch on any device. Subclasses override the ops."""

    name = "reference"

    def loo_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
        """``q [H, D]``, ``k, v [T, KV, D]`` -> ``(o [H, D], delta [T, H, D])``; see ``loo_attention.py``."""
        return loo_attention_reference(q, k, v, scale)

    def head_distances(self, o: torch.Tensor, delta: torch.Tensor, gram: torch.Tensor):
        """``o [H, D]``, ``delta [T, H, D]``, ``gram [H, D, D]`` -> ``(l2 [T, H], cos [T, H])``."""
        return head_distances_reference(o, delta, gram)

    def vector_distances(self, clean: torch.Tensor, delta: torch.Tensor):
        """``clean [N]``, ``delta [T, N]`` -> ``(l2 [T], cos [T])``."""
        return vector_distances_reference(clean, delta)

    def decode_attention(self, q, k_prefix, v_prefix, k_own, v_own, scale: float, exclude):
        """``q [B, H, D]``, prefix ``[T, KV, D]``, own ``[B, KV, D]``, ``exclude [B]`` -> ``[B, H, D]``."""
        return decode_attention_reference(q, k_prefix, v_prefix, k_own, v_own, scale, exclude)

    def __repr__(self) -> str:
        return f"<maskvl backend {self.name}>"


class CppBackend(Backend):
    """The C++ CPU kernels of ``maskvl._C`` (``torch.ops.maskvl.*``); CPU tensors only."""

    name = "cpp"

    def __init__(self) -> None:
        from .. import _ext

        if not _ext.load(warn=False):
            raise RuntimeError(_ext.load_error())

    def loo_attention(self, q, k, v, scale: float):
        o, delta = torch.ops.maskvl.loo_attention(q, k, v, float(scale))
        return o, delta

    def head_distances(self, o, delta, gram):
        l2, cosd = torch.ops.maskvl.head_distances(o, delta, gram)
        return l2, cosd

    def vector_distances(self, clean, delta):
        l2, cosd = torch.ops.maskvl.vector_distances(clean, delta)
        return l2, cosd

    def decode_attention(self, q, k_prefix, v_prefix, k_own, v_own, scale: float, exclude):
        return torch.ops.maskvl.decode_attention(q, k_prefix, v_prefix, k_own, v_own, float(scale), exclude)


KERNELS_MODULE = "maskvl._kernels"


def load_kernels():
    """The Triton kernels package (the top-level ``kernels/`` folder), imported as ``maskvl._kernels``.

    Installed, setup.py maps ``kernels/`` to ``maskvl._kernels`` (a top-level ``kernels`` package would
    collide with Hugging Face's ``kernels``, which transformers probes for). In a source checkout run in
    place, the folder beside ``maskvl/`` is loaded under the same name. Importing it imports triton.
    """
    mod = sys.modules.get(KERNELS_MODULE)
    if mod is not None:
        return mod
    try:
        return importlib.import_module(KERNELS_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != KERNELS_MODULE:
            raise
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "kernels"
    spec = importlib.util.spec_from_file_location(KERNELS_MODULE, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"the Triton kernels are not installed (looked in {folder})", name=KERNELS_MODULE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[KERNELS_MODULE] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[KERNELS_MODULE]
        raise
    return mod


class TritonBackend(Backend):
    """The Triton kernels. CUDA tensors go through ``torch.ops.maskvl.*`` (the kernels are registered
    for CUDA); CPU tensors call the launchers directly, which works under ``TRITON_INTERPRET=1`` only."""

    name = "triton"

    def __init__(self) -> None:
        # Imports triton; TRITON_INTERPRET must be set before this for CPU tensors.
        self._k = load_kernels()

    def loo_attention(self, q, k, v, scale: float):
        if q.is_cuda:
            return tuple(torch.ops.maskvl.loo_attention(q, k, v, float(scale)))
        return self._k.loo_attention(q, k, v, float(scale))

    def head_distances(self, o, delta, gram):
        if delta.is_cuda:
            return tuple(torch.ops.maskvl.head_distances(o, delta, gram))
        return self._k.head_distances(o, delta, gram)

    def vector_distances(self, clean, delta):
        if delta.is_cuda:
            return tuple(torch.ops.maskvl.vector_distances(clean, delta))
        return self._k.vector_distances(clean, delta)

    def decode_attention(self, q, k_prefix, v_prefix, k_own, v_own, scale: float, exclude):
        if q.is_cuda:
            return torch.ops.maskvl.decode_attention(q, k_prefix, v_prefix, k_own, v_own, float(scale), exclude)
        return self._k.decode_attention(q, k_prefix, v_prefix, k_own, v_own, float(scale), exclude)


def _triton_status(dev: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton not installed"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"no CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda})"
    elif dev.type == "cpu":
        mod = sys.modules.get(KERNELS_MODULE)
        if mod is not None and hasattr(mod, "interpreted"):
            if not mod.interpreted():
                return "the Triton kernels were imported without TRITON_INTERPRET=1 (set it before importing triton)"
        elif os.environ.get("TRITON_INTERPRET") != "1":
            return "no CUDA device and TRITON_INTERPRET is not set"
    else:
        return f"the Triton kernels take CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), not {dev.type}"
    try:
        load_kernels()
    except Exception as exc:  # a broken triton install, or a kernel that fails to build at import
        return f"the Triton kernels failed to import: {type(exc).__name__}: {exc}"
    return None


def backend_status(device: torch.device | str) -> dict[str, str | None]:
    """For each concrete backend: ``None`` if usable on ``device``, else the reason it is not."""
    from .. import _ext

    dev = torch.device(device)
    if dev.type == "cpu":
        cpp = _ext.load_error()
    else:
        cpp = f"the C++ kernels take CPU tensors only, not {dev.type}"
    return {"reference": None, "cpp": cpp, "triton": _triton_status(dev)}


def _resolve(name: str, device: torch.device | str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    status = backend_status(device)
    if name == "auto":
        preferred = "triton" if torch.device(device).type == "cuda" else "cpp"
        name = preferred if status.get(preferred) is None else "reference"
    if status.get(name) is not None:
        raise ValueError(f"backend {name!r} is unavailable on {torch.device(device)}: {status[name]}")
    return name


_CLASSES = {"reference": Backend, "cpp": CppBackend, "triton": TritonBackend}


def get_backend(name: str = "auto", device: torch.device | str = "cpu") -> Backend:
    """The backend called ``name`` for ``device``; ``auto`` picks triton on CUDA, cpp on CPU, else reference.

    Raises ``ValueError`` for an unknown name or a backend that is unavailable on ``device`` (with the
    reason from :func:`backend_status`).
    """
    return _CLASSES[_resolve(name, device)]()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe() -> dict:
    """Versions, device and backend facts for ``maskvl info``.

    Keys: ``torch``, ``triton``, ``transformers`` (versions or None), ``cuda_device`` (name or None),
    ``cpp`` ("loaded" or why not), ``triton_interpret`` (the env var), ``status`` (backend_status per
    device type), ``auto`` ({"cpu": name, "cuda": name}, what ``get_backend("auto", ...)`` picks).
    """
    from .. import _ext

    cuda = torch.cuda.is_available()
    info: dict = {
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "cpp": _ext.load_error() or "loaded",
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "status": {},
        "auto": {},
    }
    for dev in ("cpu", "cuda"):
        info["status"][dev] = backend_status(dev)
        info["auto"][dev] = _resolve("auto", dev)
    return info


__all__ = [
    "BACKENDS",
    "Backend",
    "CppBackend",
    "TritonBackend",
    "backend_status",
    "describe",
    "get_backend",
    "head_grams",
]
