"""Benchmark of the Gram-matrix relation losses: forward + backward of
``fastkd.pkt_loss``, ``fastkd.sp_loss`` and ``fastkd.cc_loss`` (``γ = 0.4``,
order 2) on ``(N, D)`` student and teacher embeddings, ``D = 128``, float32,
the student requiring a gradient (the teacher is a constant),
``loss.backward()`` with the default upstream gradient of 1.

Providers:

- ``eager``: ``fastkd.reference.pkt_loss`` / ``sp_loss`` / ``cc_loss``, the
  plain-PyTorch formulas (RepDistiller's ``PKT`` and ``Similarity``,
  torchdistill's ``CCKDLoss``), materialising the ``N × N`` similarity
  matrices of both sides, the probabilities or normalised rows, and their
  gradients.
- ``compile``: ``torch.compile`` of the same function (``fullgraph=True,
  dynamic=False``), compiled (or loaded from ``TORCHINDUCTOR_CACHE_DIR``) in
  an untimed first call. ``--no-compile`` skips it.
- ``fastkd-cpu``: the fused losses with ``backend="cpu"``: both Gram matrices
  by GEMM, then one pass over the rows computing the loss and the gradient
  with respect to the student's Gram matrix in place. On CUDA
  ``fastkd-triton`` and ``fastkd-cuda``. Each provider takes the term
  (``"pkt"``, ``"sp"`` or ``"cc"``) as its third argument.

The ``dtype`` column names the term and the dtype (``pkt fp32``), so that the
plot draws one line per provider and term. No floor: the Gram products are
compute-bound (``O(N² D)``); ``traffic_bytes`` is left empty.
``model_gflop`` counts three ``N² D`` products (``2 N² D`` each: both Gram
matrices and the gradient ``C X``), as a size scale rather than a hardware
rate.

``python -m bench.run --families gram_relation`` runs the sweep; ``pytest
bench/`` runs the small pytest-benchmark cases once each.
"""

from __future__ import annotations

import torch

import fastkd
from bench.family import Case, Family
from bench.measure import MIB, few_runs
from fastkd import reference

DIM = 128
SIZES = (512, 2048, 8192)
# N from which a call takes seconds: no extra warm-up, exactly two runs.
LONG_N = 8192
REFERENCE_TERMS = {"pkt": reference.pkt_loss, "sp": reference.sp_loss, "cc": reference.cc_loss}
FUSED_TERMS = {"pkt": fastkd.pkt_loss, "sp": fastkd.sp_loss, "cc": fastkd.cc_loss}


def model_flop(n: int, d: int) -> int:
    """``3 · 2·N²·D``: both Gram matrices and the gradient product."""
    return 3 * 2 * n * n * d


class GramRelationBench(Family):
    name = "gram_relation"
    description = f"fastkd PKT / SP / CC (D={DIM}, fp32, student requires grad)"
    config_columns = ("loss", "device", "dtype", "N", "D")
    config_keys = ("loss", "dtype", "N", "D")
    config_format = "{loss} {N}"  # D is in the title
    size_columns = ("N",)
    metric_columns = ("model_gflop", "model_gflops")
    table_metrics = (  # no floor: compute-bound
        ("model_gflop", "GFLOP (model)", ".2f"),
        ("model_gflops", "GFLOP/s (model)", ".1f"),
        ("loss_rel_diff", "loss vs eager", ".1e"),
    )
    size_axis = f"batch size N (D = {DIM})"
    tolerance = 1e-4
    small_configs = tuple((loss, 96, 32) for loss in REFERENCE_TERMS)

    def reference(self, options):
        return lambda s, t, loss: REFERENCE_TERMS[loss](s, t)

    def fused(self, backend, options):
        return lambda s, t, loss: FUSED_TERMS[loss](s, t, backend=backend)

    def all_configs(self):
        return [(loss, n, DIM) for loss in REFERENCE_TERMS for n in SIZES]

    def quick_configs(self):
        return [(loss, SIZES[0], DIM) for loss in REFERENCE_TERMS]

    def case(self, config, device, options, providers):
        loss, n, d = config
        generator = torch.Generator(device=device).manual_seed(0)
        teacher = torch.randn(n, d, device=device, generator=generator)
        student = (teacher + 0.5 * torch.randn(n, d, device=device, generator=generator)).requires_grad_()
        columns = {
            "loss": loss, "dtype": f"{loss} fp32", "N": n, "D": d,
            "output_mib": student.nbytes / MIB,  # the student's gradient
            "traffic_bytes": None,  # compute-bound: no floor
            "model_gflop": model_flop(n, d) / 1e9,
        }
        return Case(columns, (student, teacher, loss), timing=few_runs() if n >= LONG_N else None)


BENCH = GramRelationBench()


def test_providers_agree():
    s = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randn(40, 16, dtype=torch.float64)
    found, _ = BENCH.providers(torch.device("cpu"), {}, use_compile=False)
    for loss in REFERENCE_TERMS:
        expected = found["eager"](s, t, loss).item()
        for name, fn in found.items():
            assert abs(fn(s, t, loss).item() - expected) <= 1e-9 * abs(expected), (name, loss)


def test_flop_count():
    assert model_flop(10, 3) == 6 * 100 * 3
