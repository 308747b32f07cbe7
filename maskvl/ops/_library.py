"""The ``maskvl`` operator library: each op file (``maskvl/ops/<op>.py``) defines its schema here.

The schemas are defined from Python rather than in the C++ extension so that the Triton kernels can
register for CUDA even when ``maskvl._C`` is not built; ``maskvl._C`` only adds CPU kernels
(``TORCH_LIBRARY_IMPL(maskvl, CPU, m)``).
"""

from __future__ import annotations

import torch

# Kept alive for the lifetime of the process: dropping the Library object would unregister the ops.
_LIB = torch.library.Library("maskvl", "DEF")

SCHEMAS: dict[str, str] = {}


def define(name: str, schema: str) -> str:
    """Define ``maskvl::<name>`` with ``schema`` (arguments and returns, e.g. ``"(Tensor x) -> Tensor"``);
    returns the qualified name."""
    _LIB.define(name + schema)
    SCHEMAS[name] = schema
    return f"maskvl::{name}"
