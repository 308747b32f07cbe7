"""The Python API: ``maskvl.sweep(...)``, ``maskvl.iter_sweep(...)`` and the orchestration shared with
the CLI and batch runs.

Options are checked by ``maskvl.options`` (the same checks and messages as the command line and batch
jobs files); :func:`run_sweep` is the one path from resolved options to a written file.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, Sequence

import pyarrow as pa
import torch

from . import io, measures, options
from .engine import Engine, SweepConfig
from .errors import InputError
from .groups import GroupSpecError, resolve_groups, to_json
from .inputs import check_prompt, load_image
from .models import ModelAdapter, adapter_for_loaded, load_model, resolve_device, resolve_dtype
from .options import OPTIONS
from .results import Sweep


@dataclass
class SweepOutcome:
    """What a sweep produced: the result (rows read from the file when there is one), the metadata,
    and where they were written."""

    sweep: Sweep
    metadata: dict[str, Any]
    path: Path | None = None
    seconds: float = 0.0
    generated_text: str = ""
    images: list[Any] = field(default_factory=list)
    num_rows: int = 0

    @property
    def table(self) -> pa.Table:
        """Every row as one table; with an output file this reads the file (``num_rows`` does not)."""
        return self.sweep.table


def as_adapter(model: Any, dtype: str | None = None, device: str | None = None, verbose: bool = False,
               tokenizer: Any = None, image_processor: Any = None) -> ModelAdapter:
    """A :class:`ModelAdapter` for a model spec (hub id, directory, ``builtin:...``), an adapter, or a
    loaded transformers model (with its ``tokenizer`` and ``image_processor``)."""
    if isinstance(model, ModelAdapter):
        return model
    if isinstance(model, (str, os.PathLike)):
        dev = resolve_device(device)
        return load_model(str(model), resolve_dtype(dtype, dev), dev, verbose=verbose)
    return adapter_for_loaded(model, tokenizer, image_processor)


def default_output(prompt: str, directory: str = "maskvl-out") -> Path:
    """``maskvl-out/<slug>.parquet`` from the prompt's first words."""
    words = "".join(c if c.isalnum() else " " for c in prompt.lower()).split()
    slug = "-".join(words[:6])[:60] or "sweep"
    return Path(directory) / f"{slug}.parquet"


