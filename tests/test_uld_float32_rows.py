"""The cpu backend's float32 rows of uld_loss (csrc/cpu/uld_buckets.h): the
sorted L1 distance from value buckets, sorting only the buckets where the two
rows' counting functions cross, against the float64 reference.

Rows are wide (thousands of entries, hundreds of buckets) and built to cross
often: equal vocabularies drawn from one distribution, identical rows, rows
inside one or two buckets, and log-probability rows with values far above 1
and down to float32's subnormals. Log-probability entries are drawn from one
shared pool of values whose neighbours differ by about 1 %, so float32 and
float64 order every pair of entries across the two sides alike, and the
gradient coefficients, not only the loss, must agree exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastkd
from tests.helpers import TOLERANCES, assert_matches
from tests.test_uld import HAS_CPU_OP

pytestmark = pytest.mark.skipif(not HAS_CPU_OP, reason="fastkd._C not built")


def both(s64, t64, upstream=None, **kwargs):
    """(cpu on float32 copies, reference on float64) of (rows, d/ds, d/dt) under a random upstream."""
    if upstream is None:
        upstream = torch.randn(s64.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = []
    for backend, dtype in (("cpu", torch.float32), ("reference", torch.float64)):
        s = s64.to(dtype).requires_grad_()
        t = t64.to(dtype).requires_grad_()
        rows = fastkd.uld_loss(s, t, backend=backend, reduction="none", **kwargs)
        grads = torch.autograd.grad((rows * upstream.to(dtype)).sum(), (s, t))
        out.append((rows.detach(), *grads))
    return out


def check(s64, t64, **kwargs):
    (rows, grad_s, grad_t), (want, want_s, want_t) = both(s64, t64, **kwargs)
    rtol, atol = TOLERANCES[torch.float32]
    assert rows.dtype == torch.float32
    assert torch.isfinite(rows).all()
    assert_matches(rows, want, torch.float32, "rows", elementwise=True)
    assert_matches(grad_s, want_s, torch.float32, "student gradient")
    assert_matches(grad_t, want_t, torch.float32, "teacher gradient")


def pool_rows(generator, rows, width, pool):
    """Log-probability rows drawn (with repeats: exact ties) from ``pool``."""
    return pool[torch.randint(0, pool.numel(), (rows, width), generator=generator)]


# float32 log-probabilities 0.01 apart: exp's relative gaps (1 %) dwarf float32 rounding
POOL = torch.arange(-103.0, 5.0, 0.01, dtype=torch.float32).double()


@pytest.mark.parametrize(("vs", "vt"), [(4000, 4000), (5000, 3000), (2000, 6000)])
def test_log_probability_rows_cross_in_many_buckets(vs, vt):
    """Both sides from one pool: with equal widths the counting functions cross in
    most buckets; values from e^-103 (subnormal in float32) to e^5 > 1."""
    g = torch.Generator().manual_seed(vs + vt)
    s, t = pool_rows(g, 3, vs, POOL), pool_rows(g, 3, vt, POOL)
    s[0, :50] = -math.inf
    check(s, t, student_is_logprob=True, teacher_is_logprob=True)


def test_log_probability_rows_inside_two_buckets():
    """A bucket is 1/256 of an octave: every entry in one of two neighbouring buckets,
    with many ties, so nearly everything goes through the exact walk."""
    g = torch.Generator().manual_seed(3)
    values = torch.tensor([1.0, 1.0005, 1.001, 1.002, 1.003, 1.0045, 1.006], dtype=torch.float64)
    pool = torch.log(values * 0.25).float().double()
    check(pool_rows(g, 4, 3000, pool), pool_rows(g, 4, 2500, pool), student_is_logprob=True,
          teacher_is_logprob=True)


def test_log_probability_rows_near_the_float32_maximum():
    """Values up to e^88.722 (3.4e38): the topmost bucket, whose upper edge is +inf
    (upstream 1 and ½: a larger one would overflow the float32 gradient)."""
    g = torch.Generator().manual_seed(4)
    s, t = pool_rows(g, 2, 300, POOL), pool_rows(g, 2, 400, POOL)
    s[:, 0] = 88.7
    t[:, :3] = torch.tensor([88.722, 88.6, 80.0], dtype=torch.float64).float().double()
    (rows, grad_s, grad_t), (want, want_s, want_t) = both(
        s, t, torch.tensor([1.0, 0.5], dtype=torch.float64), student_is_logprob=True, teacher_is_logprob=True)
    assert torch.isfinite(rows).all()
    assert_matches(rows, want, torch.float32, "rows", elementwise=True)
    assert_matches(grad_s, want_s, torch.float32, "student gradient")
    assert_matches(grad_t, want_t, torch.float32, "teacher gradient")


def test_identical_rows_give_zero_loss_and_zero_gradient():
    """p = q entry for entry: every occupied bucket crosses, every run ties across sides."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 20000, generator=g, dtype=torch.float64).float()
    s = x.clone().requires_grad_()
    t = x.clone().requires_grad_()
    rows = fastkd.uld_loss(s, t, backend="cpu", reduction="none")
    rows.sum().backward()
    assert torch.equal(rows, torch.zeros(3))
    assert not s.grad.any() and not t.grad.any()


@pytest.mark.parametrize("scale", [1.0, 12.0])
def test_softmax_rows_of_equal_width_match_the_reference_loss(scale):
    """Softmax rows of one width from one distribution (the crossing-heavy case of
    real logits); ``scale`` 12 spreads the probabilities over ~100 octaves. Only the
    loss: the two sides' normalisers differ, so float32 may order two nearly equal
    cross-side values differently from float64 and flip a gradient coefficient."""
    g = torch.Generator().manual_seed(int(scale))
    s = torch.randn(4, 8000, generator=g, dtype=torch.float64) * scale
    t = torch.randn(4, 8000, generator=g, dtype=torch.float64) * scale
    s, t = s.float().double(), t.float().double()
    got = fastkd.uld_loss(s.float(), t.float(), backend="cpu", reduction="none")
    want = fastkd.uld_loss(s, t, backend="reference", reduction="none")
    assert_matches(got, want, torch.float32, "rows", elementwise=True)


def test_student_gradient_alone_matches():
    """Only the student requires grad: the teacher side's coefficients are skipped."""
    g = torch.Generator().manual_seed(6)
    s64, t64 = pool_rows(g, 2, 3000, POOL), pool_rows(g, 2, 3000, POOL)
    s = s64.float().requires_grad_()
    rows = fastkd.uld_loss(s, t64.float(), backend="cpu", reduction="sum", student_is_logprob=True,
                           teacher_is_logprob=True)
    rows.backward()
    s_ref = s64.clone().requires_grad_()
    want = fastkd.uld_loss(s_ref, t64, backend="reference", reduction="sum", student_is_logprob=True,
                           teacher_is_logprob=True)
    want.backward()
    assert_matches(rows.detach(), want.detach(), torch.float32, "loss")
    assert_matches(s.grad, s_ref.grad, torch.float32, "student gradient")
