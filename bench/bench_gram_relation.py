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
  (``"pkt"``, ``"sp"`` or ``"cc"``) as its third argument
  (:class:`bench.family.EmbeddingTermsFamily`).

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
from bench.family import EmbeddingTermsFamily
from bench.measure import few_runs
from bench.report import EAGER
from fastkd import reference

# N from which a call takes seconds: no extra warm-up, exactly two runs.
LONG_N = 8192


class GramRelationBench(EmbeddingTermsFamily):
    name = "gram_relation"
    description = "fastkd PKT / SP / CC (D=128, fp32, student requires grad)"
    terms = {
        "pkt": (reference.pkt_loss, fastkd.pkt_loss),
        "sp": (reference.sp_loss, fastkd.sp_loss),
        "cc": (reference.cc_loss, fastkd.cc_loss),
    }
    sizes = (512, 2048, 8192)
    report_configs = tuple((term, 2048, 128) for term in ("pkt", "sp", "cc"))

    def model_flop(self, term, n, d):
        """``3 · 2·N²·D``: both Gram matrices and the gradient product."""
        return 3 * 2 * n * n * d

    def timing(self, term, n):
        return few_runs() if n >= LONG_N else None


BENCH = GramRelationBench()


def test_providers_agree():
    s = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randn(40, 16, dtype=torch.float64)
    found, _ = BENCH.providers(torch.device("cpu"), {}, use_compile=False)
    for term in BENCH.terms:
        expected = found[EAGER](s, t, term).item()
        for name, fn in found.items():
            assert abs(fn(s, t, term).item() - expected) <= 1e-9 * abs(expected), (name, term)


def test_flop_count():
    assert BENCH.model_flop("sp", 10, 3) == 6 * 100 * 3
