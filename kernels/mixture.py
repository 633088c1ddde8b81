"""Multi-teacher (mixture) divergence, docs/spec.md §1, in Triton: the ``triton`` backend of
``fastkd.divergence(s, teachers (K, ..., V), teacher_weights=(K,))``.

Same contract as the C++ op ``fastkd::mixture_divergence_forward``
(csrc/fastkd.cpp) and the arithmetic of its CPU kernel's double path
(``mixture_rows`` in csrc/cpu/mixture_kernel.cpp): the target ``p = Σ_k w_k softmax(t_k / T)`` is
formed per row in log space, ``log p = logsumexp_k(log w_k + log_softmax(t_k /
T))``, and fed to the per-element terms of the single-teacher kernel
(``element_terms`` of kernels/_divergence_math.py, i.e. ``element_terms`` of
csrc/common/divergence_math.h). Teachers get no gradient. With hard labels y
the op also computes the student's cross-entropy at temperature 1, CE_i =
log Σ_j exp(s_ij) − s_iy, and adds hard_grad_scale · (softmax(s_i) −
onehot(y_i)) to the student gradient, in the same passes, exactly as
kernels/divergence.py does for one teacher.

Precision: every quantity after the load is float64, for every input dtype,
as on CPU. In float32 ``log p`` carries rounding at its own magnitude
(~log V), re-added by the mixture's log-sum-exp; where the divergence is tiny
(T = 100: ~1e-4) that put the float32 loss 3× further from the float64
reference than PyTorch's own float32 computation, failing docs/spec.md §6's 2× rule
(see the comment in csrc/cpu/mixture_kernel.cpp). fp64 exp / log lower to
libdevice's polynomial (``fma.rn.f64``, no ``ex2.approx``); the 1 / T, the
coefficients and the log-weights are passed as float64 too.

One program per row streams the row in BLOCK-wide chunks, the K teachers of a
chunk as one ``[TEACHER_BLOCK, BLOCK]`` tile (groups of TEACHER_BLOCK
teachers when K is larger):

  pass 1  student max (and its first index), Σ exp((s − max)/T), online
          (with labels at T ≠ 1 also Σ exp(s − max), the max being the
          same at every T; then CE = max − s_y + log Σ exp(s − max));
          per teacher max_k and Σ exp((t_k − max_k)/T), online; the teachers'
          (max_k, log w_k − log Σ_k) go to a [N, 2, K] float64 scratch      read s, t
  pass 2  log p = logsumexp_k((t_k − max_k)/T + log w_k − log Σ_k), then the
          loss and Σu; KL writes its gradient (q − p)·grad_scale/T here
          (Σu = −Σp = −1)                                                    read s, t
  pass 3  gradient (u − q Σu)·grad_scale/T (every kind but KL)   read s, t; write grad

The CE gradient term is added in float64 in the store that writes the
gradient (pass 2 for KL, pass 3 otherwise), before the rounding to the input
dtype. At T = 1 exactly (the launcher's CE_SHARES_NORMALISER) the CE reuses
the student's normaliser and q = softmax(s): no exp at all; at T ≠ 1 one
float64 exp per element in pass 1 and one more in the gradient pass (against
the K + 2 exps and the log per element the divergence costs there). A kept
row whose label is not in [0, V) gets CE NaN and a NaN gradient row; s_y is
loaded at a clamped index, so nothing outside the row is read.

Memory traffic floor, b bytes per logit: read (K + 1)·N·V·b, write N·V·b of
gradient, 4·N (8·N) bytes of loss; the 16·N·K bytes of scratch are written
once and read back from cache. The CE adds no read of the row: 8·N bytes of
labels, N values s_y, 4·N (8·N) bytes of row CE. Passes 2 and 3 re-read the row from L2 while
the rows resident at once ((K + 1)·V·b bytes each) fit in it.

Arithmetic, the real bound: pass 1 costs K + 1 float64 exponentials per
element, pass 2 K + 2 and a log (pass 3 repeats pass 2). At ~20 fp64
instructions per libdevice exp / log, KL with K = 3 needs ~200 fp64 operations
per element against 18 bytes (fp32) or 10 bytes (bf16) of traffic: on an
H100 / H200 (34 TFLOPS fp64 without tensor cores, 3.4–4.8 TB/s) an estimated
1.5–3× above the memory floor, more for the kinds with a gradient pass (not
measured yet: no GPU here). That is the price of the float64 accuracy; there
is still no (N, V) intermediate and one kernel launch.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernel runs
on CPU tensors, which is how the tests check it without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastkd import _validate
from fastkd._enums import DivergenceKind

from ._common import (
    DEVICE_TYPE,
    ELEMENTS_PER_THREAD,
    KL,
    REVERSE_KL,
    check_device,
    guard_device,
    max_nan,
    online_max_sum_exp,
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
    rescaled_sum_exp,
    store_grad,
    zero_grad_row,
)

__all__ = ["mixture_divergence_forward"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Teachers held in one tile; more are processed in groups of this many (with
# an online log-sum-exp across groups).
MAX_TEACHER_BLOCK = 8
# Elements of one [TEACHER_BLOCK, BLOCK] tile, 8 per thread: float64 doubles
# the registers of the float32 single-teacher kernel, so half its 4096.
# ptxas (sm_90) reports 78–122 registers with K = 3, up to 164 with teacher
# groups (K > 8), and no spills.
MAX_TILE = 2048
# The interpreter pays per operation, not per element: 4× wider chunks there
# (V > 2048 still takes several, so the online passes are exercised).
INTERPRETER_MAX_TILE = 8192
# How far the weights' sum may be from 1 (as the CPU op and fastkd/mixture.py).
WEIGHT_SUM_TOLERANCE = 1e-6


@triton.jit
def _teacher_tile(t_row, stride_tk, teachers, offs, valid, K):
    # [TEACHER_BLOCK, BLOCK] float64 logits of `teachers` at `offs`; −inf where
    # a teacher index is ≥ K or a lane is not `valid`
    ptrs = t_row + teachers.to(tl.int64)[:, None] * stride_tk + offs[None, :]
    ok = (teachers < K)[:, None] & valid[None, :]
    return tl.load(ptrs, mask=ok, other=float("-inf")).to(tl.float64)


@triton.jit
def _log_mixture(
    t_row, stride_tk, stats_row, K, offs, valid, inv_temperature,
    TEACHER_BLOCK: tl.constexpr, SINGLE_GROUP: tl.constexpr,
):
    """[BLOCK] log p = logsumexp_k((t_k − max_k)/T + off_k), off_k = log w_k − log Σ_k.

    −inf where every teacher's term is −inf (no mass, or a weight-0 teacher,
    or an invalid lane); a NaN term (also in a weight-0 teacher: NaN − inf is
    NaN) makes it NaN.
    """
    kk = tl.arange(0, TEACHER_BLOCK)
    if SINGLE_GROUP:
        m = tl.load(stats_row + kk, mask=kk < K, other=0.0)
        off = tl.load(stats_row + K + kk, mask=kk < K, other=float("-inf"))
        t = _teacher_tile(t_row, stride_tk, kk, offs, valid, K)
        a = (t - m[:, None]) * inv_temperature + off[:, None]
        top = tl.max(a, 0)
        shift = tl.where(top == float("-inf"), 0.0, top)
        log_p = shift + tl.log(tl.sum(tl.exp(a - shift[None, :]), 0))
    else:
        # online log-sum-exp over the groups of TEACHER_BLOCK teachers
        top = tl.full(offs.shape, float("-inf"), tl.float64)
        total = tl.zeros(offs.shape, tl.float64)
        for first in range(0, K, TEACHER_BLOCK):
            ks = first + kk
            m = tl.load(stats_row + ks, mask=ks < K, other=0.0)
            off = tl.load(stats_row + K + ks, mask=ks < K, other=float("-inf"))
            t = _teacher_tile(t_row, stride_tk, ks, offs, valid, K)
            a = (t - m[:, None]) * inv_temperature + off[:, None]
            new_top = max_nan(top, tl.max(a, 0))
            shift = tl.where(new_top == float("-inf"), 0.0, new_top)
            total = total * tl.exp(top - shift) + tl.sum(tl.exp(a - shift[None, :]), 0)
            top = new_top
        shift = tl.where(top == float("-inf"), 0.0, top)
        log_p = shift + tl.log(total)
    return log_p


@triton.jit
def _load_student(s_row, offs, V):
    # one chunk of the student row in float64; lanes past V load −inf (p = q
    # = 0 there, every term is 0 by the xlogy rule, and so is softmax(s))
    return tl.load(s_row + offs, mask=offs < V, other=float("-inf")).to(tl.float64)


@triton.jit
def _terms_at(
    s, t_row, stride_tk, stats_row, K, offs, V,
    m_s, log_sum_s, inv_sum_s, log_p_mode,
    inv_temperature, c, one_minus_c, log_c, log_one_minus_c,
    KIND: tl.constexpr, TEACHER_BLOCK: tl.constexpr, SINGLE_GROUP: tl.constexpr,
):
    # The chunk's element terms (terms_at of csrc/cpu/mixture_kernel.cpp), in
    # float64, for the student chunk s from _load_student.
    valid = offs < V
    a_s = (s - m_s) * inv_temperature
    log_p = _log_mixture(
        t_row, stride_tk, stats_row, K, offs, valid, inv_temperature, TEACHER_BLOCK, SINGLE_GROUP
    )
    # log(q/p) minus its value at the student's mode (where a_s = 0): the
    # shift REVERSE_KL's u reads (divergence_math.h); log Σ_s cancels exactly
    ratio_q = a_s - (log_p - log_p_mode)
    # log(q/p), in float64 here, so the plain difference of the two logs
    log_ratio = (a_s - log_sum_s) - log_p
    return element_terms(
        tl.exp(log_p), tl.exp(a_s) * inv_sum_s, log_ratio, ratio_q, 0.0,
        c, one_minus_c, log_c, log_one_minus_c, KIND,
    )


@triton.jit
def _mixture_fwd_kernel(
    s_ptr,  # [N, V] student logits, row stride stride_s, unit stride along V
    t_ptr,  # [K, N, V] teacher logits, strides (stride_tk, stride_tn, 1); any outer strides (0: expanded)
    log_w_ptr,  # [K] float64 log w_k (−inf for weight 0)
    stats_ptr,  # [N, 2, K] float64 scratch: per teacher max_k, then log w_k − log Σ_k
    mask_ptr,  # [N] bool, False → row excluded (None when HAS_MASK is False)
    labels_ptr,  # [N] int64 hard labels (None unless HAS_LABELS)
    loss_ptr,  # [N] float32 (float64 for float64 inputs) row losses ℓ_i
    ce_ptr,  # [N] like loss_ptr: log Σ_j exp(s_ij) − s_iy (None unless HAS_LABELS)
    g_ptr,  # [N, V] contiguous grad_scale · dℓ_i/ds (+ the CE term) (None unless STUDENT_GRAD)
    stride_s,
    stride_tk,
    stride_tn,
    K,
    V,
    inv_temperature: tl.float64,  # 1 / T
    grad_factor: tl.float64,  # grad_scale / T
    hard_grad_scale: tl.float64,  # factor of the CE gradient (unused unless HAS_LABELS)
    c: tl.float64,  # β (JSD) or α (skew); unused by the other kinds
    one_minus_c: tl.float64,
    log_c: tl.float64,
    log_one_minus_c: tl.float64,  # −inf for α = 1
    KIND: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    CE_SHARES_NORMALISER: tl.constexpr,  # inv_temperature == 1: the CE's lse and softmax are the student's
    STUDENT_GRAD: tl.constexpr,
    SINGLE_GROUP: tl.constexpr,  # K <= TEACHER_BLOCK
    TEACHER_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    # KL: Σu = −Σp = −1 is known in advance (the launcher normalises the
    # weights), so the gradient is written in pass 2 and pass 3 is skipped.
    FUSED_KL_GRAD: tl.constexpr = KIND == KL and STUDENT_GRAD
    # REVERSE_KL's u reads log(q/p) shifted by its value at the student's mode.
    NEED_MODE: tl.constexpr = KIND == REVERSE_KL and STUDENT_GRAD
    # The CE's own Σ exp(s − max) at temperature 1 (pass 1)
    CE_OWN_SUM: tl.constexpr = HAS_LABELS and not CE_SHARES_NORMALISER

    if HAS_MASK:
        if tl.load(mask_ptr + row) == 0:
            excluded_row_loss(loss_ptr, ce_ptr, row, HAS_LABELS)
            if STUDENT_GRAD:
                zero_grad_row(g_ptr, row, V, cols, BLOCK)
            return

    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_tn
    stats_row = stats_ptr + row * 2 * K

    # pass 1, student: max, the first index holding it, log Σ exp((s − max)/T)
    # (and with labels at T ≠ 1 Σ exp(s − max), sharing the running max).
    # An all −inf (or NaN) row has a NaN loss: it has no distribution.
    m_s = tl.full([], float("-inf"), tl.float64)
    d_s = tl.zeros([], tl.float64)
    d_ce = tl.zeros([], tl.float64)
    s_at = V
    for start in range(0, V, BLOCK):
        offs = start + cols
        s = _load_student(s_row, offs, V)
        if NEED_MODE:
            chunk_max = tl.max(s, 0)
            s_at = tl.where(chunk_max > m_s, tl.min(tl.where(s == chunk_max, offs, V), 0), s_at)
        m_prev = m_s
        m_s, d_s = online_max_sum_exp(m_s, d_s, s, inv_temperature, 0)
        if CE_OWN_SUM:
            d_ce = rescaled_sum_exp(d_ce, m_prev, m_s, s)
    log_sum_s = tl.log(d_s)
    inv_sum_s = 1.0 / d_s

    # CE = log Σ exp(s) − s_y = (max − s_y) + log Σ exp(s − max), in float64.
    # s_y is one load, at an index clamped into the row so that a label
    # outside [0, V) reads nothing out of bounds; such a row's CE (and its
    # gradient) is NaN.
    label = 0
    label_ok = False
    log_d_ce = tl.zeros([], tl.float64)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        label_ok = (label >= 0) & (label < V)
        at = tl.where(label_ok, label, 0)
        s_label = tl.load(s_row + at, mask=at < V, other=0.0).to(tl.float64)
        if CE_SHARES_NORMALISER:
            log_d_ce = log_sum_s
        else:
            log_d_ce = tl.log(d_ce)
        ce = m_s - s_label + log_d_ce
        tl.store(ce_ptr + row, tl.where(label_ok, ce, float("nan")).to(ce_ptr.dtype.element_ty))

    # pass 1, teachers: max_k and Σ_k = Σ exp((t_k − max_k)/T) per teacher, a
    # group of TEACHER_BLOCK teachers per sweep. A weight-0 teacher is still
    # read: its offset is −inf, so it adds nothing but NaN (docs/spec.md §6).
    kk = tl.arange(0, TEACHER_BLOCK)
    for first in range(0, K, TEACHER_BLOCK):
        ks = first + kk
        m_t = tl.full([TEACHER_BLOCK], float("-inf"), tl.float64)
        d_t = tl.zeros([TEACHER_BLOCK], tl.float64)
        for start in range(0, V, BLOCK):
            offs = start + cols
            t = _teacher_tile(t_row, stride_tk, ks, offs, offs < V, K)
            m_t, d_t = online_max_sum_exp(m_t, d_t, t, inv_temperature, 1)
        log_w = tl.load(log_w_ptr + ks, mask=ks < K, other=float("-inf"))
        tl.store(stats_row + ks, m_t, mask=ks < K)
        tl.store(stats_row + K + ks, log_w - tl.log(d_t), mask=ks < K)
    # the scratch written above is read back by other threads of the program
    tl.debug_barrier()

    log_p_mode = tl.zeros([], tl.float64)
    if NEED_MODE:
        # log p at the student's mode; index 0 for a row without a maximum
        # (NaN: its loss is NaN anyway), as on CPU. Lane 0 only.
        s_at = tl.where(s_at < V, s_at, 0)
        lane0 = cols == 0
        at_mode = _log_mixture(
            t_row, stride_tk, stats_row, K, s_at + cols * 0, lane0 & (s_at < V), inv_temperature,
            TEACHER_BLOCK, SINGLE_GROUP,
        )
        log_p_mode = tl.sum(tl.where(lane0, at_mode, 0.0), 0)

    # pass 2: ℓ = Σ_j loss_j and Σu
    loss_acc = tl.zeros([BLOCK], tl.float64)
    u_acc = tl.zeros([BLOCK], tl.float64)
    for start in range(0, V, BLOCK):
        offs = start + cols
        s = _load_student(s_row, offs, V)
        loss, u, v, p, q = _terms_at(
            s, t_row, stride_tk, stats_row, K, offs, V, m_s, log_sum_s, inv_sum_s, log_p_mode,
            inv_temperature, c, one_minus_c, log_c, log_one_minus_c, KIND, TEACHER_BLOCK, SINGLE_GROUP,
        )
        loss_acc += loss
        if FUSED_KL_GRAD:
            # dKL/ds = (q − p) / T, plus the CE term in the same store
            grad = grad_factor * (q - p)
            if HAS_LABELS:
                grad += ce_grad(
                    s, q, offs, m_s, log_d_ce, label, label_ok, hard_grad_scale, CE_SHARES_NORMALISER
                )
            store_grad(g_ptr, row, V, offs, grad)
        elif STUDENT_GRAD:
            u_acc += u
    # a divergence is never negative (rounding of a tiny one); NaN stays NaN
    row_loss = tl.sum(loss_acc, 0)
    tl.store(loss_ptr + row, tl.where(row_loss < 0.0, 0.0, row_loss).to(loss_ptr.dtype.element_ty))

    # pass 3: dℓ/ds_j = (u_j − q_j Σu) / T, times grad_scale (+ the CE term)
    if STUDENT_GRAD and not FUSED_KL_GRAD:
        sum_u = tl.sum(u_acc, 0)
        for start in range(0, V, BLOCK):
            offs = start + cols
            s = _load_student(s_row, offs, V)
            loss, u, v, p, q = _terms_at(
                s, t_row, stride_tk, stats_row, K, offs, V, m_s, log_sum_s, inv_sum_s, log_p_mode,
                inv_temperature, c, one_minus_c, log_c, log_one_minus_c, KIND, TEACHER_BLOCK, SINGLE_GROUP,
            )
            grad = grad_factor * (u - q * sum_u)
            if HAS_LABELS:
                grad += ce_grad(
                    s, q, offs, m_s, log_d_ce, label, label_ok, hard_grad_scale, CE_SHARES_NORMALISER
                )
            store_grad(g_ptr, row, V, offs, grad)


def launch_config(vocab: int, teachers: int) -> tuple[int, int, int]:
    """(TEACHER_BLOCK, BLOCK, num_warps) for rows of ``vocab`` logits and ``teachers`` teachers."""
    teacher_block = min(triton.next_power_of_2(max(teachers, 1)), MAX_TEACHER_BLOCK)
    tile = MAX_TILE if DEVICE_TYPE == "cuda" else INTERPRETER_MAX_TILE
    block = min(triton.next_power_of_2(max(vocab, 1)), tile // teacher_block)
    num_warps = max(1, min(8, teacher_block * block // (32 * ELEMENTS_PER_THREAD)))
    return teacher_block, block, num_warps


def _check_args(student, teachers, teacher_weights, row_mask, kind, inv_temperature, coef, grad_scale):
    """The checks of csrc/cpu/mixture.cpp as ValueError; the (K,) float64 weights on
    the CPU where their values are checked on the host, else None."""
    for name, x, dim in (("student", student, 2), ("teachers", teachers, 3)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != dim:
            raise ValueError(f"{name} must be {dim}-D, got shape {tuple(x.shape)}")
        if x.dtype not in DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
        check_device(name, x)
        if x.shape[-1] > 1 and x.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along V, got strides {x.stride()}")
    rows, vocab = student.shape
    if vocab == 0:
        raise ValueError("student must have at least one column (vocabulary entry)")
    # The student and the teachers are only read, so any outer strides are
    # fine (a permuted stack, one teacher expanded over K or a row expanded
    # over N with stride 0).
    if teachers.shape[1:] != student.shape:
        raise ValueError(f"teachers {tuple(teachers.shape)} must be (K, {rows}, {vocab})")
    if teachers.shape[0] < 1:
        raise ValueError("teachers must hold at least one teacher (K >= 1)")
    if teachers.dtype != student.dtype:
        raise ValueError(f"student and teachers must have the same dtype ({student.dtype}, {teachers.dtype})")
    if teachers.device != student.device:
        raise ValueError(f"student ({student.device}) and teachers ({teachers.device}) must share a device")
    if not isinstance(teacher_weights, torch.Tensor) or teacher_weights.dtype != torch.float64:
        raise ValueError("teacher_weights must be a float64 tensor")
    if teacher_weights.shape != teachers.shape[:1]:
        raise ValueError(
            f"teacher_weights must have one entry per teacher, shape ({teachers.shape[0]},), "
            f"got {tuple(teacher_weights.shape)}"
        )
    host_weights = _host_checked_weights(teacher_weights)
    check_row_mask(row_mask, student)
    if not isinstance(kind, int) or isinstance(kind, bool) or kind not in tuple(DivergenceKind):
        raise ValueError(f"kind must be an int in [0, 6), got {kind!r}")
    check_scalars(kind, inv_temperature, coef, grad_scale)
    return host_weights


def _host_checked_weights(teacher_weights: torch.Tensor) -> torch.Tensor | None:
    """The ``(K,)`` weights on the CPU, checked there (``ValueError``, as
    csrc/cpu/mixture.cpp), where ``fastkd._validate.values_checked_on_host``
    holds for them; None where their values are not to be read on the host
    (GPU weights: :func:`_log_weights` guards them on the device)."""
    if not _validate.values_checked_on_host(teacher_weights):
        return None
    weights = teacher_weights.detach().cpu()
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError(f"teacher_weights must be finite and >= 0, got {weights.tolist()}")
    total = float(weights.sum())
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise ValueError(f"teacher_weights must sum to 1, got {total}")
    return weights


def _log_weights(teacher_weights: torch.Tensor, host_weights: torch.Tensor | None,
                 device: torch.device) -> torch.Tensor:
    """``(K,)`` float64 ``log w_k − log Σw`` on ``device`` (``−inf`` for a weight 0).

    The mixture then sums to 1 exactly (as the reference's softmax of
    ``T·log p`` does), which the fused KL gradient relies on. From
    ``host_weights`` (checked on the host) they are copied to a GPU from
    pinned memory, without waiting. Without them the weights are never read
    on the host: invalid ones (not finite, negative, or not summing to 1
    within ``WEIGHT_SUM_TOLERANCE``) make every log weight NaN, and with it
    the kernel's log p, the loss and the gradient (docs/spec.md §6).
    """
    if host_weights is not None:
        log_w = host_weights.log() - host_weights.sum().log()
        if device.type == "cuda":
            log_w = log_w.pin_memory().to(device, non_blocking=True)
        return log_w
    weights = teacher_weights.detach().to(device, non_blocking=True)
    total = weights.sum()
    valid = (
        torch.isfinite(weights).all() & (weights >= 0).all()
        & ((total - 1.0).abs() <= WEIGHT_SUM_TOLERANCE)
    )
    return torch.where(valid, weights.log() - total.log(), torch.nan)


@guard_device
def mixture_divergence_forward(
    student: torch.Tensor,
    teachers: torch.Tensor,
    teacher_weights: torch.Tensor,
    row_mask: torch.Tensor | None,
    kind: int,
    inv_temperature: float,
    coef: float,
    grad_scale: float,
    student_grad: bool,
    labels: torch.Tensor | None = None,
    hard_grad_scale: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row divergences to the teachers' mixture, the scaled student gradient and
    optionally the student's hard-label CE; the contract of
    ``fastkd::mixture_divergence_forward``.

    Args:
        student: ``(N, V)`` logits, float32 / bfloat16 / float16 / float64,
            unit stride along V, any row stride.
        teachers: ``(K, N, V)``, same dtype and device, unit stride along V,
            any other strides (e.g. one teacher expanded over K).
        teacher_weights: ``(K,)`` float64 (any device), finite, >= 0, summing
            to 1 within 1e-6 (they are renormalised to sum to exactly 1).
            Where ``fastkd._validate.values_checked_on_host`` holds for them
            (CPU weights) bad values raise ValueError; GPU weights are not
            read on the host, and bad values give every row a NaN loss and
            a NaN gradient (docs/spec.md §6).
        row_mask: ``(N,)`` bool or None; False rows get loss 0, CE 0 and a zero gradient.
        kind: divergence code (csrc/common/divergence_math.h): 0 kl,
            1 reverse_kl, 2 jsd, 3 skew_kl, 4 skew_reverse_kl, 5 tvd.
        inv_temperature: ``1 / T``.
        coef: β in (0, 1) for JSD, α in (0, 1] for the skew divergences.
        grad_scale: factor applied to the gradient (not to the loss).
        student_grad: whether to compute the gradient.
        labels: ``(N,)`` int64 on the student's device, or None: the student's
            hard-label cross-entropy at temperature 1 is computed in the same
            pass. Kept rows' labels must lie in ``[0, V)`` (ValueError otherwise).
        hard_grad_scale: factor of the CE gradient, 0 without labels.

    Returns:
        ``row_loss`` ``(N,)`` float32 (float64 for float64 inputs), the
        unscaled ``ℓ_i``; ``grad``: ``(N, V)`` contiguous in the input dtype,
        ``grad_scale · dℓ_i/ds`` (+ ``hard_grad_scale · (softmax(s_i) −
        onehot(y_i))`` with labels), or ``(0, 0)`` when not requested;
        ``row_ce`` ``(N,)`` like ``row_loss``, ``log Σ_j exp(s_ij) − s_iy_i``
        (0 for excluded rows), or ``(0,)`` without labels.
    """
    host_weights = _check_args(
        student, teachers, teacher_weights, row_mask, kind, inv_temperature, coef, grad_scale
    )
    check_labels(labels, hard_grad_scale, student)
    rows, vocab = student.shape
    check_kept_label_range(labels, row_mask, vocab)
    count = teachers.shape[0]
    device = student.device
    has_labels = labels is not None
    loss_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    row_loss = torch.empty(rows, dtype=loss_dtype, device=device)
    row_ce = torch.empty(rows if has_labels else 0, dtype=loss_dtype, device=device)
    grad_dtype = stored_dtype(student.dtype)
    grad = student.new_empty((rows, vocab) if student_grad else (0, 0), dtype=grad_dtype)
    if rows == 0:
        return row_loss, grad.to(student.dtype), row_ce
    log_w = _log_weights(teacher_weights, host_weights, device)
    stats = torch.empty((rows, 2, count), dtype=torch.float64, device=device)
    teacher_block, block, num_warps = launch_config(vocab, count)
    _mixture_fwd_kernel[(rows,)](
        student, teachers, log_w, stats, None if row_mask is None else row_mask.contiguous(),
        labels.contiguous() if has_labels else None, row_loss, row_ce if has_labels else None,
        grad if student_grad else None,
        student.stride(0), teachers.stride(0), teachers.stride(1), count, vocab,
        float(inv_temperature), float(grad_scale * inv_temperature), float(hard_grad_scale),
        *coefficient_terms(kind, coef),
        KIND=kind, HAS_MASK=row_mask is not None, HAS_LABELS=has_labels,
        # at T = 1 exactly the CE's log Σ exp and softmax are the student's own
        CE_SHARES_NORMALISER=has_labels and float(inv_temperature) == 1.0,
        STUDENT_GRAD=bool(student_grad), SINGLE_GROUP=count <= teacher_block, TEACHER_BLOCK=teacher_block,
        BLOCK=block, num_warps=num_warps,
    )
    return row_loss, grad.to(student.dtype), row_ce
