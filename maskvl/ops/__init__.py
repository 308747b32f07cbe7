"""The engine's hot operations, behind one backend interface.

One file per op (``loo_attention``, ``loo_group_attention``, ``head_distances``, ``vector_distances``,
``decode_attention``, ``gated_delta_knockout``; ``gated_delta_group_knockout``, a PyTorch scan every backend
runs): its ``maskvl::`` schema, fake kernel, plain PyTorch reference and what each
backend runs for it. The compiled implementations sit beside them by the same name: ``csrc/<op>.cpp``
(the ``maskvl._C`` CPU kernels) and ``kernels/<op>.py`` (Triton, for CUDA). ``backends.py`` holds the
backend classes and their selection; the engine only ever calls a :class:`Backend`. ``sinks.py`` applies
learned attention sinks (GPT-OSS) exactly to any backend's sink-free attention results.

All backends return the compute dtype (float64 for float64 inputs, float32 otherwise). The compiled
ops also accept bf16/fp16 inputs and upcast them as they load (``head_distances`` and
``vector_distances`` cast their inputs to the compute dtype of ``delta`` first).
"""

from __future__ import annotations

from .backends import (
    BACKENDS,
    Backend,
    CppBackend,
    TritonBackend,
    backend_status,
    describe,
    get_backend,
    load_kernels,
)
from .head_distances import head_grams

__all__ = [
    "BACKENDS",
    "Backend",
    "CppBackend",
    "TritonBackend",
    "backend_status",
    "describe",
    "get_backend",
    "head_grams",
    "load_kernels",
]
