"""Benchmark of ``fastkd.divergence``: forward + backward of one softmax
divergence on ``(N, V)`` logits, the student requiring a gradient and the
teacher not, ``loss.backward()`` with the default upstream gradient of 1.

Providers:

- ``eager``: the reference's computation in plain PyTorch, via
  :func:`reference_loss` (``log_softmax`` of both sides over ``T``, then
  ``fastkd.reference.divergence.row_divergence``, ``T²`` · batchmean). It is
  ``fastkd.reference.divergence`` without its row-selection prologue (no
  labels or mask here), whose ``nonzero`` / index copies and ``-inf`` check
  add work no one computing this loss would do, and break the graph of
  ``torch.compile``.
- ``compile``: ``torch.compile(reference_loss, fullgraph=True, dynamic=False)``,
  one graph per shape and dtype, compiled (or loaded from
  ``TORCHINDUCTOR_CACHE_DIR``) in an untimed first call. ``--no-compile``
  skips it.
- ``fastkd-cpu`` (CPU), ``fastkd-triton`` and ``fastkd-cuda`` (CUDA):
  ``fastkd.divergence(..., backend=...)``.
- ``liger`` (CUDA, when ``liger_kernel`` imports): ``LigerKLDIVLoss`` for
  ``kl`` and ``LigerJSD`` for ``jsd`` on ``log_softmax(x / T)`` inputs, times
  ``T²``; the ``log_softmax`` calls are timed, as they are part of the loss.

Memory traffic (the floor): read the student and teacher logits once, write
the student gradient once, ``3 · N · V · itemsize`` bytes.

``python -m bench.run --families divergence`` runs the sweep; ``pytest bench/``
runs the small pytest-benchmark cases below once each (the project's pytest
options disable timing; add ``--benchmark-enable`` for timings).
"""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

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
from fastkd import _validate
from fastkd.reference import divergence as reference_divergence
from fastkd.reference import row_divergence

FAMILY = "divergence"
SHAPES = ((4096, 1024), (2048, 32000), (512, 128256))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONFIG_KEYS = ("divergence", "dtype", "N", "V")
COLUMNS = (
    "family", "divergence", "temperature", "device", "dtype", "N", "V", "provider",
    "median_ms", "min_ms", "max_ms", "repeats", "peak_extra_mib", "output_mib", "traffic_bytes",
    "floor_ms", "copy_gbs",
    "speedup_vs_eager", "speedup_vs_compile", "x_floor", "loss_rel_diff", "other_load", "thp", "note",
)
# The student gradient: the least a fused forward + backward allocates.
OUTPUT_KEY = "output_mib"
# A provider whose loss differs from eager's by more than this (relative) is
# flagged in its note. The reference and fastkd compute in float32 whatever
# the input dtype; Liger takes bf16 log-probabilities as given.


