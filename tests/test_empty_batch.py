"""An empty batch (N = 0) gives one documented result per public loss, the same
on every backend (reference, cpu, triton; triton and cuda on CUDA):

- the logit losses, a per-row term reduced over the (kept) rows — ``divergence``
  (one teacher or several), ``kd_loss``, ``topk_divergence``,
  ``fused_linear_divergence``, ``dkd_loss``, ``uld_loss`` and their modules — and the
  per-token transformer-layer losses (``attention_relation_loss`` with B = 0 or
  T = 0, ``hidden_state_loss`` and their modules): N = 0 is the case
  of no kept rows, a loss of 0 (``"none"``: an empty tensor) and zero gradients
  of the inputs' shapes (empty for the logits, zeros for weights);
- the embedding and feature losses, whose value is a statistic of the batch
  (in-batch negatives, a bank normaliser set from the batch, pair or triplet
  relations, kernel means, per-sample maps averaged over samples) —
  ``info_nce``, ``crd_nce``, ``mmd_loss``, ``nst_loss``, ``at_loss``, ``rkd_*``,
  ``pkt_loss``, ``sp_loss``, ``cc_loss`` and their modules, ``HintLoss``,
  ``CRDLoss``: ``ValueError`` naming the empty argument, before any kernel runs.
"""

from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd import _ops
from tests.helpers import DEVICE, backend_params

pytestmark = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR))

V, D = 7, 6


def leaf(*shape):
    return torch.randn(*shape, device=DEVICE).requires_grad_(True)


def const(*shape):
    return torch.randn(*shape, device=DEVICE)


def index(*shape):
    return torch.zeros(*shape, dtype=torch.int64, device=DEVICE)


def maps():
    return leaf(0, 3, 4, 4), const(0, 2, 4, 4)


