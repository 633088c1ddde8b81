"""Decoupled knowledge distillation (DKD, SPEC §1): public loss and module.

The mathematics is :mod:`fastkd.reference.dkd`'s. The ``cpu`` backend is one
fused C++ op (``fastkd::dkd_forward``, csrc/cpu/dkd.cpp) that returns the row
losses and the student gradient in one call; the backward only scales it.
"""

from __future__ import annotations

import torch
from torch import nn

from fastkd import _ops  # noqa: F401  (registers fastkd::dkd_forward and its fake kernel)
from fastkd import functional as _functional
from fastkd.reference import dkd as _reference

__all__ = ["DKD_KERNELS", "DKDLoss", "dkd_loss"]

# The compiled backends that have a DKD kernel; on CUDA tensors
# backend="auto" uses the reference until triton / cuda get one.
DKD_KERNELS = ("cpu",)


class DKDFunction(torch.autograd.Function):
    """``(α·TCKD + β·NCKD)·T²`` per row on the fused op, then the reduction.

    The op's gradient is computed in the forward with the reduction's factor;
    the backward multiplies it by the upstream gradient (per row for ``"none"``).
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, alpha, beta, inv_temperature, factor, per_row):
        row_loss, grad = torch.ops.fastkd.dkd_forward(
            student, teacher, labels, alpha, beta, inv_temperature, factor, ctx.needs_input_grad[0]
        )
        ctx.save_for_backward(grad)
        return row_loss * factor if per_row else row_loss.sum() * factor

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        grad_student = _functional._scale_by_upstream(grad, grad_output) if ctx.needs_input_grad[0] else None
        return grad_student, None, None, None, None, None, None, None


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    reduction: str = "batchmean",
    backend: str = "auto",
) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022), mdistiller's ``dkd_loss``.

    ``DKD_i = (α·TCKD + β·NCKD)·T²`` with ``TCKD = KL(b_t ‖ b_s)`` on the
    binary target / non-target split ``b = [p_y, 1 − p_y]`` and ``NCKD`` the KL
    between the softmaxes of ``z/T − 1000·onehot(y)`` (the non-target classes).
    See :mod:`fastkd.reference.dkd`.

    Args:
        student_logits: ``(N, C)``, ``C >= 2``, float32 / bfloat16 / float16 / float64.
        teacher_logits: ``(N, C)``, same dtype and device. Gets no gradient
            (as in mdistiller, where the teacher runs under ``no_grad``).
        labels: ``(N,)`` integer target classes in ``[0, C)``.
        alpha: TCKD weight, ``>= 0`` (default 1).
        beta: NCKD weight, ``>= 0`` (default 8).
        temperature: ``T > 0`` (default 4).
        reduction: ``"batchmean"`` (mean over rows), ``"sum"`` or ``"none"``.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``; ``"cuda"`` / ``"triton"``
            have no DKD kernel yet (``"auto"`` uses the reference on CUDA
            tensors, an explicit request raises ``ValueError``).

    Returns:
        float32 (float64 for float64 inputs) scalar, or ``(N,)`` for ``"none"``.
    """
    s, t, y, alpha, beta, temperature = _reference.check_dkd_arguments(
        student_logits, teacher_logits, labels, alpha, beta, temperature, reduction
    )
    chosen = _functional._backend_for("dkd", DKD_KERNELS, backend, s)
    if chosen == "reference":
        return _reference.dkd_loss(
            s, t, y, alpha=alpha, beta=beta, temperature=temperature, reduction=reduction
        )
    n = s.shape[0]
    factor = temperature**2 / (max(n, 1) if reduction == "batchmean" else 1)
    return DKDFunction.apply(s, t.detach(), y, alpha, beta, 1.0 / temperature, factor, reduction == "none")


class DKDLoss(nn.Module):
    """Module form of :func:`dkd_loss`.

    ``forward(student_logits (N, C), teacher_logits (N, C), labels (N,))`` → loss.
    """

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        reduction: str = "batchmean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.reduction = reduction
        self.backend = backend

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        return dkd_loss(
            student_logits,
            teacher_logits,
            labels,
            alpha=self.alpha,
            beta=self.beta,
            temperature=self.temperature,
            reduction=self.reduction,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )
