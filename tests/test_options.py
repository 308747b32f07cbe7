"""Sweep options are defined once (maskvl/options.py): the CLI, the API and jobs files agree on them."""

from __future__ import annotations

import inspect
from pathlib import Path

import click
import pytest

import maskvl
from maskvl import options
from maskvl.batch import JOB_KEYS, MODEL_KEYS, load_spec
from maskvl.cli import cli
from maskvl.errors import InputError
from maskvl.options import OPTIONS


def test_every_entry_point_derives_from_the_table() -> None:
    sweep_cmd = cli.commands["sweep"]
    cli_names = {p.name for p in sweep_cmd.params if isinstance(p, click.Option)}
    assert set(OPTIONS) <= cli_names
    assert set(OPTIONS) <= set(inspect.signature(maskvl.api.sweep).parameters)
    assert set(OPTIONS) - set(MODEL_KEYS) <= set(JOB_KEYS)
    assert set(MODEL_KEYS) == {"dtype", "device"}
    for name, opt in OPTIONS.items():
        param = next(p for p in sweep_cmd.params if p.name == name)
        assert param.opts == [opt.cli] and param.help == opt.help
        assert inspect.signature(maskvl.api.sweep).parameters[name].default == opt.default


# (option, bad value as typed in Python/YAML, the same value as command-line text, message)
BAD = [
    ("mask_mode", "pixels", "pixels", "mask_mode (--mask-mode) must be one of text, vision, both (got 'pixels')"),
    ("num_tokens", 0, "0", "num_tokens (--num-tokens) must be an integer of at least 1 (got 0)"),
    ("knockout_window", -2, "-2", "knockout_window (--knockout-window) must be an integer of at least 1 (got -2)"),
    ("max_pixels", 0, "0", "max_pixels (--max-pixels) must be an integer of at least 1 (got 0)"),
    ("backend", "cuda", "cuda", "backend (--backend) must be one of auto, reference, cpp, triton (got 'cuda')"),
    ("layers", "3-1", "3-1", "layers (--layers): bad layer list '3-1': expected e.g. 0-5,20"),
    ("dtype", "float8", "float8", "dtype (--dtype) must be one of auto, float32, bfloat16, float16, float64"),
]


@pytest.mark.parametrize("name, value, text, message", BAD, ids=[b[0] for b in BAD])
def test_the_same_bad_value_gets_the_same_message_everywhere(tmp_path: Path, run_main, name: str, value, text: str,
                                                            message: str) -> None:
    # Python API (fails before any model load: the model does not exist)
    with pytest.raises(InputError) as api_err:
        maskvl.sweep(str(tmp_path / "no-model"), prompt="Hi", **{name: value})
    assert message in str(api_err.value)
    # Jobs file (defaults take every option, including the model-level ones)
    jobs = tmp_path / "jobs.yaml"
    import yaml

    jobs.write_text(yaml.safe_dump({"model": "m", "defaults": {name: value}, "jobs": [{"name": "a", "prompt": "p"}]}))
    with pytest.raises(InputError) as job_err:
        load_spec(jobs)
    assert message in str(job_err.value) and str(job_err.value).startswith("jobs.yaml: defaults: ")
    # Command line
    code, _, err = run_main(["sweep", "--model", str(tmp_path / "no-model"), "--prompt", "Hi", "-q",
                             options.OPTIONS[name].cli, text])
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_target_token_without_logits_is_an_error_everywhere(tmp_path: Path, run_main) -> None:
    message = "target_token (--target-token) needs logits (--logits)"
    with pytest.raises(InputError, match=r"target_token \(--target-token\) needs logits"):
        maskvl.sweep(str(tmp_path / "no-model"), prompt="Hi", target_token=" red")
    code, _, err = run_main(["sweep", "--prompt", "Hi", "--target-token", " red"])
    assert code == 2 and message in err
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text("model: m\njobs:\n  - {name: a, prompt: p, target_token: ' red'}\n")
    with pytest.raises(InputError, match="needs logits"):
        load_spec(jobs)
    with pytest.raises(InputError, match=r"knockout_window \(--knockout-window\) needs logits"):
        options.resolve({"knockout_window": 2})


def test_resolve_normalises_text_and_typed_values_alike() -> None:
    typed = options.resolve({"num_tokens": 3, "layers": [0, 2], "logits": True, "target_token": 5})
    text = options.resolve({"num_tokens": "3", "layers": "0,2", "logits": True, "target_token": 5})
    assert typed == text
    assert typed["layers"] == (0, 2) and typed["mask_mode"] == "text"
    with pytest.raises(InputError, match=r"num_tokens \(--num-tokens\) must be an integer of at least 1 \(got True\)"):
        options.resolve({"num_tokens": True})
    with pytest.raises(InputError, match="unknown option 'mask_mod'"):
        options.resolve({"mask_mod": "text"})
    assert options.fingerprint(typed)["layers"] == [0, 2]
    assert "csv" not in options.fingerprint(typed) and "dtype" not in options.fingerprint(typed)


def test_layer_out_of_range_names_the_option(adapter32) -> None:
    with pytest.raises(InputError, match=r"layers \(--layers\): layer 9 is out of range: the model has layers 0-2"):
        maskvl.sweep(adapter32, prompt="Hi", layers="9")