def reference_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    divergence: str,
    temperature: float,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """``fastkd.reference.divergence`` for every row kept, batchmean, ``scale = T²``.

    Args:
        student: ``(N, V)`` logits.
        teacher: ``(N, V)`` logits.
    Returns:
        A float32 scalar (float64 for float64 input).
    """
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    log_q = F.log_softmax(student.to(acc) / temperature, dim=-1)
    log_p = F.log_softmax(teacher.to(acc) / temperature, dim=-1)
    rows = row_divergence(log_p, log_q, divergence, beta=beta, alpha=alpha)
    return temperature**2 * rows.sum() / student.shape[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("divergence")
    group.add_argument("--divergence", default="kl", choices=_validate.DIVERGENCES)
    group.add_argument("--temperature", type=float, default=2.0)
    group.add_argument("--beta", type=float, default=0.5, help="JSD weight")
    group.add_argument("--alpha", type=float, default=0.1, help="skew weight")


def _liger(options: dict):
    """(name → loss function, name → why not) for Liger-Kernel's matching loss."""
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
    except ImportError:
        return {}, {"liger": "liger_kernel not installed"}
    temperature = options["temperature"]
    if options["divergence"] == "kl":
        module = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    elif options["divergence"] == "jsd" and 0 < options["beta"] < 1:
        module = LigerJSD(beta=options["beta"])
    else:
        return {}, {"liger": f"Liger-Kernel has no {options['divergence']} loss"}

    def liger(s, t):
        log_q = F.log_softmax(s / temperature, dim=-1)
        log_p = F.log_softmax(t / temperature, dim=-1)
        return temperature**2 * module(log_q, log_p)

    return {"liger": liger}, {}


def providers(device: torch.device, options: dict, *, use_compile: bool):
    """(name → ``loss(student, teacher)``, name → why it is not measured)."""
    kwargs = {k: options[k] for k in ("divergence", "temperature", "beta", "alpha")}

    def eager(s, t):
        return reference_loss(s, t, **kwargs)

    found = {EAGER: eager}
    skipped = {}
    if use_compile:
        compiled = torch.compile(reference_loss, fullgraph=True, dynamic=False)
        found[COMPILE] = lambda s, t: compiled(s, t, **kwargs)
    else:
        skipped[COMPILE] = "--no-compile"
    status = fastkd.backends()
    for backend in ("cpu",) if device.type == "cpu" else ("triton", "cuda"):
        name = f"fastkd-{backend}"
        if status[backend].available:
            found[name] = lambda s, t, backend=backend: fastkd.divergence(s, t, **kwargs, backend=backend)
        else:
            skipped[name] = status[backend].reason
    if device.type == "cuda":
        liger_found, liger_skipped = _liger(options)
        found.update(liger_found)
        skipped.update(liger_skipped)
    return found, skipped


def configs(quick: bool) -> list[tuple[str, int, int]]:
    if quick:
        return [("fp32", *SHAPES[0])]
    return [(dtype, n, v) for dtype in DTYPES for n, v in SHAPES]


def sweep(ctx: SweepContext) -> list[dict]:
    """Every provider on every configuration; one row per (configuration, provider)
    (:func:`bench.common.measure_config`)."""
    options = ctx.options
    device = ctx.device
    found, skipped = providers(device, options, use_compile=ctx.compile)
    if ctx.compile:
        allow_recompiles()
    todo = configs(ctx.quick)
    task = ctx.progress.add_task(FAMILY, total=len(todo) * len(found))
    rows = []
    for dtype_name, n, v in todo:
        dtype = DTYPES[dtype_name]
        generator = torch.Generator(device=device).manual_seed(0)
        s = torch.randn(n, v, device=device, dtype=dtype, generator=generator).requires_grad_()
        t = torch.randn(n, v, device=device, dtype=dtype, generator=generator)
        base = {
            "family": FAMILY,
            "divergence": options["divergence"],
            "temperature": options["temperature"],
            "device": device.type,
            "dtype": dtype_name,
            "N": n,
            "V": v,
            "output_mib": s.nbytes / MIB,
            "traffic_bytes": 3 * s.nbytes,
            "thp": ctx.thp.short,
        }

        def reset(s=s):
            s.grad = None

        rows += measure_config(
            ctx, task, f"{FAMILY} {dtype_name} {n}×{v}", base, found, (s, t), reset, unavailable=skipped
        )
        del s, t, reset
    ctx.progress.update(task, description=f"{FAMILY} done")
    return rows


def config_label(row: dict) -> str:
    return f"{row['divergence']} {row['dtype']} {row['N']}×{row['V']}"


def size_label(row: dict) -> str:
    return f"{row['N']}×{row['V']}"


def size_order(row: dict) -> tuple[int, int]:
    return (row["N"] * row["V"], row["V"])


def title(rows: list[dict], ctx: SweepContext) -> str:
    options = ctx.options
    return (
        f"fastkd.divergence: {options['divergence']} (T={options['temperature']:g}) forward + backward, "
        f"{ctx.device.type}, {torch.get_num_threads()} threads, THP {ctx.thp.short}"
    )


# ----------------------------------------------------------------------------- pytest-benchmark

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_OPTIONS = {"divergence": "kl", "temperature": 2.0, "beta": 0.5, "alpha": 0.1}
# torch.compile is left to the sweep: a cold compile costs 10-30 s on CPU.
_PROVIDERS, _ = providers(_DEVICE, _OPTIONS, use_compile=False)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("provider", list(_PROVIDERS))
def test_divergence_fwd_bwd(benchmark, provider, dtype):
    s = torch.randn(64, 4096, device=_DEVICE, dtype=DTYPES[dtype], requires_grad=True)
    t = torch.randn(64, 4096, device=_DEVICE, dtype=DTYPES[dtype])
    loss_fn = _PROVIDERS[provider]

    def reset():
        s.grad = None

    def step():
        loss_fn(s, t).backward()
        synchronize(_DEVICE)

    benchmark.pedantic(step, setup=reset, rounds=20, warmup_rounds=2)
    assert s.grad is not None and s.grad.shape == s.shape


@pytest.mark.parametrize("divergence", _validate.DIVERGENCES)
def test_reference_loss_is_the_reference(divergence):
    """The eager provider computes what fastkd.reference.divergence does."""
    s = torch.randn(7, 301, dtype=torch.float64, requires_grad=True)
    t = torch.randn(7, 301, dtype=torch.float64)
    options = {"divergence": divergence, "temperature": 2.0, "beta": 0.3, "alpha": 0.2}
    ours = reference_loss(s, t, **options)
    (ours_grad,) = torch.autograd.grad(ours, s)
    theirs = reference_divergence(s, t, **options)
    (theirs_grad,) = torch.autograd.grad(theirs, s)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_grad, theirs_grad)
