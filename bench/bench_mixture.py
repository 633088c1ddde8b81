"""Benchmark of multi-teacher ``fastkd.divergence``: forward + backward of KL
(T = 2, ``T²`` · batchmean) from the student ``(N, V)`` to the mixture of
``K = 3`` teachers ``(K, N, V)`` with weights ``(0.5, 0.3, 0.2)``, the
student requiring a gradient, ``loss.backward()`` with upstream gradient 1.

Providers:

- ``eager``: ``fastkd.reference.multi_teacher.mixture_divergence`` — the
  mixture's log-probabilities (``logsumexp_k(log w_k + log_softmax(t_k/T))``,
  an ``(N, V)`` tensor and K ``log_softmax`` temporaries), then the reference
  divergence on it.
- ``compile``: ``torch.compile`` (``dynamic=False``) of the same function.
  ``--no-compile`` skips it.
- ``mixture+fastkd-cpu``: the mixture's log-probabilities in PyTorch (as
  ``eager``), then the fused single-teacher kernel ``fastkd.divergence(...,
  backend="cpu")`` on ``T · log p``.
- ``fastkd-cpu``: ``fastkd.divergence(s, teachers, teacher_weights=w,
  backend="cpu")``, one fused call, the mixture formed per row in log space.
- ``fastkd-triton``, ``fastkd-cuda`` (``--device cuda`` only): the same fused
  call on the GPU backends (kernels/mixture.py, csrc/cuda/mixture_divergence.cu),
  which compute in float64 like the CPU kernel: on GPUs with little fp64
  throughput they are compute-bound (see their headers).
- ``3×fastkd-cpu``: three single-teacher calls ``Σ_k w_k D(p_k ‖ q)`` — a
  *different* objective (the weighted average of the divergences, not the
  divergence to the mixture), listed only as the cost of three dense passes;
  its ``loss_rel_diff`` is expected to be large.

Memory traffic (the floor): read the student and the K teachers once, write
the student gradient once, ``(K + 2) · N · V · itemsize`` bytes.

``python -m bench.run --families mixture`` runs the sweep.
"""

from __future__ import annotations

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
from fastkd.multi_teacher import MIXTURE_KERNELS
from fastkd.reference import multi_teacher as reference_mt

FAMILY = "mixture"
SHAPES = ((4096, 1024), (1024, 32000))
WEIGHTS = (0.5, 0.3, 0.2)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEMPERATURE = 2.0
CONFIG_KEYS = ("dtype", "N", "V", "K")
COLUMNS = (
    "family", "temperature", "device", "dtype", "N", "V", "K", "provider",
    "median_ms", "min_ms", "max_ms", "repeats", "peak_extra_mib", "output_mib", "traffic_bytes",
    "floor_ms", "copy_gbs",
    "speedup_vs_eager", "speedup_vs_compile", "x_floor", "loss_rel_diff", "other_load", "thp", "note",
)
OUTPUT_KEY = "output_mib"
SEPARATE = "3×fastkd-cpu"
GPU_BACKENDS = ("triton", "cuda")


def reference_loss(student, teachers, weights):
    return reference_mt.mixture_divergence(student, teachers, weights, temperature=TEMPERATURE)


def mixture_then_fastkd(student, teachers, weights):
    with torch.no_grad():
        log_p = reference_mt.mixture_log_probs(teachers, weights, TEMPERATURE)
    return fastkd.divergence(student, (TEMPERATURE * log_p).to(student.dtype), temperature=TEMPERATURE,
                             backend="cpu")


def separate_calls(student, teachers, weights):
    return sum(
        float(w) * fastkd.divergence(student, teachers[k], temperature=TEMPERATURE, backend="cpu")
        for k, w in enumerate(weights)
    )


def providers(device: torch.device, *, use_compile: bool):
    """(name → ``loss(student, teachers, weights)``, name → why it is not measured)."""
    found = {EAGER: reference_loss}
    skipped = {}
    if use_compile:
        found[COMPILE] = torch.compile(reference_loss, dynamic=False)
    else:
        skipped[COMPILE] = "--no-compile"
    status = fastkd.backends()
    if device.type == "cpu" and status["cpu"].available and "cpu" in MIXTURE_KERNELS:
        found["mixture+fastkd-cpu"] = mixture_then_fastkd
        found["fastkd-cpu"] = fused_call("cpu")
        found[SEPARATE] = separate_calls
    elif device.type == "cpu":
        for name in ("mixture+fastkd-cpu", "fastkd-cpu", SEPARATE):
            skipped[name] = status["cpu"].reason
    if device.type == "cuda":
        for name in ("mixture+fastkd-cpu", "fastkd-cpu", SEPARATE):
            skipped[name] = "CPU tensors only"
        for backend in GPU_BACKENDS:
            backend_status = fastkd._dispatch.backend_status(backend, "cuda")
            if backend_status.available and backend in MIXTURE_KERNELS:
                found[f"fastkd-{backend}"] = fused_call(backend)
            else:
                skipped[f"fastkd-{backend}"] = backend_status.reason
    return found, skipped


