"""``maskvl render FILE.parquet``: heatmaps of a sweep, drawn over its images, plus text-token strips.

One figure holds, for each selected generation step, a row of small multiples per image (one panel per
selected layer: the merged-token grid's values over the image, stretched to the grid as described in
``docs/FORMAT.md``) and a strip per layer of coloured chips for the masked text tokens. All panels and
chips share one colour scale, shown by one colourbar, so colours compare across layers, steps and
images. Files are written atomically (hidden temporary file, then ``os.replace``).

Group runs (``mask_groups``) are drawn as blocks: each group's value fills all of its grid cells, with
a thin outline around the group's grid rectangle. Groups of different specs may overlap (``images``
and ``blocks:4x4``), so each spec touching an image gets its own row of panels; groups that are not
within one image (text positions, or several images) are chips labelled with the group.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import io
from .errors import InputError, MaskvlError
from .inputs import load_image
from .options import parse_layers

METRICS = {"l2": "l2_distance", "cosine": "cosine_distance"}
DEFAULT_MAX_LAYERS = 8
PANEL_IN = 2.3  # width of one heatmap panel, inches
STRIP_FONT = 7.0  # chip text size, points
# Matplotlib refuses figures above 2^16 pixels a side; stay well below with a readable message.
MAX_SIDE_PX = 30000


@dataclass
class SweepFile:
    """The rows of one variant of a sweep file, as numpy arrays, and the file's metadata."""

    path: Path
    metadata: dict[str, Any]
    step: Any
    layer: Any
    position: Any
    value: Any
    image_index: Any  # -1 for text rows (and for groups not within one image)
    patch_row: Any
    patch_col: Any
    group: Any = None  # group_index, -1 for per-token rows (files written before groups: all -1)
    grid: Any = None  # grid_index within the image, -1 for text (version-1 files: None, one grid per image)

    def image_grids(self, image: int) -> list[dict[str, Any]]:
        """The image's grids (``maskvl.io.image_grids``: version-1 metadata gives one grid of kind ``image``)."""
        return io.image_grids((self.metadata.get("images") or [])[image])

    def tiled(self, image: int) -> bool:
        """Whether the image is drawn grid by grid at the grids' boxes: several grids, or one that is not a
        plain grid of the whole image (a base view, or a box reaching into the processor's padding)."""
        grids = self.image_grids(image)
        im = (self.metadata.get("images") or [])[image]
        w, h = im.get("original_size") or (None, None)
        return len(grids) > 1 or grids[0].get("kind") != "image" or list(grids[0]["box"]) != [0, 0, w, h]

    def group_info(self) -> list[dict[str, Any]]:
        """The metadata's group list (empty for per-token files)."""
        return self.metadata.get("groups") or []


def read_sweep(path: str | os.PathLike, variant: str, metric: str) -> SweepFile:
    """Read the rows of ``variant`` and the values of ``metric`` (``l2`` or ``cosine``) from a sweep file."""


    p = Path(path)
    if not p.exists():
        raise InputError(f"file not found: {p}")
    if p.is_dir():
        raise InputError(f"{p} is a directory, not a Parquet file")
    try:
        md = io.read_metadata(p)
        names = pq.read_schema(p).names
        table = pq.read_table(p, columns=["generation_step", "layer", "token_position", "variant", METRICS[metric],
                                          "image_index", "patch_row", "patch_col"]
                              + [c for c in ("group_index", "grid_index") if c in names])
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InputError(f"cannot read {p} as a maskvl Parquet file: {str(exc).splitlines()[0]}") from None
    if not md:
        raise InputError(f"{p} has no maskvl metadata (not written by maskvl?)")
    variants = md.get("variants") or []
    if variant not in variants:
        raise InputError(f"variant {variant!r} is not in {p.name} (it has {', '.join(variants)})")
    table = table.filter(pc.equal(table["variant"].cast(pa.string()), variant))

    def col(name: str, fill: int | None = None) -> Any:
        c = table[name]
        if fill is not None:
            c = pc.fill_null(c, fill)
        return c.to_numpy()

    group = col("group_index", -1) if "group_index" in table.column_names else np.full(table.num_rows, -1)
    grid = col("grid_index", -1) if "grid_index" in table.column_names else None
    return SweepFile(p, md, col("generation_step"), col("layer"), col("token_position", -1),
                     col(METRICS[metric]).astype(np.float64), col("image_index", -1), col("patch_row", -1),
                     col("patch_col", -1), group, grid)


