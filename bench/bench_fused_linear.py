"""Benchmark of ``fastkd.fused_linear_divergence``: forward + backward of the
LLM-distillation head, ``KL(softmax(t_h W_tᵀ / T) ‖ softmax(s_h W_sᵀ / T))``
(``T = 2``, batchmean) on ``(N, H)`` hidden states and ``(V, H)`` weights, the
student hidden states and weight requiring a gradient, the teacher not,
``loss.backward()`` with the default upstream gradient of 1.

Providers:

- ``eager``: ``F.linear`` for both heads (the teacher under ``no_grad``), then
  ``fastkd.reference.divergence`` with autograd: the plain-PyTorch way.
- ``unfused-cpu``: the same two ``F.linear`` calls, then
  ``fastkd.divergence(..., backend="cpu")``: the fused divergence kernel on
  materialised ``(N, V)`` logits. This is the baseline of the targets.
- ``fastkd-cpu``: ``fastkd.fused_linear_divergence(..., backend="cpu")``:
  chunks of rows (``memory_budget`` 128 MiB for fp32, 32 MiB for bf16:
  ``fastkd.fused_linear.default_memory_budget``), the logits never whole; for
  bf16 the weight gradient is accumulated in bf16 (one rounding per chunk).
- ``fastkd-cpu-f32acc`` (bf16 only): the same with
  ``weight_grad_dtype=torch.float32``, a float32 weight-gradient accumulator
  (one rounding at the end, as the unfused backward).

- ``liger`` (CUDA, when ``liger_kernel`` imports): Liger-Kernel's
  ``LigerFusedLinearJSD`` with ``jsd_beta=0`` (its forward KL, in the Liger
  versions whose β may be 0; skipped with the reason otherwise) times T², its
  loss being the per-token mean without the T² factor. ``loss_rel_diff``
  against ``unfused`` checks that it is the same loss.

``compile`` is not measured for this family (the comparison is fused vs
unfused; compiling the reference at N·V = 1.3·10⁸ on two cores is slow and
changes nothing in the matmuls). On CUDA the fused path runs the Triton / CUDA
divergence kernels per chunk (``fastkd-triton``, ``fastkd-cuda``).

Targets (checked in the ``target`` column against ``unfused-cpu`` of the same
configuration): peak extra memory ≤ ¼ of unfused, time ≤ 1.2× unfused.

No floor: the work is four ``N × V × H`` matrix products (student and
teacher logits, ``grad_hidden = G W``, ``grad_weight = Gᵀ h``), ``8·N·V·H``
FLOP in all (``model_gflop``), compute-bound; the divergence itself is
``O(N·V)``. Peak extra memory counts the gradients (``grad_weight`` is
``V × H``) besides the temporaries.

``python -m bench.run --families fused_linear`` runs the sweep; the first
configuration (``--quick``) is small. ``pytest bench/`` runs the small
pytest-benchmark cases below once each.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastkd
from bench.common import (
    EAGER,
    MIB,
    SweepContext,
    measure_config,
    synchronize,
)
from fastkd.reference import divergence as reference_divergence

FAMILY = "fused_linear"
TEMPERATURE = 2.0
UNFUSED = "unfused-cpu"
# (N, H, V): a small one first (--quick), then the target shape.
SIZES = ((512, 256, 8000), (4096, 1024, 32000))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONFIG_KEYS = ("dtype", "N", "H", "V")
COLUMNS = (
    "family", "temperature", "device", "dtype", "N", "H", "V", "provider",
    "median_ms", "min_ms", "max_ms", "repeats", "peak_extra_mib", "output_mib",
    "model_gflop", "model_gflops", "traffic_bytes", "floor_ms", "copy_gbs",
    "speedup_vs_eager", "speedup_vs_compile", "x_floor", "time_vs_unfused", "memory_vs_unfused",
    "target", "loss_rel_diff", "other_load", "thp", "note",
)  # fmt: skip
TABLE_COLUMNS = (
    ("median_ms", "median ms", ".0f"),
    ("repeats", "runs", "d"),
    ("peak_extra_mib", "peak extra MiB", ".0f"),
    ("model_gflops", "GFLOP/s (8NVH)", ".1f"),
    ("time_vs_unfused", "time / unfused", ".2f"),
    ("memory_vs_unfused", "memory / unfused", ".2f"),
    ("speedup_vs_eager", "vs eager", ".2f"),
    ("other_load", "other load", ".2f"),
)
SIZE_AXIS = "problem size N × V (H given in the label)"
OUTPUT_KEY = "output_mib"
TIME_TARGET = 1.2  # fused time ≤ 1.2 × unfused
MEMORY_TARGET = 0.25  # fused peak extra memory ≤ ¼ of unfused
# N × V float32 tensors the eager provider holds at once (logits, log-softmaxes,
# probabilities, the log ratio and gradients); used only to skip it where it
# cannot fit.
EAGER_NV_TENSORS = 10
MEMORY_FRACTION = 0.5


def model_flop(n: int, h: int, v: int) -> int:
    """``8·N·V·H``: two logit matmuls, ``grad_hidden`` and ``grad_weight``."""
    return 8 * n * h * v


def available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def providers(device: torch.device):
    """(name → ``loss(s_h, s_w, t_h, t_w)``, name → why it is not measured)."""

    def eager(s_h, s_w, t_h, t_w):
        s = F.linear(s_h, s_w)
        with torch.no_grad():
            t = F.linear(t_h, t_w)
        return reference_divergence(s, t, temperature=TEMPERATURE)

    found = {EAGER: eager}
    skipped = {"compile": "not measured for this family (see the module docstring)"}
    status = fastkd.backends()
    for backend in ("cpu",) if device.type == "cpu" else ("triton", "cuda"):
        if not status[backend].available:
            skipped[f"fastkd-{backend}"] = status[backend].reason
            continue

        def unfused(s_h, s_w, t_h, t_w, backend=backend):
            s = F.linear(s_h, s_w)
            with torch.no_grad():
                t = F.linear(t_h, t_w)
            return fastkd.divergence(s, t, temperature=TEMPERATURE, backend=backend)

        def fused(s_h, s_w, t_h, t_w, backend=backend):
            return fastkd.fused_linear_divergence(
                s_h, s_w, t_h, t_w, temperature=TEMPERATURE, backend=backend
            )

        def fused_f32acc(s_h, s_w, t_h, t_w, backend=backend):
            return fastkd.fused_linear_divergence(
                s_h, s_w, t_h, t_w, temperature=TEMPERATURE, backend=backend, weight_grad_dtype=torch.float32
            )

        found[f"unfused-{backend}"] = unfused
        found[f"fastkd-{backend}"] = fused
        found[f"fastkd-{backend}-f32acc"] = fused_f32acc
    if device.type == "cuda":
        liger, why = _liger()
        if liger is None:
            skipped["liger"] = why
        else:
            found["liger"] = liger
    return found, skipped


def _liger():
    """(``loss(s_h, s_w, t_h, t_w)`` of Liger-Kernel's fused linear KL, None) or (None, why not)."""
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        return None, "liger_kernel not installed"
    try:
        module = LigerFusedLinearJSD(jsd_beta=0.0, temperature=TEMPERATURE)
    except (AssertionError, ValueError) as exc:  # versions whose beta must lie in (0, 1)
        return None, f"this Liger-Kernel has no forward-KL fused linear loss (jsd_beta=0: {exc})"

    def liger(s_h, s_w, t_h, t_w):
        return TEMPERATURE**2 * module(s_h, s_w, t_h, t_w)

    return liger, None


def configs(quick: bool) -> list[tuple[str, tuple[int, int, int]]]:
    if quick:
        return [("fp32", SIZES[0])]
    return [(dtype, size) for dtype in DTYPES for size in SIZES]


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device):
    """Hidden states of unit variance and weights giving logits of O(1)."""
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, std=1.0):
        return (std * torch.randn(*shape, device=device, generator=generator)).to(dtype)

    s_h = randn(n, h).requires_grad_()
    s_w = randn(v, h, std=2 * h**-0.5).requires_grad_()
    t_h = randn(n, h)
    t_w = randn(v, h, std=2 * h**-0.5)
    return s_h, s_w, t_h, t_w


