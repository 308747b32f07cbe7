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

    from .models.base import ImageInfo

#: What a spec may look like, for messages.
SPEC_FORMS = "blocks:RxC, images, box:IMAGE:x0,y0,x1,y1 or positions:LIST"


class GroupSpecError(ValueError):
    """A spec that cannot be parsed or resolved (the message names the spec, not the option)."""


@dataclass(frozen=True)
class Group:
    """One set of positions removed together, with where it lies.

    ``box`` is ``(x0, y0, x1, y1)`` in the original image's pixels and ``row_range``/``col_range`` the
    half-open grid ranges ``(first, last + 1)`` of its tokens, when all members are tokens of one image
    (``image_index``); otherwise all three are None.
    """

    spec: str
    label: str
    positions: tuple[int, ...]
    image_index: int | None = None
    box: tuple[float, float, float, float] | None = None
    row_range: tuple[int, int] | None = None
    col_range: tuple[int, int] | None = None

    def to_dict(self, index: int) -> dict[str, Any]:
        """The group's entry in the file metadata's ``groups`` list (``docs/FORMAT.md``)."""
        return {
            "index": index, "spec": self.spec, "label": self.label, "positions": list(self.positions),
            "image_index": self.image_index, "box": list(self.box) if self.box is not None else None,
            "row_range": list(self.row_range) if self.row_range is not None else None,
            "col_range": list(self.col_range) if self.col_range is not None else None,
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
def _cell_box(im: ImageInfo, rows: tuple[int, int], cols: tuple[int, int]) -> tuple[float, float, float, float]:
    """Pixel box (original image) of grid rows ``rows`` x cols ``cols`` (half-open)."""
    w, h = im.original_size
    return (round(cols[0] * w / im.grid_cols, 4), round(rows[0] * h / im.grid_rows, 4),
            round(cols[1] * w / im.grid_cols, 4), round(rows[1] * h / im.grid_rows, 4))


def _block(im: ImageInfo, spec: str, label: str, rows: tuple[int, int], cols: tuple[int, int],
           box: tuple[float, float, float, float] | None = None) -> Group:
    pos = tuple(im.token_start + r * im.grid_cols + c for r in range(*rows) for c in range(*cols))
    return Group(spec, label, pos, im.index, box if box is not None else _cell_box(im, rows, cols), rows, cols)


def _image(images: Sequence[ImageInfo], index: int, spec: str) -> ImageInfo:
    if index >= len(images):
        raise GroupSpecError(f"{spec}: the sweep has {len(images)} image(s)" + (" (0-based)" if images else ""))
    return images[index]


def _single_grid(im: ImageInfo, spec: str) -> ImageInfo:
    """Blocks and boxes are drawn on one grid covering the image; a tiled image's tokens are in several."""
    if len(im.grids) > 1:
        raise GroupSpecError(f"{spec}: image {im.index} is tiled ({len(im.grids)} grids): blocks and boxes "
                             f"are not supported on tiled images yet; use images or a list of positions")
    return im


def _whole_image(im: ImageInfo, spec: str) -> Group:
    box = (0.0, 0.0, float(im.original_size[0]), float(im.original_size[1]))
    if len(im.grids) == 1:
        return _block(im, spec, f"image {im.index}", (0, im.grid_rows), (0, im.grid_cols), box=box)
    # A tiled image: every cell of every grid (separators are text tokens, not the image's). No single grid
    # holds it, so it carries no image geometry (readers show it as a labelled group, like a text group).
    return Group(spec, f"image {im.index}", tuple(sorted(im.positions())))


def _box_group(images: Sequence[ImageInfo], spec: str) -> Group:
    _, image, coords = spec.split(":")
    im = _single_grid(_image(images, int(image), spec), spec)
    x0, y0, x1, y1 = (Fraction(float(x)) for x in coords.split(","))
    w, h = im.original_size
    # Cells c with c W / cols < x1 and (c + 1) W / cols > x0 (exact rational arithmetic: a box edge on a
    # cell edge does not take the neighbouring cell).
    c0 = max(0, math.floor(x0 * im.grid_cols / w))
    c1 = min(im.grid_cols, math.ceil(x1 * im.grid_cols / w))
    r0 = max(0, math.floor(y0 * im.grid_rows / h))
    r1 = min(im.grid_rows, math.ceil(y1 * im.grid_rows / h))
    if c0 >= c1 or r0 >= r1:
        raise GroupSpecError(f"{spec}: the box covers no token of image {im.index} (its size is {w}x{h} pixels)")
    clipped = (float(max(x0, 0)), float(max(y0, 0)), float(min(x1, w)), float(min(y1, h)))
    return _block(im, spec, f"image {im.index} box {','.join(_fmt(x) for x in clipped)}", (r0, r1), (c0, c1),
                  box=clipped)


def _positions_group(images: Sequence[ImageInfo], positions: tuple[int, ...], spec: str, num_positions: int) -> Group:
    if positions[-1] >= num_positions:
        raise GroupSpecError(f"{spec}: position {positions[-1]} is outside the prompt (positions 0-{num_positions - 1})")
    label = f"positions {positions_text(positions)}"
    for im in images:
        if im.token_start <= positions[0] and positions[-1] < im.token_end:
            if len(im.grids) > 1:  # within a tiled image: no single grid to give rows and columns of
                return Group(spec, label, positions)
            k = [p - im.token_start for p in positions]
            rows = (min(x // im.grid_cols for x in k), max(x // im.grid_cols for x in k) + 1)
            cols = (min(x % im.grid_cols for x in k), max(x % im.grid_cols for x in k) + 1)
            return Group(spec, label, positions, im.index, _cell_box(im, rows, cols), rows, cols)
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
            br, bc = (int(x) for x in spec.split(":")[1].split("x"))
            for im in images:
                _single_grid(im, text)
                for r0 in range(0, im.grid_rows, br):
                    for c0 in range(0, im.grid_cols, bc):
                        rows, cols = (r0, min(r0 + br, im.grid_rows)), (c0, min(c0 + bc, im.grid_cols))
                        out.append(_block(im, text, f"image {im.index} rows {rows[0]}-{rows[1] - 1} "
                                                    f"cols {cols[0]}-{cols[1] - 1}", rows, cols))
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