def _parse_selection(spec: str | None, available: list[int], what: str) -> list[int]:
    """``0-3,7`` against what the file has; None -> everything."""

    if spec is None:
        return available
    try:
        wanted = parse_layers(spec)
    except InputError:
        raise InputError(f"bad --{what} list {spec!r}: expected e.g. 0-3,7") from None
    if wanted is None:
        return available
    missing = [v for v in wanted if v not in available]
    if missing:
        have = ", ".join(map(str, available)) or "none"
        raise InputError(f"{what[:-1]} {missing[0]} is not in the file (it has {have})")
    return sorted(set(wanted))


def default_layers(available: list[int], limit: int = DEFAULT_MAX_LAYERS) -> list[int]:
    """Up to ``limit`` layers evenly spread over ``available``, first and last included."""
    if len(available) <= limit:
        return available
    idx = sorted({round(i * (len(available) - 1) / (limit - 1)) for i in range(limit)})
    return [available[i] for i in idx]


def _chip_text(text: str) -> str:
    # Whitespace-only tokens would be invisible chips; show spaces and newlines with visible marks.
    return text.replace("\n", "\u21b5").replace("\t", "\u2192").replace(" ", "\u00b7") or "\u2205"


def _text_color(rgba: tuple[float, float, float, float]) -> str:
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def _layout_chips(texts: list[str], width_in: float) -> tuple[list[tuple[float, int, float]], int]:
    """Place chips left to right, wrapping at ``width_in``: (x inches, line, chip width inches) each, lines."""
    char_in = STRIP_FONT * 0.62 / 72  # DejaVu Sans' average advance is ~0.6 em
    pad = 0.06
    x, line, out = 0.0, 0, []
    for t in texts:
        w = min(len(t) * char_in + 2 * pad, width_in)
        if x > 0 and x + w > width_in:
            x, line = 0.0, line + 1
        out.append((x, line, w))
        x += w + 0.03
    return out, (line + 1 if texts else 1)


def _load_background(path: str | None, override: str | None) -> tuple[Any, str | None]:
    """The image behind a heatmap: ``--image`` if given (must load), else the metadata path (may be gone)."""

    if override is not None:
        return load_image(override), None
    if not path:
        return None, "the file does not record the image's path"
    try:
        return load_image(path), None
    except MaskvlError as exc:
        return None, str(exc)


def _save_atomic(fig: Any, target: Path, dpi: int) -> None:

    with io.atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def image_grid(data: SweepFile, step: int, layer: int, image: int, rows: int, cols: int,
               spec: str | None = None) -> Any:
    """The ``rows x cols`` merged-token grid of one image at one step and layer (NaN where not measured):
    its first grid, :func:`grid_heat` (for the Qwen line the one grid covering it).

    With ``spec`` (group files), the groups of that spec in this image instead: each group's value over
    all of its members' cells.
    """
    heat = grid_heat(data, step, layer, image, 0, spec)
    if heat.shape != (rows, cols):
        raise ValueError(f"image {image}'s first grid is {heat.shape[0]}x{heat.shape[1]}, not {rows}x{cols}")
    return heat


def grid_heat(data: SweepFile, step: int, layer: int, image: int, grid: int, spec: str | None = None) -> np.ndarray:
    """``[rows, cols]`` values of one grid of a tiled image (NaN where not measured); with ``spec`` (group
    files) each group's value over its members' cells in that grid."""
    g = data.image_grids(image)[grid]
    heat = np.full((int(g["rows"]), int(g["cols"])), np.nan)
    m = (data.step == step) & (data.layer == layer) & (data.image_index == image)
    if spec is None:
        m &= data.group < 0
        if data.grid is not None:
            m &= data.grid == grid
        heat[data.patch_row[m], data.patch_col[m]] = data.value[m]
        return heat
    groups = data.group_info()
    for gi, value in zip(data.group[m & (data.group >= 0)], data.value[m & (data.group >= 0)]):
        info = groups[int(gi)]
        if info["spec"] != spec:
            continue
        heat[io.grid_cells(g, info["positions"])] = value
    return heat


