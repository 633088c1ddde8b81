#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one command that fits a 15-minute
# GPU window (no network, installs nothing outside the build folder). Stages,
# each under its own time limit and with its own log; a failing or timed-out
# stage does not stop the next ones:
#
#   1 build   versions (nvidia-smi, torch, triton, nvcc), collected while the
#             extension builds for this GPU's arch only (torch's
#             get_device_capability), ninja with MAX_JOBS = nproc   (≤ 180 s)
#   2 smoke   bench/gpu_smoke.py smoke: every public loss family once per
#             GPU backend (cuda, then triton) against the float64 reference, one
#             verdict line each                                      (≤ 120 s)
#   3 tests   the tests that run a GPU kernel (ids naming the triton or cuda
#             backend; never tests/test_compile_targets.py), not slow, not
#             examples, FASTKD_TEST_DEVICE=cuda, --maxfail, junit XML (≤ 150 s)
#   4 sync    bench/gpu_smoke.py sync: the divergence, top-k, mixture and
#             fused-linear paths without labels/mask, DKD, RKD, PKT/SP/CC,
#             forward + backward under
#             torch.cuda.set_sync_debug_mode("error")                 (≤ 45 s)
#   5 bench   KL and JSD at 16384 × 131072 bf16 through bench/run.py's
#             divergence family, with Liger-Kernel when its wheel is carried
#             (.whl/ or build/wheels/liger_kernel-*.whl)    (what is left ≤ 150 s)
#
# The stages share a deadline (GPU_CHECK_BUDGET_S, default 540 s = 9 min):
# a stage's limit is cut to what is left, and a stage with under 10 s left is
# SKIPPED. Outputs in $OUT (5 files; the GPU runner returns at most 8):
#   gpu_check.log    everything printed, the stage summary last
#   pytest.xml       junit report of stage 3
#   smoke.csv        stage 2's verdicts      sync_check.csv  stage 4's verdicts
#   bench.tar.gz     stage 5's CSV + PNG (bench/kl, bench/jsd), each stage's
#                    own log (logs/<stage>.log) and versions.txt
# Exit status 1 if any stage failed, timed out or was skipped.
#
#   bench/gpu_check.sh                    (from any directory)
#   GPU_CHECK_DRY_RUN=1 bench/gpu_check.sh   (or: make gpu-check-dry-run)
#
# Dry run (GPU_CHECK_DRY_RUN=1): the same stages on the CPU, to test this
# script's plumbing where there is no GPU (CI): the CPU extension only
# (built when older than its sources), the Triton interpreter
# (TRITON_INTERPRET=1) on CPU tensors, the cpu and triton backends, tiny
# shapes, two tests, the sync check SKIPPED with a verdict line saying why.
#
# Environment (all optional):
#   OUT                   output folder   (default bench/results/gpu; dry run:
#                                          build/gpu_check_dry_run)
#   PYTHON                interpreter with torch and triton   (default python3)
#   GPU_CHECK_WORK        folder of the stage logs and benchmark outputs before
#                         they are packed            (default build/gpu_check)
#   FASTKD_CUDA_ARCH_LIST arch to build          (default: this GPU's, else 9.0)
#   MAX_JOBS              parallel compile jobs              (default: nproc)
#   GPU_CHECK_BUDGET_S    deadline for all stages, s (default 540; dry run 1500)
#   GPU_CHECK_TEST_WORKERS  pytest-xdist workers for stage 3 when xdist is
#                         installed (default 8; 0: no xdist)
#   GPU_CHECK_BENCH_COMPILE=1  also time torch.compile in stage 5 (a cold
#                         compile costs ~30 s per divergence)
set -uo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
ROOT="$(cd "$(dirname "$SELF")/.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-python3}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
[[ "$DRY" == 1 ]] || DRY=0
WORK="${GPU_CHECK_WORK:-$ROOT/build/gpu_check}"
if ((DRY)); then
  DEFAULT_OUT="$ROOT/build/gpu_check_dry_run"
  DEVICE=cpu
else
  DEFAULT_OUT="$ROOT/bench/results/gpu"
  DEVICE=cuda
fi

# ---- stage bodies (run as `gpu_check.sh __stage NAME`, under timeout) -------

