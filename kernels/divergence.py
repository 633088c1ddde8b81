"""Fused softmax divergences (docs/spec.md §1) in Triton, the ``triton`` backend of ``fastkd.divergence``.

Same contract as the C++ op ``fastkd::divergence_forward`` (csrc/fastkd.cpp),
the per-element math of ``csrc/common/divergence_math.h`` (whose comment
derives the gradients) and the passes of ``csrc/cuda/divergence.cu``, with
its first two passes fused by an online log-sum-exp. With hard labels y the
op also computes the cross-entropy at temperature 1, CE_i = log Σ_j exp(s_ij)
− s_iy, and adds hard_grad_scale · (softmax(s_i) − onehot(y_i)) to the
student gradient, in the same passes. One program per row streams the row in
BLOCK-wide chunks:

  pass 1  max of s and t (and the first index of each, for the mode-
          shifted log ratios), Σ exp((x − max)/T), online; with
          labels at T ≠ 1 also Σ exp(s − max) (the max is the
          same at every T); then CE = max − s_y + log Σ exp(s − max)
                                                                  read s, t; s_y
  pass 2  loss, Σu, Σv; KL with only the student gradient writes
          it here, (q − p)/T, since Σu = −Σp = −1                 read s, t
  pass 3  gradients (u − q Σu)/T and (v − p Σv)/T                 read s, t; write gradients

The CE gradient term is added to the student gradient in float32 in the
store that writes it (pass 2 or 3), before the rounding to the input dtype.
At T = 1 exactly (the launcher's CE_SHARES_NORMALISER) the CE reuses the
student's normaliser and q = softmax(s), so it costs no exp at all; at
T ≠ 1 it costs one exp per element in pass 1 and one more in the gradient
pass. A kept row whose label is not in [0, V) gets CE NaN and a NaN student
gradient row; the s_y load is at a clamped index, so nothing outside the
row is read.

Memory traffic floor, b bytes per logit: read 2·N·V·b, write N·V·b per
requested gradient and 4·N bytes of row loss; the CE adds no read of the
row, only 8·N bytes of labels, N values s_y and 4·N bytes of row CE.
Passes 2 and 3 re-read the row from L2 while the rows resident at once
(about one per SM: 2·V·b bytes each) fit in it: on a 50 MiB L2 with 132
SMs up to V ≈ 49K in fp32 (≈ 99K in bf16 / fp16); beyond that the re-reads
go to HBM.

Everything is accumulated in float32 except the normalisers Σ exp, summed
(per chunk, across lanes) and logged in float64 so that the row constant of
the log ratio log(q/p) = (s − t)/T − row constant is rounded once; the
mixture divergences (JSD, skew) are written in that log ratio rather than as
differences of log-probabilities, which at T = 100 cancel to ~1e-3 of their
magnitude (their error is 0.1–0.6× the float32 reference's). bf16 / fp16
logits are widened as they are loaded and the gradients rounded to the input
dtype as they are stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastkd._enums import DivergenceKind

from ._common import (
    DEVICE_TYPE,  # noqa: F401  (re-exported: callers ask a module where its kernels run)
    KL,
    REVERSE_KL,
    check_pair,
    check_tensor,
    guard_device,
    row_launch_config,
    stored_dtype,
)
from ._divergence_math import (
    ce_grad,
    check_kept_label_range,
    check_labels,
    check_row_mask,
    check_scalars,
    coefficient_terms,
    element_terms,
    excluded_row_loss,
    logit_at,
    online_normaliser,
    rescaled_sum_exp,
    store_grad,
    zero_grad_row,
)

__all__ = ["divergence_forward"]

# (BLOCK, num_warps) for rows of V logits.
launch_config = row_launch_config


@triton.jit
def _softmax_grad(term, prob, term_sum, factor):
    # dL/dx_j = (term_j − prob_j Σ term) / T, times grad_scale (factor = grad_scale / T)
    return factor * (term - prob * term_sum)


@triton.jit
def _load_chunk(s_row, t_row, offs, V):
    # one chunk of both rows in float32; lanes past V load −inf (p = q = 0
    # there, and every divergence term is 0 by the xlogy rule)
    s = tl.load(s_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    t = tl.load(t_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    return s, t


@triton.jit
def _terms_at(
    s, t,  # the chunk, from _load_chunk
    m_s, log_d_s, m_t, log_d_t,  # row maxima and log Σ exp((x − m) / T)
    row_shift,  # log(q/p) = (s − t) / T − row_shift
    log_d_gap,  # log d_s − log d_t, rounded once: log(q/p) = a_s − a_t − log_d_gap
    s_mode, t_at_s_mode, t_mode, s_at_t_mode,  # logits at the modes of q and p
    inv_temperature, c, one_minus_c, log_c, log_one_minus_c, KIND: tl.constexpr,
):
    # The chunk's element terms (terms_at of csrc/cuda/divergence.cu).
    # log softmax(x / T) = (x − m) / T − log d: the rounding of the product
    # scales with |x − m| / T, small where the probability is large, rather
    # than with |x / T| (the interpreter has no FMA to hide it)
    a_s = (s - m_s) * inv_temperature
    a_t = (t - m_t) * inv_temperature
    logq = a_s - log_d_s
    logp = a_t - log_d_t
    # log(q/p) − (its value at q's mode) and log(p/q) − (its value at p's
    # mode), from logit differences; only KL and REVERSE_KL read them
    ratio_q = (s - s_mode) * inv_temperature - (t - t_at_s_mode) * inv_temperature
    ratio_p = (t - t_mode) * inv_temperature - (s - s_at_t_mode) * inv_temperature
    # log(q/p) = (s − t)/T − ((max_s − max_t)/T + log d_s − log d_t): small
    # where p ≈ q, and rounded relative to that size, where log q − log p
    # would carry the rounding of two numbers of magnitude ~log V. Where both
    # logits are −inf it is NaN, and p = q = 0 zero every term that reads it.
    # That form loses everything when (s − t) / T and row_shift are huge and
    # nearly cancel (finite logits ~±3.4e38), where a_s − a_t − log_d_gap,
    # relative to the maxima, does not: each element takes the form whose
    # rounding bound is smaller.
    by_logits = (s - t) * inv_temperature - row_shift
    by_maxima = (a_s - a_t) - log_d_gap
    bound_logits = tl.abs((s - t) * inv_temperature) + tl.abs(row_shift)
    bound_maxima = tl.abs(a_s) + tl.abs(a_t) + tl.abs(log_d_gap)
    log_ratio = tl.where(bound_logits <= bound_maxima, by_logits, by_maxima)
    return element_terms(
        tl.exp(logp), tl.exp(logq), log_ratio, ratio_q, ratio_p, c, one_minus_c, log_c, log_one_minus_c, KIND
    )


@triton.jit
def _divergence_fwd_kernel(
    s_ptr,  # [N, V] student logits, row stride stride_s, unit stride along V
    t_ptr,  # [N, V] teacher logits, row stride stride_t, unit stride along V
    mask_ptr,  # [N] bool, False → row excluded (None when HAS_MASK is False)
    labels_ptr,  # [N] int64 hard labels (None unless HAS_LABELS)
    loss_ptr,  # [N] float32 row losses ℓ_i
    ce_ptr,  # [N] float32 row cross-entropies log Σ_j exp(s_ij) − s_iy (None unless HAS_LABELS)
    gs_ptr,  # [N, V] contiguous grad_scale · dℓ_i/ds (+ the CE term) (None unless STUDENT_GRAD)
    gt_ptr,  # [N, V] contiguous grad_scale · dℓ_i/dt (None unless TEACHER_GRAD)
    stride_s,
    stride_t,
    rows_per_block,  # row r at (r // rows_per_block) · block stride + (r % rows_per_block) · row stride
    block_stride_s,
    block_stride_t,
    V,
    inv_temperature,  # 1 / T
    grad_factor,  # grad_scale / T
    hard_grad_scale,  # factor of the CE gradient (unused unless HAS_LABELS)
    c,  # β (JSD) or α (skew); unused by the other kinds
    one_minus_c,
    log_c,
    log_one_minus_c,  # −inf for α = 1
    KIND: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    CE_SHARES_NORMALISER: tl.constexpr,  # inv_temperature == 1: the CE's lse and softmax are the student's
    STUDENT_GRAD: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    # KL with only the student gradient: Σu = −Σp = −1 is known in advance,
    # so the gradient is written in pass 2 and pass 3 is skipped.
    FUSED_KL_GRAD: tl.constexpr = KIND == KL and STUDENT_GRAD and not TEACHER_GRAD
    # The gradients whose unbounded log ratios are shifted by their value at
    # the mode (divergence_math.h): REVERSE_KL's u and KL's v.
    NEED_MODES: tl.constexpr = (KIND == REVERSE_KL and STUDENT_GRAD) or (KIND == KL and TEACHER_GRAD)
    # The CE's own Σ exp(s − max) at temperature 1 (pass 1)
    CE_OWN_SUM: tl.constexpr = HAS_LABELS and not CE_SHARES_NORMALISER

    if HAS_MASK:
        if tl.load(mask_ptr + row) == 0:
            excluded_row_loss(loss_ptr, ce_ptr, row, HAS_LABELS)
            if STUDENT_GRAD:
                zero_grad_row(gs_ptr, row, V, cols, BLOCK)
            if TEACHER_GRAD:
                zero_grad_row(gt_ptr, row, V, cols, BLOCK)
            return

    block = row // rows_per_block
    in_block = row - block * rows_per_block
    s_row = s_ptr + block * block_stride_s + in_block * stride_s
    t_row = t_ptr + block * block_stride_t + in_block * stride_t

    # pass 1: max (and, for the mode shifts, the first index of the max) and
    # log Σ_j exp((x_j − max) / T), online, and with labels at T ≠ 1 the
    # student's Σ_j exp(s_j − max) as well. An all −inf row keeps max = −inf,
    # so its x − max and its loss are NaN (it has no distribution).
    m_s = float("-inf")
    d_s = tl.zeros([], tl.float64)
    s_at = V
    m_t = float("-inf")
    d_t = tl.zeros([], tl.float64)
    t_at = V
    d_ce = tl.zeros([], tl.float64)
    for start in range(0, V, BLOCK):
        offs = start + cols
        s, t = _load_chunk(s_row, t_row, offs, V)
        m_prev = m_s
        m_s, d_s, s_at = online_normaliser(m_s, d_s, s_at, s, offs, V, inv_temperature, NEED_MODES)
        m_t, d_t, t_at = online_normaliser(m_t, d_t, t_at, t, offs, V, inv_temperature, NEED_MODES)
        if CE_OWN_SUM:
            d_ce = rescaled_sum_exp(d_ce, m_prev, m_s, s)
    log_d_s64 = tl.log(d_s)
    log_d_t64 = tl.log(d_t)
    # in float64, then rounded once: the row constant of log(q/p)
    row_shift = ((m_s.to(tl.float64) - m_t.to(tl.float64)) * inv_temperature + (log_d_s64 - log_d_t64)).to(
        tl.float32
    )
    log_d_gap = (log_d_s64 - log_d_t64).to(tl.float32)
    log_d_s = log_d_s64.to(tl.float32)
    log_d_t = log_d_t64.to(tl.float32)
    s_mode = 0.0
    t_at_s_mode = 0.0
    t_mode = 0.0
    s_at_t_mode = 0.0
    if NEED_MODES:
        # a row without a maximum (NaN) has a NaN loss anyway; index 0 keeps
        # the loads in the row, as in the CPU and CUDA kernels
        s_at = tl.where(s_at < V, s_at, 0)
        t_at = tl.where(t_at < V, t_at, 0)
        s_mode = logit_at(s_row, s_at, V)
        t_at_s_mode = logit_at(t_row, s_at, V)
        t_mode = logit_at(t_row, t_at, V)
        s_at_t_mode = logit_at(s_row, t_at, V)
        # a mode where the other side is −inf (an infinite divergence):
        # shifting by an infinite log ratio would make every term NaN; shift
        # by the maxima instead, so the gradient is −inf / NaN where the
        # float64 reference's is (csrc/cpu/divergence_kernel.cpp does the same)
        s_bad = (t_at_s_mode == float("-inf")) | (t_at_s_mode != t_at_s_mode)
        t_bad = (s_at_t_mode == float("-inf")) | (s_at_t_mode != s_at_t_mode)
        s_mode = tl.where(s_bad, m_s, s_mode)
        t_at_s_mode = tl.where(s_bad, m_t, t_at_s_mode)
        t_mode = tl.where(t_bad, m_t, t_mode)
        s_at_t_mode = tl.where(t_bad, m_s, s_at_t_mode)

    # CE = log Σ exp(s) − s_y = (max − s_y) + log Σ exp(s − max), in float64
    # and rounded once. s_y is one load, at an index clamped into the row so
    # that a label outside [0, V) reads nothing out of bounds; such a row's
    # CE (and its student gradient) is NaN.
    label = 0
    label_ok = False
    log_d_ce = 0.0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        label_ok = (label >= 0) & (label < V)
        s_label = logit_at(s_row, tl.where(label_ok, label, 0), V)
        if CE_SHARES_NORMALISER:
            log_d_ce64 = log_d_s64
        else:
            log_d_ce64 = tl.log(d_ce)
        log_d_ce = log_d_ce64.to(tl.float32)
        ce = (m_s.to(tl.float64) - s_label.to(tl.float64) + log_d_ce64).to(tl.float32)
        tl.store(ce_ptr + row, tl.where(label_ok, ce, float("nan")))

    # pass 2: ℓ = Σ_j loss_j, Σu, Σv
    loss_acc = tl.zeros([BLOCK], tl.float32)
    u_acc = tl.zeros([BLOCK], tl.float32)
    v_acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + cols
        s, t = _load_chunk(s_row, t_row, offs, V)
        loss, u, v, p, q = _terms_at(
            s, t, m_s, log_d_s, m_t, log_d_t, row_shift, log_d_gap,
            s_mode, t_at_s_mode, t_mode, s_at_t_mode,
            inv_temperature, c, one_minus_c, log_c, log_one_minus_c, KIND,
        )
        loss_acc += loss
        if FUSED_KL_GRAD:
            # dKL/ds = (q − p) / T, plus the CE term in the same store
            grad = _softmax_grad(u, q, -1.0, grad_factor)
            if HAS_LABELS:
                grad += ce_grad(
                    s, q, offs, m_s, log_d_ce, label, label_ok, hard_grad_scale, CE_SHARES_NORMALISER
                )
            store_grad(gs_ptr, row, V, offs, grad)
        else:
            if STUDENT_GRAD:
                u_acc += u
            if TEACHER_GRAD:
                v_acc += v
    # a divergence is never negative (rounding of a tiny one); NaN stays NaN
    row_loss = tl.sum(loss_acc, 0)
    tl.store(loss_ptr + row, tl.where(row_loss < 0.0, 0.0, row_loss))

    # pass 3: dℓ/ds_j = (u_j − q_j Σu) / T (+ the CE term),  dℓ/dt_j = (v_j − p_j Σv) / T
    if (STUDENT_GRAD or TEACHER_GRAD) and not FUSED_KL_GRAD:
        sum_u = tl.sum(u_acc, 0)
        sum_v = tl.sum(v_acc, 0)
        for start in range(0, V, BLOCK):
            offs = start + cols
            s, t = _load_chunk(s_row, t_row, offs, V)
            loss, u, v, p, q = _terms_at(
                s, t, m_s, log_d_s, m_t, log_d_t, row_shift, log_d_gap,
                s_mode, t_at_s_mode, t_mode, s_at_t_mode,
                inv_temperature, c, one_minus_c, log_c, log_one_minus_c, KIND,
            )
            if STUDENT_GRAD:
                grad = _softmax_grad(u, q, sum_u, grad_factor)
                if HAS_LABELS:
                    grad += ce_grad(
                        s, q, offs, m_s, log_d_ce, label, label_ok, hard_grad_scale, CE_SHARES_NORMALISER
                    )
                store_grad(gs_ptr, row, V, offs, grad)
            if TEACHER_GRAD:
                store_grad(gt_ptr, row, V, offs, _softmax_grad(v, p, sum_v, grad_factor))


def _as_row_shape(x: torch.Tensor) -> torch.Tensor:
    """A ``(blocks, rows_per_block, V)`` tensor as the ``(rows, V)`` shape of its rows, for the
    checks: a zero-row-stride view of its first element (never read through); others unchanged."""
    if x.dim() != 3:
        return x
    return x.as_strided((x.shape[0] * x.shape[1], x.shape[2]), (0, x.stride(2)))


def _row_geometry(x: torch.Tensor) -> tuple[int, int, int]:
    """``(row_stride, rows_per_block, block_stride)`` of ``(N, V)`` or
    ``(blocks, rows_per_block, V)`` logits: row ``r`` starts at
    ``(r // rows_per_block) · block_stride + (r % rows_per_block) · row_stride``."""
    if x.dim() == 3:
        return x.stride(1), max(x.shape[1], 1), x.stride(0)
    return x.stride(0), max(x.shape[0], 1), 0


def _check_args(student, teacher, row_mask, kind, inv_temperature, coef, grad_scale) -> None:
    """The checks of csrc/common/checks.h as ValueError, and the device the kernel runs on."""
    if student.dim() == 3 and student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in shape")
    student, teacher = _as_row_shape(student), _as_row_shape(teacher)
    for name, x in (("student", student), ("teacher", teacher)):
        check_tensor(name, x, 2, "N, V")
        if x.shape[1] > 1 and x.stride(1) != 1:
            raise ValueError(f"{name} must have unit stride along V, got strides {x.stride()}")
        # any row stride, 0 (an expanded row) included: the logits are only
        # read and the gradients are written to fresh contiguous tensors
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in shape")
    if student.shape[1] < 1:
        raise ValueError("student must have at least one column (vocabulary entry)")
    check_pair("student", student, "teacher", teacher)
    check_row_mask(row_mask, student)
    if not isinstance(kind, int) or isinstance(kind, bool) or kind not in tuple(DivergenceKind):
        raise ValueError(f"kind must be an int in [0, 6), got {kind!r}")
    check_scalars(kind, inv_temperature, coef, grad_scale)


@guard_device
def divergence_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    row_mask: torch.Tensor | None,
    kind: int,
    inv_temperature: float,
    coef: float,
    grad_scale: float,
    student_grad: bool,
    teacher_grad: bool,
    labels: torch.Tensor | None = None,
    hard_grad_scale: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row divergences, their scaled gradients and optionally the hard-label CE;
    the contract of ``fastkd::divergence_forward``.

    Args:
        student: ``(N, V)`` logits, float32 / bfloat16 / float16, unit stride
            along V, any row stride; or ``(A, R, V)`` (any strides but the
            unit one along V), read as its ``N = A·R`` rows in place (the
            causal shift ``logits[:, :-1]`` of ``(B, T, V)`` logits).
        teacher: the student's shape, same dtype and device.
        row_mask: ``(N,)`` bool or None; False rows get loss 0, CE 0 and zero gradients.
        kind: divergence code (csrc/common/divergence_math.h): 0 kl,
            1 reverse_kl, 2 jsd, 3 skew_kl, 4 skew_reverse_kl, 5 tvd.
        inv_temperature: ``1 / T``.
        coef: β in (0, 1) for JSD, α in (0, 1] for the skew divergences.
        grad_scale: factor applied to the divergence gradients (not to the loss).
        student_grad, teacher_grad: which gradients to compute.
        labels: ``(N,)`` int64 on the student's device, or None: the hard-label
            cross-entropy at temperature 1 is computed in the same pass. Kept
            rows' labels must lie in ``[0, V)`` (ValueError otherwise).
        hard_grad_scale: factor of the CE gradient, 0 without labels.

    Returns:
        ``row_loss`` ``(N,)`` float32, the unscaled ``ℓ_i``; ``grad_s`` and
        ``grad_t``: ``(N, V)`` contiguous in the input dtype, equal to
        ``grad_scale · dℓ_i/d(logits)``, or ``(0, 0)`` when not requested;
        ``grad_s`` also holds ``hard_grad_scale · (softmax(s_i) − onehot(y_i))``
        with labels; ``row_ce`` ``(N,)`` float32, ``log Σ_j exp(s_ij) − s_iy_i``
        (0 for excluded rows), or ``(0,)`` without labels.
    """
    _check_args(student, teacher, row_mask, kind, inv_temperature, coef, grad_scale)
    check_labels(labels, hard_grad_scale, _as_row_shape(student))
    rows, vocab = _as_row_shape(student).shape
    stride_s, rows_per_block, block_stride_s = _row_geometry(student)
    stride_t, _, block_stride_t = _row_geometry(teacher)
    check_kept_label_range(labels, row_mask, vocab)
    has_labels = labels is not None
    row_loss = torch.empty(rows, dtype=torch.float32, device=student.device)
    row_ce = torch.empty(rows if has_labels else 0, dtype=torch.float32, device=student.device)
    grad_dtype = stored_dtype(student.dtype)
    grad_s = student.new_empty((rows, vocab) if student_grad else (0, 0), dtype=grad_dtype)
    grad_t = teacher.new_empty((rows, vocab) if teacher_grad else (0, 0), dtype=grad_dtype)
    if rows > 0:
        block, num_warps = launch_config(vocab)
        _divergence_fwd_kernel[(rows,)](
            student, teacher, None if row_mask is None else row_mask.contiguous(),
            labels.contiguous() if has_labels else None, row_loss, row_ce if has_labels else None,
            grad_s if student_grad else None, grad_t if teacher_grad else None,
            stride_s, stride_t, rows_per_block, block_stride_s, block_stride_t, vocab,
            float(inv_temperature), float(grad_scale * inv_temperature), float(hard_grad_scale),
            *coefficient_terms(kind, coef),
            KIND=kind, HAS_MASK=row_mask is not None, HAS_LABELS=has_labels,
            # at T = 1 exactly the CE's log Σ exp and softmax are the student's own
            CE_SHARES_NORMALISER=has_labels and float(inv_temperature) == 1.0,
            STUDENT_GRAD=bool(student_grad), TEACHER_GRAD=bool(teacher_grad), BLOCK=block,
            num_warps=num_warps,
        )
    return row_loss, grad_s.to(student.dtype), grad_t.to(teacher.dtype), row_ce
