"""Top-k (sparse) teacher divergence, docs/spec.md §1, as plain PyTorch with autograd.

The teacher is given at k vocabulary ids per row. The reference builds the
dense teacher logits with ``−inf`` everywhere else — a legal input of
:func:`fastkd.reference.divergence`, whose softmax then gives exactly the
teacher distribution renormalised over the k ids — and evaluates the dense
divergence on it. It is the oracle, so building the ``(N, V)`` tensor is fine
here; the fused kernels never do.
"""

from __future__ import annotations

import torch

from fastkd.reference.divergence import divergence as _dense_divergence


def dense_teacher_logits(
    teacher_index: torch.Tensor, teacher_values: torch.Tensor, vocab: int, dtype: torch.dtype
) -> torch.Tensor:
    """``(..., V)`` logits: ``teacher_values`` at ``teacher_index``, ``−inf`` elsewhere."""
    dense = torch.full(
        (*teacher_index.shape[:-1], vocab), -torch.inf, dtype=dtype, device=teacher_values.device
    )
    return dense.scatter(-1, teacher_index, teacher_values.to(dtype))


def topk_divergence(
    student_logits: torch.Tensor,
    teacher_index: torch.Tensor,
    teacher_values: torch.Tensor,
    *,
    divergence: str = "kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    scale: float | None = None,
    reduction: str = "batchmean",
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """See :func:`fastkd.topk_divergence`; arguments are assumed valid."""
    teacher = dense_teacher_logits(
        teacher_index, teacher_values.detach(), student_logits.shape[-1], student_logits.dtype
    )
    return _dense_divergence(
        student_logits, teacher, divergence=divergence, temperature=temperature, beta=beta,
        alpha=alpha, scale=scale, reduction=reduction, labels=labels, ignore_index=ignore_index,
        mask=mask,
    )