def target_verdict(time_ratio: float | None, memory_ratio: float | None) -> str:
    """``met`` / ``missed (...)`` for the fused provider against unfused."""
    if time_ratio is None or memory_ratio is None:
        return "not measured"
    missed = []
    if time_ratio > TIME_TARGET:
        missed.append(f"time {time_ratio:.2f}× > {TIME_TARGET}×")
    if memory_ratio > MEMORY_TARGET:
        missed.append(f"memory {memory_ratio:.2f}× > {MEMORY_TARGET}×")
    return "met" if not missed else "missed: " + ", ".join(missed)


def add_unfused_ratios(rows: list[dict], unfused_name: str | None) -> None:
    """``time_vs_unfused``, ``memory_vs_unfused`` (and the issue's ``target``
    verdict for fastkd's rows) in place, for one configuration's measured rows."""
    unfused = next((row for row in rows if row["provider"] == unfused_name and "median_ms" in row), None)
    if unfused is None:
        return
    for row in rows:
        if row is unfused or row.get("median_ms") is None:
            continue
        row["time_vs_unfused"] = row["median_ms"] / unfused["median_ms"]
        if row["peak_extra_mib"] is not None and unfused["peak_extra_mib"]:
            row["memory_vs_unfused"] = row["peak_extra_mib"] / unfused["peak_extra_mib"]
        if row["provider"].startswith("fastkd-"):
            row["target"] = target_verdict(row["time_vs_unfused"], row.get("memory_vs_unfused"))


