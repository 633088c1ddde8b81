"""Decoupled knowledge distillation (DKD, docs/spec.md §1): public loss and module.

The mathematics is :mod:`fastkd.reference.dkd`'s. Each compiled backend is one
fused call with the contract of ``fastkd::dkd_forward`` that returns the row
losses and the student gradient together; the backward only scales it:
``cpu`` (csrc/cpu/dkd.cpp), ``triton`` (kernels/dkd.py) and ``cuda``
(csrc/cuda/dkd.cu).
"""

from __future__ import annotations

import torch

from fastkd import (
    _ops,  # noqa: F401  (registers fastkd::dkd_forward and its fake kernel)
    _validate,
)
from fastkd._backend import backend_for, kernel_op
from fastkd._module_form import LossModule
from fastkd._row_loss import RowLossKernelFunction
from fastkd.reference import dkd as _reference

__all__ = ["DKD_KERNELS", "DKDLoss", "dkd_loss"]

# The compiled backends that have a DKD kernel.
DKD_KERNELS = ("cpu", "triton", "cuda")


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
        labels: ``(N,)`` integer target classes in ``[0, C)``. Checked on the
            host for CPU tensors (``ValueError``); on a GPU the kernels give a
            row with a label outside ``[0, C)`` a NaN loss and gradient, unless
            ``FASTKD_CHECK_DEVICE_VALUES=1`` asks for the host check there too
            (docs/spec.md §6; the ``"reference"`` backend always checks).
        alpha: TCKD weight, ``>= 0`` (default 1).
        beta: NCKD weight, ``>= 0`` (default 8).
        temperature: ``T > 0`` (default 4).
        reduction: ``"batchmean"`` (mean over rows), ``"sum"`` or ``"none"``.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``.
            The GPU kernels take float32 / bfloat16 / float16 (``"auto"``
            runs float64 on CUDA with the reference).

    Returns:
        float32 (float64 for float64 inputs) scalar, or ``(N,)`` for ``"none"``.
    """
    # the range of GPU labels is checked by the kernels (no device → host sync)
    label_range = not isinstance(labels, torch.Tensor) or _validate.values_checked_on_host(labels)
    s, t, y, alpha, beta, temperature = _reference.check_dkd_arguments(
        student_logits, teacher_logits, labels, alpha, beta, temperature, reduction, label_range=label_range
    )
    chosen = backend_for("dkd", DKD_KERNELS, backend, s)
    if chosen == "reference":
        # checks the labels' range itself: the reference has no in-kernel guard
        return _reference.dkd_loss(
            s, t, y, alpha=alpha, beta=beta, temperature=temperature, reduction=reduction
        )
    n = s.shape[0]
    factor = temperature**2 / (max(n, 1) if reduction == "batchmean" else 1)
    return RowLossKernelFunction.apply(
        kernel_op(chosen, "dkd", "dkd_forward"), factor, reduction == "none",
        s, t.detach(), y, alpha, beta, 1.0 / temperature, factor,
    )


class DKDLoss(LossModule):
    """Module form of :func:`dkd_loss`.

    ``forward(student_logits (N, C), teacher_logits (N, C), labels (N,))`` → loss.
    """

    loss_function = staticmethod(dkd_loss)

    def __init__(self, *, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 reduction: str = "batchmean", backend: str = "auto") -> None:
        super().__init__(
            alpha=alpha, beta=beta, temperature=temperature, reduction=reduction, backend=backend
        )
