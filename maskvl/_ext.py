"""Loads the C++ extension ``maskvl._C`` once and remembers why it could not be loaded.

``maskvl`` imports and runs without the extension (the reference backend); :func:`load` returns
whether the CPU kernels are registered and :func:`load_error` the reason they are not.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import warnings

_state: dict[str, object] = {"tried": False, "ok": False, "error": None, "warned": False}


def load(warn: bool = True) -> bool:
    """Import ``maskvl._C`` (registering the ``maskvl::`` CPU kernels) on the first call.

    Returns True if it is loaded. On failure the reason is kept for :func:`load_error` and, if
    ``warn``, a warning is issued once per process.
    """
    if not _state["tried"]:
        _state["tried"] = True
        from . import ops  # noqa: F401  (the schemas must exist for the kernels to be callable)

        try:
            mod = importlib.import_module("maskvl._C")
            path = str(getattr(mod, "__file__", "") or "")
            if path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
                # A library built before the extension was renamed to maskvl._C_impl shadows _C.py.
                _state["error"] = (f"maskvl._C is a stale build ({path}); delete it and rebuild "
                                   f"(make clean install)")
            else:
                _state["ok"] = True
        except ImportError as exc:  # not built, or built against another torch
            _state["error"] = f"maskvl._C not built: {exc}"
        except OSError as exc:  # a broken shared library
            _state["error"] = f"maskvl._C failed to load: {exc}"
    if not _state["ok"] and warn and not _state["warned"]:
        _state["warned"] = True
        warnings.warn(f"{_state['error']}; the C++ backend is unavailable", RuntimeWarning, stacklevel=2)
    return bool(_state["ok"])


def load_error() -> str | None:
    """``None`` if ``maskvl._C`` is loaded, else why not (tries to load it first)."""
    load(warn=False)
    return None if _state["ok"] else str(_state["error"])
