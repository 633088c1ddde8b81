"""The measured SIMD peak and exponential rate (bench/simd_peak.py): compiled
here, positive, and growing with the thread count on a machine with two cores
or more, and not below what a matrix product achieves."""

import os
import time

import torch

from bench.simd_peak import exp2_rate, simd_peak_gflops


def test_simd_peak_is_positive_and_scales_with_threads():
    one = simd_peak_gflops(1, seconds=0.05)
    assert one > 1.0
    if (os.cpu_count() or 1) >= 2:
        assert simd_peak_gflops(2, seconds=0.05) > 1.3 * one


def test_exp2_rate_is_positive_and_scales_with_threads():
    one = exp2_rate(1, seconds=0.05)
    assert one > 1e8
    if (os.cpu_count() or 1) >= 2:
        assert exp2_rate(2, seconds=0.05) > 1.3 * one


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
