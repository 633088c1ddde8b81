"""Relational losses (SPEC §2): RKD distance and angle, PKT, SP, CC.

Each function takes embeddings ``student (N, ...)`` and ``teacher (N, ...)``,
flattened per sample to ``(N, D_s)`` and ``(N, D_t)`` (the feature sizes may
differ: only the ``N × N`` relations are compared). The teacher is a constant:
it is detached and never receives a gradient. Losses are float32 (float64 for
float64 inputs); the student's gradient comes back in its dtype.

Backends: every term has fused kernels built on Gram matrices with O(N²)
memory, which return the student's gradient from the same call:
``"cpu"`` for CPU tensors, ``"triton"`` and ``"cuda"`` for CUDA tensors.

- RKD distance and angle: ``csrc/cpu/relational.cpp``,
  ``kernels/relational.py``, ``csrc/cuda/relational.cu``.
- PKT, SP, CC: the Gram matrices by matmul (PKT: of the normalised rows),
  then row passes that compute each row's loss terms and write ``∂loss/∂G``
  in place of the student's Gram row, and ``dX = (dG + dGᵀ) X`` by matmul:
  ``"cpu"`` (``csrc/cpu/relational_losses.cpp``: at::mm, OpenMP row passes
  accumulating in float64, float64 inputs in float64), ``"cuda"``
  (``csrc/cuda/relational_losses.cu``: at::mm, one thread block per row with
  cub reductions, float32) and ``"triton"`` (``kernels/relational.py``: row
  blocks, float32). PKT's O(N·D) normalisation gradient is ATen on ``cpu`` /
  ``cuda`` and autograd on ``triton``.

``backend="auto"`` picks the device's first backend (``"cpu"`` for CPU
tensors, ``"triton"`` for CUDA tensors; float64 on CUDA runs the reference);
an explicit backend without a kernel raises ``ValueError``.
"""

from __future__ import annotations

import functools

import torch

from fastkd import (
    _ops,  # noqa: F401  (registers the fastkd:: ops and their fake kernels)
    _validate,
)
from fastkd import distributed as _distributed
from fastkd.functional import _backend_for
from fastkd.reference import relational as _reference

__all__ = ["cc_loss", "pkt_loss", "rkd_angle", "rkd_distance", "rkd_loss", "sp_loss"]

# The compiled backends with a kernel, per loss (backend="auto" runs the
# reference for the others).
RKD_KERNELS = ("cpu", "triton", "cuda")
PKT_KERNELS = ("cpu", "triton", "cuda")
SP_KERNELS = ("cpu", "triton", "cuda")
CC_KERNELS = ("cpu", "triton", "cuda")


