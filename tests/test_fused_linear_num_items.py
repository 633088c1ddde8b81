"""``num_items_in_batch`` on :func:`fastkd.fused_linear_divergence` (as :func:`fastkd.divergence`'s)."""

from __future__ import annotations

import pytest
import torch

import fastkd
from tests.common_checks import assert_results_close
from tests.helpers import DEVICE, backend_params

BACKENDS = backend_params(include_reference=True)


def heads(dtype, rows=9, hidden=6, vocab=37, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=DEVICE, dtype=dtype)

    labels = torch.randint(0, vocab, (rows,), generator=g).to(DEVICE)
    labels[::4] = -100
    return rand(rows, hidden), rand(vocab, hidden), rand(rows, hidden + 2), rand(vocab, hidden + 2), labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tensor_count", [False, True], ids=["number", "tensor"])
@pytest.mark.parametrize("hard_weight", [None, 0.5], ids=["soft", "hard+soft"])
def test_kept_row_sum_over_the_given_count(backend, tensor_count, hard_weight):
    dtype, rtol = (torch.float32, 2e-6) if backend == "triton" else (torch.float64, 1e-12)
    s_h, s_w, t_h, t_w, labels = heads(dtype)
    n = 13
    count = torch.tensor(float(n), device=DEVICE) if tensor_count else n
    kwargs = dict(divergence="jsd", beta=0.25, temperature=1.5, scale=1.0, labels=labels,
                  hard_weight=hard_weight, chunk_size=4, backend=backend)

    def run(**extra):
        h = s_h.detach().clone().requires_grad_(True)
        w = s_w.detach().clone().requires_grad_(True)
        out = fastkd.fused_linear_divergence(h, w, t_h, t_w, return_parts=True, **kwargs, **extra)
        if extra.get("reduction") == "sum":
            out = tuple(part / n for part in out)
        out[0].backward()
        return [part.detach() for part in out], h.grad, w.grad

    got, want = run(num_items_in_batch=count), run(reduction="sum")
    assert_results_close(got, want, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_divergence_on_the_materialised_logits(backend):
    dtype, rtol = (torch.float32, 2e-5) if backend == "triton" else (torch.float64, 1e-12)
    s_h, s_w, t_h, t_w, labels = heads(dtype, seed=1)
    count = torch.tensor(20, device=DEVICE)
    got = fastkd.fused_linear_divergence(s_h, s_w, t_h, t_w, labels=labels, divergence="jsd", beta=0.5,
                                         num_items_in_batch=count, backend=backend)
    want = fastkd.divergence(s_h @ s_w.T, t_h @ t_w.T, labels=labels, divergence="jsd", beta=0.5,
                             num_items_in_batch=count, backend="reference")
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(num_items_in_batch=-1), "num_items_in_batch must be finite and > 0"),
        (dict(num_items_in_batch=3, reduction="none"), "cannot be combined with reduction='none'"),
        (dict(num_items_in_batch=[3]), "num_items_in_batch must be a number or a 0-d tensor"),
    ],
)
def test_bad_count_raises_value_error_naming_it(kwargs, needle):
    s_h, s_w, t_h, t_w, labels = heads(torch.float32)
    with pytest.raises(ValueError, match=needle):
        fastkd.fused_linear_divergence(s_h, s_w, t_h, t_w, labels=labels, **kwargs)
