"""The Python API: ``maskvl.sweep(...)`` and the orchestration shared with the CLI and batch runs."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa
import torch

from . import io, measures
from .engine import Engine, SweepConfig, parse_layers
from .errors import InputError
from .inputs import check_prompt, load_image
from .models import ModelAdapter, load_model, resolve_device, resolve_dtype


@dataclass
class SweepOutcome:
    """What a sweep produced: the rows, the metadata, and where they were written."""

    table: pa.Table
    metadata: dict[str, Any]
    path: Path | None = None
    seconds: float = 0.0
    generated_text: str = ""
    images: list[Any] = field(default_factory=list)


def _as_adapter(model: Any, dtype: str | torch.dtype | None, device: str | torch.device | None,
                verbose: bool, tokenizer: Any = None, image_processor: Any = None) -> ModelAdapter:
    if isinstance(model, ModelAdapter):
        return model
    if isinstance(model, (str, os.PathLike)):
        dev = resolve_device(str(device) if device is not None else None)
        dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)
        return load_model(str(model), dt, dev, verbose=verbose)
    if tokenizer is None or image_processor is None:
        raise InputError("pass tokenizer= and image_processor= with an already-loaded transformers model")
    from .models.qwen3_vl import Qwen3VLAdapter

    return Qwen3VLAdapter(model, tokenizer, image_processor, getattr(model, "name_or_path", "model"))


def default_output(prompt: str, directory: str = "maskvl-out") -> Path:
    """``maskvl-out/<slug>.parquet`` from the prompt's first words."""
    words = "".join(c if c.isalnum() else " " for c in prompt.lower()).split()
    slug = "-".join(words[:6])[:60] or "sweep"
    return Path(directory) / f"{slug}.parquet"


def run_sweep(adapter: ModelAdapter, images: Sequence[Any], prompt: str, config: SweepConfig,
              output: str | os.PathLike | None = None, csv: bool = False, max_pixels: int | None = None,
              on_progress: Callable[[int, int], None] | None = None,
              on_note: Callable[[str], None] | None = None,
              extra_metadata: dict[str, Any] | None = None) -> SweepOutcome:
    """Prepare inputs, run the engine step by step, write Parquet as it goes; the shared core.

    ``images`` are paths or PIL images. ``on_progress(done, total)`` is called after each layer.
    """
    t0 = time.perf_counter()
    prompt = check_prompt(prompt)
    pil, paths = [], []
    for im in images:
        if isinstance(im, (str, os.PathLike)):
            pil.append(load_image(str(im)))
            paths.append(os.path.abspath(str(im)))
        else:
            pil.append(im.convert("RGB") if getattr(im, "mode", "RGB") != "RGB" else im)
            paths.append(None)
    layers = config.validate(adapter.num_layers)
    engine = Engine(adapter, config.backend)
    prepared = adapter.prepare(prompt, pil, paths, max_pixels=max_pixels)
    ids = prepared.input_ids[0].tolist()
    limit = getattr(adapter, "max_positions", None)
    # Step s measures prompt + s tokens; RoPE models run past their trained range without complaint,
    # and what they compute there is meaningless.
    if limit and len(ids) + config.num_tokens - 1 > limit:
        raise InputError(f"the prompt is {len(ids)} tokens (images included); with {config.num_tokens} steps "
                         f"that is over the model's {limit} positions")
    tokens = io.TokenTable.build(adapter.token_texts(ids), prepared.images)
    variants = measures.variant_names(adapter.num_heads, logits=config.logits)
    float64 = engine.cd == torch.float64
    meta = io.base_metadata(
        model=adapter.model_id, dtype=str(adapter.dtype).replace("torch.", ""), device=str(adapter.device),
        backend=engine.backend.name, prompt=prompt, mask_mode=config.mask_mode,
        num_layers=adapter.num_layers, num_heads=adapter.num_heads, layers=layers, variants=variants,
        images=[im.to_dict() for im in prepared.images],
        target=({"mode": "greedy"} if config.target_token is None else
                {"mode": "token", "id": config.target_token,
                 "text": adapter.token_texts([config.target_token])[0]}),
        logits=config.logits, knockout_window=config.knockout_window,
        num_steps=config.num_tokens, steps_completed=0, complete=False,
    )
    if extra_metadata:
        meta.update(extra_metadata)
    generated: list[dict[str, Any]] = []

    def finish_meta(complete: bool) -> dict[str, Any]:
        meta.update(tokens=tokens.to_list(ids), generated=generated, steps_completed=len(generated),
                    complete=complete, seconds=round(time.perf_counter() - t0, 3))
        return meta

    sink = io.ParquetSink(output, float64=float64, csv=csv) if output is not None else None
    tables = []
    total = config.num_tokens * len(layers)
    done = 0

    def on_layer(step: int, layer: int) -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, total)

    try:
        for res in engine.run(prepared, config, on_layer=on_layer, on_note=on_note):
            table = io.rows_table(res.step, res.layers, tokens, variants, float64=float64)
            if sink is not None:
                sink.write(table)
            tables.append(table)
            text = adapter.token_texts([res.generated_id])[0]
            generated.append({"step": res.step, "id": res.generated_id, "text": text})
            if res.step + 1 < config.num_tokens:
                ids.append(res.generated_id)
                tokens.append(text)
    except BaseException:
        if sink is not None:
            kept = sink.abort(finish_meta(False))
            if kept is not None:
                meta["partial_path"] = str(kept)
        raise
    # A stop token ends generation early: the run is complete with fewer steps than asked.
    meta = finish_meta(True)
    path = sink.close(meta) if sink is not None else None
    table = pa.concat_tables(tables) if tables else io.schema(float64).empty_table()
    table = table.replace_schema_metadata({io.METADATA_KEY: json.dumps(meta)})
    gen_text = adapter.tokenizer.decode([g["id"] for g in generated], skip_special_tokens=False) \
        if hasattr(adapter, "tokenizer") else ""
    return SweepOutcome(table, meta, path, time.perf_counter() - t0, gen_text, prepared.images)


