"""Benchmark of ``fastkd.uld_loss`` (Universal Logit Distillation across vocabularies):
forward + backward over ``N`` aligned rows of a student vocabulary ``V_s``
against a teacher vocabulary ``V_t``, no mask, the student requiring a
gradient, ``loss.backward()`` with the default upstream gradient.

Sizes: N = 2048 rows, (V_s, V_t) = (32000, 128256) (a Llama-2-sized student
under a Llama-3 teacher) and (151936, 128256) (a Qwen-2.5 student under a
Llama-3 teacher), float32 and bfloat16 logits.

Providers:

- ``eager``: the TRL-style computation in eager PyTorch (as
  ``trl.experimental.gold.ULDLoss`` does it): both softmaxes, a full
  ``torch.sort`` of both vocabularies per row, zero padding of the shorter,
  ``|a − b|`` summed per row and averaged over rows. Autograd keeps the
  probabilities, the sort indices (int64) and the padded sorted rows.
- ``compile``: ``torch.compile`` of the same function (``fullgraph``).
  ``--no-compile`` skips it.
- ``fastkd-cpu`` (CPU): ``fastkd::uld_forward``, one row per task, a radix
  sort on a per-thread scratch; the gradient comes from the same pass.
  ``fastkd-cuda`` (CUDA): the same op, a segmented radix sort of a chunk of
  rows in a bounded scratch. ``fastkd-triton`` (CUDA) sorts a row in
  registers up to ``kernels.uld.MAX_VOCAB`` entries, longer rows with
  ``torch.sort`` of packed keys per chunk of rows and a blockwise kernel.

``traffic_bytes`` is the least a fused call moves: both logit matrices read
once and the student's gradient written once.
"""

from __future__ import annotations

import torch

import fastkd
from bench.family import Case, Family
from bench.measure import MIB, available_memory_bytes, few_runs, fp32_tensors_skip_reason
from bench.report import COMPILE, EAGER

ROWS = 2048
VOCABULARIES = ((32000, 128256), (151936, 128256))
# float32 (N, max(V_s, V_t))-sized tensors held at once (an int64 index counts
# twice): eager measured with bench.measure.peak_extra_bytes at N = 64, 6.0 for
# (32000, 128256) and 8.7 for (151936, 128256); compile estimated from what it
# keeps (probabilities, sort indices of both rows, the padded difference).
ROW_TENSORS = {EAGER: 9, COMPILE: 8}


def trl_style_uld(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """The eager ULD of TRL: sort both full vocabularies per row, pad, L1, mean over rows."""
    p = torch.softmax(student_logits.float(), -1)
    q = torch.softmax(teacher_logits.float(), -1)
    a = p.sort(-1, descending=True).values
    b = q.sort(-1, descending=True).values
    width = max(a.shape[-1], b.shape[-1])
    a = torch.nn.functional.pad(a, (0, width - a.shape[-1]))
    b = torch.nn.functional.pad(b, (0, width - b.shape[-1]))
    return (a - b).abs().sum(-1).mean()


def rows_skip_reason(provider: str, rows: int, width: int, available: int | None) -> str | None:
    """Why ``provider`` cannot run at this size (its ``(N, W)`` tensors), or None."""
    return fp32_tensors_skip_reason(ROW_TENSORS.get(provider, 0), rows * width, available, "N×W")


class ULDBench(Family):
    name = "uld"
    config_columns = ("device", "dtype", "N", "V_s", "V_t")
    config_keys = ("dtype", "N", "V_s", "V_t")
    config_format = "{dtype} N={N} V_s={V_s} V_t={V_t}"
    size_columns = ("N", "V_s")
    size_axis = "problem size N × V_s (V_t = 128256)"
    small_configs = (("fp32", 32, 500, 1200), ("bf16", 32, 1200, 500))

    def reference(self, options):
        return trl_style_uld

    def fused(self, backend, options):
        return lambda s, t: fastkd.uld_loss(s, t, backend=backend)

    def all_configs(self):
        return [(dtype, ROWS, vs, vt) for dtype in self.dtypes for vs, vt in VOCABULARIES]

    def quick_configs(self):
        """``--quick``: the first vocabulary pair on 128 rows."""
        return [("fp32", 128, *VOCABULARIES[0])]

    def case(self, config, device, options, providers):
        dtype_name, rows, vs, vt = config
        generator = torch.Generator(device=device).manual_seed(0)
        dtype = self.dtypes[dtype_name]
        s = (torch.randn(rows, vs, device=device, generator=generator) * 2).to(dtype).requires_grad_()
        t = (torch.randn(rows, vt, device=device, generator=generator) * 2).to(dtype)
        columns = {
            "dtype": dtype_name, "N": rows, "V_s": vs, "V_t": vt,
            "output_mib": s.nbytes / MIB,  # the student gradient
            "traffic_bytes": 2 * s.nbytes + t.nbytes,
        }
        available = available_memory_bytes(device)
        width = max(vs, vt)

        def skip(provider):
            return rows_skip_reason(provider, rows, width, available)

        return Case(columns, (s, t), skip=skip, timing=few_runs() if rows * width >= 2**27 else None)

    def describe(self, options):
        return "fastkd.uld_loss (aligned rows of two vocabularies, the student requires grad)"


BENCH = ULDBench()


def test_rows_skip_reason():
    gib = 2**30
    # 2048 · 151936 · 4 B = 1.16 GiB per tensor: eager ~10 GiB.
    assert rows_skip_reason(EAGER, 2048, 151936, 8 * gib).startswith("skipped: would need ~10")
    assert rows_skip_reason(EAGER, 2048, 151936, 64 * gib) is None
    assert rows_skip_reason("fastkd-cpu", 2048, 151936, gib) is None


def test_trl_style_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 9, generator=g, dtype=torch.float64)
    t = torch.randn(6, 14, generator=g, dtype=torch.float64)
    expected = fastkd.uld_loss(s, t, backend="reference")
    assert torch.allclose(trl_style_uld(s, t).double(), expected, rtol=1e-6, atol=0)
