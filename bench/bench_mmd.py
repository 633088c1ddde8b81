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
  which recomputes the blocks. On CUDA ``fastkd-triton`` and ``fastkd-cuda``,
  each measured when ``fastkd.functional.MMD_KERNELS`` lists it.

``eager`` and ``compile`` hold several ``N × M`` float32 tensors at once
(``NM_TENSORS``, from :func:`bench.common.peak_extra_bytes` on the
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
the small pytest-benchmark cases below once each.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

import fastkd
from bench.bench_info_nce import available_memory_bytes
from bench.common import (
    COMPILE,
    EAGER,
    MIB,
    SweepContext,
    allow_recompiles,
    measure_config,
    synchronize,
)
from fastkd.functional import MMD_KERNELS
from fastkd.reference import mmd_loss as reference_mmd_loss

FAMILY = "mmd"
DIM = 128
SIZES = (1024, 4096, 16384)  # N = M
DTYPES = {"fp32": torch.float32}
BANDWIDTHS = (0.5, 1.0, 2.0, 4.0, 8.0)
CONFIG_KEYS = ("dtype", "N", "M", "D")
COLUMNS = (
    "family",
    "kernel",
    "bandwidths",
    "device",
    "dtype",
    "N",
    "M",
    "D",
    "provider",
    "median_ms",
    "min_ms",
    "max_ms",
    "repeats",
    "peak_extra_mib",
    "output_mib",
    "model_gflop",
    "model_gflops",
    "traffic_bytes",
    "floor_ms",
    "copy_gbs",
    "speedup_vs_eager",
    "speedup_vs_compile",
    "x_floor",
    "loss_rel_diff",
    "other_load",
    "thp",
    "note",
)
TABLE_COLUMNS = (
    # (row key, header, format); no floor: compute-bound
    ("median_ms", "median ms", ".1f"),
    ("repeats", "runs", "d"),
    ("peak_extra_mib", "peak extra MiB", ".0f"),
    ("model_gflop", "GFLOP (GEMM form)", ".1f"),
    ("model_gflops", "GFLOP/s", ".1f"),
    ("speedup_vs_eager", "vs eager", ".1f"),
    ("speedup_vs_compile", "vs compile", ".2f"),
    ("other_load", "other load", ".2f"),
)
SIZE_AXIS = f"problem size N = M (D = {DIM})"
# grad_x and grad_y: the least a fused forward + backward allocates.
OUTPUT_KEY = "output_mib"
# Every provider computes in float32; eager and fastkd take distances differently.
# N × M float32 tensors held at once (see the module docstring), rounded up.
NM_TENSORS = {EAGER: 16, COMPILE: 11}
# Largest N at which eager and compile run (time, see the module docstring).
REFERENCE_MAX_N = 4096
MEMORY_FRACTION = 0.8
# N from which a call takes seconds: no extra warm-up, exactly this many runs.
LONG_N = 16384
LONG_REPEATS = 2
LONG_TIMING = {"warmup": 0, "min_repeats": LONG_REPEATS, "max_repeats": LONG_REPEATS, "attempts": 2}


def model_flop(n: int, m: int, d: int) -> int:
    """``6·D·(N² + M² + N·M)``: one product forward, two backward, per pair of rows."""
    return 6 * d * (n * n + m * m + n * m)


def memory_skip_reason(provider: str, n: int, m: int, available: int | None) -> str | None:
    """Why ``provider`` (``eager`` / ``compile``) cannot run at ``N × M``, or None."""
    if provider not in NM_TENSORS:
        return None
    if max(n, m) > REFERENCE_MAX_N:
        return f"skipped: N > {REFERENCE_MAX_N}, minutes per call (O(N²·D) elementwise cdist work)"
    need = NM_TENSORS[provider] * max(n, m) ** 2 * 4
    if available is None or need <= MEMORY_FRACTION * available:
        return None
    return (
        f"skipped: would need ~{need / 2**30:.0f} GiB ({NM_TENSORS[provider]} N×M fp32 tensors), "
        f"{available / 2**30:.0f} GiB available"
    )


def providers(device: torch.device, *, use_compile: bool):
    """(name → ``loss(x, y)``, name → why it is not measured)."""

    def eager(x, y):
        return reference_mmd_loss(x, y, bandwidths=BANDWIDTHS)

    found = {EAGER: eager}
    skipped = {}
    if use_compile:
        compiled = torch.compile(reference_mmd_loss, fullgraph=True, dynamic=False)
        found[COMPILE] = lambda x, y: compiled(x, y, bandwidths=BANDWIDTHS)
    else:
        skipped[COMPILE] = "--no-compile"
    status = fastkd.backends()
    for backend in ("cpu",) if device.type == "cpu" else ("triton", "cuda"):
        name = f"fastkd-{backend}"
        if backend not in MMD_KERNELS:
            skipped[name] = f"fastkd has no {backend} MMD kernel yet"
        elif status[backend].available:
            found[name] = lambda x, y, backend=backend: fastkd.mmd_loss(
                x, y, bandwidths=BANDWIDTHS, backend=backend
            )
        else:
            skipped[name] = status[backend].reason
    return found, skipped


def configs(quick: bool) -> list[tuple[str, int]]:
    if quick:
        return [("fp32", SIZES[0])]
    return [(dtype, n) for dtype in DTYPES for n in SIZES]


def make_samples(n: int, m: int, d: int, device: torch.device, dtype: torch.dtype):
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, d, device=device, generator=generator) / d**0.5
    y = (torch.randn(m, d, device=device, generator=generator) + 0.3) / d**0.5
    return x.to(dtype).requires_grad_(), y.to(dtype).requires_grad_()


