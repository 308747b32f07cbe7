# Quick start: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.maskvl-installed
TORCH  ?= torch==2.13.0

.PHONY: install build demo test test-fast browser bench clean compile-check gpu-check

$(STAMP): setup.py requirements-dev.txt $(wildcard csrc/*.cpp)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	# The CPU wheel of torch that lies on this machine; an unpinned torch would pull a CUDA build.
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	# A library built before the extension became maskvl._C_impl would shadow maskvl/_C.py.
	rm -f maskvl/_C.*.so
	# --no-build-isolation: the C++ extension must build against the torch installed above.
	$(BIN)/python -m pip install -q --no-build-isolation -e .
	touch $@

install: $(STAMP)

# Debian's chromium for the viewer's browser tests (never a browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "warning: could not install chromium; browser tests will be skipped"; \
	  else echo "warning: chromium missing and not root; browser tests will be skipped"; fi; }

demo: install
	$(BIN)/maskvl sweep --model builtin:tiny-qwen3-vl --image examples/sample.png \
	  --prompt "What is in this picture? Be brief." --mask-mode both --num-tokens 3 --logits \
	  --output maskvl-out/demo.parquet
	@if $(BIN)/maskvl view --help >/dev/null 2>&1; then \
	  $(BIN)/maskvl view maskvl-out/demo.parquet -o maskvl-out/demo.html; fi

# Every Triton kernel compiled ahead of time for sm_80 and sm_90 at real shapes, without a GPU; fails
# on a compile error, shared memory over the limit, spills on the bf16/fp32 paths, 32-bit address
# products (kernels/compile_check.py).
compile-check: install
	$(BIN)/python -m kernels.compile_check

# TRITON_INTERPRET=1 runs the Triton kernels on the CPU (it must be set before triton is imported);
# MASKVL_REQUIRE_BACKENDS turns "backend unavailable" skips into failures, so a broken build shows.
test: install browser compile-check
	TRITON_INTERPRET=1 MASKVL_REQUIRE_BACKENDS=cpp,triton $(BIN)/python -m pytest -q tests

# On a CUDA machine: the CUDA tests (compiled Triton kernels against the references, the engine against
# the naive oracle on CUDA, a second GPU when present), then the GPU benchmark preset. GPU_PYTHON is a
# Python whose torch has CUDA (and brings triton >= 3.5); the checkout is imported in place.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: torch ' + torch.__version__ + ' sees no CUDA device')"
	env -u TRITON_INTERPRET MASKVL_REQUIRE_BACKENDS=triton $(GPU_PYTHON) -m pytest -q -m cuda tests
	mkdir -p maskvl-out
	env -u TRITON_INTERPRET $(GPU_PYTHON) benchmarks/run.py --preset gpu --json maskvl-out/bench-gpu.json

bench: install
	$(BIN)/python benchmarks/run.py --device cpu --preset ci

clean:
	rm -rf build maskvl/_C*.so *.egg-info maskvl-out
