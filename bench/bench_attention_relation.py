"""Benchmark of ``fastkd.attention_relation_loss`` (MiniLM self-attention relations):
forward + backward of one relation (say the queries) of a student with
``D_s = 384`` against a teacher with ``D_t = 768``, both split into ``A = 12``
relation heads, ``B = 4`` sequences of ``T`` tokens, no mask, the student
requiring a gradient, ``loss.backward()`` with the default upstream gradient.

Providers:

- ``eager``: ``fastkd.reference.attention_relation.attention_relation_loss``,
  which materialises both models' ``(B, A, T, T)`` relations (scores,
  log-softmax, probabilities, the KL terms; autograd keeps several).
- ``compile``: ``torch.compile`` of the same function (``fullgraph``, one
  graph per shape). ``--no-compile`` skips it.
- ``fastkd-cpu`` (CPU), ``fastkd-triton`` and ``fastkd-cuda`` (CUDA): the flash-style kernels,
  which keep ``O(B · A · T)`` statistics and recompute the score tiles in
  backward.

Providers holding ``(B, A, T, T)`` float32 tensors skip a configuration where
their estimate exceeds 80 % of the available memory (measured at T = 512:
eager 10, compile 4 such tensors). At T = 8192 one such tensor is 12 GiB, so
only the fused kernels run there.

No memory-traffic floor: the loss is compute-bound. ``model_gflop`` counts the
matrix products the loss needs, ``2·B·T²·(3·D_s + D_t)``: the scores of both
models (``2·B·T²·D`` each) and the student's two backward products
``dZ X`` and ``dZᵀ X``.
"""

from __future__ import annotations

import torch

import fastkd
from bench.family import Case, Family
from bench.measure import MIB, available_memory_bytes, few_runs, fp32_tensors_skip_reason
from bench.report import COMPILE, EAGER
from fastkd.reference.attention_relation import attention_relation_loss as reference_loss

BATCH, HEADS, STUDENT_DIM, TEACHER_DIM = 4, 12, 384, 768
LENGTHS = (512, 2048, 8192)
# bf16 only at the smaller length: the reference at T = 2048 takes tens of seconds.
BF16_MAX_T = 512
# (B, A, T, T) float32 tensors held at once, measured at T = 512 with bench.measure.peak_extra_bytes.
BATT_TENSORS = {EAGER: 10, COMPILE: 4}
LONG_T = 2048


def model_flop(batch: int, length: int, student_dim: int, teacher_dim: int) -> int:
    """``2·B·T²·(3·D_s + D_t)``: both models' scores, the student's ``dZ X`` and ``dZᵀ X``."""
    return 2 * batch * length**2 * (3 * student_dim + teacher_dim)


def batt_skip_reason(provider: str, batch: int, heads: int, length: int, available: int | None) -> str | None:
    """Why ``provider`` cannot run at this size (its ``(B, A, T, T)`` tensors), or None."""
    return fp32_tensors_skip_reason(BATT_TENSORS.get(provider, 0), batch * heads * length**2, available,
                                    "B×A×T×T")


class AttentionRelationBench(Family):
    name = "attention_relation"
    config_columns = ("device", "dtype", "B", "T", "A", "D_s", "D_t")
    config_keys = ("dtype", "B", "T")
    config_format = "{dtype} B={B} T={T}"
    size_columns = ("T",)
    metric_columns = ("model_gflop", "model_gflops")
    table_metrics = (
        ("model_gflop", "GFLOP", ".1f"),
        ("model_gflops", "GFLOP/s", ".1f"),
    )
    size_axis = f"sequence length T (B = {BATCH}, A = {HEADS}, D_s = {STUDENT_DIM}, D_t = {TEACHER_DIM})"
    small_configs = (("fp32", 2, 64), ("bf16", 2, 64))

    def reference(self, options):
        return lambda s, t: reference_loss(s, t, num_relation_heads=HEADS)

    def fused(self, backend, options):
        return lambda s, t: fastkd.attention_relation_loss(s, t, num_relation_heads=HEADS, backend=backend)

    def all_configs(self):
        return [(dtype, BATCH, length) for dtype in self.dtypes for length in LENGTHS
                if dtype == "fp32" or length <= BF16_MAX_T]

    def case(self, config, device, options, providers):
        dtype_name, batch, length = config
        generator = torch.Generator(device=device).manual_seed(0)
        dtype = self.dtypes[dtype_name]
        s = torch.randn(batch, length, STUDENT_DIM, device=device, generator=generator)
        s = s.to(dtype).requires_grad_()
        t = torch.randn(batch, length, TEACHER_DIM, device=device, generator=generator).to(dtype)
        columns = {
            "dtype": dtype_name, "B": batch, "T": length, "A": HEADS, "D_s": STUDENT_DIM, "D_t": TEACHER_DIM,
            "output_mib": s.nbytes / MIB,  # the student's gradient
            "traffic_bytes": None,  # compute-bound: no floor
            "model_gflop": model_flop(batch, length, STUDENT_DIM, TEACHER_DIM) / 1e9,
        }
        available = available_memory_bytes(device)
        return Case(
            columns, (s, t),
            skip=lambda provider: batt_skip_reason(provider, batch, HEADS, length, available),
            timing=few_runs() if length >= LONG_T else None,
        )

    def describe(self, options):
        return (f"fastkd.attention_relation_loss (A={HEADS}, D_s={STUDENT_DIM}, D_t={TEACHER_DIM}, "
                "the student requires grad)")


BENCH = AttentionRelationBench()


def test_batt_skip_reason():
    gib = 2**30
    # 4·12·8192²·4 B = 12 GiB per tensor: eager 120 GiB.
    assert batt_skip_reason(EAGER, 4, 12, 8192, 23 * gib).startswith("skipped: would need ~120 GiB")
    assert batt_skip_reason(EAGER, 4, 12, 512, 23 * gib) is None
    assert batt_skip_reason("fastkd-cpu", 4, 12, 8192, gib) is None


def test_model_flop():
    assert model_flop(1, 2, 3, 5) == 2 * 4 * (9 + 5)
