"""Region and group knockout: the ``mask_groups`` option's specs and the position sets they name.

A group run removes a whole set of keys from the final query at a layer at once, one result row per
set, instead of one key per row (``maskvl.ops.loo_group_attention``). The sets come from specs:

``blocks:RxC``
    every image's merged-token grid cut into blocks of R rows x C columns of tokens, left to right,
    top to bottom, image after image; blocks on the right and bottom edges are smaller when the grid
    does not divide evenly. ``blocks:N`` means ``blocks:NxN``.
``images``
    each image one group (all of its tokens).
``box:I:x0,y0,x1,y1``
    the tokens of image I (0-based, prompt order) whose patch area intersects the pixel box
    ``[x0, x1] x [y0, y1]`` with positive area (a patch that only touches the box's edge is not in it).
    Pixels are those of the ORIGINAL image: x to the right, y down, origin at the top-left corner. A
    patch's area there is its grid cell stretched over the original image: cell (r, c) of a
    ``rows x cols`` grid covers ``[c W / cols, (c + 1) W / cols] x [r H / rows, (r + 1) H / rows]`` for an
    original size ``W x H`` (the grid covers the resized image exactly, and the resize stretches each
    axis uniformly). A box reaching past the image is clipped to it.
``positions:LIST``
    explicit sequence positions, e.g. ``positions:3-5,10`` (in Python, any list of ints).

``mask_groups`` takes a list of specs (the flag is repeatable); the groups come in the order given.
Groups may overlap. With groups, ``mask_mode`` is optional: left unset, every group is used as given;
set, only positions of that mode may be in a group (``text``: non-image positions, ``vision``: image
tokens, ``both``: all) and a group left with none is an error.

This module knows nothing of option names; callers wrap :class:`GroupSpecError` into their message.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # the option check imports this module at command-line start-up: keep torch out of it
    import torch

    from .models.base import GridInfo, ImageInfo

#: What a spec may look like, for messages.
SPEC_FORMS = "blocks:RxC, images, box:IMAGE:x0,y0,x1,y1 or positions:LIST"


class GroupSpecError(ValueError):
    """A spec that cannot be parsed or resolved (the message names the spec, not the option)."""


@dataclass(frozen=True)
class Group:
    """One set of positions removed together, with where it lies.

    ``image_index`` is the image holding all members (None when they are not all one image's tokens);
    ``box`` ``(x0, y0, x1, y1)`` in that image's original pixels; ``grid_index`` the image's grid holding
    them all (``ImageInfo.grids``; None when they span several grids of a tiled image) and
    ``row_range``/``col_range`` the half-open ranges ``(first, last + 1)`` of their cells in that grid.
    """

    spec: str
    label: str
    positions: tuple[int, ...]
    image_index: int | None = None
    box: tuple[float, float, float, float] | None = None
    row_range: tuple[int, int] | None = None
    col_range: tuple[int, int] | None = None
    grid_index: int | None = None

    def to_dict(self, index: int) -> dict[str, Any]:
        """The group's entry in the file metadata's ``groups`` list (``docs/FORMAT.md``)."""
        return {
            "index": index, "spec": self.spec, "label": self.label, "positions": list(self.positions),
            "image_index": self.image_index, "box": list(self.box) if self.box is not None else None,
            "row_range": list(self.row_range) if self.row_range is not None else None,
            "col_range": list(self.col_range) if self.col_range is not None else None,
            "grid_index": self.grid_index,
        }


# ------------------------------------------------------------------------------------------ parsing
def _number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _fmt(x: float) -> str:
    return f"{x:g}" if float(x) == float(f"{x:g}") else repr(float(x))


def positions_text(positions: Sequence[int], sep: str = ",") -> str:
    """``[3, 4, 5, 10]`` -> ``3-5,10`` (runs joined by ``sep``)."""
    out, ps = [], sorted(positions)
    i = 0
    while i < len(ps):
        j = i
        while j + 1 < len(ps) and ps[j + 1] == ps[j] + 1:
            j += 1
        out.append(str(ps[i]) if i == j else f"{ps[i]}-{ps[j]}")
        i = j + 1
    return sep.join(out)


def _position_set(items: Any, what: str) -> tuple[int, ...]:
    values = []
    for x in items:
        # operator.index takes Python and numpy integers; a bool is an int subclass but never a position.
        try:
            if isinstance(x, bool):
                raise TypeError
            values.append(operator.index(x))
        except TypeError:
            raise GroupSpecError(f"{what} must hold integer positions") from None
    if not values:
        raise GroupSpecError(f"{what} is empty")
    if min(values) < 0:
        raise GroupSpecError(f"{what} holds a negative position ({min(values)})")
    return tuple(sorted(set(values)))


def parse_spec(spec: Any) -> str | tuple[int, ...]:
    """One spec, checked: canonical text for ``blocks``/``images``/``box`` (``blocks:4x4``, ``images``,
    ``box:0:10,20,30.5,40``), a sorted position tuple for ``positions:LIST`` and for a sequence of ints.
    Raises :class:`GroupSpecError`."""
    if not isinstance(spec, str):
        if isinstance(spec, (bytes, dict)) or not hasattr(spec, "__iter__"):
            raise GroupSpecError(f"bad group {spec!r}: expected {SPEC_FORMS}, or a list of positions")
        return _position_set(spec, f"group {list(spec)!r}")
    text = spec.strip()
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    try:
        if kind == "images" and not rest:
            return "images"
        if kind == "blocks" and rest:
            r, _, c = rest.lower().partition("x")
            rows, cols = int(r), int(c or r)
            if rows < 1 or cols < 1:
                raise ValueError
            return f"blocks:{rows}x{cols}"
        if kind == "box" and rest:
            image, _, coords = rest.partition(":")
            index = int(image)
            x0, y0, x1, y1 = (_number(x) for x in coords.split(","))
            if index < 0:
                raise ValueError
            if not (x0 < x1 and y0 < y1):
                raise GroupSpecError(f"bad box {spec!r}: need x0 < x1 and y0 < y1")
            return f"box:{index}:{_fmt(x0)},{_fmt(y0)},{_fmt(x1)},{_fmt(y1)}"
        if kind == "positions" and rest:
            values: list[int] = []
            for part in rest.split(","):
                a, dash, b = part.strip().partition("-")
                lo, hi = int(a), int(b) if dash else int(a)
                if hi < lo:
                    raise ValueError
                values.extend(range(lo, hi + 1))
            return _position_set(values, f"group {spec!r}")
    except ValueError as exc:
        if isinstance(exc, GroupSpecError):
            raise
    raise GroupSpecError(f"bad group {spec!r}: expected {SPEC_FORMS}")


def parse_specs(value: Any) -> tuple[str | tuple[int, ...], ...] | None:
    """The ``mask_groups`` value: None, one spec, or a sequence of specs (each text or a position list)
    -> a tuple of checked specs, or None when there are none."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not hasattr(value, "__iter__") or isinstance(value, (bytes, dict)):
        raise GroupSpecError(f"expected a list of groups ({SPEC_FORMS}, or lists of positions), got {value!r}")
    items = list(value)
    if not items:
        return None
    if all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        raise GroupSpecError(f"expected a list of groups, e.g. [{items!r}] for one group of those positions "
                             f"(got {items!r})")
    return tuple(parse_spec(x) for x in items)


def needs_images(specs: Sequence[str | tuple[int, ...]]) -> str | None:
    """The first spec that names image tokens (``blocks``, ``images``, ``box``), or None."""
    for spec in specs:
        if isinstance(spec, str):
            return spec
    return None


def spec_text(spec: str | tuple[int, ...]) -> str:
    """How a checked spec is written (``positions:3-5,10`` for a position set)."""
    return spec if isinstance(spec, str) else f"positions:{positions_text(spec)}"


def to_json(specs: Sequence[str | tuple[int, ...]] | None) -> list[Any] | None:
    """Checked specs as JSON values (text, or a list of positions)."""
    return None if specs is None else [s if isinstance(s, str) else list(s) for s in specs]


# -------------------------------------------------------------------------------------- resolving
def _grid_box(grid: GridInfo, rows: tuple[int, int], cols: tuple[int, int]) -> tuple[float, float, float, float]:
    """Pixel box (original image) of a grid's rows ``rows`` x cols ``cols`` (half-open)."""
    x0, y0, x1, y1 = grid.box
    return (round(x0 + cols[0] * (x1 - x0) / grid.cols, 4), round(y0 + rows[0] * (y1 - y0) / grid.rows, 4),
            round(x0 + cols[1] * (x1 - x0) / grid.cols, 4), round(y0 + rows[1] * (y1 - y0) / grid.rows, 4))


def _block(im: ImageInfo, spec: str, label: str, rows: tuple[int, int], cols: tuple[int, int],
           box: tuple[float, float, float, float] | None = None, grid: int = 0) -> Group:
    g = im.grids[grid]
    pos = tuple(g.token_start + r * g.row_stride + c for r in range(*rows) for c in range(*cols))
    return Group(spec, label, pos, im.index, box if box is not None else _grid_box(g, rows, cols), rows, cols, grid)


def _image(images: Sequence[ImageInfo], index: int, spec: str) -> ImageInfo:
    if index >= len(images):
        raise GroupSpecError(f"{spec}: the sweep has {len(images)} image(s)" + (" (0-based)" if images else ""))
    return images[index]


def _grid_name(im: ImageInfo, grid: int) -> str:
    """How a label names a grid: nothing for an image of one grid, else its index and kind."""
    return "" if len(im.grids) == 1 else f" grid {grid} ({im.grids[grid].kind})"


def _whole_image(im: ImageInfo, spec: str) -> Group:
    box = (0.0, 0.0, float(im.original_size[0]), float(im.original_size[1]))
    if len(im.grids) == 1:
        return _block(im, spec, f"image {im.index}", (0, im.grid_rows), (0, im.grid_cols), box=box)
    # A tiled image: every cell of every grid (separators are text tokens, not the image's).
    return Group(spec, f"image {im.index}", tuple(sorted(im.positions())), im.index, box)


def _box_group(images: Sequence[ImageInfo], spec: str) -> Group:
    _, image, coords = spec.split(":")
    im = _image(images, int(image), spec)
    x0, y0, x1, y1 = (Fraction(float(x)) for x in coords.split(","))
    w, h = im.original_size
    # Per grid, the cells c with left edge < x1 and right edge > x0 (in the grid's box; exact rational
    # arithmetic: a box edge on a cell edge does not take the neighbouring cell). A tiled image's box takes
    # the cells of every grid it meets (the base view's or thumbnail's and the tiles').
    hits: list[tuple[int, tuple[int, int], tuple[int, int]]] = []
    for gi, g in enumerate(im.grids):
        gx0, gy0, gx1, gy1 = (Fraction(float(b)) for b in g.box)
        c0 = max(0, math.floor((x0 - gx0) * g.cols / (gx1 - gx0)))
        c1 = min(g.cols, math.ceil((x1 - gx0) * g.cols / (gx1 - gx0)))
        r0 = max(0, math.floor((y0 - gy0) * g.rows / (gy1 - gy0)))
        r1 = min(g.rows, math.ceil((y1 - gy0) * g.rows / (gy1 - gy0)))
        if c0 < c1 and r0 < r1:
            hits.append((gi, (r0, r1), (c0, c1)))
    if not hits:
        raise GroupSpecError(f"{spec}: the box covers no token of image {im.index} (its size is {w}x{h} pixels)")
    clipped = (float(max(x0, 0)), float(max(y0, 0)), float(min(x1, w)), float(min(y1, h)))
    label = f"image {im.index} box {','.join(_fmt(x) for x in clipped)}"
    if len(hits) == 1:
        gi, rows, cols = hits[0]
        return _block(im, spec, label, rows, cols, box=clipped, grid=gi)
    pos = sorted(im.grids[gi].token_start + r * im.grids[gi].row_stride + c
                 for gi, rows, cols in hits for r in range(*rows) for c in range(*cols))
    return Group(spec, label, tuple(pos), im.index, clipped)


def _positions_group(images: Sequence[ImageInfo], positions: tuple[int, ...], spec: str, num_positions: int) -> Group:
    if positions[-1] >= num_positions:
        raise GroupSpecError(f"{spec}: position {positions[-1]} is outside the prompt (positions 0-{num_positions - 1})")
    label = f"positions {positions_text(positions)}"
    for im in images:
        cells = set(im.positions())
        if not set(positions) <= cells:
            continue
        for gi, g in enumerate(im.grids):
            if set(positions) <= set(g.positions()):
                k = [(p - g.token_start) // g.row_stride for p in positions], \
                    [(p - g.token_start) % g.row_stride for p in positions]
                rows, cols = (min(k[0]), max(k[0]) + 1), (min(k[1]), max(k[1]) + 1)
                return Group(spec, label, positions, im.index, _grid_box(g, rows, cols), rows, cols, gi)
        return Group(spec, label, positions, im.index)  # cells of several grids of one image
    return Group(spec, label, positions)


def resolve_groups(specs: Sequence[str | tuple[int, ...]], images: Sequence[ImageInfo], is_image: torch.Tensor,
                   mask_mode: str | None = None) -> list[Group]:
    """The groups that checked ``specs`` (:func:`parse_specs`) name in a prepared prompt.

    ``images``: the prepared images (grids, token ranges, original sizes); ``is_image [S]``: the
    prompt's image flags. ``mask_mode`` (optional) restricts members to that mode's positions (see the
    module docstring). Raises :class:`GroupSpecError`.
    """
    num_positions = int(is_image.shape[0])
    out: list[Group] = []
    for spec in specs:
        text = spec_text(spec)
        if not isinstance(spec, str):
            out.append(_positions_group(images, spec, text, num_positions))
            continue
        if not images:
            raise GroupSpecError(f"{text} needs at least one image")
        if spec == "images":
            out.extend(_whole_image(im, text) for im in images)
        elif spec.startswith("blocks:"):
            # Each grid of each image cut into blocks (a tiled image's base view or thumbnail and every tile).
            br, bc = (int(x) for x in spec.split(":")[1].split("x"))
            for im in images:
                for gi, g in enumerate(im.grids):
                    for r0 in range(0, g.rows, br):
                        for c0 in range(0, g.cols, bc):
                            rows, cols = (r0, min(r0 + br, g.rows)), (c0, min(c0 + bc, g.cols))
                            out.append(_block(im, text, f"image {im.index}{_grid_name(im, gi)} rows {rows[0]}-"
                                                        f"{rows[1] - 1} cols {cols[0]}-{cols[1] - 1}", rows, cols,
                                              grid=gi))
        else:
            out.append(_box_group(images, spec))
    if mask_mode is None or mask_mode == "both":
        return out
    allowed = set((~is_image if mask_mode == "text" else is_image).nonzero().flatten().tolist())
    kept = []
    for g in out:
        members = tuple(p for p in g.positions if p in allowed)
        if not members:
            raise GroupSpecError(f"{g.spec}: group '{g.label}' has no position left under mask_mode {mask_mode}")
        if members != g.positions:  # only explicit sets can lose some members: redo their geometry
            g = _positions_group(images, members, g.spec, num_positions)
        kept.append(g)
    return kept
