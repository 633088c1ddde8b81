"""InfoNCE / CLIP, docs/spec.md §4,, as plain PyTorch with autograd.

The ``(N, M)`` similarity matrix is materialised here; the fused kernels keep
only O(N) state between forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastkd import _validate
from fastkd.reference._common import accumulation_dtype, same_features, samples


def _labels(value, n: int, m: int, ref: torch.Tensor, check_range: bool) -> torch.Tensor:
    """``(N,)`` integer indices of the positive key of each query, in [0, M)
    (the range checked only with ``check_range``: reading the values of a GPU
    tensor synchronises it with the host)."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {value.dtype}")
    if value.shape != (n,):
        raise ValueError(f"labels shape {tuple(value.shape)} must be (N,) = ({n},), one per row of q")
    _validate.same_device("labels", value, "q", ref)
    if check_range and bool(((value < 0) | (value >= m)).any()):
        raise ValueError(f"labels must lie in [0, M) = [0, {m}), got values in "
                         f"[{int(value.min())}, {int(value.max())}]")
    return value.long()


def _one_direction(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # L = mean_i (lse_j logits_ij − logits_{i, y_i})
    positive = logits.gather(1, labels[:, None]).squeeze(1)
    return (torch.logsumexp(logits, dim=1) - positive).mean()


def check_arguments(q, k, temperature, labels, symmetric, normalize, *, label_range: bool = True):
    """Validates InfoNCE's arguments (``ValueError`` naming the argument).

    Returns ``(q, k, temperature, labels)`` with ``temperature`` a float and
    ``labels`` an int64 ``(N,)`` tensor (``arange(N)`` when not given).
    Shared with the fused backends (:func:`fastkd.info_nce`), which pass
    ``label_range=False`` where their kernels guard the labels' range instead
    (docs/spec.md §6); the reference gathers with the labels and always checks.
    """
    q = samples("q", q)
    k = samples("k", k)
    same_features("k", k, "q", q)
    temperature = _validate.real("temperature", temperature, low=0.0, low_open=True)
    for name, flag in (("symmetric", symmetric), ("normalize", normalize)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {type(flag).__name__}")
    n, m = q.shape[0], k.shape[0]
    if symmetric and labels is not None:
        raise ValueError("labels must be None when symmetric=True (the positives are the diagonal)")
    if symmetric and m != n:
        raise ValueError(f"symmetric=True needs as many rows in k as in q, got k with {m} and q with {n}")
    if labels is None:
        if m < n:
            raise ValueError(f"k must have at least as many rows as q without labels, got {m} < {n}")
        labels = torch.arange(n, device=q.device)
    else:
        labels = _labels(labels, n, m, q, label_range)
    return q, k, temperature, labels


def info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    temperature: float = 0.07,
    labels: torch.Tensor | None = None,
    symmetric: bool = False,
    normalize: bool = False,
) -> torch.Tensor:
    """InfoNCE with in-batch negatives (docs/spec.md §4).

    ``logits = q kᵀ / τ`` and ``L = mean_i (lse_j logits_ij − logits_{i, y_i})``,
    i.e. ``F.cross_entropy(q @ k.T / τ, y)``, where ``y = labels`` or, without
    labels, ``y_i = i`` (positives on the diagonal; keys beyond the N-th are
    extra negatives). ``symmetric=True`` averages it with the key→query
    direction, ``F.cross_entropy(k @ q.T / τ, arange(N))``; with
    ``normalize=True`` that is exactly CLIP's loss with ``logit_scale = 1/τ``.

    The specification (docs/spec.md §4.1) expects L2-normalised ``q`` and ``k``: normalise them yourself or
    pass ``normalize=True`` (``F.normalize``, eps 1e-12, before the product).

    Args:
        q: ``(N, D)`` queries (student embeddings, image features, ...).
        k: ``(M, D)`` keys; without ``labels`` ``M >= N``.
        temperature: ``τ > 0``.
        labels: optional ``(N,)`` integer tensor, the index in ``[0, M)`` of
            each query's positive key. Not allowed with ``symmetric=True``.
        symmetric: average with the key→query direction; needs ``M == N`` and
            no ``labels``.
        normalize: L2-normalise the rows of ``q`` and ``k`` first.
    Returns:
        ``()`` loss, float32 (float64 for float64 inputs).
    """
    q, k, temperature, labels = check_arguments(q, k, temperature, labels, symmetric, normalize)
    acc = accumulation_dtype(q)
    q, k = q.to(acc), k.to(acc)
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = q @ k.T / temperature
    loss = _one_direction(logits, labels)
    if symmetric:
        loss = (loss + _one_direction(logits.T, labels)) / 2
    return loss
