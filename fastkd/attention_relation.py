"""Self-attention relation distillation (MiniLM / MiniLMv2), docs/spec.md §5.3.

``attention_relation_loss`` compares one relation (queries, keys or values of a
layer) of student and teacher: per relation head, the softmax of the scaled
dot products between a sequence's vectors, ``KL(teacher ‖ student)`` per row.
MiniLMv2's objective is the sum of three calls (Q-Q, K-K and V-V relations of
the teacher's chosen layer).

The ``cpu``, ``triton`` and ``cuda`` kernels are flash-style: they stream key
tiles with an online log-sum-exp for both models and keep ``O(B · A · T)``
statistics, never a ``(T, T)`` relation; the reference materialises the ``(B, A, T, T)``
relations of both models (and autograd keeps them).
"""

from __future__ import annotations

import torch
from torch import nn

from fastkd import _ops as _extension
from fastkd._backend import backend_for, kernel_op
from fastkd.reference import attention_relation as _reference

__all__ = ["AttentionRelationLoss", "attention_relation_loss"]

# backends with a kernel for this loss (the reference always runs)
KERNEL_BACKENDS: tuple[str, ...] = ("cpu", "triton", "cuda")


if _extension.CPU_EXTENSION_ERROR is None:

    @torch.library.register_fake("fastkd::attention_relation_forward")
    def _forward_fake(student, teacher, heads, mask, causal, temperature):
        acc = torch.float64 if student.dtype == torch.float64 else torch.float32
        batch, length = student.shape[:2]
        # lse_student, lse_teacher: (shift, log Σ exp(z − shift)) pairs per row
        lse = student.new_empty((batch, heads, length, 2), dtype=acc)
        head_kl = student.new_empty((batch, heads, length), dtype=acc)
        rows = student.new_empty((batch, length), dtype=acc)
        return rows, lse, torch.empty_like(lse), head_kl

    @torch.library.register_fake("fastkd::attention_relation_backward")
    def _backward_fake(row_grad, student, teacher, heads, mask, causal, temperature, lse_student, lse_teacher,
                       head_kl, student_grad, teacher_grad):
        # the ops return contiguous gradients whatever the inputs' strides
        return (student.new_empty(student.shape) if student_grad else student.new_empty((0,)),
                teacher.new_empty(teacher.shape) if teacher_grad else teacher.new_empty((0,)))


class AttentionRelationFunction(torch.autograd.Function):
    """Row losses ``(B, T)`` of the fused kernel; gradients for both states."""

    @staticmethod
    def forward(ctx, student, teacher, heads, mask, causal, temperature, backend):
        forward = kernel_op(backend, "attention_relation", "attention_relation_forward")
        rows, lse_s, lse_t, head_kl = forward(student, teacher, heads, mask, causal, temperature)
        ctx.save_for_backward(student, teacher, mask, lse_s, lse_t, head_kl)
        ctx.options = (heads, causal, temperature, backend)
        return rows

    @staticmethod
    def backward(ctx, row_grad):
        student, teacher, mask, lse_s, lse_t, head_kl = ctx.saved_tensors
        heads, causal, temperature, backend = ctx.options
        want_s, want_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        backward = kernel_op(backend, "attention_relation", "attention_relation_backward")
        grad_s, grad_t = backward(row_grad.contiguous(), student, teacher, heads, mask, causal, temperature,
                                  lse_s, lse_t, head_kl, want_s, want_t)
        return (grad_s if want_s else None, grad_t if want_t else None, None, None, None, None, None)


def _reduce(rows: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """``rows`` (B, T), 0 on excluded rows, reduced; ``batchmean`` divides by the kept rows (at least 1)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    kept = max(rows.numel(), 1) if mask is None else mask.sum().clamp(min=1)
    return total / kept


def attention_relation_loss(
    student_states: torch.Tensor,
    teacher_states: torch.Tensor,
    *,
    num_relation_heads: int,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    backend: str = "auto",
) -> torch.Tensor:
    """MiniLM attention-relation loss between one relation of student and teacher.

    Per batch element, relation head ``a`` (each model's width split into
    ``num_relation_heads`` heads of ``D / A`` channels) and kept row ``i``,
    ``R_{a,i} = softmax_j(x_{i,a} · x_{j,a} / (√(D/A) · temperature))`` over
    the kept keys ``j``; the row loss is the mean over heads of
    ``KL(R^teacher_{a,i} ‖ R^student_{a,i})``.

    Args:
        student_states: ``(B, T, D_s)`` float32 / float64 / bfloat16 / float16.
        teacher_states: ``(B, T, D_t)``, same B, T, dtype and device; D_t may
            differ from D_s. Gets a gradient when it requires one.
        num_relation_heads: ``A`` ≥ 1, dividing both D_s and D_t.
        mask: ``(B, T)`` bool, False for padding (excluded as key and as row).
        causal: only keys ``j ≤ i``.
        temperature: ``> 0``; divides the scores, with no ``temperature²`` factor.
        reduction: ``"batchmean"`` (sum of the row losses over the kept rows,
            divided by their number), ``"sum"``, or ``"none"`` (``(B, T)``, 0
            for excluded rows).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or
            ``"cuda"`` (``"auto"`` picks triton on a GPU). The triton kernel
            holds one relation head's ``D / A`` channels in registers:
            ``D / A`` ≤ 256; the cuda kernel streams them in chunks (any
            ``D / A``, T ≤ 2 097 120). The GPU backends take float32,
            bfloat16 and float16.

    Returns:
        float32 scalar (float64 for float64 inputs), ``(B, T)`` for ``"none"``;
        0 when no row is kept.
    """
    s, t, heads, mask, temperature = _reference.check_arguments(
        student_states, teacher_states, num_relation_heads, mask, causal, temperature, reduction)
    chosen = backend_for("attention_relation_loss", KERNEL_BACKENDS, backend, s)
    if chosen == "reference":
        return _reference.attention_relation_loss(
            s, t, num_relation_heads=heads, mask=mask, causal=causal, temperature=temperature,
            reduction=reduction)
    rows = AttentionRelationFunction.apply(s, t, heads, mask, causal, temperature, chosen)
    return _reduce(rows, mask, reduction)


class AttentionRelationLoss(nn.Module):
    """Module form of :func:`attention_relation_loss`:
    ``forward(student_states, teacher_states, mask=None)``."""

    def __init__(self, num_relation_heads: int, *, causal: bool = False, temperature: float = 1.0,
                 reduction: str = "batchmean", backend: str = "auto"):
        super().__init__()
        # validated here so that a bad module fails at construction
        _reference.check_options(num_relation_heads, causal, temperature, reduction)
        self.num_relation_heads = num_relation_heads
        self.causal = causal
        self.temperature = temperature
        self.reduction = reduction
        self.backend = backend

    def forward(self, student_states: torch.Tensor, teacher_states: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return attention_relation_loss(
            student_states, teacher_states, num_relation_heads=self.num_relation_heads, mask=mask,
            causal=self.causal, temperature=self.temperature, reduction=self.reduction, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"num_relation_heads={self.num_relation_heads}, causal={self.causal}, "
                f"temperature={self.temperature}, reduction={self.reduction!r}")
