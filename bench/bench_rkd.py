"""Benchmark of the RKD relational losses: forward + backward of
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
  the same pass (csrc/cpu/relational.cpp). On CUDA ``fastkd-triton`` and
  ``fastkd-cuda`` (the same Gram formulation, kernels/relational.py and
  csrc/cuda/relational.cu).

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

Timing: as ``bench_info_nce`` (:func:`bench.common.time_uncontended`);
an angle call at ``N = 4096`` takes seconds, so there the first call is the
only warm-up and each provider gets exactly ``LONG_REPEATS`` timed runs.

``python -m bench.run --families rkd`` runs the sweep; ``pytest bench/``
runs the small pytest-benchmark cases below once each.

PKT, SP and CC are not in this sweep yet (their fused ops are Gram GEMMs plus
one row pass; see the README for a one-off measurement).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

import fastkd
from bench.common import (
    COMPILE,
    EAGER,
    MIB,
    SweepContext,
    allow_recompiles,
    measure_config,
    synchronize,
)
from fastkd.reference import relational as reference_relational
from fastkd.relational import RKD_KERNELS

FAMILY = "rkd"
DIM = 128
SIZES = (128, 256, 512, 1024, 4096)
LOSSES = ("distance", "angle")
EAGER_ANGLE_MAX_N = 640
CONFIG_KEYS = ("loss", "dtype", "N", "D")
COLUMNS = (
    "family",
    "loss",
    "device",
    "dtype",
    "N",
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
    ("median_ms", "median ms", ".1f"),
    ("repeats", "runs", "d"),
    ("peak_extra_mib", "peak extra MiB", ".1f"),
    ("model_gflop", "GFLOP (model)", ".2f"),
    ("speedup_vs_eager", "vs eager", ".1f"),
    ("speedup_vs_compile", "vs compile", ".2f"),
    ("loss_rel_diff", "loss vs eager", ".1e"),
    ("other_load", "other load", ".2f"),
)
SIZE_AXIS = f"batch size N (D = {DIM})"
# The student's gradient: the least a forward + backward allocates.
OUTPUT_KEY = "output_mib"
LOSS_REL_TOLERANCE = 1e-4
# Angle calls from this N take seconds: no extra warm-up, exactly this many runs.
LONG_N = 2048
LONG_REPEATS = 2
ANGLE_FLOP_PER_TERM = 40


def model_flop(loss: str, n: int, d: int) -> int:
    if loss == "angle":
        return ANGLE_FLOP_PER_TERM * n**3
    return 3 * 2 * n * n * d


def reference_fn(loss: str):
    return reference_relational.rkd_angle if loss == "angle" else reference_relational.rkd_distance


def providers(device: torch.device, loss: str, *, use_compile: bool):
    """(name → ``loss(student, teacher)``, name → why it is not measured)."""
    ref = reference_fn(loss)
    found = {EAGER: ref}
    skipped = {}
    if use_compile:
        found[COMPILE] = torch.compile(ref, fullgraph=True, dynamic=False)
    else:
        skipped[COMPILE] = "--no-compile"
    status = fastkd.backends()
    fused = fastkd.rkd_angle if loss == "angle" else fastkd.rkd_distance
    for backend in ("cpu",) if device.type == "cpu" else ("triton", "cuda"):
        name = f"fastkd-{backend}"
        if backend not in RKD_KERNELS:
            skipped[name] = f"fastkd has no {backend} RKD kernel yet"
        elif status[backend].available:
            found[name] = lambda s, t, backend=backend: fused(s, t, backend=backend)
        else:
            skipped[name] = status[backend].reason
    return found, skipped


def configs(quick: bool) -> list[tuple[str, int]]:
    if quick:
        return [(loss, SIZES[0]) for loss in LOSSES]
    return [(loss, n) for loss in LOSSES for n in SIZES]


def size_skip_reason(provider: str, loss: str, n: int) -> str | None:
    if provider in (EAGER, COMPILE) and loss == "angle" and n > EAGER_ANGLE_MAX_N:
        gib = 6 * n**3 * 4 / 2**30
        return f"skipped: N > {EAGER_ANGLE_MAX_N} (~{gib:.0f} GiB of N³ float32 tensors)"
    return None


def sweep(ctx: SweepContext) -> list[dict]:
    """Every provider on every configuration; one row per (configuration, provider)
    (:func:`bench.common.measure_config`)."""
    device = ctx.device
    if ctx.compile:
        allow_recompiles()
    per_loss = {loss: providers(device, loss, use_compile=ctx.compile) for loss in LOSSES}
    todo = configs(ctx.quick)
    task = ctx.progress.add_task(FAMILY, total=sum(len(per_loss[loss][0]) for loss, _ in todo))
    rows = []
    for loss, n in todo:
        found, skipped = per_loss[loss]
        d = DIM
        generator = torch.Generator(device=device).manual_seed(0)
        teacher = torch.randn(n, d, device=device, generator=generator)
        student = (teacher + 0.5 * torch.randn(n, d, device=device, generator=generator)).requires_grad_()
        base = {
            "family": FAMILY,
            "loss": loss,
            "device": device.type,
            "dtype": f"{loss} fp32",
            "N": n,
            "D": d,
            "output_mib": student.nbytes / MIB,
            "traffic_bytes": None,  # compute-bound: no floor
            "model_gflop": model_flop(loss, n, d) / 1e9,
            "thp": ctx.thp.short,
        }

        def reset(student=student):
            student.grad = None

        long = loss == "angle" and n >= LONG_N
        rows += measure_config(
            ctx, task, f"{FAMILY} {loss} {n}", base, found, (student, teacher), reset,
            skip=partial(size_skip_reason, loss=loss, n=n), unavailable=skipped, tolerance=LOSS_REL_TOLERANCE,
            timing_options=(
                {"warmup": 0, "min_repeats": LONG_REPEATS, "max_repeats": LONG_REPEATS, "attempts": 2}
                if long
                else None
            ),
            per_second={"model_gflops": base["model_gflop"]},
        )
        del student, teacher, reset
    ctx.progress.update(task, description=f"{FAMILY} done")
    return rows


def config_label(row: dict) -> str:
    return f"{row['loss']} {row['N']}"  # D is in the title


def size_label(row: dict) -> str:
    return f"{row['N']}"


def size_order(row: dict) -> int:
    return row["N"]


def title(rows: list[dict], ctx: SweepContext) -> str:
    return (
        f"fastkd RKD distance / angle (D={DIM}, fp32, student requires grad) forward + backward, "
        f"{ctx.device.type}, {torch.get_num_threads()} threads, THP {ctx.thp.short}"
    )


# ----------------------------------------------------------------------------- pytest-benchmark

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("provider", [EAGER, "fastkd-cpu"])
def test_rkd_fwd_bwd(benchmark, provider, loss):
    found, skipped = providers(_DEVICE, loss, use_compile=False)
    if provider not in found:
        pytest.skip(skipped.get(provider, "not available"))
    teacher = torch.randn(96, 32, device=_DEVICE)
    student = torch.randn(96, 32, device=_DEVICE, requires_grad=True)
    loss_fn = found[provider]

    def reset():
        student.grad = None

    def step():
        loss_fn(student, teacher).backward()
        synchronize(_DEVICE)

    benchmark.pedantic(step, setup=reset, rounds=5, warmup_rounds=1)
    assert student.grad is not None and student.grad.shape == student.shape


def test_size_skip_reason():
    assert size_skip_reason(EAGER, "angle", 1024).startswith("skipped: N > 640")
    assert size_skip_reason(COMPILE, "angle", 4096) is not None
    assert size_skip_reason(EAGER, "angle", 512) is None
    assert size_skip_reason(EAGER, "distance", 4096) is None
    assert size_skip_reason("fastkd-cpu", "angle", 4096) is None


def test_flop_counts():
    assert model_flop("angle", 10, 3) == ANGLE_FLOP_PER_TERM * 1000
    assert model_flop("distance", 10, 3) == 6 * 100 * 3
