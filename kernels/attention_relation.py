"""Self-attention relations (docs/spec.md §5.3, MiniLM) in Triton, the ``triton`` backend of
``fastkd.attention_relation_loss``.

Same contract as the C++ ops ``fastkd::attention_relation_forward`` /
``_backward`` (csrc/fastkd.cpp, csrc/cpu/attention_relation.cpp),
flash-attention style: for batch element b and relation head a the scores
``z_ij = c · x_i · x_j`` (``c = 1 / (√d · τ)``, one per model) exist one
``BLOCK_M × BLOCK_N`` tile at a time, in registers.

  forward   one program per (b, a, block of BLOCK_M rows); it walks the key
            tiles keeping, for student and teacher, the online row max m, its
            finite stand-in shift (m, or 0 while m = −inf), l = Σ exp(z − shift),
            and the KL's cross term relative to the shifts,
              w = Σ e (zt − shift_t − (zs − shift_s)),  e = exp(zt − shift_t)
            (a key the teacher gives no mass adds 0: 0 · log 0 = 0); then
            KL_i = w / l_t − (log l_t − log l_s). Relative to the maxima no term
            of the scores' size cancels (see RelationRow in
            csrc/common/attention_relation_op.h: the one-pass
            Σ e (zt − zs) / l_t − (lse_t − lse_s) loses eps · |z|); when a
            tile raises the shifts, w first gets (Δshift_s − Δshift_t) · l_t,
            the move of its accumulated terms. Writes lse_s, lse_t as
            (shift, log l) pairs and KL per (b, a, row): O(B · A · T).
  backward  with g_i the row's upstream gradient / A, recomputed tile by tile
            with log p = (zt − shift_t) − log l_t (likewise log q), never
            zt − lse_t, whose rounding of lse is of the scores' size:
              dzs_ij = g_i (q_ij − p_ij) c_s,  dzt_ij = g_i p_ij (log p_ij − log q_ij − KL_i) c_t,
              dX = (dZ + dZᵀ) X:
            the row role (dZ X) by one program per row block walking the key
            tiles, then the column role (dZᵀ X) by one program per key block
            walking the row tiles, which adds the row role's result for its
            rows and writes the gradient. No atomics: each element is written
            by one program in a fixed order, so the gradients are deterministic.

A head's d = D / A channels are held in registers (``BLOCK_D`` ≥ d, d ≤ 256).
float32 inputs use ``input_precision="ieee"``; bfloat16 / float16 inputs
``"tf32"`` (their values are exact in tf32).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, guard_device

__all__ = ["attention_relation_backward", "attention_relation_forward"]

DTYPES = FLOAT_DTYPES
MAX_HEAD_WIDTH = 256
BLOCK_M = 32
BLOCK_N = 32
FORWARD_WARPS = 4
# the backward holds both models' row and key tiles and two score gradients
# (float32 ones with ieee products): 16 × 16 tiles on 4 warps stay within the
# registers of a thread at sm_90 (32 × 32 tiles spill, even on 8 warps)
BACKWARD_BLOCK = 16
BACKWARD_WARPS = 4


@triton.jit
def _head_rows(x_ptr, b, a, rows, row_ok, stride_b, stride_t, stride_d, width, BLOCK_D: tl.constexpr):
    # x[b, rows, a·width : (a+1)·width] as float32, zeros past T and past width
    dims = tl.arange(0, BLOCK_D)
    ptrs = x_ptr + b * stride_b + rows[:, None] * stride_t + (a * width + dims)[None, :] * stride_d
    return tl.load(ptrs, mask=row_ok[:, None] & (dims < width)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _store_head_rows(out_ptr, acc, b, a, rows, row_ok, T, A, width, BLOCK_D: tl.constexpr, ADD: tl.constexpr):
    # out[b, rows, a·width : (a+1)·width] of a contiguous [B, T, A·width] tensor = acc (+= acc with ADD)
    dims = tl.arange(0, BLOCK_D)
    D = width * A
    ptrs = out_ptr + b * T * D + rows[:, None] * D + (a * width + dims)[None, :]
    ok = row_ok[:, None] & (dims < width)[None, :]
    if ADD:
        acc = acc + tl.load(ptrs, mask=ok, other=0.0)
    tl.store(ptrs, acc, mask=ok)


@triton.jit
def _kept(mask_ptr, b, idx, idx_ok, T, HAS_MASK: tl.constexpr):
    # is idx a kept position (in range and, with a mask, unmasked)
    if HAS_MASK:
        return idx_ok & (tl.load(mask_ptr + b * T + idx, mask=idx_ok, other=0) != 0)
    return idx_ok


@triton.jit
def _position_tiles(s_ptr, t_ptr, mask_ptr, b, a, idx, T, width_s, width_t,
                    s_stride_b, s_stride_t, s_stride_d, t_stride_b, t_stride_t, t_stride_d,
                    HAS_MASK: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr):
    # The positions idx of sequence b as every kernel reads them, as query rows or as keys: which are
    # in range, which are kept (in range and unmasked), and head a's student and teacher rows there
    # (float32, zeros past T and past each head's width).
    ok = idx < T
    kept = _kept(mask_ptr, b, idx, ok, T, HAS_MASK)
    xs = _head_rows(s_ptr, b, a, idx, ok, s_stride_b, s_stride_t, s_stride_d, width_s, BLOCK_DS)
    xt = _head_rows(t_ptr, b, a, idx, ok, t_stride_b, t_stride_t, t_stride_d, width_t, BLOCK_DT)
    return ok, kept, xs, xt


@triton.jit
def _pair_mask(row_kept, col_kept, rows, cols, CAUSAL: tl.constexpr):
    keep = row_kept[:, None] & col_kept[None, :]
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None])
    return keep


@triton.jit
def _program_positions(A, BLOCK: tl.constexpr):
    # (b, a, positions) of this program: grid axis 0 walks the (batch element, relation head) pairs,
    # axis 1 the blocks of BLOCK positions (query rows or keys, as the kernel walks them)
    bh = tl.program_id(0)
    b = (bh // A).to(tl.int64)
    a = bh % A
    return b, a, tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _key_end(T, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    # the keys this program's block of rows sees are [0, key_end): with CAUSAL, those up to its last row
    key_end = T
    if CAUSAL:
        key_end = tl.minimum(T, (tl.program_id(1) + 1) * BLOCK_M)
    return key_end


@triton.jit
def _attention_relation_fwd_kernel(
    s_ptr, t_ptr,  # [B, T, D_s], [B, T, D_t] states, any strides
    mask_ptr,  # [B, T] int8 (1 = kept), contiguous; unused without HAS_MASK
    lse_s_ptr, lse_t_ptr,  # [B, A, T, 2] float32: (shift, log l) per row
    kl_ptr,  # [B, A, T] float32
    T, A, width_s, width_t,
    s_stride_b, s_stride_t, s_stride_d, t_stride_b, t_stride_t, t_stride_d,
    scale_s, scale_t,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b, a, rows = _program_positions(A, BLOCK_M)
    row_ok, row_kept, xs, xt = _position_tiles(
        s_ptr, t_ptr, mask_ptr, b, a, rows, T, width_s, width_t,
        s_stride_b, s_stride_t, s_stride_d, t_stride_b, t_stride_t, t_stride_d, HAS_MASK, BLOCK_DS, BLOCK_DT)
    m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
    m_t = tl.full([BLOCK_M], float("-inf"), tl.float32)
    shift_s = tl.zeros([BLOCK_M], tl.float32)
    shift_t = tl.zeros([BLOCK_M], tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    w = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(0, _key_end(T, BLOCK_M, CAUSAL), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok, col_kept, ks, kt = _position_tiles(
            s_ptr, t_ptr, mask_ptr, b, a, cols, T, width_s, width_t,
            s_stride_b, s_stride_t, s_stride_d, t_stride_b, t_stride_t, t_stride_d,
            HAS_MASK, BLOCK_DS, BLOCK_DT)
        keep = _pair_mask(row_kept, col_kept, rows, cols, CAUSAL)
        zs = tl.where(keep, tl.dot(xs, tl.trans(ks), input_precision=PRECISION) * scale_s, float("-inf"))
        zt = tl.where(keep, tl.dot(xt, tl.trans(kt), input_precision=PRECISION) * scale_t, float("-inf"))
        # shifts stay finite for rows without a kept key yet (−inf − −inf is NaN)
        new_s = tl.maximum(m_s, tl.max(zs, 1))
        new_t = tl.maximum(m_t, tl.max(zt, 1))
        new_shift_s = tl.where(new_s == float("-inf"), 0.0, new_s)
        new_shift_t = tl.where(new_t == float("-inf"), 0.0, new_t)
        rescale_t = tl.exp(m_t - new_shift_t)
        # w's accumulated terms move by (Δshift_s − Δshift_t) each; while l_t = 0
        # there are none (w = 0) and the moves may be infinite
        moved = (new_shift_s - shift_s) - (new_shift_t - shift_t)
        w = tl.where(l_t != 0.0, (w + moved * l_t) * rescale_t, w)
        l_s = l_s * tl.exp(m_s - new_shift_s) + tl.sum(tl.exp(zs - new_shift_s[:, None]), 1)
        e_t = tl.exp(zt - new_shift_t[:, None])
        l_t = l_t * rescale_t + tl.sum(e_t, 1)
        # 0 · log 0 = 0: a key without teacher mass adds nothing (its gap may be inf)
        gap = (zt - new_shift_t[:, None]) - (zs - new_shift_s[:, None])
        w += tl.sum(tl.where(keep & (e_t != 0.0), e_t * gap, 0.0), 1)
        m_s = new_s
        m_t = new_t
        shift_s = new_shift_s
        shift_t = new_shift_t
    log_l_s = tl.log(l_s)
    log_l_t = tl.log(l_t)
    kl = w / l_t - (log_l_t - log_l_s)
    out = (b * A + a) * T + rows
    tl.store(lse_s_ptr + 2 * out, tl.where(row_kept, shift_s, 0.0), mask=row_ok)
    tl.store(lse_s_ptr + 2 * out + 1, tl.where(row_kept, log_l_s, 0.0), mask=row_ok)
    tl.store(lse_t_ptr + 2 * out, tl.where(row_kept, shift_t, 0.0), mask=row_ok)
    tl.store(lse_t_ptr + 2 * out + 1, tl.where(row_kept, log_l_t, 0.0), mask=row_ok)
    tl.store(kl_ptr + out, tl.where(row_kept, kl, 0.0), mask=row_ok)


@triton.jit
def _score_gradients(xs, xt, ks, kt, keep, shift_s, log_l_s, shift_t, log_l_t, kl, g, scale_s, scale_t,
                     PRECISION: tl.constexpr):
    # dzs, dzt of one BLOCK_M × BLOCK_N tile (0 outside keep), the scale factors included
    zs = tl.dot(xs, tl.trans(ks), input_precision=PRECISION) * scale_s
    zt = tl.dot(xt, tl.trans(kt), input_precision=PRECISION) * scale_t
    log_q = (zs - shift_s[:, None]) - log_l_s[:, None]
    log_p = (zt - shift_t[:, None]) - log_l_t[:, None]
    p = tl.where(keep, tl.exp(log_p), 0.0)
    q = tl.where(keep, tl.exp(log_q), 0.0)
    dzs = g[:, None] * (q - p) * scale_s
    # 0 · log 0 = 0 again: no teacher gradient where p = 0
    dzt = tl.where(keep & (p != 0.0), g[:, None] * p * (log_p - log_q - kl[:, None]), 0.0) * scale_t
    return dzs, dzt


@triton.jit
def _row_stats(lse_s_ptr, lse_t_ptr, kl_ptr, grad_ptr, b, a, A, T, rows, row_ok, row_kept, head_share):
    # (shift_s, log l_s, shift_t, log l_t, KL, g) of the rows
    at = (b * A + a) * T + rows
    shift_s = tl.load(lse_s_ptr + 2 * at, mask=row_ok, other=0.0)
    log_l_s = tl.load(lse_s_ptr + 2 * at + 1, mask=row_ok, other=0.0)
    shift_t = tl.load(lse_t_ptr + 2 * at, mask=row_ok, other=0.0)
    log_l_t = tl.load(lse_t_ptr + 2 * at + 1, mask=row_ok, other=0.0)
    kl = tl.load(kl_ptr + at, mask=row_ok, other=0.0)
    g = tl.where(row_kept, tl.load(grad_ptr + b * T + rows, mask=row_ok, other=0.0) * head_share, 0.0)
    return shift_s, log_l_s, shift_t, log_l_t, kl, g


@triton.jit
def _attention_relation_bwd_rows_kernel(
    s_ptr, t_ptr, mask_ptr, lse_s_ptr, lse_t_ptr, kl_ptr,
    grad_ptr,  # [B, T] float32 upstream gradient of each row's head-mean KL
    ds_ptr, dt_ptr,  # [B, T, D_s], [B, T, D_t] float32, contiguous: the row role dZ X
    T, A, width_s, width_t,
    s_stride_b, s_stride_t, s_stride_d, t_stride_b, t_stride_t, t_stride_d,
    scale_s, scale_t, head_share,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b, a, rows = _program_positions(A, BLOCK_M)
    row_ok, row_kept, xs, xt = _position_tiles(
        s_ptr, t_ptr, mask_ptr, b, a, rows, T, width_s, width_t,
        s_stride_b, s_stride_t, s_stride_d, t_stride_b, t_stride_t, t_stride_d, HAS_MASK, BLOCK_DS, BLOCK_DT)
    shift_s, log_l_s, shift_t, log_l_t, kl, g = _row_stats(
        lse_s_ptr, lse_t_ptr, kl_ptr, grad_ptr, b, a, A, T, rows, row_ok, row_kept, head_share)
    acc_s = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_DT], tl.float32)
    for n0 in range(0, _key_end(T, BLOCK_M, CAUSAL), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok, col_kept, ks, kt = _position_tiles(
            s_ptr, t_ptr, mask_ptr, b, a, cols, T, width_s, width_t,
            s_stride_b, s_stride_t, s_stride_d, t_stride_b, t_stride_t, t_stride_d,
            HAS_MASK, BLOCK_DS, BLOCK_DT)
        keep = _pair_mask(row_kept, col_kept, rows, cols, CAUSAL)
        dzs, dzt = _score_gradients(xs, xt, ks, kt, keep, shift_s, log_l_s, shift_t, log_l_t, kl, g,
                                    scale_s, scale_t, PRECISION)
        if STUDENT_GRAD:
            acc_s = tl.dot(dzs, ks, acc_s, input_precision=PRECISION)
        if TEACHER_GRAD:
            acc_t = tl.dot(dzt, kt, acc_t, input_precision=PRECISION)
    if STUDENT_GRAD:
        _store_head_rows(ds_ptr, acc_s, b, a, rows, row_ok, T, A, width_s, BLOCK_DS, False)
    if TEACHER_GRAD:
        _store_head_rows(dt_ptr, acc_t, b, a, rows, row_ok, T, A, width_t, BLOCK_DT, False)


@triton.jit
def _attention_relation_bwd_cols_kernel(
    s_ptr, t_ptr, mask_ptr, lse_s_ptr, lse_t_ptr, kl_ptr, grad_ptr,
    ds_ptr, dt_ptr,  # in: the row role; out: the gradient, (dZ + dZᵀ) X
    T, A, width_s, width_t,
    s_stride_b, s_stride_t, s_stride_d, t_stride_b, t_stride_t, t_stride_d,
    scale_s, scale_t, head_share,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b, a, cols = _program_positions(A, BLOCK_N)
    col_ok, col_kept, ks, kt = _position_tiles(
        s_ptr, t_ptr, mask_ptr, b, a, cols, T, width_s, width_t,
        s_stride_b, s_stride_t, s_stride_d, t_stride_b, t_stride_t, t_stride_d, HAS_MASK, BLOCK_DS, BLOCK_DT)
    acc_s = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    acc_t = tl.zeros([BLOCK_N, BLOCK_DT], tl.float32)
    # with CAUSAL only rows i >= j see key j: start at the row block holding this key block's first key
    row_start = 0
    if CAUSAL:
        row_start = (tl.program_id(1) * BLOCK_N // BLOCK_M) * BLOCK_M
    for m0 in range(row_start, T, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        # _position_tiles' loads, written out: through the helper here, ptxas (triton 3.6, sm_90)
        # spills 4 bytes in the bf16 masked variant, though the PTX instructions are the same
        row_ok = rows < T
        row_kept = _kept(mask_ptr, b, rows, row_ok, T, HAS_MASK)
        xs = _head_rows(s_ptr, b, a, rows, row_ok, s_stride_b, s_stride_t, s_stride_d, width_s, BLOCK_DS)
        xt = _head_rows(t_ptr, b, a, rows, row_ok, t_stride_b, t_stride_t, t_stride_d, width_t, BLOCK_DT)
        shift_s, log_l_s, shift_t, log_l_t, kl, g = _row_stats(
            lse_s_ptr, lse_t_ptr, kl_ptr, grad_ptr, b, a, A, T, rows, row_ok, row_kept, head_share)
        keep = _pair_mask(row_kept, col_kept, rows, cols, CAUSAL)
        dzs, dzt = _score_gradients(xs, xt, ks, kt, keep, shift_s, log_l_s, shift_t, log_l_t, kl, g,
                                    scale_s, scale_t, PRECISION)
        if STUDENT_GRAD:
            acc_s = tl.dot(tl.trans(dzs), xs, acc_s, input_precision=PRECISION)
        if TEACHER_GRAD:
            acc_t = tl.dot(tl.trans(dzt), xt, acc_t, input_precision=PRECISION)
    if STUDENT_GRAD:
        _store_head_rows(ds_ptr, acc_s, b, a, cols, col_ok, T, A, width_s, BLOCK_DS, True)
    if TEACHER_GRAD:
        _store_head_rows(dt_ptr, acc_t, b, a, cols, col_ok, T, A, width_t, BLOCK_DT, True)


def _check_args(student, teacher, heads, mask, temperature) -> None:
    """The checks of the C++ ops, in their words, plus the Triton kernels' own limits."""
    for name, x in (("student_states", student), ("teacher_states", teacher)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor [B, T, D]")
        if x.dtype not in DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16 for the triton backend, "
                             f"got {x.dtype}")
    if teacher.shape[:2] != student.shape[:2]:
        raise ValueError("teacher_states (B, T) must match student_states'")
    if teacher.dtype != student.dtype:
        raise ValueError("teacher_states dtype must match student_states'")
    if teacher.device != student.device:
        raise ValueError("student_states and teacher_states must be on the same device")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"num_relation_heads must be >= 1, got {heads!r}")
    for name, x in (("student_states", student), ("teacher_states", teacher)):
        if x.shape[2] == 0 or x.shape[2] % heads:
            raise ValueError(f"{name} width must be a positive multiple of num_relation_heads")
        if x.shape[2] // heads > MAX_HEAD_WIDTH:
            raise ValueError(f"{name}: a relation head's width {x.shape[2] // heads} exceeds the triton "
                             f"kernel's {MAX_HEAD_WIDTH}; use more num_relation_heads or another backend")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0 and finite, got {temperature}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError("mask must be bool")
        if mask.shape != student.shape[:2]:
            raise ValueError("mask must be [B, T]")
        if mask.device != student.device:
            raise ValueError("student_states and mask must be on the same device")


