"""Benchmark of ``fastkd.topk_divergence``: forward + backward of KL (T = 2,
``T²`` · batchmean) against a top-k teacher stored as ``(indices (N, k),
logits (N, k))``, the student ``(N, V)`` requiring a gradient,
``loss.backward()`` with the default upstream gradient of 1. ``V = 128256``
(a Llama-3-size vocabulary), ``k = 64``.

Providers — everything but ``fastkd-<backend>`` first builds the dense
``(N, V)`` teacher logits, ``−inf`` off the k ids (what one does without a
sparse-teacher loss; its softmax is the teacher renormalised over the k ids),
and that scatter is timed as part of the loss:

- ``eager``: dense teacher, then ``bench_divergence.reference_loss`` (the
  reference's plain-PyTorch computation of the divergence).
- ``compile``: ``torch.compile`` (``fullgraph=True, dynamic=False``) of the
  same function, scatter included. ``--no-compile`` skips it.
- ``dense-fastkd-<backend>``: dense teacher, then ``fastkd.divergence(...,
  backend=<backend>)``, the fused dense kernel.
- ``fastkd-<backend>``: ``fastkd.topk_divergence(..., backend=<backend>)``:
  no dense teacher; its dense work is the student row alone.

``<backend>`` is ``cpu`` on the CPU (``--device cpu``), ``triton`` and
``cuda`` on a GPU (``--device cuda``).

Memory traffic (the floor): read the student logits once, write the student
gradient once, ``2 · N · V · itemsize`` bytes (the teacher's ``N · k`` pairs
are negligible).

``python -m bench.run --families topk`` runs the sweep; ``pytest bench/`` runs
the small pytest-benchmark cases below once each.
"""

from __future__ import annotations

import pytest
import torch

import fastkd
from bench.bench_divergence import reference_loss
from bench.common import (
    COMPILE,
    EAGER,
    MIB,
    SweepContext,
    allow_recompiles,
    measure_config,
    synchronize,
)
from fastkd.topk import TOPK_KERNELS

FAMILY = "topk"
VOCAB = 128256
TOP_K = 64
ROWS = (128, 512, 2048)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEMPERATURE = 2.0
CONFIG_KEYS = ("dtype", "N", "V", "k")
COLUMNS = (
    "family", "temperature", "device", "dtype", "N", "V", "k", "provider",
    "median_ms", "min_ms", "max_ms", "repeats", "peak_extra_mib", "output_mib", "traffic_bytes",
    "floor_ms", "copy_gbs",
    "speedup_vs_eager", "speedup_vs_compile", "x_floor", "loss_rel_diff", "other_load", "thp", "note",
)
SIZE_AXIS = f"tokens N (V = {VOCAB}, k = {TOP_K})"
# The student gradient: the least a fused forward + backward allocates.
OUTPUT_KEY = "output_mib"


def dense_teacher(index: torch.Tensor, values: torch.Tensor, vocab: int) -> torch.Tensor:
    """``(N, V)`` logits: ``values`` at ``index``, ``−inf`` elsewhere."""
    dense = torch.full((index.shape[0], vocab), -torch.inf, dtype=values.dtype, device=values.device)
    return dense.scatter_(1, index, values)


def dense_reference_loss(student, index, values):
    return reference_loss(student, dense_teacher(index, values, student.shape[1]), divergence="kl",
                          temperature=TEMPERATURE)


def providers(device: torch.device, *, use_compile: bool):
    """(name → ``loss(student, index, values)``, name → why it is not measured)."""
    found = {EAGER: dense_reference_loss}
    skipped = {}
    if use_compile:
        found[COMPILE] = torch.compile(dense_reference_loss, fullgraph=True, dynamic=False)
    else:
        skipped[COMPILE] = "--no-compile"
    status = fastkd.backends()
    for backend in ("cpu",) if device.type == "cpu" else ("triton", "cuda"):
        dense, sparse = f"dense-fastkd-{backend}", f"fastkd-{backend}"
        if status[backend].available and backend in TOPK_KERNELS:
            found[dense] = lambda s, i, v, backend=backend: fastkd.divergence(
                s, dense_teacher(i, v, s.shape[1]), temperature=TEMPERATURE, backend=backend
            )
            found[sparse] = lambda s, i, v, backend=backend: fastkd.topk_divergence(
                s, i, v, temperature=TEMPERATURE, backend=backend
            )
        else:
            reason = status[backend].reason if not status[backend].available else "no top-k kernel"
            skipped[dense] = skipped[sparse] = reason
    return found, skipped


