"""The ``maskvl`` command line.

Every user error (bad option, missing image, missing model, ...) ends with one line on stderr and exit
code 2; no traceback. Long work shows a progress bar on stderr.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from typing import Any

import click

from . import __version__, options
from .errors import MaskvlError

# The library (torch, transformers, pyarrow: seconds to import) is imported inside each command, so
# `maskvl --help`, `--version` and a mistyped option answer at once. Nothing else is imported lazily.


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
  maskvl sweep --model ./my-checkpoint --image dog.jpg --prompt "What animal?" --logits \
      --mask-groups blocks:4x4 --mask-groups 'box:0:120,40,380,300'
"""


@cli.command(epilog=SWEEP_EXAMPLES)
@click.option("--model", "model", default="builtin:tiny-qwen3-vl", show_default=True,
              help="Hub id, local hub-like directory, or builtin:tiny-qwen3-vl.")
@click.option("--image", "images", multiple=True, help="Image file (repeatable; none = text-only).")
@click.option("--prompt", required=True, help="The question; it goes through the model's chat template.")
@options.click_options()
@click.option("--output", "-o", default=None, help="Output Parquet path (default: maskvl-out/<slug>.parquet).")
@click.option("--verbose", "-v", is_flag=True, help="Say more about loading and fallbacks.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def sweep(model: str, images: tuple[str, ...], prompt: str, output: str | None, verbose: bool, quiet: bool,
          **opts: Any) -> None:
    """Generate greedily and measure every masked token at every layer and step."""
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    from .api import default_output, run_sweep
    from .inputs import check_prompt, load_image
    from .models import load_model, resolve_device, resolve_dtype

    # Everything that needs no model is checked before the (slow) model load.
    opts = options.resolve(opts, has_images=bool(images))
    check_prompt(prompt)
    for path in images:
        load_image(path)
    out = output or str(default_output(prompt))
    dev = resolve_device(opts["device"])
    dt = resolve_dtype(opts["dtype"], dev)
    if not quiet:
        click.echo(f"loading {model} ({str(dt).replace('torch.', '')} on {dev}) ...", err=True)
    if not verbose:
        # transformers' per-shard loading bar is noise next to our own progress bar.
        hf_logging.disable_progress_bar()
    adapter = load_model(model, dt, dev, verbose=verbose)
    bar: Any = None  # created at the first progress report, after every check has passed

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if quiet:
            return
        if bar is None:
            bar = tqdm(total=total, unit="layer", desc="sweep", file=sys.stderr, dynamic_ncols=True)
        bar.update(done - bar.n)

    def note(text: str) -> None:
        if not quiet:
            tqdm.write(f"maskvl: {text}", file=sys.stderr)

    try:
        res = run_sweep(adapter, list(images), prompt, opts, output=out, on_progress=progress, on_note=note)
    except KeyboardInterrupt:
        raise MaskvlError("interrupted; completed steps (if any) were kept in a .partial.parquet file") from None
    finally:
        if bar is not None:
            bar.close()
    md = res.metadata
    def grid_text(im: dict) -> str:
        gs = im.get("grids") or []
        if len(gs) <= 1:
            return f"{im['grid_rows']}x{im['grid_cols']}"
        tiles = [g for g in gs if g["kind"] == "tile"]
        whole = [f"{g['kind']} {g['rows']}x{g['cols']}" for g in gs if g["kind"] != "tile"]
        return " + ".join(([f"{len(tiles)} tiles"] if tiles else []) + whole)

    grids = ", ".join(grid_text(im) for im in md["images"]) or "none (text-only)"
    click.echo(f"tokens      {len(md['tokens'])} ({sum(t['kind'] == 'image' for t in md['tokens'])} image)")
    click.echo(f"image grids {grids}")
    if md.get("groups"):
        click.echo(f"groups      {len(md['groups'])} (one row per group per layer, variant and step)")
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
@click.option("--family", default="qwen3_vl", show_default=True,
              help="The transformers model type to build (maskvl info lists them).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--layers", "num_layers", type=int, default=4, show_default=True)
