"""Argument checks and helpers shared by several reference families."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastkd import _validate

__all__ = [
    "NORMALIZE_EPS",
    "accumulation_dtype",
    "check_map_pair",
    "checked_pair",
    "embedding_pair",
    "feature_maps",
    "pool_to_common_size",
    "reduce_kept",
    "same_features",
    "samples",
]

NORMALIZE_EPS = 1e-12  # F.normalize's default


def accumulation_dtype(value: torch.Tensor) -> torch.dtype:
    """float64 for float64 input, else float32: the dtype the references compute in."""
    return torch.float64 if value.dtype == torch.float64 else torch.float32


def reduce_kept(losses: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Per-row (or per-token) ``losses``, 0 where ``mask`` (same shape, bool) is
    False, reduced: ``"none"`` keeps them, ``"sum"`` sums them, ``"batchmean"``
    / ``"mean"`` divides the sum by the number of kept entries (at least 1)."""
    if mask is not None:
        losses = torch.where(mask, losses, torch.zeros_like(losses))
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    kept = losses.numel() if mask is None else int(mask.sum())
    return total / max(kept, 1)


def samples(name: str, value) -> torch.Tensor:
    """A non-empty ``(rows, D)`` floating-point matrix."""
    value = _validate.tensor(name, value, min_dim=2)
    if value.dim() != 2 or value.numel() == 0:
        raise ValueError(f"{name} must have shape (rows, D) with rows, D >= 1, got {tuple(value.shape)}")
    return value


def same_features(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``value`` must match ``ref`` in its last dim, dtype and device (the row counts may differ)."""
    if value.shape[-1] != ref.shape[-1]:
        raise ValueError(
            f"{name} has feature dim {value.shape[-1]} but {ref_name} has {ref.shape[-1]} "
            f"(shapes {tuple(value.shape)} and {tuple(ref.shape)})"
        )
    if value.dtype != ref.dtype:
        raise ValueError(f"{name} dtype {value.dtype} does not match {ref_name} dtype {ref.dtype}")
    _validate.same_device(name, value, ref_name, ref)


def feature_maps(name: str, value) -> torch.Tensor:
    """A non-empty ``(N, C, H, W)`` floating-point tensor."""
    value = _validate.tensor(name, value, min_dim=4)
    if value.dim() != 4 or value.numel() == 0:
        raise ValueError(f"{name} must have shape (N, C, H, W) with every dim >= 1, got {tuple(value.shape)}")
    return value


def check_map_pair(student_maps, teacher_maps) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, C_s, H, W)`` and ``(N, C_t, H', W')`` maps: channels and spatial sizes may
    differ; batch size, dtype and device may not (``ValueError`` naming the argument)."""
    s = feature_maps("student_maps", student_maps)
    t = feature_maps("teacher_maps", teacher_maps)
    if t.shape[0] != s.shape[0]:
        raise ValueError(
            f"teacher_maps batch size {t.shape[0]} does not match student_maps batch size {s.shape[0]}"
        )
    if t.dtype != s.dtype:
        raise ValueError(f"teacher_maps dtype {t.dtype} does not match student_maps dtype {s.dtype}")
    _validate.same_device("teacher_maps", t, "student_maps", s)
    return s, t


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


def checked_pair(student, teacher) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked ``(N, D_s)`` student and detached ``(N, D_t)`` teacher, flattened, in the input dtype.

    Student and teacher must agree in ``N``, dtype and device; the feature
    dimensions may differ. ``ValueError`` naming the argument otherwise (the
    fused losses check with these same words).
    """
    s = _validate.tensor("student", student, min_dim=2)
    t = _validate.tensor("teacher", teacher, min_dim=2)
    if s.shape[0] == 0:
        raise ValueError(f"student must hold at least one sample (N >= 1), got shape {tuple(s.shape)}")
    if t.shape[0] != s.shape[0]:
        raise ValueError(
            f"teacher shape {tuple(t.shape)} does not match student shape {tuple(s.shape)} in dim 0 (N)"
        )
    if t.dtype != s.dtype:
        raise ValueError(f"teacher dtype {t.dtype} does not match student dtype {s.dtype}")
    _validate.same_device("teacher", t, "student", s)
    for name, x in (("student", s), ("teacher", t)):
        if x[0].numel() == 0:
            raise ValueError(
                f"{name} must have a non-empty feature size per sample, got shape {tuple(x.shape)}"
            )
    return s.flatten(1), t.detach().flatten(1)


def embedding_pair(student, teacher) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`checked_pair` in the accumulation dtype (float32; float64 for float64 inputs).

    The relational references' contract (RKD, PKT, SP, CC): each takes
    embeddings ``student (N, ...)`` and ``teacher (N, ...)``, flattens them per
    sample to ``(N, D_s)`` and ``(N, D_t)`` (the feature sizes may differ: only
    the ``N × N`` relations are compared), treats the teacher as constant (it is
    detached, so it never receives a gradient) and returns a scalar loss in
    float32 (float64 for float64 inputs). NaN in either input gives a NaN loss
    (docs/spec.md §6)."""
    s, t = checked_pair(student, teacher)
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    return s.to(acc), t.to(acc)
