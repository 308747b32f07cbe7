"""A sweep's result as an object: what ``maskvl.open(path)`` and ``maskvl.sweep(...)`` return.

A :class:`Sweep` knows its steps, layers, variants, tokens, images and generated text from the file's
``maskvl`` metadata (``docs/FORMAT.md``) and reads rows lazily: a question about one layer of one step
reads only the row groups whose statistics (min/max of ``generation_step`` and ``layer``) can hold
it, and only the columns it needs. maskvl writes one row group per (step, layer)
(:class:`maskvl.io.ParquetSink`), so :meth:`Sweep.grid` reads one row group of a file of tens of
millions of rows. Files written with one row group per step read the same way: the rows of the other
layers are filtered out after reading.

Shapes: :meth:`Sweep.grid` ``[rows, cols]``, :meth:`Sweep.maps` ``[steps, layers, rows, cols]``,
float64 with NaN where nothing was measured (e.g. image tokens of a ``mask_mode="text"`` sweep).
"""

from __future__ import annotations

import html
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import io
from .errors import InputError
from .groups import positions_text

#: The Logits variant's name (docs/FORMAT.md; ``maskvl.measures.LOGITS``, not imported from there because
#: that module imports torch, which reading a file does not need and which takes seconds to import).
LOGITS = "Logits"

#: Short metric names and the columns they read; the column names are accepted too.
METRICS = {"l2": "l2_distance", "cosine": "cosine_distance", "kl": "kl_divergence",
           "target_prob": "target_prob_delta"}
#: Metrics that only the Logits variant carries (null on every other row).
LOGITS_METRICS = ("kl_divergence", "target_prob_delta")


@dataclass(frozen=True)
class _Group:
    """One row group: its index and the [min, max] of its steps and layers (unbounded if unknown)."""

    index: int
    steps: tuple[float, float]
    layers: tuple[float, float]
    rows: int

    def may_hold(self, steps: Iterable[int], layers: Iterable[int]) -> bool:
        return (any(self.steps[0] <= s <= self.steps[1] for s in steps)
                and any(self.layers[0] <= v <= self.layers[1] for v in layers))


class _FileSource:
    """Row groups of a Parquet file, read on demand through :meth:`pyarrow.parquet.ParquetFile.read_row_groups`."""

    def __init__(self, pf: pq.ParquetFile):
        self.pf = pf
        self.schema = pf.schema_arrow
        md = pf.metadata
        names = [md.schema.column(j).path for j in range(md.num_columns)]

        def bounds(rg: Any, name: str) -> tuple[float, float]:
            if name not in names:
                return (-np.inf, np.inf)
            st = rg.column(names.index(name)).statistics
            if st is None or not st.has_min_max:
                return (-np.inf, np.inf)
            return (st.min, st.max)

        self.groups = []
        for i in range(md.num_row_groups):
            rg = md.row_group(i)
            self.groups.append(_Group(i, bounds(rg, "generation_step"), bounds(rg, "layer"), rg.num_rows))

    def read(self, index: int, columns: list[str]) -> pa.Table:
        return self.pf.read_row_groups([index], columns=columns)

    def read_all(self) -> pa.Table:
        return self.pf.read()

    def close(self) -> None:
        self.pf.close()


class _TableSource:
    """In-memory tables (a sweep run without an output file), one per (step, layer) like the file's row groups."""

    def __init__(self, tables: Sequence[pa.Table]):
        self.tables = [t for t in tables if t.num_rows]
        self.schema = tables[0].schema if tables else io.schema()
        self.groups = []
        for i, t in enumerate(self.tables):
            s = pc.min_max(t["generation_step"])
            v = pc.min_max(t["layer"])
            self.groups.append(_Group(i, (s["min"].as_py(), s["max"].as_py()),
                                      (v["min"].as_py(), v["max"].as_py()), t.num_rows))

    def read(self, index: int, columns: list[str]) -> pa.Table:
        return self.tables[index].select(columns)

    def read_all(self) -> pa.Table:
        if not self.tables:
            return self.schema.empty_table()
        return pa.concat_tables(self.tables)

    def close(self) -> None:
        pass


