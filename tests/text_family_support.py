"""What every text-only family's tests check, shared by ``tests/test_family_<name>.py``.

Each family test writes a tiny random model of its family as a hub-like directory, runs the naive oracle
once (module-scoped) and checks the engine against it through every backend, then runs the command line
on a model written by ``maskvl make-tiny-model --family``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from maskvl.io import read_metadata
from maskvl.models import load_model
from maskvl.models.base import ModelAdapter
from maskvl.naive import NaiveStep, naive_sweep
from naive_support import compare_with_naive

BACKENDS = ["reference", "cpp", "triton"]


def backend(name: str) -> Any:
    """The backend for an engine-vs-oracle test (compiled ones skipped or failed as the op tests do)."""
    if name == "reference":
        return "reference"
    from maskvl.ops.testing import compiled_backend

    return compiled_backend(name)[0]


def oracle(adapter: ModelAdapter, prompt: str, steps: int = 2, window: int = 1,
           layers: list[int] | None = None) -> list[NaiveStep]:
    """The naive oracle's sweep of ``prompt`` (mask mode ``both``), to check every backend against."""
    prep = adapter.prepare(prompt, [], [])
    return naive_sweep(adapter, prep, "both", steps, layers, knockout_window=window)


def window_start(adapter: ModelAdapter, layer: int, seq_len: int) -> int:
    """The first key the final query of a ``seq_len`` sequence sees at ``layer``."""
    w = adapter.attention_window(layer)
    return 0 if w is None else max(0, seq_len - w)


def check_engine(adapter: ModelAdapter, prompt: str, ref: list[NaiveStep], backend_name: str, window: int = 1,
                 layers: list[int] | None = None) -> tuple[Any, list[Any]]:
    """The engine equals the oracle (float64: 1e-9 relative per variant, 1e-6 per row; Logits too), and
    the rows of keys outside a layer's sliding window are exact zeros in both (see :func:`outside_rows`)."""
    prep, fast, _ = compare_with_naive(adapter, [], prompt, "both", len(ref), 1e-9, 1e-6, layers=layers, logits=True,
                                       window=window, backend=backend(backend_name), ref=ref)
    assert not prep.images and not bool(prep.is_image.any())
    outside_rows(adapter, fast, ref, window)
    return prep, fast


def outside_rows(adapter: ModelAdapter, fast: list[Any], ref: list[NaiveStep], window: int) -> tuple[int, int]:
    """Assert how keys outside sliding windows are reported; returns how many (layer rows, Logits rows) were.

    A key before layer L's window: every Full/Attn/Head_N distance is exactly 0 (the engine's and the
    oracle's, whose forward with that entry "removed" is bit-identical to the unmasked one). Its Logits row
    (L2, cosine, KL, target probability change) is exactly 0 when the key is before the window of every
    layer of the knockout window L..L+k-1. Keys inside the window change the layer update (Full > 0).
    """
    n_layer = n_logits = 0
    for f, r in zip(fast, ref):
        S = f.seq_len
        for lr in f.layers:
            L = lr.layer
            out = lr.positions < window_start(adapter, L, S)
            n_layer += int(out.sum())
            assert (lr.l2[:-1, out] == 0).all() and (lr.cos[:-1, out] == 0).all(), (f.step, L)
            assert (r.l2[L][:, out] == 0).all() and (r.cos[L][:, out] == 0).all(), (f.step, L)
            assert (lr.l2[0, ~out] > 0).all(), (f.step, L)
            knocked = range(L, min(L + window, adapter.num_layers))
            gone = lr.positions < min(window_start(adapter, k, S) for k in knocked)
            n_logits += int(gone.sum())
            m = r.logits_measures(L)
            for name, got in (("l2", lr.l2[-1]), ("cos", lr.cos[-1]), ("kl", lr.kl[-1]), ("tpd", lr.tpd[-1])):
                assert (got[gone] == 0).all() and (m[name][gone] == 0).all(), (f.step, L, name)
            assert (lr.l2[-1, ~gone] > 0).all(), (f.step, L)
    return n_layer, n_logits


def cli_sweep(family: str, tmp_path: Path, run_main: Any, prompt: str = "Hello there") -> dict[str, Any]:
    """``maskvl make-tiny-model --family`` then ``maskvl sweep`` on it (float64, both, 2 tokens, Logits).

    Checks the file: text tokens only, every variant, per-layer windows in the metadata. Also the errors a
    text-only model gives for images and for ``--mask-mode vision``. Returns the metadata.
    """
    d = tmp_path / family
    code, out, err = run_main(["make-tiny-model", str(d), "--family", family, "--layers", "3", "--heads", "4",
                               "--kv-heads", "2", "--head-dim", "16", "--hidden", "64"])
    assert code == 0, err
    o = tmp_path / "out.parquet"
    code, out, err = run_main(["sweep", "--model", str(d), "--prompt", prompt, "--dtype", "float64",
                               "--mask-mode", "both", "--num-tokens", "2", "--logits", "-q", "-o", str(o)])
    assert code == 0, err
    md = read_metadata(o)
    df = pq.read_table(o).to_pandas()
    adapter = load_model(str(d), torch.float64)
    assert md["complete"] and md["images"] == [] and md["num_layers"] == 3
    assert md["attention_windows"] == [adapter.attention_window(i) for i in range(3)]
    assert set(df.token_kind) == {"text"} and df.image_index.isna().all()
    assert set(df.variant) == {"Full", "Attn", "Logits"} | {f"Head_{h}" for h in range(4)}
    assert np.isfinite(df.l2_distance).all() and df.l2_distance.dtype == np.float64
    # render and view take the file unchanged (text chips only, no image panels)
    code, out, err = run_main(["render", str(o), "-o", str(tmp_path / "r.png")])
    assert code == 0 and (tmp_path / "r.png").stat().st_size > 5_000, err
    code, out, err = run_main(["view", str(o), "-o", str(tmp_path / "v.html")])
    assert code == 0 and (tmp_path / "v.html").stat().st_size > 10_000, err
    # Text-only: images and --mask-mode vision are one-line errors (exit 2).
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(img)
    for extra in (["--image", str(img)], ["--mask-mode", "vision"]):
        code, _, err = run_main(["sweep", "--model", str(d), "--prompt", prompt, "-q", "-o", str(tmp_path / "e.parquet"),
                                 *extra])
        assert code == 2 and err.startswith("maskvl: error: ") and err.count("\n") == 1, err
    return md
