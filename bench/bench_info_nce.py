"""Benchmark of ``fastkd.info_nce``: forward + backward of InfoNCE with in-batch
negatives on ``(N, D)`` queries and ``(M, D)`` keys, ``N = M``, positives on
the diagonal, ``τ = 0.07``, both ``q`` and ``k`` requiring a gradient,
``loss.backward()`` with the default upstream gradient of 1.

Providers:

- ``eager``: ``fastkd.reference.info_nce`` itself (``F.cross_entropy(q @ kᵀ / τ,
  arange(N))`` in float32, materialising the ``N × M`` logits). Unlike
  ``fastkd.reference.divergence`` its validation prologue (shape and dtype
  checks, ``arange`` labels; without labels nothing reads a tensor's values)
  does not break ``torch.compile``'s graph: ``fullgraph=True`` compiles it, so
  no stripped-down copy is needed.
- ``compile``: ``torch.compile(fastkd.reference.info_nce, fullgraph=True,
  dynamic=False)``, one graph per shape and dtype, compiled (or loaded from
  ``TORCHINDUCTOR_CACHE_DIR``) in an untimed first call. ``--no-compile``
  skips it.
- ``fastkd-cpu`` (CPU): ``fastkd.info_nce(..., backend="cpu")``, tiled, keeping
  O(N) state (the row log-sum-exp) between forward and backward and
  recomputing the logits in backward. On CUDA ``fastkd-triton`` (flash-style
  kernels) and ``fastkd-cuda`` (cuBLAS tiles + row kernels), each measured
  when ``fastkd.functional.INFO_NCE_KERNELS`` lists it; Liger-Kernel has no
  InfoNCE loss.

``eager`` and ``compile`` hold several ``N × M`` float32 tensors at once
(measured at N = M = 4096, fp32 and bf16: eager 5, compile 2, including the
gradient and softmax temporaries of backward). A configuration where that
estimate exceeds 80 % of the memory available (``MemAvailable`` on CPU, free
device memory on CUDA) skips them with the estimate in the note: at N = 65536
that is ~80 GiB (eager) and ~32 GiB (compile).

No floor: InfoNCE is compute-bound (``2·D`` = 256 FLOP per logit against a
few bytes of input per row), so the memory-traffic floor would be far below
any achievable time; ``traffic_bytes``, ``floor_ms`` and ``x_floor`` are left
empty. Instead the rows count FLOPs of the three ``N × M × D`` matrix
products (the ``N·M`` exps, max and sums are not counted, under 2 % of the
work at D = 128):

- ``model_gflop``: what the loss needs, the same for every provider,
  ``6·N·M·D``: forward ``logits = q kᵀ`` ``2·N·M·D``; backward
  ``grad_q = G k`` and ``grad_k = Gᵀ q`` (``G`` = softmax − one-hot, ``N × M``)
  ``2·N·M·D`` each. ``model_gflops`` = ``model_gflop`` / median time:
  comparable across providers (ratios equal the speed-ups).
- ``executed_gflop``: what the provider runs. ``eager`` / ``compile`` keep the
  logits (or softmax) for backward: ``6·N·M·D``. ``fastkd-cpu`` recomputes the
  logits tile by tile in backward: forward ``2·N·M·D`` + backward
  ``3 · 2·N·M·D`` = ``8·N·M·D``. ``executed_gflops`` is the hardware rate.

Timing: as ``bench_divergence``; a call at N = 65536 (``4.4 TFLOP`` executed
by fastkd-cpu) takes tens of seconds on two cores, so there the first call is
the only warm-up and each provider gets exactly ``LONG_REPEATS`` timed runs.

``python -m bench.run --families info_nce`` runs the sweep; ``pytest bench/``
runs the small pytest-benchmark cases below once each (the project's pytest
options disable timing; add ``--benchmark-enable`` for timings).
"""

from __future__ import annotations

import argparse
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
from fastkd.functional import INFO_NCE_KERNELS
from fastkd.reference import info_nce as reference_info_nce