def _check_pair(student, teacher, gather=False, process_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, D_s)`` student and detached ``(N, D_t)`` teacher views, in the input dtype.

    The same checks (and messages) as the reference: floating dtype, at least
    2-D, ``N >= 1`` and equal on both sides, same dtype and device, non-empty
    features. With ``gather``, the whole batch from every rank of
    ``process_group`` (:func:`fastkd.distributed.gather_batch`).
    """
    if not isinstance(gather, bool):
        raise ValueError(f"gather must be a bool, got {type(gather).__name__}")
    s = _validate.tensor("student", student, min_dim=2)
    t = _validate.tensor("teacher", teacher, min_dim=2)
    if s.shape[0] == 0:
        raise ValueError(f"student must hold at least one sample (N >= 1), got shape {tuple(s.shape)}")
    if t.shape[0] != s.shape[0]:
        raise ValueError(
            f"teacher shape {tuple(t.shape)} does not match student shape {tuple(s.shape)} in dim 0 (N)"
        )
    if t.dtype != s.dtype:
        raise ValueError(f"teacher dtype {t.dtype} does not match student dtype {s.dtype}")
    _validate.same_device("teacher", t, "student", s)
    for name, x in (("student", s), ("teacher", t)):
        if x[0].numel() == 0:
            raise ValueError(
                f"{name} must have a non-empty feature size per sample, got shape {tuple(x.shape)}"
            )
    s, t = s.flatten(1), t.detach().flatten(1)
    if gather:
        s, t = _distributed.gather_batch(s, t, process_group)
    return s, t


class RKDFunction(torch.autograd.Function):
    """One relational term (RKD, PKT, SP, CC) on its fused op: the op
    returns the loss and, when the student needs it, the student's gradient
    (computed in the same call).

    Between forward and backward only that ``(N, D_s)`` gradient is kept.
    The backward returns a new tensor ``grad · grad_output`` and never writes
    to the saved one, so a second backward through a retained graph
    (``retain_graph=True``) gives the same gradient again.
    """

    @staticmethod
    def forward(ctx, student, teacher, op):
        loss, grad = op(student, teacher, ctx.needs_input_grad[0])
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad * grad_output.to(grad.dtype), None, None


def _rkd_op(name: str, backend: str):
    """The ``fastkd::<name>_forward`` contract on ``backend``: the op (cpu, cuda) or the Triton launcher."""
    if backend == "triton":
        from fastkd.kernels import relational as triton_relational

        return getattr(triton_relational, f"{name}_forward")
    return getattr(torch.ops.fastkd, f"{name}_forward")


def _rkd_term(name: str, student, teacher, backend: str, gather=False, process_group=None) -> torch.Tensor:
    s, t = _check_pair(student, teacher, gather, process_group)
    chosen = _backend_for(name, RKD_KERNELS, backend, s)
    if chosen == "reference":
        return getattr(_reference, name)(s, t)
    return RKDFunction.apply(s, t, _rkd_op(name, chosen))


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

    Args:
        student: ``(N, ...)`` student embeddings, flattened to ``(N, D_s)``;
            float32 / bfloat16 / float16 / float64.
        teacher: ``(N, ...)`` teacher embeddings, flattened to ``(N, D_t)``;
            same dtype and device (a constant: no gradient).
        backend, gather, process_group: as for :func:`rkd_distance`.

    Returns:
        ``()`` loss, float32 (float64 for float64 inputs).
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
        student, teacher = _check_pair(student, teacher, gather, process_group)
    loss = None
    if distance_weight > 0 or angle_weight == 0:
        loss = distance_weight * rkd_distance(student, teacher, backend=backend)
    if angle_weight > 0:
        angle = angle_weight * rkd_angle(student, teacher, backend=backend)
        loss = angle if loss is None else loss + angle
    return loss


def _gram_term(
    name: str, kernels, student, teacher, backend: str, gather=False, process_group=None, **kwargs
) -> torch.Tensor:
    """SP / CC / PKT on the chosen backend: ``fastkd::<stem>_forward`` (cpu, cuda),
    the Triton launcher ``<stem>_forward`` (triton), the reference where
    ``kernels`` lacks the backend under ``"auto"``; ``kwargs`` are the loss's
    hyper-parameters (the ops' and launchers' last arguments, by name)."""
    s, t = _check_pair(student, teacher, gather, process_group)
    chosen = _backend_for(name, kernels, backend, s)
    if chosen == "reference":
        return getattr(_reference, name)(s, t, **kwargs)
    return RKDFunction.apply(s, t, functools.partial(_rkd_op(name.removesuffix("_loss"), chosen), **kwargs))


def pkt_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    eps: float = 1e-7,
    backend: str = "auto",
    gather: bool = False,
    process_group=None,
) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018; RepDistiller ``PKT``).

    ``x̂ = x / (‖x‖ + eps)``, ``S = max((x̂ x̂ᵀ + 1) / 2, 0)``, ``P = S / rowsum(S)``,
    ``L = mean_ij P_t log((P_t + eps) / (P_s + eps))`` over all ``N²`` entries.

    NaN: RepDistiller sets NaN entries of ``x̂`` to 0 (SPEC §2, "NaN → 0"); like
    the reference, only NaN *created* by the normalisation (an infinite
    entry, inf / inf) is zeroed; a NaN in the input still gives a NaN loss
    (SPEC §6).

    Kernels as for :func:`sp_loss`, on the Gram matrix of the normalised
    rows ``x̂``; the normalisation's O(N·D) gradient is ATen tensor ops on
    ``"cpu"`` / ``"cuda"`` and autograd on ``"triton"``.

    Args:
        student: ``(N, ...)`` student embeddings, flattened to ``(N, D_s)``.
        teacher: ``(N, ...)`` teacher embeddings, flattened to ``(N, D_t)``.
        eps: ``> 0``, added to the norms and inside the log ratio.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``
            (as for :func:`rkd_distance`).
        gather, process_group: as for :func:`rkd_distance`.

    Returns:
        ``()`` loss, float32 (float64 for float64 inputs).
    """
    eps = _validate.real("eps", eps, low=0.0, low_open=True)
    return _gram_term("pkt_loss", PKT_KERNELS, student, teacher, backend, gather, process_group, eps=eps)