stage_versions() {
  echo "python: $(command -v "$PY")"
  timeout 30 nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  timeout 90 "$PY" - <<'EOF' 2>&1
import importlib, importlib.util, platform
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
for name in ("triton", "pytest", "xdist", "pytest_timeout", "pytest_benchmark", "hypothesis", "numpy",
             "rich", "matplotlib", "ninja", "liger_kernel"):
    version = "missing"
    if importlib.util.find_spec(name) is not None:
        try:
            version = getattr(importlib.import_module(name), "__version__", "present")
        except Exception as exc:  # noqa: BLE001
            version = f"import fails: {exc}"
    print(f"{name:17s} {version}")
EOF
  { timeout 30 nvcc --version | tail -n 2; } 2>&1 || echo "nvcc: not available"
  { timeout 30 "${CXX:-c++}" --version | head -n 1; } 2>&1
  echo "cores: $(nproc)"
}

stage_build() {
  local jobs="${MAX_JOBS:-$(nproc)}" ninja_dir
  # torch's extension builder uses ninja only when `ninja` is on PATH: the
  # ninja wheel's binary, if the interpreter has one.
  ninja_dir="$("$PY" -c 'import ninja; print(ninja.BIN_DIR)' 2>/dev/null)" && export PATH="$ninja_dir:$PATH"
  echo "ninja: $(command -v ninja || echo 'not found: one compile at a time')"
  if ((DRY)); then
    # The CPU extension only, rebuilt when a source is newer than it.
    local so newer
    so="$(ls fastkd/_C.*.so 2>/dev/null | head -n 1)"
    newer="$( [[ -n "$so" ]] && find csrc setup.py -newer "$so" -type f | head -n 1)"
    if [[ -n "$so" && -z "$newer" ]]; then
      echo "dry run: $so is newer than every source in csrc/ and setup.py: no build"
    else
      env FASTKD_SKIP_CUDA=1 MAX_JOBS="$jobs" \
        "$PY" setup.py build_ext --inplace || return
    fi
  else
    local arch="${FASTKD_CUDA_ARCH_LIST:-}"
    if [[ -z "$arch" ]]; then
      arch="$(timeout 60 "$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' \
        2>/dev/null)" || arch=""
    fi
    arch="${arch:-9.0}"
    echo "building fastkd._C and fastkd._C_cuda for arch $arch with MAX_JOBS=$jobs"
    # setup.py sets TORCH_CUDA_ARCH_LIST from FASTKD_CUDA_ARCH_LIST.
    env -u TORCH_CUDA_ARCH_LIST FASTKD_CUDA_ARCH_LIST="$arch" MAX_JOBS="$jobs" \
      "$PY" setup.py build_ext --inplace || return
  fi
  "$PY" - "$DEVICE" <<'EOF'
import sys
import fastkd
import fastkd.kernels  # noqa: F401 - the Triton launchers import
from fastkd import _ops
for name, status in fastkd.backends().items():
    print(f"backend {name:10s} {'available' if status.available else 'UNAVAILABLE'}: {status.reason}")
if sys.argv[1] == "cuda":
    assert _ops.has_kernel("divergence_forward", "CUDA"), f"no CUDA kernel registered: {_ops.CUDA_EXTENSION_ERROR}"
else:
    assert fastkd.backends()["cpu"].available, "the CPU extension does not load"
EOF
}

stage_smoke() {
  local args=(smoke --device "$DEVICE" --csv "$OUTDIR/smoke.csv")
  ((DRY)) && args+=(--tiny)
  "$PY" bench/gpu_smoke.py "${args[@]}"
}

