"""The hard-label cross-entropy fused into ``fastkd::divergence_forward``: op-level parity per kernel backend.

With ``labels`` the op also returns ``row_ce[i] = log Σ_j exp(s_ij) − s_iy``
(temperature 1) and adds ``hard_grad_scale · (softmax(s_i) − onehot(y_i))``
to the student gradient; the divergence outputs are those of the op without
labels. Everything is compared with a float64 computation written here in
plain torch (the divergence part through ``fastkd.reference.divergence`` and
autograd), on the ``cpu`` + ``triton`` backends here and ``triton`` + ``cuda``
under ``FASTKD_TEST_DEVICE=cuda``.
"""

from __future__ import annotations

import pytest
import torch

from fastkd import reference
from tests import ce_op_checks
from tests.ce_op_checks import COEF, GRAD_SCALE, HARD_GRAD_SCALE, OUT_OF_RANGE_VOCAB, coef_of, logits
from tests.helpers import DEVICE, assert_matches, backend_params, out_of_range_labels

DIVERGENCES = ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")  # kind codes 0..5


def strided_labels(rows: int, vocab: int) -> torch.Tensor:
    """Random class ids as a non-contiguous (N,) int64 view (the op makes it contiguous)."""
    return torch.randint(0, vocab, (rows, 2), device=DEVICE)[:, 1]


def forward(backend, s, t, row_mask, kind, temperature, *, student_grad=True, teacher_grad=False,
            labels=None, hard_grad_scale=HARD_GRAD_SCALE):
    """The op of ``backend``: (row_loss, grad_s, grad_t, row_ce)."""
    return ce_op_checks.run_op(backend, "divergence", "divergence_forward", (
        s, t, row_mask, kind, 1.0 / temperature, coef_of(kind), GRAD_SCALE, student_grad, teacher_grad,
        labels, hard_grad_scale))


def expected(s, t, row_mask, kind, temperature, labels, precision=torch.float64):
    """(row_loss, row_ce, grad_s, grad_t) in ``precision`` from the same input values, in plain torch."""
    s = s.detach().to(precision).requires_grad_(True)
    t = t.detach().to(precision).requires_grad_(True)
    rows = reference.divergence(
        s, t, divergence=DIVERGENCES[kind], temperature=temperature, beta=COEF, alpha=COEF, scale=1.0,
        reduction="none", mask=row_mask,
    )
    (GRAD_SCALE * rows.sum()).backward()
    ce, ce_grad = ce_op_checks.hard_ce_terms(s, labels, row_mask, precision)
    return rows.detach(), ce, s.grad + ce_grad, t.grad


def check_ce_parity(backend, s, t, row_mask, kind, temperature, *, teacher_grad):
    """The op with labels against the float64 computation; its divergence
    outputs against the op without labels."""
    dtype = s.dtype
    labels = strided_labels(*s.shape)
    loss, gs, gt, ce = forward(backend, s, t, row_mask, kind, temperature, teacher_grad=teacher_grad,
                               labels=labels)
    plain = forward(backend, s, t, row_mask, kind, temperature, teacher_grad=teacher_grad,
                    hard_grad_scale=0.0)
    want = expected(s, t, row_mask, kind, temperature, labels)
    # the reference from the same inputs in float32 (docs/spec.md §6's relative pass mark)
    same = expected(s, t, row_mask, kind, temperature, labels, precision=torch.float32)
    ce_op_checks.check_ce_output_layout(ce, gs, plain[3], s, torch.float32)
    # the CE changes neither the row loss nor the teacher gradient
    assert torch.equal(loss, plain[0])
    if teacher_grad:
        assert torch.equal(gt, plain[2])
    else:
        assert gt.shape == (0, 0)
    assert_matches(ce, want[1], dtype, f"{backend} row_ce", [same[1]])
    assert_matches(loss, want[0], dtype, f"{backend} row_loss", [same[0]])
    assert_matches(gs, want[2], dtype, f"{backend} student grad", [same[2]])
    if teacher_grad:
        assert_matches(gt, want[3], dtype, f"{backend} teacher grad", [same[3]])
    ce_op_checks.assert_excluded_rows_zero(ce, gs, row_mask)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("teacher_grad", (False, True), ids=("student-grad", "both-grads"))
