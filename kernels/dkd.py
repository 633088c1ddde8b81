"""Decoupled knowledge distillation (DKD, docs/spec.md §1) in Triton, the ``triton``
backend of ``fastkd.dkd_loss``.

Same contract as the C++ op ``fastkd::dkd_forward`` (csrc/fastkd.cpp,
csrc/cpu/dkd.cpp): row losses ``α·TCKD + β·NCKD`` and, if asked for, the
student gradient times ``grad_scale``, in one call. One program per row
streams the row in BLOCK-wide chunks, in two passes:

  pass 1  online max and Σ exp((x − max)/T) of the NON-target logits of s
          and t; the target logits s_y, t_y are loaded on their own      read s, t
  pass 2  NCKD terms and the gradient (every constant is known after
          pass 1)                                     read s, t; write gradient

Per row, with a = s/T, b = t/T and target y, everything comes from
r = a_y − log Σ_{j≠y} e^{a_j} (student r_s, teacher r_t) and the non-target
log-softmax log q̂_j = a_j − log Σ_{j≠y} e^{a_j}:

  log q_y = −softplus(−r),  log(1 − q_y) = −softplus(r)     (log space: exact
                                                            when q_y ≈ 1 or ≈ 0)
  TCKD = KL([p_y, 1 − p_y] ‖ [q_y, 1 − q_y])
  NCKD = KL(p' ‖ q'), p', q' the softmaxes of z/T − 1000·onehot(y)
         (mdistiller's offset): log q'_j = log q̂_j − δ (j ≠ y),
         log q'_y = r − 1000 − δ, δ = softplus(r − 1000)
  dTCKD/da_y = q_y − p_y,  dTCKD/da_j = q̂_j ((1 − q_y) − (1 − p_y))  (j ≠ y)
  dNCKD/da_j = q'_j − p'_j

Memory traffic floor, b bytes per logit: read 2·N·C·b, write N·C·b for the
gradient and 4·N bytes of row loss; pass 2 re-reads the row, from L2 for
classification-sized rows (2·C·b bytes per resident row).

Labels: the kernel clamps the index it loads with and gives a row with an
out-of-range label a NaN loss and gradient, so no label ever indexes memory
outside its row. The launcher also refuses labels outside [0, C) (ValueError)
where ``fastkd._validate.values_checked_on_host`` says so: for CPU tensors, or
on a GPU with FASTKD_CHECK_DEVICE_VALUES=1 (elsewhere the check would be a
device → host synchronisation on every call).

Everything is accumulated in float32; bf16 / fp16 logits are widened as they
are loaded and the gradient is rounded to the input dtype as it is stored.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastkd import _validate

from ._common import (
    DEVICE_TYPE,  # noqa: F401  (re-exported: callers ask a module where its kernels run)
    check_finite,
    check_pair,
    check_positive,
    check_tensor,
    guard_device,
    log1p,
    online_max_sum_exp,
    row_launch_config,
    stored_dtype,
)

__all__ = ["dkd_forward"]

# mdistiller's offset on the target logit in the non-target softmax.
TARGET_OFFSET = tl.constexpr(1000.0)
# (BLOCK, num_warps) for rows of C logits. DKD rows are classification heads
# (C ≤ a few thousand), so one chunk usually holds the whole row and pass 2
# re-reads it from L1 / L2.
launch_config = row_launch_config


@triton.jit
def _softplus(x):
    # log(1 + e^x) = max(x, 0) + log1p(e^−|x|): no overflow; NaN stays NaN
    return tl.where(x > 0.0, x, 0.0) + log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _xlogratio(log_p, log_q):
    # p (log p − log q) with 0 · anything = 0 (a NaN p keeps the NaN)
    p = tl.exp(log_p)
    return tl.where(p == 0.0, 0.0, p * (log_p - log_q))


@triton.jit
def _dkd_fwd_kernel(
    s_ptr,  # [N, C] student logits, row stride stride_s, unit stride along C
    t_ptr,  # [N, C] teacher logits, row stride stride_t, unit stride along C
    y_ptr,  # [N] int64 target classes
    loss_ptr,  # [N] float32 row losses α·TCKD + β·NCKD
    g_ptr,  # [N, C] contiguous grad_scale · dℓ_i/ds (None unless STUDENT_GRAD)
    stride_s,
    stride_t,
    C,
    alpha,
    beta,
    inv_temperature,  # 1 / T
    grad_factor,  # grad_scale / T
    STUDENT_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t

    # An out-of-range label (refused by the launcher where it checks values)
    # loads at index 0 and makes the row NaN: nothing outside the row is ever read.
    y_raw = tl.load(y_ptr + row)
    valid = (y_raw >= 0) & (y_raw < C)
    y = tl.where(valid, y_raw, 0)
    s_y = tl.load(s_row + y).to(tl.float32)
    t_y = tl.load(t_row + y).to(tl.float32)

    # pass 1: max and Σ exp((x − max)/T) over the non-target classes
    m_s = float("-inf")
    d_s = 0.0
    m_t = float("-inf")
    d_t = 0.0
    for start in range(0, C, BLOCK):
        offs = start + cols
        other = (offs < C) & (offs != y)
        s = tl.load(s_row + offs, mask=other, other=float("-inf")).to(tl.float32)
        t = tl.load(t_row + offs, mask=other, other=float("-inf")).to(tl.float32)
        m_s, d_s = online_max_sum_exp(m_s, d_s, s, inv_temperature, 0)
        m_t, d_t = online_max_sum_exp(m_t, d_t, t, inv_temperature, 0)
    log_d_s = tl.log(d_s)
    log_d_t = tl.log(d_t)
    # r = a_y − log Σ_{j≠y} e^{a_j}, and r − 1000 with the offset taken off
    # before log Σ is: exact where r ≈ 1000, the only place it matters
    u_s = (s_y - m_s) * inv_temperature
    u_t = (t_y - m_t) * inv_temperature
    r_s = u_s - log_d_s
    r_t = u_t - log_d_t
    r_s_off = (u_s - TARGET_OFFSET) - log_d_s
    r_t_off = (u_t - TARGET_OFFSET) - log_d_t

    # TCKD on the binary split, in log space
    log_qy = -_softplus(-r_s)
    log_qo = -_softplus(r_s)
    log_py = -_softplus(-r_t)
    log_po = -_softplus(r_t)
    tckd = _xlogratio(log_py, log_qy) + _xlogratio(log_po, log_qo)
    q_y = tl.exp(log_qy)
    p_y = tl.exp(log_py)
    # (1 − q_y) − (1 − p_y), from whichever pair is accurate: the small
    # complements when the target dominates, else the target probabilities
    diff_o = tl.where(q_y + p_y > 1.0, tl.exp(log_qo) - tl.exp(log_po), p_y - q_y)

    # NCKD: the softmaxes of z/T − 1000·onehot(y) differ from the non-target
    # ones by δ = log(1 + e^{r − 1000}) (the target's leftover mass)
    delta_s = _softplus(r_s_off)
    delta_t = _softplus(r_t_off)
    log_qn_y = r_s_off - delta_s
    log_pn_y = r_t_off - delta_t
    nckd_y = _xlogratio(log_pn_y, log_qn_y)
    # gradient at the target: α (q_y − p_y) + β (q'_y − p'_y)
    g_y = alpha * -diff_o + beta * (tl.exp(log_qn_y) - tl.exp(log_pn_y))

    # pass 2: NCKD over the non-target classes, and the gradient
    nckd_acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, C, BLOCK):
        offs = start + cols
        in_row = offs < C
        other = in_row & (offs != y)
        s = tl.load(s_row + offs, mask=other, other=float("-inf")).to(tl.float32)
        t = tl.load(t_row + offs, mask=other, other=float("-inf")).to(tl.float32)
        # log q̂_j = (s_j − max)/T − log Σ: the rounding scales with the
        # distance from the max, small where the probability is large
        log_qh = (s - m_s) * inv_temperature - log_d_s
        log_ph = (t - m_t) * inv_temperature - log_d_t
        log_qn = log_qh - delta_s
        log_pn = log_ph - delta_t
        nckd_acc += tl.where(other, _xlogratio(log_pn, log_qn), 0.0)
        if STUDENT_GRAD:
            q_h = tl.exp(log_qh)
            g = alpha * q_h * diff_o + beta * (tl.exp(log_qn) - tl.exp(log_pn))
            g = tl.where(offs == y, g_y, g)
            g = tl.where(valid, g, float("nan"))
            tl.store(g_ptr + row * C + offs, (grad_factor * g).to(g_ptr.dtype.element_ty), mask=in_row)
    loss = alpha * tckd + beta * (tl.sum(nckd_acc, 0) + nckd_y)
    tl.store(loss_ptr + row, tl.where(valid, loss, float("nan")))






def _check_args(student, teacher, labels, alpha, beta, inv_temperature, grad_scale) -> None:
    """The checks of csrc/cpu/dkd.cpp as ValueError, before any launch."""
    for name, x in (("student", student), ("teacher", teacher)):
        check_tensor(name, x, 2, "N, C")
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in shape")
    check_pair("student", student, "teacher", teacher)
    rows, classes = student.shape
    if classes < 2:
        raise ValueError(f"student must have at least 2 classes for DKD, got {classes}")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be an int64 tensor, got {getattr(labels, 'dtype', type(labels))}")
    if labels.shape != (rows,):
        raise ValueError(f"labels must have shape ({rows},), got {tuple(labels.shape)}")
    if labels.device != student.device:
        raise ValueError(f"labels ({labels.device}) must be on student's device ({student.device})")
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
    check_positive("inv_temperature", inv_temperature)
    check_finite("grad_scale", grad_scale)
    # on a GPU only when asked for (a device → host sync); the kernel guards anyway
    if rows and _validate.values_checked_on_host(labels) and bool(((labels < 0) | (labels >= classes)).any()):
        raise ValueError(
            f"labels must lie in [0, {classes}), got values in [{int(labels.min())}, {int(labels.max())}]"
        )


def _row_major(x: torch.Tensor) -> torch.Tensor:
    """The kernel takes any row stride, but unit stride along C and rows that do not overlap."""
    if (x.shape[1] <= 1 or x.stride(1) == 1) and (x.shape[0] <= 1 or x.stride(0) >= x.shape[1]):
        return x
    return x.contiguous()


@guard_device
def dkd_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    beta: float,
    inv_temperature: float,
    grad_scale: float,
    student_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row DKD losses and the scaled student gradient; the contract of ``fastkd::dkd_forward``.

    Args:
        student: ``(N, C)`` logits, ``C >= 2``, float32 / bfloat16 / float16.
        teacher: ``(N, C)``, same dtype and device.
        labels: ``(N,)`` int64 target classes in ``[0, C)``.
        alpha, beta: TCKD and NCKD weights (finite, ``>= 0``).
        inv_temperature: ``1 / T``.
        grad_scale: factor applied to the gradient (not to the loss).
        student_grad: whether to compute the gradient.

    Returns:
        ``row_loss`` ``(N,)`` float32, ``α·TCKD + β·NCKD`` (unscaled, without
        ``T²``), and ``grad`` ``(N, C)`` contiguous in the input dtype,
        ``grad_scale · dℓ_i/ds``, or ``(0, 0)`` when not requested.
    """
    _check_args(student, teacher, labels, alpha, beta, inv_temperature, grad_scale)
    student, teacher, labels = _row_major(student), _row_major(teacher), labels.contiguous()
    rows, classes = student.shape
    row_loss = torch.empty(rows, dtype=torch.float32, device=student.device)
    grad_dtype = stored_dtype(student.dtype)
    grad = student.new_empty((rows, classes) if student_grad else (0, 0), dtype=grad_dtype)
    if rows > 0:
        block, num_warps = launch_config(classes)
        _dkd_fwd_kernel[(rows,)](
            student, teacher, labels, row_loss, grad if student_grad else None,
            student.stride(0), teacher.stride(0), classes,
            float(alpha), float(beta), float(inv_temperature), float(grad_scale * inv_temperature),
            STUDENT_GRAD=bool(student_grad), BLOCK=block, num_warps=num_warps,
        )
    return row_loss, grad.to(student.dtype)
