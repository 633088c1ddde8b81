"""Multi-teacher divergence, docs/spec.md §1, as plain PyTorch with autograd.

The target is the mixture of the teachers' softened distributions,
``p = Σ_k w_k softmax(t_k / T)``, formed in log space
(``log p = logsumexp_k(log w_k + log_softmax(t_k / T))``). Since ``log p`` is
already normalised, ``T · log p`` is a valid set of teacher logits whose
softmax at temperature ``T`` is ``p`` itself, so the dense reference
divergence evaluates the loss on it.
"""

from __future__ import annotations

import torch

from fastkd.reference.divergence import divergence as _dense_divergence


def mixture_log_probs(teachers: torch.Tensor, weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(..., V)`` log of the mixture of ``softmax(teachers[k] / T)`` with ``weights (K,)``.

    Computed in float32 (float64 for float64 teachers); a teacher of weight 0
    contributes nothing (``log 0 = −inf`` inside the logsumexp).
    """
    acc = torch.float64 if teachers.dtype == torch.float64 else torch.float32
    log_p = torch.log_softmax(teachers.to(acc) / temperature, dim=-1)
    log_w = weights.to(device=teachers.device, dtype=acc).log()
    log_w = log_w.reshape(-1, *([1] * (teachers.dim() - 1)))
    # weight 0 with a −inf entry would give −inf + −inf = −inf, fine; with a
    # finite entry −inf: the teacher drops out, as it should.
    return torch.logsumexp(log_w + log_p, dim=0)


def mixture_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_weights: torch.Tensor,
    *,
    temperature: float = 1.0,
    scale: float | None = None,
    **kwargs,
) -> torch.Tensor:
    """Reference for :func:`fastkd.divergence` with ``(K, ..., V)`` teachers; arguments assumed valid.

    ``kwargs``: ``divergence``, ``beta``, ``alpha``, ``reduction``, ``labels``,
    ``ignore_index``, ``mask`` as :func:`fastkd.reference.divergence`.
    """
    with torch.no_grad():
        log_p = mixture_log_probs(teacher_logits, teacher_weights, temperature)
    acc = log_p.dtype
    return _dense_divergence(
        student_logits.to(acc), temperature * log_p, temperature=temperature,
        scale=temperature**2 if scale is None else scale, **kwargs,
    )
