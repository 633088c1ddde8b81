"""Universal Logit Distillation (ULD, Boizard et al. 2024), docs/spec.md §1.14, as plain PyTorch.

Student and teacher rows are aligned (row ``i`` of both predicts the same
text) but their vocabularies differ (``V_s ≠ V_t`` allowed). Per kept row:

    p = softmax(s_i / T_s),  q = softmax(t_i / T_t)
    a = sort↓(p), b = sort↓(q), the shorter padded with zeros to W = max(V_s, V_t)
    ℓ_i = Σ_k |a_k − b_k|

A side given as log-probabilities (``student_is_logprob`` /
``teacher_is_logprob``) is used as it is: ``p = exp(s_i)``, no softmax and no
renormalisation (the unnormalised merged rows of
:func:`fastkd.merge_aligned` keep their mass), temperature 1.

Subgradient convention: ``sign(0) = 0``, and entries of one row with equal
probabilities (a *tie*) share the mean of the signs over the ranks they
occupy, so that the gradient does not depend on how the sort orders ties
(:func:`tie_averaged`). This module sorts and pads whole ``(N, W)`` rows: it
is the oracle of the fused kernels, not the fast path.

Hybrid mode (``hybrid=`` an ``(M, 2)`` table of ``(student id, teacher id)``
pairs naming the same token, TRL GOLD's ``uld_use_hybrid_loss``): per kept row

    D_i = Σ_{(a, b) ∈ table} β·q_b·log(q_b / m_ab) + (1 − β)·p_a·log(p_a / m_ab),
          m_ab = β·q_b + (1 − β)·p_a     (β = 0: Σ q_b log(q_b / p_a); β = 1: Σ p_a log(p_a / q_b))
    U_i = Σ_k |sort↓(p_unmatched)_k − sort↓(q_unmatched)_k| (zero-padded),
          0 if either side has no unmatched id
    ℓ_i = w_m·D_i + w_u·U_i,  (w_m, w_u) = hybrid_weights, default (M / V_t, 1 − M / V_t)

with ``p``, ``q`` the full-vocabulary probabilities above: the matched
entries are *not* renormalised (TRL compares them as they are), so ``D_i``
is the generalised JSD of two sub-probability vectors (``≥ 0`` for
``0 < β < 1``; the KL endpoints of unnormalised vectors can be negative).
"""

from __future__ import annotations

import math

import torch

from fastkd import _validate
from fastkd.reference.divergence import row_divergence

REDUCTIONS = ("batchmean", "sum", "none")


def check_hybrid_options(hybrid_beta, hybrid_weights) -> tuple[float, tuple[float, float] | None]:
    """Validate ``hybrid_beta`` (in [0, 1]) and ``hybrid_weights`` (None, or two finite reals
    ``>= 0``); return them as floats."""
    beta = _validate.real("hybrid_beta", hybrid_beta, low=0.0, high=1.0)
    if hybrid_weights is None:
        return beta, None
    is_pair = not isinstance(hybrid_weights, (str, bytes)) and hasattr(hybrid_weights, "__len__")
    if not is_pair or len(hybrid_weights) != 2:
        raise ValueError(
            f"hybrid_weights must be None or a pair (matched, unmatched), got {hybrid_weights!r}"
        )
    matched = _validate.real("hybrid_weights[0]", hybrid_weights[0], low=0.0)
    unmatched = _validate.real("hybrid_weights[1]", hybrid_weights[1], low=0.0)
    return beta, (matched, unmatched)


