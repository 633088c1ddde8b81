"""Hard-label mixing (docs/spec.md §1): ``hard_weight · CE(student, labels) + soft_weight · KD``.

Shared by :func:`fastkd.divergence` and :func:`fastkd.fused_linear_divergence`.
The cross-entropy is at temperature 1 and is not multiplied by ``scale`` (the
``T²`` belongs to the distillation term). Rows excluded from the divergence
(``labels == ignore_index`` or ``mask`` false) are excluded from the
cross-entropy too. Reductions of the CE term: ``"sum"`` sums the kept rows,
``"batchmean"`` *and* ``"mean"`` divide by the number of kept rows (as
``F.cross_entropy(reduction="mean")``; the divergence's ``"mean"`` also divides
by V, the CE's does not), ``"none"`` gives one value per row (0 when excluded).

On the compiled backends the CE is computed inside the fused divergence,
top-k and mixture kernels' pass (``fastkd.divergence.HardSoftDivergenceFunction``,
``StudentHardSoftFunction``); this module holds the checks shared by every
path, and the ATen form of the CE's gradient (chunk by chunk, at most
``CE_CHUNK_ELEMENTS`` logits at a time) that separates the hard and soft
gradients when ``return_parts`` weighs them apart.
"""

from __future__ import annotations

import torch

from fastkd import _validate
from fastkd.reference.fused_linear import cross_entropy as _reference_cross_entropy

# Logits per CE chunk: 2**22 elements, 16 MiB of float32 temporaries.
CE_CHUNK_ELEMENTS = 2**22


def mixing_weights(hard_weight, soft_weight, labels) -> tuple[float, float, bool]:
    """Validated ``(hard_weight, soft_weight, mixing_on)``.

    ``hard_weight`` ``None`` or 0 switches the cross-entropy off (then the loss
    is exactly the divergence times ``soft_weight``, default 1). A positive
    ``hard_weight`` needs ``labels``.
    """
    hw = 0.0 if hard_weight is None else _validate.real("hard_weight", hard_weight, low=0.0)
    sw = 1.0 if soft_weight is None else _validate.real("soft_weight", soft_weight, low=0.0)
    on = hw > 0.0
    if on and labels is None:
        raise ValueError("labels is required when hard_weight > 0 (the cross-entropy targets)")
    return hw, sw, on


def check_label_range(labels: torch.Tensor, keep: torch.Tensor | None, vocab: int) -> None:
    """Every kept row's label must be a class id in ``[0, V)`` (ValueError naming ``labels``)."""
    kept = labels if keep is None else labels[keep]
    if kept.numel() == 0:
        return
    lo, hi = int(kept.min().item()), int(kept.max().item())
    if lo < 0 or hi >= vocab:
        raise ValueError(
            f"labels of kept rows must lie in [0, V) = [0, {vocab}) (or equal ignore_index), "
            f"got values in [{lo}, {hi}]"
        )


def ce_rows_and_grad(
    logits: torch.Tensor,
    labels: torch.Tensor,
    keep: torch.Tensor | None,
    grad_scale: torch.Tensor | float | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-entropy of each row of a chunk, and optionally its gradient.

    Args:
        logits: ``(r, V)`` student logits (any float dtype; computed in float32,
            float64 for float64).
        labels: ``(r,)`` int64 targets; excluded rows may hold anything.
        keep: ``(r,)`` bool or None (every row kept).
        grad_scale: None for no gradient; else a float or an ``(r,)`` tensor
            multiplying each row's gradient ``softmax(x) − onehot(y)``.

    Returns:
        ``(rows (r,), grad (r, V) in the accumulation dtype or None)``; excluded
        rows have loss 0 and gradient 0.
    """
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(acc)
    safe = labels if keep is None else torch.where(keep, labels, torch.zeros_like(labels))
    safe = safe.unsqueeze(1)
    m = x.amax(1, keepdim=True)
    e = (x - m).exp_()
    total = e.sum(1, keepdim=True)
    rows = (m + total.log()).squeeze(1) - x.gather(1, safe).squeeze(1)
    if keep is not None:
        rows = torch.where(keep, rows, torch.zeros_like(rows))
    if grad_scale is None:
        return rows, None
    grad = e.div_(total)
    grad.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=acc))
    row_scale = grad_scale if isinstance(grad_scale, torch.Tensor) else torch.full_like(rows, grad_scale)
    if keep is not None:
        row_scale = row_scale * keep
    return rows, grad.mul_(row_scale.to(acc).unsqueeze(1))


def ce_grad(
    logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor | None, row_scale: torch.Tensor
) -> torch.Tensor:
    """``row_scale_i · (softmax(x_i) − onehot(y_i))`` for every kept row (0 elsewhere), chunk by chunk.

    Args:
        logits: ``(N, V)``; labels: ``(N,)`` int64; keep: ``(N,)`` bool or None;
        row_scale: ``(N,)`` float.

    Returns:
        ``(N, V)`` in the logits' dtype (each chunk computed in the
        accumulation dtype, then rounded).
    """
    n, vocab = logits.shape
    grad = torch.empty_like(logits)
    step = max(1, CE_CHUNK_ELEMENTS // max(vocab, 1))
    for i in range(0, n, step):
        chunk_keep = None if keep is None else keep[i : i + step]
        rows = slice(i, i + step)
        _, g = ce_rows_and_grad(logits[rows], labels[rows], chunk_keep, row_scale[rows])
        grad[i : i + step].copy_(g)
    return grad


def mix_soft_with_reference_ce(soft, student_logits, labels, *, reduction, ignore_index, mask, hard_weight,
                                soft_weight, return_parts):
    """``soft_weight · soft`` plus, for ``hard_weight > 0``, the reference's ``hard_weight · CE``.

    The tail of the paths that do not compute the CE in a kernel's pass (the
    reference backend, and no hard labels at all); arguments validated.

    Returns:
        ``total``, or ``(total, hard_part, soft_part)`` with ``return_parts``
        (``hard_part`` 0 without hard labels).
    """
    soft = soft * soft_weight
    if hard_weight == 0.0:
        return (soft, torch.zeros_like(soft), soft) if return_parts else soft
    flat = labels.reshape(-1)
    keep = flat != ignore_index if mask is None else (flat != ignore_index) & mask.reshape(-1)
    check_label_range(flat, keep, student_logits.shape[-1])
    hard = hard_weight * _reference_cross_entropy(
        student_logits, labels, reduction=reduction, ignore_index=ignore_index, mask=mask
    )
    total = hard + soft
    return (total, hard, soft) if return_parts else total


def reduce_factor(reduction: str, n_kept: int) -> float:
    """What the CE row sum is multiplied by for ``reduction`` (see the module docstring)."""
    if reduction in ("sum", "none"):
        return 1.0
    return 1.0 / max(n_kept, 1)
