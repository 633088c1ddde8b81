"""The Triton launchers (``fastkd.kernels.<stem>``, callable by users) refuse what
their C++ ops refuse, with a ValueError in the same words as the op's
TORCH_CHECK (csrc/common/checks.h, csrc/cpu/*.cpp): each case is run on the cpu
op and on the launcher with the same arguments."""

from __future__ import annotations

import math

import pytest
import torch

from fastkd import _ops
from tests.common_checks import strided

pytestmark = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR))

N, V = 4, 6


def launcher(stem: str, name: str):
    module = pytest.importorskip(f"fastkd.kernels.{stem}")
    if module.DEVICE_TYPE != "cpu":
        pytest.skip("the cpu op and the launcher share inputs only under the Triton interpreter")
    return getattr(module, name)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def both_raise(op, triton_launcher, args, kwargs, needle):
    with pytest.raises(RuntimeError, match=needle):
        op(*args, **kwargs)
    with pytest.raises(ValueError, match=needle):
        triton_launcher(*args, **kwargs)


def divergence_args(student, teacher, row_mask=None, labels=None):
    return (student, teacher, row_mask, 0, 1.0, 0.0, 1.0, True, False, labels, 0.0 if labels is None else 1.0)


def mixture_args(student, row_mask=None, labels=None):
    weights = torch.tensor([0.25, 0.75], dtype=torch.float64)
    return (student, randn(2, *student.shape, seed=1), weights, row_mask, 0, 1.0, 0.0, 1.0, True, labels,
            0.0 if labels is None else 1.0)


def topk_args(student, row_mask=None, labels=None):
    ids = torch.stack([torch.randperm(student.shape[1], generator=torch.Generator().manual_seed(i))[:3]
                       for i in range(student.shape[0])])
    return (student, ids, randn(student.shape[0], 3, seed=2), row_mask, 0, 1.0, 0.0, 1.0, True, labels,
            0.0 if labels is None else 1.0)