def tiled_panels(data: SweepFile, image: int) -> list[tuple[str, list[int]]]:
    """What to draw for a tiled image: ``("mosaic", tile grid indices)`` (the tiles at their boxes over the
    picture) first, then ``(kind, [grid])`` for each base view or thumbnail (over the whole picture)."""
    grids = data.image_grids(image)
    tiles = [i for i, g in enumerate(grids) if g.get("kind") == "tile"]
    out: list[tuple[str, list[int]]] = [("mosaic", tiles)] if tiles else []
    return out + [(str(g.get("kind")), [i]) for i, g in enumerate(grids) if g.get("kind") != "tile"]


def _panel_extent(data: SweepFile, image: int, grids: list[int]) -> tuple[float, float, float, float]:
    """The picture and the grids' boxes together, in original-image pixels: ``(x0, y0, x1, y1)``."""
    im = (data.metadata.get("images") or [])[image]
    w, h = im.get("original_size") or (1, 1)
    boxes = [data.image_grids(image)[g]["box"] for g in grids]
    return (min([0.0] + [b[0] for b in boxes]), min([0.0] + [b[1] for b in boxes]),
            max([float(w)] + [b[2] for b in boxes]), max([float(h)] + [b[3] for b in boxes]))


def _image_specs(data: SweepFile, image: int, sel: Any) -> list[str | None]:
    """What to draw for an image: its per-token grid (None) and/or each group spec with groups in it."""
    out: list[str | None] = []
    rows = sel & (data.image_index == image)
    if bool((rows & (data.group < 0)).any()):
        out.append(None)
    groups = data.group_info()
    for g in sorted({int(g) for g in data.group[rows & (data.group >= 0)]}):
        if groups[g]["spec"] not in out:
            out.append(groups[g]["spec"])
    return out


def _chip_label(data: SweepFile, tokens: list[dict[str, Any]], position: int, group: int) -> str:
    if group >= 0:
        return _chip_text(data.group_info()[group]["label"])
    return _chip_text(tokens[position]["text"] if 0 <= position < len(tokens) else f"#{position}")


def _outline_groups(ax: Any, data: SweepFile, step: int, layer: int, image: int, spec: str, rectangle: Any) -> None:
    """A thin outline around each drawn group's grid rectangle (so equal neighbours stay apart)."""
    m = (data.step == step) & (data.layer == layer) & (data.image_index == image) & (data.group >= 0)
    groups = data.group_info()
    for g in np.unique(data.group[m]):
        info = groups[int(g)]
        if info["spec"] != spec or info.get("row_range") is None:
            continue
        (r0, r1), (c0, c1) = info["row_range"], info["col_range"]
        ax.add_patch(rectangle((c0, r0), c1 - c0, r1 - r0, fill=False, edgecolor="white", linewidth=0.6, alpha=0.8))
        if spec.startswith("box:") and info.get("box") is not None:
            # The user's pixel box itself (original-image pixels -> grid units), dashed.
            im = (data.metadata.get("images") or [])[image]
            w, h = im["original_size"]
            x0, y0, x1, y1 = info["box"]
            sx, sy = im["grid_cols"] / w, im["grid_rows"] / h
            ax.add_patch(rectangle((x0 * sx, y0 * sy), (x1 - x0) * sx, (y1 - y0) * sy, fill=False, edgecolor="cyan",
                                   linewidth=0.8, linestyle="--"))


