"""Helpers for the viewer's browser tests: synthetic Parquet files and browser setup.

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

REPO = pathlib.Path(__file__).resolve().parent.parent
VIEWER_INDEX = REPO / "viewer" / "index.html"
CHROMIUM = pathlib.Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
PROTOTYPE_DIR = pathlib.Path("/work/shared/data/prototype")

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
) -> SynthFile:
    """Write a maskvl-format file (FORMAT.md) with plausible synthetic values.

    Images are `<|vision_start|>`, grid pads, `<|vision_end|>` blocks; values have
    an attention sink at position 0, a hot first image token, and a spatial blob
    per image that moves with the layer, so grids are not uniform. `variants`
    replaces the natural list (Full, Attn, Head_0.., Logits) in the rows and the
    metadata, in the given order (the rows' dictionary keeps that order too).
    At `nonpositive_layer` every cosine distance is <= 0, as in files computed
    in bfloat16: 0 or -2**-7 (one bf16 step below 1 - cos = 0), and exactly 0
    for every `Attn` row.
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
            writer.write_table(table)
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