# name → [(case id, fn(backend) -> (loss, differentiable inputs))]: a loss of 0
ZERO = {
    "divergence": [
        (f"{reduction}-{divergence}",
         lambda b, r=reduction, d=divergence: (lambda s: (fastkd.divergence(
             s, const(0, V), divergence=d, reduction=r, backend=b), [s]))(leaf(0, V)))
        for reduction in ("batchmean", "sum", "mean", "none") for divergence in ("kl", "jsd")
    ] + [
        ("lead-shape", lambda b: (lambda s: (
            fastkd.divergence(s, const(2, 0, V), reduction="none", backend=b), [s]))(leaf(2, 0, V))),
        ("teacher-grad", lambda b: (lambda s, t: (fastkd.divergence(s, t, backend=b), [s, t]))(leaf(0, V),
                                                                                              leaf(0, V))),
        ("hard-labels", lambda b: (lambda s: (fastkd.divergence(
            s, const(0, V), labels=index(0), mask=index(0).bool(), hard_weight=0.5, backend=b), [s]))(
            leaf(0, V))),
        ("return-parts", lambda b: (lambda s: (torch.stack(fastkd.divergence(
            s, const(0, V), labels=index(0), hard_weight=0.5, return_parts=True, backend=b)).sum(), [s]))(
            leaf(0, V))),
        ("teachers", lambda b: (lambda s: (fastkd.divergence(
            s, const(3, 0, V), labels=index(0), hard_weight=0.5, backend=b), [s]))(leaf(0, V))),
        ("teachers-none", lambda b: (lambda s: (fastkd.divergence(
            s, const(2, 0, V), teacher_weights=[0.25, 0.75], reduction="none", backend=b), [s]))(leaf(0, V))),
    ],
    "kd_loss": [("default", lambda b: (lambda s: (fastkd.kd_loss(s, const(0, V), backend=b), [s]))(
        leaf(0, V)))],
    "DivergenceLoss": [("module", lambda b: (lambda s: (fastkd.DivergenceLoss(divergence="tvd", backend=b)(
        s, const(0, V)), [s]))(leaf(0, V)))],
    "KDLoss": [("module", lambda b: (lambda s: (fastkd.KDLoss(backend=b)(s, const(0, V)), [s]))(leaf(0, V)))],
    "topk_divergence": [
        (reduction, lambda b, r=reduction: (lambda s: (fastkd.topk_divergence(
            s, index(0, 3), const(0, 3), reduction=r, backend=b), [s]))(leaf(0, V)))
        for reduction in ("batchmean", "sum", "none")
    ] + [("hard-labels", lambda b: (lambda s: (fastkd.topk_divergence(
        s, index(0, 3), const(0, 3), labels=index(0), hard_weight=0.5, backend=b), [s]))(leaf(0, V)))],
    "TopKDivergenceLoss": [("module", lambda b: (lambda s: (fastkd.TopKDivergenceLoss(backend=b)(
        s, index(0, 3), const(0, 3)), [s]))(leaf(0, V)))],
    "fused_linear_divergence": [
        (reduction, lambda b, r=reduction: (lambda h, w: (fastkd.fused_linear_divergence(
            h, w, const(0, 5), const(V, 5), reduction=r, backend=b), [h, w]))(leaf(0, D), leaf(V, D)))
        for reduction in ("batchmean", "sum", "none")
    ] + [("hard-labels-bias", lambda b: (lambda h, w, bias: (fastkd.fused_linear_divergence(
        h, w, const(0, 5), const(V, 5), student_bias=bias, labels=index(0), hard_weight=0.5, backend=b),
        [h, w, bias]))(leaf(0, D), leaf(V, D), leaf(V)))],
    "FusedLinearDivergenceLoss": [("module", lambda b: (lambda h, w: (fastkd.FusedLinearDivergenceLoss(
        backend=b)(h, w, const(0, 5), const(V, 5)), [h, w]))(leaf(0, D), leaf(V, D)))],
    "dkd_loss": [
        (reduction, lambda b, r=reduction: (lambda s: (fastkd.dkd_loss(
            s, const(0, V), index(0), reduction=r, backend=b), [s]))(leaf(0, V)))
        for reduction in ("batchmean", "sum", "none")
    ],
    "DKDLoss": [("module", lambda b: (lambda s: (fastkd.DKDLoss(backend=b)(s, const(0, V), index(0)), [s]))(
        leaf(0, V)))],
    "uld_loss": [
        (reduction, lambda b, r=reduction: (lambda s, t: (
            fastkd.uld_loss(s, t, reduction=r, backend=b), [s, t]))(leaf(0, V), leaf(0, 5)))
        for reduction in ("batchmean", "sum", "none")
    ] + [("hard-labels", lambda b: (lambda s: (fastkd.uld_loss(
        s, const(0, 5), labels=index(0), hard_weight=0.5, backend=b), [s]))(leaf(0, V)))],
    "ULDLoss": [("module", lambda b: (lambda s: (fastkd.ULDLoss(backend=b)(s, const(0, 5)), [s]))(
        leaf(0, V)))],
    "attention_relation_loss": [
        (f"{reduction}-{'batch' if empty_dim == 0 else 'length'}",
         lambda b, r=reduction, e=empty_dim: (lambda s, t: (fastkd.attention_relation_loss(
             s, t, num_relation_heads=2, reduction=r, backend=b), [s, t]))(
             leaf(*((0, 4) if e == 0 else (2, 0)), 8), leaf(*((0, 4) if e == 0 else (2, 0)), 6)))
        for reduction in ("batchmean", "sum", "none") for empty_dim in (0, 1)
    ] + [("mask", lambda b: (lambda s: (fastkd.attention_relation_loss(
        s, const(0, 4, 6), num_relation_heads=2, mask=index(0, 4).bool(), backend=b), [s]))(leaf(0, 4, 8)))],
    "AttentionRelationLoss": [("module", lambda b: (lambda s: (fastkd.AttentionRelationLoss(2, backend=b)(
        s, const(0, 4, 6)), [s]))(leaf(0, 4, 8)))],
    # element-wise over tokens, plain PyTorch on every device: no backend argument
    "hidden_state_loss": [
        (f"{kind}-{reduction}", lambda b, k=kind, r=reduction: (lambda h, t: (fastkd.hidden_state_loss(
            h, t, kind=k, reduction=r), [h, t]))(leaf(0, D), leaf(0, D)))
        for kind in ("mse", "cosine") for reduction in ("mean", "sum", "none")
    ],
    "HiddenStateLoss": [("module", lambda b: (lambda h, m: (m(h, const(0, 3, 5)), [h, *m.parameters()]))(
        leaf(0, 3, D), fastkd.HiddenStateLoss(student_dim=D, teacher_dim=5).to(DEVICE)))],
}

