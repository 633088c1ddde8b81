"""Hidden-state distillation (TinyBERT's MSE, DistilBERT's cosine), docs/spec.md §5.4, as plain PyTorch.

Per kept token ``i`` (``mask`` true), with ``h = projection(student_hidden)``
(the identity without a projection) and ``g = teacher_hidden``:

- ``kind="mse"`` (TinyBERT, ``MSE(H_s W_h, H_t)``): ``ℓ_i = mean_d (h_id − g_id)²``;
- ``kind="cosine"`` (DistilBERT, ``nn.CosineEmbeddingLoss`` with target 1):
  ``ℓ_i = 1 − h_i·g_i / √((h_i·h_i + ε)(g_i·g_i + ε))``, ``ε = 1e-12``.

``"mean"`` averages ``ℓ`` over the kept tokens (for ``"mse"`` that is the mean
over kept tokens × channels, ``nn.MSELoss``'s), ``"sum"`` adds them,
``"none"`` returns them with the leading shape (0 on excluded tokens).
"""

from __future__ import annotations

import torch

from fastkd import _validate
from fastkd.reference._common import reduce_kept

KINDS = ("mse", "cosine")
REDUCTIONS = ("mean", "sum", "none")
# nn.CosineEmbeddingLoss's guard on the squared norms
COSINE_EPS = 1e-12


def project(student_hidden: torch.Tensor, projection) -> torch.Tensor:
    """``projection(student_hidden)`` (a callable such as an ``nn.Linear``), or the input for None."""
    if projection is None:
        return student_hidden
    if not callable(projection):
        raise ValueError(
            f"projection must be None or a callable (e.g. nn.Linear), got {type(projection).__name__}"
        )
    out = projection(student_hidden)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"projection must return a torch.Tensor, got {type(out).__name__}")
    return out


def check_options(kind, reduction) -> None:
    _validate.choice("kind", kind, KINDS)
    _validate.choice("reduction", reduction, REDUCTIONS)


def check_arguments(student_hidden, teacher_hidden, kind, mask, reduction):
    """Validate; return ``(student, teacher, mask or None)`` (the student already projected)."""
    s = _validate.tensor("student_hidden", student_hidden, min_dim=1)
    t = _validate.tensor("teacher_hidden", teacher_hidden, min_dim=1)
    if s.shape != t.shape:
        raise ValueError(
            f"student_hidden (after projection) shape {tuple(s.shape)} does not match teacher_hidden shape "
            f"{tuple(t.shape)}"
        )
    if t.dtype != s.dtype:
        raise ValueError(f"teacher_hidden dtype {t.dtype} does not match student_hidden dtype {s.dtype}")
    _validate.same_device("teacher_hidden", t, "student_hidden", s)
    check_options(kind, reduction)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != s.shape[:-1]:
            raise ValueError(f"mask shape {tuple(mask.shape)} must be the hidden states' leading shape "
                             f"{tuple(s.shape[:-1])}")
        _validate.same_device("mask", mask, "student_hidden", s)
    return s, t, mask


def token_losses(h: torch.Tensor, g: torch.Tensor, kind: str) -> torch.Tensor:
    """``ℓ`` per token, leading shape of ``h``, in ``h``'s dtype."""
    if kind == "mse":
        return (h - g).square().mean(-1)
    dot = (h * g).sum(-1)
    norms = ((h * h).sum(-1) + COSINE_EPS) * ((g * g).sum(-1) + COSINE_EPS)
    return 1 - dot / norms.sqrt()


def hidden_state_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    kind: str = "mse",
    projection=None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """TinyBERT / DistilBERT hidden-state loss (see the module docstring).

    Args:
        student_hidden: ``(..., D_s)``.
        teacher_hidden: ``(..., D_t)``, same leading shape, dtype and device.
        kind: ``"mse"`` or ``"cosine"``.
        projection: None, or a callable mapping ``(..., D_s)`` to ``(..., D_t)``
            (TinyBERT's learnable ``W_h``, e.g. ``nn.Linear(D_s, D_t)``).
        mask: bool with the leading shape; False tokens are excluded.
        reduction: ``"mean"`` (over kept tokens), ``"sum"`` or ``"none"``.

    Returns:
        A scalar (leading shape for ``"none"``), float32 (float64 for float64
        inputs); 0 when no token is kept.
    """
    check_options(kind, reduction)
    h, g, mask = check_arguments(project(student_hidden, projection), teacher_hidden, kind, mask, reduction)
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    return reduce_kept(token_losses(h.to(acc), g.to(acc), kind), mask, reduction)
