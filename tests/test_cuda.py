"""The CUDA path on a real GPU (``make gpu-check`` runs these with ``-m cuda``; without CUDA they skip):
the engine with the compiled Triton kernels against the naive oracle on CUDA in float64 and float32,
the kernels on a second GPU, and that the kernels ran compiled, not interpreted. The Triton op tests
(``tests/test_op_*.py``, their ``triton`` cases are marked ``cuda`` too) cover the ops against their
references on CUDA, bf16 inputs included."""

from __future__ import annotations

import pytest
import torch

from maskvl.engine import Engine, SweepConfig
from maskvl.inputs import load_image
from maskvl.naive import relative_l2_error
from maskvl.ops import get_backend, load_kernels
from maskvl.ops.loo_attention import loo_attention_reference
from maskvl.ops.testing import assert_rows_close, rtol
from naive_support import compare_with_naive

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def test_kernels_are_compiled_not_interpreted():
    assert not load_kernels()._launch.interpreted(), "run the CUDA tests without TRITON_INTERPRET"
    assert type(get_backend("auto", "cuda")).__name__ == "TritonBackend"


@pytest.mark.parametrize("dtype,tol,row_tol", [(torch.float64, 1e-9, 1e-6), (torch.float32, 1e-4, 1e-2)],
                         ids=["float64", "float32"])
def test_engine_against_naive_on_cuda(tiny_dir, images, dtype, tol, row_tol):
    """Every variant (Full, Attn, Head_N, Logits) of a 2-step sweep with the Triton backend on CUDA
    against transformers' own forward with one attention entry masked, on CUDA."""
    from maskvl.models import load_model

    adapter = load_model(str(tiny_dir), dtype, "cuda")
    compare_with_naive(adapter, [images["wide"]], "What is in this image?", "both", 2, tol, row_tol, logits=True,
                       backend="triton")


def _second_gpu() -> torch.device:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs a second CUDA device")
    return torch.device("cuda", 1)


def test_ops_on_a_second_device():
    """Inputs on cuda:1 while cuda:0 is current: the kernels must run on cuda:1 (the launchers' device
    guard), give the reference's results, and leave the current device as it was."""
    dev = _second_gpu()
    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*s, generator=g) for s in ((32, 128), (300, 8, 128), (300, 8, 128)))
    backend = get_backend("triton", dev)
    o, delta = backend.loo_attention(q.to(dev), k.to(dev), v.to(dev), 128 ** -0.5)
    torch.cuda.synchronize(dev)
    assert o.device == dev and delta.device == dev and torch.cuda.current_device() == 0
    ro, rdelta = loo_attention_reference(q, k, v, 128 ** -0.5)
    assert_rows_close(o.cpu(), ro, rtol(torch.float32, dev), "o")
    assert_rows_close(delta.cpu(), rdelta, rtol(torch.float32, dev), "delta")


def test_engine_on_a_second_device(tiny_dir, images):
    """A float64 sweep on cuda:1 equals the same sweep with the reference backend on the CPU."""
    from maskvl.models import load_model

    dev = _second_gpu()
    torch.cuda.set_device(0)
    cfg = SweepConfig(mask_mode="both", num_tokens=2, logits=True)
    runs = []
    for device, backend in ((dev, "triton"), ("cpu", "reference")):
        adapter = load_model(str(tiny_dir), torch.float64, str(device))
        prep = adapter.prepare("Which way?", [load_image(str(images["tall"]))], [None])
        runs.append(list(Engine(adapter, backend).run(prep, cfg)))
    assert torch.cuda.current_device() == 0
    for got, ref in zip(*runs):
        assert got.generated_id == ref.generated_id
        for lg, lr in zip(got.layers, ref.layers):
            assert relative_l2_error(lg.l2, lr.l2) <= 1e-9 and relative_l2_error(lg.cos, lr.cos) <= 1e-9
