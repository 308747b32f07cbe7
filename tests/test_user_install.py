"""A user's install, end to end: wheel -> fresh virtualenv -> every command, with no traceback anywhere.

What a user does (docs/INSTALL.md): ``pip wheel --no-build-isolation --no-deps`` against the torch they
already have (the C++ extension is built into the wheel), then ``pip install`` the wheel into an
environment holding only torch. Here the wheel is built by this interpreter (which has torch) from a
copy of the repository's files, and installed into a fresh virtualenv that gets only torch (the version
this interpreter runs) and the dependencies the package declares: no triton, no pytest, no playwright.

Then, from a working directory that also holds a folder named ``kernels/`` whose ``__init__.py``
imports triton (as this repository's own folder and many projects' Triton code do; transformers probes
for a package of that name), every command runs: ``maskvl --version``, ``info``, ``sweep`` on the
built-in model, ``view``, ``render``, ``batch``, ``make-tiny-model``, and the README's Python example.
Each one works, or fails with one ``maskvl: error: ...`` line and exit code 2; no stderr holds a
traceback.

pip gets its packages from the local sources in its configuration (file:// indexes and find-links
folders: the wheels that lie on this machine), never from the network, so the test runs offline; where
pip's configuration names no local source, pip's own configuration is used as it stands.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import time
import venv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
import pytest

import maskvl

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "What is in this picture?"
# Packages a plain install must not have: the triton extra, and the test tools.
NOT_DECLARED = ("triton", "pytest", "playwright")
BUILD_TIMEOUT_S = 1800  # the C++ extension alone takes ~2.5 CPU-minutes, much longer on a busy 2-core machine


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        pytest.fail(f"{what} failed (exit {proc.returncode}):\n{tail}", pytrace=False)


def _copy_sources(dst: Path) -> None:
    """The repository's files as a fresh clone would have them (tracked plus new, not ignored ones)."""
    listed = _run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"])
    if listed.returncode == 0 and listed.stdout:
        for rel in filter(None, listed.stdout.split("\0")):
            src = ROOT / rel
            if src.is_file():  # a tracked file deleted in the working tree is skipped
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst / rel)
    else:  # not a git checkout (an unpacked source archive)
        shutil.copytree(ROOT, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "*.so", "__pycache__", ".pytest_cache", "maskvl-out"))


def _declared_requirements() -> list[str]:
    """setup.py's ``install_requires`` (a literal list), installed while the wheel builds (a head start)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return list(ast.literal_eval(node.value))
    return []  # not a literal: the wheel's own install below resolves them


def _local_pip_env(python: Path) -> dict[str, str]:
    """Environment variables that restrict pip to the local sources of its configuration.

    file:// indexes become the only indexes; find-links folders stay. With no local source configured,
    nothing is changed (pip uses its configuration, network included).
    """
    listed = _run([str(python), "-m", "pip", "config", "list"])
    indexes: list[str] = []
    local_links = False
    for line in listed.stdout.splitlines():
        m = re.match(r"^([^=]+)='(.*)'$", line.strip())
        if not m:
            continue
        key, value = m.group(1).rsplit(".", 1)[-1], m.group(2)
        if key in ("index-url", "extra-index-url"):
            indexes += [u for u in value.split() if u.startswith("file:")]
        elif key == "find-links":
            local_links |= any(not re.match(r"^https?:", u) for u in value.split())
    env: dict[str, str] = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    if indexes:
        env["PIP_INDEX_URL"] = indexes[0]
        env["PIP_EXTRA_INDEX_URL"] = " ".join(indexes[1:])
    elif local_links:
        env["PIP_NO_INDEX"] = "1"
    return env


def _torch_requirement() -> str:
    import torch

    return "torch==" + torch.__version__.split("+")[0]


@pytest.fixture(scope="session")
def user_env(tmp_path_factory) -> Iterator[dict]:
    """A fresh virtualenv with torch, the declared dependencies and the maskvl wheel built from this tree.

    The wheel build (this interpreter, ``--no-build-isolation``) and the virtualenv's set-up run at once.
    Yields ``{"bin": venv bin folder, "python": its python, "seconds": set-up time}``.
    """
    started = time.monotonic()
    base = tmp_path_factory.mktemp("user-install")
    src, wheels, env_dir = base / "src", base / "wheels", base / "venv"
    _copy_sources(src)
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}

    def build_wheel() -> subprocess.CompletedProcess:
        return _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                     "-w", str(wheels), str(src)], cwd=src, env=clean, timeout=BUILD_TIMEOUT_S)

    python = env_dir / "bin" / "python"
    pip_env: dict[str, str] = {}

    def make_venv() -> subprocess.CompletedProcess:
        venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
        pip_env.update(clean, **_local_pip_env(python))
        # --no-compile: byte-compiling all of torch and transformers at install time is most of an install's
        # time; Python compiles what it imports anyway.
        return _run([str(python), "-m", "pip", "install", "-q", "--no-compile", _torch_requirement(),
                     *_declared_requirements()], env=pip_env, timeout=BUILD_TIMEOUT_S)

    with ThreadPoolExecutor(2) as pool:
        built, made = pool.submit(build_wheel), pool.submit(make_venv)
        _check(made.result(), "setting up the virtualenv (torch and the declared dependencies)")
        _check(built.result(), "pip wheel --no-build-isolation --no-deps")
    (wheel,) = wheels.glob("maskvl-*.whl")
    # The wheel's own metadata decides its dependencies: anything the pre-install missed comes in here.
    _check(_run([str(python), "-m", "pip", "install", "-q", "--no-compile", str(wheel)], env=pip_env,
                timeout=BUILD_TIMEOUT_S), "pip install maskvl-*.whl")
    yield {"bin": env_dir / "bin", "python": python, "seconds": time.monotonic() - started}
    # 1.5 GB: pytest keeps its last few temporary folders; the user's working directory stays for a look.
    shutil.rmtree(env_dir, ignore_errors=True)
    shutil.rmtree(src, ignore_errors=True)


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    """A user's working directory: the README's example image, a jobs file, and a Triton ``kernels/``."""
    d = tmp_path_factory.mktemp("project")
    (d / "kernels").mkdir()
    (d / "kernels" / "__init__.py").write_text('"""This project\'s own Triton kernels."""\nimport triton\n')
    (d / "examples").mkdir()
    shutil.copy2(ROOT / "examples" / "sample.png", d / "examples" / "sample.png")
    (d / "jobs.yaml").write_text(
        "model: builtin:tiny-qwen3-vl\n"
        "defaults: {mask_mode: both, num_tokens: 1}\n"
        "jobs:\n"
        f"  - {{name: picture, image: examples/sample.png, prompt: \"{PROMPT}\"}}\n"
        "  - {name: text-only, prompt: \"Explain rotary embeddings.\", layers: \"0-1\"}\n")
    return d


