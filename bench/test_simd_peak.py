"""The measured SIMD peak and exponential rate (bench/simd_peak.py): compiled
here, positive, and growing with the thread count on a machine with two cores
or more."""

import os

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
