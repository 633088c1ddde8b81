"""Gathering a batch across ranks with gradients, for the batch-relational losses.

With ``gather=True`` (``fastkd.info_nce``, ``fastkd.mmd_loss`` and the
relational losses of :mod:`fastkd.rkd` and :mod:`fastkd.gram_relation`) every
rank gathers the inputs of all ranks (``torch.distributed.all_gather``, in rank
order) and computes the loss of the whole global batch, so negatives (InfoNCE)
and sample pairs (MMD) span every rank; the value is the same on every rank.
The backward all-reduces (sums) the gradient of the gathered tensor and hands
each rank the rows it contributed: each rank receives ``world_size`` times
the gradient of the single-process loss on the concatenated batch with
respect to its own samples, which is what DDP's averaging of parameter
gradients over ``world_size`` ranks expects (open_clip's
``gather_with_grad`` convention; ``torch.distributed.nn.functional.all_gather``
has the same one — here it is backed by an all-reduce, which every backend,
gloo included, supports). Every rank must pass the same number of rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["gather_batch", "gather_labels", "gather_with_grad"]


def _check_initialised(group) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("gather=True needs torch.distributed to be initialised (init_process_group)")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"process_group must be a torch.distributed ProcessGroup or None, got {type(group)}")


def _gather_no_grad(x: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


def _check_equal_rows(name: str, x: torch.Tensor, group) -> None:
    rows = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    counts = [int(c) for c in _gather_no_grad(rows, group)]
    if len(set(counts)) != 1:
        raise ValueError(
            f"{name} must have the same number of rows on every rank with gather=True, got {counts}"
        )


class _GatherWithGrad(torch.autograd.Function):
    """``cat(all_gather(x))``; backward: all-reduce (sum), then this rank's rows."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        ctx.rows = x.shape[0]
        ctx.rank = dist.get_rank(group)
        return torch.cat(_gather_no_grad(x, group))

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None


def gather_with_grad(name: str, x: torch.Tensor, group=None) -> torch.Tensor:
    """All ranks' ``x`` ``(rows, ...)`` concatenated in rank order, ``(world_size · rows, ...)``.

    Differentiable: the gradient of the result is summed over ranks and each
    rank gets the slice of its own rows. ``name`` is used in error messages.
    """
    _check_initialised(group)
    _check_equal_rows(name, x, group)
    return _GatherWithGrad.apply(x, group)


def gather_labels(labels: torch.Tensor, keys_per_rank: int, group=None) -> torch.Tensor:
    """Each rank's ``labels`` (indices into its own ``keys_per_rank`` keys) as
    indices into the gathered keys, concatenated in rank order."""
    _check_initialised(group)
    offset = dist.get_rank(group) * keys_per_rank
    return torch.cat(_gather_no_grad(labels + offset, group))


def gather_batch(
    student: torch.Tensor, teacher: torch.Tensor, process_group=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch, ``(world · N, ...)`` each: the student with gradient
    (see the module docstring), the teacher without (relational losses never
    differentiate the teacher).

    Every rank must hold the same ``N`` and feature sizes (checked: a mismatch
    raises ``ValueError`` on every rank).
    """
    _check_initialised(process_group)
    shape = torch.tensor(
        [student.shape[0], student[0].numel(), teacher[0].numel()], dtype=torch.int64, device=student.device
    )
    shapes = _gather_no_grad(shape, process_group)
    if any(not torch.equal(s, shapes[0]) for s in shapes):
        sizes = [tuple(s.tolist()) for s in shapes]
        raise ValueError(
            f"gather=True needs the same student batch size and feature sizes on every rank, "
            f"got (N, D_s, D_t) = {sizes}"
        )
    s = _GatherWithGrad.apply(student, process_group)
    with torch.no_grad():
        t = torch.cat(_gather_no_grad(teacher, process_group))
    return s, t
