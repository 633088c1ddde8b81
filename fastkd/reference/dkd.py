"""Decoupled knowledge distillation (DKD, Zhao et al. 2022; mdistiller ``dkd_loss``), docs/spec.md §1.

With target class ``y`` and ``a = z / T`` (student ``z = s``, teacher ``z = t``):

- ``b = [p_y, 1 − p_y]`` where ``p = softmax(a)``: the binary target / non-target
  split; ``TCKD = KL(b_t ‖ b_s)``;
- ``NCKD = KL(softmax(a_t − 1000·onehot(y)) ‖ softmax(a_s − 1000·onehot(y)))``,
  the divergence between the distributions over the non-target classes, with
  mdistiller's ``− 1000`` on the target logit (so the target keeps a mass of
  about ``e^{-1000}``, which is 0 unless the logits span ~1000·T);
- ``DKD_i = (α · TCKD + β · NCKD) · T²``, averaged over the rows ("batchmean").

``−inf`` logits are legal and carry no mass (``0 · log 0 = 0``); a row that is
entirely ``−inf`` has no distribution (``ValueError``; the fused kernels give NaN).

``1 − p_y`` and ``log(1 − p_y)`` are computed in log space (``log Σ_{j≠y} e^{a_j}
− log Σ_j e^{a_j}``) rather than mdistiller's probability-space sums, which
equal them up to rounding but give ``log 0`` once ``p_y`` rounds to 1. The
teacher gets no gradient (mdistiller computes it under ``torch.no_grad``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastkd import _validate

DKD_REDUCTIONS = ("batchmean", "sum", "none")
# mdistiller's offset on the target logit in the non-target softmax.
TARGET_OFFSET = 1000.0


def check_dkd_arguments(student_logits, teacher_logits, labels, alpha, beta, temperature, reduction,
                        *, label_range: bool = True):
    """Validated ``(s, t, labels, alpha, beta, temperature)``; ValueError naming the argument.

    ``label_range=False`` leaves out the one check that reads the labels'
    values (a device → host synchronisation on a GPU): the fused kernels give
    a row whose label is outside ``[0, C)`` a NaN loss and gradient instead
    (docs/spec.md §6).
    """
    s = _validate.tensor("student_logits", student_logits, min_dim=2)
    t = _validate.tensor("teacher_logits", teacher_logits, min_dim=2)
    if s.dim() != 2:
        raise ValueError(f"student_logits must be 2-D (N, C), got shape {tuple(s.shape)}")
    _validate.same_layout("teacher_logits", t, "student_logits", s)
    if s.shape[1] < 2:
        raise ValueError(f"student_logits must have at least 2 classes for DKD, got {s.shape[1]}")
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != (s.shape[0],):
        raise ValueError(f"labels shape {tuple(labels.shape)} must be (N,) = ({s.shape[0]},)")
    _validate.same_device("labels", labels, "student_logits", s)
    if label_range and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= s.shape[1]):
        raise ValueError(
            f"labels must lie in [0, C) = [0, {s.shape[1]}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    alpha = _validate.real("alpha", alpha, low=0.0)
    beta = _validate.real("beta", beta, low=0.0)
    temperature = _validate.real("temperature", temperature, low=0.0, low_open=True)
    _validate.choice("reduction", reduction, DKD_REDUCTIONS)
    return s, t, labels.long(), alpha, beta, temperature


def _binary_log_probs(a: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(N, 2)``: ``[log p_y, log(1 − p_y)]`` of ``p = softmax(a)``, in log space.

    ``target`` is the ``(N, C)`` bool one-hot of ``y``. ``a_y`` is selected, not
    taken as ``Σ a · onehot``, which is NaN for a ``−inf`` logit (``−inf · 0``).
    """
    lse = torch.logsumexp(a, dim=1)
    log_target = torch.where(target, a, 0.0).sum(1) - lse
    log_other = torch.logsumexp(a.masked_fill(target, float("-inf")), dim=1) - lse
    return torch.stack((log_target, log_other), dim=1)


def _non_target_log_probs(a: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``log_softmax(a − 1000·onehot(y))``, the offset applied to the target entry only
    (a ``−inf`` logit stays ``−inf``: no mass)."""
    return F.log_softmax(torch.where(target, a - TARGET_OFFSET, a), dim=1)


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``Σ p (log p − log q)`` per row, with ``0 · anything = 0``."""
    p = log_p.exp()
    ratio = torch.where(p == 0, torch.zeros_like(log_p), log_p - log_q)
    return (p * ratio).sum(1)


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Reference DKD: ``(α·TCKD + β·NCKD)·T²`` per row, then ``reduction``.

    Args:
        student_logits: ``(N, C)``.
        teacher_logits: ``(N, C)``, same dtype and device; no gradient.
        labels: ``(N,)`` integer target classes in ``[0, C)``.
        alpha, beta: weights ``>= 0`` of TCKD and NCKD.
        temperature: ``T > 0``.
        reduction: ``"batchmean"`` (mean over rows, mdistiller), ``"sum"``, ``"none"``.

    Returns:
        float32 (float64 for float64 inputs) scalar, or ``(N,)`` for ``"none"``.
    """
    s, t, y, alpha, beta, temperature = check_dkd_arguments(
        student_logits, teacher_logits, labels, alpha, beta, temperature, reduction
    )
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    a_s = s.to(acc) / temperature
    a_t = t.detach().to(acc) / temperature
    if bool((torch.isneginf(a_s).all(1) | torch.isneginf(a_t).all(1)).any()):
        raise ValueError("a row of student_logits or teacher_logits is entirely -inf")
    target = F.one_hot(y, s.shape[1]).bool()
    tckd = _kl_rows(_binary_log_probs(a_t, target), _binary_log_probs(a_s, target))
    nckd = _kl_rows(_non_target_log_probs(a_t, target), _non_target_log_probs(a_s, target))
    rows = (alpha * tckd + beta * nckd) * temperature**2
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" or rows.numel() == 0 else total / rows.numel()