def _launch_common(student, teacher, heads, mask, temperature):
    batch, length = student.shape[:2]
    width_s, width_t = student.shape[2] // heads, teacher.shape[2] // heads
    mask_arg = (mask.to(torch.int8).contiguous() if mask is not None
                else torch.empty(0, dtype=torch.int8, device=student.device))
    args = (length, heads, width_s, width_t, *student.stride(), *teacher.stride(),
            1.0 / (math.sqrt(width_s) * temperature), 1.0 / (math.sqrt(width_t) * temperature))
    meta = {
        "HAS_MASK": mask is not None, "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N,
        "BLOCK_DS": max(16, triton.next_power_of_2(width_s)),
        "BLOCK_DT": max(16, triton.next_power_of_2(width_t)),
        "PRECISION": "ieee" if student.dtype == torch.float32 else "tf32",
    }
    return batch, length, mask_arg, args, meta


@guard_device
def attention_relation_forward(student, teacher, heads: int, mask, causal: bool, temperature: float):
    """The contract of ``fastkd::attention_relation_forward``.

    Args:
        student: ``(B, T, D_s)``, teacher: ``(B, T, D_t)``; float32 / bfloat16 /
            float16, one dtype, any strides; ``heads`` divides both widths and
            ``D / heads`` ≤ 256.
        mask: ``(B, T)`` bool or None; causal: keys ``j ≤ i`` only.

    Returns:
        ``(rows (B, T), lse_student, lse_teacher (B, A, T, 2), head_kl (B, A, T))``,
        float32; each row's log-sum-exp split as ``(shift, log Σ exp(z − shift))``.
    """
    _check_args(student, teacher, heads, mask, temperature)
    batch, length, mask_arg, args, meta = _launch_common(student, teacher, heads, mask, temperature)
    stats = [torch.zeros(batch, heads, length, *pair, dtype=torch.float32, device=student.device)
             for pair in ((2,), (2,), ())]
    if batch * length > 0:
        _attention_relation_fwd_kernel[(batch * heads, triton.cdiv(length, BLOCK_M))](
            student, teacher, mask_arg, *stats, *args, CAUSAL=causal, num_warps=FORWARD_WARPS, **meta,
        )
    lse_s, lse_t, head_kl = stats
    return head_kl.mean(1), lse_s, lse_t, head_kl


