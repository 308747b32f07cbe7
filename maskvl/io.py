"""Output: the Parquet format (``docs/FORMAT.md``), written step by step and published atomically.

A :class:`ParquetSink` writes into a hidden temporary file beside the target, one row group per
(generation step, layer), so a reader fetches one layer of one step without touching the rest
(``maskvl.results``). ``close`` adds the final metadata and renames the file into place (``os.replace`` is
atomic on POSIX), so a final name never holds a partial file. ``abort`` (an error or Ctrl-C mid-run)
keeps the completed steps under ``<name>.partial.parquet`` with ``complete: false`` in the metadata.
A SIGKILL leaves only the hidden temporary file, which :func:`clean_stale_temps` removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# 2: per-image token grids with boxes (tiled images) and the grid_index column; version 1 files read as one
# grid per image.
FORMAT_VERSION = 2
METADATA_KEY = "maskvl"
TEMP_MARKER = ".maskvl-tmp-"


def schema(float64: bool = False) -> pa.Schema:
    """The row schema (float32 distances, float64 for float64 runs)."""
    f = pa.float64() if float64 else pa.float32()
    dict_str = pa.dictionary(pa.int32(), pa.string())
    return pa.schema([
        ("generation_step", pa.int32()),
        ("layer", pa.int32()),
        ("token_masked", dict_str),
        ("token_position", pa.int32()),
        ("variant", pa.dictionary(pa.int16(), pa.string())),
        ("l2_distance", f),
        ("cosine_distance", f),
        ("token_kind", pa.dictionary(pa.int8(), pa.string())),
        ("image_index", pa.int32()),
        ("patch_row", pa.int32()),
        ("patch_col", pa.int32()),
        ("kl_divergence", f),
        ("target_prob_delta", f),
        ("group_index", pa.int32()),
        ("grid_index", pa.int32()),
    ])


class TokenTable:
    """Per-position facts of a sequence: text, kind, image index, grid index (within the image) and patch
    row/col within that grid (-1 for text, separator tokens included)."""

    def __init__(self, texts: list[str], image_index: np.ndarray, patch_row: np.ndarray, patch_col: np.ndarray,
                 grid_index: np.ndarray | None = None):
        self.texts = list(texts)
        self._unique: tuple[np.ndarray, np.ndarray] | None = None
        self.image_index = np.asarray(image_index, dtype=np.int32)
        self.patch_row = np.asarray(patch_row, dtype=np.int32)
        self.patch_col = np.asarray(patch_col, dtype=np.int32)
        self.grid_index = (np.where(self.image_index >= 0, 0, -1).astype(np.int32) if grid_index is None
                           else np.asarray(grid_index, dtype=np.int32))

    @classmethod
    def build(cls, texts: list[str], images: list[Any]) -> "TokenTable":
        n = len(texts)
        idx = np.full(n, -1, np.int32)
        grid = np.full(n, -1, np.int32)
        row = np.full(n, -1, np.int32)
        col = np.full(n, -1, np.int32)
        for im in images:
            for gi, g in enumerate(im.grids):
                pos = np.asarray(g.positions(), np.int64)
                k = np.arange(len(pos))
                idx[pos] = im.index
                grid[pos] = gi
                row[pos] = k // g.cols
                col[pos] = k % g.cols
        return cls(texts, idx, row, col, grid)

    def append(self, text: str) -> None:
        self.texts.append(text)
        self._unique = None
        self.image_index = np.append(self.image_index, np.int32(-1))
        self.grid_index = np.append(self.grid_index, np.int32(-1))
        self.patch_row = np.append(self.patch_row, np.int32(-1))
        self.patch_col = np.append(self.patch_col, np.int32(-1))

    def unique_texts(self) -> tuple[np.ndarray, np.ndarray]:
        """The distinct texts (sorted) and each position's index into them: ``[U]``, ``[S]`` int32.

        Cached until the next :meth:`append`: a step's rows are built layer by layer.
        """
        if self._unique is None:
            uniq, inverse = np.unique(np.asarray(self.texts, dtype=object), return_inverse=True)
            self._unique = (uniq, inverse.astype(np.int32).reshape(-1))
        return self._unique

    def to_list(self, ids: list[int]) -> list[dict[str, Any]]:
        out = []
        for p, (tid, text) in enumerate(zip(ids, self.texts)):
            img = int(self.image_index[p])
            out.append({
                "position": p, "id": int(tid), "text": text, "kind": "image" if img >= 0 else "text",
                "image_index": img if img >= 0 else None,
                "grid_index": int(self.grid_index[p]) if img >= 0 else None,
                "patch_row": int(self.patch_row[p]) if img >= 0 else None,
                "patch_col": int(self.patch_col[p]) if img >= 0 else None,
            })
        return out


def _nullable(values: np.ndarray) -> pa.Array:
    return pa.array(values, type=pa.int32(), mask=values < 0)


def rows_table(step: int, layer_results: list[Any], tokens: TokenTable, float64: bool = False,
               groups: list[dict[str, Any]] | None = None, variants: list[str] | None = None) -> pa.Table:
    """The rows of one step, sorted by layer, variant (natural order), position (or group).

    Called with one layer at a time by :func:`maskvl.api.run_sweep`, so that a step's rows never sit in
    memory for all layers at once.

    ``layer_results`` items (:class:`maskvl.engine.LayerResult`) have ``layer``, ``variants`` (the name
    of each row of the value arrays), ``positions [P]``, ``l2 [V, P]``, ``cos [V, P]``, and
    ``kl``/``tpd [V, P]`` (NaN where null) or None. In a group run they carry ``group_index [P]`` and
    ``groups`` is the metadata's group list (labels and images of the rows). ``variants``: the file's
    variant list (the ``variant`` column's dictionary); a layer may carry a subset of it (Qwen3.5's
    linear layers have more heads than its attention layers). None: the first layer's, for all.
    """
    if variants is None:
        variants = list(layer_results[0].variants) if layer_results else []
    index = {v: i for i, v in enumerate(variants)}
    for lr in layer_results:
        if any(v not in index for v in lr.variants) or lr.l2.shape[0] != len(lr.variants):
            raise ValueError(f"layer {lr.layer} carries variants {lr.variants}, not among {variants}")
    ft = np.float64 if float64 else np.float32
    layer_col, pos_col, var_col, l2_col, cos_col = [], [], [], [], []
    extra: dict[str, np.ndarray] = {}
    if any(getattr(lr, "kl", None) is not None for lr in layer_results):
        extra = {
            "kl_divergence": np.concatenate([np.asarray(lr.kl, ft).reshape(-1) for lr in layer_results]),
            "target_prob_delta": np.concatenate([np.asarray(lr.tpd, ft).reshape(-1) for lr in layer_results]),
        }
    group_col = []
    for lr in layer_results:
        P = len(lr.positions)
        n_var = lr.l2.shape[0]
        layer_col.append(np.full(n_var * P, lr.layer, np.int32))
        pos_col.append(np.tile(np.asarray(lr.positions, np.int32), n_var))
        if groups is not None:
            group_col.append(np.tile(np.asarray(lr.group_index, np.int32), n_var))
        var_col.append(np.repeat(np.asarray([index[v] for v in lr.variants], dtype=np.int16), P))
        l2_col.append(np.asarray(lr.l2, ft).reshape(-1))
        cos_col.append(np.asarray(lr.cos, ft).reshape(-1))
    positions = np.concatenate(pos_col) if pos_col else np.zeros(0, np.int32)
    n = len(positions)
    if groups is None:
        uniq, inverse = tokens.unique_texts()
        text_idx = inverse[positions]
        kinds = (tokens.image_index[positions] >= 0).astype(np.int8)
        image_idx, patch_row, patch_col = (tokens.image_index[positions], tokens.patch_row[positions],
                                           tokens.patch_col[positions])
        grid_idx = tokens.grid_index[positions]
        group_index = pa.nulls(n, type=pa.int32())
    else:
        # A group row is about a set of positions: token_masked is its label, token_kind "group",
        # image_index its image (null if it spans several or none); no single position, row or column.
        gidx = np.concatenate(group_col) if group_col else np.zeros(0, np.int32)
        uniq, inverse = np.unique(np.asarray([g["label"] for g in groups], dtype=object), return_inverse=True)
        text_idx = inverse.astype(np.int32)[gidx]
        kinds = np.full(n, 2, np.int8)
        image_idx = np.asarray([-1 if g["image_index"] is None else g["image_index"] for g in groups],
                               np.int32)[gidx]
        patch_row = patch_col = grid_idx = np.full(n, -1, np.int32)
        group_index = pa.array(gidx, pa.int32())
    f = pa.float64() if float64 else pa.float32()
    null_f = pa.nulls(n, type=f)

    def opt(name: str) -> pa.Array:
        if name not in extra:
            return null_f
        vals = np.asarray(extra[name], ft)
        return pa.array(vals, type=f, mask=np.isnan(vals))

    cols = {
        "generation_step": pa.array(np.full(n, step, np.int32)),
        "layer": pa.array(np.concatenate(layer_col) if layer_col else np.zeros(0, np.int32)),
        "token_masked": pa.DictionaryArray.from_arrays(pa.array(text_idx, pa.int32()),
                                                       pa.array([str(u) for u in uniq], pa.string())),
        "token_position": pa.array(positions) if groups is None else pa.nulls(n, type=pa.int32()),
        "variant": pa.DictionaryArray.from_arrays(
            pa.array(np.concatenate(var_col) if var_col else np.zeros(0, np.int16), pa.int16()),
            pa.array(variants, pa.string())),
        "l2_distance": pa.array(np.concatenate(l2_col) if l2_col else np.zeros(0, ft), f),
        "cosine_distance": pa.array(np.concatenate(cos_col) if cos_col else np.zeros(0, ft), f),
        "token_kind": pa.DictionaryArray.from_arrays(pa.array(kinds, pa.int8()),
                                                     pa.array(["text", "image"] + (["group"] if groups is not None else []))),
        "image_index": _nullable(image_idx),
        "patch_row": _nullable(patch_row),
        "patch_col": _nullable(patch_col),
        "kl_divergence": opt("kl_divergence"),
        "target_prob_delta": opt("target_prob_delta"),
        "group_index": group_index,
        "grid_index": _nullable(grid_idx),
    }
    return pa.Table.from_pydict(cols, schema=schema(float64))


def image_grids(image: dict[str, Any]) -> list[dict[str, Any]]:
    """An image's token grids from a file's metadata (``images[i]``): its ``grids`` (version 2), or for
    version-1 metadata one grid of kind ``image`` covering the whole image."""
    if image.get("grids"):
        return [dict(g) for g in image["grids"]]
    w, h = image.get("original_size") or (image["grid_cols"], image["grid_rows"])
    return [{"kind": "image", "rows": int(image["grid_rows"]), "cols": int(image["grid_cols"]),
             "token_start": int(image["token_start"]), "token_end": int(image["token_end"]),
             "row_stride": int(image["grid_cols"]), "box": [0.0, 0.0, float(w), float(h)]}]


def grid_cells(grid: dict[str, Any], positions: Any) -> tuple[np.ndarray, np.ndarray]:
    """Row and column in ``grid`` (an :func:`image_grids` entry) of each of ``positions`` that is one of its
    cells; the others (another grid's, a separator, text) are left out."""
    rows, cols, stride = int(grid["rows"]), int(grid["cols"]), int(grid.get("row_stride") or grid["cols"])
    k = np.asarray(positions, np.int64) - int(grid["token_start"])
    r, c = k // stride, k % stride
    keep = (k >= 0) & (r < rows) & (c < cols)
    return r[keep], c[keep]


def step_layer_runs(table: pa.Table) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges over which ``generation_step`` and ``layer`` stay the same."""
    n = table.num_rows
    if n == 0:
        return []
    step = table.column("generation_step").to_numpy()
    layer = table.column("layer").to_numpy()
    change = np.flatnonzero((step[1:] != step[:-1]) | (layer[1:] != layer[:-1])) + 1
    bounds = [0, *change.tolist(), n]
    return list(zip(bounds[:-1], bounds[1:]))


def _tmp_path(path: Path) -> Path:
    """A new hidden temporary file beside ``path`` (same folder, so the final rename is atomic)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARKER}", dir=path.parent)
    os.close(fd)
    # mkstemp makes the file 0600; published files get the usual umask-based mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    return Path(name)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Write a file atomically: yields a hidden temporary path beside ``target``; on a clean exit it is
    renamed onto ``target`` (``os.replace``), on an error it is removed and ``target`` is untouched.

    The one way maskvl publishes files (Parquet, CSV, PNG, HTML), so a final name never holds a
    half-written file. Temporaries carry :data:`TEMP_MARKER`, which :func:`clean_stale_temps` finds.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(target)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, ``\\n`` newlines) to ``target`` atomically; returns the path."""
    with atomic_path(target) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return Path(target)


def partial_path(path: Path) -> Path:
    """Where an interrupted run keeps its completed steps."""
    stem = path.name[:-len(".parquet")] if path.name.endswith(".parquet") else path.name
    return path.with_name(stem + ".partial.parquet")


class ParquetSink:
    """Writes rows to a temporary file, one row group per (step, layer); publishes it atomically on
    :meth:`close`."""

    def __init__(self, path: str | os.PathLike, float64: bool = False, csv: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.float64 = float64
        self.csv = csv
        self.tmp = _tmp_path(self.path)
        self.writer = pq.ParquetWriter(self.tmp, schema(float64), compression="zstd")
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        """Append rows sorted by step and layer (:func:`rows_table`); each (step, layer) run of rows
        becomes its own row group, whose statistics let a reader pick one layer of one step."""
        for start, stop in step_layer_runs(table):
            self.writer.write_table(table.slice(start, stop - start), row_group_size=stop - start)
        self.rows += table.num_rows

    def _finish(self, metadata: dict[str, Any], target: Path) -> Path:
        self.writer.add_key_value_metadata({METADATA_KEY: json.dumps(metadata)})
        self.writer.close()
        os.replace(self.tmp, target)
        return target

    def close(self, metadata: dict[str, Any]) -> Path:
        """Publish the file under its final name (and the CSV beside it when asked)."""
        out = self._finish(metadata, self.path)
        if self.csv:
            write_csv(out, out.with_suffix(".csv"))
        return out

    def abort(self, metadata: dict[str, Any]) -> Path | None:
        """Keep completed steps in ``<name>.partial.parquet``; returns that path (None if nothing was written)."""
        try:
            if self.rows == 0:
                self.writer.close()
                self.tmp.unlink(missing_ok=True)
                return None
            return self._finish(metadata, partial_path(self.path))
        except Exception:
            self.tmp.unlink(missing_ok=True)
            return None


def write_csv(parquet: Path, csv_path: Path) -> Path:
    """The same rows as CSV (dictionary columns decoded), written atomically."""
    import pyarrow.csv as pacsv

    table = pq.read_table(parquet)
    table = table.cast(pa.schema([
        pa.field(f.name, f.type.value_type if pa.types.is_dictionary(f.type) else f.type) for f in table.schema
    ]))
    with atomic_path(csv_path) as tmp:
        pacsv.write_csv(table, tmp)
    return csv_path


def read_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``maskvl`` metadata of a Parquet file, or None if it has none (e.g. a prototype file)."""
    # The footer's key-value metadata (written at close), not the Arrow schema's.
    md = pq.ParquetFile(path).metadata.metadata or {}
    raw = md.get(METADATA_KEY.encode())
    return json.loads(raw) if raw else None


def clean_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove temporary files a killed run left in ``directory``; returns what was removed."""
    removed = []
    for p in Path(directory).glob(f".*{TEMP_MARKER}*"):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def base_metadata(**fields: Any) -> dict[str, Any]:
    """The metadata object with its fixed fields (format version, maskvl version, measure definitions)."""
    from . import __version__
    # Imported here: maskvl.measures imports torch, which readers of files (maskvl.open, view, render)
    # do not need and which takes seconds to import.
    from . import measures

    md = {"format_version": FORMAT_VERSION, "maskvl_version": __version__, "measures": measures.DEFINITIONS}
    md.update(fields)
    return md
