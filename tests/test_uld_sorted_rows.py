"""The triton ULD kernels' path for rows longer than one block holds
(``kernels/uld.py``: keys, a device sort, the sorted-row kernel), checked
against the float64 reference in the Triton interpreter.

``MAX_VOCAB`` and ``SORTED_BLOCK`` are shrunk so short rows take that path
and runs of equal values cross block boundaries (the carries between
blocks); ``SCRATCH_BYTES`` so rows go in several chunks.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastkd.reference import uld as reference_uld
from tests.helpers import assert_matches

kernels_uld = pytest.importorskip("fastkd.kernels.uld")


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(kernels_uld, "MAX_VOCAB", 8)
    monkeypatch.setattr(kernels_uld, "SORTED_BLOCK", 4)
    # 3 rows of width ≤ 13 per chunk
    monkeypatch.setattr(kernels_uld, "SCRATCH_BYTES", 3 * 13 * kernels_uld._SCRATCH_BYTES_PER_RANK)


def run_triton(s, t, *, mask=None, ts=1.0, tt=1.0, scale=1.0, student_grad=True, teacher_grad=True,
               s_logprob=False, t_logprob=False):
    return kernels_uld.uld_forward(s, t, mask, 1.0 / ts, 1.0 / tt, scale, student_grad, teacher_grad,
                                   s_logprob, t_logprob)


def expected(s, t, *, mask=None, ts=1.0, tt=1.0, scale=1.0, s_logprob=False, t_logprob=False):
    """Per-row loss and ``scale · d(row loss)/d(logits)`` of the float64 reference."""
    s64 = s.double().requires_grad_(True)
    t64 = t.double().requires_grad_(True)
    rows = reference_uld.uld_loss(s64, t64, student_temperature=ts, teacher_temperature=tt, mask=mask,
                                  reduction="none", student_is_logprob=s_logprob,
                                  teacher_is_logprob=t_logprob)
    grad_s, grad_t = torch.autograd.grad(rows.sum() * scale, (s64, t64))
    return rows.detach(), grad_s, grad_t


def tied_logits(generator, rows, width):
    """Few distinct values (long runs of ties, across blocks of 4) and some −inf."""
    x = torch.randint(-1, 2, (rows, width), generator=generator).float() * 0.5
    return torch.where(torch.rand(rows, width, generator=generator) < 0.1, -math.inf, x)


def check(got, want, label, dtype=torch.float32):
    assert len(got) == len(want)
    for name, a, b in zip(("loss", "grad_s", "grad_t"), got, want, strict=False):
        assert_matches(a, b, dtype, f"{label} {name}", elementwise=True)


@pytest.mark.parametrize("widths", [(13, 9), (9, 13), (11, 11), (16, 5)])
def test_sorted_rows_match_the_reference(small_blocks, widths):
    g = torch.Generator().manual_seed(sum(widths))
    rows = 7  # three chunks
    s = tied_logits(g, rows, widths[0])
    t = tied_logits(g, rows, widths[1])
    mask = torch.tensor([True, True, False, True, True, True, False])
    got = run_triton(s, t, mask=mask, ts=2.0, tt=0.5, scale=0.75)
    check(got, expected(s, t, mask=mask, ts=2.0, tt=0.5, scale=0.75), f"widths {widths}")


def test_sorted_rows_long_run_of_zeros(small_blocks):
    """A short student row padded by many zeros: one run spans most blocks."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, generator=g) * 20  # near one-hot: zeros after underflow
    t = torch.randn(2, 30, generator=g)
    check(run_triton(s, t), expected(s, t), "padded")


def test_sorted_rows_log_probabilities(small_blocks):
    g = torch.Generator().manual_seed(4)
    s = torch.randn(3, 12, generator=g).log_softmax(-1)
    t = torch.randn(3, 10, generator=g)
    got = run_triton(s, t, s_logprob=True)
    check(got, expected(s, t, s_logprob=True), "log-probabilities")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_sorted_rows_half_precision(small_blocks, dtype):
    """bf16 / fp16 logits, read in their dtype; the reference on the same rounded values."""
    g = torch.Generator().manual_seed(8)
    s = (torch.randn(4, 11, generator=g) * 2).to(dtype)
    t = (torch.randn(4, 13, generator=g) * 2).to(dtype)
    loss, grad_s, grad_t = run_triton(s, t)
    assert grad_s.dtype == dtype and grad_t.dtype == dtype
    check((loss, grad_s, grad_t), expected(s, t), f"{dtype}", dtype)


def test_sorted_rows_only_the_student_gradient(small_blocks):
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(4, 10, generator=g), torch.randn(4, 12, generator=g)
    loss, grad_s, grad_t = run_triton(s, t, teacher_grad=False)
    want = expected(s, t)
    assert grad_t.shape == (0, 0)
    check((loss, grad_s), want[:2], "student only")


def test_sorted_rows_special_values(small_blocks):
    """A NaN logit, a +inf logit and an all −inf row (which uld_loss refuses
    before any kernel runs) give NaN rows; the other rows are unchanged."""
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(4, 10, generator=g), torch.randn(4, 12, generator=g)
    s[1, 7] = math.nan
    t[2] = -math.inf
    s[3, 2] = math.inf
    loss, grad_s, grad_t = run_triton(s, t)
    rows, want_s, want_t = expected(s[:1], t[:1])
    assert torch.isnan(loss[1:]).all()
    assert torch.isnan(grad_s[1:]).all() and torch.isnan(grad_t[1:]).all()
    check((loss[:1], grad_s[:1], grad_t[:1]), (rows[:1], want_s[:1], want_t[:1]), "finite row")


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 5), vs=st.integers(1, 14), vt=st.integers(1, 14), seed=st.integers(0, 2**16),
       ties=st.booleans())
def test_sorted_rows_property(rows, vs, vt, seed, ties):
    if max(vs, vt) <= 8:
        vs = 9  # the sorted-row path
    g = torch.Generator().manual_seed(seed)
    make = (lambda w: tied_logits(g, rows, w)) if ties else (lambda w: torch.randn(rows, w, generator=g) * 3)
    s, t = make(vs), make(vt)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels_uld, "MAX_VOCAB", 8)
        mp.setattr(kernels_uld, "SORTED_BLOCK", 4)
        mp.setattr(kernels_uld, "SCRATCH_BYTES", 2 * 14 * kernels_uld._SCRATCH_BYTES_PER_RANK)
        got = run_triton(s, t)
    check(got, expected(s, t), f"rows={rows} vs={vs} vt={vt} ties={ties}")
