"""The sweep options, defined once.

Every option a sweep takes is one :class:`Option` here: its name, type, default, choices, help text
and check. Everything else derives from this table:

- the Click options of ``maskvl sweep`` (``--mask-mode`` ...) and the help of ``maskvl batch``;
- the keyword arguments of :func:`maskvl.sweep` / :func:`maskvl.iter_sweep`;
- the keys a batch jobs file accepts (``defaults:`` and per job) and a job's fingerprint;
- the engine's :class:`maskvl.engine.SweepConfig`.

So the same bad value gets the same one-line message from the command line, the Python API and a jobs
file: messages name the option as ``mask_mode (--mask-mode)``. Values given as text (the command line)
and as typed values (Python, YAML) go through the same check.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from .errors import InputError
from .groups import GroupSpecError, needs_images, parse_specs, to_json

MASK_MODES = ("text", "vision", "both")
BACKENDS = ("auto", "reference", "cpp", "triton")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16", "float64")


def parse_layers(spec: str | None) -> list[int] | None:
    """``"0-5,20"`` -> ``[0, 1, 2, 3, 4, 5, 20]``; ``None``/``"all"`` -> ``None`` (every layer)."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return None
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise InputError(f"bad layer list {spec!r}: expected e.g. 0-5,20") from None
    return out


@dataclass(frozen=True)
class Option:
    """One sweep option.

    ``check(value)`` takes the value as Python or YAML gives it, or as text from the command line,
    and returns it normalised, or raises :class:`InputError` with a message naming the option.
    ``model_level`` options are fixed when the model loads (a batch sets them once, under ``defaults``);
    ``fingerprint`` options shape the result (a batch reruns a job when one of them changes);
    ``fingerprint_when_set`` ones only count when not None, so results written before the option
    existed keep their fingerprint. ``multiple`` options repeat on the command line.
    """

    name: str
    default: Any
    help: str
    check: Callable[["Option", Any], Any]
    choices: tuple[str, ...] | None = None
    flag: bool = False
    metavar: str | None = None
    model_level: bool = False
    fingerprint: bool = True
    fingerprint_when_set: bool = False
    multiple: bool = False

    @property
    def cli(self) -> str:
        """The command-line spelling: ``mask_mode`` -> ``--mask-mode``."""
        return "--" + self.name.replace("_", "-")

    @property
    def label(self) -> str:
        """How messages name the option, the same from every entry point."""
        return f"{self.name} ({self.cli})"

    def error(self, requirement: str, value: Any) -> InputError:
        return InputError(f"{self.label} {requirement} (got {value!r})")


# ----------------------------------------------------------------------------------- the checks
def _choice(opt: Option, value: Any) -> str:
    if value not in (opt.choices or ()):
        raise opt.error(f"must be one of {', '.join(opt.choices or ())}", value)
    return value


def _optional_choice(opt: Option, value: Any) -> str | None:
    return None if value is None else _choice(opt, value)


def _int_at_least(minimum: int, optional: bool = False) -> Callable[[Option, Any], int | None]:
    def check(opt: Option, value: Any) -> int | None:
        if value is None and optional:
            return None
        text = isinstance(value, str)
        if text:
            value = value.strip()
            try:
                number = int(value)
            except ValueError:
                raise opt.error(f"must be an integer of at least {minimum}", value) from None
        else:
            # bool is an int subclass; `num_tokens: yes` is a mistake, not 1.
            if not isinstance(value, int) or isinstance(value, bool):
                raise opt.error(f"must be an integer of at least {minimum}", value)
            number = value
        if number < minimum:
            raise opt.error(f"must be an integer of at least {minimum}", number)
        return number
    return check


def _bool(opt: Option, value: Any) -> bool:
    if not isinstance(value, bool):
        raise opt.error("must be true or false", value)
    return value


def _layers(opt: Option, value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            parsed = parse_layers(value)
        except InputError as exc:
            raise InputError(f"{opt.label}: {exc}") from None
        if parsed is None:
            return None
        value = parsed
    elif isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                        for v in value):
        raise opt.error("must be like 0-5,20 or a list of layer indices", value)
    if not value:
        raise opt.error("selects no layer", value)
    return tuple(value)


def _token(opt: Option, value: Any) -> str | int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise opt.error("must be a token's text or id", value)
    if isinstance(value, str) and value == "":
        raise opt.error("must be a token's text or id, not empty", value)
    return value


