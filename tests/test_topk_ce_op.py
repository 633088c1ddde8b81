"""The hard-label CE fused into ``fastkd::topk_divergence_forward``: op-level parity per kernel backend.

With ``labels`` the top-k (sparse teacher) op also returns ``row_ce[i] =
log Σ_v exp(s_iv) − s_iy`` (temperature 1) and adds ``hard_grad_scale ·
(softmax(s_i) − onehot(y_i))`` to the student gradient; the divergence
outputs are those of the op without labels. Everything is compared with a
float64 computation written here in plain torch (the divergence part through
``fastkd.reference.topk`` and autograd), on the ``cpu`` + ``triton`` backends
here and ``triton`` + ``cuda`` under ``FASTKD_TEST_DEVICE=cuda``. The label of
row 0 is always one of the teacher's ids (the kernels treat the support and
the rest of the row in different passes); the others are random.
"""

from __future__ import annotations

import pytest
import torch

from fastkd.reference import topk as reference_topk
from tests import ce_op_checks
from tests.ce_op_checks import COEF, GRAD_SCALE, HARD_GRAD_SCALE, OUT_OF_RANGE_VOCAB, coef_of, logits
from tests.helpers import DEVICE, assert_matches, out_of_range_labels
from tests.test_topk import kernel_params

# kind code → divergence name; reverse KL (1) is refused by the top-k op
NAMES = {0: "kl", 2: "jsd", 3: "skew_kl", 4: "skew_reverse_kl", 5: "tvd"}


def sparse_teacher(rows: int, vocab: int, k: int):
    """Distinct random ids (rows, k) int64 and float32 teacher logits at them."""
    index = torch.stack([torch.randperm(vocab)[:k] for _ in range(rows)])
    values = torch.randn((rows, k), dtype=torch.float64) * 3.0
    return index.to(DEVICE), values.to(device=DEVICE, dtype=torch.float32)


