"""Relational KD (RKD distance and angle), docs/spec.md §2, as plain PyTorch with autograd.

Every function takes and returns what the relational references share (see
``_common.embedding_pair``).

This is the oracle: it materialises whatever is convenient, up to the
``(N, N, D)`` differences and the ``(N, N, N)`` angles of RKD.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastkd import _validate
from fastkd.reference._common import NORMALIZE_EPS, embedding_pair

_PDIST_EPS = 1e-12  # RepDistiller's clamp on squared distances


def _pdist(x: torch.Tensor) -> torch.Tensor:
    """``(N, N)`` RKD distances ``sqrt(clamp(‖x_i‖² + ‖x_j‖² − 2 x_i·x_j, 1e-12))``, diagonal 0.

    The diagonal is ``0 · d_ii`` rather than a literal 0: the same value and a
    zero gradient, but a NaN sample still makes it NaN (with ``N = 1`` there
    is no off-diagonal entry to carry the NaN).
    """
    sq = x.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * (x @ x.t())).clamp(min=_PDIST_EPS).sqrt()
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return torch.where(eye, d * 0, d)


def _mean_normalised_pdist(x: torch.Tensor) -> torch.Tensor:
    """``d / mean(d[d > 0])``; with no positive entry (``N = 1``) the divisor is 1, not NaN."""
    d = _pdist(x)
    positive = d > 0
    count = positive.sum()
    total = torch.where(positive, d, torch.zeros_like(d)).sum()
    return d / torch.where(count > 0, total / count.clamp(min=1), torch.ones_like(total))


def _angles(x: torch.Tensor) -> torch.Tensor:
    """``(N, N, N)`` RKD angles ``a_ijk = e_ij · e_ik``, ``e_ij = normalize(x_j − x_i)`` (0 for ``j = i``)."""
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2, eps=NORMALIZE_EPS)  # e[i, j] = e_ij
    return torch.bmm(e, e.transpose(1, 2))


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD distance term (RepDistiller ``RKDLoss``, unweighted).

    ``d_ij = sqrt(clamp(‖x_i‖² + ‖x_j‖² − 2 x_i·x_j, min=1e-12))`` with the
    diagonal set to 0, each matrix divided by the mean of its positive entries
    (teacher and student separately), then ``smooth_l1(d_s, d_t)`` (β = 1)
    averaged over all ``N²`` entries.

    With ``N = 1`` there is no pair, so no positive distance: RepDistiller
    takes the mean of an empty set and returns NaN; here the loss is 0 with a
    zero gradient (NaN only for a NaN input). For ``N ≥ 2`` every off-diagonal
    distance is at least ``1e-6`` (the clamp), so duplicate samples are
    finite and the result equals RepDistiller's.

    Args:
        student: ``(N, ...)`` student embeddings, flattened to ``(N, D_s)``.
        teacher: ``(N, ...)`` teacher embeddings, flattened to ``(N, D_t)``.
    Returns:
        ``()`` loss, float32 (float64 for float64 inputs).
    """
    s, t = embedding_pair(student, teacher)
    return F.smooth_l1_loss(_mean_normalised_pdist(s), _mean_normalised_pdist(t), beta=1.0)


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD angle term (RepDistiller ``RKDLoss``, unweighted).

    ``e_ij = F.normalize(x_j − x_i)`` (eps 1e-12, so ``e_ii = 0``),
    ``a_ijk = e_ij · e_ik``, then ``smooth_l1(a_s, a_t)`` (β = 1) averaged over
    all ``N³`` entries, the zero ones with a repeated index included.

    ``N = 1`` gives 0 (every angle has a repeated index); ``N = 2`` is finite
    (the only non-zero angles are ``a_ijj = 1``, identical for student and
    teacher, so the loss is 0 up to rounding). Both agree with RepDistiller, which never takes
    an empty mean here. Two *distinct* samples that coincide (``x_j = x_i``,
    ``j ≠ i``) give ``e_ij = 0`` and a finite but large gradient (through
    ``x / eps``): that is ``F.normalize``'s, and RepDistiller's, behaviour.

    Arguments and result as for :func:`rkd_distance`.
    """
    s, t = embedding_pair(student, teacher)
    return F.smooth_l1_loss(_angles(s), _angles(t), beta=1.0)


def rkd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> torch.Tensor:
    """Relational KD (Park et al., CVPR 2019; RepDistiller ``RKDLoss`` defaults).

    ``w_d · rkd_distance + w_a · rkd_angle``.

    Args:
        student: ``(N, ...)`` student embeddings, flattened to ``(N, D_s)``.
        teacher: ``(N, ...)`` teacher embeddings, flattened to ``(N, D_t)``.
        distance_weight: ``w_d >= 0``.
        angle_weight: ``w_a >= 0``.
    Returns:
        ``()`` loss, float32 (float64 for float64 inputs).
    """
    distance_weight = _validate.real("distance_weight", distance_weight, low=0.0)
    angle_weight = _validate.real("angle_weight", angle_weight, low=0.0)
    return distance_weight * rkd_distance(student, teacher) + angle_weight * rkd_angle(student, teacher)