def check_hybrid(hybrid, student_vocab: int, teacher_vocab: int) -> torch.Tensor | None:
    """Validate the hybrid table against ``V_s = student_vocab`` and ``V_t = teacher_vocab``.

    ``hybrid`` is ``None`` or an ``(M, 2)`` int64 tensor, column 0 student ids
    in ``[0, V_s)``, column 1 teacher ids in ``[0, V_t)``, no id twice in a
    column (``M = 0`` is legal). It is a constant of the two tokenizers and is
    checked on the host (a table on a GPU is copied once for the check).
    Returns the table on the CPU, or None. Raises ``ValueError`` naming ``hybrid``.
    """
    if hybrid is None:
        return None
    if not isinstance(hybrid, torch.Tensor):
        raise ValueError(f"hybrid must be None or an (M, 2) int64 tensor, got {type(hybrid).__name__}")
    if hybrid.dtype != torch.int64 or hybrid.dim() != 2 or hybrid.shape[1] != 2:
        raise ValueError(
            f"hybrid must be an (M, 2) int64 tensor of (student id, teacher id) pairs, got shape "
            f"{tuple(hybrid.shape)} and dtype {hybrid.dtype}"
        )
    table = hybrid.detach().cpu()
    for column, side, vocab in ((0, "student", student_vocab), (1, "teacher", teacher_vocab)):
        ids = table[:, column]
        if ids.numel() == 0:
            continue
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(
                f"hybrid[:, {column}] holds {side} ids in [{low}, {high}], outside the {side} "
                f"vocabulary [0, {vocab})"
            )
        if torch.unique(ids).numel() != ids.numel():
            raise ValueError(
                f"hybrid[:, {column}] lists a {side} id more than once (the pairs must be one-to-one)"
            )
    return table


def hybrid_weights_for(table: torch.Tensor, teacher_vocab: int, hybrid_weights) -> tuple[float, float]:
    """``(w_m, w_u)``: the given weights, or TRL's default ``(M / V_t, 1 − M / V_t)``."""
    if hybrid_weights is not None:
        return hybrid_weights
    matched = table.shape[0] / teacher_vocab
    return matched, 1.0 - matched


def unmatched_ids(table_column: torch.Tensor, vocab: int) -> torch.Tensor:
    """``(V − M,)`` int64: the ids of ``[0, vocab)`` not in ``table_column``, ascending."""
    matched = torch.zeros(vocab, dtype=torch.bool)
    matched[table_column] = True
    return (~matched).nonzero().reshape(-1)


def check_options(student_temperature, teacher_temperature, reduction, student_is_logprob=False,
                  teacher_is_logprob=False) -> tuple[float, float]:
    """Validate the non-tensor arguments; return ``(T_s, T_t)``.

    A side given as log-probabilities has no temperature to apply: its
    temperature must be 1.
    """
    ts = _validate.real("student_temperature", student_temperature, low=0.0, low_open=True)
    tt = _validate.real("teacher_temperature", teacher_temperature, low=0.0, low_open=True)
    _validate.choice("reduction", reduction, REDUCTIONS)
    sides = (("student", ts, student_is_logprob), ("teacher", tt, teacher_is_logprob))
    for side, temperature, is_logprob in sides:
        if _validate.flag(f"{side}_is_logprob", is_logprob) and temperature != 1.0:
            raise ValueError(
                f"{side}_temperature must be 1 when {side}_is_logprob=True, got {temperature} "
                "(log-probabilities are used as given; divide the logits before the log-softmax instead)"
            )
    return ts, tt


