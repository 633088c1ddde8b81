"""uld_loss on log-probability rows (``student_is_logprob`` / ``teacher_is_logprob``),
docs/spec.md §1.14.

A side in log-probability mode is used as given: ``p = exp(x)``, no softmax and
no renormalisation, so rows that do not sum to 1 (the merged rows of
:func:`fastkd.merge_aligned`) keep their mass, and ``dℓ/dx_j = g_j · p_j``
(no softmax Jacobian). The oracle is the per-row loop of tests/test_uld.py with
that side's probabilities taken as ``exp(x)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkd
from fastkd.reference import uld as reference_uld
from tests.common_checks import check_aot_eager_equals_eager
from tests.helpers import DEVICE, assert_matches
from tests.test_uld import BACKENDS, HAS_CPU_OP, check_rows, dtype_for, rank_coefficients, run, uld_sizes

SIDES = {"student": (True, False), "teacher": (False, True), "both": (True, True)}


def flags(side: str) -> dict:
    student, teacher = SIDES[side]
    return dict(student_is_logprob=student, teacher_is_logprob=teacher)


def oracle(s, t, *, student_is_logprob=False, teacher_is_logprob=False, student_temperature=1.0,
           teacher_temperature=1.0, mask=None):
    """``(rows (N,), dℓ_i/ds (N, V_s), dℓ_i/dt (N, V_t))`` in float64, zero on excluded rows:
    a log-probability side has ``p = exp(x)`` and ``dℓ/dx = g · p``, a logit side
    ``p = softmax(x / T)`` and ``dℓ/dx = p (g − Σ p g) / T``."""
    s, t = s.double(), t.double()
    rows = torch.zeros(s.shape[0], dtype=torch.float64)
    grad_s, grad_t = torch.zeros_like(s), torch.zeros_like(t)
    width = max(s.shape[1], t.shape[1])

    def probabilities(x, is_logprob, temperature):
        return x.exp() if is_logprob else torch.softmax(x / temperature, 0)

    def gradient(p, g, is_logprob, temperature):
        return p * g if is_logprob else p * (g - (p * g).sum()) / temperature

    for i in range(s.shape[0]):
        if mask is not None and not mask[i]:
            continue
        p = probabilities(s[i], student_is_logprob, student_temperature)
        q = probabilities(t[i], teacher_is_logprob, teacher_temperature)
        a = sorted(p.tolist(), reverse=True) + [0.0] * (width - p.numel())
        b = sorted(q.tolist(), reverse=True) + [0.0] * (width - q.numel())
        rows[i] = sum(abs(x - y) for x, y in zip(a, b, strict=True))
        grad_s[i] = gradient(p, rank_coefficients(p, q), student_is_logprob, student_temperature)
        grad_t[i] = gradient(q, rank_coefficients(q, p), teacher_is_logprob, teacher_temperature)
    return rows, grad_s, grad_t


def unnormalised_log_probs(generator, rows, width, *, ties=False):
    """Log-probability rows whose exponentials sum to between 0.2 and 1 (a merged
    row's mass), with some −inf entries (probability 0) and, with ``ties``, many
    exactly equal entries."""
    if ties:
        x = torch.randint(0, 3, (rows, width), generator=generator).double() * -0.75
    else:
        x = torch.randn(rows, width, generator=generator, dtype=torch.float64) * 2
    x = torch.where(torch.rand(rows, width, generator=generator) < 0.15, -math.inf, x)
    x[:, 0] = 0.5
    mass = torch.rand(rows, 1, generator=generator, dtype=torch.float64) * 0.8 + 0.2
    return torch.log_softmax(x, 1) + mass.log()


def inputs(generator, side, n, vs, vt, ties=False):
    """Student and teacher rows: log-probabilities on the log-probability sides, logits on the others."""
    student_lp, teacher_lp = SIDES[side]
    s = (unnormalised_log_probs(generator, n, vs, ties=ties) if student_lp
         else torch.randn(n, vs, generator=generator, dtype=torch.float64) * 2)
    t = (unnormalised_log_probs(generator, n, vt, ties=ties) if teacher_lp
         else torch.randn(n, vt, generator=generator, dtype=torch.float64) * 2)
    return s, t


def logit_side_temperatures(side: str) -> dict:
    """Temperatures ≠ 1 on the logit side (a log-probability side must have 1)."""
    student_lp, teacher_lp = SIDES[side]
    return {**({} if student_lp else {"student_temperature": 0.7}),
            **({} if teacher_lp else {"teacher_temperature": 2.5})}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize(("vs", "vt"), [(5, 9), (9, 5), (7, 7), (1, 6), (130, 300)])
@pytest.mark.parametrize("ties", [False, True])
def test_log_prob_rows_match_the_oracle(backend, side, vs, vt, ties):
    """Rows and both gradients on unnormalised log-probability rows with −inf entries,
    a mask, a non-unit upstream per row and a temperature on the logit side."""
    g = torch.Generator().manual_seed(vs * 1000 + vt + 7 * ties + len(side))
    n = 4
    s, t = inputs(g, side, n, vs, vt, ties)
    mask = torch.tensor([True, True, True, False])
    upstream = torch.randn(n, generator=g, dtype=torch.float64)
    options = dict(**flags(side), **logit_side_temperatures(side))
    check_rows(backend, s, t, oracle(s, t, mask=mask, **options), upstream, mask=mask, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_reductions(backend, reduction):
    g = torch.Generator().manual_seed(21)
    s, t = inputs(g, "both", 6, 11, 17)
    mask = torch.tensor([True, False, True, True, False, True])
    rows, grad_s, grad_t = oracle(s, t, mask=mask, **flags("both"))
    dtype = dtype_for(backend)
    got, got_s, got_t = run(backend, s, t, dtype, reduction=reduction, mask=mask, **flags("both"))
    factor = 1.0 if reduction in ("sum", "none") else 1.0 / 4
    expected = rows if reduction == "none" else rows.sum() * factor
    assert_matches(got, expected, dtype, f"loss {backend}")
    assert_matches(got_s, grad_s * factor, dtype, f"student gradient {backend}")
    assert_matches(got_t, grad_t * factor, dtype, f"teacher gradient {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_rows_are_not_renormalised(backend):
    """exp of a row is compared as it is: halving a row's mass (x − log 2) changes the
    loss, where the logit mode would not see it; on normalised log-probabilities
    (log_softmax) both modes agree."""
    g = torch.Generator().manual_seed(22)
    s = torch.log_softmax(torch.randn(3, 8, generator=g, dtype=torch.float64), 1)
    t = torch.log_softmax(torch.randn(3, 5, generator=g, dtype=torch.float64), 1)
    dtype = dtype_for(backend)
    as_logits = run(backend, s, t, dtype, reduction="none")
    normalised = run(backend, s, t, dtype, reduction="none", **flags("both"))
    assert_matches(normalised[0], as_logits[0].double(), dtype, f"rows {backend}")
    halved = run(backend, s - math.log(2), t, dtype, reduction="none", **flags("both"))
    direct = oracle(s - math.log(2), t, **flags("both"))[0]
    assert_matches(halved[0], direct, dtype, f"halved rows {backend}", elementwise=True)
    assert (halved[0].double() - as_logits[0].double()).abs().min() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_an_all_neg_inf_log_prob_row_has_no_mass(backend, side):
    """An all −inf log-probability row is the zero vector (no distribution is needed):
    the loss is the other row's total and the gradients are finite; the row's own
    gradient is 0."""
    g = torch.Generator().manual_seed(23)
    s, t = inputs(g, side, 3, 6, 4)
    (s if side == "student" else t)[1] = -math.inf
    dtype = dtype_for(backend)
    loss, grad_s, grad_t = run(backend, s, t, dtype, reduction="none", **flags(side))
    rows, expected_s, expected_t = oracle(s, t, **flags(side))
    assert_matches(loss, rows, dtype, f"rows {backend}", elementwise=True)
    assert torch.isfinite(grad_s).all() and torch.isfinite(grad_t).all()
    assert_matches(grad_s, expected_s, dtype, f"student gradient {backend}")
    assert_matches(grad_t, expected_t, dtype, f"teacher gradient {backend}")
    assert not (grad_s if side == "student" else grad_t)[1].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nan_or_inf_log_prob_gives_a_nan_row(backend, bad):
    g = torch.Generator().manual_seed(24)
    s, t = inputs(g, "both", 2, 5, 6)
    s[0, 2] = bad
    loss, grad_s, _ = run(backend, s, t, dtype_for(backend), reduction="none", **flags("both"))
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])
    assert torch.isnan(grad_s[0]).all() and torch.isfinite(grad_s[1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_hard_label_mixing_takes_the_rows_as_logits(backend):
    """The hard term is the cross-entropy of §1.7 on the student rows (a softmax of
    them); the soft term compares the rows as given."""
    g = torch.Generator().manual_seed(25)
    s, t = inputs(g, "student", 5, 7, 11)
    labels = torch.tensor([1, -100, 6, 0, 3])
    dtype = dtype_for(backend)
    total, hard, soft = fastkd.uld_loss(
        s.to(DEVICE, dtype), t.to(DEVICE, dtype), labels=labels.to(DEVICE), hard_weight=0.5,
        return_parts=True, student_is_logprob=True, backend=backend)
    keep = labels != -100
    ce = torch.nn.functional.cross_entropy(s[keep], labels[keep])
    uld = oracle(s[keep], t[keep], student_is_logprob=True)[0].mean()
    assert_matches(hard, 0.5 * ce, dtype, f"hard part {backend}")
    assert_matches(soft, uld, dtype, f"soft part {backend}")
    assert_matches(total, 0.5 * ce + uld, dtype, f"total {backend}")


def test_reference_gradcheck():
    g = torch.Generator().manual_seed(26)
    mask = torch.tensor([True, False, True])
    for side in SIDES:
        s, t = inputs(g, side, 3, 5, 8)
        s, t = s.requires_grad_(), t.requires_grad_()
        for reduction in ("batchmean", "none"):
            def loss(a, b, reduction=reduction, side=side):
                out = reference_uld.uld_loss(a, b, mask=mask, reduction=reduction, **flags(side),
                                             **logit_side_temperatures(side))
                return out * torch.arange(1.0, 4.0, dtype=torch.float64) if reduction == "none" else out
            assert torch.autograd.gradcheck(loss, (s, t))


@pytest.mark.skipif(not HAS_CPU_OP, reason="no cpu uld op in the extension")
def test_cpu_gradcheck():
    g = torch.Generator().manual_seed(27)
    for side in SIDES:
        s, t = inputs(g, side, 3, 8, 5)
        s, t = s.requires_grad_(), t.requires_grad_()
        for reduction in ("sum", "none"):
            def loss(a, b, reduction=reduction, side=side):
                out = fastkd.uld_loss(a, b, reduction=reduction, backend="cpu", **flags(side),
                                      **logit_side_temperatures(side))
                weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
                return out * weights if reduction == "none" else out
            assert torch.autograd.gradcheck(loss, (s, t))


@pytest.mark.skipif(not HAS_CPU_OP, reason="no cpu uld op in the extension")
def test_opcheck_of_the_cpu_op():
    g = torch.Generator().manual_seed(28)
    s, t = inputs(g, "both", 4, 6, 9)
    mask = torch.tensor([True, False, True, True])
    for args in ((s, t, mask, 1.0, 1.0, 0.25, True, True, True, True),
                 (s.float(), t.float(), None, 1.0, 0.5, 1.0, True, False, True, False),
                 (s.bfloat16(), t.bfloat16(), mask, 2.0, 1.0, 1.0, False, True, False, True)):
        torch.library.opcheck(torch.ops.fastkd.uld_forward, args)


@pytest.mark.skipif(not HAS_CPU_OP, reason="no cpu uld op in the extension")
def test_cpu_op_refuses_a_temperature_with_log_probs():
    s, t = torch.randn(3, 4), torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="inv_student_temperature must be 1 when student_is_logprob"):
        torch.ops.fastkd.uld_forward(s, t, None, 0.5, 1.0, 1.0, True, False, True, False)
    with pytest.raises(RuntimeError, match="inv_teacher_temperature must be 1 when teacher_is_logprob"):
        torch.ops.fastkd.uld_forward(s, t, None, 1.0, 2.0, 1.0, True, False, False, True)


def test_triton_launcher_refuses_a_temperature_with_log_probs():
    kernels = pytest.importorskip("fastkd.kernels.uld")
    if not fastkd._dispatch.backend_status("triton", DEVICE.type).available:
        pytest.skip("no triton backend here")
    s, t = torch.randn(3, 4, device=DEVICE), torch.randn(3, 5, device=DEVICE)
    with pytest.raises(ValueError, match="inv_student_temperature must be 1 when student_is_logprob"):
        kernels.uld_forward(s, t, None, 0.5, 1.0, 1.0, True, False, True, False)
    with pytest.raises(ValueError, match="teacher_is_logprob must be a bool"):
        kernels.uld_forward(s, t, None, 1.0, 1.0, 1.0, True, False, False, 1)


@pytest.mark.skipif(not HAS_CPU_OP, reason="no cpu uld op in the extension")
def test_compiles_with_fullgraph():
    g = torch.Generator().manual_seed(29)
    s, t = inputs(g, "student", 5, 9, 13)
    s = s.float().requires_grad_()
    mask = torch.tensor([True, True, False, True, True])

    def loss(a, b):
        return fastkd.uld_loss(a, b, mask=mask, teacher_temperature=2.0, student_is_logprob=True,
                               backend="cpu")

    check_aot_eager_equals_eager(loss, s, t.float())


@pytest.mark.skipif(not HAS_CPU_OP or DEVICE.type != "cpu", reason="the cpu uld op on cpu tensors")
@settings(deadline=None, max_examples=30)
@given(**uld_sizes(min_rows=0, max_vocab=40), side=st.sampled_from(sorted(SIDES)), ties=st.booleans(),
       masked=st.booleans())
def test_cpu_op_matches_the_reference_in_float64(rows, vs, vt, side, ties, masked, seed):
    g = torch.Generator().manual_seed(seed)
    s, t = inputs(g, side, rows, vs, vt, ties)
    mask = (torch.rand(rows, generator=g) < 0.7) if masked else None
    upstream = torch.randn(rows, generator=g, dtype=torch.float64)
    options = dict(reduction="none", mask=mask, **flags(side))
    expected = run("reference", s, t, torch.float64, upstream, **options)
    got = run("cpu", s, t, torch.float64, upstream, **options)
    for what, a, b in zip(("rows", "student gradient", "teacher gradient"), got, expected, strict=True):
        assert_matches(a, b, torch.float64, what)


def test_module_form():
    g = torch.Generator().manual_seed(30)
    s, t = inputs(g, "teacher", 4, 6, 9)
    module = fastkd.ULDLoss(teacher_is_logprob=True, student_temperature=2.0, reduction="sum")
    expected = fastkd.uld_loss(s, t, teacher_is_logprob=True, student_temperature=2.0, reduction="sum")
    assert torch.equal(module(s, t), expected)
    assert "teacher_is_logprob=True" in repr(module)
    with pytest.raises(ValueError, match="teacher_temperature must be 1 when teacher_is_logprob=True"):
        fastkd.ULDLoss(teacher_is_logprob=True, teacher_temperature=2.0)
    with pytest.raises(ValueError, match="student_is_logprob must be a bool"):
        fastkd.ULDLoss(student_is_logprob="yes")


BAD = [
    (dict(student_is_logprob=True, student_temperature=2.0),
     r"student_temperature must be 1 when student_is_logprob=True, got 2.0"),
    (dict(teacher_is_logprob=True, teacher_temperature=0.5),
     r"teacher_temperature must be 1 when teacher_is_logprob=True, got 0.5"),
    (dict(student_is_logprob=1), "student_is_logprob must be a bool"),
    (dict(teacher_is_logprob=None), "teacher_is_logprob must be a bool"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[m[:40] for _, m in BAD])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_arguments_raise_value_error_naming_them(change, message, backend):
    kwargs = dict(student_logits=torch.randn(2, 4), teacher_logits=torch.randn(2, 5), backend=backend)
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        fastkd.uld_loss(**kwargs)
    reference_kwargs = {k: v for k, v in kwargs.items() if k != "backend"}
    with pytest.raises(ValueError, match=message):
        reference_uld.uld_loss(**reference_kwargs)

