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
- ``fastkd-cpu`` (CPU): ``fastkd.info_nce(..., backend="cpu")`` with the
  default ``logits_memory_budget`` (1 GiB): up to N = M = 16384 it keeps the
  float32 softmax between forward and backward (three GEMMs); beyond, it
  keeps O(N) state (the row log-sum-exp) and recomputes the logits tile by
  tile in backward (four GEMMs). On CUDA ``fastkd-triton`` (flash-style
  kernels, always recomputing) and ``fastkd-cuda`` (cuBLAS + row kernels,
  keeping as on CPU); Liger-Kernel has no InfoNCE loss.
- ``fastkd-cpu recompute`` (``fastkd-cuda recompute`` on CUDA): the same
  with ``logits_memory_budget=0``, i.e. always recomputing, so that both
  modes are measured at every size.

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
- ``executed_gflop``: what the provider runs. ``eager`` / ``compile`` and
  fastkd keeping the softmax: ``6·N·M·D``. fastkd recomputing the logits
  tile by tile in backward: forward ``2·N·M·D`` + backward ``3 · 2·N·M·D`` =
  ``8·N·M·D``. ``executed_gflops`` is the hardware rate.
- ``x_mode_gemm_floor``: the time over the GEMM floor of the provider's
  mode, the floor (three products) scaled by ``executed_gflop /
  model_gflop`` (4/3 when recomputing: the fourth product has the shape of
  the first).

Timing: as ``bench_divergence``; a call at N = 65536 (``4.4 TFLOP`` executed
by fastkd-cpu) takes tens of seconds on two cores, so there the first call is
the only warm-up and each provider gets exactly ``LONG_REPEATS`` timed runs.

``python -m bench.run --families info_nce`` runs the sweep; ``pytest bench/``
runs the small pytest-benchmark cases once each (the project's pytest options
disable timing; add ``--benchmark-enable`` for timings).
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.functional import normalize

import fastkd
from bench.family import Family, compute_bound_case
from bench.measure import available_memory_bytes, fp32_tensors_skip_reason
from bench.report import COMPILE, EAGER, ONE_THREAD
from fastkd.info_nce import DEFAULT_LOGITS_MEMORY_BUDGET, KEEPING_KERNELS
from fastkd.reference import info_nce as reference_info_nce

DIM = 128
RECOMPUTE = " recompute"  # suffix of the fastkd providers run with logits_memory_budget=0
SIZES = (1024, 8192, 65536)  # N = M
# bf16 only at the smaller sizes: at 65536 only fastkd-cpu runs, tens of seconds a call.
BF16_MAX_N = 8192
# N × M float32 tensors held at once, measured at N = M = 4096 with
# bench.measure.peak_extra_bytes (eager 5.0-5.1, compile 2.0-2.1).
NM_TENSORS = {EAGER: 5, COMPILE: 2}
# N from which a call takes seconds: no extra warm-up, exactly two runs.
LONG_N = 32768


def model_flop(n: int, m: int, d: int) -> int:
    """``6·N·M·D``: forward ``q kᵀ``, backward ``G k`` and ``Gᵀ q``."""
    return 6 * n * m * d


def recomputes(provider: str, n: int, m: int) -> bool:
    """Whether ``provider`` recomputes the logits in backward at ``N × M`` (float32:
    fastkd keeps them, on cpu and cuda, when they fit the default budget)."""
    provider = provider.removesuffix(ONE_THREAD)
    if not provider.startswith("fastkd-"):
        return False
    backend = provider.removeprefix("fastkd-").removesuffix(RECOMPUTE)
    if provider.endswith(RECOMPUTE) or backend not in KEEPING_KERNELS:
        return True
    return 4 * n * m > DEFAULT_LOGITS_MEMORY_BUDGET


def executed_flop(provider: str, n: int, m: int, d: int) -> int:
    """``model_flop``, plus ``2·N·M·D`` where fastkd recomputes the logits."""
    recompute = 2 * n * m * d if recomputes(provider, n, m) else 0
    return model_flop(n, m, d) + recompute


def nm_skip_reason(provider: str, n: int, m: int, available: int | None) -> str | None:
    """Why ``provider`` (``eager`` / ``compile``) cannot run at ``N × M``, or None."""
    return fp32_tensors_skip_reason(NM_TENSORS.get(provider, 0), n * m, available, "N×M")


