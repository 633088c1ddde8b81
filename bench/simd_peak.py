"""The machine's measured SIMD peak: fused multiply-adds per second in float32,
and exponentials per second of fastkd's own vector exponential.

A compute-bound kernel that is not a matrix product (RKD's angle term) has no
``torch.mm`` to compare with, and on some CPUs ``torch.mm`` itself is far
from the vector units' limit (MKL's code for AMD processors). So the peak is
measured directly: a tiny C++ loop, compiled here for this CPU
(``-march=native``), keeps ``CHAINS`` independent chains of vector FMAs
(``a = a · b + c`` on the widest vectors the compiler targets) busy on every
thread, long enough for the clock to settle. ``2 · lanes`` FLOP per FMA.

``simd_peak_gflops(threads)`` compiles once per process (through
``torch.utils.cpp_extension.load_inline``, into ``build/simd-peak``; about
20 s the first time, then cached) and returns the best of a few runs.

``exp2_rate(threads)`` is the same kind of loop around
``fastkd::divergence::fk_exp2_normaliser`` (``csrc/cpu/vec_math.h``, the
exponential of the dense divergences' normalising pass), compiled for the
SIMD variant fastkd runs here: a floor for a loss whose every element needs
a known number of exponentials (two for a softmax divergence), as the copy
bandwidth is one for its bytes. Each exponential is taken of the previous
result minus one (values stay in (0, 1]), so the loop also counts one
subtraction per exponential.
"""

from __future__ import annotations

import functools
import os
import time

import torch

CHAINS = 16  # enough independent FMAs to cover the latency of two pipes
ROUNDS = 3

_SOURCE = r"""
#include <chrono>
#include <cstdint>
#include <omp.h>

typedef float vfloat __attribute__((vector_size(64), aligned(64)));

// FLOP per second of `iterations` rounds of CHAINS independent vector FMAs
// on each of `threads` threads.
double fma_flops(int64_t threads, int64_t iterations) {
  constexpr int kChains = CHAINS_VALUE;
  constexpr int kLanes = sizeof(vfloat) / sizeof(float);
  double sink = 0;
  const auto start = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
  {
    vfloat acc[kChains];
    const float seed = 1.0f + 1e-7f * omp_get_thread_num();
    // Every loop over the chains is unrolled, so that each index is a constant
    // and the array can live in registers: GCC otherwise keeps it on the
    // stack, and every FMA waits on a store and a load (half the peak).
#pragma GCC unroll 16
    for (int c = 0; c < kChains; ++c) acc[c] = vfloat{} + (seed + float(c));
    const vfloat b = vfloat{} + 0.999999f, add = vfloat{} + 1e-7f;
    for (int64_t it = 0; it < iterations; ++it) {
#pragma GCC unroll 16
      for (int c = 0; c < kChains; ++c) {
        acc[c] = acc[c] * b + add;
        // an opaque use of every chain ("v": any vector register), so that the
        // loop is not folded
        asm volatile("" : "+v"(acc[c]));
      }
    }
    // the chains summed as vectors first: a lane subscript of each chain would
    // keep the whole array addressable, on the stack
    vfloat total = acc[0];
#pragma GCC unroll 16
    for (int c = 1; c < kChains; ++c) total += acc[c];
    for (int l = 0; l < kLanes; ++l) sink += total[l];
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double flop = 2.0 * kLanes * kChains * double(iterations) * double(threads);
  return sink == 12345.0 ? 0.0 : flop / seconds;  // sink used: the work is not dead code
}
"""


# fastkd's SIMD variant → the compiler flags and macros setup.py builds it with
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mlzcnt"],
    "DEFAULT": [],
}

_EXP_SOURCE = r"""
#include <chrono>
#include <cstdint>
#include <omp.h>

#include "vec_math.h"

// Exponentials per second of `iterations` rounds of CHAINS independent
// fk_exp2_normaliser vectors on each of `threads` threads.
double exp2_rate(int64_t threads, int64_t iterations) {
  using fastkd::divergence::Vec;
  constexpr int kChains = CHAINS_VALUE;
  constexpr int kLanes = Vec<float>::size();
  double sink = 0;
  const auto start = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
  {
    Vec<float> acc[kChains];
    for (int c = 0; c < kChains; ++c) acc[c] = Vec<float>(-0.5f - 0.01f * c - 1e-4f * omp_get_thread_num());
    const Vec<float> one(1.0f);
    for (int64_t it = 0; it < iterations; ++it) {
#pragma GCC unroll 16
      for (int c = 0; c < kChains; ++c) acc[c] = fastkd::divergence::fk_exp2_normaliser(acc[c] - one);
    }
    float lanes[kLanes];
    for (int c = 0; c < kChains; ++c) {
      acc[c].store(lanes);
      for (int l = 0; l < kLanes; ++l) sink += lanes[l];
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double exponentials = double(kLanes) * kChains * double(iterations) * double(threads);
  return sink == 12345.0 ? 0.0 : exponentials / seconds;  // sink used: the work is not dead code
}
"""


