"""Gram-matrix relations (PKT, SP, CC), docs/spec.md §2, as plain PyTorch with autograd.

Every function takes and returns what the relational references share (see
``_common.embedding_pair``).

This is the oracle: it materialises whatever is convenient (the ``N × N``
matrices and their normalised forms).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from fastkd import _validate
from fastkd.reference._common import NORMALIZE_EPS, embedding_pair


def _pkt_probabilities(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``(N, N)`` row-stochastic ``P = S / rowsum(S)``, ``S = max((x̂ x̂ᵀ + 1) / 2, 0)``."""
    # vector_norm rather than sqrt(sum x²): same value, but a zero row gets a
    # finite gradient (x / eps) instead of sqrt'(0) · 0 = NaN.
    xh = x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + eps)
    # RepDistiller sets NaN entries of x̂ to 0. From a non-NaN row they come
    # from an infinite entry (inf / inf); a row with a NaN input stays NaN
    # (docs/spec.md §6: NaN is never silently dropped).
    made_nan = torch.isnan(xh) & ~torch.isnan(x).any(1, keepdim=True)
    xh = torch.where(made_nan, torch.zeros_like(xh), xh)
    # The cosine of two antipodal rows can round below -1: clamping S at 0
    # keeps P >= 0 (log(P + eps) is finite); no gradient flows through a
    # clamped entry (clamp_min's subgradient).
    sim = ((xh @ xh.t() + 1) / 2).clamp_min(0)
    return sim / sim.sum(1, keepdim=True)

def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, *, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018; RepDistiller ``PKT``).

    ``x̂ = x / (‖x‖ + eps)``, ``S = max((x̂ x̂ᵀ + 1) / 2, 0)``, ``P = S / rowsum(S)``,
    ``L = mean_ij P_t log((P_t + eps) / (P_s + eps))`` over all ``N²``
    entries, the diagonal included. ``rowsum(S) >= S_ii >= 1/2``, so every
    ``N >= 1`` is finite (``N = 1``: ``P = 1`` on both sides, loss 0).

    Args (besides the embeddings, see ``_common.embedding_pair``):
        eps: ``> 0``, added to the norms and inside the log ratio.
    """
    eps = _validate.real("eps", eps, low=0.0, low_open=True)
    s, t = embedding_pair(student, teacher)
    p_s, p_t = _pkt_probabilities(s, eps), _pkt_probabilities(t, eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()

def sp_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori, ICCV 2019; RepDistiller ``Similarity``).

    ``G = F.normalize(X Xᵀ)`` row-wise (L2, eps 1e-12) for each side,
    ``L = ‖G_t − G_s‖²_F / N²``. RepDistiller returns a ``(1,)`` tensor; this
    returns the same value as a scalar.

    Arguments and result: see ``_common.embedding_pair``.
    """
    s, t = embedding_pair(student, teacher)
    g_s = F.normalize(s @ s.t(), p=2, dim=1, eps=NORMALIZE_EPS)
    g_t = F.normalize(t @ t.t(), p=2, dim=1, eps=NORMALIZE_EPS)
    return (g_t - g_s).pow(2).sum() / s.shape[0] ** 2

# CC's largest Taylor order: the coefficient (2γ)^p / p! needs p! as a float64,
# which overflows beyond 170! (and every backend's cost grows with the order).
CC_MAX_ORDER = 170

def check_cc_order(order) -> int:
    """``order`` as an int in ``[1, CC_MAX_ORDER]``, or a ``ValueError`` naming it."""
    if isinstance(order, bool) or not isinstance(order, numbers.Integral):
        raise ValueError(f"order must be an int, got {type(order).__name__}")
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    if order > CC_MAX_ORDER:
        raise ValueError(
            f"order must be <= {CC_MAX_ORDER} (p! overflows float64 for p > {CC_MAX_ORDER}), got {order}"
        )
    return int(order)

def _cc_matrix(x: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """``(N, N)`` ``K_ij = exp(−2γ) Σ_{p=0..P} (2γ)^p / p! · (x_i·x_j)^p``."""
    gram = x @ x.t()
    k = torch.ones_like(gram)
    for p in range(1, order + 1):
        k = k + (2 * gamma) ** p / math.factorial(p) * gram.pow(p)
    return math.exp(-2 * gamma) * k

def cc_loss(
    student: torch.Tensor, teacher: torch.Tensor, *, gamma: float = 0.4, order: int = 2
) -> torch.Tensor:
    """Correlation congruence (Peng et al., ICCV 2019), torchdistill ``CCKDLoss`` Gaussian form.

    The form used is torchdistill's ``CCKDLoss`` with ``kernel_config
    {type: 'gaussian', gamma, max_p}`` and ``reduction='batchmean'``
    (``torchdistill/losses/mid_level.py``; ``compute_cc_mat_by_gaussian_rbf``
    and ``forward``): the correlation matrix is the ``P``-th order Taylor
    expansion of the Gaussian RBF ``exp(−γ‖x_i − x_j‖²)`` for unit vectors,

        ``K_ij = exp(−2γ) Σ_{p=0..P} (2γ)^p / p! · (x_i·x_j)^p``,

    applied to the embeddings as given (torchdistill does not normalise them;
    its ``Linear4CCKD`` wrapper only projects), and

        ``L = ‖K_s − K_t‖_F / N²``

    (``torch.dist(K_s, K_t, 2) / batch_size ** 2``): the Frobenius norm
    itself, not its square. Where ``K_s = K_t`` the norm is not
    differentiable; autograd returns a zero gradient there.

    Other "CC" codes differ: RepDistiller's ``Correlation`` is not this
    kernel, and the Knowledge-Distillation-Zoo variant L2-normalises the
    features and takes an MSE.

    Args (besides the embeddings, see ``_common.embedding_pair``):
        gamma: RBF parameter ``γ > 0``.
        order: Taylor order ``1 <= P <= 170`` (an int; 171! overflows float64).
    """
    gamma = _validate.real("gamma", gamma, low=0.0, low_open=True)
    order = check_cc_order(order)
    s, t = embedding_pair(student, teacher)
    diff = _cc_matrix(s, gamma, order) - _cc_matrix(t, gamma, order)
    return torch.linalg.vector_norm(diff) / s.shape[0] ** 2