@pytest.mark.parametrize("temperature", (1.0, 2.5))
@pytest.mark.parametrize("kind", range(6), ids=DIVERGENCES)
def test_ce_parity_every_kind(backend, kind, temperature, teacher_grad):
    # V = 300: not a power of two (one masked chunk); row 2 excluded
    s, t = logits((4, 300)), logits((4, 300))
    row_mask = torch.tensor([True, True, False, True], device=DEVICE)
    check_ce_parity(backend, s, t, row_mask, kind, temperature, teacher_grad=teacher_grad)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("temperature", (1.0, 2.5))
@pytest.mark.parametrize(("kind", "teacher_grad"), ((0, False), (3, True)), ids=("kl-fused", "skew_kl-both"))
def test_ce_parity_vocab_above_one_block(backend, kind, temperature, teacher_grad):
    # V = 5000 > the Triton kernel's 4096-wide chunk: the online sums over chunks
    s, t = logits((2, 5000)), logits((2, 5000))
    check_ce_parity(backend, s, t, None, kind, temperature, teacher_grad=teacher_grad)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("temperature", (1.0, 2.5))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_ce_parity_low_precision(backend, dtype, temperature):
    s, t = logits((3, 257), dtype), logits((3, 257), dtype)
    row_mask = torch.tensor([True, False, True], device=DEVICE)
    check_ce_parity(backend, s, t, row_mask, 1, temperature, teacher_grad=True)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("teacher_grad", (False, True), ids=("no-grads", "teacher-grad"))
@pytest.mark.parametrize("temperature", (1.0, 2.5))
def test_ce_without_student_gradient(backend, temperature, teacher_grad):
    s, t = logits((3, 130)), logits((3, 130))
    labels = strided_labels(3, 130)
    row_mask = torch.tensor([True, False, True], device=DEVICE)
    outputs = forward(backend, s, t, row_mask, 2, temperature, student_grad=False, teacher_grad=teacher_grad,
                      labels=labels)
    plain = forward(backend, s, t, row_mask, 2, temperature, student_grad=False, teacher_grad=teacher_grad,
                    hard_grad_scale=0.0)
    want = expected(s, t, row_mask, 2, temperature, labels)
    ce_op_checks.check_without_student_gradient(backend, outputs, plain, want[1])
    assert torch.equal(outputs[2], plain[2])  # the teacher gradient, untouched by the CE


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("temperature", (1.0, 2.5))
@pytest.mark.parametrize("kind", (0, 5), ids=("kl", "tvd"))
def test_out_of_range_label_of_a_kept_row(backend, kind, temperature, monkeypatch):
    """Labels −1 and V on kept rows: the op raises, or past the launcher's check
    its kernels give NaN on those rows only (check_out_of_range_label_rows)."""
    from fastkd.kernels import divergence as triton_module

    s, t = logits((5, OUT_OF_RANGE_VOCAB)), logits((5, OUT_OF_RANGE_VOCAB))

    def op(row_mask, labels, hard_grad_scale):
        return forward(backend, s, t, row_mask, kind, temperature, labels=labels,
                       hard_grad_scale=hard_grad_scale)

    def expected_on(good, row_mask, labels):
        return expected(s[good], t[good], row_mask, kind, temperature, labels)[1:3]

    labels = out_of_range_labels(OUT_OF_RANGE_VOCAB)
    ce_op_checks.check_out_of_range_label_rows(backend, labels, op, expected_on, triton_module, monkeypatch)


@pytest.mark.parametrize("backend", backend_params())
def test_without_labels_row_ce_is_empty(backend):
    s, t = logits((3, 20)), logits((3, 20))
    loss, gs, _, ce = forward(backend, s, t, None, 0, 2.0, hard_grad_scale=0.0)
    assert ce.shape == (0,) and ce.dtype == torch.float32
    want = expected(s, t, None, 0, 2.0, torch.zeros(3, dtype=torch.int64, device=DEVICE))
    assert_matches(loss, want[0], torch.float32, f"{backend} row_loss")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", range(6))
def test_bad_label_arguments_raise(backend, case):
    """ValueError naming the argument from the Triton launcher, before any
    kernel runs; the C++ ops' TORCH_CHECK raises RuntimeError naming it too."""
    s, t = logits((3, 20)), logits((3, 20))

    def call(**kwargs):
        return forward(backend, s, t, None, 0, 2.0, **kwargs)

    ce_op_checks.check_bad_label_arguments(backend, case, call)