def _device(opt: Option, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        # A torch.device passed from Python is spelled back the way the command line would give it.
        value = str(value)
    return value


def _mask_groups(opt: Option, value: Any) -> tuple[str | tuple[int, ...], ...] | None:
    try:
        return parse_specs(value)
    except GroupSpecError as exc:
        raise InputError(f"{opt.label}: {exc}") from None


def _dtype(opt: Option, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        value = str(value).replace("torch.", "")  # a torch.dtype from Python
    return _choice(opt, value)


OPTIONS: dict[str, Option] = {o.name: o for o in [
    Option("mask_mode", None, "Mask text tokens, image patches, or every position (default: text; with "
           "mask_groups: only this mode's positions may be in a group, default any).", _optional_choice,
           choices=MASK_MODES),
    Option("mask_groups", None, "Remove sets of positions together, one row per set, instead of one "
           "position per row: blocks:RxC (blocks of each image grid), images, box:IMAGE:x0,y0,x1,y1 (tokens "
           "whose patch overlaps a pixel box of the original image), positions:LIST; repeatable.", _mask_groups,
           metavar="SPEC", multiple=True, fingerprint_when_set=True),
    Option("num_tokens", 1, "Generation steps to measure (greedy; stops at the end-of-turn token).",
           _int_at_least(1), metavar="N"),
    Option("layers", None, "Layers to measure, e.g. 0-5,20 (default: all).", _layers, metavar="LIST"),
    Option("backend", "auto", "Kernels: triton on CUDA, the C++ extension on CPU, or plain PyTorch.", _choice,
           choices=BACKENDS),
    Option("max_pixels", None, "Cap on the resized image size in pixels.", _int_at_least(1, optional=True),
           metavar="N"),
    Option("logits", False, "Add the Logits variant: effect on the next-token distribution.", _bool, flag=True),
    Option("knockout_window", 1, "With logits: remove the key at layers L..L+k-1.", _int_at_least(1),
           metavar="K"),
    Option("target_token", None,
           "With logits: token (text or id) whose probability change is reported (default: greedy).", _token,
           metavar="TOKEN"),
    Option("dtype", None, "float32 (CPU default), bfloat16 (CUDA default), float16, float64.", _dtype,
           choices=DTYPE_NAMES, model_level=True),
    Option("device", None, "cpu, cuda, cuda:1 ... (default: cuda if available).", _device, metavar="DEVICE",
           model_level=True),
    Option("max_batch_rows", 4096, "Rows per batched MLP / Logits chunk; lower it to use less memory "
           "(halved automatically when the device runs out of memory).", _int_at_least(1), metavar="N",
           fingerprint=False),
    Option("csv", False, "Also write a CSV beside the Parquet file.", _bool, flag=True, fingerprint=False),
]}


def check_options(values: Mapping[str, Any], allowed: Iterable[str] | None = None) -> dict[str, Any]:
    """Check the options given in ``values`` (unknown names are an error); returns them normalised.

    Only the given options are returned (no defaults filled in): a batch merges its defaults and a
    job's own options before :func:`resolve`.
    """
    allowed = tuple(OPTIONS if allowed is None else allowed)
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name not in allowed:
            raise InputError(f"unknown option {name!r} (allowed: {', '.join(allowed)})")
        opt = OPTIONS[name]
        out[name] = opt.check(opt, value)
    return out


def resolve(values: Mapping[str, Any], has_images: bool | None = None) -> dict[str, Any]:
    """Every option with defaults filled in, each checked, plus the checks that span options.

    ``has_images``: whether the sweep has images (None when not known yet).
    """
    out = {name: opt.default for name, opt in OPTIONS.items()}
    out.update(check_options(values))
    if out["mask_groups"] is None and out["mask_mode"] is None:
        out["mask_mode"] = "text"
    logits = OPTIONS["logits"]
    if out["target_token"] is not None and not out["logits"]:
        raise InputError(f"{OPTIONS['target_token'].label} needs {logits.label}: without the Logits measure "
                         f"there is no token probability to report")
    if out["knockout_window"] != 1 and not out["logits"]:
        raise InputError(f"{OPTIONS['knockout_window'].label} needs {logits.label}: a window longer than one "
                         f"layer only changes the Logits measure")
    if has_images is False and out["mask_mode"] == "vision":
        raise InputError(f"{OPTIONS['mask_mode'].label} vision needs at least one image")
    if has_images is False and out["mask_groups"] is not None and needs_images(out["mask_groups"]):
        raise InputError(f"{OPTIONS['mask_groups'].label} {needs_images(out['mask_groups'])} needs at least "
                         f"one image")
    return out


def fingerprint(values: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved options that shape a result (JSON-ready), for deciding whether a batch job reruns."""
    out = {}
    for name, v in values.items():
        opt = OPTIONS.get(name)
        if opt is None or not opt.fingerprint or opt.model_level or (opt.fingerprint_when_set and v is None):
            continue
        out[name] = to_json(v) if name == "mask_groups" else list(v) if isinstance(v, tuple) else v
    return out


def signature_parameters() -> list[inspect.Parameter]:
    """Keyword-only parameters for the Python API's signature (``help(maskvl.sweep)`` shows them)."""
    return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt.default)
            for name, opt in OPTIONS.items()]


def docstring_lines() -> str:
    """One line per option for API docstrings."""
    return "\n".join(f"        {name}: {opt.help}" + (f" One of {', '.join(opt.choices)}." if opt.choices else "")
                     for name, opt in OPTIONS.items())


def click_options(names: Iterable[str] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator adding the Click options ``names`` (default: all) to a command.

    Values reach the command as text (or bool for flags) and are checked by :func:`resolve`, so the
    command line gives the same messages as the API; choices still show in ``--help``.
    """
    import click  # the command line's dependency; the library itself does not need Click

    chosen = list(OPTIONS if names is None else names)

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for name in reversed(chosen):
            opt = OPTIONS[name]
            if opt.flag:
                fn = click.option(opt.cli, opt.name, is_flag=True, default=opt.default, help=opt.help)(fn)
                continue
            metavar = opt.metavar or ("[" + "|".join(opt.choices) + "]" if opt.choices else None)
            if opt.multiple:  # repeated on the command line; none given reaches resolve as () = unset
                fn = click.option(opt.cli, opt.name, type=str, multiple=True, metavar=metavar, help=opt.help)(fn)
                continue
            fn = click.option(opt.cli, opt.name, type=str, default=opt.default,
                              show_default=opt.default is not None, metavar=metavar, help=opt.help)(fn)
        return fn
    return decorate