FAMILY = "info_nce"
DIM = 128
SIZES = (1024, 8192, 65536)  # N = M
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# bf16 only at the smaller sizes: at 65536 only fastkd-cpu runs, tens of seconds a call.
BF16_MAX_N = 8192
CONFIG_KEYS = ("dtype", "N", "M", "D")
COLUMNS = (
    "family", "temperature", "device", "dtype", "N", "M", "D", "provider",
    "median_ms", "min_ms", "max_ms", "repeats", "peak_extra_mib", "output_mib",
    "model_gflop", "model_gflops", "executed_gflop", "executed_gflops",
    "traffic_bytes", "floor_ms", "copy_gbs",
    "speedup_vs_eager", "speedup_vs_compile", "x_floor", "loss_rel_diff", "other_load", "thp", "note",
)
TABLE_COLUMNS = (
    # (row key, header, format); no floor: compute-bound
    ("median_ms", "median ms", ".1f"),
    ("repeats", "runs", "d"),
    ("peak_extra_mib", "peak extra MiB", ".0f"),
    ("model_gflop", "GFLOP (6NMD)", ".1f"),
    ("model_gflops", "GFLOP/s (6NMD)", ".1f"),
    ("executed_gflops", "executed GFLOP/s", ".1f"),
    ("speedup_vs_eager", "vs eager", ".1f"),
    ("speedup_vs_compile", "vs compile", ".2f"),
    ("other_load", "other load", ".2f"),
)
SIZE_AXIS = f"problem size N = M (D = {DIM})"
# grad_q and grad_k: the least a fused forward + backward allocates.
OUTPUT_KEY = "output_mib"
# The reference and fastkd both compute in float32 whatever the input dtype.
# N × M float32 tensors held at once, measured at N = M = 4096 with
# bench.common.peak_extra_bytes (eager 5.0-5.1, compile 2.0-2.1).
NM_TENSORS = {EAGER: 5, COMPILE: 2}
# Of the memory available, what a provider may be expected to take.
MEMORY_FRACTION = 0.8
# N from which a call takes seconds: no extra warm-up, exactly this many runs.
LONG_N = 32768
LONG_REPEATS = 2
LONG_TIMING = {"warmup": 0, "min_repeats": LONG_REPEATS, "max_repeats": LONG_REPEATS, "attempts": 2}


def model_flop(n: int, m: int, d: int) -> int:
    """``6·N·M·D``: forward ``q kᵀ``, backward ``G k`` and ``Gᵀ q``."""
    return 6 * n * m * d


def executed_flop(provider: str, n: int, m: int, d: int) -> int:
    """``model_flop``, plus ``2·N·M·D`` for fastkd's recomputed logits."""
    recompute = 2 * n * m * d if provider.startswith("fastkd") else 0
    return model_flop(n, m, d) + recompute


