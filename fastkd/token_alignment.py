"""Cross-tokenizer alignment (docs/spec.md §1.15): token groups that cover the same text, and their merge.

A student and a teacher with different tokenizers cut the same text into
different tokens, so their logits have no common row index. :func:`align_by_offsets`
pairs up the minimal groups of student and teacher tokens that cover the same
text, from each token's character or byte span; :func:`merge_aligned` turns
each group's rows of logits into one row of log-probabilities. The result is
one row per group on each side, ready for a loss that compares distributions
over different vocabularies (the Universal Logit Distillation loss).

Plain PyTorch without a tokenizer dependency: spans are the ``(start, end)``
offsets a tokenizer reports (Hugging Face ``tokenizers``' ``Encoding.offsets``,
``return_offsets_mapping=True``). Both functions are vectorised (no Python loop
over tokens or groups) and the merge is differentiable.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fastkd import _validate

__all__ = ["MERGE_STRATEGIES", "TokenAlignment", "align_by_offsets", "merge_aligned"]

MERGE_STRATEGIES = ("first", "last")

# The default floor of a group's scalar token probabilities in the merge (the
# value TRL's GOLD trainer clamps them to), so that one token of probability 0
# does not zero the whole group.
DEFAULT_MIN_TOKEN_PROBABILITY = 1e-8


class TokenAlignment(NamedTuple):
    """The groups of :func:`align_by_offsets`: group ``g`` pairs student tokens
    ``student_groups[g, 0] ≤ i < student_groups[g, 1]`` with teacher tokens
    ``teacher_groups[g, 0] ≤ j < teacher_groups[g, 1]``.

    Both are ``(G, 2)`` int64 ``[first, end)`` token-index ranges, on the
    offsets' device. Every range is non-empty, and the ranges of one side are
    consecutive and in text order (``groups[g, 1] == groups[g + 1, 0]``); pass
    each side to :func:`merge_aligned`.
    """

    student_groups: torch.Tensor
    teacher_groups: torch.Tensor

    @property
    def num_groups(self) -> int:
        return self.student_groups.shape[0]


def _as_offsets(name: str, value, device: torch.device | None) -> torch.Tensor:
    """``value`` as a ``(T, 2)`` int64 tensor; a sequence of pairs goes to ``device``."""
    if isinstance(value, torch.Tensor):
        offsets = value
    else:
        try:
            offsets = torch.as_tensor(value, device=device)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(
                f"{name} must be a (T, 2) integer tensor or a sequence of (start, end) pairs: {error}"
            ) from error
        if offsets.numel() == 0:  # [] carries no dtype
            offsets = offsets.reshape(0, 2).long()
    if offsets.dtype.is_floating_point or offsets.dtype.is_complex or offsets.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got {offsets.dtype}")
    if offsets.dim() != 2 or offsets.shape[1] != 2:
        raise ValueError(f"{name} must have shape (T, 2), got {tuple(offsets.shape)}")
    return offsets.long()


def _first_true(mask: torch.Tensor) -> int | None:
    found = mask.nonzero()
    return int(found[0, 0]) if found.numel() else None


def _check_spans(name: str, offsets: torch.Tensor) -> None:
    """Non-negative, ``start ≤ end``, and each token starting at or after the previous one's end."""
    starts, ends = offsets.unbind(1)
    checks = (
        (starts < 0, "offsets must be >= 0"),
        (ends < starts, "its end is before its start"),
    )
    for mask, reason in checks:
        i = _first_true(mask)
        if i is not None:
            raise ValueError(f"{name}[{i}] = {tuple(offsets[i].tolist())}: {reason}")
    i = _first_true(starts[1:] < ends[:-1])
    if i is not None:
        raise ValueError(
            f"{name}[{i + 1}] = {tuple(offsets[i + 1].tolist())} starts before the end of token {i} "
            f"({int(ends[i])}): spans must be in text order and must not overlap (give a special token "
            "the zero-width span (x, x) of its position in the text, or leave it out)"
        )


