"""Which adapter handles which transformers ``config.model_type``.

Each family module registers its adapter class with :func:`register`; :func:`maskvl.models.load_model`
and the API's loaded-model path look the class up with :func:`adapter_class`, so adding a family
touches neither the engine nor the API.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, TypeVar

from ..errors import ModelLoadError
from .base import ModelAdapter

_ADAPTERS: dict[str, type[ModelAdapter]] = {}

A = TypeVar("A", bound=type[ModelAdapter])


def register(cls: A) -> A:
    """Class decorator: ``cls`` handles every model type in ``cls.MODEL_TYPES``."""
    if not cls.MODEL_TYPES:
        raise ValueError(f"{cls.__name__} declares no MODEL_TYPES")
    for model_type in cls.MODEL_TYPES:
        other = _ADAPTERS.get(model_type)
        if other is not None and other is not cls:
            raise ValueError(f"model type {model_type!r} is already handled by {other.__name__}")
        _ADAPTERS[model_type] = cls
    return cls


@contextlib.contextmanager
def registered(cls: type[ModelAdapter]) -> Iterator[type[ModelAdapter]]:
    """Register ``cls`` for the duration of a block (replacing and then restoring any earlier class)."""
    saved = {t: _ADAPTERS.get(t) for t in cls.MODEL_TYPES}
    for t in cls.MODEL_TYPES:
        _ADAPTERS.pop(t, None)
    register(cls)
    try:
        yield cls
    finally:
        for t, before in saved.items():
            if before is None:
                _ADAPTERS.pop(t, None)
            else:
                _ADAPTERS[t] = before


def supported_model_types() -> list[str]:
    """Every registered model type, sorted."""
    return sorted(_ADAPTERS)


def adapter_class(model_type: str | None) -> type[ModelAdapter]:
    """The adapter class for ``model_type``; a one-line :class:`ModelLoadError` naming the supported ones."""
    cls = _ADAPTERS.get(model_type or "")
    if cls is None:
        raise ModelLoadError(f"unsupported model type {model_type!r} (supported: "
                             f"{', '.join(supported_model_types())})")
    return cls
