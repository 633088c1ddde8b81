"""Inputs and checks that the op-level tests of the fused hard-label CE share.

The ``fastkd::*divergence_forward`` ops of the divergence, mixture and top-k
families take the same ``labels`` / ``hard_grad_scale`` arguments and return
``row_ce[i] = log Σ_j exp(s_ij) − s_iy`` (temperature 1), adding
``hard_grad_scale · (softmax(s_i) − onehot(y_i))`` to the student gradient.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import (
    DEVICE,
    OUT_OF_RANGE_ROW_MASK,
    assert_matches,
    assert_nan_on_out_of_range_rows,
    bad_label_arguments,
    run_past_the_label_check,
)

COEF = 0.5  # β (JSD) / α (skew) for kinds 2, 3, 4
GRAD_SCALE = 0.7  # never only unit scales; distinct so that a swapped factor shows
HARD_GRAD_SCALE = 0.3
OUT_OF_RANGE_VOCAB = 50  # the class count of the out-of-range label checks


def coef_of(kind: int) -> float:
    """The op's ``coef`` argument for divergence kind code ``kind`` (0 where the kind has none)."""
    return COEF if kind in (2, 3, 4) else 0.0


def logits(shape, dtype=torch.float32, spread=3.0):
    """Random logits ``shape`` in ``dtype`` (on DEVICE), drawn in float64 first."""
    return (torch.randn(shape, dtype=torch.float64) * spread).to(device=DEVICE, dtype=dtype)


def run_op(backend: str, family: str, name: str, args: tuple):
    """The op ``name`` (e.g. ``"topk_divergence_forward"``) of ``backend`` on ``args``: for
    ``"triton"`` the launcher of that name in ``fastkd.kernels.<family>``, otherwise the
    registered ``torch.ops.fastkd`` op, which dispatches on the tensors' device."""
    if backend == "triton":
        return getattr(importlib.import_module(f"fastkd.kernels.{family}"), name)(*args)
    return getattr(torch.ops.fastkd, name)(*args)


def keep_of(row_mask, rows: int) -> torch.Tensor:
    """The (rows,) bool mask of kept rows: ``row_mask``, or all rows where it is None."""
    return torch.ones(rows, dtype=torch.bool, device=DEVICE) if row_mask is None else row_mask


def hard_ce_terms(s, labels, row_mask, precision=torch.float64):
    """(row CE (N,), HARD_GRAD_SCALE · (softmax − onehot) (N, V)) of the student logits ``s`` (N, V)
    in ``precision``, at temperature 1; zero at the rows that ``row_mask`` (N,) bool or None
    excludes, whose ``labels`` (N,) are not read."""
    keep = keep_of(row_mask, s.shape[0])
    log_softmax = F.log_softmax(s.detach().to(precision), dim=-1)
    safe = torch.where(keep, labels, 0)
    ce = torch.where(keep, -log_softmax.gather(1, safe[:, None]).squeeze(1), 0.0)
    onehot = F.one_hot(safe, s.shape[1]).to(precision)
    return ce, HARD_GRAD_SCALE * (log_softmax.exp() - onehot) * keep[:, None]


def check_ce_output_layout(ce, grad, plain_ce, s, ce_dtype) -> None:
    """Shapes and dtypes of the op's outputs for student logits ``s`` (N, V): ``ce`` (N,) and the
    label-free op's ``plain_ce`` (0,) in ``ce_dtype``; the student gradient ``grad`` like ``s``."""
    assert ce.shape == (s.shape[0],) and ce.dtype == ce_dtype
    assert grad.shape == s.shape and grad.dtype == s.dtype
    assert plain_ce.shape == (0,) and plain_ce.dtype == ce_dtype


def assert_excluded_rows_zero(ce, grad, row_mask) -> None:
    """The rows that ``row_mask`` (N,) excludes have zero CE (N,) and zero student gradient (N, V)."""
    if row_mask is not None:
        excluded = ~row_mask
        assert torch.all(ce[excluded] == 0) and torch.all(grad[excluded] == 0)


def check_bad_label_arguments(backend: str, case: int, call) -> None:
    """Case ``case`` of ``bad_label_arguments(3)`` passed to ``call(**kwargs)`` (the op of
    ``backend`` on 3 rows) raises before any kernel runs: ValueError naming the argument from the
    Triton launcher, RuntimeError ``"<name> must ..."`` from the C++ ops' TORCH_CHECK."""
    kwargs, name = bad_label_arguments(3)[case]
    if backend != "triton":
        with pytest.raises(RuntimeError, match=rf"^{name} must"):
            call(**kwargs)
        return
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        call(**kwargs)
    if case == 0:  # not a tensor at all
        with pytest.raises(ValueError, match=r"^labels\b"):
            call(labels=[0, 1, 2])


def check_out_of_range_label_rows(backend: str, labels, op, expected_on, triton_module, monkeypatch) -> None:
    """The op of ``backend`` on five rows of OUT_OF_RANGE_VOCAB classes with ``labels``
    (out_of_range_labels: −1 and OUT_OF_RANGE_VOCAB on kept rows 0 and 2) under
    OUT_OF_RANGE_ROW_MASK. The CPU op and the Triton launcher raise; past the
    launcher's check (and in the CUDA op) the kernels give NaN on those rows, and
    the other rows match ``expected_on`` and are untouched by their neighbours' labels.
    Row 3 is excluded, so its out-of-range label is never read.

    ``op(row_mask, labels, hard_grad_scale)`` returns the op's outputs: row_loss
    (N,) first, the student gradient (N, V) second, row_ce (N,) last.
    ``expected_on(good, row_mask, labels)`` returns the expected (row_ce,
    student gradient) of the rows ``good`` (N,) bool, given ``row_mask`` and the
    in-range ``labels`` of those rows."""
    vocab = OUT_OF_RANGE_VOCAB
    row_mask = torch.tensor(OUT_OF_RANGE_ROW_MASK, device=DEVICE)
    outputs = run_past_the_label_check(
        backend, lambda: op(row_mask, labels, HARD_GRAD_SCALE), triton_module, monkeypatch, vocab
    )
    if outputs is None:
        return
    loss, grad, ce = outputs[0], outputs[1], outputs[-1]
    good = assert_nan_on_out_of_range_rows(ce, grad)
    want_ce, want_grad = expected_on(good, row_mask[good], labels[good].clamp(0, vocab - 1))
    assert_matches(ce[good], want_ce, torch.float32, f"{backend} row_ce")
    assert_matches(grad[good], want_grad, torch.float32, f"{backend} student grad")
    assert torch.equal(loss, op(row_mask, None, 0.0)[0])


def check_without_student_gradient(backend: str, outputs, label_free, want_ce) -> None:
    """``outputs`` of the op run with labels and ``student_grad=False`` on 3 rows
    with row 1 excluded (row_loss (3,) first, the student gradient second, row_ce
    (3,) last) against ``label_free``, the same op's outputs without labels: an
    empty (0, 0) student gradient, the label-free row loss to the bit, and the
    expected row CE ``want_ce`` (3,), zero at the excluded row."""
    loss, grad, ce = outputs[0], outputs[1], outputs[-1]
    assert grad.shape == (0, 0)
    assert torch.equal(loss, label_free[0])
    assert_matches(ce, want_ce, torch.float32, f"{backend} row_ce")
    assert ce[1] == 0