def _boundary_keys(ends: torch.Tensor, scale: int) -> torch.Tensor:
    """``end · scale + rank`` per token, ``rank`` counting the earlier tokens with the same end.

    The rank tells apart a token from the zero-width tokens ``(x, x)`` that
    follow it at the same end ``x``; the keys strictly increase along a sequence.
    """
    index = torch.arange(ends.numel(), device=ends.device)
    new_end = torch.ones_like(ends, dtype=torch.bool)
    new_end[1:] = ends[1:] != ends[:-1]
    first_with_end = torch.where(new_end, index, 0).cummax(0).values
    return ends * scale + (index - first_with_end)


def align_by_offsets(student_offsets, teacher_offsets) -> TokenAlignment:
    """The minimal groups of consecutive student and teacher tokens that cover the same text.

    A group closes where both tokenizations have a token ending at the same
    offset: group ``g`` covers the text between the previous such boundary (the
    start of the text for ``g = 0``) and its own, on both sides. With
    ``s = (0,3) (3,5) (5,8)`` ("the", " c", "at") and ``t = (0,3) (3,8)`` ("the",
    " cat") the groups are ``[0,1)↔[0,1)`` and ``[1,3)↔[1,2)``.

    Zero-width tokens (a special token's span ``(x, x)``): the tokens of each
    side that end at the same offset ``x`` are matched by their order there (the
    token whose text ends at ``x``, if any, then the zero-width tokens at
    ``x``), and each matched pair closes a group. So where both sides have text
    ending at ``x``, an end-of-sequence token ``(x, x)`` on both sides forms a
    group of its own, and a zero-width token the other side lacks joins the
    group after it, or belongs to no group at the very end of the text. This
    is the grouping of TRL's GOLD trainer (``ULDLoss._align_by_byte_offsets``)
    once its groups with no token on one side are dropped.

    Args:
        student_offsets: ``(T_s, 2)`` integer tensor or a sequence of ``(start,
            end)`` pairs: each student token's ``[start, end)`` character or byte
            span, in token order. Spans are non-negative and ordered without
            overlap (``start_i ≥ end_{i-1}``); gaps (text in no token) are
            allowed. Special tokens that a tokenizer reports as ``(0, 0)`` after
            the text begins must be given the span ``(x, x)`` of their position,
            or left out. Byte-level BPE tokens that split one multi-byte
            character report overlapping character spans: pass byte spans that
            share the character's bytes out between them.
        teacher_offsets: ``(T_t, 2)``, the teacher's spans of the same text, in
            the same units. Both must start at the same offset and end at the
            same offset (or both be empty).

    Returns:
        :class:`TokenAlignment` ``(student_groups (G, 2), teacher_groups (G, 2))``,
        int64 ``[first, end)`` token ranges on the offsets' device (CPU for
        sequences of pairs). Two empty sequences give ``G = 0``.

    Example (logits to aligned rows; row ``i`` of each ``*_logits`` is the
    model's distribution for token ``i``)::

        alignment = fastkd.align_by_offsets(student_offsets, teacher_offsets)
        student_rows = fastkd.merge_aligned(student_logits, student_ids, alignment.student_groups)
        teacher_rows = fastkd.merge_aligned(teacher_logits, teacher_ids, alignment.teacher_groups)
        # (G, V_s) and (G, V_t) log-probabilities, one row per group
        loss = fastkd.uld_loss(student_rows, teacher_rows, student_is_logprob=True, teacher_is_logprob=True)

    Raises:
        ValueError: naming the argument, for a wrong type, dtype or shape, a
            negative offset, a span ending before it starts, spans out of order
            or overlapping, or two sequences that cover different text.
    """
    device = None
    for value in (student_offsets, teacher_offsets):
        if isinstance(value, torch.Tensor):
            device = value.device
            break
    student = _as_offsets("student_offsets", student_offsets, device)
    teacher = _as_offsets("teacher_offsets", teacher_offsets, device)
    _validate.same_device("teacher_offsets", teacher, "student_offsets", student)
    _check_spans("student_offsets", student)
    _check_spans("teacher_offsets", teacher)

    n_student, n_teacher = student.shape[0], teacher.shape[0]
    if n_student == 0 or n_teacher == 0:
        if n_student != n_teacher:
            raise ValueError(
                f"student_offsets has {n_student} tokens and teacher_offsets {n_teacher}: "
                "an empty sequence covers the same text only as another empty one"
            )
        empty = torch.empty(0, 2, dtype=torch.long, device=student.device)
        return TokenAlignment(empty, empty.clone())
    student_extent = (int(student[0, 0]), int(student[-1, 1]))
    teacher_extent = (int(teacher[0, 0]), int(teacher[-1, 1]))
    if student_extent != teacher_extent:
        raise ValueError(
            f"teacher_offsets covers [{teacher_extent[0]}, {teacher_extent[1]}) but student_offsets covers "
            f"[{student_extent[0]}, {student_extent[1]}): the two tokenizations must cover the same text"
        )

    scale = max(n_student, n_teacher) + 1  # above every rank
    if student_extent[1] >= (2**63 - 1) // scale - 1:
        raise ValueError(f"student_offsets: offsets up to {student_extent[1]} are too large to align")
    student_keys = _boundary_keys(student[:, 1], scale)
    teacher_keys = _boundary_keys(teacher[:, 1], scale)
    closing = student_keys[torch.isin(student_keys, teacher_keys)]

    def ranges(keys: torch.Tensor) -> torch.Tensor:
        ends = torch.searchsorted(keys, closing) + 1
        starts = torch.cat([ends.new_zeros(1), ends[:-1]])
        return torch.stack([starts, ends], dim=1)

    return TokenAlignment(ranges(student_keys), ranges(teacher_keys))


