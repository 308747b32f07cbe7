"""Helpers for the viewer's browser tests: synthetic Parquet files, the browser
fixtures (`browser`, `viewer`; test modules import them) and page helpers.

The files follow docs/FORMAT.md (maskvl format, version 1) or the prototype's
format (int64 columns, dictionary strings, `prompt_name`, no metadata).
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
VIEWER_INDEX = REPO / "viewer" / "index.html"
CHROMIUM = pathlib.Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
PROTOTYPE_DIR = pathlib.Path("/work/shared/data/prototype")
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium")

QUESTION = [" What", " is", " in", " these", " images", "?"]
GENERATED = [" Two", " cats", ".", "<|im_end|>"] + [f" w{i}" for i in range(64)]


def natural_variants(num_heads: int, logits: bool) -> list[str]:
    """Variant names in the format's natural order."""
    return ["Full", "Attn"] + [f"Head_{h}" for h in range(num_heads)] + (["Logits"] if logits else [])


@dataclass
class SynthFile:
    """What a synthetic maskvl file holds, for assertions."""

    path: pathlib.Path
    meta: dict
    variants: list[str]
    tokens: list[dict]
    prompt_len: int  # T0: tokens at step 0
    tables: list[pa.Table] = field(default_factory=list)  # one per step (kept for small files)

    def values(self, step: int, layer: int, variant: str, metric: str) -> np.ndarray:
        """Metric by position (NaN where null) at (step, layer, variant)."""
        t = self.tables[step]
        lay = t.column("layer").to_numpy()
        var = np.asarray(t.column("variant").to_pylist())
        sel = (lay == layer) & (var == variant)
        pos = t.column("token_position").to_numpy()[sel]
        vals = t.column(metric).to_numpy(zero_copy_only=False)[sel].astype(np.float64)
        out = np.full(self.prompt_len + step, np.nan)
        out[pos] = vals
        return out


