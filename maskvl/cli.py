"""The ``maskvl`` command line.

Every user error (bad option, missing image, missing model, ...) ends with one line on stderr and exit
code 2; no traceback. Long work shows a progress bar on stderr.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click

from .errors import MaskvlError

MASK_MODES = ("text", "vision", "both")


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"maskvl: error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="maskvl", prog_name="maskvl", message="%(prog)s %(version)s")
def cli() -> None:
    """See which input tokens a vision-language model uses, layer by layer, as it answers."""


SWEEP_EXAMPLES = """
\b
Examples:
  maskvl sweep --model builtin:tiny-qwen3-vl --image cat.png --prompt "What is this?"
  maskvl sweep --model Qwen/Qwen3-VL-4B-Instruct --image a.jpg --image b.jpg \\
      --prompt "What differs?" --mask-mode both --num-tokens 3 --layers 0-5,20
  maskvl sweep --model ./my-checkpoint --prompt "Explain RoPE" --dtype float64 --csv
  maskvl sweep --model ./my-checkpoint --image flag.png --prompt "What color?" --logits --target-token " red"
"""


@cli.command(epilog=SWEEP_EXAMPLES)
@click.option("--model", "model", default="builtin:tiny-qwen3-vl", show_default=True,
              help="Hub id, local hub-like directory, or builtin:tiny-qwen3-vl.")
@click.option("--image", "images", multiple=True, help="Image file (repeatable; none = text-only).")
@click.option("--prompt", required=True, help="The question; it goes through the model's chat template.")
@click.option("--mask-mode", type=click.Choice(MASK_MODES), default="text", show_default=True,
              help="Mask text tokens, image patches, or every position.")
@click.option("--num-tokens", type=int, default=1, show_default=True,
              help="Generation steps to measure (greedy; stops at the end-of-turn token).")
@click.option("--layers", default=None, help="Layers to measure, e.g. 0-5,20 (default: all).")
@click.option("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default), float16, float64.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--backend", type=click.Choice(["auto", "reference", "cpp", "triton"]), default="auto",
              show_default=True, help="Kernels: triton on CUDA, the C++ extension on CPU, or plain PyTorch.")
@click.option("--max-pixels", type=int, default=None, help="Cap on the resized image size in pixels.")
@click.option("--logits", is_flag=True, help="Add the Logits variant: effect on the next-token distribution.")
@click.option("--knockout-window", type=int, default=1, show_default=True,
              help="With --logits: remove the key at layers L..L+k-1.")
@click.option("--target-token", default=None,
              help="With --logits: token (text or id) whose probability change is reported (default: greedy).")
@click.option("--output", "-o", default=None, help="Output Parquet path (default: maskvl-out/<slug>.parquet).")
@click.option("--csv", is_flag=True, help="Also write a CSV beside the Parquet file.")
@click.option("--verbose", "-v", is_flag=True, help="Say more about loading and fallbacks.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def sweep(model: str, images: tuple[str, ...], prompt: str, mask_mode: str, num_tokens: int, layers: str | None,
          dtype: str | None, device: str | None, backend: str, max_pixels: int | None, logits: bool,
          knockout_window: int, target_token: str | None, output: str | None, csv: bool, verbose: bool,
          quiet: bool) -> None:
    """Generate greedily and measure every masked token at every layer and step."""
    from .api import default_output, run_sweep
    from .engine import SweepConfig, parse_layers
    from .inputs import check_prompt, load_image

    config = SweepConfig(mask_mode=mask_mode, num_tokens=num_tokens, layers=parse_layers(layers), backend=backend,
                         logits=logits, knockout_window=knockout_window)
    config.check()  # fail before the (slow) model load
    if max_pixels is not None and max_pixels < 1:
        raise MaskvlError("--max-pixels must be positive")
    check_prompt(prompt)
    for path in images:
        load_image(path)
    if mask_mode == "vision" and not images:
        raise MaskvlError("--mask-mode vision needs at least one --image")
    if (target_token is not None or knockout_window != 1) and not logits:
        raise MaskvlError("--target-token and --knockout-window need --logits")
    out = output or str(default_output(prompt))

    from .models import load_model, resolve_device, resolve_dtype

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if not quiet:
        click.echo(f"loading {model} ({str(dt).replace('torch.', '')} on {dev}) ...", err=True)
    if not verbose:
        # transformers' per-shard loading bar is noise next to our own progress bar.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    adapter = load_model(model, dt, dev, verbose=verbose)
    config.validate(adapter.num_layers)
    from .api import resolve_target_token

    config.target_token = resolve_target_token(adapter, target_token)

    bar: Any = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=None, unit="layer", desc="sweep", file=sys.stderr, dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            if bar.total != total:
                bar.total = total
            bar.update(done - bar.n)

    try:
        def note(text: str) -> None:
            if bar is not None:
                bar.write(f"maskvl: {text}", file=sys.stderr)

        res = run_sweep(adapter, list(images), prompt, config, output=out, csv=csv, max_pixels=max_pixels,
                        on_progress=progress, on_note=note)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        raise MaskvlError("interrupted; completed steps (if any) were kept in a .partial.parquet file") from None
    finally:
        if bar is not None:
            bar.close()
    md = res.metadata
    grids = ", ".join(f"{im['grid_rows']}x{im['grid_cols']}" for im in md["images"]) or "none (text-only)"
    click.echo(f"tokens      {len(md['tokens'])} ({sum(t['kind'] == 'image' for t in md['tokens'])} image)")
    click.echo(f"image grids {grids}")
    click.echo(f"generated   {res.generated_text!r}")
    click.echo(f"rows        {res.table.num_rows} ({md['steps_completed']} steps x {len(md['layers'])} layers)")
    click.echo(f"backend     {md['backend']}")
    click.echo(f"seconds     {res.seconds:.2f}")
    click.echo(f"output      {res.path}")


@cli.command()
@click.argument("parquet")
@click.option("--image", "images", multiple=True,
              help="Image to overlay (repeatable, in prompt order; default: the paths in the file's metadata).")
@click.option("--output", "-o", default=None, help="HTML page to write (default: beside the Parquet file).")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in a browser.")
def view(parquet: str, images: tuple[str, ...], output: str | None, open_browser: bool) -> None:
    """Write a self-contained HTML viewer page (viewer, data and images embedded)."""
    from .view import ViewError, open_in_browser, write_page

    try:
        page = write_page(parquet, output, list(images) if images else None)
    except ViewError as exc:
        raise MaskvlError(str(exc)) from None
    click.echo(str(page))
    if open_browser and not open_in_browser(page):
        click.echo("maskvl: could not open a browser; open the file above by hand", err=True)


@cli.command("make-tiny-model")
@click.argument("directory")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--layers", "num_layers", type=int, default=4, show_default=True)
@click.option("--heads", "num_heads", type=int, default=4, show_default=True)
@click.option("--kv-heads", "num_kv_heads", type=int, default=2, show_default=True)
@click.option("--head-dim", type=int, default=16, show_default=True)
@click.option("--hidden", "hidden_size", type=int, default=64, show_default=True)
def make_tiny_model(directory: str, seed: int, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
                    hidden_size: int) -> None:
    """Write a tiny random Qwen3-VL as a hub-like directory (the built-in model by default)."""
    from .models.tiny import write_tiny_model

    if num_heads % num_kv_heads:
        raise MaskvlError("--heads must be a multiple of --kv-heads")
    if head_dim % 8:
        raise MaskvlError("--head-dim must be a multiple of 8 (MRoPE sections)")
    path = write_tiny_model(directory, seed=seed, num_layers=num_layers, num_heads=num_heads,
                            num_kv_heads=num_kv_heads, head_dim=head_dim, hidden_size=hidden_size,
                            deepstack=tuple(range(min(3, num_layers))))
    click.echo(str(path))


@cli.command()
def info() -> None:
    """Versions, devices, the compiled extension's status, and the backend auto picks."""
    import platform

    from . import __version__, ops

    click.echo(f"{'maskvl':<17} {__version__}")
    click.echo(f"{'python':<17} {platform.python_version()}")
    d = ops.describe()
    for key in ("torch", "triton", "transformers", "cuda_device", "cpp", "triton_interpret"):
        if key in d:
            click.echo(f"{key:<17} {d[key]}")
    for dev, backends in d.get("status", {}).items():
        for name, why in backends.items():
            click.echo(f"{dev + ' ' + name:<17} {'available' if why is None else 'unavailable: ' + why}")
    for dev, name in d.get("auto", {}).items():
        click.echo(f"{'auto on ' + dev:<17} {name}")


from .batch import batch_command  # noqa: E402  (commands in their own modules)
from .render import render_command  # noqa: E402

cli.add_command(batch_command, "batch")
cli.add_command(render_command, "render")


def main(argv: list[str] | None = None) -> None:
    """Entry point: click with one-line errors instead of usage dumps and tracebacks."""
    if os.environ.get("MASKVL_LOG") or "-v" in (argv or sys.argv) or "--verbose" in (argv or sys.argv):
        logging.basicConfig(level=logging.INFO, format="maskvl: %(message)s", stream=sys.stderr)
    try:
        cli.main(args=argv, prog_name="maskvl", standalone_mode=False)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except click.ClickException as exc:
        _fail(exc.format_message())
    except MaskvlError as exc:
        _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)


if __name__ == "__main__":
    main()
