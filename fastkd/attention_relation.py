"""Self-attention relation distillation (MiniLM / MiniLMv2), docs/spec.md §5.3.

``attention_relation_loss`` compares one relation (queries, keys or values of a
layer) of student and teacher: per relation head, the softmax of the scaled
dot products between a sequence's vectors, ``KL(teacher ‖ student)`` per row.
MiniLMv2's objective is the sum of three calls (Q-Q, K-K and V-V relations of
the teacher's chosen layer). The only backend is the reference, which
materialises the ``(B, A, T, T)`` relations (about ``2 · B · A · T²`` values
per model and call, plus what autograd keeps).
"""

from __future__ import annotations

import torch
from torch import nn

from fastkd import _dispatch
from fastkd.reference import attention_relation as _reference

__all__ = ["AttentionRelationLoss", "attention_relation_loss"]

# backends with a kernel for this loss (the reference always runs)
KERNEL_BACKENDS: tuple[str, ...] = ()


def _backend(backend: str, tensor: torch.Tensor) -> str:
    chosen = _dispatch.resolve(backend, tensor)
    if chosen == "reference" or chosen in KERNEL_BACKENDS:
        return chosen
    if backend == "auto":
        return "reference"
    raise ValueError(f"backend={chosen!r} has no attention_relation_loss kernel yet")


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
        backend: ``"auto"`` or ``"reference"`` (no fused kernel yet; an
            explicit ``"cpu"``, ``"triton"`` or ``"cuda"`` raises ``ValueError``).

    Returns:
        float32 scalar (float64 for float64 inputs), ``(B, T)`` for ``"none"``;
        0 when no row is kept.
    """
    _reference.check_arguments(student_states, teacher_states, num_relation_heads, mask, causal, temperature,
                               reduction)
    _backend(backend, student_states)
    return _reference.attention_relation_loss(
        student_states, teacher_states, num_relation_heads=num_relation_heads, mask=mask, causal=causal,
        temperature=temperature, reduction=reduction,
    )


class AttentionRelationLoss(nn.Module):
    """Module form of :func:`attention_relation_loss`; ``forward(student_states, teacher_states, mask=None)``."""

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
