"""Relational KD (docs/spec.md §2): RKD distance and angle, :func:`rkd_loss` and :class:`RKDLoss`.

Each function takes embeddings ``student (N, ...)`` and ``teacher (N, ...)``,
flattened per sample to ``(N, D_s)`` and ``(N, D_t)`` (the feature sizes may
differ: only the relations between samples are compared). The teacher is a
constant: it is detached and never receives a gradient. Losses are float32
(float64 for float64 inputs); the student's gradient comes back in its dtype.

Backends: fused kernels built on Gram matrices with O(N²) memory, which
return the student's gradient from the same call: ``"cpu"``
(``csrc/cpu/rkd.cpp``), ``"triton"`` (``kernels/rkd.py``) and ``"cuda"``
(``csrc/cuda/rkd.cu``), ``"cpu"`` for CPU tensors and ``"triton"`` for CUDA
tensors under ``backend="auto"`` (float64 on CUDA runs the reference); an
explicit backend without a kernel raises ``ValueError``.
"""

from __future__ import annotations

import torch

from fastkd import (
    _ops,  # noqa: F401  (registers the fastkd:: ops and their fake kernels)
    _validate,
)
from fastkd._backend import backend_for, kernel_op
from fastkd._module_form import LossModule
from fastkd._pairwise import StudentGradFunction, check_pair
from fastkd.reference import rkd as _reference

__all__ = ["RKDLoss", "rkd_angle", "rkd_distance", "rkd_loss"]

# The compiled backends with an RKD kernel (backend="auto" runs the reference
# for the others).
RKD_KERNELS = ("cpu", "triton", "cuda")


def _rkd_term(name: str, student, teacher, backend: str, gather=False, process_group=None) -> torch.Tensor:
    s, t = check_pair(student, teacher, gather, process_group)
    chosen = backend_for(name, RKD_KERNELS, backend, s)
    if chosen == "reference":
        return getattr(_reference, name)(s, t)
    return StudentGradFunction.apply(s, t, kernel_op(chosen, "rkd", f"{name}_forward"))


def rkd_distance(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    backend: str = "auto",
    gather: bool = False,
    process_group=None,
) -> torch.Tensor:
    """RKD distance term (Park et al., CVPR 2019; RepDistiller ``RKDLoss``, unweighted).

    ``d_ij = sqrt(clamp(‖x_i‖² + ‖x_j‖² − 2 x_i·x_j, min=1e-12))``, diagonal 0,
    each side divided by the mean of its positive entries, then
    ``smooth_l1(d_s, d_t)`` (β = 1) over all ``N²`` entries. ``N = 1`` gives 0
    (RepDistiller: NaN, the mean of an empty set); see
    :func:`fastkd.reference.rkd_distance`.

    The kernels work from the Gram matrices of the centred embeddings with
    O(N²) memory and return the gradient from the same pass;
    pairs too close for the Gram form's rounding are recomputed from their
    differences (exact duplicates are exactly at the 1e-6 clamp, as in the
    reference).

    Args:
        student: ``(N, ...)`` student embeddings, flattened to ``(N, D_s)``;
            float32 / bfloat16 / float16 / float64.
        teacher: ``(N, ...)`` teacher embeddings, flattened to ``(N, D_t)``;
            same dtype and device (a constant: no gradient).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``
            (``"auto"``: ``"cpu"`` for CPU tensors, ``"triton"`` for CUDA
            tensors; float64 on CUDA runs the reference).
        gather: compute the loss of the batch gathered from every rank of
            ``process_group`` (same ``N`` on each; see :mod:`fastkd.distributed`
            for the gradient convention).
        process_group: the ``torch.distributed`` group (default: the world).

    Returns:
        ``()`` loss, float32 (float64 for float64 inputs).
    """
    return _rkd_term("rkd_distance", student, teacher, backend, gather, process_group)


def rkd_angle(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    backend: str = "auto",
    gather: bool = False,
    process_group=None,
) -> torch.Tensor:
    """RKD angle term (Park et al., CVPR 2019; RepDistiller ``RKDLoss``, unweighted).

    ``e_ij = F.normalize(x_j − x_i)`` (eps 1e-12, so ``e_ii = 0``),
    ``a_ijk = e_ij · e_ik``, ``smooth_l1(a_s, a_t)`` (β = 1) over all ``N³``
    angles, the zero ones with a repeated index included.

    The kernels never form the ``(N, N, D)`` differences nor the
    ``(N, N, N)`` angles: with ``G = X Xᵀ`` of the centred embeddings,
    ``(x_j − x_i)·(x_k − x_i) = G_jk − G_ij − G_ik + G_ii``, so each anchor's
    angles come from rows of G (O(N³) arithmetic, O(N²) memory), and the
    gradient is accumulated into ``dG`` and mapped back as ``dX = (dG + dGᵀ) X``.
    G is formed in float64 and split into two float32 halves, which keeps the
    numerators of nearby samples accurate; samples that coincide exactly give
    0 angles (and F.normalize's ``1 / eps`` gradient) as in the reference.
    Extra memory: about ``(9 + threads) · N² · 4`` bytes for float32 on
    ``"cpu"``, ``(8 + P) · N² · 4`` with ``P ≤ 8`` anchor chunks on
    ``"triton"`` and ``"cuda"`` (plus the float64 Gram matrices while they
    are split).

    Arguments and result as for :func:`rkd_distance`.
    """
    return _rkd_term("rkd_angle", student, teacher, backend, gather, process_group)


def rkd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    backend: str = "auto",
    gather: bool = False,
    process_group=None,
) -> torch.Tensor:
    """Relational KD, ``w_d · rkd_distance + w_a · rkd_angle`` (RepDistiller ``RKDLoss`` defaults).

    A term whose weight is 0 is not computed (the other one still carries a
    NaN input into the loss), except that with both weights 0 the distance
    term is, so that NaN still gives NaN.

    Args:
        student: ``(N, ...)`` student embeddings, flattened to ``(N, D_s)``.
        teacher: ``(N, ...)`` teacher embeddings, flattened to ``(N, D_t)``.
        distance_weight: ``w_d >= 0``.
        angle_weight: ``w_a >= 0``.
        backend, gather, process_group: as for :func:`rkd_distance` (the batch
            is gathered once for both terms).

    Returns:
        ``()`` loss, float32 (float64 for float64 inputs).
    """
    distance_weight = _validate.real("distance_weight", distance_weight, low=0.0)
    angle_weight = _validate.real("angle_weight", angle_weight, low=0.0)
    if gather:
        student, teacher = check_pair(student, teacher, gather, process_group)
    loss = None
    if distance_weight > 0 or angle_weight == 0:
        loss = distance_weight * rkd_distance(student, teacher, backend=backend)
    if angle_weight > 0:
        angle = angle_weight * rkd_angle(student, teacher, backend=backend)
        loss = angle if loss is None else loss + angle
    return loss


class RKDLoss(LossModule):
    """Module form of :func:`fastkd.rkd_loss`: ``w_d · distance + w_a · angle``.

    ``forward(student (N, ...), teacher (N, ...))`` → ``()`` loss.
    """

    loss_function = staticmethod(rkd_loss)

    def __init__(self, *, distance_weight: float = 25.0, angle_weight: float = 50.0, backend: str = "auto",
                 gather: bool = False, process_group=None):
        super().__init__(distance_weight=distance_weight, angle_weight=angle_weight, backend=backend,
                         gather=gather, process_group=process_group)
