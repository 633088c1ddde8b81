"""Fused softmax divergences (SPEC §1) in Triton, the ``triton`` backend of ``fastkd.divergence``.

Same contract as the C++ op ``fastkd::divergence_forward`` (csrc/fastkd.cpp) and
the same arithmetic as ``csrc/common/divergence_math.h``, whose comment derives
the gradients. One program per row streams the row in BLOCK-wide chunks:

  pass 1  online max and Σ exp of s/T and t/T → log-sum-exp      read s, t
  pass 2  loss, Σu, Σv; KL with only the student gradient also
          writes it, (q − p)/T, since Σu = −Σp = −1               read s, t
  pass 3  gradients (u − q Σu)/T and (v − p Σv)/T                 read s, t; write gradients

Memory traffic, b bytes per logit: 2·N·V·b read from HBM in pass 1; passes 2
and 3 read the same row again (fp32 at V = 128256 is 500 KiB per row, so the
rows in flight mostly stay in L2); N·V·b written per requested gradient, 4·N
for the row losses. Floor: 2·N·V·b + N·V·b per gradient.

Everything is accumulated in float32; bf16 / fp16 logits are widened as they
are loaded and the gradients rounded to the input dtype as they are stored.
Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernel runs
on CPU tensors, which is how the tests check it without a GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

__all__ = ["divergence_forward"]

# fastkd::divergence::Kind (csrc/common/divergence_math.h).
KL, REVERSE_KL, JSD, SKEW_KL, SKEW_REVERSE_KL, TVD = range(6)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Widest chunk of a row one loop iteration holds. 8 elements per thread keeps
# the ~15 live BLOCK-wide fp32 values of pass 2 in registers; the interpreter
# pays milliseconds per iteration, so it wants wide chunks as well.
MAX_BLOCK = 4096
_ELEMENTS_PER_THREAD = 8


@triton.jit
def _zero_where_zero(gate, value):
    # The xlogy rule: gate == 0 → 0 (even where value is NaN); a NaN gate keeps the value.
    return tl.where(gate == 0.0, 0.0, value)


@triton.jit
def _max_nan(a, b):
    # max that propagates NaN from either side
    return tl.where((a != a) | (a > b), a, b)


@triton.jit
def _min_nan(a, b):
    return tl.where((a != a) | (a < b), a, b)


@triton.jit
def _log1p(x):
    # log(1 + x) = log(u) · x / (u − 1) with u = fl(1 + x) (Goldberg 1991,
    # Theorem 4): the ratio cancels the rounding of 1 + x; libdevice's log1p
    # is off limits (the interpreter has no libdevice).
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _logaddexp(a, b):
    # log(e^a + e^b) = hi + log1p(e^(lo − hi)); −inf when both are −inf (no NaN)
    hi = _max_nan(a, b)
    lo = _min_nan(a, b)
    return tl.where(hi == float("-inf"), float("-inf"), hi + _log1p(tl.exp(lo - hi)))


@triton.jit
def _half_sign(d):
    # ½ sign(d) with sign(0) = 0 (torch.abs's subgradient)
    return tl.where(d > 0.0, 0.5, tl.where(d < 0.0, -0.5, 0.0))


@triton.jit
def _element_terms(logp, logq, c, one_minus_c, log_c, log_one_minus_c, KIND: tl.constexpr):
    """Per-element (loss, u, v, p, q) of divergence KIND: element_terms() of divergence_math.h.

    u = q ∂L/∂q and v = p ∂L/∂p, less the terms proportional to q (p) that
    cancel in the softmax Jacobian; c is β (JSD) or α (skew).
    """
    p = tl.exp(logp)
    q = tl.exp(logq)
    if KIND == 0:
        # KL(p‖q) = Σ p (log p − log q);  u = −p,  v = p (log p − log q)
        loss = _zero_where_zero(p, p * (logp - logq))
        u = -p
        v = loss
    elif KIND == 1:
        # KL(q‖p) = Σ q (log q − log p);  u = q (log q − log p),  v = −q
        loss = _zero_where_zero(q, q * (logq - logp))
        u = loss
        v = -q
    elif KIND == 2:
        # m = β p + (1−β) q in log space;  L = β KL(p‖m) + (1−β) KL(q‖m)
        # u = (1−β) q (log q − log m),  v = β p (log p − log m)
        logm = _logaddexp(log_c + logp, log_one_minus_c + logq)
        u = one_minus_c * _zero_where_zero(q, q * (logq - logm))
        v = c * _zero_where_zero(p, p * (logp - logm))
        loss = v + u
    elif KIND == 3:
        # m = α p + (1−α) q;  L = KL(p‖m)
        # u = −(1−α) q p / m,  v = p (log p − log m) − α p² / m
        logm = _logaddexp(log_c + logp, log_one_minus_c + logq)
        loss = _zero_where_zero(p, p * (logp - logm))
        u = -one_minus_c * _zero_where_zero(p, tl.exp(logp + logq - logm))
        v = loss - c * _zero_where_zero(p, tl.exp(logp + logp - logm))
    elif KIND == 4:
        # m = α q + (1−α) p;  L = KL(q‖m)  (KIND 3 with the roles swapped)
        logm = _logaddexp(log_c + logq, log_one_minus_c + logp)
        loss = _zero_where_zero(q, q * (logq - logm))
        u = loss - c * _zero_where_zero(q, tl.exp(logq + logq - logm))
        v = -one_minus_c * _zero_where_zero(q, tl.exp(logp + logq - logm))
    else:
        tl.static_assert(KIND == 5, "unknown divergence kind")
        # TVD = ½ Σ |p − q|;  u = q · ½ sign(q − p),  v = −p · ½ sign(q − p)
        d = q - p
        hs = _half_sign(d)
        loss = 0.5 * tl.abs(d)
        u = q * hs
        v = -p * hs
    return loss, u, v, p, q


@triton.jit
def _softmax_grad(term, prob, term_sum, factor):
    # dL/dx_j = (term_j − prob_j Σ term) / T, times grad_scale (factor = grad_scale / T)
    return factor * (term - prob * term_sum)


@triton.jit
def _online_lse_step(m, d, x):
    # Running max m and Σ exp(x − m) after the chunk x. While the row has been
    # all −inf the shift is 0, so no −inf − (−inf) appears; a NaN reaches d.
    m_new = _max_nan(m, tl.max(x, 0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = d * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), 0)
    return m_new, d


@triton.jit
def _divergence_fwd_kernel(
    s_ptr,  # [N, V] student logits, row stride stride_s, unit stride along V
    t_ptr,  # [N, V] teacher logits, row stride stride_t, unit stride along V
    mask_ptr,  # [N] bool, False → row excluded (None when HAS_MASK is False)
    loss_ptr,  # [N] float32 row losses ℓ_i
    gs_ptr,  # [N, V] contiguous grad_scale · dℓ_i/ds (None unless STUDENT_GRAD)
    gt_ptr,  # [N, V] contiguous grad_scale · dℓ_i/dt (None unless TEACHER_GRAD)
    stride_s,
    stride_t,
    V,
    inv_temperature,  # 1 / T
    grad_factor,  # grad_scale / T
    c,  # β (JSD) or α (skew); unused by the other kinds
    one_minus_c,
    log_c,
    log_one_minus_c,  # may be −inf (α = 1)
    KIND: tl.constexpr,
    HAS_MASK: tl.constexpr,
    STUDENT_GRAD: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    NEG_INF: tl.constexpr = float("-inf")
    FUSED_KL_GRAD: tl.constexpr = KIND == 0 and STUDENT_GRAD and not TEACHER_GRAD

    if HAS_MASK:
        if tl.load(mask_ptr + row) == 0:
            tl.store(loss_ptr + row, 0.0)
            for start in range(0, V, BLOCK):
                offs = start + cols
                if STUDENT_GRAD:
                    tl.store(gs_ptr + row * V + offs, tl.zeros([BLOCK], gs_ptr.dtype.element_ty), mask=offs < V)
                if TEACHER_GRAD:
                    tl.store(gt_ptr + row * V + offs, tl.zeros([BLOCK], gt_ptr.dtype.element_ty), mask=offs < V)
            return

    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t

    # log Σ_j exp(x_j / T), online: an all −inf row gives lse = −inf, hence
    # NaN log-probabilities and a NaN loss (such a row has no distribution).
    m_s = NEG_INF
    d_s = 0.0
    m_t = NEG_INF
    d_t = 0.0
    for start in range(0, V, BLOCK):
        offs = start + cols
        xs = tl.load(s_row + offs, mask=offs < V, other=NEG_INF).to(tl.float32) * inv_temperature
        xt = tl.load(t_row + offs, mask=offs < V, other=NEG_INF).to(tl.float32) * inv_temperature
        m_s, d_s = _online_lse_step(m_s, d_s, xs)
        m_t, d_t = _online_lse_step(m_t, d_t, xt)
    lse_s = m_s + tl.log(d_s)
    lse_t = m_t + tl.log(d_t)

    # ℓ = Σ_j loss_j, Σu, Σv. Lanes past V load −inf in both rows: p = q = 0
    # there, and every term is 0 by the xlogy rule.
    loss_acc = tl.zeros([BLOCK], tl.float32)
    u_acc = tl.zeros([BLOCK], tl.float32)
    v_acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + cols
        logq = tl.load(s_row + offs, mask=offs < V, other=NEG_INF).to(tl.float32) * inv_temperature - lse_s
        logp = tl.load(t_row + offs, mask=offs < V, other=NEG_INF).to(tl.float32) * inv_temperature - lse_t
        loss, u, v, p, q = _element_terms(logp, logq, c, one_minus_c, log_c, log_one_minus_c, KIND)
        loss_acc += loss
        u_acc += u
        v_acc += v
        if FUSED_KL_GRAD:
            # KL: Σu = −Σp = −1, so dℓ/ds = (q − p) / T is known in this pass
            grad = _softmax_grad(u, q, -1.0, grad_factor)
            tl.store(gs_ptr + row * V + offs, grad.to(gs_ptr.dtype.element_ty), mask=offs < V)
    tl.store(loss_ptr + row, tl.sum(loss_acc, 0))

    if (STUDENT_GRAD or TEACHER_GRAD) and not FUSED_KL_GRAD:
        sum_u = tl.sum(u_acc, 0)
        sum_v = tl.sum(v_acc, 0)
        for start in range(0, V, BLOCK):
            offs = start + cols
            logq = tl.load(s_row + offs, mask=offs < V, other=NEG_INF).to(tl.float32) * inv_temperature - lse_s
            logp = tl.load(t_row + offs, mask=offs < V, other=NEG_INF).to(tl.float32) * inv_temperature - lse_t
            loss, u, v, p, q = _element_terms(logp, logq, c, one_minus_c, log_c, log_one_minus_c, KIND)
            if STUDENT_GRAD:
                # dℓ/ds_j = (u_j − q_j Σu) / T
                grad = _softmax_grad(u, q, sum_u, grad_factor)
                tl.store(gs_ptr + row * V + offs, grad.to(gs_ptr.dtype.element_ty), mask=offs < V)
            if TEACHER_GRAD:
                # dℓ/dt_j = (v_j − p_j Σv) / T
                grad = _softmax_grad(v, p, sum_v, grad_factor)
                tl.store(gt_ptr + row * V + offs, grad.to(gt_ptr.dtype.element_ty), mask=offs < V)


# The kernel runs where triton.jit put it: the interpreter on CPU tensors, or CUDA.
DEVICE_TYPE = "cpu" if isinstance(_divergence_fwd_kernel, InterpretedFunction) else "cuda"


def launch_config(vocab: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of ``vocab`` logits."""
    block = min(triton.next_power_of_2(max(vocab, 1)), MAX_BLOCK)
    return block, max(1, min(16, block // (32 * _ELEMENTS_PER_THREAD)))


def coefficient_terms(kind: int, coef: float) -> tuple[float, float, float, float]:
    """(c, 1 − c, log c, log(1 − c)) for the kernel; only JSD and the skew kinds read them."""
    if kind not in (JSD, SKEW_KL, SKEW_REVERSE_KL):
        return 0.0, 1.0, -math.inf, 0.0
    return coef, 1.0 - coef, math.log(coef), math.log1p(-coef) if coef < 1.0 else -math.inf


def _check_args(student, teacher, row_mask, kind, inv_temperature, coef, grad_scale) -> None:
    """The checks of csrc/common/checks.h, as ValueError, plus the device the kernel runs on."""
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D (N, V), got shape {tuple(x.shape)}")
        if x.dtype not in DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16 for the triton backend, got {x.dtype}")
        if x.device.type != DEVICE_TYPE:
            where = "CPU tensors (TRITON_INTERPRET=1)" if DEVICE_TYPE == "cpu" else "CUDA tensors"
            raise ValueError(f"{name} must be on {DEVICE_TYPE}: this triton kernel takes {where}, got {x.device}")
        if x.shape[1] > 1 and x.stride(1) != 1:
            raise ValueError(f"{name} must have unit stride along V, got strides {x.stride()}")
        if x.shape[0] > 1 and x.stride(0) < x.shape[1]:
            raise ValueError(f"{name} rows must not overlap, got strides {x.stride()} for shape {tuple(x.shape)}")
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the same shape")
    if student.dtype != teacher.dtype:
        raise ValueError(f"student ({student.dtype}) and teacher ({teacher.dtype}) must have the same dtype")
    if student.device != teacher.device:
        raise ValueError(f"student ({student.device}) and teacher ({teacher.device}) must be on the same device")
    if row_mask is not None:
        if not isinstance(row_mask, torch.Tensor) or row_mask.dtype != torch.bool:
            raise ValueError("row_mask must be None or a bool tensor")
        if row_mask.shape != student.shape[:1]:
            raise ValueError(f"row_mask must have shape ({student.shape[0]},), got {tuple(row_mask.shape)}")
        if row_mask.device != student.device:
            raise ValueError(f"row_mask ({row_mask.device}) must be on the device of student ({student.device})")
    if kind not in range(6):
        raise ValueError(f"kind must be in [0, 6), got {kind}")
    if not (math.isfinite(inv_temperature) and inv_temperature > 0):
        raise ValueError(f"inv_temperature must be finite and > 0, got {inv_temperature}")
    if kind == JSD and not 0.0 < coef < 1.0:
        raise ValueError(f"coef (beta) must be in (0, 1) for JSD, got {coef}")
    if kind in (SKEW_KL, SKEW_REVERSE_KL) and not 0.0 < coef <= 1.0:
        raise ValueError(f"coef (alpha) must be in (0, 1] for skew divergences, got {coef}")
    if not math.isfinite(grad_scale):
        raise ValueError(f"grad_scale must be finite, got {grad_scale}")


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row divergences and their scaled gradients; the contract of ``fastkd::divergence_forward``.

    Args:
        student: ``(N, V)`` logits, float32 / bfloat16 / float16, unit stride
            along V, any row stride.
        teacher: ``(N, V)``, same dtype and device.
        row_mask: ``(N,)`` bool or None; False rows get loss 0 and zero gradients.
        kind: divergence code (csrc/common/divergence_math.h): 0 kl,
            1 reverse_kl, 2 jsd, 3 skew_kl, 4 skew_reverse_kl, 5 tvd.
        inv_temperature: ``1 / T``.
        coef: β in (0, 1) for JSD, α in (0, 1] for the skew divergences.
        grad_scale: factor applied to the gradients (not to the loss).
        student_grad, teacher_grad: which gradients to compute.

    Returns:
        ``row_loss`` ``(N,)`` float32, the unscaled ``ℓ_i``; ``grad_s`` and
        ``grad_t``: ``(N, V)`` contiguous in the input dtype, equal to
        ``grad_scale · dℓ_i/d(logits)``, or ``(0, 0)`` when not requested.
    """
    _check_args(student, teacher, row_mask, kind, inv_temperature, coef, grad_scale)
    rows, vocab = student.shape
    row_loss = torch.empty(rows, dtype=torch.float32, device=student.device)
    grad_s = student.new_empty((rows, vocab) if student_grad else (0, 0))
    grad_t = teacher.new_empty((rows, vocab) if teacher_grad else (0, 0))
    if rows == 0:
        return row_loss, grad_s, grad_t
    block, num_warps = launch_config(vocab)
    _divergence_fwd_kernel[(rows,)](
        student, teacher, row_mask, row_loss,
        grad_s if student_grad else None, grad_t if teacher_grad else None,
        student.stride(0), teacher.stride(0), vocab,
        inv_temperature, grad_scale * inv_temperature, *coefficient_terms(kind, coef),
        KIND=kind, HAS_MASK=row_mask is not None, STUDENT_GRAD=student_grad, TEACHER_GRAD=teacher_grad,
        BLOCK=block, num_warps=num_warps,
    )
    return row_loss, grad_s, grad_t