FAMILIES = {
    "divergence": (lambda: torch.ops.fastkd.divergence_forward, ("divergence", "divergence_forward"),
                   lambda s, **kw: divergence_args(s, randn(*s.shape, seed=3), **kw)),
    "mixture": (lambda: torch.ops.fastkd.mixture_divergence_forward,
                ("mixture", "mixture_divergence_forward"), mixture_args),
    "topk": (lambda: torch.ops.fastkd.topk_divergence_forward, ("topk", "topk_divergence_forward"),
             topk_args),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bad", (V, V + 5, -1, -100))
def test_kept_labels_outside_the_vocabulary(family, bad):
    op, (stem, name), make = FAMILIES[family]
    labels = torch.tensor([0, 2, bad, 1])
    args = make(randn(N, V), labels=labels)
    needle = rf"labels of kept rows must lie in \[0, {V}\), got {bad} at row 2"
    both_raise(op(), launcher(stem, name), args, {}, needle)


@pytest.mark.parametrize("family", FAMILIES)
def test_excluded_rows_labels_are_not_read(family):
    """A label outside [0, V) on an excluded row is allowed (ignore_index): same result as the op."""
    op, (stem, name), make = FAMILIES[family]
    keep = torch.tensor([True, True, False, True])
    args = make(randn(N, V), labels=torch.tensor([0, 2, -100, 1]), row_mask=keep)
    want = op()(*args)
    got = launcher(stem, name)(*args)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_divergence_without_vocabulary():
    args = divergence_args(randn(N, 0), randn(N, 0))
    both_raise(torch.ops.fastkd.divergence_forward, launcher("divergence", "divergence_forward"), args, {},
               r"student must have at least one column \(vocabulary entry\)")


@pytest.mark.parametrize("gamma", (math.inf, -math.inf, math.nan, 0.0))
def test_cc_gamma_must_be_finite_and_positive(gamma):
    s, t = randn(N, 5), randn(N, 3, seed=1)
    with pytest.raises(RuntimeError, match="gamma must be finite and > 0"):
        torch.ops.fastkd.cc_forward(s, t, True, gamma, 2)
    with pytest.raises(ValueError, match="gamma must be finite and > 0"):
        launcher("gram_relation", "cc_forward")(s, t, True, gamma=gamma, order=2)


@pytest.mark.parametrize("eps", (math.inf, math.nan, 0.0, -1e-7))
def test_pkt_eps_must_be_finite_and_positive(eps):
    s, t = randn(N, 5), randn(N, 3, seed=1)
    with pytest.raises(RuntimeError, match="eps must be finite and > 0"):
        torch.ops.fastkd.pkt_forward(s, t, True, eps)
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        launcher("gram_relation", "pkt_forward")(s, t, True, eps=eps)


# ---- uld_forward ---------------------------------------------------------------------------


def uld_args(student=None, teacher=None, row_mask=None, inv_ts=1.0, inv_tt=1.0, grad_scale=1.0,
             student_is_logprob=False, teacher_is_logprob=False):
    student = randn(N, V) if student is None else student
    teacher = randn(N, V + 3, seed=1) if teacher is None else teacher
    return (student, teacher, row_mask, inv_ts, inv_tt, grad_scale, True, True, student_is_logprob,
            teacher_is_logprob)


ULD_BAD = [
    (dict(teacher=randn(N + 1, V)), "rows must be aligned"),
    (dict(student=randn(N, V, 2)), "student must be 2-D"),
    (dict(teacher=randn(N)), "teacher must be 2-D"),
    (dict(student=randn(N, 0)), r"student and teacher must have at least one column \(vocabulary entry\)"),
    (dict(teacher=randn(N, 0)), r"student and teacher must have at least one column \(vocabulary entry\)"),
    (dict(teacher=randn(N, V).bfloat16()), "must have the same dtype"),
    (dict(inv_ts=0.0), "inv_student_temperature must be finite and > 0"),
    (dict(inv_tt=math.inf), "inv_teacher_temperature must be finite and > 0"),
    (dict(inv_ts=-1.0), "inv_student_temperature must be finite and > 0"),
    (dict(inv_ts=0.5, student_is_logprob=True), "inv_student_temperature must be 1 when student_is_logprob"),
    (dict(inv_tt=2.0, teacher_is_logprob=True), "inv_teacher_temperature must be 1 when teacher_is_logprob"),
    (dict(grad_scale=math.nan), "grad_scale must be finite"),
    (dict(row_mask=torch.ones(N)), "row_mask must be bool"),
    (dict(row_mask=torch.ones(N + 1, dtype=torch.bool)), r"row_mask must be \[N\]"),
]


@pytest.mark.parametrize(("change", "needle"), ULD_BAD,
                         ids=[f"{i}-{needle[:30]}" for i, (_, needle) in enumerate(ULD_BAD)])
def test_uld_bad_inputs(change, needle):
    both_raise(torch.ops.fastkd.uld_forward, launcher("uld", "uld_forward"), uld_args(**change), {}, needle)


@pytest.mark.parametrize(("student_is_logprob", "teacher_is_logprob"),
                         [(False, False), (True, False), (True, True)])
def test_uld_launcher_matches_the_op(student_is_logprob, teacher_is_logprob):
    """Same arguments, same rows and gradients (a mask, a grad_scale, both input modes)."""
    args = uld_args(row_mask=torch.tensor([True, False, True, True]),
                    inv_ts=1.0 if student_is_logprob else 0.5, grad_scale=0.25,
                    student_is_logprob=student_is_logprob, teacher_is_logprob=teacher_is_logprob)
    got = launcher("uld", "uld_forward")(*args)
    for a, b in zip(got, torch.ops.fastkd.uld_forward(*args), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- index and label tensors as strided views -------------------------------------------
# The kernels read labels, masks and ids through a bare pointer: each launcher
# must hand them over contiguous (or pass their strides). A 1-D view is a
# column of a two-column tensor whose other column holds different values,
# so a launcher that read it as contiguous would read those instead
# (tests.common_checks.strided).


def labels_and_mask():
    return torch.tensor([3, 0, 5, 1]), torch.tensor([True, False, True, True])


def divergence_case(view):
    labels, keep = labels_and_mask()
    args = divergence_args(randn(N, V), randn(N, V, seed=3), row_mask=view(keep), labels=view(labels))
    return ("divergence", "divergence_forward"), args


def mixture_case(view):
    labels, keep = labels_and_mask()
    return ("mixture", "mixture_divergence_forward"), mixture_args(randn(N, V), view(keep), view(labels))


def topk_case(view):
    labels, keep = labels_and_mask()
    args = list(topk_args(randn(N, V), view(keep), view(labels)))
    args[1] = view(args[1])  # teacher ids, (N, k)
    return ("topk", "topk_divergence_forward"), tuple(args)


def dkd_case(view):
    labels, _ = labels_and_mask()
    return ("dkd", "dkd_forward"), (randn(N, V), randn(N, V, seed=3), view(labels), 1.0, 8.0, 0.5, 1.0, True)


def info_nce_case(view):
    labels, _ = labels_and_mask()
    return ("info_nce", "info_nce_forward"), (randn(N, 5), randn(V, 5, seed=3), view(labels), 2.0)


def info_nce_backward_case(view):
    labels, _ = labels_and_mask()
    q, k = randn(N, 5), randn(V, 5, seed=3)
    _, lse = launcher("info_nce", "info_nce_forward")(q, k, labels, 2.0)
    return ("info_nce", "info_nce_backward"), (torch.full((N,), 0.5), q, k, view(labels), lse, 2.0)


def uld_case(view):
    _, keep = labels_and_mask()
    return ("uld", "uld_forward"), uld_args(row_mask=view(keep))


def crd_case(view):
    ids = torch.stack([torch.randperm(9, generator=torch.Generator().manual_seed(i))[:3] for i in range(N)])
    return ("crd", "crd_nce_forward"), (randn(N, 5), randn(9, 5, seed=3), view(ids), torch.tensor(0.0), 2.0,
                                        True)


@pytest.mark.parametrize(
    "case",
    (divergence_case, mixture_case, topk_case, dkd_case, info_nce_case, info_nce_backward_case, crd_case,
     uld_case),
    ids=lambda case: case.__name__.removesuffix("_case"),
)
def test_strided_index_views_read_by_value(case):
    """The launcher gives the same results for strided label / mask / id views as for contiguous copies."""
    (stem, name), contiguous_args = case(lambda x: x)
    _, strided_args = case(strided)
    run = launcher(stem, name)
    for got, want in zip(run(*strided_args), run(*contiguous_args), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- the upstream-gradient scaling kernel ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("factor", [1.0, 0.25, -3.0, float("nan")])
def test_scale_unless_one_matches_mul_(dtype, factor):
    from fastkd.kernels import _upstream

    grad = torch.randn(5000, generator=torch.Generator().manual_seed(0)).to(dtype)
    expected = grad.clone().mul_(torch.tensor(factor))
    got = _upstream.scale_unless_one_(grad, torch.tensor(factor))
    assert got is grad
    # the interpreter truncates float32 → bfloat16 where CUDA (and torch) round to nearest: one ulp
    rtol = 2**-7 if dtype == torch.bfloat16 and _upstream.INTERPRETED else 0
    torch.testing.assert_close(got, expected, rtol=rtol, atol=0, equal_nan=True)


def test_scale_unless_one_rejects_what_it_cannot_scale():
    from fastkd.kernels import _upstream

    with pytest.raises(ValueError, match="grad must be a contiguous float32"):
        _upstream.scale_unless_one_(torch.randn(4, 4).t(), torch.tensor(2.0))
    with pytest.raises(ValueError, match="factor one floating value"):
        _upstream.scale_unless_one_(torch.randn(4), torch.tensor([1.0, 2.0]))