class InfoNceBench(Family):
    name = "info_nce"
    config_columns = ("temperature", "device", "dtype", "N", "M", "D")
    config_keys = ("dtype", "N", "M", "D")
    config_format = "{dtype} {N}×{M}"  # D is in the title
    size_columns = ("N",)
    metric_columns = ("model_gflop", "model_gflops", "executed_gflop", "executed_gflops", "x_mode_gemm_floor")
    table_metrics = (  # no floor: compute-bound
        ("model_gflop", "GFLOP (6NMD)", ".1f"),
        ("model_gflops", "GFLOP/s (6NMD)", ".1f"),
        ("executed_gflops", "executed GFLOP/s", ".1f"),
    )
    size_axis = f"problem size N = M (D = {DIM})"
    small_configs = (("fp32", 256, 64), ("bf16", 256, 64))
    report_configs = scaling_configs = (("fp32", 8192, DIM),)

    def floor_gemms(self, row):
        """``q kᵀ``, ``G k`` and ``Gᵀ q``: the three products of ``6·N·M·D``."""
        n, m, d = row["N"], row["M"], row["D"]
        return [(n, d, m), (n, m, d), (m, n, d)]

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("info_nce")
        group.add_argument("--nce-temperature", type=float, default=0.07, help="InfoNCE τ")

    def reference(self, options):
        temperature = options["nce_temperature"]
        return lambda q, k: reference_info_nce(q, k, temperature=temperature)

    def fused(self, backend, options, logits_memory_budget=DEFAULT_LOGITS_MEMORY_BUDGET):
        temperature = options["nce_temperature"]
        return lambda q, k: fastkd.info_nce(
            q, k, temperature=temperature, backend=backend, logits_memory_budget=logits_memory_budget
        )

    def more_providers(self, device, options, found, skipped):
        for backend in KEEPING_KERNELS:
            name = f"fastkd-{backend}"
            if name in found:
                found[name + RECOMPUTE] = self.fused(backend, options, logits_memory_budget=0)
            elif name in skipped:
                skipped[name + RECOMPUTE] = skipped[name]
        if device.type == "cuda":
            skipped["liger"] = "Liger-Kernel has no InfoNCE loss"

    def all_configs(self):
        return [(dtype, n, DIM) for dtype in self.dtypes for n in SIZES if dtype == "fp32" or n <= BF16_MAX_N]

    def case(self, config, device, options, providers):
        dtype_name, n, d = config
        m = n
        generator = torch.Generator(device=device).manual_seed(0)
        # Unit rows, as the loss expects: logits in [-1/τ, 1/τ].
        q = normalize(torch.randn(n, d, device=device, generator=generator), dim=1)
        k = normalize(q + 0.5 * torch.randn(m, d, device=device, generator=generator), dim=1)
        dtype = self.dtypes[dtype_name]
        q = q.to(dtype).requires_grad_()
        k = k.to(dtype).requires_grad_()
        columns = {"temperature": options["nce_temperature"], "dtype": dtype_name, "N": n, "M": m, "D": d}
        available = available_memory_bytes(device)
        return compute_bound_case(
            columns, (q, k), lambda provider: nm_skip_reason(provider, n, m, available), model_flop(n, m, d),
            long_calls=n >= LONG_N,
        )

    def finish(self, rows):
        for row in rows:
            if row.get("median_ms") is not None:
                executed = executed_flop(row["provider"], row["N"], row["M"], row["D"]) / 1e9
                row["executed_gflop"] = executed
                row["executed_gflops"] = executed / (row["median_ms"] * 1e-3)

    def add_gemm_floor(self, ctx, rows):
        super().add_gemm_floor(ctx, rows)
        for row in rows:
            if row.get("x_gemm_floor") is not None and row.get("executed_gflop") is not None:
                row["x_mode_gemm_floor"] = row["x_gemm_floor"] * row["model_gflop"] / row["executed_gflop"]

    def describe(self, options):
        return f"fastkd.info_nce (τ={options['nce_temperature']:g}, D={DIM}, q and k require grad)"


BENCH = InfoNceBench()



def test_nm_skip_reason():
    gib = 2**30
    # 65536²·4 B = 16 GiB per N×M tensor: eager 80 GiB, compile 32 GiB.
    assert nm_skip_reason(EAGER, 65536, 65536, 23 * gib).startswith("skipped: would need ~80 GiB")
    assert nm_skip_reason(COMPILE, 65536, 65536, 23 * gib).startswith("skipped: would need ~32 GiB")
    assert nm_skip_reason(COMPILE, 65536, 65536, 139 * gib) is None
    assert nm_skip_reason(EAGER, 8192, 8192, 23 * gib) is None
    assert nm_skip_reason("fastkd-cpu", 65536, 65536, gib) is None


def test_flop_counts():
    assert model_flop(2, 3, 5) == 6 * 2 * 3 * 5
    assert executed_flop(EAGER, 2, 3, 5) == model_flop(2, 3, 5)
    assert executed_flop("fastkd-cpu", 2, 3, 5) == 6 * 2 * 3 * 5  # keeps the softmax
    assert executed_flop("fastkd-cpu recompute", 2, 3, 5) == 8 * 2 * 3 * 5
    assert executed_flop("fastkd-triton", 2, 3, 5) == 8 * 2 * 3 * 5
    assert executed_flop("fastkd-cpu", 65536, 65536, 5) == 8 * 65536 * 65536 * 5  # 16 GiB: recomputes
    assert executed_flop("fastkd-cpu recompute (1 thread)", 2, 3, 5) == 8 * 2 * 3 * 5