def check_arguments(student_logits, teacher_logits, mask, student_temperature, teacher_temperature,
                    reduction, student_is_logprob=False, teacher_is_logprob=False):
    """Validate the arguments; return ``(student, teacher, mask or None, T_s, T_t)``.

    Raises ``ValueError`` naming the argument for anything out of contract.
    """
    ts, tt = check_options(student_temperature, teacher_temperature, reduction, student_is_logprob,
                           teacher_is_logprob)
    s = _validate.tensor("student_logits", student_logits)
    t = _validate.tensor("teacher_logits", teacher_logits)
    for name, x, width in (("student_logits", s, "V_s"), ("teacher_logits", t, "V_t")):
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D (N, {width}), got shape {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError(f"{name} must have at least one vocabulary entry, got shape {tuple(x.shape)}")
    if t.shape[0] != s.shape[0]:
        raise ValueError(
            f"teacher_logits has {t.shape[0]} rows but student_logits has {s.shape[0]}: "
            "the rows must be aligned"
        )
    if t.dtype != s.dtype:
        raise ValueError(f"teacher_logits dtype {t.dtype} does not match student_logits dtype {s.dtype}")
    _validate.same_device("teacher_logits", t, "student_logits", s)
    mask = _validate.row_selector("mask", mask, s.shape[:1], s, integer=False)
    return s, t, mask, ts, tt


def tie_averaged(sorted_rows: torch.Tensor) -> torch.Tensor:
    """``sorted_rows`` ``(N, W)`` (each row sorted), unchanged in value, whose gradient is, at
    every entry, the mean of the upstream gradient over the run of equal values it belongs to.

    Through ``sort``'s backward this gives tied probabilities the mean of their
    ranks' signs, whichever order the sort put them in.
    """
    if sorted_rows.shape[1] == 0:
        return sorted_rows
    starts = torch.ones_like(sorted_rows, dtype=torch.bool)
    starts[:, 1:] = sorted_rows[:, 1:] != sorted_rows[:, :-1]
    run = starts.long().cumsum(1) - 1
    sums = torch.zeros_like(sorted_rows).scatter_add(1, run, sorted_rows)
    counts = torch.zeros_like(sorted_rows).scatter_add(1, run, torch.ones_like(sorted_rows))
    means = (sums / counts.clamp(min=1)).gather(1, run)
    return sorted_rows.detach() + (means - means.detach())


def sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``(N,)`` ``Σ_k |sort↓(p)_k − sort↓(q)_k|`` of ``(N, V_s)`` and ``(N, V_t)`` probabilities,
    the shorter row padded with zeros; tie-averaged gradient (see the module docstring)."""
    width = max(p.shape[1], q.shape[1])
    a = tie_averaged(torch.nn.functional.pad(p.sort(1, descending=True).values, (0, width - p.shape[1])))
    b = tie_averaged(torch.nn.functional.pad(q.sort(1, descending=True).values, (0, width - q.shape[1])))
    # abs' gradient at 0 is 0: sign(0) = 0
    return (a - b).abs().sum(1)


def log_probabilities(x: torch.Tensor, temperature: float, is_logprob: bool) -> torch.Tensor:
    """``(N, V)`` log-probability rows of ``x``: ``x`` as given, or ``log_softmax(x / T)``."""
    return x if is_logprob else torch.log_softmax(x / temperature, 1)


def hybrid_parts(log_p: torch.Tensor, log_q: torch.Tensor, p: torch.Tensor, q: torch.Tensor,
                 table: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(D, U)``, each ``(N,)``: the matched generalised JSD and the sorted L1 of the
    unmatched entries (module docstring), from student ``log_p``/``p`` ``(N, V_s)`` and teacher
    ``log_q``/``q`` ``(N, V_t)``; ``table`` ``(M, 2)`` on the CPU."""
    student_ids, teacher_ids = table[:, 0].to(p.device), table[:, 1].to(p.device)
    # row_divergence's p is the teacher: β weighs the teacher side, as TRL's β does
    matched = row_divergence(log_q[:, teacher_ids], log_p[:, student_ids], "jsd", beta=beta)
    student_rest = unmatched_ids(table[:, 0], p.shape[1]).to(p.device)
    teacher_rest = unmatched_ids(table[:, 1], q.shape[1]).to(p.device)
    if student_rest.numel() == 0 or teacher_rest.numel() == 0:
        # TRL's convention: no sorted term unless both sides have an unmatched id
        return matched, torch.zeros_like(matched)
    return matched, sorted_l1(p[:, student_rest], q[:, teacher_rest])


def probabilities(x: torch.Tensor, temperature: float, is_logprob: bool) -> torch.Tensor:
    """``(N, V)`` probability rows of ``x``: ``exp(x)`` as given for log-probabilities
    (NaN across a row with an entry whose ``exp`` is NaN or ``+inf``, as the
    kernels give), else ``softmax(x / T)``."""
    if not is_logprob:
        return torch.softmax(x / temperature, 1)
    p = x.exp()
    usable = torch.isfinite(p).all(1, keepdim=True)
    # a product, not a selection, so that the row's gradient is NaN too
    return p * torch.where(usable, 1.0, math.nan).to(p.dtype)


def uld_rows(s: torch.Tensor, t: torch.Tensor, keep: torch.Tensor, student_temperature: float,
             teacher_temperature: float, student_is_logprob: bool = False,
             teacher_is_logprob: bool = False, hybrid: torch.Tensor | None = None, hybrid_beta: float = 0.5,
             hybrid_weights: tuple[float, float] | None = None) -> torch.Tensor:
    """``(N,)`` ULD row losses in the accumulation dtype, 0 on the rows where ``keep`` is false.

    ``hybrid``: None, or the checked ``(M, 2)`` table (:func:`check_hybrid`)
    for the hybrid row loss ``w_m·D_i + w_u·U_i`` (module docstring).

    Raises ``ValueError`` for a kept row of logits (not log-probabilities)
    that is all ``−inf`` (no distribution); an all ``−inf`` log-probability row
    is the zero vector.
    """
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    s, t = s.to(acc), t.to(acc)
    no_distribution = torch.zeros_like(keep[keep])
    if not student_is_logprob:
        no_distribution |= torch.isneginf(s[keep]).all(-1)
    if not teacher_is_logprob:
        no_distribution |= torch.isneginf(t[keep]).all(-1)
    if bool(no_distribution.any()):
        raise ValueError("a kept row of student_logits or teacher_logits is entirely -inf")
    # excluded rows become finite dummies, so that no NaN of theirs reaches a gradient
    s = torch.where(keep[:, None], s, torch.zeros_like(s))
    t = torch.where(keep[:, None], t, torch.zeros_like(t))
    p = probabilities(s, student_temperature, student_is_logprob)
    q = probabilities(t, teacher_temperature, teacher_is_logprob)
    if hybrid is None:
        rows = sorted_l1(p, q)
    else:
        log_p = log_probabilities(s, student_temperature, student_is_logprob)
        log_q = log_probabilities(t, teacher_temperature, teacher_is_logprob)
        matched, unmatched = hybrid_parts(log_p, log_q, p, q, hybrid, hybrid_beta)
        w_matched, w_unmatched = hybrid_weights_for(hybrid, t.shape[1], hybrid_weights)
        rows = w_matched * matched + w_unmatched * unmatched
    return torch.where(keep, rows, torch.zeros_like(rows))


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    reduction: str = "batchmean",
    mask: torch.Tensor | None = None,
    student_is_logprob: bool = False,
    teacher_is_logprob: bool = False,
    hybrid: torch.Tensor | None = None,
    hybrid_beta: float = 0.5,
    hybrid_weights: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Reference for :func:`fastkd.uld_loss` without hard labels (same arguments, same result).

    Args:
        student_logits: ``(N, V_s)``.
        teacher_logits: ``(N, V_t)``, same N, dtype and device; ``V_t`` may differ.
        student_temperature, teacher_temperature: ``> 0``; 1 on a side given as
            log-probabilities.
        reduction: ``"batchmean"`` (sum over kept rows / their number),
            ``"sum"``, ``"none"`` (``(N,)``, 0 on excluded rows).
        mask: ``(N,)`` bool, False excludes the row.
        student_is_logprob, teacher_is_logprob: that side's rows are
            log-probabilities, compared as ``exp(x)`` without a softmax or any
            renormalisation (the rows of :func:`fastkd.merge_aligned`).
        hybrid: None, or ``(M, 2)`` int64 ``(student id, teacher id)`` pairs of
            the tokens both vocabularies hold: the hybrid row loss of the
            module docstring.
        hybrid_beta: β of the matched generalised JSD, in [0, 1] (teacher side).
        hybrid_weights: ``(w_m, w_u)``, both ``>= 0``; None: ``(M/V_t, 1 − M/V_t)``.

    Returns:
        float32 (float64 for float64 inputs) scalar, ``(N,)`` for ``"none"``;
        0 with a zero gradient when no row is kept.
    """
    s, t, mask, ts, tt = check_arguments(student_logits, teacher_logits, mask, student_temperature,
                                         teacher_temperature, reduction, student_is_logprob,
                                         teacher_is_logprob)
    hybrid_beta, hybrid_weights = check_hybrid_options(hybrid_beta, hybrid_weights)
    table = check_hybrid(hybrid, s.shape[1], t.shape[1])
    keep = torch.ones(s.shape[0], dtype=torch.bool, device=s.device) if mask is None else mask
    rows = uld_rows(s, t, keep, ts, tt, student_is_logprob, teacher_is_logprob, table, hybrid_beta,
                    hybrid_weights)
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / max(int(keep.sum()), 1)
