"""The checks and the autograd Function shared by the pairwise-relation families
(:mod:`fastkd.rkd`, :mod:`fastkd.gram_relation`).

Their ops take ``(N, D_s)`` student and ``(N, D_t)`` teacher embeddings and
return the loss and, from the same call, the student's gradient.
"""

from __future__ import annotations

import torch

from fastkd import distributed as _distributed
from fastkd._row_loss import scale_by_upstream
from fastkd.reference._common import checked_pair

__all__ = ["StudentGradFunction", "check_pair"]


def check_pair(student, teacher, gather=False, process_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, D_s)`` student and detached ``(N, D_t)`` teacher views, in the input dtype.

    The same checks (and messages) as the reference: floating dtype, at least
    2-D, ``N >= 1`` and equal on both sides, same dtype and device, non-empty
    features. With ``gather``, the whole batch from every rank of
    ``process_group`` (:func:`fastkd.distributed.gather_batch`).
    """
    if not isinstance(gather, bool):
        raise ValueError(f"gather must be a bool, got {type(gather).__name__}")
    s, t = checked_pair(student, teacher)
    if gather:
        s, t = _distributed.gather_batch(s, t, process_group)
    return s, t


class StudentGradFunction(torch.autograd.Function):
    """One relational term (RKD, PKT, SP, CC) on its fused op: ``op(student, teacher,
    student_grad) -> (loss, grad)`` returns the loss and, when the student needs
    it, the student's ``(N, D_s)`` gradient (computed in the same call).

    Between forward and backward only that gradient is kept. The backward
    multiplies it by the upstream gradient with
    :func:`fastkd._row_loss.scale_by_upstream`, which writes over the saved
    gradient only when the graph is freed, so a second backward through a
    retained graph (``retain_graph=True``) gives the same gradient again.
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
        return scale_by_upstream(grad, grad_output), None, None
