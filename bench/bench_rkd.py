"""Benchmark of the RKD losses: forward + backward of
``fastkd.rkd_distance`` and ``fastkd.rkd_angle`` on ``(N, D)`` student and
teacher embeddings, ``D = 128``, float32, the student requiring a gradient
(the teacher is a constant), ``loss.backward()`` with the default upstream
gradient of 1.

Providers:

- ``eager``: ``fastkd.reference.rkd_distance`` / ``rkd_angle``, RepDistiller's
  ``RKDLoss`` formulation in plain PyTorch: the distance term from the norms
  and ``X Xᵀ`` with a few ``N × N`` temporaries; the angle term materialising
  the ``(N, N, D)`` normalised differences and the ``(N, N, N)`` angles of
  each side (and their gradients).
- ``compile``: ``torch.compile`` of the same function (``fullgraph=True,
  dynamic=False``), compiled (or loaded from ``TORCHINDUCTOR_CACHE_DIR``) in
  an untimed first call. ``--no-compile`` skips it.
- ``fastkd-cpu``: ``fastkd.rkd_distance`` / ``rkd_angle`` with
  ``backend="cpu"``: Gram matrices, O(N²) memory, the gradient computed in
  the same pass (csrc/cpu/rkd.cpp). On CUDA ``fastkd-triton`` and
  ``fastkd-cuda`` (the same Gram formulation, kernels/rkd.py and
  csrc/cuda/rkd.cu). Each provider takes the term (``"distance"`` or
  ``"angle"``) as its third argument (:class:`bench.family.EmbeddingTermsFamily`).

``eager`` and ``compile`` run the angle term only up to ``N = EAGER_ANGLE_MAX_N``
(640): it holds several ``N³`` float32 tensors (at ``N = 512`` about 0.5 GiB
each) and the ``N² D`` differences; at ``N = 1024`` that is tens of GiB.

The ``dtype`` column names the term and the dtype (``angle fp32``), so that
the plot draws one line per provider and term. No floor: both terms are
compute-bound (the angle ``O(N³)``, the distance's Gram products
``O(N² D)``); ``traffic_bytes`` is left empty. ``model_gflop`` counts the
angle's ``N³`` terms at ~40 FLOP each (forward and gradient, both sides)
and the distance's three ``N² D`` products (``2 N² D`` each: both Grams and
the gradient ``C X``), as a size scale rather than a hardware rate.

The angle term against the machine: ``simd_peak_gflops`` is the float32
FMA rate of this machine's vector units measured in the same run
(:mod:`bench.simd_peak`, at the run's thread count), and for the CPU kernel
``kernel_gflops`` is the arithmetic its lane loop executes per second:
``ANGLE_KERNEL_FLOP_PER_PAIR`` (29: 17 for the angle and its smooth-L1, 12 for
the gradient sums, an FMA counted as 2) for each of its ``N (N − 1)² / 2``
lane terms (anchor i, row j ≠ i, column k > j), over the measured time of the whole call
(the O(N²·D) parts included). ``x_simd_peak`` is their ratio. Per 16 lanes
the loop issues 12 multiplies and FMAs and 9 other vector operations
(adds, maxima and minima, one and), so with the adds on their own pipes the
arithmetic alone would let the loop pass the FMA peak
(``x_simd_peak`` above 1); well below 1, it is bound by something other than
its arithmetic: per 16 lanes it also makes 9 loads and 3 stores, most from
L2 once N ≥ 1024.

Timing: as ``bench_info_nce`` (:func:`bench.measure.time_uncontended`);
an angle call at ``N = 4096`` takes seconds, so there the first call is the
only warm-up and each provider gets exactly ``LONG_REPEATS`` timed runs.

``python -m bench.run --families rkd`` runs the sweep; ``pytest bench/``
runs the small pytest-benchmark cases once each. PKT, SP and CC are
``bench_gram_relation``.
"""

from __future__ import annotations

import fastkd
from bench.family import EmbeddingTermsFamily
from bench.measure import few_runs
from bench.report import COMPILE, EAGER
from bench.simd_peak import simd_peak_gflops
from fastkd import reference

