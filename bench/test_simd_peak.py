"""The measured SIMD peak and exponential rate (bench/simd_peak.py): compiled
here, positive, busy on every thread asked for on a machine with two cores or
more, and not below what a matrix product achieves."""

import os
import time

import torch

from bench.simd_peak import exp2_rate, simd_peak_gflops


def busy_threads(measure) -> float:
    """CPU seconds per wall second while ``measure()`` runs: about the number of
    threads that ran it at once, whatever speed the machine's cores give today
    (another tenant's load slows them; it does not stop them)."""
    cpu, wall = time.process_time(), time.perf_counter()
    measure()
    return (time.process_time() - cpu) / (time.perf_counter() - wall)


def test_simd_peak_is_positive_and_runs_on_every_thread():
    assert simd_peak_gflops(1, seconds=0.05) > 1.0
    if (os.cpu_count() or 1) >= 2:
        assert busy_threads(lambda: simd_peak_gflops(2, seconds=0.05)) > 1.5


def test_exp2_rate_is_positive_and_runs_on_every_thread():
    assert exp2_rate(1, seconds=0.05) > 1e8
    if (os.cpu_count() or 1) >= 2:
        assert busy_threads(lambda: exp2_rate(2, seconds=0.05)) > 1.5


def test_simd_peak_is_not_below_a_matrix_product():
    """A float32 matrix product is FMAs: no library runs them faster than the
    vector units can, so a "peak" below torch.mm's rate is a wrong peak (a loop
    that waits on something besides its FMAs, as one keeping its chains on the
    stack does)."""
    size = 1024
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.mm(a, b, out=out)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    mm_gflops = 2 * size**3 / best / 1e9
    assert simd_peak_gflops(1, seconds=0.05) >= mm_gflops