def configs(quick: bool) -> list[tuple[str, int]]:
    if quick:
        return [("fp32", ROWS[0])]
    return [(dtype, n) for dtype in DTYPES for n in ROWS]


def make_inputs(n: int, dtype: torch.dtype, device: torch.device):
    """Student logits (N, V) requiring grad; the teacher's top-k of a correlated dense teacher."""
    generator = torch.Generator(device=device).manual_seed(0)
    student = torch.randn(n, VOCAB, device=device, generator=generator)
    values, index = (student + torch.randn(n, VOCAB, device=device, generator=generator)).topk(TOP_K, dim=1)
    return student.to(dtype).requires_grad_(), index, values.to(dtype)


def sweep(ctx: SweepContext) -> list[dict]:
    """Every provider on every configuration; one row per (configuration, provider)
    (:func:`bench.common.measure_config`)."""
    device = ctx.device
    found, skipped = providers(device, use_compile=ctx.compile)
    if ctx.compile:
        allow_recompiles()
    todo = configs(ctx.quick)
    task = ctx.progress.add_task(FAMILY, total=len(todo) * len(found))
    rows = []
    for dtype_name, n in todo:
        s, index, values = make_inputs(n, DTYPES[dtype_name], device)
        base = {
            "family": FAMILY,
            "temperature": TEMPERATURE,
            "device": device.type,
            "dtype": dtype_name,
            "N": n,
            "V": VOCAB,
            "k": TOP_K,
            "output_mib": s.nbytes / MIB,
            "traffic_bytes": 2 * s.nbytes,
            "thp": ctx.thp.short,
        }

        def reset(s=s):
            s.grad = None

        label = f"{FAMILY} {dtype_name} {n}×{VOCAB}"
        rows += measure_config(ctx, task, label, base, found, (s, index, values), reset, unavailable=skipped)
        del s, index, values, reset
    ctx.progress.update(task, description=f"{FAMILY} done")
    return rows


def config_label(row: dict) -> str:
    return f"{row['dtype']} {row['N']}×{row['V']} k={row['k']}"


def size_label(row: dict) -> str:
    return f"{row['N']}"


def size_order(row: dict) -> tuple[int, int]:
    return (row["N"] * row["V"], row["V"])


def title(rows: list[dict], ctx: SweepContext) -> str:
    return (
        f"fastkd.topk_divergence: kl (T={TEMPERATURE:g}, k={TOP_K}) forward + backward, "
        f"{ctx.device.type}, {torch.get_num_threads()} threads, THP {ctx.thp.short}"
    )


# ----------------------------------------------------------------------------- pytest-benchmark

_DEVICE = torch.device("cpu")
_PROVIDERS, _ = providers(_DEVICE, use_compile=False)


@pytest.mark.parametrize("provider", list(_PROVIDERS))
def test_topk_fwd_bwd(benchmark, provider):
    s = torch.randn(16, 4096, requires_grad=True)
    values, index = torch.randn(16, 4096).topk(32, dim=1)
    loss_fn = _PROVIDERS[provider]

    def reset():
        s.grad = None

    def step():
        loss_fn(s, index, values).backward()
        synchronize(_DEVICE)

    benchmark.pedantic(step, setup=reset, rounds=10, warmup_rounds=1)
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_providers_agree():
    s = torch.randn(8, 1000, dtype=torch.float64, requires_grad=True)
    values, index = torch.randn(8, 1000, dtype=torch.float64).topk(20, dim=1)
    losses = {name: fn(s, index, values).item() for name, fn in _PROVIDERS.items()}
    for name, loss in losses.items():
        assert loss == pytest.approx(losses[EAGER], rel=1e-9), name