# name → [(case id, fn(backend), the argument the ValueError names)]
RAISES = {
    "info_nce": [
        ("no-keys", lambda b: fastkd.info_nce(leaf(0, D), leaf(0, D), backend=b), "q must have shape"),
        ("keys", lambda b: fastkd.info_nce(leaf(0, D), leaf(4, D), backend=b), "q must have shape"),
        ("labels", lambda b: fastkd.info_nce(leaf(0, D), leaf(4, D), labels=index(0), backend=b),
         "q must have shape"),
    ],
    "InfoNCELoss": [("module", lambda b: fastkd.InfoNCELoss(backend=b)(leaf(0, D), leaf(0, D)),
                     "q must have shape")],
    "crd_nce": [
        ("z-from-batch", lambda b: fastkd.crd_nce(leaf(0, D), const(9, D), index(0, 4), backend=b),
         r"v must have shape \(B, feat_dim\) = \(B, 6\) with B >= 1"),
        ("z-given", lambda b: fastkd.crd_nce(leaf(0, D), const(9, D), index(0, 4), z=2.0, backend=b),
         r"v must have shape \(B, feat_dim\) = \(B, 6\) with B >= 1"),
    ],
    "CRDLoss": [("module", lambda b: fastkd.CRDLoss(4, 5, 9, feat_dim=D, nce_k=3, backend=b)(
        leaf(0, 4), const(0, 5), index(0)), "f_s must have shape")],
    "mmd_loss": [
        ("both", lambda b: fastkd.mmd_loss(leaf(0, D), leaf(0, D), backend=b), "x must have shape"),
        ("x", lambda b: fastkd.mmd_loss(leaf(0, D), leaf(3, D), backend=b), "x must have shape"),
        ("y", lambda b: fastkd.mmd_loss(leaf(3, D), leaf(0, D), backend=b), "y must have shape"),
    ],
    "MMDLoss": [("module", lambda b: fastkd.MMDLoss(backend=b)(leaf(0, D), leaf(0, D)), "x must have shape")],
    "nst_loss": [("maps", lambda b: fastkd.nst_loss(*maps(), backend=b), "student_maps must have shape")],
    "NSTLoss": [("module", lambda b: fastkd.NSTLoss(backend=b)(*maps()), "student_maps must have shape")],
    "at_loss": [("maps", lambda b: fastkd.at_loss(*maps(), backend=b), "student_maps must have shape")],
    "ATLoss": [("module", lambda b: fastkd.ATLoss(backend=b)([maps()[0]], [maps()[1]]),
                "student_maps must have shape")],
    "HintLoss": [
        ("conv", lambda b: fastkd.HintLoss(3, 2)(*maps()), "student_features must be non-empty"),
        ("linear", lambda b: fastkd.HintLoss(3, 2, adapter="linear")(leaf(0, 3), const(0, 2)),
         "student_features must be non-empty"),
    ],
}
def _relational_case(name: str):
    loss, needle = getattr(fastkd, name), "student must hold at least one sample"
    if name[0].isupper():  # a module
        return ("module", lambda b: loss(backend=b)(leaf(0, D), const(0, D)), needle)
    return ("embeddings", lambda b: loss(leaf(0, D), const(0, D), backend=b), needle)


for _name in ("rkd_loss", "rkd_distance", "rkd_angle", "pkt_loss", "sp_loss", "cc_loss", "RKDLoss", "PKTLoss",
              "SPLoss", "CCLoss"):
    RAISES[_name] = [_relational_case(_name)]

# Public names that are not losses.
NOT_LOSSES = {
    "BackendStatus", "Distiller", "DistillerOutput", "EMATeacher", "OUTPUT", "Term", "backends",
    "empty_cache", "__version__",
    "TokenAlignment", "align_by_offsets", "merge_aligned",  # empty sequences: tests/test_token_alignment.py
}


def test_every_public_name_has_a_documented_empty_batch_result():
    assert set(ZERO) | set(RAISES) | NOT_LOSSES == set(fastkd.__all__)
    assert not (set(ZERO) & set(RAISES)) and not ((set(ZERO) | set(RAISES)) & NOT_LOSSES)


def _ids(table):
    return [pytest.param(name, case, fn, id=f"{name}-{case}") for name, cases in table.items()
            for case, fn in cases]


@pytest.mark.parametrize("backend", backend_params(include_reference=True))
@pytest.mark.parametrize("name,case,fn", _ids(ZERO))
def test_empty_batch_gives_zero(backend, name, case, fn):
    loss, inputs = fn(backend)
    assert loss.dtype == torch.float32
    if loss.dim():
        assert loss.numel() == 0
    else:
        assert loss.item() == 0.0
    loss.sum().backward()
    for x in inputs:
        assert x.grad is not None and x.grad.shape == x.shape, f"{name}: gradient of a {tuple(x.shape)} input"
        assert torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize("backend", backend_params(include_reference=True))
@pytest.mark.parametrize(
    "name,case,fn,needle",
    [pytest.param(name, case, fn, needle, id=f"{name}-{case}") for name, cases in RAISES.items()
     for case, fn, needle in cases],
)
def test_empty_batch_raises(backend, name, case, fn, needle):
    with pytest.raises(ValueError, match=needle):
        fn(backend)
