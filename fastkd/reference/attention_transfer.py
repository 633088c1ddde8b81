"""Attention transfer, docs/spec.md §5, as plain PyTorch with autograd."""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from fastkd.reference._common import accumulation_dtype, check_map_pair, pool_to_common_size

NORMALIZE_EPS = 1e-12  # F.normalize's default, as RepDistiller uses it


def check_at_arguments(student_maps, teacher_maps, p) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Validates :func:`at_loss`'s arguments (``ValueError`` naming the bad one).

    Channel counts and spatial sizes may differ; batch size, dtype and device
    may not. Shared with the fused backend so every backend rejects the same inputs.
    """
    s, t = check_map_pair(student_maps, teacher_maps)
    if isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 1:
        raise ValueError(f"p must be an integer >= 1, got {p!r}")
    return s, t, int(p)


def attention_map(f: torch.Tensor, p: int = 2) -> torch.Tensor:
    """``normalize(mean_c f^p)`` per sample, ``(N, C, H, W)`` → ``(N, H·W)`` (RepDistiller ``at``)."""
    return F.normalize(f.pow(p).mean(1).view(f.shape[0], -1), dim=1, eps=NORMALIZE_EPS)


def at_loss(student_maps: torch.Tensor, teacher_maps: torch.Tensor, *, p: int = 2) -> torch.Tensor:
    """Attention transfer for one pair of maps (RepDistiller ``Attention``, docs/spec.md §5).

    ``a(f) = normalize(mean_c f^p)`` over each sample's ``H·W`` positions
    (``F.normalize``, eps 1e-12), after both maps are pooled to
    ``(min(H, H'), min(W, W'))``; ``L = mean((a_s − a_t)²)`` over ``N·H·W``.
    Nothing is detached (detach ``teacher_maps`` for a frozen teacher).

    Args:
        student_maps: ``(N, C_s, H, W)``.
        teacher_maps: ``(N, C_t, H', W')``; channels and spatial size may differ.
        p: the power, an integer ``>= 1`` (2 in the paper and RepDistiller).
    Returns:
        ``()`` loss, float32 (float64 for float64 inputs).
    """
    s, t, p = check_at_arguments(student_maps, teacher_maps, p)
    acc = accumulation_dtype(s)
    s, t = pool_to_common_size(s.to(acc), t.to(acc))
    return (attention_map(s, p) - attention_map(t, p)).pow(2).mean()