def sweep(ctx: SweepContext) -> list[dict]:
    """Every provider on every configuration; one row per (configuration, provider)
    (:func:`bench.common.measure_config`; providers that would not fit in
    memory are skipped with the reason)."""
    device = ctx.device
    found, skipped = providers(device, use_compile=ctx.compile)
    if ctx.compile:
        allow_recompiles()
    todo = configs(ctx.quick)
    task = ctx.progress.add_task(FAMILY, total=len(todo) * len(found))
    rows = []
    for dtype_name, n in todo:
        m, d = n, DIM
        x, y = make_samples(n, m, d, device, DTYPES[dtype_name])
        label = f"{FAMILY} {dtype_name} {n}×{m}"
        base = {
            "family": FAMILY,
            "kernel": "gaussian",
            "bandwidths": " ".join(f"{s:g}" for s in BANDWIDTHS),
            "device": device.type,
            "dtype": dtype_name,
            "N": n,
            "M": m,
            "D": d,
            "output_mib": (x.nbytes + y.nbytes) / MIB,
            "traffic_bytes": None,  # compute-bound: no floor
            "model_gflop": model_flop(n, m, d) / 1e9,
            "thp": ctx.thp.short,
        }

        def reset(x=x, y=y):
            x.grad = y.grad = None

        available = available_memory_bytes(device)
        rows += measure_config(
            ctx, task, label, base, found, (x, y), reset, unavailable=skipped,
            skip=partial(memory_skip_reason, n=n, m=m, available=available),
            timing_options=LONG_TIMING if n >= LONG_N else None,
            per_second={"model_gflops": base["model_gflop"]},
        )
        del x, y, reset
    ctx.progress.update(task, description=f"{FAMILY} done")
    return rows


def config_label(row: dict) -> str:
    return f"{row['dtype']} {row['N']}×{row['M']}"  # D is in the title


def size_label(row: dict) -> str:
    return f"{row['N']}"


def size_order(row: dict) -> tuple[int, int]:
    return (row["N"] * row["M"], row["M"])


def title(rows: list[dict], ctx: SweepContext) -> str:
    return (
        f"fastkd.mmd_loss (gaussian, σ ∈ {{{', '.join(f'{s:g}' for s in BANDWIDTHS)}}}, D={DIM}, "
        f"x and y require grad) forward + backward, {ctx.device.type}, "
        f"{torch.get_num_threads()} threads, THP {ctx.thp.short}"
    )


# ----------------------------------------------------------------------------- pytest-benchmark

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# torch.compile is left to the sweep: a cold compile costs 10-30 s on CPU.
_PROVIDERS, _ = providers(_DEVICE, use_compile=False)


@pytest.mark.parametrize("provider", list(_PROVIDERS))
def test_mmd_fwd_bwd(benchmark, provider):
    x, y = make_samples(256, 192, 64, _DEVICE, torch.float32)
    loss_fn = _PROVIDERS[provider]

    def reset():
        x.grad = y.grad = None

    def step():
        loss_fn(x, y).backward()
        synchronize(_DEVICE)

    benchmark.pedantic(step, setup=reset, rounds=20, warmup_rounds=2)
    assert x.grad is not None and x.grad.shape == x.shape
    assert y.grad is not None and y.grad.shape == y.shape


def test_memory_skip_reason():
    gib = 2**30
    # 4096²·4 B = 64 MiB per N×M tensor.
    assert memory_skip_reason(EAGER, 4096, 4096, gib).startswith("skipped: would need ~1 GiB")
    assert memory_skip_reason(EAGER, 4096, 4096, 20 * gib) is None
    assert memory_skip_reason(COMPILE, 16384, 16384, 100 * gib).startswith("skipped: N > 4096")
    assert memory_skip_reason("fastkd-cpu", 65536, 65536, gib) is None


def test_flop_count():
    assert model_flop(2, 3, 5) == 6 * 5 * (4 + 9 + 6)
