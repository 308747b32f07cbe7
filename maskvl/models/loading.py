"""Loading a checkpoint's parts (model, tokenizer, image processor) from a local hub-like directory or a
hub id, with one-line :class:`~maskvl.errors.ModelLoadError` messages: what every family's ``load`` shares.

Image processors are built without torchvision where transformers' default class needs it: each family
names its PIL class (``transformers/models/<family>/image_processing_pil_*.py``), which takes the same
``preprocessor_config.json`` settings.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError

log = logging.getLogger("maskvl")

#: Keys of ``preprocessor_config.json`` that name classes rather than settings.
_CLASS_KEYS = ("image_processor_type", "processor_class")


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def checkpoint_json(path: str, name: str) -> dict[str, Any] | None:
    """The JSON file ``name`` of a local checkpoint directory or a hub id; None when it has none."""
    if os.path.isdir(path):
        f = Path(path) / name
        return json.loads(f.read_text()) if f.exists() else None
    try:
        from transformers.utils import cached_file

        found = cached_file(path, name, _raise_exceptions_for_missing_entries=False)
    except Exception:
        return None
    return json.loads(Path(found).read_text()) if found else None


def load_pretrained(model_class: Any, path: str, model_id: str, dtype: torch.dtype, device: torch.device,
                    **options: Any) -> Any:
    """``model_class.from_pretrained(path, dtype=dtype, **options)`` on ``device``, in eval mode."""
    try:
        model = model_class.from_pretrained(path, dtype=dtype, **options)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {model_id!r}: {_first_line(exc)}") from exc
    return model.to(device).eval()


def chat_template_file(path: str) -> str | None:
    """A processor's chat template kept beside the tokenizer (``chat_template.jinja`` or
    ``chat_template.json``), where some checkpoints keep it; None when there is none."""
    if os.path.isdir(path) and (Path(path) / "chat_template.jinja").exists():
        return (Path(path) / "chat_template.jinja").read_text()
    found = checkpoint_json(path, "chat_template.json")
    return found.get("chat_template") if found else None


def load_tokenizer(path: str, model_id: str, require_chat_template: bool = True, verbose: bool = False) -> Any:
    """The checkpoint's tokenizer, with the processor's chat template where the tokenizer has none.

    Without any chat template: a :class:`ModelLoadError` when ``require_chat_template`` (a chat model's
    prompts need one), else the prompt is tokenized as plain text (a base model; said when ``verbose``).
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {model_id!r}: {_first_line(exc)}") from exc
    if not getattr(tokenizer, "chat_template", None):
        template = chat_template_file(path)
        if template:
            tokenizer.chat_template = template
        elif require_chat_template:
            raise ModelLoadError(f"{model_id!r} has no chat template (tokenizer, chat_template.jinja or "
                                 f"chat_template.json)")
        elif verbose:
            log.info("the tokenizer of %s has no chat template: prompts are tokenized as plain text", model_id)
    return tokenizer


def load_image_processor(path: str, model_id: str, pil_class: type, verbose: bool = False,
                         auto_first: bool = False) -> Any:
    """The checkpoint's image processor.

    ``auto_first``: transformers' ``AutoImageProcessor`` (the class the checkpoint names, which may need
    torchvision), falling back to ``pil_class`` with the same settings; otherwise ``pil_class`` directly.
    """
    if auto_first:
        from transformers import AutoImageProcessor

        try:
            proc = AutoImageProcessor.from_pretrained(path)
        except Exception as exc:  # e.g. a class that insists on torchvision
            if verbose:
                log.info("image processor of %s unavailable (%s); using %s with the same settings", model_id,
                         _first_line(exc), pil_class.__name__)
        else:
            return proc
    settings = checkpoint_json(path, "preprocessor_config.json")
    if settings is None:
        raise ModelLoadError(f"cannot load the image processor of {model_id!r}: no preprocessor_config.json")
    named = settings.get("image_processor_type")
    if verbose and not auto_first and named and named != pil_class.__name__:
        log.info("image processor %s of %s: using %s with the same settings", named, model_id, pil_class.__name__)
    try:
        return pil_class(**{k: v for k, v in settings.items() if k not in _CLASS_KEYS})
    except Exception as exc:
        raise ModelLoadError(f"cannot load the image processor of {model_id!r}: {_first_line(exc)}") from exc
