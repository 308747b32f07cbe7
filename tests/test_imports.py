"""Imports that must work from a source checkout: the top-level ``kernels/`` folder is a leaf that does
not break other packages with or without triton, ``maskvl._C`` loads in a fresh interpreter, and the
``maskvl`` package has no import cycle."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from maskvl.ops.testing import required_backends

ROOT = Path(__file__).resolve().parent.parent

# As if triton were not installed: importlib.util.find_spec("triton") is None (transformers and torch
# then treat it as absent, with no metadata lookup) and `import triton` raises ImportError.
BLOCK_TRITON = 'import sys\nsys.modules["triton"] = None\n'


def _run(args: list[str], block_triton: bool, tmp_path: Path) -> subprocess.CompletedProcess:
    """``python *args`` from the repository root in a fresh process (triton blocked via sitecustomize)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    if block_triton:
        block = tmp_path / "block-triton"
        block.mkdir(exist_ok=True)
        (block / "sitecustomize.py").write_text(BLOCK_TRITON)
        env["PYTHONPATH"] = str(block)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_the_triton_block_blocks(tmp_path):
    """The blocked environment really has no triton (else the tests below would prove nothing)."""
    probe = "import importlib.util; assert importlib.util.find_spec('triton') is None; import triton"
    res = _run(["-c", probe], True, tmp_path)
    assert res.returncode != 0 and "ModuleNotFoundError: import of triton halted" in res.stderr, res.stderr
    assert _run(["-c", "import triton"], False, tmp_path).returncode == 0


@pytest.mark.parametrize("block_triton", [True, False], ids=["without-triton", "with-triton"])
def test_transformers_model_class_imports_from_the_root(tmp_path, block_triton):
    """transformers probes for a package named `kernels` (Hugging Face's kernel hub) and imports the
    one it finds: from the root, that is this repository's kernels/ folder."""
    code = ("from transformers import Qwen3VLForConditionalGeneration; import sys; "
            "print('kernels' in sys.modules, 'triton' in sys.modules and sys.modules['triton'] is not None)")
    res = _run(["-c", code], block_triton, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    probed, triton_loaded = res.stdout.split()
    assert probed == "True"  # the folder was imported by the probe: the test exercises it
    if block_triton:
        assert triton_loaded == "False"


@pytest.mark.parametrize("block_triton", [True, False], ids=["without-triton", "with-triton"])
def test_benchmarks_help_from_the_root(tmp_path, block_triton):
    res = _run(["benchmarks/run.py", "--help"], block_triton, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--preset" in res.stdout


def test_kernels_package_imports_nothing(tmp_path):
    """`import kernels` loads no triton, no torch and no maskvl (transformers' probe imports it)."""
    code = "import sys, kernels; print(sorted(m for m in ('triton', 'torch', 'maskvl') if sys.modules.get(m)))"
    res = _run(["-c", code], True, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_kernels_import_nothing_from_maskvl():
    files = sorted((ROOT / "kernels").glob("*.py"))
    assert len(files) >= 6
    for f in files:
        bad = [n for n in _imports(f) if n == "maskvl" or n.startswith("maskvl.")]
        assert not bad, f"{f.name} imports {bad}"


def test_import_maskvl_C_in_a_fresh_interpreter(tmp_path):
    """`import maskvl._C` first thing in a process: the compiled library needs torch's shared libraries,
    which maskvl/_C.py loads by importing torch first; the ops are callable right after."""
    if not list((ROOT / "maskvl").glob("_C_impl*")):
        if "cpp" in required_backends():
            pytest.fail("maskvl._C_impl is not built (MASKVL_REQUIRE_BACKENDS names cpp)")
        pytest.skip("the C++ extension is not built in this checkout")
    code = ("import maskvl._C, torch; "
            "print(torch.ops.maskvl.vector_distances(torch.ones(3), torch.ones(2, 3))[0].tolist())")
    res = _run(["-c", code], False, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    values = [float(x) for x in res.stdout.strip().strip("[]").split(",")]
    assert values == pytest.approx([3 ** 0.5] * 2, rel=1e-6)


def _module_graph(package: Path) -> dict[str, set[str]]:
    """Module-level imports between the modules of ``package`` (imports inside functions are lazy)."""
    mods: dict[str, Path] = {}
    for p in package.rglob("*.py"):
        parts = list(p.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                base = pkg[:len(pkg) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                deps.update(subs)
                if len(subs) < len(node.names) and target in mods:
                    deps.add(target)  # names defined in the module itself
        graph[name] = deps - {name}
    return graph


def test_maskvl_has_no_import_cycle():
    graph = _module_graph(ROOT / "maskvl")
    assert "maskvl.ops.backends" in graph and "maskvl.numerics" in graph["maskvl.ops.loo_attention"]
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(u: str) -> None:
        state[u] = 1
        path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(v):] + [v]))
            if not state.get(v):
                visit(v)
        path.pop()
        state[u] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m)