@guard_device
def attention_relation_backward(row_grad, student, teacher, heads: int, mask, causal: bool,
                                temperature: float, lse_student, lse_teacher, head_kl, student_grad: bool,
                                teacher_grad: bool):
    """The contract of ``fastkd::attention_relation_backward``: ``(grad_student, grad_teacher)``
    in the input dtype, ``(0,)``-shaped where not requested."""
    _check_args(student, teacher, heads, mask, temperature)
    batch, length, mask_arg, args, meta = _launch_common(student, teacher, heads, mask, temperature)
    if row_grad.shape != (batch, length):
        raise ValueError("row_grad must be [B, T]")
    for name, x, shape in (("lse_student", lse_student, (batch, heads, length, 2)),
                           ("lse_teacher", lse_teacher, (batch, heads, length, 2)),
                           ("head_kl", head_kl, (batch, heads, length))):
        if x.shape != shape:
            raise ValueError(f"{name} must be [B, A, T{', 2' if len(shape) == 4 else ''}]")
    # an unrequested gradient gets a one-element stand-in: the kernels never
    # touch it, but a launch wants a valid pointer
    grads = [torch.zeros(x.shape if want else (1,), dtype=torch.float32, device=x.device)
             for x, want in ((student, student_grad), (teacher, teacher_grad))]
    if (student_grad or teacher_grad) and batch * length > 0:
        stats = [x.to(torch.float32).contiguous() for x in (lse_student, lse_teacher, head_kl)]
        grad = row_grad.to(torch.float32).contiguous()
        common = (student, teacher, mask_arg, *stats, grad, *grads, *args, 1.0 / heads)
        flags = {**meta, "CAUSAL": causal, "STUDENT_GRAD": student_grad, "TEACHER_GRAD": teacher_grad,
                 "num_warps": BACKWARD_WARPS, "BLOCK_M": BACKWARD_BLOCK, "BLOCK_N": BACKWARD_BLOCK}
        grid = (batch * heads, triton.cdiv(length, BACKWARD_BLOCK))
        _attention_relation_bwd_rows_kernel[grid](*common, **flags)
        _attention_relation_bwd_cols_kernel[grid](*common, **flags)
    return tuple(g.to(x.dtype) if want else x.new_empty((0,))
                 for g, x, want in zip(grads, (student, teacher), (student_grad, teacher_grad), strict=True))
