"""The student's hard-label cross-entropy fused into ``fastkd::mixture_divergence_forward``:
op-level parity per kernel backend.

With ``labels`` the multi-teacher op also returns ``row_ce[i] = log Σ_j
exp(s_ij) − s_iy`` (temperature 1) and adds ``hard_grad_scale · (softmax(s_i)
− onehot(y_i))`` to the student gradient; the divergence outputs are those of
the op without labels. Everything is compared with a float64 computation
written here in plain torch (the divergence part through
``fastkd.reference.mixture`` and autograd), on the ``cpu`` + ``triton``
backends here and ``triton`` + ``cuda`` under ``FASTKD_TEST_DEVICE=cuda``.
"""

from __future__ import annotations

import pytest
import torch

from fastkd.reference import mixture as reference_mt
from tests import ce_op_checks
from tests.ce_op_checks import COEF, GRAD_SCALE, HARD_GRAD_SCALE, OUT_OF_RANGE_VOCAB, coef_of, logits
from tests.helpers import DEVICE, assert_matches, backend_params, out_of_range_labels

DIVERGENCES = ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")  # kind codes 0..5
IGNORE = -100  # the label of an excluded row: never read


def random_weights(count: int) -> torch.Tensor:
    """(K,) float64 mixture weights on the CPU (as the Python layer passes them), summing to 1."""
    w = torch.rand(count, dtype=torch.float64) + 0.1
    return w / w.sum()


def strided_labels(rows: int, vocab: int, row_mask=None) -> torch.Tensor:
    """Random class ids as a non-contiguous (N,) int64 view (the op makes it
    contiguous); IGNORE at the excluded rows."""
    labels = torch.randint(0, vocab, (rows, 2), device=DEVICE)[:, 1]
    if row_mask is not None:
        labels = labels.masked_fill(~row_mask, IGNORE)
    return labels


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(backend, s, t, weights, row_mask, kind, temperature, *, student_grad=True, labels=None,
            hard_grad_scale=HARD_GRAD_SCALE):
    """The op of ``backend``: (row_loss, grad, row_ce)."""
    return ce_op_checks.run_op(backend, "mixture", "mixture_divergence_forward", (
        s, t, weights, row_mask, kind, 1.0 / temperature, coef_of(kind), GRAD_SCALE, student_grad, labels,
        hard_grad_scale))


def expected(s, t, weights, row_mask, kind, temperature, labels, precision=torch.float64):
    """(row_loss, row_ce, grad) in ``precision`` from the same input values, in plain torch."""
    a = s.detach().to(precision).requires_grad_(True)
    rows = reference_mt.mixture_divergence(
        a, t.to(precision), weights, divergence=DIVERGENCES[kind], temperature=temperature, beta=COEF,
        alpha=COEF, scale=1.0, reduction="none", mask=row_mask,
    )
    (GRAD_SCALE * rows.sum()).backward()
    ce, ce_grad = ce_op_checks.hard_ce_terms(s, labels, row_mask, precision)
    return rows.detach(), ce, a.grad + ce_grad


def check_ce_parity(backend, s, t, weights, row_mask, kind, temperature):
    """The op with labels against the float64 computation and against the op without labels."""
    dtype = s.dtype
    labels = strided_labels(*s.shape, row_mask)
    loss, grad, ce = forward(backend, s, t, weights, row_mask, kind, temperature, labels=labels)
    plain = forward(backend, s, t, weights, row_mask, kind, temperature, hard_grad_scale=0.0)
    want = expected(s, t, weights, row_mask, kind, temperature, labels)
    # the reference from the same inputs in float32 (docs/spec.md §6's relative pass mark)
    same = expected(s, t, weights, row_mask, kind, temperature, labels,
                    precision=torch.float64 if dtype == torch.float64 else torch.float32)
    ce_op_checks.check_ce_output_layout(ce, grad, plain[2], s, loss_dtype(dtype))
    # the CE does not change the row loss at all
    assert torch.equal(loss, plain[0])
    # the gradient is the label-free one plus the CE's, added before the one rounding
    _, ce_grad = ce_op_checks.hard_ce_terms(s, labels, row_mask)
    assert_matches(grad, plain[1].double() + ce_grad, dtype, f"{backend} grad − label-free grad")
    # the kernels widen every input and keep the CE in (at least) float32
    assert_matches(ce, want[1], loss_dtype(dtype), f"{backend} row_ce")
    assert_matches(loss, want[0], dtype, f"{backend} row_loss", [same[0]])
    assert_matches(grad, want[2], dtype, f"{backend} grad", [same[2]])
    ce_op_checks.assert_excluded_rows_zero(ce, grad, row_mask)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("temperature", (1.0, 2.5))
