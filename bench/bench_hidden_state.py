"""Benchmark of ``fastkd.hidden_state_loss`` (TinyBERT's MSE, DistilBERT's cosine):
forward + backward over ``N = 8192`` tokens of width ``D = 768`` (BERT-base),
float32 and bfloat16, no mask, no projection (the loss after it), the student
requiring a gradient and the teacher a constant, ``loss.backward()`` with the
default upstream gradient.

Providers:

- ``eager``: ``fastkd.reference.hidden_state.hidden_state_loss``, the
  plain-PyTorch formula (``nn.MSELoss`` / ``nn.CosineEmbeddingLoss`` with
  target 1, over the kept tokens), with float32 copies of bfloat16 states and
  the element-wise intermediates autograd keeps.
- ``compile``: ``torch.compile`` of the same function (``fullgraph``, one graph
  per shape and kind). ``--no-compile`` skips it.
- ``fastkd-cpu`` (CPU), ``fastkd-triton`` and ``fastkd-cuda`` (CUDA): the fused
  row kernel, which reads each token's ``h`` and ``g`` once and writes the
  loss and the student's gradient in the same pass; the backward returns that
  gradient as it is (upstream gradient 1).

Each provider takes the kind as its third argument; the ``dtype`` column names
the kind and the dtype (``cosine bf16``), so that the plot draws one line per
provider, kind and dtype. ``traffic_bytes`` is the least a fused call moves:
both ``(N, D)`` inputs read once and the student's gradient written once.
"""

from __future__ import annotations

import torch

import fastkd
from bench.family import Case, Family
from bench.measure import MIB
from bench.report import EAGER
from fastkd.reference.hidden_state import hidden_state_loss as reference_loss

TOKENS, WIDTH = 8192, 768
KINDS = ("mse", "cosine")


def traffic_bytes(tokens: int, width: int, element_bytes: int) -> int:
    """Reads of ``h`` and ``g`` and the write of the student's gradient."""
    return 3 * tokens * width * element_bytes


class HiddenStateBench(Family):
    name = "hidden_state"
    config_columns = ("loss", "device", "dtype", "N", "D")
    config_keys = ("loss", "dtype", "N", "D")
    config_format = "{dtype} N={N} D={D}"
    size_columns = ("N", "D")
    size_axis = "tokens × width N × D"
    small_configs = (("mse", "fp32", 64, 96), ("cosine", "bf16", 64, 96))

    def reference(self, options):
        return lambda s, t, kind: reference_loss(s, t, kind=kind)

    def fused(self, backend, options):
        return lambda s, t, kind: fastkd.hidden_state_loss(s, t, kind=kind, backend=backend)

    def all_configs(self):
        return [(kind, dtype, TOKENS, WIDTH) for kind in KINDS for dtype in self.dtypes]

    def quick_configs(self):
        """``--quick``: both kinds, float32."""
        return [(kind, "fp32", TOKENS, WIDTH) for kind in KINDS]

    def case(self, config, device, options, providers):
        kind, dtype_name, tokens, width = config
        generator = torch.Generator(device=device).manual_seed(0)
        dtype = self.dtypes[dtype_name]
        teacher = torch.randn(tokens, width, device=device, generator=generator)
        student = teacher + 0.5 * torch.randn(tokens, width, device=device, generator=generator)
        student, teacher = student.to(dtype).requires_grad_(), teacher.to(dtype)
        columns = {
            "loss": kind, "dtype": f"{kind} {dtype_name}", "N": tokens, "D": width,
            "output_mib": student.nbytes / MIB,  # the student's gradient
            "traffic_bytes": traffic_bytes(tokens, width, student.element_size()),
        }
        return Case(columns, (student, teacher, kind))

    def describe(self, options):
        return "fastkd.hidden_state_loss (no mask, the student requires grad)"


BENCH = HiddenStateBench()


def test_providers_agree():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(40, 24, generator=g, dtype=torch.float64)
    t = torch.randn(40, 24, generator=g, dtype=torch.float64)
    found, _ = BENCH.providers(torch.device("cpu"), {}, use_compile=False)
    for kind in KINDS:
        expected = found[EAGER](s, t, kind).item()
        for name, fn in found.items():
            assert abs(fn(s, t, kind).item() - expected) <= 1e-12 * abs(expected), (name, kind)


def test_traffic_bytes():
    assert traffic_bytes(8192, 768, 2) == 3 * 8192 * 768 * 2
