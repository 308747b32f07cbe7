"""Out of memory never loses or fakes data: chunks halve and retry, or the run stops with a one-line
error naming the option that lowers memory, keeping completed steps in the partial file.

The out-of-memory condition is injected on the CPU by raising ``torch.OutOfMemoryError`` from the
adapter's batched pieces whenever a call gets more rows than a fake device could hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from maskvl import io
from maskvl.api import run_sweep
from maskvl.errors import OutOfMemory


class _TightMemory:
    """Wraps an adapter's batched methods: calls with more than ``limit`` rows raise OutOfMemoryError."""

    def __init__(self, adapter, monkeypatch, limit: int, methods=("post_attention", "replay_layer", "final_logits")):
        self.calls: list[int] = []
        for name in methods:
            original = getattr(adapter, name)

            def tight(layer_or_h, *args, _original=original, _name=name, **kwargs):
                rows = (layer_or_h if _name == "final_logits" else args[0]).shape[0]
                self.calls.append(rows)
                if rows > limit:
                    raise torch.OutOfMemoryError(f"CUDA out of memory (injected: {rows} rows > {limit})")
                return _original(layer_or_h, *args, **kwargs)

            monkeypatch.setattr(adapter, name, tight)


def test_chunks_halve_and_results_are_unchanged(adapter64, images, monkeypatch, tmp_path: Path) -> None:
    opts = {"mask_mode": "both", "num_tokens": 2, "logits": True, "layers": [0, 2]}
    clean = run_sweep(adapter64, [str(images["wide"])], "What is it?", opts).table
    notes: list[str] = []
    tight = _TightMemory(adapter64, monkeypatch, limit=5)
    res = run_sweep(adapter64, [str(images["wide"])], "What is it?", {**opts, "max_batch_rows": 64},
                    output=tmp_path / "t.parquet", on_note=notes.append)
    assert max(tight.calls) > 5 and any("retrying with" in n for n in notes), notes
    assert res.metadata["complete"]
    for col in ("l2_distance", "cosine_distance", "kl_divergence", "target_prob_delta"):
        a = clean.column(col).to_numpy(zero_copy_only=False)
        b = res.table.column(col).to_numpy(zero_copy_only=False)
        # Chunks of other sizes change only the last bits of a matrix product's rounding.
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=0, equal_nan=True)


def test_oom_that_chunks_cannot_fix_stops_with_one_line_and_keeps_steps(adapter64, images, monkeypatch,
                                                                        tmp_path: Path) -> None:
    out = tmp_path / "stop.parquet"
    original = adapter64.decode

    def decode_oom(*args, **kwargs):  # step 1's clean forward does not fit
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(adapter64, "decode", decode_oom)
    with pytest.raises(OutOfMemory) as info:
        run_sweep(adapter64, [str(images["wide"])], "What is it?", {"mask_mode": "vision", "num_tokens": 3},
                  output=out)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("out of memory at step 1") and "--max-batch-rows" in msg
    assert not out.exists()
    part = io.partial_path(out)
    md = io.read_metadata(part)
    assert md["complete"] is False and md["steps_completed"] == 1
    t = pq.read_table(part)
    assert set(t.column("generation_step").to_pylist()) == {0}
    assert np.isfinite(t.column("l2_distance").to_numpy()).all() and (t.column("l2_distance").to_numpy() > 0).any()
    monkeypatch.setattr(adapter64, "decode", original)


def test_cli_out_of_memory_is_exit_2_one_line(tiny_dir, images, monkeypatch, tmp_path: Path, run_main) -> None:
    from maskvl.models.decoder import TransformersDecoderAdapter

    def no_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(TransformersDecoderAdapter, "post_attention", no_memory)
    code, _, err = run_main(["sweep", "--model", str(tiny_dir), "--image", str(images["wide"]), "--prompt", "Hi",
                             "-q", "-o", str(tmp_path / "x.parquet")])
    assert code == 2 and err.startswith("maskvl: error: out of memory at step 0") and err.count("\n") == 1, err
    assert "Traceback" not in err and not (tmp_path / "x.parquet").exists()


def test_compute_dtype_copies_stay_bounded(tiny_dir, images, monkeypatch) -> None:
    """A bf16 model computes its measures in float32 without keeping float32 copies of every layer or of
    the LM head: casts are cached up to a byte budget and the LM head is cast in row blocks."""
    from maskvl.api import run_sweep
    from maskvl.models import load_model
    from maskvl.models.decoder import TransformersDecoderAdapter

    adapter = load_model(str(tiny_dir), torch.bfloat16)
    budget = 20_000  # bytes: smaller than the layers' MLPs together, so the cache must evict
    monkeypatch.setattr(TransformersDecoderAdapter, "CAST_CACHE_BYTES", budget)
    res = run_sweep(adapter, [str(images["wide"])], "Hi", {"mask_mode": "both", "logits": True, "num_tokens": 2})
    assert res.metadata["complete"]
    cached = adapter.__dict__["_cast_cache"]
    assert cached and sum(size for _, size in cached.values()) <= budget
    h = torch.randn(3, adapter.hidden_size, dtype=torch.float32)
    head = adapter.lm_head
    whole = torch.nn.functional.linear(h, head.weight.float())
    blocks = TransformersDecoderAdapter._linear_out_chunked(head, h, torch.float32, max_bytes=4 * adapter.hidden_size * 7)
    torch.testing.assert_close(blocks, whole, rtol=1e-6, atol=1e-6)