def _build_directory(name: str) -> str:
    build = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", name)
    os.makedirs(build, exist_ok=True)
    return build


@functools.cache
def _exp_module():
    from torch.utils.cpp_extension import load_inline

    from fastkd import _ops

    capability = _ops._C.cpu_capability().upper()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return load_inline(
        name=f"fastkd_bench_exp2_rate_{capability.lower()}",
        cpp_sources=_EXP_SOURCE.replace("CHAINS_VALUE", str(CHAINS)),
        functions=["exp2_rate"],
        extra_cflags=[
            "-O2", "-fopenmp", *_CAPABILITY_FLAGS[capability],
            f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}",
        ],
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[os.path.join(root, "csrc", "cpu")],
        build_directory=_build_directory(f"exp2-rate-{capability.lower()}"),
        verbose=False,
    )


def _best_rate(run, seconds: float) -> float:
    """Best of ``ROUNDS`` runs of ``run(iterations)``, sized to about ``seconds`` each."""
    iterations = 1 << 14
    started = time.perf_counter()
    run(iterations)
    elapsed = time.perf_counter() - started
    iterations = max(iterations, int(iterations * seconds / max(elapsed, 1e-6)))
    return max(run(iterations) for _ in range(ROUNDS))


def exp2_rate(threads: int | None = None, seconds: float = 0.3) -> float:
    """Best of ``ROUNDS`` runs of about ``seconds`` each: float32 exponentials
    per second of fastkd's ``fk_exp2_normaliser`` on ``threads`` threads
    (default torch's), independent vectors, one subtraction each."""
    threads = threads or torch.get_num_threads()
    module = _exp_module()
    return _best_rate(lambda iterations: module.exp2_rate(threads, iterations), seconds)


# The columns add_exp_floor fills, and their report-table entries.
EXP_FLOOR_COLUMNS = ("exp2_per_s", "exp_floor_ms", "x_exp_floor")
EXP_FLOOR_TABLE_METRICS = (("exp_floor_ms", "exp floor ms", ".1f"), ("x_exp_floor", "× exp floor", ".1f"))


@functools.cache
def _sweep_exp2_rate(threads: int) -> float:
    """exp2_rate at ``threads``, measured once per process (per sweep)."""
    return exp2_rate(threads)


def add_exp_floor(rows: list[dict], transcendentals: float) -> None:
    """The exp floor of one configuration's rows: ``transcendentals`` (the
    least number of exponentials and logarithms the loss needs) at the
    ``exp2_rate`` of the current thread count, as ``exp_floor_ms``, and each
    row's ``x_exp_floor`` (its median over that); ``exp2_per_s`` the rate."""
    rate = _sweep_exp2_rate(torch.get_num_threads())
    floor_ms = transcendentals / rate * 1e3
    for row in rows:
        row["exp2_per_s"] = rate
        row["exp_floor_ms"] = floor_ms
        if row.get("median_ms") is not None:
            row["x_exp_floor"] = row["median_ms"] / floor_ms


@functools.cache
def _module():
    from torch.utils.cpp_extension import load_inline

    return load_inline(
        name="fastkd_bench_simd_peak",
        cpp_sources=_SOURCE.replace("CHAINS_VALUE", str(CHAINS)),
        functions=["fma_flops"],
        extra_cflags=["-O2", "-march=native", "-ffp-contract=fast", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=_build_directory("simd-peak"),
        verbose=False,
    )


def simd_peak_gflops(threads: int | None = None, seconds: float = 0.3) -> float:
    """Best of ``ROUNDS`` runs of about ``seconds`` each: float32 GFLOP/s of
    independent vector FMAs on ``threads`` threads (default torch's)."""
    threads = threads or torch.get_num_threads()
    module = _module()
    return _best_rate(lambda iterations: module.fma_flops(threads, iterations), seconds) / 1e9