stage_tests() {
  local paths=() select="triton or cuda" workers="${GPU_CHECK_TEST_WORKERS:-8}" file
  # The LLM-distillation families first (divergence, top-k, mixture, fused
  # linear, hard labels), then the other files: a run cut short by its limit
  # has checked those. Named one by one, as pytest keeps that order.
  shopt -s nullglob
  for file in tests/test_divergence*.py tests/test_topk*.py tests/test_mixture*.py \
              tests/test_multi_teacher*.py tests/test_fused_linear*.py tests/test_hard_labels.py tests/test_*.py; do
    [[ " ${paths[*]} " == *" $file "* || "$file" == tests/test_compile_targets.py ]] || paths+=("$file")
  done
  shopt -u nullglob
  if ((DRY)); then
    # two interpreter tests: the stage's plumbing, not the suite
    paths=(tests/test_hard_labels.py)
    select="(triton or cuda) and (test_no_kept_rows or test_return_parts)"
    workers=0
  fi
  # Only the tests that run a GPU kernel: their ids name the triton or cuda
  # backend. The compile checks (CPU work, `make check`) are left out twice:
  # they are `slow`, and their file is ignored. No -x: one failing kernel must
  # not hide the state of the others; --maxfail bounds a broken build's log;
  # a test file that fails to import does not stop the others.
  local args=(-q -m "not slow and not examples" -k "$select" --ignore=tests/test_compile_targets.py
              --maxfail=25 --continue-on-collection-errors --junitxml="$OUTDIR/pytest.xml"
              -p no:cacheprovider)
  # pyproject's addopts name a pytest-benchmark option; without the plugin, drop them.
  "$PY" -c 'import pytest_benchmark' >/dev/null 2>&1 || args+=(-o "addopts=-ra")
  # Several workers compile the Triton kernels side by side (16 cores, one GPU).
  if ((workers > 0)) && "$PY" -c 'import xdist' >/dev/null 2>&1; then
    args+=(-n "$workers")
  fi
  env FASTKD_TEST_DEVICE="$DEVICE" "$PY" -m pytest "${paths[@]}" "${args[@]}"
}

stage_sync() {
  local args=(sync --device "$DEVICE" --csv "$OUTDIR/sync_check.csv")
  ((DRY)) && args+=(--tiny)
  "$PY" bench/gpu_smoke.py "${args[@]}"
}

stage_bench() {
  local wheel
  # No network on the GPU machine: Liger-Kernel only from a carried wheel,
  # installed into the build folder, not into the interpreter's site-packages.
  wheel="$(ls .whl/liger_kernel-*.whl build/wheels/liger_kernel-*.whl 2>/dev/null | head -n 1)"
  if [[ -n "$wheel" ]]; then
    "$PY" -m pip install --quiet --no-deps --no-index --target "$WORK/pydeps" "$wheel" \
      && export PYTHONPATH="$WORK/pydeps${PYTHONPATH:+:$PYTHONPATH}" \
      && echo "Liger-Kernel from $wheel"
  else
    echo "no .whl/ or build/wheels/liger_kernel-*.whl: the benchmark skips Liger-Kernel"
  fi
  local shape=16384x131072 dtype=bf16
  ((DRY)) && shape=32x2048
  # fewer, larger segments: the 4 GiB logits and the eager reference's temporaries fit better
  export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
  "$PY" - "$DEVICE" "$shape" "$dtype" "$WORK/bench" "${GPU_CHECK_BENCH_COMPILE:-0}" <<'EOF'
"""bench.run's divergence family on one shape and dtype, once per divergence (kl, jsd),
each into its own folder; one divergence failing does not stop the other (a provider
that runs out of GPU memory is a row with a note, not the end of the sweep)."""
import sys
import traceback
from pathlib import Path

import torch

from bench import run

device, shape, dtype, out, use_compile = sys.argv[1:]
failed = []
for divergence in ("kl", "jsd"):
    folder = Path(out) / divergence
    folder.mkdir(parents=True, exist_ok=True)
    argv = ["--device", device, "--families", "divergence", "--divergence", divergence,
            "--divergence-shapes", shape, "--divergence-dtypes", dtype, "--out", str(folder)]
    if use_compile != "1":
        argv.append("--no-compile")
    print(f"=== bench {divergence} {shape} {dtype} on {device}: python -m bench.run {' '.join(argv)}", flush=True)
    try:
        run.main(argv)
    except BaseException:  # noqa: BLE001 - report, then the next divergence
        traceback.print_exc()
        failed.append(divergence)
    if device == "cuda":
        torch.cuda.empty_cache()
sys.exit(f"bench failed for {', '.join(failed)}" if failed else 0)
EOF
}

if [[ "${1:-}" == "__stage" ]]; then
  OUTDIR="$2"
  shift 2
  "stage_$1"
  exit
fi

# ---- driver -----------------------------------------------------------------

OUTDIR="${OUT:-$DEFAULT_OUT}"
mkdir -p "$OUTDIR" && OUTDIR="$(cd "$OUTDIR" && pwd)" || exit 1
rm -f "$OUTDIR"/{gpu_check.log,pytest.xml,smoke.csv,sync_check.csv,bench.tar.gz}
rm -rf "$WORK/bench" "$WORK/logs"
mkdir -p "$WORK/bench" "$WORK/logs"
LOG="$OUTDIR/gpu_check.log"
: >"$LOG"
if ((DRY)); then
  BUDGET=${GPU_CHECK_BUDGET_S:-1500}
  # Triton kernels interpreted on CPU tensors.
  export TRITON_INTERPRET=1
