"""Model families. ``load_model`` resolves a model spec and returns the family's adapter.

Each family is one module here that registers its adapter (``registry.register``); importing this
package imports every family module (they import transformers' modeling code lazily, on use).
"""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, ModelLoadError

def _shield_foreign_kernels() -> None:
    """Keep a folder named ``kernels/`` in the working directory from breaking transformers.

    transformers looks for Hugging Face's ``kernels`` package by importing it; a local folder of that name
    that is not an installed package and fails to import (e.g. someone's Triton kernels without triton)
    would make every model class fail to import. Such a folder is reported to transformers as absent.
    """
    import importlib.metadata
    import importlib.util
    import sys

    try:
        if importlib.util.find_spec("kernels") is None:
            return
        importlib.metadata.version("kernels")
        return  # an installed package: transformers' own business
    except (importlib.metadata.PackageNotFoundError, ValueError, ImportError):
        pass
    try:
        importlib.import_module("kernels")
        return
    except Exception:
        saved = sys.modules.get("kernels")
        sys.modules["kernels"] = None  # type: ignore[assignment]
        try:
            from transformers.utils import import_utils

            import_utils.is_kernels_available()  # cached (lru_cache) as False from here on
        finally:
            if saved is None:
                sys.modules.pop("kernels", None)
            else:
                sys.modules["kernels"] = saved


_shield_foreign_kernels()

# Each family module registers its adapter(s) on import.
from . import (gemma3, gemma3_text, gpt_oss, idefics3, internvl, llama, llava_onevision, mistral, olmo2,  # noqa: F401
               qwen2, qwen2_vl, qwen3, qwen3_5, qwen3_moe, qwen3_vl, qwen3_vl_moe)
from .base import Capture, ImageInfo, ModelAdapter, Prepared
from .registry import adapter_class, register, supported_model_types
from .tiny import BUILTIN_PREFIX, BUILTIN_TINY, builtin_dir, write_tiny_model

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """``--dtype``: float32 by default on the CPU, bfloat16 on CUDA."""
    if name is None or name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"dtype (--dtype) must be one of auto, {', '.join(DTYPES)} (got {name!r})")
    return DTYPES[name]


def resolve_device(name: str | None) -> torch.device:
    """``--device``: cuda when available, else cpu."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"device (--device) is not a device torch knows (got {name!r})") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device (--device) {name!r} requested but CUDA is not available")
    return dev


# "org/name" or "name": what the hub accepts as a repository id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(spec: str) -> bool:
    return not _HUB_ID.match(spec) or spec.endswith((".json", ".safetensors"))


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               verbose: bool = False) -> ModelAdapter:
    """Load a model by hub id, local hub-like directory, or ``builtin:tiny-qwen3-vl``.

    Raises :class:`ModelLoadError` with a one-line message when it cannot.
    """
    device = torch.device(device)
    if spec.startswith(BUILTIN_PREFIX):
        try:
            path = str(builtin_dir(spec))
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc
    elif os.path.isdir(os.path.expanduser(spec)):
        path = os.path.expanduser(spec)
        if not (Path(path) / "config.json").exists():
            raise ModelLoadError(f"model directory {spec!r} has no config.json")
    elif _looks_like_path(spec):
        raise ModelLoadError(f"model directory not found: {spec}")
    else:
        path = spec  # a hub id: transformers resolves and downloads it
    model_type = None
    if os.path.isdir(path):
        try:
            model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read {path}/config.json: {exc}") from exc
    else:
        try:
            from transformers import AutoConfig

            model_type = AutoConfig.from_pretrained(path).model_type
        except Exception as exc:
            raise ModelLoadError(f"cannot load model {spec!r}: {str(exc).splitlines()[0]}") from exc
    return adapter_class(model_type).load(path, spec, dtype, device, verbose=verbose)


def adapter_for_loaded(model: Any, tokenizer: Any = None, image_processor: Any = None,
                       model_id: str | None = None) -> ModelAdapter:
    """The registered family's adapter over an already-loaded transformers model."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise InputError(f"expected a model id, a directory, a ModelAdapter or a loaded transformers model, "
                         f"not {type(model).__name__}")
    return adapter_class(model_type).from_loaded(model, tokenizer, image_processor, model_id)


__all__ = [
    "BUILTIN_TINY", "Capture", "DTYPES", "ImageInfo", "ModelAdapter", "Prepared", "adapter_class",
    "adapter_for_loaded", "load_model", "register", "resolve_device", "resolve_dtype", "supported_model_types",
    "write_tiny_model",
]
