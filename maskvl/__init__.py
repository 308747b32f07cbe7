"""maskvl: which input tokens a vision-language model uses, layer by layer, as it answers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from .results import Sweep

__version__ = "0.1.0"

# The functions below import their modules when called, so ``import maskvl`` stays light.


def sweep(*args: Any, **kwargs: Any) -> "Sweep":
    """Run a sweep and return a :class:`maskvl.results.Sweep`; see :func:`maskvl.api.sweep`."""
    from .api import sweep as _sweep

    return _sweep(*args, **kwargs)


def iter_sweep(*args: Any, **kwargs: Any) -> Iterator["Sweep"]:
    """Run a sweep and yield each step as it finishes; see :func:`maskvl.api.iter_sweep`."""
    from .api import iter_sweep as _iter_sweep

    return _iter_sweep(*args, **kwargs)


def open(path: Any) -> "Sweep":  # noqa: A001 - like the builtin, it opens a path
    """Open a maskvl Parquet file as a :class:`maskvl.results.Sweep` (reads the footer; rows on demand)."""
    from .results import Sweep

    return Sweep.open(path)
