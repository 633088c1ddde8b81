"""Hidden-state distillation: TinyBERT's MSE and DistilBERT's cosine loss, docs/spec.md §5.4.

Element-wise over the tokens and light on memory already, so it runs as plain
PyTorch (the reference) on every device.
"""

from __future__ import annotations

import torch
from torch import nn

from fastkd.reference import hidden_state as _reference

__all__ = ["HiddenStateLoss", "hidden_state_loss"]


def hidden_state_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    kind: str = "mse",
    projection=None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """TinyBERT (``kind="mse"``) or DistilBERT (``kind="cosine"``) hidden-state loss over the kept tokens.

    Per token: ``mean_d (h − g)²`` or ``1 − cos(h, g)`` (``nn.CosineEmbeddingLoss``
    with target 1), where ``h = projection(student_hidden)`` and ``g = teacher_hidden``.

    Args:
        student_hidden: ``(..., D_s)`` float32 / float64 / bfloat16 / float16.
        teacher_hidden: ``(..., D_t)``, same leading shape, dtype and device.
        kind: ``"mse"`` or ``"cosine"``.
        projection: None or a callable ``(..., D_s) → (..., D_t)`` such as
            ``nn.Linear(D_s, D_t)`` (TinyBERT's ``W_h``).
        mask: bool with the leading shape, False for excluded tokens (padding).
        reduction: ``"mean"`` over the kept tokens (for ``"mse"`` the mean over
            their channels too, ``nn.MSELoss``'s), ``"sum"``, or ``"none"``
            (the leading shape, 0 for excluded tokens).

    Returns:
        float32 scalar (float64 for float64 inputs); 0 when no token is kept.
    """
    return _reference.hidden_state_loss(student_hidden, teacher_hidden, kind=kind, projection=projection,
                                        mask=mask, reduction=reduction)


class HiddenStateLoss(nn.Module):
    """Module form of :func:`hidden_state_loss`, with TinyBERT's learnable projection.

    ``HiddenStateLoss(kind, student_dim=D_s, teacher_dim=D_t)`` holds
    ``projection = nn.Linear(D_s, D_t)`` (train it with the student); without
    dims there is no projection and the widths must match.
    ``forward(student_hidden, teacher_hidden, mask=None)``.
    """

    def __init__(self, kind: str = "mse", *, student_dim: int | None = None, teacher_dim: int | None = None,
                 reduction: str = "mean"):
        super().__init__()
        _reference.check_options(kind, reduction)
        if (student_dim is None) != (teacher_dim is None):
            raise ValueError("student_dim and teacher_dim must be given together (or neither)")
        self.projection = None
        if student_dim is not None:
            for name, value in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{name} must be an int >= 1, got {value!r}")
            self.projection = nn.Linear(student_dim, teacher_dim)
        self.kind = kind
        self.reduction = reduction

    def forward(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return hidden_state_loss(student_hidden, teacher_hidden, kind=self.kind, projection=self.projection,
                                 mask=mask, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, reduction={self.reduction!r}"
