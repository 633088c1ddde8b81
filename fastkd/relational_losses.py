"""``nn.Module`` wrappers of the relational losses (:mod:`fastkd.relational`).

Every module takes ``backend``, ``gather`` and ``process_group`` as its
functional form does (``gather=True``: the loss of the batch gathered from
every rank, :mod:`fastkd.distributed`)."""

from __future__ import annotations

import torch
from torch import nn

from fastkd import relational as R


class RKDLoss(nn.Module):
    """Module form of :func:`fastkd.rkd_loss`: ``w_d · distance + w_a · angle``.

    ``forward(student (N, ...), teacher (N, ...))`` → ``()`` loss.
    """

    def __init__(
        self,
        *,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        backend: str = "auto",
        gather: bool = False,
        process_group=None,
    ):
        super().__init__()
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight
        self.backend = backend
        self.gather = gather
        self.process_group = process_group

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return R.rkd_loss(
            student,
            teacher,
            distance_weight=self.distance_weight,
            angle_weight=self.angle_weight,
            backend=self.backend,
            gather=self.gather,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return (
            f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}, "
            f"backend={self.backend!r}"
        )


class PKTLoss(nn.Module):
    """Module form of :func:`fastkd.pkt_loss`.

    ``forward(student (N, ...), teacher (N, ...))`` → ``()`` loss.
    """

    def __init__(self, *, eps: float = 1e-7, backend: str = "auto", gather: bool = False, process_group=None):
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.gather = gather
        self.process_group = process_group

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return R.pkt_loss(
            student,
            teacher,
            eps=self.eps,
            backend=self.backend,
            gather=self.gather,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return f"eps={self.eps}, backend={self.backend!r}"


class SPLoss(nn.Module):
    """Module form of :func:`fastkd.sp_loss`.

    ``forward(student (N, ...), teacher (N, ...))`` → ``()`` loss.
    """

    def __init__(self, *, backend: str = "auto", gather: bool = False, process_group=None):
        super().__init__()
        self.backend = backend
        self.gather = gather
        self.process_group = process_group

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return R.sp_loss(
            student, teacher, backend=self.backend, gather=self.gather, process_group=self.process_group
        )

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class CCLoss(nn.Module):
    """Module form of :func:`fastkd.cc_loss` (torchdistill ``CCKDLoss`` Gaussian form).

    ``forward(student (N, ...), teacher (N, ...))`` → ``()`` loss.
    """

    def __init__(
        self,
        *,
        gamma: float = 0.4,
        order: int = 2,
        backend: str = "auto",
        gather: bool = False,
        process_group=None,
    ):
        super().__init__()
        self.gamma = gamma
        self.order = order
        self.backend = backend
        self.gather = gather
        self.process_group = process_group

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return R.cc_loss(
            student,
            teacher,
            gamma=self.gamma,
            order=self.order,
            backend=self.backend,
            gather=self.gather,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, order={self.order}, backend={self.backend!r}"
