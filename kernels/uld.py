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
``grad_scale``), as the fused divergence kernels do.

Rows longer than ``MAX_VOCAB`` (``W = max(V_s, V_t)``) take three steps per
chunk of rows, with O(chunk · W) scratch and nothing of size (N, V) but the
gradients:

  1. ``_uld_keys_kernel``, once per side: the probabilities (online max and
     sum over blocks, then a second pass) packed with their columns into
     int64 keys as above, the zero padding up to W included, and a per-row
     flag for a NaN or +inf probability;
  2. ``torch.sort`` of the keys of each row, descending (a device sort: on a
     GPU the segmented radix sort of the CUDA backend's cub call, with no
     host synchronisation);
  3. ``_uld_sorted_kernel`` over the sorted rows in blocks: a forward pass
     (the L1, the signs, and per rank the prefix sum of the signs and the
     first rank of its run of equal values, carried across blocks), a
     backward pass (the last rank of each run, carried from later blocks, so
     each rank's run mean is (prefix[end] − prefix[start − 1]) / (end − start
     + 1), and Σ_k value_k · mean_k) and a third pass storing the gradient
     through the columns, as step 4 above.
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

__all__ = ["MAX_VOCAB", "SORTED_BLOCK", "uld_forward"]

# The widest row one program sorts in registers: two int64 keys and a few
# 32-bit vectors per entry, 8 entries per thread on 8 warps at 2048 (up to 255
# registers a thread). ptxas (sm_90) spills at 4096 on 8 warps (16 entries a
# thread), 16 warps (128 registers) and 32 warps (64).
MAX_VOCAB = 2048
ELEMENTS_PER_THREAD = 8
# Longer rows go through a device sort in chunks of rows: the entries each
# step of the sorted-row kernel holds, and the scratch bytes per chunk (keys,
# the sort's output and indices, prefix sums, run starts and means of both
# sides: 8 + 8 + 8 + 4 + 4 + 4 = 36 bytes a rank and side).
SORTED_BLOCK = 1024
SORTED_WARPS = 4
SCRATCH_BYTES = 256 * 2**20
_SCRATCH_BYTES_PER_RANK = 72


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
def _row_kept(mask_ptr, row, HAS_MASK: tl.constexpr):
    # whether the row counts: its mask entry, or every row without a mask
    kept = True
    if HAS_MASK:
        kept = tl.load(mask_ptr + row) != 0
    return kept


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
    kept = _row_kept(mask_ptr, row, HAS_MASK)
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