def run_sweep(adapter: ModelAdapter, images: Sequence[Any], prompt: str, opts: dict[str, Any],
              output: str | os.PathLike | None = None,
              on_progress: Callable[[int, int], None] | None = None,
              on_note: Callable[[str], None] | None = None,
              extra_metadata: dict[str, Any] | None = None) -> SweepOutcome:
    """Prepare inputs, run the engine step by step, write Parquet as it goes; the shared core.

    ``opts`` are sweep options (``maskvl.options``; checked and completed here). ``images`` are paths or
    PIL images. ``on_progress(done, total)`` is called after each layer. ``mask_groups`` specs are
    resolved here, against the prepared inputs (image grids and token ranges; ``maskvl.groups``). With an
    ``output`` file the rows are not kept in memory: the outcome's :class:`maskvl.results.Sweep` reads them from the file.
    """
    steps = iter_run_sweep(adapter, images, prompt, opts, output, on_progress, on_note, extra_metadata,
                           keep_rows=output is None)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def iter_run_sweep(adapter: ModelAdapter, images: Sequence[Any], prompt: str, opts: dict[str, Any],
                   output: str | os.PathLike | None = None,
                   on_progress: Callable[[int, int], None] | None = None,
                   on_note: Callable[[str], None] | None = None,
                   extra_metadata: dict[str, Any] | None = None,
                   keep_rows: bool = False) -> Generator[Sweep, None, SweepOutcome]:
    """:func:`run_sweep` one step at a time: yields a :class:`Sweep` of each step's rows as soon as the
    step is written, and returns the :class:`SweepOutcome` (``StopIteration.value``).

    Rows are written one table per (step, layer) and dropped, so memory holds one layer's rows at a
    time; ``keep_rows`` keeps them for the outcome (a run without an output file). Closing the
    generator early (``break``, Ctrl-C) keeps the completed steps in ``<name>.partial.parquet``.
    """
    opts = options.resolve(opts, has_images=bool(images))
    if images and not adapter.supports_images:
        raise InputError(f"{adapter.model_id} is a text-only model: it takes no images")
    config = SweepConfig.from_options(opts, resolve_target_token(adapter, opts["target_token"]))
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
    prepared = adapter.prepare(prompt, pil, paths, max_pixels=opts["max_pixels"])
    ids = prepared.input_ids[0].tolist()
    limit = adapter.max_positions
    # Step s measures prompt + s tokens; RoPE models run past their trained range without complaint,
    # and what they compute there is meaningless.
    if limit and len(ids) + config.num_tokens - 1 > limit:
        raise InputError(f"the prompt is {len(ids)} tokens (images included); with {config.num_tokens} steps "
                         f"that is over the model's {limit} positions")
    groups = None
    if opts["mask_groups"] is not None:
        try:
            groups = resolve_groups(opts["mask_groups"], prepared.images, prepared.is_image, opts["mask_mode"])
        except GroupSpecError as exc:
            raise InputError(f"{OPTIONS['mask_groups'].label}: {exc}") from None
        config.groups = [list(g.positions) for g in groups]
    group_meta = [g.to_dict(i) for i, g in enumerate(groups)] if groups is not None else None
    tokens = io.TokenTable.build(adapter.token_texts(ids), prepared.images)
    # Head_N up to the most heads of any measured layer (Qwen3.5's linear layers have more); a layer
    # with fewer has no rows for the others (layer_heads in the metadata).
    variants = measures.variant_names(max(adapter.layer_heads(layer) for layer in layers), logits=config.logits)
    float64 = engine.cd == torch.float64
    meta = io.base_metadata(
        model=adapter.model_id, dtype=str(adapter.dtype).replace("torch.", ""), device=str(adapter.device),
        backend=engine.backend.name, prompt=prompt, mask_mode=opts["mask_mode"],
        num_layers=adapter.num_layers, num_heads=adapter.num_heads, layers=layers, variants=variants,
        images=[im.to_dict() for im in prepared.images],
        target=({"mode": "greedy"} if config.target_token is None else
                {"mode": "token", "id": config.target_token,
                 "text": adapter.token_texts([config.target_token])[0]}),
        logits=config.logits, knockout_window=config.knockout_window,
        # Per layer, the keys a query sees (None: full causal). Keys outside the final query's window
        # have no effect at that layer: their rows are exact zeros.
        attention_windows=[adapter.attention_window(layer) for layer in range(adapter.num_layers)],
        # Per layer: "attention" or "linear" (Gated DeltaNet), and how many Head_N variants it has.
        layer_types=[adapter.layer_kind(layer) for layer in range(adapter.num_layers)],
        layer_heads=[adapter.layer_heads(layer) for layer in range(adapter.num_layers)],
        mask_groups=to_json(opts["mask_groups"]), groups=group_meta,
        num_steps=config.num_tokens, steps_completed=0, complete=False,
    )
    if extra_metadata:
        meta.update(extra_metadata)
    generated: list[dict[str, Any]] = []

    def finish_meta(complete: bool) -> dict[str, Any]:
        meta.update(tokens=tokens.to_list(ids), generated=generated, steps_completed=len(generated),
                    generated_text=adapter.detokenize([g["id"] for g in generated]),
                    complete=complete, seconds=round(time.perf_counter() - t0, 3))
        return meta

    sink = io.ParquetSink(output, float64=float64, csv=opts["csv"]) if output is not None else None
    tables: list[pa.Table] = []
    rows = 0
    total = config.num_tokens * len(layers)
    done = 0

    def on_layer(step: int, layer: int) -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, total)

    try:
        for res in engine.run(prepared, config, on_layer=on_layer, on_note=on_note):
            # One table per layer, written and dropped: a step's rows never sit in memory all at once.
            step_tables = []
            for lr in res.layers:
                table = io.rows_table(res.step, [lr], tokens, float64=float64, groups=group_meta,
                                      variants=variants)
                if sink is not None:
                    sink.write(table)
                rows += table.num_rows
                step_tables.append(table)
            if keep_rows:
                tables.extend(step_tables)
            text = adapter.token_texts([res.generated_id])[0]
            generated.append({"step": res.step, "id": res.generated_id, "text": text})
            if res.step + 1 < config.num_tokens:
                ids.append(res.generated_id)
                tokens.append(text)
            snapshot = json.loads(json.dumps(finish_meta(False)))  # later steps must not change it
            del res  # the engine's results of this step, before it computes the next
            yield Sweep.from_tables(step_tables, snapshot, steps=[snapshot["generated"][-1]["step"]])
            del step_tables
    except BaseException:
        if sink is not None:
            kept = sink.abort(finish_meta(False))
            if kept is not None:
                meta["partial_path"] = str(kept)
        raise
    # A stop token ends generation early: the run is complete with fewer steps than asked.
    meta = finish_meta(True)
    path = sink.close(meta) if sink is not None else None
    # Without keep_rows and without a file the rows were only yielded (iter_sweep): the outcome has none.
    result = Sweep.open(path) if path is not None else \
        Sweep.from_tables(tables or [io.schema(float64).empty_table()], meta)
    return SweepOutcome(result, meta, path, time.perf_counter() - t0, meta["generated_text"], prepared.images,
                        rows)


