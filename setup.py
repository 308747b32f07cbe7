"""Build and install maskvl.

The C++ extension (``csrc/*.cpp``, compiled as ``maskvl._C_impl`` and imported as ``maskvl._C``, a
small module that imports torch first) is built with torch's cpp_extension when torch is importable
at build time; install with ``pip install --no-build-isolation .`` so the build sees the
torch you already have (an isolated build would pull a fresh, multi-GB torch). If torch is missing or
the compiler fails, maskvl installs without the extension and runs on its reference path
(``maskvl info`` says why). No network or pip calls happen here.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    ns: dict = {}
    with open(os.path.join(HERE, "maskvl", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                exec(line, ns)
    return ns["__version__"]


class BuildPyWithViewer(build_py):
    """Ship the static viewer (top-level viewer/) inside the package as maskvl/_viewer."""

    def run(self) -> None:
        super().run()
        import shutil

        src = os.path.join(HERE, "viewer")
        dst = os.path.join(self.build_lib, "maskvl", "_viewer")
        if os.path.isdir(src):
            shutil.copytree(src, dst, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("node_modules", "package-lock.json", "entry.js"))


ext_modules = []
cmdclass = {"build_py": BuildPyWithViewer}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if sources and os.environ.get("MASKVL_NO_EXT") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension

        ext_modules.append(
            CppExtension(
                # maskvl/_C.py imports torch (whose shared libraries this links against), then this.
                "maskvl._C_impl",
                sources,
                extra_compile_args={"cxx": ["-O3", "-std=c++17"]},
            )
        )
        cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=False)
    except Exception as exc:  # torch absent at build time: install the pure-Python package
        print(f"maskvl: not building the C++ extension ({exc})", file=sys.stderr)

setup(
    name="maskvl",
    version=_version(),
    description="Which input tokens a vision-language model uses, layer by layer, as it answers",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    # kernels/ installs as maskvl._kernels: a top-level "kernels" would collide with Hugging Face's package.
    packages=find_packages(include=["maskvl", "maskvl.*"]) + ["maskvl._kernels"],
    package_dir={"maskvl._kernels": "kernels"},
    install_requires=[
        # torch is not pinned here: GPU users bring their own build. Run so far: torch 2.13.0 (CPU) with
        # transformers 5.17.0 and 5.23.0. torch 2.11 is the lent GPU machines' version: admitted so the
        # package installs there without a network, not yet run (no GPU session so far).
        "torch>=2.11,<2.14",
        "transformers>=5.17,<5.24",
        "pillow>=10",
        "pyarrow>=15",
        "numpy>=1.26",
        "click>=8.1",
        "pyyaml>=6",
        "tqdm>=4.60",
        # Part of the product, not extras: `maskvl render` draws with matplotlib, and results are
        # pyarrow tables whose natural next step is `table.to_pandas()`.
        "matplotlib>=3.7",
        "pandas>=2",
    ],
    extras_require={
        # 3.5: the first Triton whose float64 tl.dot compiles for sm_80/sm_90 (kernels/_launch.py refuses
        # float64 on older ones); compile-checked with 3.9.
        "triton": ["triton>=3.5"],
        "test": ["pytest>=8", "playwright>=1.40", "triton>=3.5"],
    },
    entry_points={"console_scripts": ["maskvl=maskvl.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
