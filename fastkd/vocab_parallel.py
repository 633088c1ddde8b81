"""Vocabulary-parallel divergences (docs/spec.md §1): logits sharded along V across ranks.

In tensor-parallel (Megatron-layout) LLM training each rank of a
``process_group`` holds a contiguous slice of the vocabulary: student and
teacher logits ``(..., V_r)`` with ``Σ_r V_r = V``. Gathering the full
``(N, V)`` logits on one rank is what tensor parallelism exists to avoid; the
divergence only needs, per row, the global max and sum of exponentials (for
each side's log-softmax) and the global sum of the per-element terms. Each
rank computes its shard's contributions and all-reduces combine them (per
side a MAX and a SUM for the log-sum-exp, then a SUM of the row terms; the
backward all-reduces the gradient of the two sums of exponentials). Every
rank ends with the same loss and the gradient of its own shard.

Implementation: composite PyTorch ops on each shard (the same formulas as
``fastkd.reference``), with autograd through the all-reduces. Not fused yet:
the shard's log-softmax and terms are ordinary tensors (O(N · V_r) per
rank), which is what the unsharded reference allocates for the whole
vocabulary, divided by the world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastkd import _hard_labels, _validate
from fastkd._divergence_options import DivergenceOptions
from fastkd.reference.divergence import row_divergence

__all__ = ["vocab_parallel_divergence"]


class _SumOfPartials(torch.autograd.Function):
    """Σ over the ranks of each rank's partial result (here: its shard's share
    of the row divergence); the backward passes the gradient through.

    Every rank computes the same (replicated) loss from the total and
    backpropagates its own copy, so the derivative with respect to this
    rank's partial is the derivative with respect to the total, unchanged.
    """

    @staticmethod
    def forward(ctx, x, group):
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SharedSum(torch.autograd.Function):
    """Σ over the ranks of a statistic that every rank then uses in its own
    partial result (here: the shards' sums of exponentials, in every shard's
    log-softmax); the backward sums the gradient over the ranks.

    Rank r's graph only sees how *its* partial depends on the shared value; the
    loss depends on it through every rank's partial, so the derivative is the
    sum of the ranks' contributions.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _global_log_sum_exp(a: torch.Tensor, group, *, replicated: bool = False) -> torch.Tensor:
    """``(..., 1)`` log Σ_v exp(a_v) over the vocabulary shards of every rank.

    ``replicated=False``: every rank uses the result in its own partial sum
    (the divergence's log-softmax), so the backward sums the ranks'
    gradients (:class:`_SharedSum`). ``replicated=True``: the result enters
    the loss directly, identically on every rank (the cross-entropy's
    log-sum-exp), so each rank's gradient already is the whole one
    (:class:`_SumOfPartials`); summing would multiply it by the world size.
    """
    with torch.no_grad():
        top = a.amax(dim=-1, keepdim=True)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        # a shard that is all −inf contributes exp(−inf − top) = 0; only a row
        # that is −inf on every rank has top = −inf (NaN below, as documented)
    local = torch.exp(a - top).sum(dim=-1, keepdim=True)
    total = (_SumOfPartials if replicated else _SharedSum).apply(local, group)
    return top + total.log()


