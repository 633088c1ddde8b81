"""The CPU kernel's large-gradient path (csrc/cpu/divergence_kernel.cpp).

KL with the student gradient only writes a gradient of 4 MiB or more with
non-temporal stores, each row from its first 64-byte boundary on, its first
and last vectors with ordinary stores. An odd vocabulary size puts the rows
at every alignment.
"""

from __future__ import annotations

import pytest
import torch

import fastkd
from tests.helpers import DEVICE
from tests.test_divergence import check_parity, logits

# 161 rows of 13109: 4.0 MiB of bf16 gradient (8.1 MiB of fp32), the
# smallest calls that stream; row i starts at 2·13109·i or 4·13109·i bytes.
STREAMED = (161, 13109)


def _cpu_only():
    if DEVICE.type != "cpu":
        pytest.skip("CPU kernel")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_streamed_kl_gradient_matches_the_reference(dtype):
    _cpu_only()
    s, t = logits(STREAMED, dtype), logits(STREAMED, dtype)
    check_parity("cpu", s, t, divergence="kl", temperature=2.0)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_streamed_rows_equal_the_same_rows_alone(dtype):
    """Streaming changes neither a row's loss nor a bit of its gradient: every
    element comes from the vector lanes whatever the row's alignment."""
    _cpu_only()
    s, t = logits(STREAMED, dtype), logits(STREAMED, dtype)

    def loss_and_grad(a, b):
        a = a.detach().clone().requires_grad_(True)
        rows = fastkd.divergence(a, b, divergence="kl", temperature=2.0, reduction="none", backend="cpu")
        rows.sum().backward()
        return rows.detach(), a.grad

    all_rows, all_grad = loss_and_grad(s, t)
    for i in (0, 1, 2, 3, 77, STREAMED[0] - 1):
        row, grad = loss_and_grad(s[i : i + 1], t[i : i + 1])
        assert torch.equal(row, all_rows[i : i + 1])
        assert torch.equal(grad, all_grad[i : i + 1])


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_streamed_rows_with_excluded_rows_between_them(dtype):
    """Excluded rows between computed ones: a row's gradient may still be
    pending (written during the next computed row, float32) when excluded rows
    come; it is written whole, and excluded rows get zeros."""
    _cpu_only()
    s, t = logits(STREAMED, dtype), logits(STREAMED, dtype)
    mask = torch.ones(STREAMED[0], dtype=torch.bool)
    mask[1::3] = False
    mask[2::7] = False
    a = s.detach().clone().requires_grad_(True)
    options = dict(divergence="kl", temperature=2.0, reduction="none", backend="cpu")
    rows = fastkd.divergence(a, t, mask=mask, **options)
    rows.sum().backward()
    assert torch.equal(a.grad[~mask], torch.zeros_like(a.grad[~mask]))
    assert torch.equal(rows[~mask], torch.zeros_like(rows[~mask]))
    kept = mask.nonzero().flatten().tolist()
    for i in kept[:6] + kept[-2:]:
        one = s[i : i + 1].detach().clone().requires_grad_(True)
        row = fastkd.divergence(one, t[i : i + 1], **options)
        row.sum().backward()
        assert torch.equal(row, rows[i : i + 1])
        assert torch.equal(one.grad, a.grad[i : i + 1])


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_streamed_rows_each_normalised_by_their_own_maxima(dtype):
    """Rows whose logits sit far apart (offsets ±200, alternating): the streamed
    path takes each row's maxima during the row before it, and another row's
    maxima would put every exponential of the row out of float32's range."""
    _cpu_only()
    rows = torch.arange(STREAMED[0], dtype=torch.float64, device=DEVICE)
    offsets = (200.0 * (1 - 2 * (rows % 2))).reshape(-1, 1)
    s = (logits(STREAMED, torch.float64) + offsets).to(dtype)
    t = (logits(STREAMED, torch.float64) - offsets).to(dtype)
    check_parity("cpu", s, t, divergence="kl", temperature=2.0, reduction="none")
