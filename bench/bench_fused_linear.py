"""Benchmark of ``fastkd.fused_linear_divergence``: forward + backward of the
LLM-distillation head, ``KL(softmax(t_h W_tᵀ / T) ‖ softmax(s_h W_sᵀ / T))``
(``T = 2``, batchmean) on ``(N, H)`` hidden states and ``(V, H)`` weights, the
student hidden states and weight requiring a gradient, the teacher not,
``loss.backward()`` with the default upstream gradient of 1.

Providers:

- ``eager``: ``F.linear`` for both heads (the teacher under ``no_grad``), then
  the divergence's formula with autograd (``bench.bench_divergence.reference_loss``:
  ``fastkd.reference.divergence`` without its row-selection prologue): the
  plain-PyTorch way.
- ``unfused-cpu``: the same two ``F.linear`` calls, then
  ``fastkd.divergence(..., backend="cpu")``: the fused divergence kernel on
  materialised ``(N, V)`` logits. This is the baseline of the targets.
- ``fastkd-cpu``: ``fastkd.fused_linear_divergence(..., backend="cpu")``:
  chunks of rows (``memory_budget`` 128 MiB for fp32, 64 MiB for bf16:
  ``fastkd.fused_linear.default_memory_budget``), the logits never whole; for
  bf16 the chunk logits and their gradient are float32, every product a
  bfloat16 gemm summing in float32, the weight gradient summed in float32.
  On CPU the gradient enters its two products as two bfloat16 terms (16
  significant bits), so those two products cost twice the unfused path's,
  which rounds the gradient to bfloat16 once.

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
configuration): peak extra memory ≤ ¼ of unfused, time ≤ 0.8× unfused.

The work is four ``N × V × H`` matrix products (student and teacher logits,
``grad_hidden = G W``, ``grad_weight = Gᵀ h``), ``8·N·V·H`` FLOP in all
(``model_gflop``), compute-bound; the divergence itself is ``O(N·V)``. Two
floors, both measured in the same run:

- the GEMM floor (``gemm_floor_ms``, ``x_gemm_floor``): the four products
  with ``torch.mm`` in the inputs' dtype, the products the unfused path runs
  (bfloat16 in, bfloat16 out for bf16 rows);
- the head-product floor (``head_product_floor_ms``,
  ``x_head_product_floor``): the four products with the fused head's own
  product (``fastkd.fused_linear._matmul_into``: a float32 result, the
  operands read in their dtypes, or converted where the device's op does
  not take them; for a bfloat16 head on CPU the gradient's products on its
  two bfloat16 terms, as the head runs them), timed on one chunk of the
  default size and scaled to ``N`` rows. For bf16 on CPU its gradient
  products on the gradient's two bfloat16 terms are twice the unfused path's
  multiply-adds, so this floor is about 1.5× the GEMM floor at equal rates;
  it is higher again where the head's product runs slower than
  ``torch.mm``'s. The fused head cannot be faster than it:
  ``head_product_gflops`` against ``gemm_gflops`` says why.

Peak extra memory counts the gradients (``grad_weight`` is ``V × H``)
besides the temporaries.

``python -m bench.run --families fused_linear`` runs the sweep; the first
configuration (``--quick``) is small. ``pytest bench/`` runs the small
pytest-benchmark cases once each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastkd
from bench.bench_divergence import reference_loss as plain_divergence
from bench.family import Case, Family
from bench.measure import MIB, available_memory_bytes, few_runs, fp32_tensors_skip_reason, time_call
from bench.report import EAGER
from fastkd import fused_linear
from fastkd.reference import divergence as reference_divergence

TEMPERATURE = 2.0
# (N, H, V): a small one first (--quick), then the target shape.
SIZES = ((512, 256, 8000), (4096, 1024, 32000))
TIME_TARGET = 0.8  # fused time ≤ 0.8 × unfused
MEMORY_TARGET = 0.25  # fused peak extra memory ≤ ¼ of unfused
# N × V float32 tensors the eager provider holds at once (logits, log-softmaxes,
# probabilities, the log ratio and gradients); used only to skip it where it
# cannot fit.
EAGER_NV_TENSORS = 10
MEMORY_FRACTION = 0.5


def model_flop(n: int, h: int, v: int) -> int:
    """``8·N·V·H``: two logit matmuls, ``grad_hidden`` and ``grad_weight``."""
    return 8 * n * h * v


def eager_loss(s_h, s_w, t_h, t_w):
    s = F.linear(s_h, s_w)
    with torch.no_grad():
        t = F.linear(t_h, t_w)
    return plain_divergence(s, t, divergence="kl", temperature=TEMPERATURE)


def unfused_loss(backend: str):
    """Both heads' logits materialised, then ``fastkd.divergence`` on ``backend``."""

    def unfused(s_h, s_w, t_h, t_w):
        s = F.linear(s_h, s_w)
        with torch.no_grad():
            t = F.linear(t_h, t_w)
        return fastkd.divergence(s, t, temperature=TEMPERATURE, backend=backend)

    return unfused