def make_maskvl_file(
    path: pathlib.Path,
    *,
    grids: tuple[tuple[int, int], ...] = ((7, 10), (5, 3)),
    num_layers: int = 4,
    num_heads: int = 12,
    num_steps: int = 2,
    logits: bool = True,
    compression: str = "zstd",
    question: list[str] | None = None,
    prompt: str = "What is in these images?",
    image_paths: list[str] | None = None,
    extra_text: int = 0,
    keep_tables: bool = True,
    seed: int = 0,
    meta_update: dict | None = None,
    variants: list[str] | None = None,
    nonpositive_layer: int | None = None,
    row_groups: str | int = "step",
) -> SynthFile:
    """Write a maskvl-format file (FORMAT.md) with plausible synthetic values.

    Images are `<|vision_start|>`, grid pads, `<|vision_end|>` blocks; values have
    an attention sink at position 0, a hot first image token, and a spatial blob
    per image that moves with the layer, so grids are not uniform. `variants`
    replaces the natural list (Full, Attn, Head_0.., Logits) in the rows and the
    metadata, in the given order (the rows' dictionary keeps that order too).
    At `nonpositive_layer` every cosine distance is <= 0, as in files computed
    in bfloat16: 0 or -2**-7 (one bf16 step below 1 - cos = 0), and exactly 0
    for every `Attn` row. `row_groups`: "step" (one row group per step),
    "step_layer" (one per (step, layer)), or a row count (groups that cut
    through layers and variants).
    """
    rng = np.random.default_rng(seed)
    question = list(QUESTION if question is None else question) + [f" t{i}" for i in range(extra_text)]
    tokens: list[dict] = []

    def add(text, kind="text", img=None, r=None, c=None):
        tokens.append({"position": len(tokens), "id": 1000 + len(tokens), "text": text, "kind": kind,
                       "image_index": img, "patch_row": r, "patch_col": c})

    for t in ["<|im_start|>", "user", "\n"]:
        add(t)
    images = []
    for i, (rows, cols) in enumerate(grids):
        add("<|vision_start|>")
        start = len(tokens)
        for r in range(rows):
            for c in range(cols):
                add("<|image_pad|>", "image", i, r, c)
        images.append({
            "index": i, "path": image_paths[i] if image_paths else f"/nonexistent/image{i}.png",
            "grid_rows": rows, "grid_cols": cols, "token_start": start, "token_end": len(tokens),
            "original_size": [cols * 30, rows * 29], "resized_size": [cols * 32, rows * 32],
        })
        add("<|vision_end|>")
    for t in question:
        add(t)
    for t in ["<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]:
        add(t)
    t0 = len(tokens)
    generated = [{"step": s, "id": 2000 + s, "text": GENERATED[s]} for s in range(num_steps)]
    for s in range(num_steps - 1):
        add(GENERATED[s])  # tokens cover the last step's sequence

    variants = list(variants) if variants is not None else natural_variants(num_heads, logits)
    meta = {
        "format_version": 1, "maskvl_version": "0.1.0", "model": "builtin:tiny-qwen3-vl",
        "dtype": "float32", "device": "cpu", "backend": "reference", "prompt": prompt,
        "mask_mode": "both", "num_layers": num_layers, "num_heads": num_heads,
        "layers": list(range(num_layers)), "variants": variants, "tokens": tokens,
        "generated": generated, "target": {"mode": "greedy"}, "images": images,
        "measures": {"Full": "layer output minus input", "Attn": "o_proj output",
                     "Head_N": "head N's contribution", "l2_distance": "L2", "cosine_distance": "1 - cos"},
        "num_steps": num_steps, "steps_completed": num_steps, "complete": True,
    }
    if meta_update:
        meta.update(meta_update)

    texts = [t["text"] for t in tokens]
    vocab = sorted(set(texts))
    tok_id = np.array([vocab.index(t) for t in texts], dtype=np.int32)
    kind = np.array([0 if t["kind"] == "text" else 1 for t in tokens], dtype=np.int32)
    img_idx = np.array([-1 if t["image_index"] is None else t["image_index"] for t in tokens], dtype=np.int32)
    prow = np.array([-1 if t["patch_row"] is None else t["patch_row"] for t in tokens], dtype=np.int32)
    pcol = np.array([-1 if t["patch_col"] is None else t["patch_col"] for t in tokens], dtype=np.int32)
    n_tok = len(tokens)

    # spatial pattern per (layer, position): a blob per image that drifts with the layer
    pattern = np.empty((num_layers, n_tok), dtype=np.float32)
    for layer in range(num_layers):
        pat = 0.2 + 0.8 * rng.random(n_tok, dtype=np.float32)
        for im in images:
            rows, cols = im["grid_rows"], im["grid_cols"]
            cr, cc = (layer * 0.7) % rows, (layer * 1.3) % cols
            k = np.arange(rows * cols)
            d2 = ((k // cols) - cr) ** 2 + ((k % cols) - cc) ** 2
            pat[im["token_start"]:im["token_end"]] = 0.1 + 2.0 * np.exp(-d2 / 4.0) + 0.1 * rng.random(rows * cols)
            pat[im["token_start"]] = 6.0  # hot first image token (excluded from the scale max by default)
        pat[0] = 8.0  # attention sink
        pattern[layer] = pat * (1.0 + 0.15 * layer)
    def scale_of(name: str) -> float:
        if name.startswith("Head_") and name[5:].isdigit():
            return 0.05 + 0.02 * int(name[5:])
        return {"Full": 1.0, "Attn": 0.6, "Logits": 1.5}.get(name, 0.8)

    var_scale = np.array([scale_of(v) for v in variants], dtype=np.float32)
    v_count = len(variants)
    logits_id = variants.index("Logits") if "Logits" in variants else -1

    vocab_arr = pa.array(vocab, pa.string())
    var_arr = pa.array(variants, pa.string())
    kind_arr = pa.array(["text", "image"], pa.string())
    schema = pa.schema([
        ("generation_step", pa.int32()), ("layer", pa.int32()),
        ("token_masked", pa.dictionary(pa.int32(), pa.string())), ("token_position", pa.int32()),
        ("variant", pa.dictionary(pa.int32(), pa.string())), ("l2_distance", pa.float32()),
        ("cosine_distance", pa.float32()), ("token_kind", pa.dictionary(pa.int32(), pa.string())),
        ("image_index", pa.int32()), ("patch_row", pa.int32()), ("patch_col", pa.int32()),
        ("kl_divergence", pa.float32()), ("target_prob_delta", pa.float32()),
    ], metadata={"maskvl": json.dumps(meta)})

    out = SynthFile(path=pathlib.Path(path), meta=meta, variants=variants, tokens=tokens, prompt_len=t0)
    with pq.ParquetWriter(path, schema, compression=compression) as writer:
        for s in range(num_steps):
            t = t0 + s
            n = num_layers * v_count * t
            pos = np.tile(np.arange(t, dtype=np.int32), num_layers * v_count)
            lay = np.repeat(np.arange(num_layers, dtype=np.int32), v_count * t)
            var = np.tile(np.repeat(np.arange(v_count, dtype=np.int32), t), num_layers)
            noise = rng.random(n, dtype=np.float32)
            l2 = pattern[lay, pos] * var_scale[var] * (0.85 + 0.3 * noise) * (1.0 + 0.1 * s)
            cos = np.clip(l2 / (l2.max() + 1e-6) * 0.4 + 0.01 * noise, 0, 2).astype(np.float32)
            if nonpositive_layer is not None:
                at = lay == nonpositive_layer
                cos[at] = np.where(noise[at] < 0.5, np.float32(-2.0 ** -7), np.float32(0.0))
                cos[at & (var == variants.index("Attn"))] = 0.0
            is_logit = var == logits_id
            text_mask = kind[pos] == 0
            kl = (l2 * 0.05).astype(np.float32)
            tpd = ((noise - 0.5) * 0.2 * (l2 / l2.max())).astype(np.float32)
            table = pa.Table.from_arrays([
                pa.array(np.full(n, s, dtype=np.int32)),
                pa.array(lay),
                pa.DictionaryArray.from_arrays(pa.array(tok_id[pos]), vocab_arr),
                pa.array(pos),
                pa.DictionaryArray.from_arrays(pa.array(var), var_arr),
                pa.array(l2.astype(np.float32)),
                pa.array(cos),
                pa.DictionaryArray.from_arrays(pa.array(kind[pos]), kind_arr),
                pa.array(img_idx[pos], mask=text_mask),
                pa.array(prow[pos], mask=text_mask),
                pa.array(pcol[pos], mask=text_mask),
                pa.array(kl, mask=~is_logit),
                pa.array(tpd, mask=~is_logit),
            ], schema=schema)
            if row_groups == "step":
                writer.write_table(table, row_group_size=max(1, table.num_rows))
            elif row_groups == "step_layer":
                for layer in range(num_layers):
                    part = table.slice(layer * v_count * t, v_count * t)
                    writer.write_table(part, row_group_size=part.num_rows)
            else:
                writer.write_table(table, row_group_size=int(row_groups))
            if keep_tables:
                out.tables.append(table)
    return out


def make_prototype_file(path: pathlib.Path, texts: list[str], *, prompt_name: str = "p",
                        config_prompt: str = "", num_layers: int = 3, num_steps: int = 2,
                        variants: list[str] | None = None, seed: int = 1) -> None:
    """Write a file in the prototype's format (no maskvl metadata, int64 columns).

    `texts` is the step-0 sequence; each later step appends one token " more".
    Rows are ordered (step, layer, position, variant) like the prototype's.
    """
    rng = np.random.default_rng(seed)
    variants = variants or natural_variants(2, False)
    rows: dict[str, list] = {k: [] for k in ["generation_step", "layer", "token_masked", "token_position",
                                             "variant", "l2_distance", "cosine_distance"]}
    for s in range(num_steps):
        seq = texts + [" more"] * s
        for layer in range(num_layers):
            for p, t in enumerate(seq):
                for v in variants:
                    rows["generation_step"].append(s)
                    rows["layer"].append(layer)
                    rows["token_masked"].append(t)
                    rows["token_position"].append(p)
                    rows["variant"].append(v)
                    rows["l2_distance"].append(round(float(rng.random()), 4))
                    rows["cosine_distance"].append(round(float(rng.random()) * 0.1, 4))
    n = len(rows["layer"])
    table = pa.table({
        "generation_step": pa.array(rows["generation_step"], pa.int64()),
        "layer": pa.array(rows["layer"], pa.int64()),
        "token_masked": pa.array(rows["token_masked"]).dictionary_encode(),
        "token_position": pa.array(rows["token_position"], pa.int64()),
        "variant": pa.array(rows["variant"]).dictionary_encode(),
        "l2_distance": pa.array(rows["l2_distance"], pa.float32()),
        "cosine_distance": pa.array(rows["cosine_distance"], pa.float32()),
        "prompt_name": pa.array([prompt_name] * n).dictionary_encode(),
        "config_prompt": pa.array([config_prompt] * n).dictionary_encode(),
    })
    pq.write_table(table, path, compression="snappy")


def large_file_tokens(grid: tuple[int, int], question: int = 12) -> list[dict]:
    """Token list of a one-image prompt for `make_large_file` (metadata `tokens`)."""
    tokens: list[dict] = []

    def add(text, kind="text", r=None, c=None):
        img = None if kind == "text" else 0
        tokens.append({"position": len(tokens), "id": 1000 + len(tokens), "text": text, "kind": kind,
                       "image_index": img, "patch_row": r, "patch_col": c})

    for t in ["<|im_start|>", "user", "\n", "<|vision_start|>"]:
        add(t)
    for r in range(grid[0]):
        for c in range(grid[1]):
            add("<|image_pad|>", "image", r, c)
    add("<|vision_end|>")
    for i in range(question):
        add(f" q{i}")
    for t in ["<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]:
        add(t)
    return tokens


def make_large_file(
    path: pathlib.Path,
    *,
    grid: tuple[int, int] = (128, 128),
    num_layers: int = 36,
    num_heads: int = 32,
    num_steps: int = 3,
    logits: bool = True,
    compression: str = "zstd",
    group_by: str = "step_layer",
    seed: int = 0,
) -> dict:
    """Write a large maskvl-format file quickly, straight with pyarrow (no model).

    Synthetic but format-correct (docs/FORMAT.md): every column and the metadata,
    rows sorted by (step, layer, variant, position). `group_by="step_layer"` writes
    one row group per (step, layer); `"step"` one per step (the writer's older
    layout). The defaults (a 128x128 image, 36 layers, Full + Attn + 32 heads +
    Logits, 3 steps) give ~62 million rows. The returned dict's `values(step,
    layer, variant)` gives the l2_distance of every position, for checks.
    """
    rng = np.random.default_rng(seed)
    tokens = large_file_tokens(grid)
    t0 = len(tokens)
    generated = [{"step": s, "id": 3000 + s, "text": f" g{s}"} for s in range(num_steps)]
    for s in range(num_steps - 1):
        tokens.append({"position": len(tokens), "id": 3000 + s, "text": f" g{s}", "kind": "text",
                       "image_index": None, "patch_row": None, "patch_col": None})
    variants = natural_variants(num_heads, logits)
    rows_, cols_ = grid
    start = 4
    meta = {
        "format_version": 1, "maskvl_version": "0.1.0", "model": "synthetic:large", "dtype": "bfloat16",
        "device": "cuda", "backend": "triton", "prompt": "How many animals are in the image?",
        "mask_mode": "both", "num_layers": num_layers, "num_heads": num_heads,
        "layers": list(range(num_layers)), "variants": variants, "tokens": tokens, "generated": generated,
        "target": {"mode": "greedy"},
        "images": [{"index": 0, "path": "/nonexistent/large.png", "grid_rows": rows_, "grid_cols": cols_,
                    "token_start": start, "token_end": start + rows_ * cols_,
                    "original_size": [cols_ * 32, rows_ * 32], "resized_size": [cols_ * 32, rows_ * 32]}],
        "measures": {}, "num_steps": num_steps, "steps_completed": num_steps, "complete": True,
    }
    texts = [t["text"] for t in tokens]
    vocab = sorted(set(texts))
    vocab_index = {t: i for i, t in enumerate(vocab)}
    tok_id = np.array([vocab_index[t] for t in texts], dtype=np.int32)
    kind = np.array([0 if t["kind"] == "text" else 1 for t in tokens], dtype=np.int32)
    prow = np.array([-1 if t["patch_row"] is None else t["patch_row"] for t in tokens], dtype=np.int32)
    pcol = np.array([-1 if t["patch_col"] is None else t["patch_col"] for t in tokens], dtype=np.int32)
    n_tok = len(tokens)
    V = len(variants)
    # value(step, layer, variant, pos) = base[pos] * layer_gain[layer] * var_gain[variant] * (1 + 0.01 * step),
    # with a blob that moves with the layer: cheap to compute for a check, not uniform on screen
    k = np.arange(rows_ * cols_)
    base = np.full(n_tok, 0.5, dtype=np.float64)
    base[0] = 9.0
    base[start:start + rows_ * cols_] = 0.1 + (k % 7) * 0.01
    var_gain = np.array([1.0, 0.6] + [0.05 + 0.01 * h for h in range(num_heads)] + ([1.5] if logits else []))

    def blob(layer: int) -> np.ndarray:
        cr, cc = (layer * 3.1) % rows_, (layer * 5.3) % cols_
        d2 = ((k // cols_) - cr) ** 2 + ((k % cols_) - cc) ** 2
        out = base.copy()
        out[start:start + rows_ * cols_] += 2.0 * np.exp(-d2 / (2 * (rows_ / 8) ** 2))
        return out

    def values(step: int, layer: int, variant: str) -> np.ndarray:
        """l2_distance by position at (step, layer, variant), as written (float32)."""
        b = blob(layer)[:t0 + step]
        return (b * (1 + 0.05 * layer) * var_gain[variants.index(variant)] * (1 + 0.01 * step)).astype(np.float32)

    vocab_arr = pa.array(vocab, pa.string())
    var_arr = pa.array(variants, pa.string())
    kind_arr = pa.array(["text", "image"], pa.string())
    schema = pa.schema([
        ("generation_step", pa.int32()), ("layer", pa.int32()),
        ("token_masked", pa.dictionary(pa.int32(), pa.string())), ("token_position", pa.int32()),
        ("variant", pa.dictionary(pa.int32(), pa.string())), ("l2_distance", pa.float32()),
        ("cosine_distance", pa.float32()), ("token_kind", pa.dictionary(pa.int32(), pa.string())),
        ("image_index", pa.int32()), ("patch_row", pa.int32()), ("patch_col", pa.int32()),
        ("kl_divergence", pa.float32()), ("target_prob_delta", pa.float32()),
    ], metadata={"maskvl": json.dumps(meta)})
    n_rows = 0
    # Dictionary encoding is tried only on the columns with few distinct values: pyarrow's attempt
    # on the float columns (abandoned after 1 MB) would triple the time this takes.
    dict_cols = ["generation_step", "layer", "token_masked", "token_position", "variant", "token_kind",
                 "image_index", "patch_row", "patch_col"]
    with pq.ParquetWriter(path, schema, compression=compression, use_dictionary=dict_cols) as writer:
        for s in range(num_steps):
            t = t0 + s
            pos1 = np.arange(t, dtype=np.int32)
            pos = np.tile(pos1, V)
            var = np.repeat(np.arange(V, dtype=np.int32), t)
            text_mask = kind[pos] == 0
            logit_mask = var != (V - 1 if logits else -1)
            fixed = [
                pa.DictionaryArray.from_arrays(pa.array(tok_id[pos]), vocab_arr),
                pa.array(pos),
                pa.DictionaryArray.from_arrays(pa.array(var), var_arr),
            ]
            tail = [
                pa.DictionaryArray.from_arrays(pa.array(kind[pos]), kind_arr),
                pa.array(np.zeros(len(pos), np.int32), mask=text_mask),
                pa.array(prow[pos], mask=text_mask),
                pa.array(pcol[pos], mask=text_mask),
            ]
            tables = []
            for layer in range(num_layers):
                l2 = (blob(layer)[:t][None, :] * (1 + 0.05 * layer) * var_gain[:, None] * (1 + 0.01 * s))
                l2 = l2.astype(np.float32).reshape(-1)
                noise = rng.random(len(pos), dtype=np.float32)
                cos = (l2 * 0.02 + 0.001 * noise).astype(np.float32)
                n = len(pos)
                tables.append(pa.Table.from_arrays([
                    pa.array(np.full(n, s, np.int32)), pa.array(np.full(n, layer, np.int32)),
                    fixed[0], fixed[1], fixed[2], pa.array(l2), pa.array(cos), *tail,
                    pa.array(l2 * 0.05, mask=logit_mask), pa.array((noise - 0.5) * 0.01, mask=logit_mask),
                ], schema=schema))
                n_rows += n
                if group_by == "step_layer":
                    writer.write_table(tables.pop(), row_group_size=n)
            if group_by == "step":
                table = pa.concat_tables(tables)
                writer.write_table(table, row_group_size=table.num_rows)
    return {"path": pathlib.Path(path), "rows": n_rows, "meta": meta, "variants": variants, "values": values,
            "prompt_len": t0}


# ------------------------------------------------------------ browser

@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield b
        b.close()


class Viewer:
    """A page of the viewer in a fresh, network-blocked browser context."""

    def __init__(self, browser, *, bypass_csp: bool = True, height: int = 1000):
        # bypass_csp only lets playwright evaluate string predicates; the XSS
        # test therefore checks the viewer's own escaping, not the CSP.
        self.ctx = browser.new_context(viewport={"width": 1400, "height": height}, bypass_csp=bypass_csp)
        self.blocked: list[str] = []
        self.dialogs: list[str] = []
        self.errors: list[str] = []

        def route(r):
            url = r.request.url
            if url.startswith(("file:", "data:", "blob:")):
                r.continue_()
            else:
                self.blocked.append(url)
                r.abort()

        self.ctx.route("**/*", route)
        self.page = self.ctx.new_page()
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def goto(self, url: str | None = None):
        self.page.goto(url or VIEWER_INDEX.as_uri())
        return self

    def open(self, *paths, wait_ok: bool = True) -> dict:
        """Open file(s) through the file picker; returns the viewer's load record."""
        self.page.evaluate("window.maskvlViewer.perf.load = null")
        self.page.set_input_files("#file-input", [str(p) for p in paths])
        self.page.wait_for_function("window.maskvlViewer.perf.load !== null", timeout=120000)
        load = self.page.evaluate("window.maskvlViewer.perf.load")
        if wait_ok:
            assert load["ok"], (load, self.page.text_content("#error"))
        return load

    def state(self) -> dict:
        return self.page.evaluate("({...window.maskvlViewer.state})")

    def values(self) -> dict:
        return self.page.evaluate("window.maskvlViewer.currentValues()")

    def status(self) -> str:
        return self.page.text_content("#status")

    def pixel(self, selector: str, fx: float, fy: float) -> tuple[int, int, int]:
        """RGB of a canvas at fractional position (fx, fy) of its backing store."""
        rgba = self.page.evaluate(
            """([sel, fx, fy]) => { const c = document.querySelector(sel);
                 const x = Math.min(c.width - 1, Math.floor(fx * c.width)), y = Math.min(c.height - 1, Math.floor(fy * c.height));
                 return Array.from(c.getContext('2d').getImageData(x, y, 1, 1).data); }""",
            [selector, fx, fy])
        return tuple(rgba[:3])

    def close(self):
        self.ctx.close()


@pytest.fixture
def viewer(browser):
    made: list[Viewer] = []

    def make(**kw) -> Viewer:
        v = Viewer(browser, **kw)
        made.append(v)
        return v

    yield make
    for v in made:
        assert not v.blocked, f"page tried the network: {v.blocked}"
        assert not v.dialogs, f"dialogs fired: {v.dialogs}"
        assert not v.errors, f"page errors: {v.errors}"
        v.close()


def press_all(v: Viewer, keys: list[str]) -> list[float]:
    """Press real keys; return the viewer's in-page handler+render time (ms) of each."""
    out = []
    for k in keys:
        v.page.evaluate("window.maskvlViewer.perf.lastKeyMs = -1")
        v.page.keyboard.press(k)
        ms = v.page.evaluate("window.maskvlViewer.perf.lastKeyMs")
        assert ms >= 0, f"key {k} was not handled"
        out.append(ms)
    return out


KEY_LOOP_JS = """(n) => {
  // keydown -> render, then force style + layout so the cost of the DOM
  // updates is counted too; timed in-page with performance.now().
  const keys = ['ArrowRight', 'ArrowRight', 'ArrowDown', 'v', 'm', 's', 'ArrowLeft', 'ArrowUp', 'V', 's', 'm', 's'];
  const out = [];
  for (let i = 0; i < n; i++) {
    const t = performance.now();
    document.dispatchEvent(new KeyboardEvent('keydown', { key: keys[i % keys.length], bubbles: true }));
    document.body.getBoundingClientRect();
    out.push(performance.now() - t);
  }
  return out;
}"""



def set_view(v: Viewer, **kw) -> None:
    """Set state fields (variant by name), render, and wait until that view is drawn."""
    v.page.evaluate("""(kw) => { const mv = window.maskvlViewer, st = mv.state;
        for (const [k, x] of Object.entries(kw)) st[k] = k === 'variant' ? mv.dataset.variants.indexOf(x) : x;
        mv.render(); return mv.whenDrawn(); }""", kw)


KEYS_TO_DRAWN_JS = """async (keys) => {
  // Per key: dispatch it, then wait until its view is drawn (row groups read if needed);
  // timed in-page with performance.now(). A short pause between keys, as between real presses.
  const mv = window.maskvlViewer, out = [];
  for (const key of keys) {
    const t = performance.now();
    document.dispatchEvent(new KeyboardEvent('keydown', { key, bubbles: true }));
    await mv.whenDrawn();
    out.push(performance.now() - t);
    await new Promise((r) => setTimeout(r, 30));
  }
  return out;
}"""


def keys_to_drawn_ms(v: Viewer, keys: list[str]) -> list[float]:
    """Milliseconds from each key press to its view drawn (see KEYS_TO_DRAWN_JS)."""
    return v.page.evaluate(KEYS_TO_DRAWN_JS, keys)


def renderer_memory_mb(browser) -> dict:
    """Memory of the browser's renderer processes: {"rss_max_mb": ..} (Linux /proc; {} elsewhere).

    The renderers are found with CDP SystemInfo.getProcessInfo; the page's own is among them, so the
    largest resident set is an upper bound for it (typed arrays live outside the JS heap, so
    Performance.getMetrics' JSHeapUsedSize does not show them).
    """
    cdp = browser.new_browser_cdp_session()
    try:
        procs = cdp.send("SystemInfo.getProcessInfo")["processInfo"]
    finally:
        cdp.detach()
    rss = []
    for p in procs:
        if p.get("type") != "renderer":
            continue
        try:
            with open(f"/proc/{p['id']}/status") as fh:
                rss += [int(line.split()[1]) / 1024 for line in fh if line.startswith("VmRSS:")]
        except OSError:
            continue
    return {"rss_max_mb": max(rss)} if rss else {}


def js_heap_used_mb(v: Viewer) -> float:
    """CDP Performance.getMetrics JSHeapUsedSize of the page, in MiB."""
    cdp = v.ctx.new_cdp_session(v.page)
    try:
        cdp.send("Performance.enable")
        metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    finally:
        cdp.detach()
    return metrics["JSHeapUsedSize"] / 2**20