EAGER_ANGLE_MAX_N = 640
# Angle calls from this N take seconds: no extra warm-up, exactly two runs.
LONG_N = 2048
ANGLE_FLOP_PER_TERM = 40
# FLOP the CPU angle kernel's lane loop executes per (anchor, unordered pair)
# term (csrc/cpu/rkd_kernel.cpp, fast path with the gradient): 17 for the two
# numerators, the two angles, their difference, the clamp and the smooth-L1
# (two FMAs), 12 for the gradient (|u|, one product, five FMAs).
ANGLE_KERNEL_FLOP_PER_PAIR = 29


def angle_kernel_flop(n: int) -> int:
    """``ANGLE_KERNEL_FLOP_PER_PAIR`` for each lane term of the kernel: anchor i,
    row j ≠ i, column k > j, ``N (N − 1)² / 2`` in all."""
    return ANGLE_KERNEL_FLOP_PER_PAIR * n * (n - 1) * (n - 1) // 2


class RkdBench(EmbeddingTermsFamily):
    name = "rkd"
    description = "fastkd RKD distance / angle (D=128, fp32, student requires grad)"
    terms = {
        "distance": (reference.rkd_distance, fastkd.rkd_distance),
        "angle": (reference.rkd_angle, fastkd.rkd_angle),
    }
    sizes = (128, 256, 512, 1024, 4096)
    report_configs = (("distance", 4096, 128), ("angle", 256, 128))
    metric_columns = (
        *EmbeddingTermsFamily.metric_columns, "simd_peak_gflops", "kernel_gflops", "x_simd_peak",
    )
    table_metrics = (
        *EmbeddingTermsFamily.table_metrics,
        ("kernel_gflops", "kernel GFLOP/s", ".1f"),
        ("simd_peak_gflops", "SIMD FMA peak GFLOP/s", ".1f"),
        ("x_simd_peak", "× SIMD peak", ".2f"),
    )

    def model_flop(self, term, n, d):
        if term == "angle":
            return ANGLE_FLOP_PER_TERM * n**3
        return 3 * 2 * n * n * d

    def skip(self, provider, term, n):
        if provider in (EAGER, COMPILE) and term == "angle" and n > EAGER_ANGLE_MAX_N:
            gib = 6 * n**3 * 4 / 2**30
            return f"skipped: N > {EAGER_ANGLE_MAX_N} (~{gib:.0f} GiB of N³ float32 tensors)"
        return None

    def timing(self, term, n):
        return few_runs() if term == "angle" and n >= LONG_N else None

    def add_gemm_floor(self, ctx, rows):
        """The angle rows get the measured SIMD peak and the CPU kernel's
        executed rate (the module docstring)."""
        super().add_gemm_floor(ctx, rows)
        if ctx.device.type != "cpu" or not any(row.get("loss") == "angle" for row in rows):
            return
        peak = simd_peak_gflops()
        for row in rows:
            row["simd_peak_gflops"] = peak
            if row["provider"] == "fastkd-cpu" and row.get("median_ms") is not None:
                row["kernel_gflops"] = angle_kernel_flop(row["N"]) / (row["median_ms"] * 1e6)
                row["x_simd_peak"] = row["kernel_gflops"] / peak


BENCH = RkdBench()


def test_skip():
    assert BENCH.skip(EAGER, "angle", 1024).startswith("skipped: N > 640")
    assert BENCH.skip(COMPILE, "angle", 4096) is not None
    assert BENCH.skip(EAGER, "angle", 512) is None
    assert BENCH.skip(EAGER, "distance", 4096) is None
    assert BENCH.skip("fastkd-cpu", "angle", 4096) is None


def test_flop_counts():
    assert BENCH.model_flop("angle", 10, 3) == ANGLE_FLOP_PER_TERM * 1000
    assert angle_kernel_flop(4) == ANGLE_KERNEL_FLOP_PER_PAIR * 18  # anchors × Σ_{j≠i} (3 − j)
    assert BENCH.model_flop("distance", 10, 3) == 6 * 100 * 3