def fused_call(backend: str):
    """``fastkd.divergence`` to the mixture, one fused call on ``backend``."""

    def loss(student, teachers, weights):
        return fastkd.divergence(student, teachers, teacher_weights=weights, temperature=TEMPERATURE,
                                 backend=backend)

    return loss


def configs(quick: bool) -> list[tuple[str, int, int]]:
    if quick:
        return [("fp32", *SHAPES[0])]
    return [(dtype, n, v) for dtype in DTYPES for n, v in SHAPES]


def sweep(ctx: SweepContext) -> list[dict]:
    """Every provider on every configuration; one row per (configuration, provider)
    (:func:`bench.common.measure_config`)."""
    device = ctx.device
    found, skipped = providers(device, use_compile=ctx.compile)
    if ctx.compile:
        allow_recompiles()
    todo = configs(ctx.quick)
    task = ctx.progress.add_task(FAMILY, total=len(todo) * len(found))
    weights = torch.tensor(WEIGHTS, dtype=torch.float64)
    rows = []
    for dtype_name, n, v in todo:
        dtype = DTYPES[dtype_name]
        generator = torch.Generator(device=device).manual_seed(0)
        s = torch.randn(n, v, device=device, generator=generator).to(dtype).requires_grad_()
        t = torch.randn(len(WEIGHTS), n, v, device=device, generator=generator).to(dtype)
        base = {
            "family": FAMILY, "temperature": TEMPERATURE, "device": device.type, "dtype": dtype_name,
            "N": n, "V": v, "K": len(WEIGHTS), "output_mib": s.nbytes / MIB,
            "traffic_bytes": (len(WEIGHTS) + 2) * s.nbytes, "thp": ctx.thp.short,
        }

        def reset(s=s):
            s.grad = None

        rows += measure_config(
            ctx, task, f"{FAMILY} {dtype_name} {n}×{v}", base, found, (s, t, weights), reset,
            unavailable=skipped,
            unlike_baseline={SEPARATE: "a different objective (Σ w_k D(p_k‖q)): cost of 3 dense passes only"},
        )
        del s, t, reset
    ctx.progress.update(task, description=f"{FAMILY} done")
    return rows


def config_label(row: dict) -> str:
    return f"{row['dtype']} K={row['K']} {row['N']}×{row['V']}"


def size_label(row: dict) -> str:
    return f"{row['N']}×{row['V']}"


def size_order(row: dict) -> tuple[int, int]:
    return (row["N"] * row["V"], row["V"])


def title(rows: list[dict], ctx: SweepContext) -> str:
    return (
        f"fastkd.divergence with K={len(WEIGHTS)} teachers: kl to the mixture (T={TEMPERATURE:g}) "
        f"forward + backward, {ctx.device.type}, {torch.get_num_threads()} threads, THP {ctx.thp.short}"
    )


# ----------------------------------------------------------------------------- pytest-benchmark

_DEVICE = torch.device("cpu")
_PROVIDERS, _ = providers(_DEVICE, use_compile=False)


@pytest.mark.parametrize("provider", list(_PROVIDERS))
def test_mixture_fwd_bwd(benchmark, provider):
    s = torch.randn(32, 2048, requires_grad=True)
    t = torch.randn(3, 32, 2048)
    weights = torch.tensor(WEIGHTS, dtype=torch.float64)
    loss_fn = _PROVIDERS[provider]

    def reset():
        s.grad = None

    def step():
        loss_fn(s, t, weights).backward()
        synchronize(_DEVICE)

    benchmark.pedantic(step, setup=reset, rounds=10, warmup_rounds=1)
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_mixture_providers_agree():
    s = torch.randn(8, 500, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 8, 500, dtype=torch.float64)
    weights = torch.tensor(WEIGHTS, dtype=torch.float64)
    losses = {name: fn(s, t, weights).item() for name, fn in _PROVIDERS.items() if name != SEPARATE}
    for name, loss in losses.items():
        assert loss == pytest.approx(losses[EAGER], rel=1e-9), name