def sp_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    backend: str = "auto",
    gather: bool = False,
    process_group=None,
) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori, ICCV 2019; RepDistiller ``Similarity``).

    ``G = F.normalize(X Xᵀ)`` row-wise per side, ``L = ‖G_t − G_s‖²_F / N²``.
    The kernels (``"cpu"``, ``"cuda"``, ``"triton"``) form both Gram
    matrices by matmul, then one row pass computes the row's norms, loss
    terms and ``∂loss/∂G_s`` (written over ``G_s``), and
    ``dX = (dG + dGᵀ) X`` by matmul: O(N²) memory, where the reference's
    autograd keeps the normalised matrices and their difference.

    Args:
        student: ``(N, ...)`` student embeddings, flattened to ``(N, D_s)``.
        teacher: ``(N, ...)`` teacher embeddings, flattened to ``(N, D_t)``.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``
            (as for :func:`rkd_distance`).
        gather, process_group: as for :func:`rkd_distance`.

    Returns:
        ``()`` loss, float32 (float64 for float64 inputs).
    """
    return _gram_term("sp_loss", SP_KERNELS, student, teacher, backend, gather, process_group)


def cc_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    gamma: float = 0.4,
    order: int = 2,
    backend: str = "auto",
    gather: bool = False,
    process_group=None,
) -> torch.Tensor:
    """Correlation congruence (Peng et al., ICCV 2019), torchdistill ``CCKDLoss`` Gaussian form.

    ``K_ij = exp(−2γ) Σ_{p=0..P} (2γ)^p / p! · (x_i·x_j)^p`` per side (the
    Taylor expansion of the Gaussian RBF, on the embeddings as given),
    ``L = ‖K_s − K_t‖_F / N²`` (the norm, not its square); see
    :func:`fastkd.reference.cc_loss`. Kernels as for :func:`sp_loss` (the
    row pass forms ``K`` by Horner's rule; the norm's factor is applied to
    ``∂loss/∂G_s`` once the norm is known).

    Args:
        student: ``(N, ...)`` student embeddings, flattened to ``(N, D_s)``.
        teacher: ``(N, ...)`` teacher embeddings, flattened to ``(N, D_t)``.
        gamma: RBF parameter ``γ > 0``.
        order: Taylor order ``1 <= P <= 170`` (an int; 171! overflows float64).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``
            (as for :func:`rkd_distance`).
        gather, process_group: as for :func:`rkd_distance`.

    Returns:
        ``()`` loss, float32 (float64 for float64 inputs).
    """
    gamma = _validate.real("gamma", gamma, low=0.0, low_open=True)
    order = _reference.check_cc_order(order)
    return _gram_term(
        "cc_loss", CC_KERNELS, student, teacher, backend, gather, process_group, gamma=gamma, order=order
    )
