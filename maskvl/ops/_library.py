"""The ``maskvl::`` operator schemas and their fake (meta) kernels.

The schemas are defined here, from Python, rather than in the C++ extension so that the Triton
kernels can register for CUDA even when ``maskvl._C`` is not built; ``maskvl._C`` only adds CPU
kernels (``TORCH_LIBRARY_IMPL(maskvl, CPU, m)``). Importing this module is idempotent.
"""

from __future__ import annotations

import torch

from ..measures import compute_dtype

SCHEMAS: dict[str, str] = {
    "loo_attention": "(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)",
    "head_distances": "(Tensor o, Tensor delta, Tensor gram) -> (Tensor, Tensor)",
    "vector_distances": "(Tensor clean, Tensor delta) -> (Tensor, Tensor)",
    "decode_attention": "(Tensor q, Tensor k_prefix, Tensor v_prefix, Tensor k_own, Tensor v_own, float scale, "
    "Tensor exclude) -> Tensor",
}

# Kept alive for the lifetime of the process: dropping the Library object would unregister the ops.
_LIB = torch.library.Library("maskvl", "DEF")
for _name, _schema in SCHEMAS.items():
    _LIB.define(_name + _schema)


@torch.library.register_fake("maskvl::loo_attention")
def _loo_attention_fake(q, k, v, scale):
    H, D = q.shape
    T = k.shape[0]
    cd = compute_dtype(q.dtype)
    return q.new_empty((H, D), dtype=cd), q.new_empty((T, H, D), dtype=cd)


@torch.library.register_fake("maskvl::head_distances")
def _head_distances_fake(o, delta, gram):
    T, H, _ = delta.shape
    cd = compute_dtype(delta.dtype)
    return delta.new_empty((T, H), dtype=cd), delta.new_empty((T, H), dtype=cd)


@torch.library.register_fake("maskvl::vector_distances")
def _vector_distances_fake(clean, delta):
    T = delta.shape[0]
    cd = compute_dtype(delta.dtype)
    return delta.new_empty((T,), dtype=cd), delta.new_empty((T,), dtype=cd)


@torch.library.register_fake("maskvl::decode_attention")
def _decode_attention_fake(q, k_prefix, v_prefix, k_own, v_own, scale, exclude):
    return q.new_empty(q.shape, dtype=compute_dtype(q.dtype))