def build_figure(data: SweepFile, steps: list[int], layers: list[int], variant: str, metric: str,
                 backgrounds: list[Any], alpha: float = 0.6, cmap: str = "magma", dpi: int = 110) -> Any:
    """The small-multiples figure for ``steps`` x ``layers`` (see the module docstring).

    ``metric`` is a key of :data:`METRICS` or a column name (``maskvl.results.Sweep.plot`` passes
    ``kl_divergence`` too); ``data.path`` may be None for a sweep held in memory.
    """
    from matplotlib import colors as mcolors
    from matplotlib import pyplot as plt
    from matplotlib.patches import FancyBboxPatch, Rectangle

    md = data.metadata
    images = md.get("images") or []
    tokens = md.get("tokens") or []
    sel = np.isin(data.step, steps) & np.isin(data.layer, layers)
    values = data.value[sel]
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise InputError("no values to draw for the selected steps, layers and variant")
    vmax = float(finite.max()) if finite.max() > 0 else 1.0
    norm = mcolors.Normalize(vmin=0.0, vmax=vmax)
    cm = plt.get_cmap(cmap)
    has_image = bool((data.image_index[sel] >= 0).any())
    has_text = bool((data.image_index[sel] < 0).any())
    image_ids = sorted({int(i) for i in data.image_index[sel] if i >= 0}) if has_image else []

    ncols = len(layers)
    width = max(ncols * PANEL_IN, 6.0)
    strip_width = width - 0.5  # the left gutter holds the layer label

    # Height of each block, in inches: image rows follow the resized image's aspect; strips their lines.
    # Image rows are (step, image, spec): spec None for per-token values, else one group spec.
    # A tiled image's rows are ("tiled", step, image, height, (kind, grids)): its tile mosaic, then its base
    # view or thumbnail, each at its boxes over the picture.
    blocks: list[tuple[str, int, Any, float, Any]] = []
    for s in steps:
        for i in image_ids:
            im = images[i]
            specs = _image_specs(data, i, sel & (data.step == s))
            if data.tiled(i):
                for spec in specs:  # per-token values (None) and each group spec, panel by panel
                    for kind, grids in tiled_panels(data, i):
                        x0, y0, x1, y1 = _panel_extent(data, i, grids)
                        blocks.append(("tiled", s, i, PANEL_IN * (y1 - y0) / (x1 - x0) + 0.45, (kind, grids, spec)))
                specs = []
            rw, rh = im.get("resized_size") or [im["grid_cols"], im["grid_rows"]]
            for spec in specs:
                blocks.append(("image", s, i, PANEL_IN * rh / rw + 0.45, spec))
        if has_text:
            lines_total = 0
            step_rows = (data.step == s) & (data.image_index < 0)
            for layer in layers:
                m = step_rows & (data.layer == layer)
                keys = sorted(set(zip(data.group[m].tolist(), data.position[m].tolist())))
                texts = [_chip_label(data, tokens, int(p), int(g)) for g, p in keys]
                lines_total += _layout_chips(texts, strip_width)[1]
            blocks.append(("text", s, None, 0.5 + lines_total * 0.24, None))
    height = sum(b[3] for b in blocks) + 1.2
    if max(width + 1.2, height) * dpi > MAX_SIDE_PX:
        raise InputError(f"the figure would be {width + 1.2:.0f}x{height:.0f} inches; choose fewer --layers/--steps "
                         f"or render one PNG per step into a folder")

    fig = plt.figure(figsize=(width + 1.2, height), dpi=dpi)
    grid = fig.add_gridspec(len(blocks), 1, height_ratios=[b[3] for b in blocks], left=0.06,
                            right=width / (width + 1.2), top=1 - 0.9 / height, bottom=0.25 / height, hspace=0.35)
    title_prompt = md.get("prompt", "")
    title_prompt = title_prompt if len(title_prompt) <= 90 else title_prompt[:87] + "..."
    status = "" if md.get("complete") else f"  (partial: {md.get('steps_completed')} of {md.get('num_steps')} steps)"
    column = METRICS.get(metric, metric)
    name = data.path.name if data.path is not None else "sweep"
    fig.suptitle(f"{name}: {variant}, {column}{status}\n{md.get('model', '')}: "
                 f"\u201c{title_prompt}\u201d", fontsize=10, y=1 - 0.1 / height, va="top")
    generated = {g.get("step"): g.get("text", "") for g in md.get("generated") or []}

    for row, (kind, s, i, _, spec) in enumerate(blocks):
        step_label = f"step {s}" + (f" \u2192 {_chip_text(generated[s])!s}" if s in generated else "")
        if kind == "tiled":
            panel_kind, grid_ids, group_spec = spec
            x0, y0, x1, y1 = _panel_extent(data, i, grid_ids)
            w, h = images[i].get("original_size") or (x1, y1)
            sub = grid[row].subgridspec(1, ncols, wspace=0.08)
            for c, layer in enumerate(layers):
                ax = fig.add_subplot(sub[0, c])
                bg = backgrounds[i] if i < len(backgrounds) else None
                if bg is not None:
                    ax.imshow(np.asarray(bg), extent=(0, w, h, 0), interpolation="bilinear")
                for g in grid_ids:
                    bx0, by0, bx1, by1 = data.image_grids(i)[g]["box"]
                    heat = grid_heat(data, s, layer, i, g, group_spec)
                    ax.imshow(np.ma.masked_invalid(heat), extent=(bx0, bx1, by1, by0), cmap=cm, norm=norm,
                              alpha=alpha if bg is not None else 1.0, interpolation="nearest")
                    if panel_kind == "mosaic":  # the tiles' seams
                        ax.add_patch(Rectangle((bx0, by0), bx1 - bx0, by1 - by0, fill=False, edgecolor="white",
                                               linewidth=0.6, alpha=0.9))
                ax.set_aspect("equal")  # original-image pixels are square
                ax.set_xlim(x0, x1)
                ax.set_ylim(y1, y0)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"layer {layer}", fontsize=8, pad=2)
                if c == 0:
                    what = (f"{len(grid_ids)} tiles" if panel_kind == "mosaic"
                            else f"{panel_kind} {data.image_grids(i)[grid_ids[0]]['rows']}x"
                                 f"{data.image_grids(i)[grid_ids[0]]['cols']}")
                    ax.set_ylabel(f"{step_label}\nimage {i}: {what}" + (f"\ngroups {group_spec}" if group_spec else ""),
                                  fontsize=8, parse_math=False)
        elif kind == "image":
            im = images[i]
            gr, gc = int(im["grid_rows"]), int(im["grid_cols"])
            rw, rh = im.get("resized_size") or [gc, gr]
            sub = grid[row].subgridspec(1, ncols, wspace=0.08)
            for c, layer in enumerate(layers):
                ax = fig.add_subplot(sub[0, c])
                heat = image_grid(data, s, layer, i, gr, gc, spec)
                extent = (0, gc, gr, 0)
                bg = backgrounds[i] if i < len(backgrounds) else None
                if bg is not None:
                    ax.imshow(np.asarray(bg), extent=extent, interpolation="bilinear")
                ax.imshow(np.ma.masked_invalid(heat), extent=extent, cmap=cm, norm=norm,
                          alpha=alpha if bg is not None else 1.0, interpolation="nearest")
                # Cells are (resized_w / cols) x (resized_h / rows) pixels: keep the image's proportions.
                ax.set_aspect((rh / gr) / (rw / gc))
                ax.set_xlim(0, gc)
                ax.set_ylim(gr, 0)
                ax.set_xticks([])
                ax.set_yticks([])
                if spec is not None:
                    _outline_groups(ax, data, s, layer, i, spec, Rectangle)
                ax.set_title(f"layer {layer}", fontsize=8, pad=2)
                if c == 0:
                    what = f"image {i} ({gr}x{gc})" + (f"\ngroups {spec}" if spec is not None else "")
                    ax.set_ylabel(f"{step_label}\n{what}", fontsize=8, parse_math=False)
        else:
            ax = fig.add_subplot(grid[row])
            ax.set_axis_off()
            step_rows = (data.step == s) & (data.image_index < 0)
            y = 0.0
            ax.text(-0.45, -0.05, f"{step_label}, text tokens", fontsize=8, va="bottom", ha="left",
                    parse_math=False, fontweight="bold")
            for layer in layers:
                m = step_rows & (data.layer == layer)
                order = np.lexsort((data.position[m], data.group[m]))
                pos = data.position[m][order]
                grp = data.group[m][order]
                vals = data.value[m][order]
                texts = [_chip_label(data, tokens, int(p), int(g)) for p, g in zip(pos, grp)]
                placed, nlines = _layout_chips(texts, strip_width)
                ax.text(-0.45, y + 0.12, f"L{layer}", fontsize=7, va="center", ha="left")
                for (x, line, w), t, v in zip(placed, texts, vals):
                    rgba = cm(norm(v)) if np.isfinite(v) else (0.85, 0.85, 0.85, 1.0)
                    yy = y + line * 0.24
                    ax.add_patch(FancyBboxPatch((x, yy + 0.02), w, 0.2, boxstyle="round,pad=0,rounding_size=0.04",
                                                facecolor=rgba, edgecolor="none"))
                    ax.text(x + w / 2, yy + 0.125, t, fontsize=STRIP_FONT, ha="center", va="center",
                            color=_text_color(rgba), parse_math=False, clip_on=True)
                y += nlines * 0.24
            ax.set_xlim(-0.5, strip_width)
            ax.set_ylim(max(y, 0.24), -0.3)

    cax = fig.add_axes((width / (width + 1.2) + 0.15 / (width + 1.2), 0.25 / height + 0.05,
                        0.18 / (width + 1.2), 1 - 1.15 / height - 0.1))
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cm), cax=cax, label=column)
    return fig


