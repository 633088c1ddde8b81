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
import torch.nn.functional as F

from fastkd.reference import topk as reference_topk
from tests.helpers import (
    DEVICE,
    OUT_OF_RANGE_ROW_MASK,
    assert_matches,
    assert_nan_on_out_of_range_rows,
    bad_label_arguments,
    out_of_range_labels,
    run_past_the_label_check,
)
from tests.test_topk import kernel_params

# kind code → divergence name; reverse KL (1) is refused by the top-k op
NAMES = {0: "kl", 2: "jsd", 3: "skew_kl", 4: "skew_reverse_kl", 5: "tvd"}
COEF = 0.5  # β (JSD) / α (skew) for kinds 2, 3, 4
GRAD_SCALE = 0.7  # never only unit scales; distinct so that a swapped factor shows
HARD_GRAD_SCALE = 0.3


def coef_of(kind: int) -> float:
    return COEF if kind in (2, 3, 4) else 0.0


def logits(shape, dtype=torch.float32, spread=3.0):
    """Random logits in ``dtype`` (on DEVICE), drawn in float64 first."""
    return (torch.randn(shape, dtype=torch.float64) * spread).to(device=DEVICE, dtype=dtype)


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
    args = (s, index, values, row_mask, kind, 1.0 / temperature, coef_of(kind), GRAD_SCALE, student_grad,
            labels, hard_grad_scale)
    if backend == "triton":
        from fastkd.kernels import topk as triton_topk

        return triton_topk.topk_divergence_forward(*args)
    return torch.ops.fastkd.topk_divergence_forward(*args)


def expected(s, index, values, row_mask, kind, temperature, labels, precision=torch.float64):
    """(row_loss, row_ce, grad, ce_grad) in ``precision`` from the same input values, in plain torch;
    ce_grad = hard_grad_scale · (softmax(s) − onehot(y)) on kept rows."""
    s = s.detach().to(precision).requires_grad_(True)
    rows = reference_topk.topk_divergence(
        s, index, values.to(precision), divergence=NAMES[kind], temperature=temperature, beta=COEF,
        alpha=COEF, scale=1.0, reduction="none", mask=row_mask,
    )
    (GRAD_SCALE * rows.sum()).backward()
    keep = torch.ones(s.shape[0], dtype=torch.bool, device=s.device) if row_mask is None else row_mask
    y = torch.where(keep, labels, 0)  # excluded rows' labels (−100) are never used
    log_softmax = F.log_softmax(s.detach(), dim=-1)  # temperature 1
    ce = torch.where(keep, -log_softmax.gather(1, y[:, None]).squeeze(1), 0.0)
    onehot = F.one_hot(y, s.shape[1]).to(precision)
    ce_grad = HARD_GRAD_SCALE * (log_softmax.exp() - onehot) * keep[:, None]
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
    assert ce.shape == (s.shape[0],) and ce.dtype == loss_dtype
    assert grad.shape == s.shape and grad.dtype == dtype
    assert plain[2].shape == (0,) and plain[2].dtype == loss_dtype
    # the CE does not change the row loss
    assert torch.equal(loss, plain[0])
    assert_matches(ce, want[1], dtype, f"{backend} row_ce", [same[1]])
    assert_matches(loss, want[0], dtype, f"{backend} row_loss", [same[0]])
    assert_matches(grad, want[2], dtype, f"{backend} student grad", [same[2]])
    # the gradient is the op's without labels plus the CE's (float64)
    assert_matches(grad, plain[1].double() + want[3], dtype, f"{backend} grad − CE grad vs no labels")
    if row_mask is not None:
        excluded = ~row_mask
        assert torch.all(ce[excluded] == 0) and torch.all(grad[excluded] == 0)


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
    loss, grad, ce = forward(backend, s, index, values, row_mask, 3, temperature, student_grad=False,
                             labels=labels)
    plain = forward(backend, s, index, values, row_mask, 3, temperature, student_grad=False,
                    hard_grad_scale=0.0)
    want = expected(s, index, values, row_mask, 3, temperature, labels)
    assert grad.shape == (0, 0)
    assert torch.equal(loss, plain[0])
    assert_matches(ce, want[1], torch.float32, f"{backend} row_ce")
    assert ce[1] == 0


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("temperature", (1.0, 2.5))
@pytest.mark.parametrize("kind", (0, 5), ids=("kl", "tvd"))
def test_out_of_range_label_of_a_kept_row(backend, kind, temperature, monkeypatch):
    """Rows 0 and 2 are kept with labels −1 and V: the CPU op and the Triton
    launcher raise; past the launcher's check (and in the CUDA op, which does
    not synchronise to check) the kernels give NaN there (their own guard,
    nothing read out of bounds). Row 3 is excluded, so its out-of-range label
    is never used."""
    vocab = 50
    s = logits((5, vocab))
    index, values = sparse_teacher(5, vocab, 6)
    labels = out_of_range_labels(vocab, int(index[4, 0]))
    row_mask = torch.tensor(OUT_OF_RANGE_ROW_MASK, device=DEVICE)
    from fastkd.kernels import topk as triton_module

    def call():
        return forward(backend, s, index, values, row_mask, kind, temperature, labels=labels)

    outputs = run_past_the_label_check(backend, call, triton_module, monkeypatch, vocab)
    if outputs is None:
        return
    loss, grad, ce = outputs
    # the other rows are untouched by their neighbours' labels
    good = assert_nan_on_out_of_range_rows(ce, grad)
    want = expected(s[good], index[good], values[good], row_mask[good], kind, temperature,
                    labels[good].clamp(0, vocab - 1))
    assert_matches(ce[good], want[1], torch.float32, f"{backend} row_ce")
    assert_matches(grad[good], want[2], torch.float32, f"{backend} student grad")
    plain = forward(backend, s, index, values, row_mask, kind, temperature, hard_grad_scale=0.0)
    assert torch.equal(loss, plain[0])


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
    kwargs, name = bad_label_arguments(3)[case]
    error = ValueError if backend == "triton" else RuntimeError
    with pytest.raises(error, match=rf"^{name}\b"):
        forward(backend, s, index, values, None, 0, 2.0, **kwargs)
    if backend == "triton" and case == 0:  # not a tensor at all
        with pytest.raises(ValueError, match=r"^labels\b"):
            forward(backend, s, index, values, None, 0, 2.0, labels=[0, 1, 2])


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
