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
import torch.nn.functional as F

from fastkd.reference import mixture as reference_mt
from tests.helpers import (
    DEVICE,
    OUT_OF_RANGE_ROW_MASK,
    assert_matches,
    assert_nan_on_out_of_range_rows,
    backend_params,
    bad_label_arguments,
    out_of_range_labels,
    run_past_the_label_check,
)

DIVERGENCES = ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")  # kind codes 0..5
COEF = 0.5  # β (JSD) / α (skew) for kinds 2, 3, 4
GRAD_SCALE = 0.7  # never only unit scales; distinct so that a swapped factor shows
HARD_GRAD_SCALE = 0.3
IGNORE = -100  # the label of an excluded row: never read


def coef_of(kind: int) -> float:
    return COEF if kind in (2, 3, 4) else 0.0


def logits(shape, dtype=torch.float32, spread=3.0):
    """Random logits in ``dtype`` (on DEVICE), drawn in float64 first."""
    return (torch.randn(shape, dtype=torch.float64) * spread).to(device=DEVICE, dtype=dtype)


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
    args = (s, t, weights, row_mask, kind, 1.0 / temperature, coef_of(kind), GRAD_SCALE, student_grad,
            labels, hard_grad_scale)
    if backend == "triton":
        from fastkd.kernels import mixture

        return mixture.mixture_divergence_forward(*args)
    return torch.ops.fastkd.mixture_divergence_forward(*args)


def keep_of(row_mask, rows: int) -> torch.Tensor:
    return torch.ones(rows, dtype=torch.bool, device=DEVICE) if row_mask is None else row_mask


def ce_terms(s, labels, keep, precision=torch.float64):
    """(row CE, hard_grad_scale · (softmax − onehot)) of the student logits ``s`` in ``precision``,
    zero at the excluded rows (whose labels are not read)."""
    log_softmax = F.log_softmax(s.detach().to(precision), dim=-1)  # temperature 1
    safe = torch.where(keep, labels, 0)
    ce = torch.where(keep, -log_softmax.gather(1, safe[:, None]).squeeze(1), 0.0)
    onehot = F.one_hot(safe, s.shape[1]).to(precision)
    return ce, HARD_GRAD_SCALE * (log_softmax.exp() - onehot) * keep[:, None]


def expected(s, t, weights, row_mask, kind, temperature, labels, precision=torch.float64):
    """(row_loss, row_ce, grad) in ``precision`` from the same input values, in plain torch."""
    a = s.detach().to(precision).requires_grad_(True)
    rows = reference_mt.mixture_divergence(
        a, t.to(precision), weights, divergence=DIVERGENCES[kind], temperature=temperature, beta=COEF,
        alpha=COEF, scale=1.0, reduction="none", mask=row_mask,
    )
    (GRAD_SCALE * rows.sum()).backward()
    ce, ce_grad = ce_terms(s, labels, keep_of(row_mask, s.shape[0]), precision)
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
    assert ce.shape == (s.shape[0],) and ce.dtype == loss_dtype(dtype)
    assert grad.shape == s.shape and grad.dtype == dtype
    assert plain[2].shape == (0,) and plain[2].dtype == loss_dtype(dtype)
    # the CE does not change the row loss at all
    assert torch.equal(loss, plain[0])
    # the gradient is the label-free one plus the CE's, added before the one rounding
    _, ce_grad = ce_terms(s, labels, keep_of(row_mask, s.shape[0]))
    assert_matches(grad, plain[1].double() + ce_grad, dtype, f"{backend} grad − label-free grad")
    # the kernels widen every input and keep the CE in (at least) float32
    assert_matches(ce, want[1], loss_dtype(dtype), f"{backend} row_ce")
    assert_matches(loss, want[0], dtype, f"{backend} row_loss", [same[0]])
    assert_matches(grad, want[2], dtype, f"{backend} grad", [same[2]])
    if row_mask is not None:
        excluded = ~row_mask
        assert torch.all(ce[excluded] == 0) and torch.all(grad[excluded] == 0)


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
    loss, grad, ce = forward(backend, s, t, weights, row_mask, 1, temperature, student_grad=False,
                             labels=labels)
    plain = forward(backend, s, t, weights, row_mask, 1, temperature, student_grad=False, hard_grad_scale=0.0)
    want = expected(s, t, weights, row_mask, 1, temperature, labels)
    assert grad.shape == (0, 0)
    assert torch.equal(loss, plain[0])
    assert_matches(ce, want[1], torch.float32, f"{backend} row_ce")
    assert_matches(loss, want[0], torch.float32, f"{backend} row_loss")
    assert ce[1] == 0


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("temperature", (1.0, 2.5))
@pytest.mark.parametrize("kind", (0, 5), ids=("kl", "tvd"))
def test_out_of_range_label_of_a_kept_row(backend, kind, temperature, monkeypatch):
    """Rows 0 and 2 are kept with labels −1 and V: the CPU op and the Triton
    launcher raise; past the launcher's check (and in the CUDA op, which does
    not synchronise to check) the kernels give NaN there (their own guard,
    nothing read out of bounds). Row 3 is excluded, so its out-of-range label
    is never used."""
    vocab = 50
    s, t = logits((5, vocab)), logits((2, 5, vocab))
    weights = random_weights(2)
    labels = out_of_range_labels(vocab)
    row_mask = torch.tensor(OUT_OF_RANGE_ROW_MASK, device=DEVICE)
    from fastkd.kernels import mixture as triton_module

    def call():
        return forward(backend, s, t, weights, row_mask, kind, temperature, labels=labels)

    outputs = run_past_the_label_check(backend, call, triton_module, monkeypatch, vocab)
    if outputs is None:
        return
    loss, grad, ce = outputs
    # the other rows are untouched by their neighbours' labels
    good = assert_nan_on_out_of_range_rows(ce, grad)
    want = expected(s[good], t[:, good], weights, row_mask[good], kind, temperature, labels[good])
    assert_matches(ce[good], want[1], torch.float32, f"{backend} row_ce")
    assert_matches(grad[good], want[2], torch.float32, f"{backend} grad")
    plain = forward(backend, s, t, weights, row_mask, kind, temperature, hard_grad_scale=0.0)
    assert torch.equal(loss, plain[0])


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
    kwargs, name = bad_label_arguments(3)[case]
    error = ValueError if backend == "triton" else RuntimeError
    with pytest.raises(error, match=rf"^{name}\b"):
        forward(backend, s, t, weights, None, 0, 2.0, **kwargs)
    if backend == "triton" and case == 0:  # not a tensor at all
        with pytest.raises(ValueError, match=r"^labels\b"):
            forward(backend, s, t, weights, None, 0, 2.0, labels=[0, 1, 2])