def _check_groups(groups, num_tokens: int, logits: torch.Tensor) -> torch.Tensor:
    if not isinstance(groups, torch.Tensor):
        raise ValueError(f"groups must be a (G, 2) integer tensor, got {type(groups).__name__}")
    if groups.dtype.is_floating_point or groups.dtype.is_complex or groups.dtype == torch.bool:
        raise ValueError(f"groups must hold integers, got {groups.dtype}")
    if groups.dim() != 2 or groups.shape[1] != 2:
        raise ValueError(f"groups must have shape (G, 2), got {tuple(groups.shape)}")
    _validate.same_device("groups", groups, "logits", logits)
    groups = groups.long()
    starts, ends = groups.unbind(1)
    g = _first_true((starts < 0) | (ends <= starts) | (ends > num_tokens))
    if g is not None:
        raise ValueError(
            f"groups[{g}] = {tuple(groups[g].tolist())} is not a non-empty token range [first, end) "
            f"within the {num_tokens} rows of logits"
        )
    return groups


def merge_aligned(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    groups: torch.Tensor,
    *,
    strategy: str = "first",
    temperature: float = 1.0,
    min_token_probability: float = DEFAULT_MIN_TOKEN_PROBABILITY,
) -> torch.Tensor:
    """One row of log-probabilities per token group: a base token's distribution times the
    probabilities of the group's other actual tokens.

    With ``log p_i = log_softmax(logits[i] / temperature)`` and group
    ``[a, b)``, row ``g`` is

    - ``strategy="first"``: ``log p_a + Σ_{a<i<b} log max(p_i[token_ids[i]], m)``,
      the distribution of the group's first token times the probabilities of
      its later actual tokens (TRL GOLD's ``"observed"`` merge);
    - ``strategy="last"``: ``log p_{b-1} + Σ_{a≤i<b-1} log max(p_i[token_ids[i]], m)``,
      the distribution of its last token times the probabilities of its earlier
      actual tokens, which is the chain rule's joint probability of the
      group's actual prefix followed by each possible last token (TRL GOLD's
      ``"bayesian"`` merge);

    with ``m = min_token_probability``. A one-token group's row is that token's
    ``log p``. The rows are not normalised: ``exp(row)`` sums to the product of
    the group's scalar probabilities (``exp`` gives TRL's merged probability
    rows). Renormalising a row (``softmax``, as a loss that takes logits does)
    returns the base token's distribution, so a loss that should see the merge
    must take the rows as (log-)probabilities, not as logits.

    Args:
        logits: ``(T, V)`` float32 / float64 / bfloat16 / float16; row ``i`` is
            the model's distribution for token ``i`` (for a causal LM, whose
            output at position ``i`` predicts token ``i + 1``, shift by one).
            Log-probabilities work too (at temperature 1 they give the same rows).
        token_ids: ``(T,)`` integer, the tokens that occurred, in ``[0, V)``,
            on the device of ``logits``.
        groups: ``(G, 2)`` integer ``[first, end)`` row ranges, non-empty, within
            ``[0, T)``: one side of :func:`align_by_offsets`. Ranges may overlap or
            leave rows out; to merge a batch in one call, concatenate its
            sequences' rows and shift each sequence's ranges by its first row.
        strategy: ``"first"`` or ``"last"``: which token's full distribution
            the group keeps.
        temperature: ``> 0``; the softmax temperature, applied before the merge
            (to the base row and to the scalar probabilities alike).
        min_token_probability: ``m`` in ``[0, 1)``, the floor of each scalar
            token probability (default ``1e-8``, TRL's); 0 for none. A
            floored probability passes no gradient.

    Returns:
        ``(G, V)`` log-probabilities in float32 (float64 for float64 logits),
        differentiable with respect to ``logits``.

    Raises:
        ValueError: naming the argument, for a wrong dtype, shape or device, a
            token id outside ``[0, V)``, an empty or out-of-range group, an
            unknown strategy, or a temperature or floor out of range.
    """
    logits = _validate.tensor("logits", logits, min_dim=2)
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must have shape (T, V) with V >= 1, got {tuple(logits.shape)}")
    num_tokens, vocab = logits.shape
    if not isinstance(token_ids, torch.Tensor):
        raise ValueError(f"token_ids must be a torch.Tensor, got {type(token_ids).__name__}")
    if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
        raise ValueError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
    if token_ids.shape != (num_tokens,):
        raise ValueError(f"token_ids must have shape ({num_tokens},) (one per row of logits), "
                         f"got {tuple(token_ids.shape)}")
    _validate.same_device("token_ids", token_ids, "logits", logits)
    i = _first_true((token_ids < 0) | (token_ids >= vocab))
    if i is not None:
        raise ValueError(f"token_ids[{i}] = {int(token_ids[i])} is outside [0, {vocab})")
    groups = _check_groups(groups, num_tokens, logits)
    _validate.choice("strategy", strategy, MERGE_STRATEGIES)
    temperature = _validate.real("temperature", temperature, low=0.0, low_open=True)
    min_token_probability = _validate.real("min_token_probability", min_token_probability, low=0.0)
    if min_token_probability >= 1.0:
        raise ValueError(f"min_token_probability must be < 1, got {min_token_probability}")

    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    scaled = logits.to(compute_dtype) / temperature
    log_normaliser = torch.logsumexp(scaled, dim=-1)  # (T,)
    token_log_prob = scaled.gather(1, token_ids.long().unsqueeze(1)).squeeze(1) - log_normaliser
    if min_token_probability > 0.0:
        token_log_prob = token_log_prob.clamp_min(math.log(min_token_probability))

    starts, ends = groups.unbind(1)
    lengths = ends - starts
    base = starts if strategy == "first" else ends - 1
    # Every (group, row) pair as flat index tensors, so that the scalar
    # factors are one segment sum instead of a loop over groups.
    num_groups = groups.shape[0]
    group_of = torch.repeat_interleave(torch.arange(num_groups, device=logits.device), lengths)
    first_pair = torch.cumsum(lengths, 0) - lengths
    row = starts[group_of] + torch.arange(group_of.numel(), device=logits.device) - first_pair[group_of]
    scalar_terms = token_log_prob[row].masked_fill(row == base[group_of], 0.0)
    log_scale = scaled.new_zeros(num_groups).index_add(0, group_of, scalar_terms)
    return scaled[base] - log_normaliser[base].unsqueeze(1) + log_scale.unsqueeze(1)
