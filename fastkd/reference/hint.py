"""FitNets hint, docs/spec.md §5, as plain PyTorch with autograd."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastkd.reference._common import accumulation_dtype, pool_to_common_size


def hint_loss(adapted_student: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNets hint: ``MSE(adapter(f_s), f_t)`` given the adapted student features (docs/spec.md §5).

    4-D maps of different spatial size are pooled to the common (smaller)
    size first; the mean is over every element. Computed in float32 (float64
    for float64 inputs). ``teacher_features`` is detached: the hint is a target.
    """
    acc = accumulation_dtype(adapted_student)
    s, t = adapted_student.to(acc), teacher_features.detach().to(acc)
    if s.dim() == 4:
        s, t = pool_to_common_size(s, t)
    return F.mse_loss(s, t)