def fused_loss(backend: str):
    def fused(s_h, s_w, t_h, t_w):
        return fastkd.fused_linear_divergence(s_h, s_w, t_h, t_w, temperature=TEMPERATURE, backend=backend)

    return fused


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


def head_product_ms(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device) -> float:
    """Milliseconds of the fused head's four products over ``N`` rows at the rate
    its own product reaches: one chunk of the default size (logits, ``G W``,
    ``Gᵀ h`` accumulated), each timed with ``fastkd.fused_linear._matmul_into``
    on operands of the dtypes and layouts the head passes, scaled by
    ``N / rows``."""
    rows = min(n, fused_linear.default_chunk_rows(n, v, h, dtype, device.type))
    compute = fused_linear.compute_dtype(dtype)
    generator = torch.Generator(device=device).manual_seed(1)

    def randn(*shape, dtype=dtype):
        return torch.randn(*shape, device=device, generator=generator).to(dtype)

    # the head's operands: read as they are where the product takes them, else
    # converted to the compute dtype (each weight once per call)
    native = fused_linear._native_mixed_matmul(device)
    hidden, weight = randn(rows, h), randn(v, h)
    if not native:
        hidden, weight = hidden.to(compute), weight.to(compute)
    grad = randn(rows, v, dtype=compute)
    # the gradient's two bfloat16 terms where the head splits it (a bfloat16 head on CPU)
    splits = fused_linear._splits_gradient(hidden, weight)
    if splits:
        grad = fused_linear._bfloat16_terms_(grad)
    logits = torch.empty(rows, v, device=device, dtype=compute)
    grad_hidden = torch.empty(rows, h, device=device, dtype=dtype)
    grad_weight = torch.zeros(v, h, device=device, dtype=compute)
    products = (
        lambda: fused_linear._matmul_into(logits, hidden, weight.t(), accumulate=False),
        lambda: fused_linear._hidden_gradient_(grad_hidden, slice(None), None, grad, weight, terms=splits),
        lambda: fused_linear._weight_gradient_(grad_weight, grad, hidden, terms=splits),
    )
    medians = [
        time_call(product, device=device, warmup=1, min_repeats=3, max_repeats=10, budget_s=0.5).median_ms
        for product in products
    ]
    # two logit products (student, teacher), one of each gradient
    return (2 * medians[0] + medians[1] + medians[2]) * n / rows


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


def add_unfused_ratios(rows: list[dict]) -> None:
    """``time_vs_unfused``, ``memory_vs_unfused`` (and the ``target`` verdict for
    fastkd's rows) in place, for one configuration's measured rows."""
    unfused = next(
        (row for row in rows if row["provider"].startswith("unfused-") and "median_ms" in row), None
    )
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