def available_memory_bytes(device: torch.device) -> int | None:
    """Free device memory on CUDA, ``MemAvailable`` on CPU; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_skip_reason(provider: str, n: int, m: int, available: int | None) -> str | None:
    """Why ``provider`` (``eager`` / ``compile``) cannot run at ``N × M``, or None."""
    if provider not in NM_TENSORS:
        return None
    need = NM_TENSORS[provider] * n * m * 4
    if available is None or need <= MEMORY_FRACTION * available:
        return None
    return (
        f"skipped: would need ~{need / 2**30:.0f} GiB ({NM_TENSORS[provider]} N×M fp32 tensors), "
        f"{available / 2**30:.0f} GiB available"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("info_nce")
    group.add_argument("--nce-temperature", type=float, default=0.07, help="InfoNCE τ")


def providers(device: torch.device, temperature: float, *, use_compile: bool):
    """(name → ``loss(q, k)``, name → why it is not measured)."""

    def eager(q, k):
        return reference_info_nce(q, k, temperature=temperature)

    found = {EAGER: eager}
    skipped = {}
    if use_compile:
        compiled = torch.compile(reference_info_nce, fullgraph=True, dynamic=False)
        found[COMPILE] = lambda q, k: compiled(q, k, temperature=temperature)
    else:
        skipped[COMPILE] = "--no-compile"
    status = fastkd.backends()
    for backend in ("cpu",) if device.type == "cpu" else ("triton", "cuda"):
        name = f"fastkd-{backend}"
        if backend not in INFO_NCE_KERNELS:
            skipped[name] = f"fastkd has no {backend} InfoNCE kernel yet"
        elif status[backend].available:
            found[name] = lambda q, k, backend=backend: fastkd.info_nce(
                q, k, temperature=temperature, backend=backend
            )
        else:
            skipped[name] = status[backend].reason
    if device.type == "cuda":
        skipped["liger"] = "Liger-Kernel has no InfoNCE loss"
    return found, skipped


def configs(quick: bool) -> list[tuple[str, int]]:
    if quick:
        return [("fp32", SIZES[0])]
    return [
        (dtype, n) for dtype in DTYPES for n in SIZES if dtype == "fp32" or n <= BF16_MAX_N
    ]


def sweep(ctx: SweepContext) -> list[dict]:
    """Every provider on every configuration; one row per (configuration, provider)
    (:func:`bench.common.measure_config`; providers that would not fit in
    memory are skipped with the reason)."""
    device = ctx.device
    temperature = ctx.options.get("nce_temperature", 0.07)
    found, skipped = providers(device, temperature, use_compile=ctx.compile)
    if ctx.compile:
        allow_recompiles()
    todo = configs(ctx.quick)
    task = ctx.progress.add_task(FAMILY, total=len(todo) * len(found))
    rows = []
    for dtype_name, n in todo:
        m, d = n, DIM
        dtype = DTYPES[dtype_name]
        generator = torch.Generator(device=device).manual_seed(0)
        # Unit rows, as the SPEC expects: logits in [-1/τ, 1/τ].
        q = torch.nn.functional.normalize(torch.randn(n, d, device=device, generator=generator), dim=1)
        k = torch.nn.functional.normalize(
            q + 0.5 * torch.randn(m, d, device=device, generator=generator), dim=1
        )
        q = q.to(dtype).requires_grad_()
        k = k.to(dtype).requires_grad_()
        label = f"{FAMILY} {dtype_name} {n}×{m}"
        base = {
            "family": FAMILY,
            "temperature": temperature,
            "device": device.type,
            "dtype": dtype_name,
            "N": n,
            "M": m,
            "D": d,
            "output_mib": (q.nbytes + k.nbytes) / MIB,
            "traffic_bytes": None,  # compute-bound: no floor
            "model_gflop": model_flop(n, m, d) / 1e9,
            "thp": ctx.thp.short,
        }

        def reset(q=q, k=k):
            q.grad = k.grad = None

        available = available_memory_bytes(device)
        executed = {name: executed_flop(name, n, m, d) / 1e9 for name in found}
        measured = measure_config(
            ctx, task, label, base, found, (q, k), reset, unavailable=skipped,
            skip=partial(memory_skip_reason, n=n, m=m, available=available),
            timing_options=LONG_TIMING if n >= LONG_N else None,
            per_second={"model_gflops": base["model_gflop"]},
        )
        for row in measured:
            if row.get("median_ms") is not None:
                row["executed_gflop"] = executed[row["provider"]]
                row["executed_gflops"] = executed[row["provider"]] / (row["median_ms"] * 1e-3)
        rows += measured
        del q, k, reset
    ctx.progress.update(task, description=f"{FAMILY} done")
    return rows


def config_label(row: dict) -> str:
    return f"{row['dtype']} {row['N']}×{row['M']}"  # D is in the title


def size_label(row: dict) -> str:
    return f"{row['N']}"


def size_order(row: dict) -> tuple[int, int]:
    return (row["N"] * row["M"], row["M"])


def title(rows: list[dict], ctx: SweepContext) -> str:
    temperature = ctx.options.get("nce_temperature", 0.07)
    return (
        f"fastkd.info_nce (τ={temperature:g}, D={DIM}, q and k require grad) forward + backward, "
        f"{ctx.device.type}, {torch.get_num_threads()} threads, THP {ctx.thp.short}"
    )


# ----------------------------------------------------------------------------- pytest-benchmark

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# torch.compile is left to the sweep: a cold compile costs 10-30 s on CPU.
_PROVIDERS, _ = providers(_DEVICE, 0.07, use_compile=False)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("provider", list(_PROVIDERS))
def test_info_nce_fwd_bwd(benchmark, provider, dtype):
    q = torch.randn(256, 64, device=_DEVICE, dtype=DTYPES[dtype], requires_grad=True)
    k = torch.randn(256, 64, device=_DEVICE, dtype=DTYPES[dtype], requires_grad=True)
    loss_fn = _PROVIDERS[provider]

    def reset():
        q.grad = k.grad = None

    def step():
        loss_fn(q, k).backward()
        synchronize(_DEVICE)

    benchmark.pedantic(step, setup=reset, rounds=20, warmup_rounds=2)
    assert q.grad is not None and q.grad.shape == q.shape
    assert k.grad is not None and k.grad.shape == k.shape


def test_memory_skip_reason():
    gib = 2**30
    # 65536²·4 B = 16 GiB per N×M tensor: eager 80 GiB, compile 32 GiB.
    assert memory_skip_reason(EAGER, 65536, 65536, 23 * gib).startswith("skipped: would need ~80 GiB")
    assert memory_skip_reason(COMPILE, 65536, 65536, 23 * gib).startswith("skipped: would need ~32 GiB")
    assert memory_skip_reason(COMPILE, 65536, 65536, 139 * gib) is None
    assert memory_skip_reason(EAGER, 8192, 8192, 23 * gib) is None
    assert memory_skip_reason("fastkd-cpu", 65536, 65536, gib) is None


def test_flop_counts():
    assert model_flop(2, 3, 5) == 6 * 2 * 3 * 5
    assert executed_flop(EAGER, 2, 3, 5) == model_flop(2, 3, 5)
    assert executed_flop("fastkd-cpu", 2, 3, 5) == 8 * 2 * 3 * 5
