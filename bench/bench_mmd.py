"""Benchmark of ``fastkd.mmd_loss``: forward + backward of the squared MMD between
``x (N, D)`` and ``y (M, D)``, ``N = M``, ``D = 128``, gaussian kernel summed over
the five default bandwidths ``(0.5, 1, 2, 4, 8)``, biased estimator, both
``x`` and ``y`` requiring a gradient, ``loss.backward()`` with the default
upstream gradient of 1. Rows of unit scale (``randn / sqrt(D)``, ``y``
shifted), the scale the default bandwidths suit.

Providers:

- ``eager``: ``fastkd.reference.mmd_loss`` itself: the three ``N × M`` kernel
  matrices from ``torch.cdist`` (difference-based) and one ``exp`` per
  bandwidth, in float32.
- ``compile``: ``torch.compile(fastkd.reference.mmd_loss, fullgraph=True,
  dynamic=False)``, compiled (or loaded from ``TORCHINDUCTOR_CACHE_DIR``) in an
  untimed first call. ``--no-compile`` skips it.
- ``fastkd-cpu`` (CPU): ``fastkd.mmd_loss(..., backend="cpu")``: tiled over
  rows (blocks of about 2**22 kernel values), squared distances from one
  GEMM per block (``‖a‖² + ‖b‖² − 2 a·b``), nothing saved for the backward,
  which recomputes the blocks. On CUDA ``fastkd-triton`` and ``fastkd-cuda``.

``eager`` and ``compile`` hold several ``N × M`` float32 tensors at once
(``NM_TENSORS``, from :func:`bench.measure.peak_extra_bytes` on the
development machine: eager 740 MiB at N = M = 2048 and 1472 MiB at 4096,
about 15 N×M tensors plus 0.5 GiB; compile 166 MiB at 2048). A configuration
where that estimate exceeds 80 % of the memory available is skipped for
them, with the estimate in the note; so is any N above ``REFERENCE_MAX_N``:
their cost is the difference-based ``cdist`` and its backward, O(N²·D)
elementwise work, 12.6 s per call at N = 4096 on two cores, minutes at 16384.

No floor: MMD is compute-bound (``2·D`` FLOP per kernel value against a few
bytes of input per row). ``model_gflop`` counts the matrix products of a
GEMM formulation, the same for every provider: per pair of rows ``2·D``
forward and ``4·D`` backward (the gradient's two sides), over the
``N² + M² + N·M`` pairs of the three kernel matrices:
``6·D·(N² + M² + N·M)``. ``model_gflops`` = ``model_gflop`` / median time
(ratios equal the speed-ups). The ``5·(N² + M² + N·M)`` exponentials are not
counted.

``python -m bench.run --families mmd`` runs the sweep; ``pytest bench/`` runs
the small pytest-benchmark cases once each.
"""

from __future__ import annotations

import torch

import fastkd
from bench.family import Family, compute_bound_case
from bench.measure import available_memory_bytes, fp32_tensors_skip_reason
from bench.report import COMPILE, EAGER
from fastkd.reference import mmd_loss as reference_mmd_loss

DIM = 128
SIZES = (1024, 4096, 16384)  # N = M
BANDWIDTHS = (0.5, 1.0, 2.0, 4.0, 8.0)
# N × M float32 tensors held at once (see the module docstring), rounded up.
NM_TENSORS = {EAGER: 16, COMPILE: 11}
# Largest N at which eager and compile run (time, see the module docstring).
REFERENCE_MAX_N = 4096
# N from which a call takes seconds: no extra warm-up, exactly two runs.
LONG_N = 16384


def model_flop(n: int, m: int, d: int) -> int:
    """``6·D·(N² + M² + N·M)``: one product forward, two backward, per pair of rows."""
    return 6 * d * (n * n + m * m + n * m)


def nm_skip_reason(provider: str, n: int, m: int, available: int | None) -> str | None:
    """Why ``provider`` (``eager`` / ``compile``) cannot run at ``N × M``, or None."""
    if provider in NM_TENSORS and max(n, m) > REFERENCE_MAX_N:
        return f"skipped: N > {REFERENCE_MAX_N}, minutes per call (O(N²·D) elementwise cdist work)"
    return fp32_tensors_skip_reason(NM_TENSORS.get(provider, 0), max(n, m) ** 2, available, "N×M")


def make_samples(n: int, m: int, d: int, device: torch.device, dtype: torch.dtype):
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, d, device=device, generator=generator) / d**0.5
    y = (torch.randn(m, d, device=device, generator=generator) + 0.3) / d**0.5
    return x.to(dtype).requires_grad_(), y.to(dtype).requires_grad_()


class MmdBench(Family):
    name = "mmd"
    config_columns = ("kernel", "bandwidths", "device", "dtype", "N", "M", "D")
    config_keys = ("dtype", "N", "M", "D")
    config_format = "{dtype} {N}×{M}"  # D is in the title
    size_columns = ("N",)
    description = (
        f"fastkd.mmd_loss (gaussian, σ ∈ {{{', '.join(f'{s:g}' for s in BANDWIDTHS)}}}, D={DIM}, "
        "x and y require grad)"
    )
    metric_columns = ("model_gflop", "model_gflops")
    table_metrics = (  # no floor: compute-bound
        ("model_gflop", "GFLOP (GEMM form)", ".1f"),
        ("model_gflops", "GFLOP/s", ".1f"),
    )
    size_axis = f"problem size N = M (D = {DIM})"
    dtypes = {"fp32": torch.float32}
    small_configs = (("fp32", 256, 192, 64),)
    report_configs = (("fp32", 1024, 1024, DIM),)

    def reference(self, options):
        return lambda x, y: reference_mmd_loss(x, y, bandwidths=BANDWIDTHS)

    def fused(self, backend, options):
        return lambda x, y: fastkd.mmd_loss(x, y, bandwidths=BANDWIDTHS, backend=backend)

    def all_configs(self):
        return [(dtype, n, n, DIM) for dtype in self.dtypes for n in SIZES]

    def case(self, config, device, options, providers):
        dtype_name, n, m, d = config
        x, y = make_samples(n, m, d, device, self.dtypes[dtype_name])
        columns = {
            "kernel": "gaussian", "bandwidths": " ".join(f"{s:g}" for s in BANDWIDTHS), "dtype": dtype_name,
            "N": n, "M": m, "D": d,
        }
        available = available_memory_bytes(device)
        return compute_bound_case(
            columns, (x, y), lambda provider: nm_skip_reason(provider, n, m, available), model_flop(n, m, d),
            long_calls=n >= LONG_N,
        )


BENCH = MmdBench()



def test_nm_skip_reason():
    gib = 2**30
    # 4096²·4 B = 64 MiB per N×M tensor.
    assert nm_skip_reason(EAGER, 4096, 4096, gib).startswith("skipped: would need ~1 GiB")
    assert nm_skip_reason(EAGER, 4096, 4096, 20 * gib) is None
    assert nm_skip_reason(COMPILE, 16384, 16384, 100 * gib).startswith("skipped: N > 4096")
    assert nm_skip_reason("fastkd-cpu", 65536, 65536, gib) is None


def test_flop_count():
    assert model_flop(2, 3, 5) == 6 * 5 * (4 + 9 + 6)
