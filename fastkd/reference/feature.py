"""Feature losses, SPEC §5 (FitNets hint and attention transfer), as plain PyTorch with autograd."""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from fastkd import _validate

NORMALIZE_EPS = 1e-12  # F.normalize's default, as RepDistiller uses it


def _feature_maps(name: str, value) -> torch.Tensor:
    """A non-empty ``(N, C, H, W)`` floating-point tensor."""
    value = _validate.tensor(name, value, min_dim=4)
    if value.dim() != 4 or value.numel() == 0:
        raise ValueError(f"{name} must have shape (N, C, H, W) with every dim >= 1, got {tuple(value.shape)}")
    return value


def check_at_arguments(student_maps, teacher_maps, p) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Validates :func:`at_loss`'s arguments (``ValueError`` naming the bad one).

    Channel counts and spatial sizes may differ; batch size, dtype and device
    may not. Shared with the fused backend so every backend rejects the same inputs.
    """
    s = _feature_maps("student_maps", student_maps)
    t = _feature_maps("teacher_maps", teacher_maps)
    if t.shape[0] != s.shape[0]:
        raise ValueError(
            f"teacher_maps batch size {t.shape[0]} does not match student_maps batch size {s.shape[0]}"
        )
    if t.dtype != s.dtype:
        raise ValueError(f"teacher_maps dtype {t.dtype} does not match student_maps dtype {s.dtype}")
    _validate.same_device("teacher_maps", t, "student_maps", s)
    if isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 1:
        raise ValueError(f"p must be an integer >= 1, got {p!r}")
    return s, t, int(p)


def pool_to_common_size(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps adaptive-average-pooled to ``(min(H, H'), min(W, W'))``.

    For square maps this is RepDistiller's rule (the larger map pooled to the
    smaller); a map already of that size is returned as it is.
    """
    size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
    if s.shape[2:] != size:
        s = F.adaptive_avg_pool2d(s, size)
    if t.shape[2:] != size:
        t = F.adaptive_avg_pool2d(t, size)
    return s, t


def attention_map(f: torch.Tensor, p: int = 2) -> torch.Tensor:
    """``normalize(mean_c f^p)`` per sample, ``(N, C, H, W)`` → ``(N, H·W)`` (RepDistiller ``at``)."""
    return F.normalize(f.pow(p).mean(1).view(f.shape[0], -1), dim=1, eps=NORMALIZE_EPS)


def at_loss(student_maps: torch.Tensor, teacher_maps: torch.Tensor, *, p: int = 2) -> torch.Tensor:
    """Attention transfer for one pair of maps (RepDistiller ``Attention``, SPEC §5).

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
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    s, t = pool_to_common_size(s.to(acc), t.to(acc))
    return (attention_map(s, p) - attention_map(t, p)).pow(2).mean()


def hint_loss(adapted_student: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNets hint: ``MSE(adapter(f_s), f_t)`` given the adapted student features (SPEC §5).

    4-D maps of different spatial size are pooled to the common (smaller)
    size first; the mean is over every element. Computed in float32 (float64
    for float64 inputs). ``teacher_features`` is detached: the hint is a target.
    """
    acc = torch.float64 if adapted_student.dtype == torch.float64 else torch.float32
    s, t = adapted_student.to(acc), teacher_features.detach().to(acc)
    if s.dim() == 4:
        s, t = pool_to_common_size(s, t)
    return F.mse_loss(s, t)
