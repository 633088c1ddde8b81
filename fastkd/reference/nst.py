"""Neural selectivity transfer, docs/spec.md §3, as plain PyTorch with autograd.

The ``(N, C, C')`` kernel matrices are materialised here; the fused path
(:func:`fastkd.nst_loss`) uses a closed form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastkd.reference._common import accumulation_dtype, check_map_pair, pool_to_common_size


def check_nst_arguments(student_maps, teacher_maps) -> tuple[torch.Tensor, torch.Tensor]:
    """Validates :func:`nst_loss`'s arguments (``ValueError`` naming the bad one)."""
    return check_map_pair(student_maps, teacher_maps)


def nst_features(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated maps → pooled to a common size, ``(N, C, HW)``, L2-normalised over HW.

    Computed in float32 (float64 for float64 inputs).
    """
    acc = accumulation_dtype(s)
    s, t = pool_to_common_size(s.to(acc), t.to(acc))
    return F.normalize(s.flatten(2), dim=2), F.normalize(t.flatten(2), dim=2)


def nst_loss(student_maps: torch.Tensor, teacher_maps: torch.Tensor) -> torch.Tensor:
    """Neural selectivity transfer (RepDistiller ``NSTLoss``, docs/spec.md §3).

    Both maps are adaptive-average-pooled to ``(min(H, H'), min(W, W'))``
    (for square maps: the larger map pooled to the smaller, RepDistiller's
    rule; a map already of that size is left as it is), flattened to
    ``(N, C, HW)`` and L2-normalised over ``HW`` (``F.normalize``, eps 1e-12).
    With the polynomial kernel ``k(a, b) = (a·b)²`` over channel pairs, per
    sample ``mean K(t, t) + mean K(s, s) − 2 mean K(s, t)``, averaged over N.

    This reference builds the ``(N, C, C')`` kernel matrices; the closed form
    ``Σ_{c,c'} (a_c·b_{c'})² = ⟨AᵀA, BᵀB⟩_F`` is for the fused kernels.
    Nothing is detached: RepDistiller detaches the ``K(t, t)`` term, which
    changes only the teacher's gradient; detach ``teacher_maps`` for the usual
    frozen teacher.

    Args:
        student_maps: ``(N, C_s, H, W)`` student feature maps.
        teacher_maps: ``(N, C_t, H', W')`` teacher feature maps; channel counts
            and spatial sizes may differ from the student's.
    Returns:
        ``()`` loss, float32 (float64 for float64 inputs).
    """
    s, t = check_nst_arguments(student_maps, teacher_maps)
    s, t = nst_features(s, t)

    def poly(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # (N, C_a, HW), (N, C_b, HW) → per-sample mean over channel pairs of (a_c·b_c')², (N,)
        return (a @ b.transpose(1, 2)).square().mean(dim=(1, 2))

    return (poly(t, t) + poly(s, s) - 2 * poly(s, t)).mean()
