"""Self-attention relation distillation (MiniLM, MiniLMv2), docs/spec.md §5.3, as plain PyTorch.

One relation's vectors per model, ``X (B, T, D)`` (the queries, keys or values
of one layer), are split into ``A`` relation heads of ``D / A`` channels
(MiniLMv2's re-split, so the two models may differ in width and head count).
Per batch element ``b``, head ``a`` and kept row ``i``:

    R_{b,a,i} = softmax_j( x_{b,i,a} · x_{b,j,a} / (√(D/A) · τ) )   over the kept keys j

(keys are kept where ``mask`` is true and, with ``causal``, where ``j ≤ i``),
and the row loss is the mean over heads of ``KL(R^teacher_{b,a,i} ‖ R^student_{b,a,i})``.
This module materialises the ``(B, A, T, T)`` relations: it is the oracle of
the fused kernels, not the fast path.
"""

from __future__ import annotations

import math

import torch

from fastkd import _validate
from fastkd.reference._common import reduce_kept

REDUCTIONS = ("batchmean", "sum", "none")


def check_options(num_relation_heads, causal, temperature, reduction) -> tuple[int, float]:
    """Validate the non-tensor arguments; return ``(A, temperature)``."""
    heads = num_relation_heads
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"num_relation_heads must be an int >= 1, got {num_relation_heads!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {type(causal).__name__}")
    temperature = _validate.real("temperature", temperature, low=0.0, low_open=True)
    _validate.choice("reduction", reduction, REDUCTIONS)
    return num_relation_heads, temperature


def check_arguments(student_states, teacher_states, num_relation_heads, mask, causal, temperature, reduction):
    """Validate the arguments; return ``(student, teacher, A, mask or None, temperature)``.

    Raises ``ValueError`` naming the argument for anything out of contract.
    """
    heads, temperature = check_options(num_relation_heads, causal, temperature, reduction)
    s = _validate.tensor("student_states", student_states, min_dim=3)
    t = _validate.tensor("teacher_states", teacher_states, min_dim=3)
    if s.dim() != 3 or t.dim() != 3:
        raise ValueError(
            f"student_states and teacher_states must be (B, T, D), got shapes {tuple(s.shape)} and "
            f"{tuple(t.shape)}"
        )
    if s.shape[:2] != t.shape[:2]:
        raise ValueError(
            f"teacher_states (B, T) {tuple(t.shape[:2])} does not match student_states' {tuple(s.shape[:2])}"
        )
    if t.dtype != s.dtype:
        raise ValueError(f"teacher_states dtype {t.dtype} does not match student_states dtype {s.dtype}")
    _validate.same_device("teacher_states", t, "student_states", s)
    for name, x in (("student_states", s), ("teacher_states", t)):
        if x.shape[2] == 0 or x.shape[2] % heads:
            raise ValueError(
                f"{name} width {x.shape[2]} must be a positive multiple of num_relation_heads ({heads})"
            )
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != s.shape[:2]:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} must be the states' (B, T) {tuple(s.shape[:2])}"
            )
        _validate.same_device("mask", mask, "student_states", s)
    return s, t, heads, mask, temperature


def kept_keys(mask: torch.Tensor | None, causal: bool, batch: int, length: int, device) -> torch.Tensor:
    """``(B, T, T)`` bool: may row ``i`` of element ``b`` attend to key ``j``."""
    keys = torch.ones(batch, length, length, dtype=torch.bool, device=device)
    if mask is not None:
        keys &= mask[:, None, :]
    if causal:
        keys &= torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return keys


def relation_log_probs(
    states: torch.Tensor, heads: int, keys: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``(B, A, T, T)`` log-relations: log_softmax over the kept keys (−inf elsewhere)."""
    b, length, width = states.shape
    x = states.reshape(b, length, heads, width // heads).transpose(1, 2)  # (B, A, T, d)
    scores = x @ x.transpose(-1, -2) / (math.sqrt(width // heads) * temperature)
    scores = scores.masked_fill(~keys[:, None], -math.inf)
    # a row with no kept key (an excluded row of a padded sequence) would be
    # all −inf: give it a finite dummy row, its loss is dropped below
    empty = ~keys.any(-1)[:, None, :, None]
    return torch.where(empty, torch.zeros_like(scores), scores).log_softmax(-1)


def attention_relation_loss(
    student_states: torch.Tensor,
    teacher_states: torch.Tensor,
    *,
    num_relation_heads: int,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    temperature: float = 1.0,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """The MiniLM attention-relation loss, materialised (see the module docstring).

    Args:
        student_states: ``(B, T, D_s)``; ``D_s`` a multiple of ``num_relation_heads``.
        teacher_states: ``(B, T, D_t)``, same B, T, dtype and device.
        num_relation_heads: ``A``, the heads each model's vectors are split into.
        mask: ``(B, T)`` bool, False for padding: excluded as keys and as rows.
        causal: keep only keys ``j ≤ i``.
        temperature: ``τ`` divides the scaled dot products; no ``τ²`` factor.
        reduction: ``"batchmean"`` (sum over kept rows of the head-mean KL,
            divided by the kept rows), ``"sum"``, or ``"none"`` (``(B, T)``,
            0 on excluded rows).

    Returns:
        A scalar (``(B, T)`` for ``"none"``) in the accumulation dtype
        (float32, float64 for float64 inputs). Both inputs get gradients when
        they require them.
    """
    s, t, heads, mask, temperature = check_arguments(
        student_states, teacher_states, num_relation_heads, mask, causal, temperature, reduction
    )
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    batch, length = s.shape[:2]
    keys = kept_keys(mask, causal, batch, length, s.device)
    log_q = relation_log_probs(s.to(acc), heads, keys, temperature)
    log_p = relation_log_probs(t.to(acc), heads, keys, temperature)
    p = log_p.exp()
    # xlogy convention: masked keys have p = 0 and contribute exactly 0; the
    # ratio is masked before the product so that its −inf − (−inf) cannot
    # reach the gradient as 0 · NaN
    ratio = torch.where(p == 0, torch.zeros_like(p), log_p - log_q)
    terms = p * ratio
    rows = terms.sum(-1).mean(1)  # (B, T): the head-mean KL of each row
    return reduce_kept(rows, mask, reduction)
