"""``nn.Module`` wrappers that hold a loss's hyper-parameters."""

from __future__ import annotations

import torch
from torch import nn

from fastkd import functional as F


class DivergenceLoss(nn.Module):
    """Module form of :func:`fastkd.divergence`; keyword arguments as there.

    ``forward(student_logits (..., V), teacher_logits (..., V), labels=None, mask=None)``
    """

    def __init__(
        self,
        *,
        divergence: str = "kl",
        temperature: float = 1.0,
        beta: float = 0.5,
        alpha: float = 0.1,
        scale: float | None = None,
        reduction: str = "batchmean",
        ignore_index: int = -100,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.divergence = divergence
        self.temperature = temperature
        self.beta = beta
        self.alpha = alpha
        self.scale = scale
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.backend = backend

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return F.divergence(
            student_logits,
            teacher_logits,
            divergence=self.divergence,
            temperature=self.temperature,
            beta=self.beta,
            alpha=self.alpha,
            scale=self.scale,
            reduction=self.reduction,
            labels=labels,
            ignore_index=self.ignore_index,
            mask=mask,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, temperature={self.temperature}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )


class KDLoss(DivergenceLoss):
    """Hinton KD (:func:`fastkd.kd_loss`): ``T² · KL(p‖q)``, batchmean, ``T=4`` by default."""

    def __init__(self, *, temperature: float = 4.0, **kwargs) -> None:
        if "divergence" in kwargs:
            raise ValueError("KDLoss is KL divergence; use DivergenceLoss(divergence=...) for others")
        super().__init__(divergence="kl", temperature=temperature, **kwargs)


class InfoNCELoss(nn.Module):
    """Module form of :func:`fastkd.info_nce`; keyword arguments as there.

    ``forward(q (N, D), k (M, D), labels=None)`` → ``()`` loss.
    """

    def __init__(
        self,
        *,
        temperature: float = 0.07,
        symmetric: bool = False,
        normalize: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.symmetric = symmetric
        self.normalize = normalize
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return F.info_nce(
            q,
            k,
            temperature=self.temperature,
            labels=labels,
            symmetric=self.symmetric,
            normalize=self.normalize,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, symmetric={self.symmetric}, "
            f"normalize={self.normalize}, backend={self.backend!r}"
        )