def labels_for(index: torch.Tensor, vocab: int, row_mask=None) -> torch.Tensor:
    """Random class ids as a non-contiguous (N,) int64 view (the op makes it
    contiguous); row 0's is a teacher id; excluded rows get −100."""
    rows = index.shape[0]
    labels = torch.randint(0, vocab, (rows, 2), device=DEVICE)
    labels[0, 1] = index[0, index.shape[1] // 2]
    labels = labels[:, 1]
    if row_mask is not None:
        labels = torch.where(row_mask, labels, -100)
    return labels


def forward(backend, s, index, values, row_mask, kind, temperature, *, student_grad=True, labels=None,
            hard_grad_scale=HARD_GRAD_SCALE):
    """The op of ``backend``: (row_loss, grad, row_ce)."""
    return ce_op_checks.run_op(backend, "topk", "topk_divergence_forward", (
        s, index, values, row_mask, kind, 1.0 / temperature, coef_of(kind), GRAD_SCALE, student_grad,
        labels, hard_grad_scale))


def expected(s, index, values, row_mask, kind, temperature, labels, precision=torch.float64):
    """(row_loss, row_ce, grad, ce_grad) in ``precision`` from the same input values, in plain torch;
    ce_grad = hard_grad_scale · (softmax(s) − onehot(y)) on kept rows."""
    s = s.detach().to(precision).requires_grad_(True)
    rows = reference_topk.topk_divergence(
        s, index, values.to(precision), divergence=NAMES[kind], temperature=temperature, beta=COEF,
        alpha=COEF, scale=1.0, reduction="none", mask=row_mask,
    )
    (GRAD_SCALE * rows.sum()).backward()
    ce, ce_grad = ce_op_checks.hard_ce_terms(s, labels, row_mask, precision)
    return rows.detach(), ce, s.grad + ce_grad, ce_grad


def check_ce_parity(backend, s, index, values, row_mask, kind, temperature):
    """The op with labels against the float64 computation; its divergence
    outputs against the op without labels."""
    dtype = s.dtype
    labels = labels_for(index, s.shape[1], row_mask)
    loss, grad, ce = forward(backend, s, index, values, row_mask, kind, temperature, labels=labels)
    plain = forward(backend, s, index, values, row_mask, kind, temperature, hard_grad_scale=0.0)
    want = expected(s, index, values, row_mask, kind, temperature, labels)
    # the reference from the same inputs in float32 (docs/spec.md §6's relative pass mark)
    same = expected(s, index, values, row_mask, kind, temperature, labels, precision=torch.float32)
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ce_op_checks.check_ce_output_layout(ce, grad, plain[2], s, loss_dtype)
    # the CE does not change the row loss
    assert torch.equal(loss, plain[0])
    assert_matches(ce, want[1], dtype, f"{backend} row_ce", [same[1]])
    assert_matches(loss, want[0], dtype, f"{backend} row_loss", [same[0]])
    assert_matches(grad, want[2], dtype, f"{backend} student grad", [same[2]])
    # the gradient is the op's without labels plus the CE's (float64)
    assert_matches(grad, plain[1].double() + want[3], dtype, f"{backend} grad − CE grad vs no labels")
    ce_op_checks.assert_excluded_rows_zero(ce, grad, row_mask)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("temperature", (1.0, 2.5))
@pytest.mark.parametrize("kind", tuple(NAMES), ids=tuple(NAMES.values()))
def test_ce_parity_every_kind(backend, kind, temperature):
    # V = 300: not a power of two (one masked chunk); row 2 excluded (label −100)
    s = logits((4, 300))
    index, values = sparse_teacher(4, 300, 7)
    row_mask = torch.tensor([True, True, False, True], device=DEVICE)
    check_ce_parity(backend, s, index, values, row_mask, kind, temperature)


# (rows, V, k, kind): V = 5000 is past the Triton kernel's 4096-wide chunk (the
# online sums over chunks); k = V leaves nothing off the support (the
# off-support sums are empty)
WIDTH_CASES = [
    pytest.param(2, 5000, 64, 0, id="vocab_above_one_block-kl"),
    pytest.param(2, 5000, 64, 4, id="vocab_above_one_block-skew_reverse_kl"),
    pytest.param(3, 9, 9, 0, id="support_is_the_whole_row-kl"),
    pytest.param(3, 9, 9, 5, id="support_is_the_whole_row-tvd"),
]


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("temperature", (1.0, 2.5))
@pytest.mark.parametrize(("rows", "vocab", "k", "kind"), WIDTH_CASES)
def test_ce_parity_widths(backend, rows, vocab, k, kind, temperature):
    s = logits((rows, vocab))
    index, values = sparse_teacher(rows, vocab, k)
    check_ce_parity(backend, s, index, values, None, kind, temperature)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("temperature", (1.0, 2.5))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_ce_parity_low_precision(backend, dtype, temperature):
    s = logits((3, 257), dtype)
    index, values = sparse_teacher(3, 257, 5)
    row_mask = torch.tensor([True, False, True], device=DEVICE)
    check_ce_parity(backend, s, index, values, row_mask, 2, temperature)


def float64_params():
    """kernel_params() of the backends that take float64 logits (the CPU op only)."""
    params = [p for p in kernel_params() if p.values[0] == "cpu"]
    return params or [pytest.param("none", marks=pytest.mark.skip(reason="no float64 top-k kernel here"))]


@pytest.mark.parametrize("backend", float64_params())
@pytest.mark.parametrize("temperature", (1.0, 2.5))
@pytest.mark.parametrize("kind", (0, 2), ids=("kl", "jsd"))
def test_ce_parity_float64(backend, kind, temperature):
    # float64 logits and teacher values: row_ce and the gradient in double
    s = logits((4, 300), torch.float64)
    index, values = sparse_teacher(4, 300, 7)
    row_mask = torch.tensor([True, True, False, True], device=DEVICE)
    check_ce_parity(backend, s, index, values.double(), row_mask, kind, temperature)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("temperature", (1.0, 2.5))
def test_ce_without_student_gradient(backend, temperature):
    s = logits((3, 130))
    index, values = sparse_teacher(3, 130, 4)
    row_mask = torch.tensor([True, False, True], device=DEVICE)
    labels = labels_for(index, 130, row_mask)
    outputs = forward(backend, s, index, values, row_mask, 3, temperature, student_grad=False, labels=labels)
    plain = forward(backend, s, index, values, row_mask, 3, temperature, student_grad=False,
                    hard_grad_scale=0.0)
    want = expected(s, index, values, row_mask, 3, temperature, labels)
    ce_op_checks.check_without_student_gradient(backend, outputs, plain, want[1])


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("temperature", (1.0, 2.5))
@pytest.mark.parametrize("kind", (0, 5), ids=("kl", "tvd"))
def test_out_of_range_label_of_a_kept_row(backend, kind, temperature, monkeypatch):
    """Out-of-range labels on kept rows; the excluded row's label is a teacher id (never read)."""
    s = logits((5, OUT_OF_RANGE_VOCAB))
    index, values = sparse_teacher(5, OUT_OF_RANGE_VOCAB, 6)
    from fastkd.kernels import topk as triton_module

    def op(row_mask, labels, hard_grad_scale):
        return forward(backend, s, index, values, row_mask, kind, temperature, labels=labels,
                       hard_grad_scale=hard_grad_scale)

    def expected_on(good, row_mask, labels):
        return expected(s[good], index[good], values[good], row_mask, kind, temperature, labels)[1:3]

    labels = out_of_range_labels(OUT_OF_RANGE_VOCAB, int(index[4, 0]))
    ce_op_checks.check_out_of_range_label_rows(backend, labels, op, expected_on, triton_module, monkeypatch)


@pytest.mark.parametrize("backend", kernel_params())
def test_without_labels_row_ce_is_empty(backend):
    s = logits((3, 20))
    index, values = sparse_teacher(3, 20, 4)
    loss, grad, ce = forward(backend, s, index, values, None, 0, 2.0, hard_grad_scale=0.0)
    assert ce.shape == (0,) and ce.dtype == torch.float32
    want = expected(s, index, values, None, 0, 2.0, torch.zeros(3, dtype=torch.int64, device=DEVICE))
    assert_matches(loss, want[0], torch.float32, f"{backend} row_loss")
    assert_matches(grad, want[2] - want[3], torch.float32, f"{backend} student grad")


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("case", range(6))
def test_bad_label_arguments_raise(backend, case):
    """ValueError naming the argument from the Triton launcher, before any
    kernel runs; the C++ ops' TORCH_CHECK raises RuntimeError naming it."""
    s = logits((3, 20))
    index, values = sparse_teacher(3, 20, 4)

    def call(**kwargs):
        return forward(backend, s, index, values, None, 0, 2.0, **kwargs)

    ce_op_checks.check_bad_label_arguments(backend, case, call)


@pytest.mark.parametrize("backend", [p for p in kernel_params() if p.values[0] not in ("triton", "none")]
                         or [pytest.param("none", marks=pytest.mark.skip(reason="no fastkd:: top-k op"))])
@pytest.mark.parametrize("student_grad", (True, False))
def test_opcheck_with_labels(backend, student_grad):
    """The registered op (and its fake kernel) with the labels arguments."""
    s = logits((5, 33))
    index, values = sparse_teacher(5, 33, 4)
    mask = torch.tensor([True, False, True, True, True], device=DEVICE)
    labels = labels_for(index, 33, mask).contiguous()
    torch.library.opcheck(
        torch.ops.fastkd.topk_divergence_forward,
        (s, index, values, mask, 2, 0.5, 0.3, 0.25, student_grad, labels, HARD_GRAD_SCALE),
    )
