"""Hard-label mixing and the linear head of LLM distillation (docs/spec.md §1), unfused.

``mixed_divergence`` is ``hard_weight · CE(student, labels) + soft_weight · KD``
(the rules are in ``fastkd._hard_labels``); ``fused_linear_divergence``
materialises the logits ``hidden @ weightᵀ + bias`` of both models and applies
it. Plain PyTorch with autograd: the oracle for ``fastkd.divergence``'s and
``fastkd.fused_linear_divergence``'s hard-label and chunked paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastkd.reference.divergence import divergence as _divergence


def cross_entropy(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy at temperature 1 over the kept rows.

    Args:
        student_logits: ``(..., V)``.
        labels: ``(...)`` class ids; rows equal to ``ignore_index`` are excluded.
        reduction: ``"sum"``; ``"batchmean"`` and ``"mean"`` (both / kept rows);
            ``"none"`` (one value per row, 0 when excluded).
        mask: ``(...)`` bool, False excludes the row.

    Returns:
        float32 (float64 for float64 input) scalar, or ``(...)`` for ``"none"``.
    """
    vocab = student_logits.shape[-1]
    acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    x = student_logits.reshape(-1, vocab).to(acc)
    y = labels.reshape(-1)
    keep = y != ignore_index
    if mask is not None:
        keep &= mask.reshape(-1)
    kept = keep.nonzero().squeeze(-1)
    rows = F.cross_entropy(x[kept], y[kept].long(), reduction="none")
    if reduction == "none":
        out = torch.zeros(x.shape[0], dtype=acc, device=x.device).index_put((kept,), rows)
        return out.reshape(labels.shape)
    total = rows.sum()
    if reduction == "sum" or kept.numel() == 0:
        return total
    return total / kept.numel()


def mixed_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    labels: torch.Tensor,
    hard_weight: float,
    soft_weight: float = 1.0,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    **divergence_kwargs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, hard_part, soft_part)`` with ``total = hard_part + soft_part``,
    ``hard_part = hard_weight · cross_entropy(...)`` and
    ``soft_part = soft_weight · fastkd.reference.divergence(...)`` (same
    ``labels`` / ``mask`` exclusion, same ``reduction``)."""
    soft = soft_weight * _divergence(
        student_logits,
        teacher_logits,
        reduction=reduction,
        labels=labels,
        ignore_index=ignore_index,
        mask=mask,
        **divergence_kwargs,
    )
    hard = hard_weight * cross_entropy(
        student_logits, labels, reduction=reduction, ignore_index=ignore_index, mask=mask
    )
    return hard + soft, hard, soft


def logit_map(logits: torch.Tensor, scale: float = 1.0, softcapping: float | None = None) -> torch.Tensor:
    """``c · tanh(a · z / c)`` of the logits ``z`` (``a · z`` when ``softcapping`` is None),
    ``a = scale``, ``c = softcapping``: Cohere's ``logit_scale`` and Gemma's
    ``final_logit_softcapping``."""
    logits = logits * scale if scale != 1.0 else logits
    return logits if softcapping is None else softcapping * torch.tanh(logits / softcapping)


def linear_logits(hidden, weight, bias=None, *, scale: float = 1.0, softcapping: float | None = None):
    """``logit_map(hidden @ weightᵀ + bias)`` computed in float64 if any input is
    float64, else in float32 (bfloat16 / float16 inputs converted first).

    ``hidden`` ``(..., H)``, ``weight`` ``(V, H)``, ``bias`` ``(V,)`` or None,
    their dtypes free; returns ``(..., V)`` in the compute dtype.
    """
    dtypes = [x.dtype for x in (hidden, weight, bias) if x is not None]
    compute = torch.float64 if torch.float64 in dtypes else torch.float32
    z = F.linear(hidden.to(compute), weight.to(compute), None if bias is None else bias.to(compute))
    return logit_map(z, scale, softcapping)


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    hard_weight: float | None = None,
    soft_weight: float = 1.0,
    return_parts: bool = False,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_logit_softcapping: float | None = None,
    teacher_logit_softcapping: float | None = None,
    **divergence_kwargs,
):
    """Reference for :func:`fastkd.fused_linear_divergence`: full logits, then the divergence.

    ``student_logits = linear_logits(student_hidden, student_weight,
    student_bias, scale=student_logit_scale,
    softcapping=student_logit_softcapping)`` (float32, or float64 for float64
    inputs; likewise the teacher, under ``torch.no_grad``: the teacher side
    gets no gradient), then :func:`fastkd.reference.divergence` or, with
    ``hard_weight``, :func:`mixed_divergence`. ``return_parts``:
    ``(total, hard_part, soft_part)``, each differentiable.
    """
    s = linear_logits(student_hidden, student_weight, student_bias, scale=student_logit_scale,
                      softcapping=student_logit_softcapping)
    with torch.no_grad():
        t = linear_logits(teacher_hidden, teacher_weight, teacher_bias, scale=teacher_logit_scale,
                          softcapping=teacher_logit_softcapping)
    if hard_weight:
        parts = mixed_divergence(
            s, t, labels=labels, hard_weight=hard_weight, soft_weight=soft_weight, **divergence_kwargs
        )
        return parts if return_parts else parts[0]
    soft = soft_weight * _divergence(s, t, labels=labels, **divergence_kwargs)
    return (soft, torch.zeros_like(soft), soft) if return_parts else soft
