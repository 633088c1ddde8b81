"""Softmax divergences, docs/spec.md §1, as plain PyTorch with autograd."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastkd import _validate


def _xlogratio(weight: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``weight · (log_a − log_b)`` with ``0 · anything = 0`` (xlogy convention).

    The log ratio is masked *before* the product so that a NaN ratio at a zero
    weight (``−inf − (−inf)`` for a padded entry) cannot leak NaN into the
    gradient either. A NaN weight still gives NaN.
    """
    ratio = torch.where(weight == 0, torch.zeros_like(log_a), log_a - log_b)
    return weight * ratio


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, c: float) -> torch.Tensor:
    """``log(c·a + (1−c)·b)`` in log space, for ``c`` in [0, 1].

    Entries where both ``a`` and ``b`` are exactly 0 are set to 0 instead of
    ``−inf``: the callers weight them by 0, and a finite value keeps the
    logaddexp gradient finite there.
    """
    both_zero = torch.isneginf(log_a) & torch.isneginf(log_b)
    log_c = math.log(c) if c > 0 else -math.inf
    log_1mc = math.log1p(-c) if c < 1 else -math.inf
    a = torch.where(both_zero, torch.zeros_like(log_a), log_a + log_c)
    b = torch.where(both_zero, torch.zeros_like(log_b), log_b + log_1mc)
    return torch.logaddexp(a, b)


def row_divergence(
    log_p: torch.Tensor, log_q: torch.Tensor, divergence: str, *, beta: float = 0.5, alpha: float = 0.1
) -> torch.Tensor:
    """Per-row divergence between teacher ``p`` and student ``q``.

    Args:
        log_p: ``(N, V)`` teacher log-probabilities.
        log_q: ``(N, V)`` student log-probabilities.
        divergence: one of ``fastkd._validate.DIVERGENCES``.
    Returns:
        ``(N,)`` row losses ``ℓ_i``.
    """
    p, q = log_p.exp(), log_q.exp()
    if divergence == "kl" or (divergence == "jsd" and beta == 0) or (divergence == "skew_kl" and alpha == 0):
        return _xlogratio(p, log_p, log_q).sum(-1)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1) or (
        divergence == "skew_reverse_kl" and alpha == 0
    ):
        return _xlogratio(q, log_q, log_p).sum(-1)
    if divergence == "jsd":
        log_m = _log_mixture(log_p, log_q, beta)
        return (beta * _xlogratio(p, log_p, log_m) + (1 - beta) * _xlogratio(q, log_q, log_m)).sum(-1)
    if divergence == "skew_kl":
        return _xlogratio(p, log_p, _log_mixture(log_p, log_q, alpha)).sum(-1)
    if divergence == "skew_reverse_kl":
        return _xlogratio(q, log_q, _log_mixture(log_q, log_p, alpha)).sum(-1)
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(f"divergence must be one of {_validate.DIVERGENCES}, got {divergence!r}")


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
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
    """Reference for :func:`fastkd.divergence` (same arguments, same result).

    Raises ``ValueError`` for a kept row whose student or teacher logits are
    all ``−inf`` (no distribution); the fused kernels return NaN there.
    """
    s = _validate.tensor("student_logits", student_logits)
    t = _validate.tensor("teacher_logits", teacher_logits)
    _validate.same_layout("teacher_logits", t, "student_logits", s)
    _validate.choice("divergence", divergence, _validate.DIVERGENCES)
    _validate.choice("reduction", reduction, _validate.REDUCTIONS)
    temperature = _validate.real("temperature", temperature, low=0.0, low_open=True)
    beta = _validate.real("beta", beta, low=0.0, high=1.0)
    alpha = _validate.real("alpha", alpha, low=0.0, high=1.0)
    scale = temperature**2 if scale is None else _validate.real("scale", scale)
    lead = s.shape[:-1]
    vocab = s.shape[-1]
    labels = _validate.row_selector("labels", labels, lead, s, integer=True)
    mask = _validate.row_selector("mask", mask, lead, s, integer=False)

    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    s2 = s.reshape(-1, vocab).to(acc)
    t2 = t.reshape(-1, vocab).to(acc)
    keep = torch.ones(s2.shape[0], dtype=torch.bool, device=s.device)
    if labels is not None:
        keep &= labels.reshape(-1) != ignore_index
    if mask is not None:
        keep &= mask.reshape(-1)
    kept = keep.nonzero().squeeze(-1)
    s_kept, t_kept = s2[kept], t2[kept]
    if bool((torch.isneginf(s_kept).all(-1) | torch.isneginf(t_kept).all(-1)).any()):
        raise ValueError("a kept row of student_logits or teacher_logits is entirely -inf")

    log_q = F.log_softmax(s_kept / temperature, dim=-1)
    log_p = F.log_softmax(t_kept / temperature, dim=-1)
    rows = row_divergence(log_p, log_q, divergence, beta=beta, alpha=alpha)

    if reduction == "none":
        out = torch.zeros(s2.shape[0], dtype=acc, device=s.device).index_put((kept,), rows)
        return scale * out.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return scale * total
    n_kept = kept.numel()
    if n_kept == 0:
        return scale * total  # an empty sum: 0, with a zero gradient
    if reduction == "batchmean":
        return scale * total / n_kept
    return scale * total / (n_kept * vocab)