@triton.jit
def _uld_keys_kernel(
    x_ptr,  # [R, V] logits (or log-probabilities), unit stride along V
    keys_ptr,  # [R, W] int64: probability bits << 32 | column; W >= V
    unusable_ptr,  # [R] int32: 1 where the row has a NaN or +inf probability
    V, W, x_stride, inv_temperature,
    IS_LOGPROB: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    cols = tl.arange(0, BLOCK)
    m = float("-inf")
    total = 0.0
    if not IS_LOGPROB:
        # online max and sum of exp((x - m) / T) per lane over the row's
        # blocks, then across lanes (a lane that saw only -inf keeps 0)
        m_lane = tl.full((BLOCK,), float("-inf"), tl.float32)
        sum_lane = tl.zeros((BLOCK,), tl.float32)
        for base in range(0, V, BLOCK):
            x = tl.load(x_row + base + cols, mask=base + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m_lane, x)
            rescale = tl.where(m_new == float("-inf"), 0.0, tl.exp((m_lane - m_new) * inv_temperature))
            e = tl.where(x == float("-inf"), 0.0, tl.exp((x - m_new) * inv_temperature))
            sum_lane = sum_lane * rescale + e
            m_lane = m_new
        m = tl.max(m_lane, 0)
        lane_total = sum_lane * tl.exp((m_lane - m) * inv_temperature)
        total = tl.sum(tl.where(m_lane == float("-inf"), 0.0, lane_total), 0)
    bad = 0
    for base in range(0, W, BLOCK):
        k = base + cols
        x = tl.load(x_row + k, mask=k < V, other=float("-inf")).to(tl.float32)
        if IS_LOGPROB:
            p = tl.exp(x)
        else:
            p = tl.where(x == float("-inf"), 0.0, tl.exp((x - m) * inv_temperature) / total)
            # no mass (every logit -inf) is no distribution; a NaN logit (which
            # a compiled max may drop) makes the row NaN
            p = tl.where(x != x, float("nan"), p)
            p = tl.where(total == 0.0, float("nan"), p)
        p = tl.where(k < V, p, 0.0)
        bad += tl.sum(((p != p) | (p == float("inf"))).to(tl.int32), 0)
        key = (p.to(tl.int32, bitcast=True).to(tl.int64) << 32) | k.to(tl.int64)
        tl.store(keys_ptr + row * W + k, key, mask=k < W)
    tl.store(unusable_ptr + row, (bad > 0).to(tl.int32))


@triton.jit
def _larger(a, b):
    return tl.maximum(a, b)


@triton.jit
def _smaller(a, b):
    return tl.minimum(a, b)


@triton.jit
def _sorted_bits(keys_row, k, W):
    # the probability bits of ranks k (-1 past the row: equal to no probability)
    key = tl.load(keys_row + k, mask=(k >= 0) & (k < W), other=-(1 << 32))
    return (key >> 32).to(tl.int32)


@triton.jit
def _sorted_value(keys_row, k, W):
    return _sorted_bits(keys_row, k, W).to(tl.float32, bitcast=True)


@triton.jit
def _signs(ks_row, kt_row, k, W):
    # sign(a_k - b_k) of the two sorted rows, 0 past the row
    a = _sorted_value(ks_row, k, W)
    b = _sorted_value(kt_row, k, W)
    return tl.where(k < W, tl.where(a > b, 1, tl.where(a < b, -1, 0)), 0).to(tl.int32)


@triton.jit
def _run_prefix_pass(keys_row, prefix_row, start_row, signs, k, W, carry_sum, carry_start):
    # prefix sums of `signs` and the first rank of each rank's run, given the
    # carries of the blocks before; returns the carries after this block
    bits = _sorted_bits(keys_row, k, W)
    before = _sorted_bits(keys_row, k - 1, W)
    prefix = tl.cumsum(signs, 0) + carry_sum
    boundary = tl.where((k < W) & ((k == 0) | (bits != before)), k, 0).to(tl.int32)
    start = tl.maximum(tl.associative_scan(boundary, 0, _larger), carry_start)
    tl.store(prefix_row + k, prefix, mask=k < W)
    tl.store(start_row + k, start, mask=k < W)
    return carry_sum + tl.sum(signs, 0), tl.maximum(carry_start, tl.max(boundary, 0))


@triton.jit
def _run_mean_pass(keys_row, prefix_row, start_row, mean_row, k, W, carry_end):
    # each rank's mean sign over its run (stored), given the first rank of the
    # run after this block; returns (Σ value · mean over the block, the carry)
    bits = _sorted_bits(keys_row, k, W)
    after = _sorted_bits(keys_row, k + 1, W)
    boundary = tl.where((k < W) & ((k == W - 1) | (bits != after)), k, W).to(tl.int32)
    end = tl.minimum(tl.flip(tl.associative_scan(tl.flip(boundary, 0), 0, _smaller), 0), carry_end)
    inside = k < W
    start = tl.load(start_row + k, mask=inside, other=0)
    end_safe = tl.where(inside, end, 0)
    total = tl.load(prefix_row + end_safe, mask=inside, other=0)
    total -= tl.load(prefix_row + start - 1, mask=inside & (start > 0), other=0)
    mean = total.to(tl.float32) / (end_safe - start + 1).to(tl.float32)
    tl.store(mean_row + k, mean, mask=inside)
    value = tl.where(inside, bits.to(tl.float32, bitcast=True), 0.0)
    return tl.sum(value * tl.where(inside, mean, 0.0), 0), tl.minimum(carry_end, tl.min(boundary, 0))


@triton.jit
def _sorted_gradient_pass(keys_row, mean_row, grad_row, k, W, V, weighted_sum, scale, row_nan, kept,
                          CENTRED: tl.constexpr):
    # grad[column_k] = scale · a_k (mean_k − Σ a mean) (no centring for log-probabilities)
    inside = k < W
    key = tl.load(keys_row + k, mask=inside, other=0)
    value = (key >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    column = (key & 0xFFFFFFFF).to(tl.int32)
    mean = tl.load(mean_row + k, mask=inside, other=0.0)
    if CENTRED:
        grad = scale * value * (mean - weighted_sum)
    else:
        grad = scale * value * mean
    grad = tl.where(row_nan, float("nan"), grad)
    grad = tl.where(kept, grad, 0.0)
    tl.store(grad_row + column, grad.to(grad_row.dtype.element_ty), mask=inside & (column < V))


@triton.jit
def _uld_sorted_kernel(
    ks_ptr, kt_ptr,  # [R, W] int64 keys of both sides, each row sorted descending
    unusable_s_ptr, unusable_t_ptr,  # [R] int32
    mask_ptr,  # [R] int8 (1 = kept); unused without HAS_MASK
    loss_ptr,  # [R] float32
    gs_ptr, gt_ptr,  # [R, V_s], [R, V_t] contiguous gradients; unused without *_GRAD
    prefix_s_ptr, start_s_ptr, mean_s_ptr,  # [R, W] int32, int32, float32 scratch
    prefix_t_ptr, start_t_ptr, mean_t_ptr,
    Vs, Vt, W, scale_s, scale_t,
    HAS_MASK: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
    STUDENT_LOGPROB: tl.constexpr, TEACHER_LOGPROB: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    kept = _row_kept(mask_ptr, row, HAS_MASK)
    row_nan = (tl.load(unusable_s_ptr + row) + tl.load(unusable_t_ptr + row)) > 0
    ks_row = ks_ptr + row * W
    kt_row = kt_ptr + row * W
    cols = tl.arange(0, BLOCK)
    # pass 1: the L1 and, per side, prefix sums of its signs and run starts
    loss = 0.0
    sum_s = 0
    start_s = 0
    sum_t = 0
    start_t = 0
    for base in range(0, W, BLOCK):
        k = base + cols
        a = _sorted_value(ks_row, k, W)
        b = _sorted_value(kt_row, k, W)
        loss += tl.sum(tl.where(k < W, tl.abs(a - b), 0.0), 0)
        signs = _signs(ks_row, kt_row, k, W)
        if STUDENT_GRAD:
            sum_s, start_s = _run_prefix_pass(ks_row, prefix_s_ptr + row * W, start_s_ptr + row * W, signs, k,
                                              W, sum_s, start_s)
        if TEACHER_GRAD:
            sum_t, start_t = _run_prefix_pass(kt_row, prefix_t_ptr + row * W, start_t_ptr + row * W, -signs,
                                              k, W, sum_t, start_t)
    loss = tl.where(row_nan, float("nan"), loss)
    tl.store(loss_ptr + row, tl.where(kept, loss, 0.0))
    # pass 2, last block first: run ends, run means and Σ value · mean
    blocks = tl.cdiv(W, BLOCK)
    weighted_s = 0.0
    end_s = W
    weighted_t = 0.0
    end_t = W
    for i in range(0, blocks):
        k = (blocks - 1 - i) * BLOCK + cols
        if STUDENT_GRAD:
            part, end_s = _run_mean_pass(ks_row, prefix_s_ptr + row * W, start_s_ptr + row * W,
                                         mean_s_ptr + row * W, k, W, end_s)
            weighted_s += part
        if TEACHER_GRAD:
            part, end_t = _run_mean_pass(kt_row, prefix_t_ptr + row * W, start_t_ptr + row * W,
                                         mean_t_ptr + row * W, k, W, end_t)
            weighted_t += part
    # pass 3: the gradients through the columns
    for base in range(0, W, BLOCK):
        k = base + cols
        if STUDENT_GRAD:
            _sorted_gradient_pass(ks_row, mean_s_ptr + row * W, gs_ptr + row * Vs, k, W, Vs, weighted_s,
                                  scale_s, row_nan, kept, not STUDENT_LOGPROB)
        if TEACHER_GRAD:
            _sorted_gradient_pass(kt_row, mean_t_ptr + row * W, gt_ptr + row * Vt, k, W, Vt, weighted_t,
                                  scale_t, row_nan, kept, not TEACHER_LOGPROB)


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
            / float16, one dtype, unit stride along V. Rows longer than
            ``MAX_VOCAB`` are sorted by ``torch.sort`` in chunks of rows
            (module docstring).
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
    if rows > 0 and max(vs, vt) > MAX_VOCAB:
        _sorted_rows(student, teacher, row_mask, row_loss, grad_s, grad_t, inv_student_temperature,
                     inv_teacher_temperature, grad_scale, student_grad, teacher_grad, student_is_logprob,
                     teacher_is_logprob)
    elif rows > 0:
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


def sorted_chunk_rows(width: int) -> int:
    """Rows per chunk of the sorted-row path for rows of ``width`` ranks: as
    many as ``SCRATCH_BYTES`` of scratch holds, at least one."""
    return max(1, SCRATCH_BYTES // (_SCRATCH_BYTES_PER_RANK * width))


def _sorted_rows(student, teacher, row_mask, row_loss, grad_s, grad_t, inv_ts, inv_tt, grad_scale,
                 student_grad, teacher_grad, student_is_logprob, teacher_is_logprob) -> None:
    """The loss and gradients of rows longer than ``MAX_VOCAB``, chunk by chunk
    (module docstring): keys, a device sort per row, the sorted-row kernel."""
    rows, vs = student.shape
    vt = teacher.shape[1]
    width = max(vs, vt)
    device = student.device
    no_mask = torch.empty(0, dtype=torch.int8, device=device)
    mask = row_mask.to(torch.int8) if row_mask is not None else no_mask
    chunk = sorted_chunk_rows(width)
    scratch_shape = (min(chunk, rows), width)
    ints = [torch.empty(scratch_shape, dtype=torch.int32, device=device) for _ in range(4)]
    means = [torch.empty(scratch_shape, dtype=torch.float32, device=device) for _ in range(2)]
    unusable = torch.empty((2, min(chunk, rows)), dtype=torch.int32, device=device)
    for first in range(0, rows, chunk):
        r = min(chunk, rows - first)
        sorted_keys = []
        for side, (x, inverse, is_logprob) in enumerate(
                ((student, inv_ts, student_is_logprob), (teacher, inv_tt, teacher_is_logprob))):
            keys = torch.empty((r, width), dtype=torch.int64, device=device)
            _uld_keys_kernel[(r,)](
                x[first:first + r], keys, unusable[side], x.shape[1], width, x.stride(0), inverse,
                IS_LOGPROB=is_logprob, BLOCK=SORTED_BLOCK, num_warps=SORTED_WARPS,
            )
            sorted_keys.append(torch.sort(keys, dim=1, descending=True).values)
            del keys
        _uld_sorted_kernel[(r,)](
            sorted_keys[0], sorted_keys[1], unusable[0], unusable[1],
            mask[first:first + r] if row_mask is not None else mask, row_loss[first:first + r],
            grad_s[first:first + r] if student_grad else grad_s,
            grad_t[first:first + r] if teacher_grad else grad_t,
            ints[0], ints[1], means[0], ints[2], ints[3], means[1],
            vs, vt, width, grad_scale * inv_ts, grad_scale * inv_tt,
            HAS_MASK=row_mask is not None, STUDENT_GRAD=student_grad, TEACHER_GRAD=teacher_grad,
            STUDENT_LOGPROB=student_is_logprob, TEACHER_LOGPROB=teacher_is_logprob, BLOCK=SORTED_BLOCK,
            num_warps=SORTED_WARPS,
        )
