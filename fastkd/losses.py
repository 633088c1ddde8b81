"""``nn.Module`` wrappers that hold a loss's hyper-parameters."""

from __future__ import annotations

import torch
from torch import nn

from fastkd import functional as F


def _flag(name: str, value) -> bool:
    """``value`` if it is a bool, else ``ValueError`` naming the argument."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {type(value).__name__}")
    return value


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
        teacher_weights=None,
    ) -> torch.Tensor:
        """``teacher_logits`` ``(..., V)``, or ``(K, ..., V)`` for a mixture of K
        teachers weighted by ``teacher_weights`` (see :func:`fastkd.divergence`)."""
        return F.divergence(
            student_logits,
            teacher_logits,
            teacher_weights=teacher_weights,
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

    ``forward(q (N, D), k (M, D), labels=None)`` → ``()`` loss. With
    ``gather=True`` the negatives span every rank of ``process_group``
    (default: the world), as :func:`fastkd.info_nce`'s ``gather``.
    """

    def __init__(
        self,
        *,
        temperature: float = 0.07,
        symmetric: bool = False,
        normalize: bool = False,
        backend: str = "auto",
        gather: bool = False,
        process_group=None,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.symmetric = symmetric
        self.normalize = normalize
        self.backend = backend
        self.gather = _flag("gather", gather)
        self.process_group = process_group

    def forward(self, q: torch.Tensor, k: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return F.info_nce(
            q,
            k,
            temperature=self.temperature,
            labels=labels,
            symmetric=self.symmetric,
            normalize=self.normalize,
            backend=self.backend,
            gather=self.gather,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, symmetric={self.symmetric}, "
            f"normalize={self.normalize}, backend={self.backend!r}, gather={self.gather}"
        )


class MMDLoss(nn.Module):
    """Module form of :func:`fastkd.mmd_loss`; keyword arguments as there.

    ``forward(x (N, D), y (M, D))`` → ``()`` loss. With ``gather=True`` the
    samples of every rank of ``process_group`` (default: the world) are
    compared, as :func:`fastkd.mmd_loss`'s ``gather``.
    """

    def __init__(
        self,
        *,
        kernel: str = "gaussian",
        bandwidths: float | tuple[float, ...] = F._reference_mmd.DEFAULT_BANDWIDTHS,
        unbiased: bool = False,
        degree: int = 2,
        c: float = 1.0,
        backend: str = "auto",
        gather: bool = False,
        process_group=None,
    ) -> None:
        super().__init__()
        self.kernel = kernel
        self.bandwidths = bandwidths
        self.unbiased = unbiased
        self.degree = degree
        self.c = c
        self.backend = backend
        self.gather = _flag("gather", gather)
        self.process_group = process_group

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mmd_loss(
            x,
            y,
            kernel=self.kernel,
            bandwidths=self.bandwidths,
            unbiased=self.unbiased,
            degree=self.degree,
            c=self.c,
            backend=self.backend,
            gather=self.gather,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        params = (
            f"degree={self.degree}, c={self.c}"
            if self.kernel == "polynomial"
            else f"bandwidths={self.bandwidths}"
        )
        return (
            f"kernel={self.kernel!r}, {params}, unbiased={self.unbiased}, backend={self.backend!r}, "
            f"gather={self.gather}"
        )


class NSTLoss(nn.Module):
    """Module form of :func:`fastkd.nst_loss`.

    ``forward(student_maps (N, C_s, H, W), teacher_maps (N, C_t, H', W'))`` → ``()`` loss.
    """

    def __init__(self, *, backend: str = "auto") -> None:
        super().__init__()
        self.backend = backend

    def forward(self, student_maps: torch.Tensor, teacher_maps: torch.Tensor) -> torch.Tensor:
        return F.nst_loss(student_maps, teacher_maps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