def render(parquet_file: str | os.PathLike, output: str | None = None, layers: str | None = None,
           steps: str | None = None, variant: str = "Full", metric: str = "l2", images: Sequence[str] = (),
           alpha: float = 0.6, cmap: str = "magma", dpi: int = 110,
           on_warning: Callable[[str], None] | None = None) -> list[Path]:
    """Draw ``parquet_file`` as heatmaps over its images and coloured text-token strips; returns the PNGs.

    ``output``: ``out.png`` for one figure, a folder for one PNG per step, or None for ``FILE.png``
    beside the file. ``layers``/``steps`` like ``0-5,20`` (default: up to :data:`DEFAULT_MAX_LAYERS`
    layers spread over the file's, every step). ``images`` replace the paths recorded in the file, in
    order. ``on_warning`` receives problems that do not stop the drawing (a missing background image).
    """
    if metric not in METRICS:
        raise InputError(f"metric must be one of {', '.join(METRICS)} (got {metric!r})")
    data = read_sweep(parquet_file, variant, metric)
    md = data.metadata
    meta_images = md.get("images") or []
    if len(images) > len(meta_images):
        raise InputError(f"{len(images)} images given but the file has {len(meta_images)} image(s)")
    try:
        import matplotlib  # plotting only: imported when a figure is drawn, not with the package

        matplotlib.colormaps[cmap]
    except KeyError:
        raise InputError(f"unknown colour map {cmap!r}") from None
    available_steps = sorted({int(s) for s in np.unique(data.step)})
    available_layers = sorted({int(v) for v in np.unique(data.layer)})
    if not available_steps:
        raise InputError(f"{data.path.name} has no rows")
    chosen_steps = _parse_selection(steps, available_steps, "steps")
    chosen_layers = _parse_selection(layers, available_layers, "layers") if layers is not None \
        else default_layers(available_layers)

    backgrounds = []
    for i, im in enumerate(meta_images):
        bg, why = _load_background(im.get("path"), images[i] if i < len(images) else None)
        if why is not None:
            if on_warning is not None:
                on_warning(f"image {i}: {why}; drawing the heatmap without it (pass --image)")
        backgrounds.append(bg)

    src = data.path
    if output is None:
        targets = [(chosen_steps, src.with_suffix(".png"))]
    elif output.lower().endswith(".png"):
        targets = [(chosen_steps, Path(output))]
    else:
        out_dir = Path(output)
        if out_dir.exists() and not out_dir.is_dir():
            raise InputError(f"--output {output} exists and is not a folder (end the name with .png for a file)")
        targets = [([s], out_dir / f"{src.stem}.step{s}.png") for s in chosen_steps]

    matplotlib.use("Agg")  # files only: no window, whatever backend the environment picks
    from matplotlib import pyplot as plt

    written = []
    with warnings.catch_warnings():
        # Tokens in scripts DejaVu Sans lacks draw as boxes; the warning per glyph is noise.
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        for step_list, target in targets:
            fig = build_figure(data, step_list, chosen_layers, variant, metric, backgrounds, alpha, cmap, dpi)
            try:
                _save_atomic(fig, target, dpi)
            finally:
                plt.close(fig)
            written.append(target)
    return written