def sweep(ctx: SweepContext) -> list[dict]:
    """Every provider on every configuration; one row per (configuration, provider)."""
    device = ctx.device
    found, skipped = providers(device)
    todo = configs(ctx.quick)
    task = ctx.progress.add_task(FAMILY, total=len(todo) * len(found))
    rows = []
    for dtype_name, (n, h, v) in todo:
        dtype = DTYPES[dtype_name]
        inputs = make_inputs(n, h, v, dtype, device)
        s_h, s_w = inputs[0], inputs[1]
        label = f"{FAMILY} {dtype_name} {n}×{h}×{v}"
        base = {
            "family": FAMILY,
            "temperature": TEMPERATURE,
            "device": device.type,
            "dtype": dtype_name,
            "N": n,
            "H": h,
            "V": v,
            "output_mib": (s_h.nbytes + s_w.nbytes) / MIB,
            "traffic_bytes": None,  # compute-bound: no floor
            "model_gflop": model_flop(n, h, v) / 1e9,
            "thp": ctx.thp.short,
        }

        def reset(s_h=s_h, s_w=s_w):
            s_h.grad = s_w.grad = None

        available = available_memory_bytes() if device.type == "cpu" else None
        need = EAGER_NV_TENSORS * n * v * 4
        too_big = None
        if available is not None and need > MEMORY_FRACTION * available:
            too_big = f"skipped: would need ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"
        slow = n * h * v >= 2**30
        unfused_name = next((name for name in found if name.startswith("unfused-")), None)
        measured = measure_config(
            ctx, task, label, base, found, inputs, reset, unavailable=skipped,
            skip=lambda name, why=too_big, dtype_name=dtype_name: (
                why if name == EAGER
                else "float32 inputs accumulate in float32 anyway"
                if name.endswith("-f32acc") and dtype_name == "fp32" else None
            ),
            baseline=unfused_name,
            timing_options={"warmup": 0, "min_repeats": 3, "max_repeats": 3, "attempts": 2} if slow else None,
            per_second={"model_gflops": base["model_gflop"]},
        )
        add_unfused_ratios(measured, unfused_name)
        rows += measured
        del inputs, s_h, s_w, reset
    ctx.progress.update(task, description=f"{FAMILY} done")
    return rows


def config_label(row: dict) -> str:
    return f"{row['dtype']} {row['N']}×{row['V']} (H {row['H']})"


def size_label(row: dict) -> str:
    return f"{row['N']}×{row['V']}"


def size_order(row: dict) -> tuple[int, int]:
    return (row["N"] * row["V"] * row["H"], row["V"])


def title(rows: list[dict], ctx: SweepContext) -> str:
    return (
        f"fastkd.fused_linear_divergence (KL, T={TEMPERATURE:g}, student hidden + weight require grad) "
        f"forward + backward, {ctx.device.type}, {torch.get_num_threads()} threads, THP {ctx.thp.short}"
    )


# ----------------------------------------------------------------------------- pytest-benchmark

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_PROVIDERS, _ = providers(_DEVICE)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("provider", list(_PROVIDERS))
def test_fused_linear_fwd_bwd(benchmark, provider, dtype):
    inputs = make_inputs(64, 32, 500, DTYPES[dtype], _DEVICE)
    loss_fn = _PROVIDERS[provider]

    def reset():
        inputs[0].grad = inputs[1].grad = None

    def step():
        loss_fn(*inputs).backward()
        synchronize(_DEVICE)

    benchmark.pedantic(step, setup=reset, rounds=5, warmup_rounds=1)
    assert inputs[0].grad is not None and inputs[0].grad.shape == inputs[0].shape
    assert inputs[1].grad is not None and inputs[1].grad.shape == inputs[1].shape


def test_target_verdict():
    assert target_verdict(1.1, 0.2) == "met"
    assert target_verdict(1.3, 0.2) == "missed: time 1.30× > 1.2×"
    assert target_verdict(1.0, 0.5) == "missed: memory 0.50× > 0.25×"
    assert target_verdict(None, 0.1) == "not measured"


def test_flop_count():
    assert model_flop(2, 3, 5) == 8 * 2 * 3 * 5
