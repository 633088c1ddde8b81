"""Universal Logit Distillation (docs/spec.md §1.14) in Triton, the ``triton`` backend of
``fastkd.uld_loss``.

Same contract as the C++ op ``fastkd::uld_forward`` (csrc/fastkd.cpp,
csrc/cpu/uld.cpp). One program per row holds the whole row in registers:

  1. p = softmax(s / T_s) and q = softmax(t / T_t), zero past V_s / V_t: the
     zero padding of the definition comes for free. A side given as
     log-probabilities (STUDENT_LOGPROB / TEACHER_LOGPROB) is p = exp(s) as
     given, no softmax and no normalisation.
  2. Each probability is packed with its column into one int64 key (the
     float32 bits of a probability ≥ 0 order like the value) and both rows
     are sorted descending with ``tl.sort`` (bitonic): sorted values a, b and,
     from the low bits, the column each came from. Rank k of a and of b sit
     in the same register position, so ℓ = Σ_k |a_k − b_k| and the signs
     σ_k = sign(a_k − b_k) (sign(0) = 0) are elementwise.
  3. Ties: a run of equal values in a shares the mean of σ over the run
     (the reference's convention, independent of the order the sort gives
     ties). Run sums and lengths come from two segmented scans — forward for
     the run's part at or before k, over the flipped row for the part at or
     after k.
  4. dℓ/ds_j = p_j (g_j − Σ_k p_k g_k) / T_s (p_j g_j for log-probabilities:
     no softmax Jacobian), stored through the column of each sorted entry (a
     scatter; the sorted row is never written). The teacher's gradient is the
     same with −σ over the runs of b.

The loss and the gradients come from the same pass (already multiplied by
``grad_scale``), as the fused divergence kernels do. The row must fit one
block: ``max(V_s, V_t) ≤ MAX_VOCAB``; longer rows raise ``ValueError`` (use
the ``cpu`` op or the reference).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (
    DEVICE_TYPE,  # noqa: F401  (re-exported: callers ask a module where its kernels run)
    check_device,
    check_pair,
    check_positive,
    check_tensor,
    guard_device,
    stored_dtype,
)

__all__ = ["MAX_VOCAB", "uld_forward"]

# The widest row one program sorts in registers: two int64 keys and a few
# 32-bit vectors per entry, 8 entries per thread on 8 warps at 2048 (up to 255
# registers a thread). ptxas (sm_90) spills at 4096 on 8 warps (16 entries a
# thread), 16 warps (128 registers) and 32 warps (64).
MAX_VOCAB = 2048
ELEMENTS_PER_THREAD = 8


@triton.jit
def _row_probabilities(x_ptr, n, inv_temperature, cols, IS_LOGPROB: tl.constexpr):
    # over the n entries of one row, 0 past n: exp(x) of log-probabilities as
    # given, else softmax(x / T) (NaN for an all −inf row)
    x = tl.load(x_ptr + cols, mask=cols < n, other=float("-inf")).to(tl.float32)
    if IS_LOGPROB:
        p = tl.exp(x)
    else:
        m = tl.max(x, 0)
        e = tl.exp((x - m) * inv_temperature)
        e = tl.where(cols < n, e, 0.0)
        p = e / tl.sum(e, 0)
    return p


@triton.jit
def _sorted_with_columns(p, cols):
    # p sorted descending, and the column each sorted entry came from
    key = (p.to(tl.int32, bitcast=True).to(tl.int64) << 32) | cols.to(tl.int64)
    key = tl.sort(key, 0, descending=True)
    values = (key >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return values, (key & 0xFFFFFFFF).to(tl.int32)


# A run statistic packs (length, Σ sign) into one int32, length · 2^16 + Σ sign:
# sums of packed values are the packed sums, and |Σ sign| ≤ length < 2^15.
RUN_LENGTH_UNIT = tl.constexpr(65536)


@triton.jit
def _last_run(uniform_1, last_1, packed_1, uniform_2, last_2, packed_2):
    # (whether the piece is one run, its last value, the packed statistic of its
    # last run) of two adjacent pieces of a sorted row: the right piece's last
    # run extends the left one's only when the right piece is a single run of
    # the left piece's last value
    joined = (uniform_2 != 0) & (last_1 == last_2)
    uniform = (uniform_1 != 0) & joined
    return uniform.to(tl.int32), last_2, tl.where(joined, packed_1 + packed_2, packed_2)


@triton.jit
def _run_means(values, signs):
    # mean of `signs` (−1, 0, 1) over each run of equal `values` (sorted), at every position
    ones = tl.full(values.shape, 1, tl.int32)
    packed = signs.to(tl.int32) + RUN_LENGTH_UNIT
    _, _, head = tl.associative_scan((ones, values, packed), 0, _last_run)
    _, _, tail = tl.associative_scan((ones, tl.flip(values, 0), tl.flip(packed, 0)), 0, _last_run)
    run = head + tl.flip(tail, 0) - packed
    length = (run + RUN_LENGTH_UNIT // 2) // RUN_LENGTH_UNIT
    return (run - length * RUN_LENGTH_UNIT).to(tl.float32) / length.to(tl.float32)


@triton.jit
def _store_gradient(grad_ptr, values, columns, coefficients, n, scale, row_nan, kept, CENTRED: tl.constexpr):
    # grad[column] = scale · p (g − Σ p g) through the columns of the sorted
    # entries (a softmax's Jacobian), scale · p g without CENTRED (exp alone)
    if CENTRED:
        grad = scale * values * (coefficients - tl.sum(values * coefficients, 0))
    else:
        grad = scale * values * coefficients
    grad = tl.where(row_nan, float("nan"), grad)
    grad = tl.where(kept, grad, 0.0)
    tl.store(grad_ptr + columns, grad.to(grad_ptr.dtype.element_ty), mask=columns < n)


@triton.jit
def _uld_fwd_kernel(
    s_ptr, t_ptr,  # [N, V_s], [N, V_t] logits, unit stride along V
    mask_ptr,  # [N] int8 (1 = kept); unused without HAS_MASK
    loss_ptr,  # [N] float32
    gs_ptr, gt_ptr,  # [N, V_s], [N, V_t] contiguous gradients; unused without *_GRAD
    Vs, Vt, s_stride, t_stride,
    inv_ts, inv_tt, scale_s, scale_t,  # scale_*: grad_scale / T_*
    HAS_MASK: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
    STUDENT_LOGPROB: tl.constexpr, TEACHER_LOGPROB: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    kept = True
    if HAS_MASK:
        kept = tl.load(mask_ptr + row) != 0
    cols = tl.arange(0, BLOCK)
    p = _row_probabilities(s_ptr + row * s_stride, Vs, inv_ts, cols, STUDENT_LOGPROB)
    q = _row_probabilities(t_ptr + row * t_stride, Vt, inv_tt, cols, TEACHER_LOGPROB)
    # a NaN probability, or +inf (only a log-probability's exp can overflow)
    unusable = (p != p) | (p == float("inf")) | (q != q) | (q == float("inf"))
    row_nan = tl.sum(unusable.to(tl.int32), 0) > 0
    a, a_cols = _sorted_with_columns(p, cols)
    b, b_cols = _sorted_with_columns(q, cols)
    loss = tl.sum(tl.abs(a - b), 0)
    loss = tl.where(row_nan, float("nan"), loss)
    tl.store(loss_ptr + row, tl.where(kept, loss, 0.0))
    signs = tl.where(a > b, 1.0, tl.where(a < b, -1.0, 0.0))
    if STUDENT_GRAD:
        _store_gradient(gs_ptr + row * Vs, a, a_cols, _run_means(a, signs), Vs, scale_s, row_nan, kept,
                        not STUDENT_LOGPROB)
    if TEACHER_GRAD:
        _store_gradient(gt_ptr + row * Vt, b, b_cols, _run_means(b, -signs), Vt, scale_t, row_nan, kept,
                        not TEACHER_LOGPROB)


def launch_config(vocab: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of a row of ``vocab`` entries (at most MAX_VOCAB)."""
    block = triton.next_power_of_2(max(vocab, 1))
    return block, max(1, min(8, block // (32 * ELEMENTS_PER_THREAD)))


def _check_args(student, teacher, row_mask, inv_student_temperature, inv_teacher_temperature, grad_scale,
                student_grad, teacher_grad, student_is_logprob, teacher_is_logprob) -> None:
    """The checks of the C++ op, in its words, plus the kernel's row limit."""
    check_tensor("student", student, 2, "N, V_s")
    check_tensor("teacher", teacher, 2, "N, V_t")
    check_pair("student", student, "teacher", teacher)
    if teacher.shape[0] != student.shape[0]:
        raise ValueError(f"teacher has {teacher.shape[0]} rows but student has {student.shape[0]}: "
                         "the rows must be aligned")
    if student.shape[1] == 0 or teacher.shape[1] == 0:
        raise ValueError("student and teacher must have at least one column (vocabulary entry)")
    for name, x in (("student", student), ("teacher", teacher)):
        if x.shape[1] > 1 and x.stride(1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dim")
        if x.shape[1] > MAX_VOCAB:
            raise ValueError(f"{name} rows have {x.shape[1]} entries, more than the triton ULD kernel "
                             f"sorts in registers ({MAX_VOCAB}); use backend='cpu', 'cuda' or 'reference'")
    check_positive("inv_student_temperature", inv_student_temperature)
    check_positive("inv_teacher_temperature", inv_teacher_temperature)
    if not math.isfinite(grad_scale):
        raise ValueError(f"grad_scale must be finite, got {grad_scale}")
    flags = {"student_grad": student_grad, "teacher_grad": teacher_grad,
             "student_is_logprob": student_is_logprob, "teacher_is_logprob": teacher_is_logprob}
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {type(flag).__name__}")
    # a log-probability row is used as given: no temperature to divide by
    for side, inverse, is_logprob in (("student", inv_student_temperature, student_is_logprob),
                                      ("teacher", inv_teacher_temperature, teacher_is_logprob)):
        if is_logprob and inverse != 1.0:
            raise ValueError(f"inv_{side}_temperature must be 1 when {side}_is_logprob, got {inverse}")
    if row_mask is not None:
        if not isinstance(row_mask, torch.Tensor) or row_mask.dtype != torch.bool:
            raise ValueError("row_mask must be bool")
        if row_mask.shape != (student.shape[0],):
            raise ValueError("row_mask must be [N]")
        check_device("row_mask", row_mask)


@guard_device
def uld_forward(student, teacher, row_mask, inv_student_temperature: float, inv_teacher_temperature: float,
                grad_scale: float, student_grad: bool, teacher_grad: bool, student_is_logprob: bool = False,
                teacher_is_logprob: bool = False):
    """The contract of ``fastkd::uld_forward``.

    Args:
        student: ``(N, V_s)``, teacher: ``(N, V_t)`` logits; float32 / bfloat16
            / float16, one dtype, unit stride along V, ``V ≤ MAX_VOCAB``.
        row_mask: ``(N,)`` bool or None (False: loss 0, gradient 0).
        student_is_logprob, teacher_is_logprob: that side holds log-probabilities
            used as given (``exp(x)``, no softmax); its inverse temperature must be 1.

    Returns:
        ``(row_loss (N,) float32, student_grad (N, V_s) or (0, 0),
        teacher_grad (N, V_t) or (0, 0))``, the gradients ``grad_scale ·
        d(row loss)/d(logits)`` in the input dtype.
    """
    _check_args(student, teacher, row_mask, inv_student_temperature, inv_teacher_temperature, grad_scale,
                student_grad, teacher_grad, student_is_logprob, teacher_is_logprob)
    rows, vs = student.shape
    vt = teacher.shape[1]
    device = student.device
    row_loss = torch.empty(rows, dtype=torch.float32, device=device)
    out_dtype = stored_dtype(student.dtype)
    grad_s = torch.empty((rows, vs) if student_grad else (1, 1), dtype=out_dtype, device=device)
    grad_t = torch.empty((rows, vt) if teacher_grad else (1, 1), dtype=out_dtype, device=device)
    if rows > 0:
        mask_arg = (row_mask.to(torch.int8) if row_mask is not None
                    else torch.empty(0, dtype=torch.int8, device=device))
        block, warps = launch_config(max(vs, vt))
        _uld_fwd_kernel[(rows,)](
            student, teacher, mask_arg, row_loss, grad_s, grad_t, vs, vt,
            student.stride(0), teacher.stride(0),
            inv_student_temperature, inv_teacher_temperature, grad_scale * inv_student_temperature,
            grad_scale * inv_teacher_temperature,
            HAS_MASK=row_mask is not None, STUDENT_GRAD=student_grad, TEACHER_GRAD=teacher_grad,
            STUDENT_LOGPROB=student_is_logprob, TEACHER_LOGPROB=teacher_is_logprob, BLOCK=block,
            num_warps=warps,
        )
    grad_s = grad_s.to(student.dtype) if student_grad else student.new_empty((0, 0))
    grad_t = grad_t.to(teacher.dtype) if teacher_grad else teacher.new_empty((0, 0))
    return row_loss, grad_s, grad_t
