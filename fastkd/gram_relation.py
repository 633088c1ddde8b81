"""Gram-matrix relations (docs/spec.md §2): PKT, SP and CC, their functions and modules.

Each function takes embeddings ``student (N, ...)`` and ``teacher (N, ...)``,
flattened per sample to ``(N, D_s)`` and ``(N, D_t)`` (the feature sizes may
differ: only the ``N × N`` relations are compared). The teacher is a
constant: it is detached and never receives a gradient. Losses are float32
(float64 for float64 inputs); the student's gradient comes back in its dtype.

Backends: the Gram matrices by matmul (PKT: of the normalised rows), then
row passes that compute each row's loss terms and write ``∂loss/∂G`` in place
of the student's Gram row, and ``dX = (dG + dGᵀ) X`` by matmul: ``"cpu"``
(``csrc/cpu/gram_relation.cpp``: at::mm, OpenMP row passes accumulating in
float64, float64 inputs in float64), ``"cuda"``
(``csrc/cuda/gram_relation.cu``: at::mm, one thread block per row with cub
reductions, float32) and ``"triton"`` (``kernels/gram_relation.py``: row
blocks, float32). PKT's O(N·D) normalisation gradient is ATen on ``cpu`` /
``cuda`` and autograd on ``triton``. ``backend="auto"`` picks ``"cpu"`` for
CPU tensors, ``"triton"`` for CUDA tensors (float64 on CUDA runs the
reference); an explicit backend without a kernel raises ``ValueError``.

Every module takes ``backend``, ``gather`` and ``process_group`` as its
functional form does (``gather=True``: the loss of the batch gathered from
every rank, :mod:`fastkd.distributed`).
"""

from __future__ import annotations

import functools

import torch

from fastkd import (
    _ops,  # noqa: F401  (registers the fastkd:: ops and their fake kernels)
    _validate,
)
from fastkd._backend import backend_for, kernel_op
from fastkd._module_form import LossModule
from fastkd._pairwise import StudentGradFunction, check_pair
from fastkd.reference import gram_relation as _reference

__all__ = ["CCLoss", "PKTLoss", "SPLoss", "cc_loss", "pkt_loss", "sp_loss"]

# The compiled backends with a kernel, per loss (backend="auto" runs the
# reference for the others).
PKT_KERNELS = ("cpu", "triton", "cuda")
SP_KERNELS = ("cpu", "triton", "cuda")
CC_KERNELS = ("cpu", "triton", "cuda")


def _gram_term(
    name: str, kernels, student, teacher, backend: str, gather=False, process_group=None, **kwargs
) -> torch.Tensor:
    """SP / CC / PKT on the chosen backend: ``fastkd::<stem>_forward`` (cpu, cuda),
    the Triton launcher ``<stem>_forward`` (triton), the reference where
    ``kernels`` lacks the backend under ``"auto"``; ``kwargs`` are the loss's
    hyper-parameters (the ops' and launchers' last arguments, by name)."""
    s, t = check_pair(student, teacher, gather, process_group)
    chosen = backend_for(name, kernels, backend, s)
    if chosen == "reference":
        return getattr(_reference, name)(s, t, **kwargs)
    forward = kernel_op(chosen, "gram_relation", f"{name.removesuffix('_loss')}_forward")
    op = functools.partial(forward, **kwargs)
    return StudentGradFunction.apply(s, t, op)


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

    NaN: RepDistiller sets NaN entries of ``x̂`` to 0 (docs/spec.md §2, "NaN → 0"); like
    the reference, only NaN *created* by the normalisation (an infinite
    entry, inf / inf) is zeroed; a NaN in the input still gives a NaN loss
    (docs/spec.md §6).

    Kernels as for :func:`sp_loss`, on the Gram matrix of the normalised
    rows ``x̂``; the normalisation's O(N·D) gradient is ATen tensor ops on
    ``"cpu"`` / ``"cuda"`` and autograd on ``"triton"``.

    Args:
        student: ``(N, ...)`` student embeddings, flattened to ``(N, D_s)``.
        teacher: ``(N, ...)`` teacher embeddings, flattened to ``(N, D_t)``.
        eps: ``> 0``, added to the norms and inside the log ratio.
        backend, gather, process_group: as for :func:`rkd_distance`.

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
        backend, gather, process_group: as for :func:`rkd_distance`.

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
        backend, gather, process_group: as for :func:`rkd_distance`.

    Returns:
        ``()`` loss, float32 (float64 for float64 inputs).
    """
    gamma = _validate.real("gamma", gamma, low=0.0, low_open=True)
    order = _reference.check_cc_order(order)
    return _gram_term(
        "cc_loss", CC_KERNELS, student, teacher, backend, gather, process_group, gamma=gamma, order=order
    )


class PKTLoss(LossModule):
    """Module form of :func:`fastkd.pkt_loss`.

    ``forward(student (N, ...), teacher (N, ...))`` → ``()`` loss.
    """

    loss_function = staticmethod(pkt_loss)

    def __init__(self, *, eps: float = 1e-7, backend: str = "auto", gather: bool = False, process_group=None):
        super().__init__(eps=eps, backend=backend, gather=gather, process_group=process_group)


class SPLoss(LossModule):
    """Module form of :func:`fastkd.sp_loss`.

    ``forward(student (N, ...), teacher (N, ...))`` → ``()`` loss.
    """

    loss_function = staticmethod(sp_loss)

    def __init__(self, *, backend: str = "auto", gather: bool = False, process_group=None):
        super().__init__(backend=backend, gather=gather, process_group=process_group)


class CCLoss(LossModule):
    """Module form of :func:`fastkd.cc_loss` (torchdistill ``CCKDLoss`` Gaussian form).

    ``forward(student (N, ...), teacher (N, ...))`` → ``()`` loss.
    """

    loss_function = staticmethod(cc_loss)

    def __init__(self, *, gamma: float = 0.4, order: int = 2, backend: str = "auto", gather: bool = False,
                 process_group=None):
        super().__init__(
            gamma=gamma, order=order, backend=backend, gather=gather, process_group=process_group
        )