class User:
    """Runs commands the way a user's shell would: the virtualenv's bin first, nothing of this process's."""

    def __init__(self, env: dict, cwd: Path, home: Path) -> None:
        self.bin, self.python, self.cwd = env["bin"], env["python"], cwd
        drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TRITON_INTERPRET", "MASKVL_REQUIRE_BACKENDS")
        self.env = {k: v for k, v in os.environ.items() if k not in drop}
        self.env.update(PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(self.bin.parent),
                        MPLCONFIGDIR=str(home / "matplotlib"), HF_HOME=str(home / "hf"), HF_HUB_OFFLINE="1",
                        MASKVL_CACHE=str(home / "maskvl-cache"))

    def run(self, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return _run(list(args), cwd=self.cwd, env=self.env, timeout=timeout)

    def maskvl(self, *args: str) -> subprocess.CompletedProcess:
        return self.run(str(self.bin / "maskvl"), *args)


@pytest.fixture(scope="session")
def user(user_env, project, tmp_path_factory) -> User:
    return User(user_env, project, tmp_path_factory.mktemp("home"))


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    """Exit 0 and no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, no traceback, and one ``maskvl: error: ...`` line naming ``words`` last on stderr; returns it.

    Status lines before it (``loading ...``) are allowed; the error itself is one line.
    """
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    assert proc.returncode == 2 and lines and lines[-1].startswith("maskvl: error: ") and errors == lines[-1:], \
        f"exit {proc.returncode}\nstderr:\n{proc.stderr}"
    for word in words:
        assert word in lines[-1], lines[-1]
    return lines[-1]


def cpp_required() -> bool:
    """CI requires the compiled backends (``MASKVL_REQUIRE_BACKENDS``): the wheel must carry ``maskvl._C``."""
    return "cpp" in os.environ.get("MASKVL_REQUIRE_BACKENDS", "").split(",")


@pytest.fixture(scope="session")
def has_extension(user) -> bool:
    """Whether the installed wheel carries the C++ extension (setup.py leaves it out when it cannot build it)."""
    proc = user.run(str(user.python), "-c",
                    "import glob, os, maskvl; print(len(glob.glob(os.path.join(maskvl.__path__[0], '_C*.so'))))")
    assert_ok(proc)
    if proc.stdout.strip() == "0" and cpp_required():
        pytest.fail("the wheel has no maskvl._C and MASKVL_REQUIRE_BACKENDS requires cpp", pytrace=False)
    return proc.stdout.strip() != "0"


def test_environment_is_a_plain_install(user, user_env):
    """The virtualenv holds torch and the declared dependencies only."""
    probe = ("import importlib.util as u, json; "
             f"print(json.dumps({{n: u.find_spec(n) is not None for n in {list(NOT_DECLARED)!r}}}))")
    proc = user.run(str(user.python), "-c", probe)
    assert_ok(proc)
    assert proc.stdout.strip() == '{"triton": false, "pytest": false, "playwright": false}'
    print(f"user install set up in {user_env['seconds']:.0f} s")


def test_extension_imports_in_a_fresh_interpreter(user, has_extension):
    """``import maskvl._C`` with nothing imported before it: the module must find torch's libraries itself."""
    if not has_extension:
        pytest.skip("the wheel has no C++ extension (no compiler at build time)")
    assert_ok(user.run(str(user.python), "-c", "import maskvl._C"))


def test_version(user):
    proc = user.maskvl("--version")
    assert_ok(proc)
    assert proc.stdout.strip() == f"maskvl {maskvl.__version__}"


def test_info(user, has_extension):
    proc = user.maskvl("info")
    assert_ok(proc)
    rows = dict(re.split(r"\s{2,}", ln.strip(), maxsplit=1) for ln in proc.stdout.splitlines() if "  " in ln)
    assert rows["maskvl"] == maskvl.__version__
    assert rows["triton"] == "None"
    assert rows["cpu triton"].startswith("unavailable: ") and "triton" in rows["cpu triton"][len("unavailable: "):]
    if has_extension:
        assert (rows["cpu cpp"], rows["auto on cpu"]) == ("available", "cpp")
    else:
        assert rows["cpu cpp"].startswith("unavailable: ") and rows["auto on cpu"] == "reference"


@pytest.fixture(scope="session")
def swept(user) -> Path:
    """``maskvl sweep`` of the built-in model on the README's example image, with Logits."""
    out = user.cwd / "maskvl-out" / "sample.parquet"
    proc = user.maskvl("sweep", "--model", "builtin:tiny-qwen3-vl", "--image", "examples/sample.png",
                       "--prompt", PROMPT, "--mask-mode", "both", "--num-tokens", "2", "--logits",
                       "--output", str(out))
    assert_ok(proc)
    return out


def test_sweep(swept):
    table = pq.read_table(swept)
    assert table.num_rows > 0
    assert set(table.column("variant").to_pylist()) >= {"Full", "Attn", "Head_0", "Logits"}
    assert sorted(set(table.column("generation_step").to_pylist())) == [0, 1]


def test_sweep_on_triton_without_triton_is_one_line(user):
    proc = user.maskvl("sweep", "--model", "builtin:tiny-qwen3-vl", "--prompt", PROMPT, "--backend", "triton",
                       "--output", str(user.cwd / "maskvl-out" / "triton.parquet"))
    assert_one_line_error(proc, "triton")
    assert not (user.cwd / "maskvl-out" / "triton.parquet").exists()


def test_view(user, swept):
    page = swept.with_suffix(".html")
    proc = user.maskvl("view", str(swept), "-o", str(page))
    assert_ok(proc)
    html = page.read_text()
    assert "<html" in html.lower()
    assert len(html) > swept.stat().st_size  # data and image inside


def test_render(user, swept):
    png = swept.with_suffix(".png")
    proc = user.maskvl("render", str(swept), "-o", str(png))
    assert_ok(proc)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_batch(user):
    proc = user.maskvl("batch", "jobs.yaml", "--output-dir", "results")
    assert_ok(proc)
    assert "2 done, 0 skipped, 0 failed" in proc.stdout
    for name in ("picture", "text-only"):
        assert pq.read_metadata(user.cwd / "results" / f"{name}.parquet").num_rows > 0


def test_make_tiny_model(user):
    proc = user.maskvl("make-tiny-model", "tiny-model")
    assert_ok(proc)
    files = {p.name for p in (user.cwd / "tiny-model").iterdir()}
    assert {"config.json", "preprocessor_config.json", "tokenizer.json"} <= files
    assert any(name.endswith(".safetensors") for name in files)


def readme_python_example() -> str:
    """The README's Python example: its first ``python`` code block that calls ``maskvl.sweep``."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if "maskvl.sweep(" in b]
    assert found, "README.md has no ```python block calling maskvl.sweep"
    return found[0]


def test_readme_python_example(user):
    """The example, saved as a script in the working directory (beside ``kernels/``) and run there."""
    (user.cwd / "example.py").write_text(readme_python_example())
    proc = user.run(str(user.python), "example.py")
    assert_ok(proc)