def resolve_target_token(adapter: ModelAdapter, target: str | int | None) -> int | None:
    """``--target-token``: a token id, or text that the tokenizer encodes as exactly one token."""
    if target is None:
        return None
    vocab = adapter.vocab_size
    if isinstance(target, int) or (isinstance(target, str) and target.strip().isdigit()):
        tid = int(target)
        if vocab is not None and not 0 <= tid < vocab:
            raise InputError(f"{OPTIONS['target_token'].label}: token id {tid} is outside the vocabulary "
                             f"(0-{vocab - 1})")
        return tid
    ids = adapter.tokenize(target)
    if len(ids) != 1:
        pieces = adapter.token_texts(ids)
        raise InputError(f"{OPTIONS['target_token'].label}: {target!r} is {len(ids)} tokens {pieces}; "
                         f"give one token or its id")
    return int(ids[0])


def sweep(model: Any, images: Sequence[Any] = (), prompt: str = "", *, output: str | os.PathLike | None = None,
          verbose: bool = False, tokenizer: Any = None, image_processor: Any = None, **opts: Any) -> Sweep:
    """Run a sweep and return its result, a :class:`maskvl.results.Sweep` (``.grid(...)``, ``.maps(...)``,
    ``.top(...)``, ``.plot(...)``; ``.table`` is every row as a ``pyarrow.Table`` with the metadata under
    ``b"maskvl"``). With ``output`` the rows are read back from the file when asked for.

    Args:
        model: a hub id, a local hub-like directory, ``"builtin:tiny-qwen3-vl"``, a loaded
            :class:`maskvl.models.ModelAdapter`, or a loaded transformers model of a supported family
            (then pass ``tokenizer=`` and, for vision-language models, ``image_processor=``).
        images: image paths or PIL images, in prompt order (none for a text-only analysis).
        prompt: the user's question; it goes through the model's chat template.
        output: also write Parquet there (atomically, step by step).
        verbose: log loading details and fallbacks.
    Sweep options (keyword-only; ``maskvl.options``):
{options}
    """
    opts = options.resolve(opts, has_images=bool(images))  # before the slow model load
    adapter = as_adapter(model, opts["dtype"], opts["device"], verbose, tokenizer, image_processor)
    return run_sweep(adapter, list(images), prompt, opts, output=output).sweep


def iter_sweep(model: Any, images: Sequence[Any] = (), prompt: str = "", *,
               output: str | os.PathLike | None = None, verbose: bool = False, tokenizer: Any = None,
               image_processor: Any = None, **opts: Any) -> Iterator[Sweep]:
    """Run a sweep and yield each generation step as it finishes, as a :class:`maskvl.results.Sweep`
    holding that step's rows (its metadata: everything known so far). Same arguments as
    :func:`sweep`; nothing is kept from one step to the next, so memory does not grow with the steps.

    With ``output`` the file is published once the last step is read (``maskvl.open(output)`` then
    has them all); stopping early keeps the completed steps in ``<name>.partial.parquet``.
    Sweep options (keyword-only; ``maskvl.options``):
{options}
    """
    # Options are checked and the model loaded now, at the call; the steps run as they are read.
    opts = options.resolve(opts, has_images=bool(images))
    adapter = as_adapter(model, opts["dtype"], opts["device"], verbose, tokenizer, image_processor)
    return iter_run_sweep(adapter, list(images), prompt, opts, output=output)


for _fn in (sweep, iter_sweep):
    _fn.__doc__ = (_fn.__doc__ or "").replace("{options}", options.docstring_lines())
    _fn.__signature__ = inspect.signature(_fn).replace(parameters=[  # type: ignore[attr-defined]
        p for p in inspect.signature(_fn).parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD
    ] + options.signature_parameters())
del _fn
