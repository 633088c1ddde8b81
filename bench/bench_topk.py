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
the small pytest-benchmark cases once each.
"""

from __future__ import annotations

import pytest
import torch

import fastkd
from bench.bench_divergence import reference_loss
from bench.family import Case, Family
from bench.measure import MIB
from bench.report import EAGER

VOCAB = 128256
TOP_K = 64
ROWS = (128, 512, 2048)
TEMPERATURE = 2.0


def dense_teacher(index: torch.Tensor, values: torch.Tensor, vocab: int) -> torch.Tensor:
    """``(N, V)`` logits: ``values`` at ``index``, ``−inf`` elsewhere."""
    dense = torch.full((index.shape[0], vocab), -torch.inf, dtype=values.dtype, device=values.device)
    return dense.scatter_(1, index, values)


def dense_reference_loss(student, index, values):
    return reference_loss(student, dense_teacher(index, values, student.shape[1]), divergence="kl",
                          temperature=TEMPERATURE)


def make_inputs(n: int, vocab: int, k: int, dtype: torch.dtype, device: torch.device):
    """Student logits (N, V) requiring grad; the teacher's top-k of a correlated dense teacher."""
    generator = torch.Generator(device=device).manual_seed(0)
    student = torch.randn(n, vocab, device=device, generator=generator)
    values, index = (student + torch.randn(n, vocab, device=device, generator=generator)).topk(k, dim=1)
    return student.to(dtype).requires_grad_(), index, values.to(dtype)


class TopkBench(Family):
    name = "topk"
    config_columns = ("temperature", "device", "dtype", "N", "V", "k")
    config_keys = ("dtype", "N", "V", "k")
    config_format = "{dtype} {N}×{V} k={k}"
    size_columns = ("N",)
    description = f"fastkd.topk_divergence: kl (T={TEMPERATURE:g}, k={TOP_K})"
    size_axis = f"tokens N (V = {VOCAB}, k = {TOP_K})"
    small_configs = (("fp32", 16, 4096, 32),)
    report_configs = (("fp32", 512, VOCAB, TOP_K),)

    def reference(self, options):
        return dense_reference_loss

    def fused(self, backend, options):
        return lambda s, i, v: fastkd.topk_divergence(s, i, v, temperature=TEMPERATURE, backend=backend)

    def more_providers(self, device, options, found, skipped):
        """``dense-fastkd-<backend>``: the dense teacher, then the fused dense kernel."""
        for backend in [name.removeprefix("fastkd-") for name in found if name.startswith("fastkd-")]:
            found[f"dense-fastkd-{backend}"] = lambda s, i, v, backend=backend: fastkd.divergence(
                s, dense_teacher(i, v, s.shape[1]), temperature=TEMPERATURE, backend=backend
            )
        for name, reason in list(skipped.items()):
            if name.startswith("fastkd-"):
                skipped[f"dense-{name}"] = reason

    def all_configs(self):
        return [(dtype, n, VOCAB, TOP_K) for dtype in self.dtypes for n in ROWS]

    def case(self, config, device, options, providers):
        dtype_name, n, vocab, k = config
        s, index, values = make_inputs(n, vocab, k, self.dtypes[dtype_name], device)
        columns = {
            "temperature": TEMPERATURE, "dtype": dtype_name, "N": n, "V": vocab, "k": k,
            "output_mib": s.nbytes / MIB,  # the student gradient: the least a fused call allocates
            "traffic_bytes": 2 * s.nbytes,
        }
        return Case(columns, (s, index, values))


BENCH = TopkBench()



def test_providers_agree():
    s = torch.randn(8, 1000, dtype=torch.float64, requires_grad=True)
    values, index = torch.randn(8, 1000, dtype=torch.float64).topk(20, dim=1)
    found, _ = BENCH.providers(torch.device("cpu"), {}, use_compile=False)
    losses = {name: fn(s, index, values).item() for name, fn in found.items()}
    for name, loss in losses.items():
        assert loss == pytest.approx(losses[EAGER], rel=1e-9), name