else
  BUDGET=${GPU_CHECK_BUDGET_S:-540}
  # Compiled kernels only (the interpreter is for CPU-only machines).
  unset TRITON_INTERPRET
fi
DEADLINE=$((SECONDS + BUDGET))
export GPU_CHECK_DRY_RUN="$DRY" PYTHON="$PY"
# Unbuffered, so that the log has everything up to a timeout.
export PYTHONUNBUFFERED=1
# The torch.compile / Triton caches inside the ignored build folder.
export TORCHINDUCTOR_CACHE_DIR="$ROOT/build/inductor-cache"
export TRITON_CACHE_DIR="$ROOT/build/triton-cache"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

SUMMARY=()
FAILED=0

say() { echo "$*" | tee -a "$LOG"; }

# run_stage NAME LIMIT_S: run stage_NAME under timeout (capped by the
# deadline), its output to logs/NAME.log and the main log; record its status.
run_stage() {
  local name=$1 limit=$2 left rc status start=$SECONDS
  left=$((DEADLINE - SECONDS))
  ((limit > left)) && limit=$left
  say ""
  say "=== $name (limit ${limit}s)"
  if ((limit < 10)); then
    status="SKIPPED (no time left before the deadline)"
    rc=1
  else
    # SIGINT first: pytest and Python print where they were (pytest its
    # summary and its junit report); SIGKILL 10 s later.
    timeout --signal=INT --kill-after=10 "$limit" bash "$SELF" __stage "$OUTDIR" "$name" 2>&1 \
      | tee "$WORK/logs/$name.log" | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    case $rc in
      0) status="ok" ;;
      124 | 137) status="TIMEOUT after ${limit}s" ;;
      *) status="FAILED (exit $rc)" ;;
    esac
  fi
  ((rc == 0)) || FAILED=1
  SUMMARY+=("$(printf 'STAGE %-6s %-44s %4ds' "$name" "$status" $((SECONDS - start)))")
}

COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo '?')"
say "fastkd gpu_check$( ((DRY)) && echo ' DRY RUN (cpu, Triton interpreter)'): $(date -u '+%Y-%m-%d %H:%M:%S UTC')" \
  "on $(uname -n), commit $COMMIT$(git diff --quiet HEAD 2>/dev/null || echo ' + local changes')"
say "output: $OUTDIR; work folder: $WORK; deadline in $((DEADLINE - SECONDS)) s"

# An in-place build does not apply pyproject's package-dir mapping
# (fastkd.kernels is kernels/): link it for this run when nothing provides it.
LINKED_KERNELS=0
trap '((LINKED_KERNELS)) && rm -f "$ROOT/fastkd/kernels"' EXIT
if [[ ! -e fastkd/kernels ]] && ! "$PY" -c 'import fastkd.kernels' >/dev/null 2>&1; then
  ln -s ../kernels fastkd/kernels && LINKED_KERNELS=1
  say "linked fastkd/kernels -> ../kernels for this run (removed at exit)"
fi

# 1: versions beside the build; their output joins the log after it.
bash "$SELF" __stage "$OUTDIR" versions >"$WORK/logs/versions.txt" 2>&1 &
VERSIONS_PID=$!
run_stage build 180
wait "$VERSIONS_PID"
say ""
say "=== versions"
tee -a "$LOG" <"$WORK/logs/versions.txt"
# 2-5
run_stage smoke 120
run_stage tests 150
run_stage sync 45
run_stage bench 150

say ""
say "=== packing the benchmark outputs and the stage logs"
tar -czf "$OUTDIR/bench.tar.gz" -C "$WORK" bench logs 2>&1 | tee -a "$LOG"
((PIPESTATUS[0] == 0)) || FAILED=1

say ""
say "=== summary: $SECONDS s of a ${BUDGET} s budget; in $OUTDIR: $(cd "$OUTDIR" && ls | tr '\n' ' ')"
grep -h '^\(SMOKE\|SYNC\) SUMMARY' "$WORK/logs/smoke.log" "$WORK/logs/sync.log" 2>/dev/null | tee -a "$LOG"
for line in "${SUMMARY[@]}"; do say "$line"; done
say "GPU_CHECK $( ((FAILED)) && echo FAILED || echo PASSED)"
exit "$FAILED"