@pytest.mark.parametrize("kind", range(6), ids=DIVERGENCES)
def test_ce_parity_every_kind(backend, kind, temperature):
    # K = 3 teachers, V = 300: not a power of two (masked lanes); row 2
    # excluded (label −100)
    s, t = logits((4, 300)), logits((3, 4, 300))
    row_mask = torch.tensor([True, True, False, True], device=DEVICE)
    check_ce_parity(backend, s, t, random_weights(3), row_mask, kind, temperature)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("temperature", (1.0, 2.5))
@pytest.mark.parametrize("kind", (0, 1), ids=("kl", "reverse_kl"))
def test_ce_parity_one_teacher(backend, kind, temperature):
    s, t = logits((3, 129)), logits((1, 3, 129))
    check_ce_parity(backend, s, t, torch.ones(1, dtype=torch.float64), None, kind, temperature)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("temperature", (1.0, 2.5))
@pytest.mark.parametrize("kind", (0, 3), ids=("kl-fused", "skew_kl-grad-pass"))
def test_ce_parity_vocab_above_one_block(backend, kind, temperature):
    # V = 5000 > the Triton kernel's chunk (2048 with K = 3 in the
    # interpreter, 512 on a GPU): the online sums over chunks
    s, t = logits((2, 5000)), logits((3, 2, 5000))
    check_ce_parity(backend, s, t, random_weights(3), None, kind, temperature)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("temperature", (1.0, 2.5))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float64), ids=str)
def test_ce_parity_other_dtypes(backend, dtype, temperature):
    s, t = logits((3, 257), dtype), logits((2, 3, 257), dtype)
    row_mask = torch.tensor([True, False, True], device=DEVICE)
    check_ce_parity(backend, s, t, random_weights(2), row_mask, 2, temperature)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("temperature", (1.0, 2.5))
def test_ce_without_student_gradient(backend, temperature):
    s, t = logits((3, 130)), logits((2, 3, 130))
    weights = random_weights(2)
    row_mask = torch.tensor([True, False, True], device=DEVICE)
    labels = strided_labels(3, 130, row_mask)
    outputs = forward(backend, s, t, weights, row_mask, 1, temperature, student_grad=False, labels=labels)
    plain = forward(backend, s, t, weights, row_mask, 1, temperature, student_grad=False, hard_grad_scale=0.0)
    want = expected(s, t, weights, row_mask, 1, temperature, labels)
    ce_op_checks.check_without_student_gradient(backend, outputs, plain, want[1])
    assert_matches(outputs[0], want[0], torch.float32, f"{backend} row_loss")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("temperature", (1.0, 2.5))
@pytest.mark.parametrize("kind", (0, 5), ids=("kl", "tvd"))
def test_out_of_range_label_of_a_kept_row(backend, kind, temperature, monkeypatch):
    """Labels −1 and V on kept rows of a two-teacher mixture: the op raises, or
    past the check the kernels' guard gives NaN there (check_out_of_range_label_rows)."""
    s, t = logits((5, OUT_OF_RANGE_VOCAB)), logits((2, 5, OUT_OF_RANGE_VOCAB))
    weights = random_weights(2)
    from fastkd.kernels import mixture as triton_module

    def op(row_mask, labels, hard_grad_scale):
        return forward(backend, s, t, weights, row_mask, kind, temperature, labels=labels,
                       hard_grad_scale=hard_grad_scale)

    def expected_on(good, row_mask, labels):
        return expected(s[good], t[:, good], weights, row_mask, kind, temperature, labels)[1:3]

    labels = out_of_range_labels(OUT_OF_RANGE_VOCAB)
    ce_op_checks.check_out_of_range_label_rows(backend, labels, op, expected_on, triton_module, monkeypatch)


@pytest.mark.parametrize("backend", backend_params())
def test_without_labels_row_ce_is_empty(backend):
    s, t = logits((3, 20)), logits((2, 3, 20))
    weights = random_weights(2)
    loss, grad, ce = forward(backend, s, t, weights, None, 0, 2.0, hard_grad_scale=0.0)
    assert ce.shape == (0,) and ce.dtype == torch.float32
    want = expected(s, t, weights, None, 0, 2.0, torch.zeros(3, dtype=torch.int64, device=DEVICE))
    assert_matches(loss, want[0], torch.float32, f"{backend} row_loss")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", range(6))
def test_bad_label_arguments_raise(backend, case):
    """ValueError naming the argument from the Triton launcher, before any
    kernel runs; RuntimeError naming it from the C++ ops' TORCH_CHECK."""
    s, t = logits((3, 20)), logits((2, 3, 20))
    weights = random_weights(2)

    def call(**kwargs):
        return forward(backend, s, t, weights, None, 0, 2.0, **kwargs)

    ce_op_checks.check_bad_label_arguments(backend, case, call)
