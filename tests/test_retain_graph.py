"""A second backward through a retained graph (``loss.backward(retain_graph=True);
loss.backward()``) accumulates exactly twice the gradient, for every fused loss
whose forward produces its gradient, whatever the upstream gradient (1, a
weight, per row with ``reduction="none"``); and the first backward equals a
backward without ``retain_graph`` bit for bit."""

from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd import _ops
from tests.helpers import DEVICE, backend_params

pytestmark = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR))

N, V, D = 5, 9, 6


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def labels():
    y = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    y[1] = -100
    return y


def top_ids():
    g = torch.Generator().manual_seed(8)
    return torch.stack([torch.randperm(V, generator=g)[:3] for _ in range(N)]).to(DEVICE)


# name → (inputs that get gradients, fn(backend, reduction, *inputs)); reduction is
# None for the losses that only return a scalar.
LOSSES = {
    "divergence": ([(N, V)], lambda b, r, s: fastkd.divergence(
        s, randn(N, V, seed=1), reduction=r, backend=b)),
    "divergence-teacher-grad": ([(N, V), (N, V)], lambda b, r, s, t: fastkd.divergence(
        s, t, divergence="jsd", reduction=r, backend=b)),
    "divergence-hard": ([(N, V)], lambda b, r, s: fastkd.divergence(
        s, randn(N, V, seed=1), labels=labels(), hard_weight=0.5, reduction=r, backend=b)),
    "divergence-parts": ([(N, V)], lambda b, r, s: (lambda total, hard, soft: hard + 2 * soft)(
        *fastkd.divergence(s, randn(N, V, seed=1), labels=labels(), hard_weight=0.5, return_parts=True,
                           reduction=r, backend=b))),
    "kd_loss": ([(N, V)], lambda b, r, s: fastkd.kd_loss(s, randn(N, V, seed=1), reduction=r, backend=b)),
    "multi-teacher": ([(N, V)], lambda b, r, s: fastkd.divergence(
        s, randn(3, N, V, seed=1), labels=labels(), hard_weight=0.5, reduction=r, backend=b)),
    "topk_divergence": ([(N, V)], lambda b, r, s: fastkd.topk_divergence(
        s, top_ids(), randn(N, 3, seed=1), labels=labels(), reduction=r, backend=b)),
    "topk_divergence-hard": ([(N, V)], lambda b, r, s: fastkd.topk_divergence(
        s, top_ids(), randn(N, 3, seed=1), labels=labels(), hard_weight=0.5, reduction=r, backend=b)),
    "fused_linear_divergence": ([(N, D), (V, D), (V,)], lambda b, r, h, w, bias: (
        fastkd.fused_linear_divergence(h, w, randn(N, 4, seed=1), randn(V, 4, seed=2), student_bias=bias,
                                       labels=labels(), hard_weight=0.5, reduction=r, backend=b))),
    "dkd_loss": ([(N, V)], lambda b, r, s: fastkd.dkd_loss(
        s, randn(N, V, seed=1), labels().clamp(min=0), reduction=r, backend=b)),
    "info_nce": ([(N, D), (N + 2, D)], lambda b, r, q, k: fastkd.info_nce(q, k, temperature=0.5, backend=b)),
    "info_nce-symmetric": ([(N, D), (N, D)], lambda b, r, q, k: fastkd.info_nce(
        q, k, temperature=0.5, symmetric=True, normalize=True, backend=b)),
    "mmd_loss": ([(N, D), (N + 1, D)], lambda b, r, x, y: fastkd.mmd_loss(x, y, backend=b)),
    "at_loss": ([(N, 3, 4, 4), (N, 2, 4, 4)], lambda b, r, s, t: fastkd.at_loss(s, t, backend=b)),
    "nst_loss": ([(N, 3, 4, 4), (N, 2, 4, 4)], lambda b, r, s, t: fastkd.nst_loss(s, t, backend=b)),
}
PER_ROW = {"divergence", "divergence-teacher-grad", "divergence-hard", "divergence-parts", "kd_loss",
           "multi-teacher", "topk_divergence", "topk_divergence-hard", "fused_linear_divergence", "dkd_loss"}


def cases():
    for name in LOSSES:
        for upstream in ("one", "weight", "rows") if name in PER_ROW else ("one", "weight"):
            yield pytest.param(name, upstream, id=f"{name}-{upstream}")


def objective(name, upstream, backend, inputs):
    """The scalar that is back-propagated: the loss, 0.3 × the loss, or the per-row losses summed."""
    shapes, fn = LOSSES[name]
    if upstream == "rows":
        return fn(backend, "none", *inputs).sum()
    reduction = "sum" if name == "dkd_loss" else ("batchmean" if name in PER_ROW else None)
    loss = fn(backend, reduction, *inputs)
    return loss if upstream == "one" else 0.3 * loss


def leaves(name):
    return [randn(*shape, seed=10 + i).requires_grad_(True) for i, shape in enumerate(LOSSES[name][0])]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name,upstream", list(cases()))
def test_second_backward_accumulates_twice(backend, name, upstream):
    fresh = leaves(name)
    objective(name, upstream, backend, fresh).backward()
    inputs = leaves(name)
    loss = objective(name, upstream, backend, inputs)
    loss.backward(retain_graph=True)
    first = [x.grad.clone() for x in inputs]
    loss.backward()
    for i, (x, g, f) in enumerate(zip(inputs, first, fresh, strict=True)):
        assert torch.equal(g, f.grad), f"{name} input {i}: retain_graph changed the gradient"
        assert torch.equal(x.grad, 2 * g), f"{name} input {i}: second backward is not the same gradient"
