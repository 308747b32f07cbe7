"""The backends: one class per implementation of the ops, their availability and selection.

``reference``  plain PyTorch, any device (the ``*_reference`` functions of ``maskvl/ops/<op>.py``).
``cpp``        the ``maskvl._C`` CPU kernels (``csrc/*.cpp``) through ``torch.ops.maskvl.*``; CPU tensors.
``triton``     the Triton kernels of the top-level ``kernels/`` folder; CUDA tensors (through
               ``torch.ops.maskvl.*``, where :func:`load_kernels` registers them for CUDA), or CPU
               tensors when the kernels were imported with ``TRITON_INTERPRET=1`` (the interpreter;
               used by CI).

The engine only ever calls a :class:`Backend`'s methods (one per op); what each backend does for an op lives
in that op's file (``run_cpp``, ``run_triton``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from types import ModuleType

import torch

from ..errors import InputError

from ..errors import MaskvlError
from . import (decode_attention, gated_delta_group_knockout, gated_delta_knockout, head_distances, loo_attention,
               loo_group_attention, vector_distances)

BACKENDS = ("auto", "reference", "cpp", "triton")

# The op modules, each with OP (the qualified name), run_cpp, run_triton and cuda_kernel.
OP_MODULES: tuple[ModuleType, ...] = (loo_attention, loo_group_attention, head_distances, vector_distances,
                                      decode_attention, gated_delta_knockout)


class Backend:
    """The reference backend: plain PyTorch on any device. Subclasses override the ops."""

    name = "reference"

    def loo_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
        """``q [H, D]``, ``k, v [T, KV, D]`` -> ``(o [H, D], delta [T, H, D])``; see ``loo_attention.py``."""
        return loo_attention.loo_attention_reference(q, k, v, scale)

    def loo_group_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                            members: torch.Tensor, offsets: torch.Tensor):
        """``q [H, D]``, ``k, v [T, KV, D]``, groups as CSR ``members [M]``, ``offsets [NG + 1]`` ->
        ``(o [H, D], delta [NG, H, D])``; see ``loo_group_attention.py``."""
        return loo_group_attention.loo_group_attention_reference(q, k, v, scale, members, offsets)

    def head_distances(self, o: torch.Tensor, delta: torch.Tensor, gram: torch.Tensor):
        """``o [H, D]``, ``delta [T, H, D]``, ``gram [H, D, D]`` -> ``(l2 [T, H], cos [T, H])``."""
        return head_distances.head_distances_reference(o, delta, gram)

    def vector_distances(self, clean: torch.Tensor, delta: torch.Tensor):
        """``clean [N]``, ``delta [T, N]`` -> ``(l2 [T], cos [T])``."""
        return vector_distances.vector_distances_reference(clean, delta)

    def decode_attention(self, q, k_prefix, v_prefix, k_own, v_own, scale: float, exclude, exclude_sets=None,
                         exclude_set=None):
        """``q [B, H, D]``, prefix ``[T, KV, D]``, own ``[B, KV, D]``, ``exclude [B]`` -> ``[B, H, D]``;
        optionally ``exclude_sets [N, T + 1]`` bool with ``exclude_set [B]`` (see ``decode_attention.py``)."""
        return decode_attention.decode_attention_reference(q, k_prefix, v_prefix, k_own, v_own, scale, exclude,
                                                           exclude_sets, exclude_set)

    def gated_delta_knockout(self, q, k, v, g, beta, scale: float, qk_l2norm: bool = True):
        """``q [Hk, dk]``, ``k [T, Hk, dk]``, ``v [T, Hv, dv]``, ``g, beta [T, Hv]`` ->
        ``(o [Hv, dv], delta [T, Hv, dv])``; see ``gated_delta_knockout.py``."""
        return gated_delta_knockout.gated_delta_knockout_reference(q, k, v, g, beta, scale, qk_l2norm)

    def gated_delta_group_knockout(self, q, k, v, g, beta, scale: float, qk_l2norm: bool, members, offsets):
        """As :meth:`gated_delta_knockout` with groups (CSR ``members [M]``, ``offsets [NG + 1]``) ->
        ``(o [Hv, dv], delta [NG, Hv, dv])``; the PyTorch scan on every backend (see
        ``gated_delta_group_knockout.py``)."""
        return gated_delta_group_knockout.gated_delta_group_knockout_reference(q, k, v, g, beta, scale, qk_l2norm,
                                                                             members, offsets)

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
        return loo_attention.run_cpp(q, k, v, scale)

    def loo_group_attention(self, q, k, v, scale: float, members, offsets):
        return loo_group_attention.run_cpp(q, k, v, scale, members, offsets)

    def head_distances(self, o, delta, gram):
        return head_distances.run_cpp(o, delta, gram)

    def vector_distances(self, clean, delta):
        return vector_distances.run_cpp(clean, delta)

    def decode_attention(self, q, k_prefix, v_prefix, k_own, v_own, scale: float, exclude, exclude_sets=None,
                         exclude_set=None):
        return decode_attention.run_cpp(q, k_prefix, v_prefix, k_own, v_own, scale, exclude, exclude_sets,
                                        exclude_set)

    def gated_delta_knockout(self, q, k, v, g, beta, scale: float, qk_l2norm: bool = True):
        return gated_delta_knockout.run_cpp(q, k, v, g, beta, scale, qk_l2norm)


KERNELS_MODULE = "maskvl._kernels"
_registered: dict[str, bool] = {"cuda": False}


def _import_kernels_package() -> ModuleType:
    mod = sys.modules.get(KERNELS_MODULE)
    if mod is not None:
        return mod
    from pathlib import Path

    package = Path(__file__).resolve().parents[1]  # maskvl/
    folder = package.parent / "kernels"
    # A source checkout (run in place, or installed editable) has kernels/ beside maskvl/: load that
    # folder, so that the kernels always come from the same checkout as this maskvl (an editable
    # install's finder would map maskvl._kernels to its own checkout, whichever maskvl is imported).
    # An installed wheel has maskvl/_kernels/ instead.
    if (package / "_kernels").is_dir() or not (folder / "__init__.py").is_file():
        return importlib.import_module(KERNELS_MODULE)
    spec = importlib.util.spec_from_file_location(KERNELS_MODULE, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"the Triton kernels could not be loaded from {folder}", name=KERNELS_MODULE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[KERNELS_MODULE] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[KERNELS_MODULE]
        raise
    return mod


def load_kernels() -> ModuleType:
    """The Triton kernels package (the top-level ``kernels/`` folder, imported as ``maskvl._kernels``)
    with its op modules imported, each launcher registered as the CUDA kernel of its ``maskvl::`` op.

    Installed, setup.py maps ``kernels/`` to ``maskvl._kernels`` (a top-level ``kernels`` package would
    collide with Hugging Face's ``kernels``, which transformers probes for). In a source checkout, the
    folder beside ``maskvl/`` is loaded under the same name. This imports triton.
    """
    mod = _import_kernels_package()
    for name in mod.OPS:
        importlib.import_module(f"{KERNELS_MODULE}.{name}")
    importlib.import_module(f"{KERNELS_MODULE}._launch")
    if not _registered["cuda"]:
        for op in OP_MODULES:
            torch.library.register_kernel(op.OP, "cuda", op.cuda_kernel(mod))
        _registered["cuda"] = True
    return mod


class TritonBackend(Backend):
    """The Triton kernels. CUDA tensors go through ``torch.ops.maskvl.*`` (the kernels are registered
    for CUDA); CPU tensors call the launchers directly, which works under ``TRITON_INTERPRET=1`` only.

    float64 inputs are refused with a one-line :class:`~maskvl.errors.MaskvlError` where the installed
    Triton cannot compile them (before 3.5; the interpreter runs them on any version).
    """

    name = "triton"

    def __init__(self) -> None:
        # Imports triton; TRITON_INTERPRET must be set before this for CPU tensors.
        self._k = load_kernels()

    def _check(self, x: torch.Tensor) -> None:
        problem = self._k._launch.float64_problem(x.dtype)
        if problem is not None:
            raise MaskvlError(problem)

    def loo_attention(self, q, k, v, scale: float):
        self._check(q)
        return loo_attention.run_triton(self._k, q, k, v, scale)

    def loo_group_attention(self, q, k, v, scale: float, members, offsets):
        self._check(q)
        return loo_group_attention.run_triton(self._k, q, k, v, scale, members, offsets)

    def head_distances(self, o, delta, gram):
        self._check(delta)
        return head_distances.run_triton(self._k, o, delta, gram)

    def vector_distances(self, clean, delta):
        self._check(delta)
        return vector_distances.run_triton(self._k, clean, delta)

    def decode_attention(self, q, k_prefix, v_prefix, k_own, v_own, scale: float, exclude, exclude_sets=None,
                         exclude_set=None):
        self._check(q)
        return decode_attention.run_triton(self._k, q, k_prefix, v_prefix, k_own, v_own, scale, exclude,
                                           exclude_sets, exclude_set)

    def gated_delta_knockout(self, q, k, v, g, beta, scale: float, qk_l2norm: bool = True):
        self._check(q)
        return gated_delta_knockout.run_triton(self._k, q, k, v, g, beta, scale, qk_l2norm)


def _triton_status(dev: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton not installed"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"no CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda})"
    elif dev.type == "cpu":
        launch = sys.modules.get(f"{KERNELS_MODULE}._launch")
        if launch is not None:
            if not launch.interpreted():
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
        raise InputError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    status = backend_status(device)
    if name == "auto":
        preferred = "triton" if torch.device(device).type == "cuda" else "cpp"
        name = preferred if status.get(preferred) is None else "reference"
    if status.get(name) is not None:
        hint = " (pip install triton, or maskvl[triton])" if name == "triton" and "not installed" in str(status[name]) else ""
        raise InputError(f"backend {name!r} is unavailable on {torch.device(device)}: {status[name]}{hint}")
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
