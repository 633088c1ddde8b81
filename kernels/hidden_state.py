"""Hidden-state distillation (TinyBERT's MSE, DistilBERT's cosine; docs/spec.md §5.4) in
Triton, the ``triton`` backend of ``fastkd.hidden_state_loss``.

Same contract as the C++ op ``fastkd::hidden_state_forward`` (csrc/fastkd.cpp,
csrc/common/hidden_state_op.h): row losses and, if asked for, the student and
teacher gradients times ``grad_scale``, in one call. Per kept row ``i`` of the
(already projected) student ``h`` and the teacher ``g``, both ``(N, D)``:

  mse     ℓ_i = (1/D) Σ_d (h_d − g_d)²,     dℓ/dh = 2 (h − g) / D = −dℓ/dg
  cosine  ℓ_i = 1 − c,  c = h·g / √((h·h + ε)(g·g + ε)),  ε = 1e-12
          (nn.CosineEmbeddingLoss's guard on each squared norm), r = 1 / √(…):
          dℓ/dh = c h / (h·h + ε) − r g,   dℓ/dg = c g / (g·g + ε) − r h

One program per row. Rows of up to ``MAX_BLOCK`` features are held in
registers: each of ``h`` and ``g`` is read once, and the loss and gradients
come from those registers. Wider rows are streamed in ``MAX_BLOCK`` chunks:
MSE still in one pass (its gradient needs no row sum), cosine in two (the
sums, then the gradients, re-reading the row from L2).

Memory traffic floor, b bytes per element: read 2·N·D·b, write N·D·b per
requested gradient and 4·N bytes of row loss. Excluded rows (``row_mask``
false) are not read: loss 0, zero gradients.

Everything is accumulated in float32; bf16 / fp16 states are widened as they
are loaded and the gradients rounded to the input dtype as they are stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastkd._enums import HiddenStateKind

from ._common import (
    DEVICE_TYPE,  # noqa: F401  (re-exported: callers ask a module where its kernels run)
    check_finite,
    check_pair,
    check_tensor,
    guard_device,
    row_launch_config,
    stored_dtype,
)

__all__ = ["hidden_state_forward"]

COSINE = tl.constexpr(int(HiddenStateKind.COSINE))
# nn.CosineEmbeddingLoss's EPSILON (csrc/common/hidden_state_op.h's kCosineEps)
COSINE_EPS = tl.constexpr(1e-12)
# Widest row held in registers (ROW_MAX_BLOCK of kernels/_common.py: 8
# elements per thread at 16 warps).
launch_config = row_launch_config


@triton.jit
def _hidden_state_fwd_kernel(
    h_ptr,  # [N, D] student rows, row stride stride_h, unit stride along D
    g_ptr,  # [N, D] teacher rows, row stride stride_g, unit stride along D
    mask_ptr,  # [N] bool (None unless HAS_MASK)
    loss_ptr,  # [N] float32 row losses
    gh_ptr,  # [N, D] contiguous grad_scale · dℓ_i/dh (None unless STUDENT_GRAD)
    gg_ptr,  # [N, D] contiguous grad_scale · dℓ_i/dg (None unless TEACHER_GRAD)
    stride_h,
    stride_g,
    D,
    grad_scale,
    KIND: tl.constexpr,
    HAS_MASK: tl.constexpr,
    STUDENT_GRAD: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,  # D <= BLOCK: the row stays in registers
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    h_row = h_ptr + row * stride_h
    g_row = g_ptr + row * stride_g
    out_row = row * D  # offset of the row in the contiguous gradients
    dim_f = D * 1.0
    if HAS_MASK:
        kept = tl.load(mask_ptr + row).to(tl.int1)
    else:
        kept = True

    if SINGLE_CHUNK:
        in_row = (cols < D) & kept
        h = tl.load(h_row + cols, mask=in_row, other=0.0).to(tl.float32)
        g = tl.load(g_row + cols, mask=in_row, other=0.0).to(tl.float32)
        if KIND == COSINE:
            dot = tl.sum(h * g, 0)
            norm_h = tl.sum(h * h, 0) + COSINE_EPS
            norm_g = tl.sum(g * g, 0) + COSINE_EPS
            denom = tl.sqrt_rn(norm_h * norm_g)
            cosine = tl.div_rn(dot, denom)
            loss = 1.0 - cosine
            cross = tl.div_rn(grad_scale, denom)
            if STUDENT_GRAD:
                grad_h = tl.div_rn(grad_scale * cosine, norm_h) * h - cross * g
                grad_h = tl.where(kept, grad_h, 0.0)
                tl.store(gh_ptr + out_row + cols, grad_h.to(gh_ptr.dtype.element_ty), mask=cols < D)
            if TEACHER_GRAD:
                grad_g = tl.div_rn(grad_scale * cosine, norm_g) * g - cross * h
                grad_g = tl.where(kept, grad_g, 0.0)
                tl.store(gg_ptr + out_row + cols, grad_g.to(gg_ptr.dtype.element_ty), mask=cols < D)
        else:
            diff = h - g
            loss = tl.div_rn(tl.sum(diff * diff, 0), dim_f)
            step = tl.div_rn(2.0 * grad_scale, dim_f) * diff
            if STUDENT_GRAD:
                grad_h = tl.where(kept, step, 0.0)
                tl.store(gh_ptr + out_row + cols, grad_h.to(gh_ptr.dtype.element_ty), mask=cols < D)
            if TEACHER_GRAD:
                grad_g = tl.where(kept, -step, 0.0)
                tl.store(gg_ptr + out_row + cols, grad_g.to(gg_ptr.dtype.element_ty), mask=cols < D)
    else:
        if KIND == COSINE:
            dot_acc = tl.zeros([BLOCK], tl.float32)
            hh_acc = tl.zeros([BLOCK], tl.float32)
            gg_acc = tl.zeros([BLOCK], tl.float32)
            for start in range(0, D, BLOCK):
                offs = start + cols
                in_row = (offs < D) & kept
                h = tl.load(h_row + offs, mask=in_row, other=0.0).to(tl.float32)
                g = tl.load(g_row + offs, mask=in_row, other=0.0).to(tl.float32)
                dot_acc += h * g
                hh_acc += h * h
                gg_acc += g * g
            norm_h = tl.sum(hh_acc, 0) + COSINE_EPS
            norm_g = tl.sum(gg_acc, 0) + COSINE_EPS
            denom = tl.sqrt_rn(norm_h * norm_g)
            cosine = tl.div_rn(tl.sum(dot_acc, 0), denom)
            loss = 1.0 - cosine
            if STUDENT_GRAD or TEACHER_GRAD:
                cross = tl.div_rn(grad_scale, denom)
                self_h = tl.div_rn(grad_scale * cosine, norm_h)
                self_g = tl.div_rn(grad_scale * cosine, norm_g)
                for start in range(0, D, BLOCK):
                    offs = start + cols
                    in_row = (offs < D) & kept
                    h = tl.load(h_row + offs, mask=in_row, other=0.0).to(tl.float32)
                    g = tl.load(g_row + offs, mask=in_row, other=0.0).to(tl.float32)
                    if STUDENT_GRAD:
                        grad_h = tl.where(kept, self_h * h - cross * g, 0.0)
                        tl.store(gh_ptr + out_row + offs, grad_h.to(gh_ptr.dtype.element_ty), mask=offs < D)
                    if TEACHER_GRAD:
                        grad_g = tl.where(kept, self_g * g - cross * h, 0.0)
                        tl.store(gg_ptr + out_row + offs, grad_g.to(gg_ptr.dtype.element_ty), mask=offs < D)
        else:
            coef = tl.div_rn(2.0 * grad_scale, dim_f)
            sq_acc = tl.zeros([BLOCK], tl.float32)
            for start in range(0, D, BLOCK):
                offs = start + cols
                in_row = (offs < D) & kept
                h = tl.load(h_row + offs, mask=in_row, other=0.0).to(tl.float32)
                g = tl.load(g_row + offs, mask=in_row, other=0.0).to(tl.float32)
                diff = h - g
                sq_acc += diff * diff
                if STUDENT_GRAD:
                    grad_h = tl.where(kept, coef * diff, 0.0)
                    tl.store(gh_ptr + out_row + offs, grad_h.to(gh_ptr.dtype.element_ty), mask=offs < D)
                if TEACHER_GRAD:
                    grad_g = tl.where(kept, -(coef * diff), 0.0)
                    tl.store(gg_ptr + out_row + offs, grad_g.to(gg_ptr.dtype.element_ty), mask=offs < D)
            loss = tl.div_rn(tl.sum(sq_acc, 0), dim_f)
    tl.store(loss_ptr + row, tl.where(kept, loss, 0.0))


def _check_args(student, teacher, row_mask, kind, grad_scale, student_grad, teacher_grad) -> None:
    """The checks of csrc/common/hidden_state_op.h as ValueError, before any launch."""
    for name, x in (("student", student), ("teacher", teacher)):
        check_tensor(name, x, 2, "N, D")
    check_pair("student", student, "teacher", teacher)
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the same shape"
        )
    if student.shape[1] < 1:
        raise ValueError(f"student must have at least one feature per row, got shape {tuple(student.shape)}")
    for name, x in (("student", student), ("teacher", teacher)):
        if x.shape[0] > 0 and x.shape[1] > 1 and x.stride(1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dim, got strides {x.stride()}")
    if row_mask is not None:
        if not isinstance(row_mask, torch.Tensor) or row_mask.dtype != torch.bool:
            got = getattr(row_mask, "dtype", type(row_mask))
            raise ValueError(f"row_mask must be a bool tensor, got {got}")
        if row_mask.shape != (student.shape[0],):
            raise ValueError(f"row_mask must have shape ({student.shape[0]},), got {tuple(row_mask.shape)}")
        if row_mask.device != student.device:
            raise ValueError(f"row_mask ({row_mask.device}) must be on student's device ({student.device})")
    if isinstance(kind, bool) or kind not in tuple(int(k) for k in HiddenStateKind):
        raise ValueError(f"kind must be 0 (mse) or 1 (cosine), got {kind!r}")
    check_finite("grad_scale", grad_scale)
    for name, value in (("student_grad", student_grad), ("teacher_grad", teacher_grad)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool, got {type(value).__name__}")


@guard_device
def hidden_state_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    row_mask: torch.Tensor | None,
    kind: int,
    grad_scale: float,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row losses and the scaled gradients; the contract of ``fastkd::hidden_state_forward``.

    Args:
        student: ``(N, D)`` projected student states, ``D >= 1``, float32 /
            bfloat16 / float16, unit stride along D (any row stride).
        teacher: ``(N, D)``, same dtype and device.
        row_mask: ``(N,)`` bool or None; False rows get loss 0 and zero gradients.
        kind: ``HiddenStateKind`` code, 0 (mse) or 1 (cosine).
        grad_scale: factor applied to the gradients (not to the loss).
        student_grad, teacher_grad: which gradients to compute.

    Returns:
        ``row_loss`` ``(N,)`` float32, and the gradients ``(N, D)``
        contiguous in the input dtype, ``grad_scale · dℓ_i/d·``, each
        ``(0, 0)`` when not requested.
    """
    _check_args(student, teacher, row_mask, kind, grad_scale, student_grad, teacher_grad)
    rows, dim = student.shape
    row_loss = torch.empty(rows, dtype=torch.float32, device=student.device)
    grad_dtype = stored_dtype(student.dtype)
    grad_s = student.new_empty((rows, dim) if student_grad else (0, 0), dtype=grad_dtype)
    grad_t = teacher.new_empty((rows, dim) if teacher_grad else (0, 0), dtype=grad_dtype)
    if rows > 0:
        block, num_warps = launch_config(dim)
        mask = None if row_mask is None else row_mask.contiguous()
        _hidden_state_fwd_kernel[(rows,)](
            student, teacher, mask, row_loss, grad_s if student_grad else None,
            grad_t if teacher_grad else None, student.stride(0), teacher.stride(0), dim, float(grad_scale),
            KIND=int(kind), HAS_MASK=mask is not None, STUDENT_GRAD=bool(student_grad),
            TEACHER_GRAD=bool(teacher_grad), SINGLE_CHUNK=dim <= block, BLOCK=block, num_warps=num_warps,
        )
    return row_loss, grad_s.to(student.dtype), grad_t.to(teacher.dtype)
