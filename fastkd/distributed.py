"""Gathering a batch across ranks for the batch-relational losses.

Relational losses compare every pair (or triple) of samples in the batch, so
with data parallelism each rank sees only its share of the relations. With
``gather=True`` the losses in :mod:`fastkd.relational` first gather student
and teacher embeddings from every rank of ``process_group`` (the default
group if None) and compute the loss of the whole batch, identically on every
rank.

Gradient convention: every rank's loss is the whole batch's loss ``L``, and
the backward sums the gradients of all ranks' losses (an all-reduce), so each
rank's local student rows get ``world_size · ∂L/∂x_local``. Data-parallel
training averages parameter gradients over the ranks (DDP), which turns that
into exactly the gradient of single-process training on the concatenated
batch. (This is ``torch.distributed.nn.functional.all_gather``'s convention;
this implementation backs it with an all-reduce, which every backend,
gloo included, supports.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _check_group(process_group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("gather=True needs torch.distributed to be initialised (init_process_group)")
    return dist.get_world_size(group=process_group)


class _GatherWithGrad(torch.autograd.Function):
    """``(N, D)`` on each rank → ``(world · N, D)`` in rank order; backward:
    all-reduce (sum) of the full gradient, then this rank's rows."""

    @staticmethod
    def forward(ctx, x, process_group):
        world = dist.get_world_size(group=process_group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=process_group)
        ctx.process_group = process_group
        ctx.rows = x.shape[0]
        ctx.rank = dist.get_rank(group=process_group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.process_group)
        return grad.narrow(0, ctx.rank * ctx.rows, ctx.rows), None


def gather_batch(
    student: torch.Tensor, teacher: torch.Tensor, process_group=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch, ``(world · N, ...)`` each: the student with gradient
    (see the module docstring), the teacher without.

    Every rank must hold the same ``N`` and feature shape (checked: a mismatch
    raises ``ValueError`` on every rank).
    """
    world = _check_group(process_group)
    shape = torch.tensor(
        [student.shape[0], student[0].numel(), teacher[0].numel()], dtype=torch.int64, device=student.device
    )
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=process_group)
    if any(not torch.equal(s, shapes[0]) for s in shapes):
        sizes = [tuple(s.tolist()) for s in shapes]
        raise ValueError(
            f"gather=True needs the same student batch size and feature sizes on every rank, "
            f"got (N, D_s, D_t) = {sizes}"
        )
    s = _GatherWithGrad.apply(student, process_group)
    with torch.no_grad():
        parts = [torch.empty_like(teacher) for _ in range(world)]
        dist.all_gather(parts, teacher.contiguous(), group=process_group)
    return s, torch.cat(parts)
