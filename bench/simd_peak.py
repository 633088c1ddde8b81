"""The machine's measured SIMD peak: fused multiply-adds per second in float32.

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
    for (int c = 0; c < kChains; ++c) acc[c] = vfloat{} + (seed + float(c));
    const vfloat b = vfloat{} + 0.999999f, add = vfloat{} + 1e-7f;
    for (int64_t it = 0; it < iterations; ++it) {
#pragma GCC unroll 16
      for (int c = 0; c < kChains; ++c) acc[c] = acc[c] * b + add;
      // keeps the chains in registers and the loop from being folded
      asm volatile("" : "+x"(acc[0]), "+x"(acc[1]), "+x"(acc[2]), "+x"(acc[3]));
    }
    for (int c = 0; c < kChains; ++c)
      for (int l = 0; l < kLanes; ++l) sink += acc[c][l];
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double flop = 2.0 * kLanes * kChains * double(iterations) * double(threads);
  return sink == 12345.0 ? 0.0 : flop / seconds;  // sink used: the work is not dead code
}
"""


@functools.cache
def _module():
    from torch.utils.cpp_extension import load_inline

    build = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "simd-peak")
    os.makedirs(build, exist_ok=True)
    return load_inline(
        name="fastkd_bench_simd_peak",
        cpp_sources=_SOURCE.replace("CHAINS_VALUE", str(CHAINS)),
        functions=["fma_flops"],
        extra_cflags=["-O2", "-march=native", "-ffp-contract=fast", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=build,
        verbose=False,
    )


def simd_peak_gflops(threads: int | None = None, seconds: float = 0.3) -> float:
    """Best of ``ROUNDS`` runs of about ``seconds`` each: float32 GFLOP/s of
    independent vector FMAs on ``threads`` threads (default torch's)."""
    threads = threads or torch.get_num_threads()
    module = _module()
    iterations = 1 << 16
    started = time.perf_counter()
    module.fma_flops(threads, iterations)
    elapsed = time.perf_counter() - started
    iterations = max(iterations, int(iterations * seconds / max(elapsed, 1e-6)))
    return max(module.fma_flops(threads, iterations) for _ in range(ROUNDS)) / 1e9

