#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one command (no network, installs
# nothing): build the CUDA extension in place, run the test suite on CUDA
# tensors (triton and cuda backends), run the GPU benchmark.
#
#   bench/gpu_check.sh                    (from any directory)
#
# Writes gpu_check.log (everything printed), pytest.xml and the benchmark's
# CSV + PNG to $OUT, or to bench/results/ when OUT is unset. Every step runs
# under `timeout`, and the steps share a deadline, so the script ends within
# GPU_CHECK_BUDGET_S seconds (+ a few for the summary); a step still runs when
# an earlier one failed. The summary lists each step's status; the exit status
# is 1 if any step failed or timed out.
#
# Environment (all optional):
#   OUT                     output folder                      (default bench/results)
#   PYTHON                  interpreter with torch (CUDA), triton (default python3)
#   FASTKD_CUDA_ARCH_LIST   archs to build                     (default: this GPU's, else 9.0)
#   GPU_CHECK_BUDGET_S      deadline for all steps, seconds    (default 450)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="${OUT:-$ROOT/bench/results}"
mkdir -p "$OUTDIR" && OUTDIR="$(cd "$OUTDIR" && pwd)" || exit 1
cd "$ROOT" || exit 1
PY="${PYTHON:-python3}"
LOG="$OUTDIR/gpu_check.log"
: >"$LOG"
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-450}))

# Compiled kernels only (the interpreter is for CPU-only machines), and the
# torch.compile / Triton caches inside the ignored build folder.
unset TRITON_INTERPRET
# Unbuffered, so that the log has everything up to a timeout.
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="$ROOT/build/inductor-cache"
export TRITON_CACHE_DIR="$ROOT/build/triton-cache"

SUMMARY=()
FAILED=0

say() { echo "$*" | tee -a "$LOG"; }

# run_step NAME LIMIT_S COMMAND...: run under timeout (capped by the deadline),
# log its output, record its status.
run_step() {
  local name=$1 limit=$2 left rc status start=$SECONDS
  shift 2
  left=$((DEADLINE - SECONDS))
  ((limit > left)) && limit=$left
  say ""
  say "=== $name (limit ${limit}s): $*"
  if ((limit < 10)); then
    SUMMARY+=("$(printf '%-10s SKIPPED (no time left before the deadline)' "$name")")
    FAILED=1
    return
  fi
  # SIGINT first: pytest and Python print where they were (and pytest its summary).
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=$?
  case $rc in
    0) status="ok" ;;
    124 | 137) status="TIMEOUT after ${limit}s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  ((rc == 0)) || FAILED=1
  SUMMARY+=("$(printf '%-10s %-28s %4ds' "$name" "$status" $((SECONDS - start)))")
}

# ---- versions ---------------------------------------------------------------
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo '?')"
say "fastkd gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(uname -n), commit $COMMIT"
say "output: $OUTDIR"
timeout 30 nvidia-smi 2>&1 | tee -a "$LOG"
timeout 60 "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib.util, platform
import torch
print(f"python {platform.python_version()}  torch {torch.__version__}  torch CUDA {torch.version.cuda}"
      f"  cuDNN {torch.backends.cudnn.version()}  CXX11 ABI {torch._C._GLIBCXX_USE_CXX11_ABI}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}  sm_{p.major}{p.minor}  {p.total_memory / 2**30:.0f} GiB"
              f"  {p.multi_processor_count} SMs")
else:
    print("torch sees NO CUDA device")
for name in ("triton", "pytest", "pytest_benchmark", "hypothesis", "numpy", "rich", "matplotlib"):
    spec = importlib.util.find_spec(name)
    version = "missing"
    if spec is not None:
        try:
            version = getattr(importlib.import_module(name), "__version__", "present")
        except Exception as exc:  # noqa: BLE001
            version = f"import fails: {exc}"
    print(f"{name:17s} {version}")
EOF
{ timeout 30 nvcc --version | tail -n 2; timeout 30 "${CXX:-c++}" --version | head -n 1; } 2>&1 | tee -a "$LOG"

# ---- build ------------------------------------------------------------------
ARCH="${FASTKD_CUDA_ARCH_LIST:-$(timeout 60 "$PY" -c \
  'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)}"
ARCH="${ARCH:-9.0}"
# setup.py only fills TORCH_CUDA_ARCH_LIST when it is unset: unset it so that
# the arch chosen here is the one built.
# ninja (when on PATH) compiles the .cu files side by side, MAX_JOBS of them.
run_step build 150 env -u TORCH_CUDA_ARCH_LIST FASTKD_CUDA_ARCH_LIST="$ARCH" FASTKD_BUILD_JOBS=3 \
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py build_ext --inplace

# An in-place build does not apply pyproject's package-dir mapping
# (fastkd.kernels is kernels/): link it for this run when nothing provides it.
LINKED_KERNELS=0
trap '((LINKED_KERNELS)) && rm -f fastkd/kernels' EXIT
if [[ ! -e fastkd/kernels ]] && ! "$PY" -c 'import fastkd.kernels' >/dev/null 2>&1; then
  ln -s ../kernels fastkd/kernels && LINKED_KERNELS=1
  say "linked fastkd/kernels -> ../kernels for this run (removed at exit)"
fi

run_step backends 60 "$PY" -c '
import fastkd
from fastkd import _ops
for name, status in fastkd.backends().items():
    print(f"{name:10s} {status}")
assert _ops.has_kernel("divergence_forward", "CUDA"), f"no CUDA kernel registered: {_ops.CUDA_EXTENSION_ERROR}"
import fastkd.kernels
'

# ---- tests ------------------------------------------------------------------
# Only the tests that run a GPU kernel (their ids name the triton or cuda
# backend), without the `slow` compile checks (CPU work: `make check`) and the
# `examples` runs: the CPU-only rest runs in CI. No -x: one failing kernel
# must not hide the state of the others; --maxfail bounds a broken build's log.
PYTEST_ARGS=(-q -m "not slow and not examples" -k "triton or cuda" --maxfail=30
             --junitxml="$OUTDIR/pytest.xml")
# pyproject's addopts name a pytest-benchmark option; without the plugin, drop them.
"$PY" -c 'import pytest_benchmark' >/dev/null 2>&1 || PYTEST_ARGS+=(-o "addopts=-ra")
run_step tests 180 env FASTKD_TEST_DEVICE=cuda "$PY" -m pytest tests "${PYTEST_ARGS[@]}"

# ---- optional: Liger-Kernel, the benchmarks' GPU comparison ------------------
# No network here: from a local wheel only. On a machine with PyPI,
# `pip download liger-kernel --no-deps -d build/wheels`, then carry build/wheels
# (it is ignored by git) to this machine. Installed into build/pydeps, not
# into the interpreter's site-packages.
if compgen -G "build/wheels/liger_kernel-*.whl" >/dev/null; then
  run_step liger 60 "$PY" -m pip install --quiet --no-deps --no-index --target build/pydeps \
    build/wheels/liger_kernel-*.whl
  export PYTHONPATH="$ROOT/build/pydeps${PYTHONPATH:+:$PYTHONPATH}"
else
  say ""
  say "=== liger: no build/wheels/liger_kernel-*.whl; the benchmarks skip Liger-Kernel"
fi

# ---- benchmark --------------------------------------------------------------
run_step bench 150 "$PY" -m bench.run --device cuda --out "$OUTDIR"

# ---- summary ----------------------------------------------------------------
say ""
say "=== summary ($SECONDS s; log, pytest.xml, CSV and PNG in $OUTDIR)"
for line in "${SUMMARY[@]}"; do say "  $line"; done
exit "$FAILED"
