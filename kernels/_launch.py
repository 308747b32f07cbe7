"""How every Triton kernel of this package is launched: dtypes, device, version rules, compile-only runs.

Each launcher (``loo_attention.py``, ``head_distances.py``, ``vector_distances.py``,
``decode_attention.py``) hands its kernels to :func:`launch`, the single place where a kernel is
launched. :func:`launch` runs it under :func:`device_guard` of its tensors' device: Triton launches on
the *current* CUDA device and stream, so without the guard a tensor on ``cuda:1`` would be handed to a
kernel started on GPU 0. Inside :func:`compile_only` (used by ``kernels/compile_check.py``),
:func:`launch` compiles instead of launching and records what it compiled.

Numerics of the compiled code (sm_80 / sm_90, read from the PTX; the Triton interpreter computes
with numpy: IEEE division, libm's exp):

* float32: ``/`` is ``div.full.f32`` (at most 2 ulp; not IEEE ``div.rn``); ``tl.exp(x)`` is
  ``ex2.approx.f32(x * log2 e)``, CUDA's ``__expf``, whose error grows with the argument: at most
  ``2 + 1.173 |x|`` ulp, so about 1.3e-5 relative at the end of the float32 range (|x| = 87) and 5e-6
  at |x| = 30; ``tl.sqrt_rn`` is IEEE ``sqrt.rn.f32``. ``a * b + c`` contracts to one ``fma.rn``
  (``enable_fp_fusion=True``, passed explicitly so that a change of Triton's default cannot change the
  numbers). ``tl.dot`` with ``input_precision="ieee"`` multiplies in full float32 (no TF32).
* float64: ``/`` is IEEE ``div.rn.f64``, ``tl.exp`` is libdevice's ``__nv_exp`` (1 ulp), square roots
  are ``sqrt.rn.f64``.

So the float64 path is as exact as the reference, and the float32 path differs from the float32
reference by the few ulps of a division plus the exponential's error above, in each output that goes
through one (an attention weight and its normalizer): within 3e-5 relative wherever float32 has normal
numbers. The op tests compare compiled float32 results with that bound
(``maskvl.ops.testing.RTOL_COMPILED``), the interpreter's and the C++ kernels' with the IEEE one.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else: ``maskvl.numerics.compute_dtype``,
    repeated here because this package imports nothing from ``maskvl`` (a test checks they agree)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def acc_type(cd: torch.dtype) -> Any:
    """The Triton accumulation type of the compute dtype ``cd``."""
    return tl.float64 if cd == torch.float64 else tl.float32


def _version_tuple(text: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


TRITON_VERSION: tuple[int, int] = _version_tuple(triton.__version__)
# float64 tl.dot (head_distances, decode_attention) fails to compile for sm_80/sm_90 before Triton 3.5.
FLOAT64_MIN_TRITON: tuple[int, int] = (3, 5)


@triton.jit
def _probe():
    pass


def interpreted() -> bool:
    """True if the kernels were defined for the Triton interpreter (``TRITON_INTERPRET=1`` at import)."""
    return isinstance(_probe, InterpretedFunction)


def float64_problem(dtype: torch.dtype) -> str | None:
    """Why float64 inputs cannot run compiled on this Triton, or None if they can.

    The interpreter runs float64 on any version; compiled float64 ``tl.dot`` needs Triton >= 3.5.
    """
    if dtype != torch.float64 or interpreted() or TRITON_VERSION >= FLOAT64_MIN_TRITON:
        return None
    need = ".".join(map(str, FLOAT64_MIN_TRITON))
    return (f"float64 through the Triton kernels needs triton >= {need} (installed: {triton.__version__}); "
            f"upgrade triton or use the reference backend")


def check_float64(dtype: torch.dtype) -> None:
    """Raise ``RuntimeError`` with :func:`float64_problem`'s reason, if any."""
    problem = float64_problem(dtype)
    if problem is not None:
        raise RuntimeError(problem)


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(device)`` for a CUDA device (makes it current for the launch), else a no-op."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@dataclass
class Compiled:
    """One kernel compiled by :func:`launch` inside :func:`compile_only`."""

    name: str
    grid: tuple[int, ...]
    kernel: Any  # triton.compiler.CompiledKernel
    constexprs: dict[str, Any] = field(default_factory=dict)


_compiled: list[Compiled] | None = None


@contextlib.contextmanager
def compile_only() -> Iterator[list[Compiled]]:
    """Within this block :func:`launch` compiles (``JITFunction.run(..., warmup=True)``) for the active
    Triton driver's target instead of launching, and appends a :class:`Compiled` to the yielded list."""
    global _compiled
    prev, _compiled = _compiled, []
    try:
        yield _compiled
    finally:
        _compiled = prev


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
    """``kernel[grid](*args, **meta)`` on the device of the first tensor in ``args``."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    meta.setdefault("enable_fp_fusion", True)
    with device_guard(device):
        if _compiled is not None:
            compiled = kernel.run(*args, grid=grid, warmup=True, **meta)
            consts = {k: v for k, v in meta.items() if k != "enable_fp_fusion"}
            _compiled.append(Compiled(kernel.fn.__name__, tuple(grid), compiled, consts))
            return
        kernel[grid](*args, **meta)