def resolve_target_token(adapter: ModelAdapter, target: str | int | None) -> int | None:
    """``--target-token``: a token id, or text that the tokenizer encodes as exactly one token."""
    if target is None:
        return None
    vocab = getattr(adapter, "vocab_size", None)
    if isinstance(target, int) or (isinstance(target, str) and target.strip().isdigit()):
        tid = int(target)
        if vocab is not None and not 0 <= tid < vocab:
            raise InputError(f"target token id {tid} is outside the vocabulary (0-{vocab - 1})")
        return tid
    ids = adapter.tokenizer(target, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = adapter.token_texts(ids)
        raise InputError(f"target token {target!r} is {len(ids)} tokens {pieces}; give one token or its id")
    return int(ids[0])


def sweep(model: Any, images: Sequence[Any] = (), prompt: str = "", *, mask_mode: str = "text",
          num_tokens: int = 1, layers: str | list[int] | None = None, dtype: str | torch.dtype | None = None,
          device: str | torch.device | None = None, backend: str = "auto", max_pixels: int | None = None,
          logits: bool = False, knockout_window: int = 1, target_token: str | int | None = None,
          output: str | os.PathLike | None = None, csv: bool = False, verbose: bool = False,
          tokenizer: Any = None, image_processor: Any = None) -> pa.Table:
    """Run a sweep and return its rows as a ``pyarrow.Table`` (metadata under ``b"maskvl"``).

    Args:
        model: a hub id, a local hub-like directory, ``"builtin:tiny-qwen3-vl"``, a loaded
            :class:`maskvl.models.ModelAdapter`, or a loaded ``Qwen3VLForConditionalGeneration``
            (then pass ``tokenizer=`` and ``image_processor=``).
        images: image paths or PIL images, in prompt order (none for a text-only analysis).
        prompt: the user's question; it goes through the model's chat template.
        mask_mode: ``text``, ``vision`` or ``both``.
        num_tokens: generation steps to measure (greedy; stops early at a stop token).
        layers: ``"0-5,20"`` or a list of layer indices; None for all.
        logits: add the ``Logits`` variant (effect on the next-token distribution).
        knockout_window: with ``logits``, remove the key at layers L..L+k-1.
        target_token: token (text or id) whose probability change is reported; default the greedy one.
        output: also write Parquet there (atomically, step by step).
    """
    adapter = _as_adapter(model, dtype, device, verbose, tokenizer, image_processor)
    if isinstance(layers, str):
        layers = parse_layers(layers)
    config = SweepConfig(mask_mode=mask_mode, num_tokens=num_tokens, layers=layers, backend=backend,
                         logits=logits, knockout_window=knockout_window,
                         target_token=resolve_target_token(adapter, target_token))
    return run_sweep(adapter, list(images), prompt, config, output=output, csv=csv, max_pixels=max_pixels).table