@click.option("--heads", "num_heads", type=int, default=4, show_default=True)
@click.option("--kv-heads", "num_kv_heads", type=int, default=2, show_default=True)
@click.option("--head-dim", type=int, default=16, show_default=True)
@click.option("--hidden", "hidden_size", type=int, default=64, show_default=True)
def make_tiny_model(directory: str, family: str, seed: int, num_layers: int, num_heads: int, num_kv_heads: int,
                    head_dim: int, hidden_size: int) -> None:
    """Write a tiny random model as a hub-like directory (defaults: the built-in Qwen3-VL)."""
    from .models import adapter_class

    if num_heads % num_kv_heads:
        raise MaskvlError("--heads must be a multiple of --kv-heads")
    path = adapter_class(family).write_tiny_model(directory, seed=seed, num_layers=num_layers, num_heads=num_heads,
                                                  num_kv_heads=num_kv_heads, head_dim=head_dim,
                                                  hidden_size=hidden_size)
    click.echo(str(path))


@cli.command()
def info() -> None:
    """Versions, devices, the compiled extension's status, and the backend auto picks."""
    from . import ops
    from .models import supported_model_types

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
    click.echo(f"{'model types':<17} {', '.join(supported_model_types())}")


@cli.command("batch")
@click.argument("jobs_file", metavar="JOBS.yaml")
@click.option("--output-dir", "-o", required=True, help="Folder for <job name>.parquet files (shared by all ranks).")
@click.option("--force", is_flag=True, help="Redo every job, even those with a complete matching file.")
@click.option("--verbose", "-v", is_flag=True, help="Say more; tracebacks of unexpected job failures.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def batch(jobs_file: str, output_dir: str, force: bool, verbose: bool, quiet: bool) -> None:
    """Run the sweeps of a YAML jobs file over one loaded model; rerun to resume.

    \b
    Each job writes OUTPUT_DIR/<name>.parquet atomically. A rerun skips jobs whose file is complete
    and matches the job, and redoes the rest. A failing job does not stop the others; the command
    exits 1 if any failed (2 for a bad jobs file). Under torchrun, jobs are sharded across ranks.
    Jobs take the sweep options by their Python names: {names}.
    """
    from .batch import format_summary, run_batch

    outcome = run_batch(jobs_file, output_dir, force=force, verbose=verbose, quiet=quiet)
    if outcome.lead:
        click.echo(format_summary(outcome.results, show_rank=outcome.world_size > 1))
    if outcome.failed:
        sys.exit(1)


batch.help = (batch.help or "").replace("{names}", ", ".join(options.OPTIONS))


@cli.command("render")
@click.argument("parquet_file", metavar="FILE.parquet")
@click.option("--output", "-o", default=None,
              help="out.png for one figure, or a folder for one PNG per step (default: FILE.png beside FILE).")
@click.option("--layers", default=None,
              help="Layers to draw, e.g. 0-5,20 (default: up to 8 spread over the file's).")
@click.option("--steps", default=None, help="Generation steps to draw, e.g. 0,2 (default: all).")
@click.option("--variant", default="Full", show_default=True, help="Full, Attn, Head_N ...")
@click.option("--metric", type=click.Choice(("l2", "cosine")), default="l2", show_default=True)
@click.option("--image", "images", multiple=True,
              help="Image for image 0, 1, ... in order (default: the paths recorded in the file).")
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.6, show_default=True, help="Heatmap opacity.")
@click.option("--cmap", default="magma", show_default=True, help="Matplotlib colour map.")
@click.option("--dpi", type=click.IntRange(30, 600), default=110, show_default=True)
def render(parquet_file: str, output: str | None, layers: str | None, steps: str | None, variant: str,
           metric: str, images: tuple[str, ...], alpha: float, cmap: str, dpi: int) -> None:
    """Draw a sweep file as heatmaps over its images and coloured text-token strips."""
    from .render import render as render_png

    written = render_png(parquet_file, output, layers=layers, steps=steps, variant=variant, metric=metric,
                         images=images, alpha=alpha, cmap=cmap, dpi=dpi,
                         on_warning=lambda text: click.echo(f"maskvl: warning: {text}", err=True))
    for path in written:
        click.echo(str(path))


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