def vocab_parallel_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    process_group,
    divergence: str = "kl",
    temperature: float = 1.0,
    beta: float | None = None,
    alpha: float | None = None,
    scale: float | None = None,
    reduction: str = "batchmean",
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    hard_weight: float | None = None,
    soft_weight: float = 1.0,
    return_parts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fastkd.divergence` on logits sharded along the vocabulary across ``process_group``.

    Args:
        student_logits: ``(..., V_r)``, this rank's slice of the vocabulary;
            the slices of all ranks, in rank order, make the full ``V``
            (any split, e.g. Megatron's equal one).
        teacher_logits: ``(..., V_r)``, the same slice of the teacher.
        process_group: an initialised ``torch.distributed`` process group
            (``None`` is not accepted here: pass ``dist.group.WORLD``
            explicitly to shard across every rank).
        hard_weight, soft_weight, return_parts: hard-label mixing as in
            :func:`fastkd.divergence`; ``labels`` are global class ids in
            ``[0, V)``: the rank whose slice holds a row's label contributes
            its logit, and the cross-entropy's log-sum-exp (at temperature 1)
            is all-reduced like the divergence's.
        The rest: as :func:`fastkd.divergence` (``"mean"`` divides by kept
            rows × the global V; ``labels`` / ``mask`` are the same on every rank).

    Returns:
        The same value on every rank: the divergence of the unsharded logits
        (``(total, hard, soft)`` with ``return_parts``). Backward gives each
        rank the gradient of its own slice.
    """
    s = _validate.tensor("student_logits", student_logits)
    t = _validate.tensor("teacher_logits", teacher_logits)
    _validate.same_layout("teacher_logits", t, "student_logits", s)
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group needs torch.distributed to be initialised (init_process_group)")
    options = DivergenceOptions.from_arguments(
        divergence=divergence, temperature=temperature, beta=beta, alpha=alpha, scale=scale,
        reduction=reduction, ignore_index=ignore_index, labels=labels, mask=mask, hard_weight=hard_weight,
        soft_weight=soft_weight, ref=s, check_vocab=False,
    )
    temperature, beta, alpha, scale = options.temperature, options.beta, options.alpha, options.scale
    labels, mask = options.labels, options.mask
    hard_weight, soft_weight, mixing = options.hard_weight, options.soft_weight, options.mixing
    lead = s.shape[:-1]

    # every rank's slice width, in rank order: V, and where this rank's slice starts
    world = dist.get_world_size(process_group)
    widths = [torch.zeros(1, dtype=torch.int64, device=s.device) for _ in range(world)]
    width = torch.tensor([s.shape[-1]], dtype=torch.int64, device=s.device)
    dist.all_gather(widths, width, group=process_group)
    widths = [int(w.item()) for w in widths]
    vocab = sum(widths)
    offset = sum(widths[: dist.get_rank(process_group)])
    if vocab == 0:
        raise ValueError("student_logits: the vocabulary is empty on every rank")

    keep = torch.ones(s.reshape(-1, s.shape[-1]).shape[0], dtype=torch.bool, device=s.device)
    if labels is not None:
        keep &= labels.reshape(-1) != ignore_index
    if mask is not None:
        keep &= mask.reshape(-1)
    # Excluded rows are dropped before any arithmetic (as the reference does):
    # an all −inf padding row must not put NaN into the gradient. labels and
    # mask are the same on every rank, so every rank keeps the same rows and
    # the all-reduces below line up.
    kept = keep.nonzero().squeeze(-1)
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    a_s = s.reshape(-1, s.shape[-1])[kept].to(acc) / temperature
    a_t = t.reshape(-1, t.shape[-1])[kept].to(acc) / temperature
    log_q = a_s - _global_log_sum_exp(a_s, process_group)
    log_p = a_t - _global_log_sum_exp(a_t, process_group)
    # the row divergence is a sum over the vocabulary: local sums, then a global one
    local_rows = row_divergence(log_p, log_q, divergence, beta=beta, alpha=alpha)
    rows = _SumOfPartials.apply(local_rows, process_group)
    soft = scale * _reduce(rows, reduction, keep, kept, lead, vocab)
    if not mixing and soft_weight == 1.0 and not return_parts:
        return soft
    soft = soft_weight * soft
    if not mixing:
        return (soft, torch.zeros_like(soft), soft) if return_parts else soft

    y = labels.reshape(-1)[kept].long()
    _hard_labels.check_label_range(y, None, vocab)
    x = s.reshape(-1, s.shape[-1])[kept].to(acc)
    # CE_i = log Σ_v exp(x_iv) − x_{i, y_i}: the label's logit comes from the
    # one rank whose slice holds it (0 from the others), summed over the ranks
    here = (y >= offset) & (y < offset + s.shape[-1])
    local_index = torch.where(here, y - offset, torch.zeros_like(y)).unsqueeze(-1)
    label_logit = torch.where(here, x.gather(-1, local_index).squeeze(-1), torch.zeros((), dtype=acc))
    label_logit = _SumOfPartials.apply(label_logit, process_group)
    ce_rows = _global_log_sum_exp(x, process_group, replicated=True).squeeze(-1) - label_logit
    # the cross-entropy's "mean" divides by the kept rows only (not by V)
    ce_reduction = "batchmean" if reduction == "mean" else reduction
    hard = hard_weight * _reduce(ce_rows, ce_reduction, keep, kept, lead, vocab)
    total = hard + soft
    return (total, hard, soft) if return_parts else total


def _reduce(rows: torch.Tensor, reduction: str, keep, kept, lead, vocab: int) -> torch.Tensor:
    """The kept rows' values reduced: ``"none"`` scattered back to ``lead`` (0 for excluded
    rows), ``"sum"``, ``"batchmean"`` (/ kept rows) or ``"mean"`` (/ kept rows · V)."""
    if reduction == "none":
        out = torch.zeros(keep.shape[0], dtype=rows.dtype, device=rows.device).index_put((kept,), rows)
        return out.reshape(lead)
    total = rows.sum()
    n_kept = kept.numel()
    if reduction == "sum" or n_kept == 0:
        return total  # an empty sum is 0, with a zero gradient
    if reduction == "batchmean":
        return total / n_kept
    return total / (n_kept * vocab)
