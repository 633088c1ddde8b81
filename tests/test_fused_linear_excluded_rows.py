"""The fused head projects only the kept rows (labels != ignore_index, mask True): excluded
rows (prompt and padding tokens) cost no matmul and still get loss 0 and zero gradients."""

from __future__ import annotations

import sys

import pytest
import torch

import fastkd
from tests.helpers import DEVICE, backend_params

BACKENDS = backend_params()
N, H, V = 23, 8, 19


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    s_h = torch.randn(N, H, generator=g, dtype=torch.float64).to(DEVICE, torch.float32)
    t_h = torch.randn(N, H, generator=g, dtype=torch.float64).to(DEVICE, torch.float32)
    s_w = torch.randn(V, H, generator=g, dtype=torch.float64).to(DEVICE, torch.float32)
    t_w = torch.randn(V, H, generator=g, dtype=torch.float64).to(DEVICE, torch.float32)
    labels = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    labels[: N // 2] = -100
    return s_h, s_w, t_h, t_w, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs",
    (
        dict(),
        dict(reduction="none"),
        dict(hard_weight=0.5, return_parts=True),
        dict(reduction="sum", use_mask=True),
    ),
    ids=("batchmean", "none", "hard-parts", "sum-mask"),
)
def test_excluded_rows_are_not_projected(backend, kwargs, monkeypatch):
    s_h, s_w, t_h, t_w, labels = inputs()
    kwargs = dict(kwargs)
    if kwargs.pop("use_mask", False):
        kwargs["mask"] = labels != -100
    else:
        kwargs["labels"] = labels
    module = sys.modules["fastkd.fused_linear"]
    projected = []
    logits = module._logits

    def counting_logits(hidden, *args):
        projected.append(hidden.shape[0])
        return logits(hidden, *args)

    monkeypatch.setattr(module, "_logits", counting_logits)
    s_h_leaf, s_w_leaf = s_h.clone().requires_grad_(True), s_w.clone().requires_grad_(True)
    out = fastkd.fused_linear_divergence(
        s_h_leaf, s_w_leaf, t_h, t_w, chunk_size=4, backend=backend, **kwargs
    )
    total = out[0] if isinstance(out, tuple) else out
    total.sum().backward()
    kept = int((labels != -100).sum())
    passes = len(projected) // (2 * -(-kept // 4))
    assert passes >= 1 and sum(projected) == 2 * kept * passes  # student and teacher, kept rows only

    expected = fastkd.fused_linear_divergence(
        s_h.clone().requires_grad_(True), s_w, t_h, t_w, backend="reference", **kwargs
    )
    expected_total = expected[0] if isinstance(expected, tuple) else expected
    torch.testing.assert_close(total, expected_total, rtol=1e-5, atol=1e-6)
    assert torch.all(s_h_leaf.grad[: N // 2] == 0)
