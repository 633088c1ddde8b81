"""``num_items_in_batch`` on :func:`fastkd.topk_divergence` (as :func:`fastkd.divergence`'s)."""

from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd.topk import TOPK_KERNELS
from tests.helpers import DEVICE, backend_params

BACKENDS = [p for p in backend_params(include_reference=True) if p.values[0] in ("reference", *TOPK_KERNELS)]


def sparse_case(dtype, rows=6, vocab=40, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2).to(device=DEVICE, dtype=dtype)
    index = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(rows)]).to(DEVICE)
    values = torch.randn(rows, k, generator=g, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    labels = torch.randint(0, vocab, (rows,), generator=g).to(DEVICE)
    labels[1::2] = -100
    return s, index, values, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tensor_count", [False, True], ids=["number", "tensor"])
@pytest.mark.parametrize("hard_weight", [None, 0.5], ids=["soft", "hard+soft"])
def test_kept_row_sum_over_the_given_count(backend, tensor_count, hard_weight):
    dtype, rtol = (torch.float32, 2e-6) if backend == "triton" else (torch.float64, 1e-12)
    s, index, values, labels = sparse_case(dtype)
    n = 7
    count = torch.tensor(n, device=DEVICE) if tensor_count else n
    kwargs = dict(divergence="jsd", beta=0.5, temperature=2.0, labels=labels, hard_weight=hard_weight,
                  backend=backend)

    def run(**extra):
        a = s.detach().clone().requires_grad_(True)
        loss = fastkd.topk_divergence(a, index, values, **kwargs, **extra)
        loss = loss / n if extra.get("reduction") == "sum" else loss
        loss.backward()
        return loss.detach(), a.grad

    got, want = run(num_items_in_batch=count), run(reduction="sum")
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=rtol, atol=rtol * 1e-3)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(num_items_in_batch=0), "num_items_in_batch must be finite and > 0"),
        (dict(num_items_in_batch=torch.ones(2)), "num_items_in_batch must be a number or a 0-d tensor"),
        (dict(num_items_in_batch=3, reduction="sum"), "cannot be combined with reduction='sum'"),
    ],
)
def test_bad_count_raises_value_error_naming_it(kwargs, needle):
    s, index, values, labels = sparse_case(torch.float32)
    with pytest.raises(ValueError, match=needle):
        fastkd.topk_divergence(s, index, values, labels=labels, **kwargs)
