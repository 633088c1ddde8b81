"""Index tensors given as strided views (labels, masks, teacher ids, bank
indices): every fused backend reads them by value, whatever their strides.

A 1-D view is a column of a two-column tensor (stride 2, the other column
holding different values, so reading it as contiguous gives a wrong answer);
a 2-D one is column-major. Each result is compared with the float64
reference on the same values.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import _ops
from tests.common_checks import strided
from tests.helpers import DEVICE, assert_matches, backend_params

pytestmark = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR))

UPSTREAM = 0.7


def randn(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE)


def randint(high, shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, shape, generator=g).to(DEVICE)


def loss_and_grads(fn, *inputs):
    """``fn(*inputs)`` and the inputs' gradients under an upstream gradient of 0.7."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    loss = fn(*leaves)
    loss.backward(torch.full_like(loss, UPSTREAM))
    return (loss.detach(), *(x.grad for x in leaves))


def check(backend, fn, inputs, what):
    """``fn(backend, *float32 inputs)`` against ``fn("reference", *float64 inputs)``."""
    got = loss_and_grads(lambda *xs: fn(backend, *xs), *(x.float() for x in inputs))
    want = loss_and_grads(lambda *xs: fn("reference", *xs), *inputs)
    for name, a, b in zip(("loss",) + tuple(f"grad {i}" for i in range(len(inputs))), got, want, strict=True):
        assert_matches(a, b, torch.float32, f"{backend} {what} {name}")


ROWS, VOCAB = 7, 13


def row_selectors():
    labels = randint(VOCAB, (ROWS,), seed=1)
    labels[2] = -100
    mask = torch.tensor([True, True, True, False, True, True, False], device=DEVICE)
    return strided(labels), strided(mask)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("hard_weight", (None, 0.5))
def test_divergence_labels_and_mask(backend, hard_weight):
    labels, mask = row_selectors()
    s, t = randn(ROWS, VOCAB, seed=2), randn(ROWS, VOCAB, seed=3)

    def fn(b, s, t):
        return fastkd.divergence(
            s, t, temperature=2.0, labels=labels, mask=mask, hard_weight=hard_weight, backend=b
        )

    check(backend, fn, (s, t), "divergence")


@pytest.mark.parametrize("backend", backend_params())
def test_multi_teacher_labels_and_mask(backend):
    labels, mask = row_selectors()
    s, t = randn(ROWS, VOCAB, seed=2), randn(3, ROWS, VOCAB, seed=3)

    def fn(b, s):
        return fastkd.divergence(s, t.to(s.dtype), labels=labels, mask=mask, hard_weight=0.5, backend=b)

    check(backend, fn, (s,), "multi-teacher")


@pytest.mark.parametrize("backend", backend_params())
def test_topk_ids_values_labels_and_mask(backend):
    labels, mask = row_selectors()
    g = torch.Generator().manual_seed(4)
    ids = strided(torch.stack([torch.randperm(VOCAB, generator=g)[:5] for _ in range(ROWS)]).to(DEVICE))
    values = randn(ROWS, 5, seed=5)
    s = randn(ROWS, VOCAB, seed=2)

    def fn(b, s):
        return fastkd.topk_divergence(
            s, ids, strided(values.to(s.dtype)), labels=labels, mask=mask, hard_weight=0.5, backend=b
        )

    check(backend, fn, (s,), "topk_divergence")


@pytest.mark.parametrize("backend", backend_params())
def test_fused_linear_labels_and_mask(backend):
    labels, mask = row_selectors()
    hs, ws = randn(ROWS, 6, seed=2), randn(VOCAB, 6, seed=3)
    ht, wt = randn(ROWS, 5, seed=4), randn(VOCAB, 5, seed=5)

    def fn(b, hs, ws):
        return fastkd.fused_linear_divergence(
            hs, ws, ht.to(hs.dtype), wt.to(hs.dtype), labels=labels, mask=mask, hard_weight=0.5, backend=b
        )

    check(backend, fn, (hs, ws), "fused_linear_divergence")


@pytest.mark.parametrize("backend", backend_params())
def test_dkd_labels(backend):
    labels = strided(randint(VOCAB, (ROWS,), seed=1))
    s, t = randn(ROWS, VOCAB, seed=2), randn(ROWS, VOCAB, seed=3)
    check(backend, lambda b, s: fastkd.dkd_loss(s, t.to(s.dtype), labels, backend=b), (s,), "dkd_loss")


@pytest.mark.parametrize("backend", backend_params())
def test_info_nce_labels(backend):
    labels = strided(randint(11, (ROWS,), seed=1))
    q, k = randn(ROWS, 8, seed=2) / 3, randn(11, 8, seed=3) / 3

    def fn(b, q, k):
        return fastkd.info_nce(q, k, temperature=0.1, labels=labels, backend=b)

    check(backend, fn, (q, k), "info_nce")


def test_info_nce_launcher_labels():
    """The Triton launchers themselves, as users may call them."""
    triton_info_nce = pytest.importorskip("fastkd.kernels.info_nce")
    device = triton_info_nce.DEVICE_TYPE
    labels = torch.tensor([[3, 0], [2, 1], [1, 2], [0, 3]], device=device)[:, 0]
    q, k = randn(4, 8, seed=2).float().to(device), randn(4, 8, seed=3).float().to(device)
    row_loss, row_lse = triton_info_nce.info_nce_forward(q, k, labels, 10.0)
    logits = q.double() @ k.double().t() * 10.0
    want = F.cross_entropy(logits, labels, reduction="none")
    assert_matches(row_loss, want, torch.float32, "triton info_nce_forward row loss")
    grad_rows = torch.full((4,), UPSTREAM, device=device)
    grad_q, grad_k = triton_info_nce.info_nce_backward(grad_rows, q, k, labels, row_lse, 10.0)
    want_q, want_k = loss_and_grads(
        lambda a, b: F.cross_entropy(a @ b.t() * 10.0, labels, reduction="sum"), q.double(), k.double()
    )[1:]
    assert_matches(grad_q, want_q, torch.float32, "triton info_nce grad q")
    assert_matches(grad_k, want_k, torch.float32, "triton info_nce grad k")


@pytest.mark.parametrize("backend", backend_params())
def test_crd_contrast_idx(backend):
    bank = F.normalize(randn(20, 16, seed=1), dim=1)
    contrast_idx = strided(randint(20, (ROWS, 5), seed=2))
    v = F.normalize(randn(ROWS, 16, seed=3), dim=1)

    def fn(b, v):
        return fastkd.crd_nce(v, bank.to(v.dtype), contrast_idx, z=3.0, backend=b)[0]

    check(backend, fn, (v,), "crd_nce")