class FusedLinearBench(Family):
    name = "fused_linear"
    config_columns = ("temperature", "device", "dtype", "N", "H", "V")
    config_keys = ("dtype", "N", "H", "V")
    config_format = "{dtype} {N}×{V} (H {H})"
    description = (
        f"fastkd.fused_linear_divergence (KL, T={TEMPERATURE:g}, student hidden + weight require grad)"
    )
    metric_columns = (
        "model_gflop", "model_gflops", "time_vs_unfused", "memory_vs_unfused", "target",
        "head_product_gflops", "head_product_floor_ms", "x_head_product_floor",
    )
    table_metrics = (  # compute-bound: the GEMM floors, no memory-traffic floor
        ("model_gflops", "GFLOP/s (8NVH)", ".1f"),
        ("time_vs_unfused", "time / unfused", ".2f"),
        ("memory_vs_unfused", "memory / unfused", ".2f"),
        ("head_product_gflops", "head product GFLOP/s", ".1f"),
        ("x_head_product_floor", "× head-product floor", ".2f"),
    )
    size_axis = "problem size N × V (H given in the label)"
    no_compile = "not measured for this family (see the module docstring)"
    small_configs = (("fp32", 64, 32, 500), ("bf16", 64, 32, 500))

    def reference(self, options):
        return eager_loss

    def fused(self, backend, options):
        return fused_loss(backend)

    def more_providers(self, device, options, found, skipped):
        """``unfused-<backend>`` next to each fused provider; Liger-Kernel's fused
        linear KL on CUDA."""
        for backend in [name.removeprefix("fastkd-") for name in found if name.startswith("fastkd-")]:
            found[f"unfused-{backend}"] = unfused_loss(backend)
        if device.type == "cuda":
            liger, why = _liger()
            if liger is None:
                skipped["liger"] = why
            else:
                found["liger"] = liger

    def floor_gemms(self, row):
        """The four products of ``8·N·V·H``: two ``(N, H) @ (H, V)`` logits,
        ``(N, V) @ (V, H)`` and ``(V, N) @ (N, H)``."""
        n, h, v = row["N"], row["H"], row["V"]
        return [(n, h, v), (n, h, v), (n, v, h), (v, n, h)]

    def add_gemm_floor(self, ctx, rows):
        super().add_gemm_floor(ctx, rows)
        if not rows:
            return
        first = rows[0]
        floor = head_product_ms(first["N"], first["H"], first["V"], self.dtypes[first["dtype"]], ctx.device)
        for row in rows:
            row["head_product_floor_ms"] = floor
            row["head_product_gflops"] = row["model_gflop"] / (floor * 1e-3)
            if row.get("median_ms") is not None:
                row["x_head_product_floor"] = row["median_ms"] / floor

    def baseline(self, providers):
        return next((name for name in providers if name.startswith("unfused-")), None)

    def all_configs(self):
        return [(dtype, *size) for dtype in self.dtypes for size in SIZES]

    def case(self, config, device, options, providers):
        dtype_name, n, h, v = config
        inputs = make_inputs(n, h, v, self.dtypes[dtype_name], device)
        s_h, s_w = inputs[0], inputs[1]
        columns = {
            "temperature": TEMPERATURE, "dtype": dtype_name, "N": n, "H": h, "V": v,
            "output_mib": (s_h.nbytes + s_w.nbytes) / MIB,
            "traffic_bytes": None,  # compute-bound: no floor
            "model_gflop": model_flop(n, h, v) / 1e9,
        }
        available = available_memory_bytes(device) if device.type == "cpu" else None
        too_big = fp32_tensors_skip_reason(EAGER_NV_TENSORS, n * v, available, "N×V", MEMORY_FRACTION)

        def skip(provider: str) -> str | None:
            return too_big if provider == EAGER else None

        return Case(columns, inputs, skip=skip, timing=few_runs(3) if n * h * v >= 2**30 else None)

    def finish(self, rows):
        add_unfused_ratios(rows)


BENCH = FusedLinearBench()



def test_target_verdict():
    assert target_verdict(0.7, 0.2) == "met"
    assert target_verdict(1.3, 0.2) == "missed: time 1.30× > 0.8×"
    assert target_verdict(0.5, 0.5) == "missed: memory 0.50× > 0.25×"
    assert target_verdict(None, 0.1) == "not measured"


def test_flop_count():
    assert model_flop(2, 3, 5) == 8 * 2 * 3 * 5


def test_eager_provider_is_the_plain_formula():
    """The eager provider is the two heads and the divergence's formula alone, one graph: no
    row-selection prologue (nonzero, index copies of the logits, a check read on the host),
    which would add work no one computing this loss would do; and it is the reference."""
    s_h, t_h = torch.randn(6, 16, requires_grad=True), torch.randn(6, 16)
    s_w, t_w = torch.randn(40, 16, requires_grad=True), torch.randn(40, 16)
    explanation = torch._dynamo.explain(eager_loss)(s_h, s_w, t_h, t_w)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    expected = reference_divergence(F.linear(s_h, s_w), F.linear(t_h, t_w), temperature=TEMPERATURE)
    torch.testing.assert_close(eager_loss(s_h, s_w, t_h, t_w), expected)