def _ranges(values: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    return positions_text(values, ", ") or "none"


def _variant_list(variants: Sequence[str]) -> str:
    """Variant names with runs of heads shortened: ``Full, Attn, Head_0 … Head_31, Logits``."""
    heads = [v for v in variants if v.startswith("Head_") and v[5:].isdigit()]
    if len(heads) <= 3:
        return ", ".join(variants)
    first, last = variants.index(heads[0]), variants.index(heads[-1])
    if last - first + 1 != len(heads):
        return ", ".join(variants)
    return ", ".join([*variants[:first], f"{heads[0]} \u2026 {heads[-1]}", *variants[last + 1:]])


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


# pyarrow's own conversions to numpy (``to_numpy``, compute on Python scalars) import pandas on first
# use, about a second; reading one grid must not pay that. Row values are read from the Arrow buffers.
_NUMPY = {pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32, pa.int64(): np.int64,
          pa.float32(): np.float32, pa.float64(): np.float64}


def _numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-width integer or float column as numpy: int64 with -1 for nulls, float64 with NaN."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    if col.type not in _NUMPY:
        raise TypeError(f"not a fixed-width numeric column: {col.type}")
    floating = pa.types.is_floating(col.type)
    out = np.empty(sum(len(c) for c in chunks), np.float64 if floating else np.int64)
    start = 0
    for ch in chunks:
        n, off = len(ch), ch.offset
        validity, data = ch.buffers()[:2]
        part = out[start:start + n]
        if data is None or ch.null_count == n:
            part[:] = np.nan if floating else -1
        else:
            part[:] = np.frombuffer(data, _NUMPY[ch.type], count=off + n)[off:]
            if validity is not None and ch.null_count:
                valid = np.unpackbits(np.frombuffer(validity, np.uint8), count=off + n, bitorder="little")[off:]
                part[valid == 0] = np.nan if floating else -1
        start += n
    return out


def _member(values: np.ndarray, wanted: Iterable[int]) -> np.ndarray:
    """``values in wanted`` for small non-negative integers (steps, layers, dictionary codes): bool ``[n]``.

    A lookup table; ``np.isin`` sorts and is several times slower on the half-million rows of a group.
    """
    w = np.fromiter(wanted, np.int64)
    table = np.zeros(int(w.max(initial=-1)) + 2, bool)  # its last entry stays False: nulls (-1) and
    table[w] = True  # values past the largest wanted one land there
    return table[np.clip(values, -1, len(table) - 1)]


def _in_strings(col: pa.ChunkedArray, wanted: Sequence[str]) -> np.ndarray:
    """``col in wanted`` for a string column (dictionary-encoded in maskvl files): bool ``[rows]``."""
    parts = []
    for ch in col.chunks:
        if pa.types.is_dictionary(ch.type):
            codes = [i for i, name in enumerate(ch.dictionary.to_pylist()) if name in wanted]
            parts.append(_member(_numpy(ch.indices), codes))
        else:
            parts.append(np.array([v in wanted for v in ch.to_pylist()], bool))
    return np.concatenate(parts) if parts else np.zeros(0, bool)


class Sweep:
    """The result of one sweep: metadata in memory, rows read on demand (see the module docstring).

    Build one with :func:`open` (a file) or get one from :func:`maskvl.sweep`. Selections are checked:
    an unknown step, layer, variant, metric or image raises ``ValueError`` naming the valid ones.
    """

    def __init__(self, source: _FileSource | _TableSource, metadata: dict[str, Any], path: Path | None = None,
                 steps: Sequence[int] | None = None):
        self._src = source
        self.metadata = metadata
        self.path = path
        # The steps whose rows this object holds: all the metadata's, or one (maskvl.iter_sweep).
        self._steps = sorted(int(s) for s in steps) if steps is not None else None
        self._table: pa.Table | None = None

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Sweep":
        """Open a maskvl Parquet file; reads only its footer (metadata and row-group statistics)."""
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"file not found: {p}")
        if p.is_dir():
            raise InputError(f"{p} is a directory, not a Parquet file")
        try:
            pf = pq.ParquetFile(p)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"cannot read {p} as a maskvl Parquet file: {str(exc).splitlines()[0]}") from None
        raw = (pf.metadata.metadata or {}).get(io.METADATA_KEY.encode())
        if not raw:
            raise InputError(f"{p} has no maskvl metadata (not written by maskvl? `maskvl view` opens "
                             f"prototype files)")
        missing = [c for c in ("generation_step", "layer", "variant", "token_position")
                   if c not in pf.schema_arrow.names]
        if missing:
            raise InputError(f"{p} lacks the column(s) {', '.join(missing)} of a maskvl file")
        return cls(_FileSource(pf), json.loads(raw), p)

    @classmethod
    def from_tables(cls, tables: Sequence[pa.Table], metadata: dict[str, Any],
                    steps: Sequence[int] | None = None) -> "Sweep":
        """A sweep over in-memory tables of rows (``maskvl.io.rows_table``), e.g. one per (step, layer);
        ``steps`` limits it to the steps the tables hold when the metadata knows more."""
        return cls(_TableSource(tables), metadata, steps=steps)

    def close(self) -> None:
        """Close the file (a ``with maskvl.open(path) as s:`` block does it on exit)."""
        self._src.close()

    def __enter__(self) -> "Sweep":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- what the sweep holds ----------------------------------------------------------------------

    @property
    def steps(self) -> list[int]:
        """The generation steps in the file (0 = the prompt alone)."""
        if self._steps is not None:
            return list(self._steps)
        return sorted(int(g["step"]) for g in self.metadata.get("generated") or [])

    @property
    def layers(self) -> list[int]:
        """The measured decoder layers, ascending."""
        return sorted(int(v) for v in self.metadata.get("layers") or [])

    @property
    def variants(self) -> list[str]:
        """``Full``, ``Attn``, ``Head_0`` …, and ``Logits`` when measured, in natural order (the metadata's)."""
        return list(self.metadata.get("variants") or [])

    @property
    def metrics(self) -> list[str]:
        """The metric names :meth:`grid` and friends take (short names; the column names work too)."""
        return ["l2", "cosine"] + (["kl", "target_prob"] if LOGITS in self.variants else [])

    @property
    def tokens(self) -> list[dict[str, Any]]:
        """Every position of the last step's sequence: ``position``, ``id``, ``text``, ``kind``, image/patch."""
        return list(self.metadata.get("tokens") or [])

    @property
    def images(self) -> list[dict[str, Any]]:
        """The images in prompt order: grid size, token range, sizes and path (``docs/FORMAT.md``)."""
        return list(self.metadata.get("images") or [])

    @property
    def grids(self) -> list[tuple[int, int]]:
        """``(rows, cols)`` of each image's (first) merged-token grid; :meth:`image_grids` lists them all."""
        return [(int(im["grid_rows"]), int(im["grid_cols"])) for im in self.images]

    def image_grids(self, image: int = 0) -> list[dict[str, Any]]:
        """The token grids of ``image``, in token order: ``kind`` (``image``, ``base``, ``thumbnail``,
        ``tile``), ``rows``, ``cols``, ``token_start``, ``token_end``, ``row_stride`` and ``box`` (x0, y0,
        x1, y1 in the original image's pixels). A version-1 file has one grid per image covering it."""
        return io.image_grids(self._image(image))

    def _grid_of(self, image: int, grid: Any) -> tuple[int, dict[str, Any]]:
        grids = self.image_grids(image)
        if not _is_int(grid) or not 0 <= int(grid) < len(grids):
            kinds = ", ".join(f"{i} {g['kind']} {g['rows']}x{g['cols']}" for i, g in enumerate(grids))
            raise InputError(f"grid {grid!r} is not in image {image} (its grids: {kinds})")
        return int(grid), grids[int(grid)]

    @property
    def groups(self) -> list[dict[str, Any]]:
        """A group run's groups (``mask_groups``): ``index``, ``spec``, ``label``, ``positions``,
        ``image_index`` (None unless within one image), ``box``; empty for a per-token sweep."""
        return list(self.metadata.get("groups") or [])

    @property
    def generated(self) -> list[dict[str, Any]]:
        """The token chosen after each step: ``{"step", "id", "text"}``."""
        return list(self.metadata.get("generated") or [])

    @property
    def generated_text(self) -> str:
        """The generated tokens decoded together."""
        text = self.metadata.get("generated_text")
        return text if text is not None else "".join(g.get("text", "") for g in self.generated)

    @property
    def prompt(self) -> str:
        return str(self.metadata.get("prompt", ""))

    @property
    def model(self) -> str:
        return str(self.metadata.get("model", ""))

    @property
    def complete(self) -> bool:
        """False for a ``.partial.parquet`` file of an interrupted run (it holds the completed steps)."""
        return bool(self.metadata.get("complete"))

    @property
    def num_rows(self) -> int:
        return sum(g.rows for g in self._src.groups)

    @property
    def num_row_groups(self) -> int:
        return len(self._src.groups)

    @property
    def table(self) -> pa.Table:
        """Every row as one ``pyarrow.Table`` (metadata under ``b"maskvl"``). Reads a file whole, once:
        prefer :meth:`grid`, :meth:`maps`, :meth:`top` or :meth:`to_pandas` with a selection for big files."""
        if self._table is None:
            self._table = self._src.read_all().replace_schema_metadata(
                {io.METADATA_KEY: json.dumps(self.metadata)})
        return self._table

    def seq_len(self, step: int) -> int:
        """Length of the sequence measured at ``step`` (the prompt plus ``step`` generated tokens)."""
        step = self._step(step)
        num_steps = int(self.metadata.get("num_steps") or 0)
        # tokens covers the prompt and every generated token that a later step was to measure.
        appended = sum(1 for g in self.generated if int(g["step"]) + 1 < num_steps)
        return len(self.tokens) - appended + step

    # -- argument checks ---------------------------------------------------------------------------

    def _step(self, step: Any) -> int:
        if not _is_int(step) or int(step) not in self.steps:
            raise InputError(f"step {step!r} is not in this sweep (it has steps {_ranges(self.steps)})")
        return int(step)

    def _layer(self, layer: Any) -> int:
        if layer is None:
            if not self.layers:
                raise InputError("this sweep measured no layer")
            return self.layers[-1]
        if not _is_int(layer) or int(layer) not in self.layers:
            raise InputError(f"layer {layer!r} is not in this sweep (it measured layers {_ranges(self.layers)})")
        return int(layer)

    def _variant(self, variant: Any) -> str:
        if variant not in self.variants:
            raise InputError(f"variant {variant!r} is not in this sweep (it has {_variant_list(self.variants)})")
        return str(variant)

    def _head_at(self, variant: Any, layer: int) -> None:
        """A one-line error for a head ``layer`` does not have (metadata ``layer_heads``: Qwen3.5's linear and
        attention layers have different head counts); ``maps`` over several layers gives NaN there instead."""
        heads = self.metadata.get("layer_heads")
        if (isinstance(variant, str) and variant.startswith("Head_") and variant[5:].isdigit()
                and isinstance(heads, list) and layer < len(heads) and isinstance(heads[layer], int)
                and int(variant[5:]) >= heads[layer]):
            kinds = self.metadata.get("layer_types") or []
            kind = f"{kinds[layer]} " if layer < len(kinds) and isinstance(kinds[layer], str) else ""
            raise InputError(f"variant {variant!r} is not at layer {layer}: that {kind}layer has {heads[layer]} heads "
                             f"(Head_0 \u2026 Head_{heads[layer] - 1})")

    def _metric(self, metric: Any, variants: Sequence[str]) -> str:
        col = METRICS.get(metric, metric)
        if col not in METRICS.values():
            raise InputError(f"metric {metric!r} is not one of {', '.join(METRICS)} (or the columns "
                             f"{', '.join(METRICS.values())})")
        if col in LOGITS_METRICS:
            if LOGITS not in self.variants:
                raise InputError(f"metric {metric!r} needs the Logits measure, which this sweep did not run")
            if any(v != LOGITS for v in variants):
                raise InputError(f"metric {metric!r} is measured for the {LOGITS} variant only")
        return col

    def _image(self, image: Any) -> dict[str, Any]:
        if not self.images:
            raise InputError("this sweep has no images (a text-only prompt): use text()")
        if not _is_int(image) or not 0 <= int(image) < len(self.images):
            raise InputError(f"image {image!r} is not in this sweep (it has images {_ranges(range(len(self.images)))})")
        return self.images[int(image)]

    def _many(self, values: Any, check: Any, available: list[Any]) -> list[Any]:
        """None -> everything; one value or a sequence -> checked values, in the sweep's order."""
        if values is None:
            return list(available)
        items = [values] if _is_int(values) or isinstance(values, str) else list(values)
        if not items:
            raise InputError("an empty selection selects nothing (None selects everything)")
        checked = {check(v) for v in items}
        return [v for v in available if v in checked]

    # -- reading -----------------------------------------------------------------------------------

    def _scan(self, steps: Sequence[int], layers: Sequence[int], variants: Sequence[str] | None,
              columns: Sequence[str]) -> Iterator[tuple[_Group, pa.Table, np.ndarray]]:
        """The rows of ``steps`` x ``layers`` (x ``variants``): per row group that may hold some, the
        group, its table (``columns`` plus those the selection needs) and the selected rows' mask.

        Reads only those row groups and only those columns.
        """
        for g in self._src.groups:
            if not g.may_hold(steps, layers):
                continue
            # A group of one (step, layer) needs no filtering on them (its statistics say so).
            exact = g.steps[0] == g.steps[1] and g.layers[0] == g.layers[1]
            need = list(dict.fromkeys([*([] if exact else ["generation_step", "layer"]),
                                       *(["variant"] if variants is not None else []), *columns]))
            t = self._src.read(g.index, need)
            mask = np.ones(t.num_rows, bool)
            if not exact:
                mask &= _member(_numpy(t["generation_step"]), steps) & _member(_numpy(t["layer"]), layers)
            if variants is not None:
                mask &= _in_strings(t["variant"], variants)
            if mask.any():
                yield g, t, mask

    def _rows(self, steps: Sequence[int], layers: Sequence[int], variants: Sequence[str] | None,
              columns: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
        """:meth:`_scan` as numpy columns (ints: -1 for null, floats: NaN), selected rows only."""
        for g, t, mask in self._scan(steps, layers, variants, columns):
            row = {c: _numpy(t[c])[mask] for c in columns}
            n = int(mask.sum())
            for name, bounds in (("generation_step", g.steps), ("layer", g.layers)):
                if name not in row:  # not read: the group holds one value (see _scan)
                    row[name] = _numpy(t[name])[mask] if name in t.column_names else np.full(n, int(bounds[0]))
            yield row

    def grid(self, image: int = 0, step: int = 0, layer: int | None = None, variant: str = "Full",
             metric: str = "l2", spec: str | None = None, grid: int = 0) -> np.ndarray:
        """One image's merged-token grid at one step and layer: ``[rows, cols]`` float64, NaN where not
        measured. ``layer=None`` is the last measured layer; ``metric``: ``l2``, ``cosine``, and for the
        ``Logits`` variant ``kl`` and ``target_prob`` (or the column names). In a group run each group's
        value fills all of its cells; ``spec`` picks the groups (``"blocks:4x4"``...) when several specs
        cover the image. ``grid``: which of a tiled image's grids (:meth:`image_grids`; 0 for the Qwen line)."""
        step, layer, variant = self._step(step), self._layer(layer), self._variant(variant)
        self._head_at(variant, layer)
        return self.maps(image, [step], [layer], variant, metric, spec, grid)[0, 0]

    def maps(self, image: int = 0, steps: int | Sequence[int] | None = None,
             layers: int | Sequence[int] | None = None, variant: str = "Full", metric: str = "l2",
             spec: str | None = None, grid: int = 0) -> np.ndarray:
        """One image's grids for several steps and layers: ``[steps, layers, rows, cols]`` float64, NaN
        where not measured. ``steps``/``layers``: one value, a list, or None for all (ascending).
        ``spec`` and ``grid`` as in :meth:`grid`."""
        im = self._image(image)
        steps_l = self._many(steps, self._step, self.steps)
        layers_l = self._many(layers, self._layer, self.layers)
        variant = self._variant(variant)
        col = self._metric(metric, [variant])
        grid, g = self._grid_of(int(image), grid)
        rows, cols = int(g["rows"]), int(g["cols"])
        out = np.full((len(steps_l), len(layers_l), rows, cols), np.nan)
        # Index of each step / layer along the output's first two axes.
        si = np.zeros(max(steps_l) + 1, np.int64)
        si[steps_l] = np.arange(len(steps_l))
        li = np.zeros(max(layers_l) + 1, np.int64)
        li[layers_l] = np.arange(len(layers_l))
        if self.groups:
            cells = self._group_cells(int(image), spec, g)
            flat = out.reshape(len(steps_l), len(layers_l), rows * cols)
            for r in self._rows(steps_l, layers_l, [variant], [col, "group_index"]):
                for g, s_, l_, v in zip(r["group_index"].tolist(), r["generation_step"].tolist(),
                                        r["layer"].tolist(), r[col].tolist()):
                    if g in cells:
                        flat[si[s_], li[l_], cells[g]] = v
            return out
        if spec is not None:
            raise InputError("spec selects groups; this sweep measured single tokens (no mask_groups)")
        # grid_index: needed only for an image of several grids (a version-1 file has one grid per image).
        has_grid = "grid_index" in self._src.schema.names and len(self.image_grids(int(image))) > 1
        for r in self._rows(steps_l, layers_l, [variant],
                            [col, "image_index", "patch_row", "patch_col"] + (["grid_index"] if has_grid else [])):
            m = r["image_index"] == int(image)
            if has_grid:
                m &= r["grid_index"] == grid
            out[si[r["generation_step"][m]], li[r["layer"][m]], r["patch_row"][m], r["patch_col"][m]] = r[col][m]
        return out

    def _group_cells(self, image: int, spec: str | None, grid: dict[str, Any]) -> dict[int, np.ndarray]:
        """Group index -> the flat cells of ``grid`` (one of ``image``'s grids) its members cover, for the
        groups of ``spec`` within that image (the only spec there when ``spec`` is None)."""
        mine = [g for g in self.groups if g.get("image_index") == image]
        specs = list(dict.fromkeys(str(g["spec"]) for g in mine))
        if spec is None:
            if len(specs) > 1:
                raise InputError(f"image {image} has groups of several specs ({', '.join(specs)}): pass spec=")
        elif spec not in specs:
            have = ", ".join(specs) if specs else "none"
            raise InputError(f"no groups of spec {spec!r} in image {image} (its specs: {have})")
        def cells(positions: list[int]) -> np.ndarray:
            r, c = io.grid_cells(grid, positions)
            return r * int(grid["cols"]) + c

        return {int(g["index"]): cells(g["positions"]) for g in mine if spec is None or g["spec"] == spec}

    def _per_token(self, what: str) -> None:
        if self.groups:
            raise InputError(f"{what} reads single-token rows; this is a group run (mask_groups): use "
                             f"top(), grid()/maps() for image groups, or to_pandas() and .groups")

    def text(self, step: int = 0, layer: int | None = None, variant: str = "Full", metric: str = "l2") -> Any:
        """The text tokens of ``step``'s sequence with their values at ``layer``: a pandas DataFrame with
        ``position``, ``token`` and the metric's column (NaN where not measured), in sequence order."""
        import pandas as pd

        self._per_token("text()")
        step, layer, variant = self._step(step), self._layer(layer), self._variant(variant)
        self._head_at(variant, layer)
        col = self._metric(metric, [variant])
        n = self.seq_len(step)
        toks = [t for t in self.tokens if t.get("kind") != "image" and int(t["position"]) < n]
        positions = np.array([int(t["position"]) for t in toks], np.int64)
        values = np.full(len(toks), np.nan)
        where = {int(p): i for i, p in enumerate(positions)}
        for r in self._rows([step], [layer], [variant], [col, "token_position", "image_index"]):
            m = r["image_index"] < 0
            for p, v in zip(r["token_position"][m].tolist(), r[col][m].tolist()):
                if p in where:
                    values[where[p]] = v
        return pd.DataFrame({"position": positions, "token": [t["text"] for t in toks], col: values})

    def top(self, k: int = 10, steps: int | Sequence[int] | None = None, layers: int | Sequence[int] | None = None,
            variant: str = "Full", metric: str = "l2", kind: str | None = None) -> Any:
        """The ``k`` masked tokens with the largest values over the selection (default: every step and
        layer), largest first: a pandas DataFrame with step, layer, position, token, kind, image, patch
        row/col and the metric's column. ``kind``: ``"image"``, ``"text"`` or None for both.

        In a group run (``mask_groups``) the rows are groups: step, layer, ``group_index``, its label,
        spec, image (null unless within one image), size and the metric's column; ``kind="image"`` keeps
        the groups within one image, ``"text"`` the others."""
        import pandas as pd

        if not _is_int(k) or k < 1:
            raise InputError(f"k must be a positive integer (got {k!r})")
        if kind not in (None, "image", "text"):
            raise InputError(f"kind must be 'image', 'text' or None (got {kind!r})")
        steps_l = self._many(steps, self._step, self.steps)
        layers_l = self._many(layers, self._layer, self.layers)
        variant = self._variant(variant)
        col = self._metric(metric, [variant])
        grouped = bool(self.groups)
        in_image = np.array([g.get("image_index") is not None for g in self.groups], bool)
        cols = ["group_index", col] if grouped else ["token_position", "image_index", "patch_row", "patch_col", col]
        best: dict[str, np.ndarray] | None = None
        for r in self._rows(steps_l, layers_l, [variant], cols):
            if kind is not None:
                image_rows = in_image[r["group_index"]] if grouped else r["image_index"] >= 0
                keep = image_rows if kind == "image" else ~image_rows
                r = {c: v[keep] for c, v in r.items()}
            # Candidates stay bounded: at most k rows survive from everything read so far.
            if best is not None:
                r = {c: np.concatenate([best[c], v]) for c, v in r.items()}
            ok = np.flatnonzero(np.isfinite(r[col]))
            if len(ok) > k:
                ok = ok[np.argpartition(-r[col][ok], k - 1)[:k]]
            best = {c: v[ok] for c, v in r.items()}
        if grouped:
            return self._top_groups(best, col)
        names = ["generation_step", "layer", "token_position", "token", "token_kind", "image_index", "patch_row",
                 "patch_col", col]
        if best is None:
            return pd.DataFrame(columns=names)
        order = np.lexsort((best["token_position"], best["layer"], best["generation_step"], -best[col]))
        best = {c: v[order] for c, v in best.items()}
        texts = {int(t["position"]): t["text"] for t in self.tokens}
        is_image = best["image_index"] >= 0

        def nullable(name: str) -> Any:  # null for text tokens: pandas' nullable integers, not floats
            values = pd.array(best[name], dtype="Int64")
            values[~is_image] = pd.NA
            return values

        return pd.DataFrame({
            "generation_step": best["generation_step"],
            "layer": best["layer"],
            "token_position": best["token_position"],
            "token": [texts.get(int(p), "") for p in best["token_position"]],
            "token_kind": np.where(is_image, "image", "text"),
            "image_index": nullable("image_index"),
            "patch_row": nullable("patch_row"),
            "patch_col": nullable("patch_col"),
            col: best[col],
        }, columns=names)

    def _top_groups(self, best: dict[str, np.ndarray] | None, col: str) -> Any:
        """:meth:`top`'s table for a group run from its selected rows (largest first)."""
        import pandas as pd

        names = ["generation_step", "layer", "group_index", "label", "spec", "image_index", "size", col]
        if best is None:
            return pd.DataFrame(columns=names)
        order = np.lexsort((best["group_index"], best["layer"], best["generation_step"], -best[col]))
        best = {c: v[order] for c, v in best.items()}
        info = [self.groups[int(g)] for g in best["group_index"]]
        return pd.DataFrame({
            "generation_step": best["generation_step"],
            "layer": best["layer"],
            "group_index": best["group_index"],
            "label": [g["label"] for g in info],
            "spec": [g["spec"] for g in info],
            "image_index": pd.array([g.get("image_index") for g in info], dtype="Int64"),
            "size": [len(g["positions"]) for g in info],
            col: best[col],
        }, columns=names)

    def to_pandas(self, steps: int | Sequence[int] | None = None, layers: int | Sequence[int] | None = None,
                  variants: str | Sequence[str] | None = None, columns: Sequence[str] | None = None) -> Any:
        """Rows as a pandas DataFrame (the file's columns), optionally only some steps, layers, variants
        and columns; with no selection, every row (``self.table.to_pandas()``)."""
        if steps is None and layers is None and variants is None and columns is None:
            return self.table.to_pandas()
        steps_l = self._many(steps, self._step, self.steps)
        layers_l = self._many(layers, self._layer, self.layers)
        variants_l = None if variants is None else self._many(variants, self._variant, self.variants)
        names = self._src.schema.names
        cols = list(names) if columns is None else list(columns)
        bad = [c for c in cols if c not in names]
        if bad:
            raise InputError(f"column {bad[0]!r} is not in this sweep (it has {', '.join(names)})")
        parts = [t.filter(pa.array(mask)).select(cols)
                 for _, t, mask in self._scan(steps_l, layers_l, variants_l, cols)]
        if not parts:
            return self._src.schema.empty_table().select(cols).to_pandas()
        return pa.concat_tables(parts).to_pandas()

    # -- drawing -----------------------------------------------------------------------------------

    def plot(self, steps: int | Sequence[int] | None = None, layers: int | Sequence[int] | None = None,
             variant: str = "Full", metric: str = "l2", images: Sequence[str] = (), alpha: float = 0.6,
             cmap: str = "magma", dpi: int = 110) -> Any:
        """Heatmaps over the images and text-token strips, as ``maskvl render`` draws them: one row of
        panels per step and image, one panel per layer (default: every step, up to eight layers spread
        over the measured ones). ``images`` replace the image paths recorded in the metadata. Returns
        the ``matplotlib.figure.Figure`` (not left open in pyplot, so a notebook shows it once)."""
        from . import render

        steps_l = self._many(steps, self._step, self.steps)
        layers_l = self._many(layers, self._layer, self.layers) if layers is not None \
            else render.default_layers(self.layers)
        variant = self._variant(variant)
        col = self._metric(metric, [variant])
        if len(images) > len(self.images):
            raise InputError(f"{len(images)} images given but the sweep has {len(self.images)} image(s)")
        try:
            import matplotlib  # plotting only: imported when a figure is drawn

            matplotlib.colormaps[cmap]
        except KeyError:
            raise InputError(f"unknown colour map {cmap!r}") from None
        grouped = "group_index" in self._src.schema.names
        gridded = "grid_index" in self._src.schema.names
        cols = (["token_position", col, "image_index", "patch_row", "patch_col"] + (["group_index"] if grouped else [])
                + (["grid_index"] if gridded else []))
        parts = list(self._rows(steps_l, layers_l, [variant], cols))

        def arr(name: str) -> np.ndarray:
            return np.concatenate([r[name] for r in parts]) if parts else np.zeros(0)

        data = render.SweepFile(self.path, self.metadata, arr("generation_step"), arr("layer"),
                                arr("token_position"), arr(col), arr("image_index"), arr("patch_row"),
                                arr("patch_col"),
                                arr("group_index") if grouped else np.full(len(arr("layer")), -1),
                                arr("grid_index") if gridded else None)
        backgrounds = []
        for i, im in enumerate(self.images):
            bg, why = render._load_background(im.get("path"), images[i] if i < len(images) else None)
            if why is not None:
                warnings.warn(f"image {i}: {why}; drawing the heatmap without it (pass images=[...])",
                              stacklevel=2)
            backgrounds.append(bg)
        from matplotlib import pyplot as plt

        with warnings.catch_warnings():
            # Tokens in scripts DejaVu Sans lacks draw as boxes; the warning per glyph is noise.
            warnings.filterwarnings("ignore", message="Glyph .* missing")
            fig = render.build_figure(data, steps_l, layers_l, variant, col, backgrounds, alpha, cmap, dpi)
        plt.close(fig)
        return fig

    # -- display -----------------------------------------------------------------------------------

    def _summary(self) -> list[tuple[str, str]]:
        md = self.metadata
        n_img = sum(1 for t in self.tokens if t.get("kind") == "image")
        status = "complete" if self.complete else "partial"
        rows = [
            ("model", f"{self.model} ({md.get('dtype', '?')}, {md.get('backend', '?')} backend)"),
            ("prompt", self.prompt),
            ("generated", self.generated_text),
            ("steps", f"{_ranges(self.steps)} ({len(self.steps)} of {md.get('num_steps', '?')}, {status})"),
            ("layers", f"{_ranges(self.layers)} of {md.get('num_layers', '?')}"),
            ("variants", _variant_list(self.variants)),
            ("tokens", f"{len(self.tokens)} ({n_img} image, {len(self.tokens) - n_img} text); "
                       f"mask mode {md.get('mask_mode', '?')}"),
        ]
        for im in self.images:
            name = Path(im["path"]).name if im.get("path") else "(no path)"
            rows.append((f"image {im['index']}", f"{im['grid_rows']}x{im['grid_cols']} grid, {name}"))
        rows.append(("rows", f"{self.num_rows:,} in {self.num_row_groups} row groups"))
        return rows

    def __repr__(self) -> str:
        where = self.path.name if self.path is not None else "in memory"
        return (f"<maskvl.Sweep {where}: {self.model}, steps {_ranges(self.steps)}, layers {_ranges(self.layers)}, "
                f"{len(self.variants)} variants, {self.num_rows:,} rows>")

    def _repr_html_(self) -> str:
        where = html.escape(self.path.name) if self.path is not None else "in memory"
        body = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(k)}</th>"
                       f"<td style='text-align:left'>{html.escape(v)}</td></tr>" for k, v in self._summary())
        return f"<div><b>maskvl Sweep</b> <code>{where}</code><table>{body}</table></div>"

