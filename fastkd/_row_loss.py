"""The autograd Functions shared by the row-loss families, and their scale factors.

The fused row kernels (divergence, top-k, mixture, DKD) return the row losses
and, from the same pass, the gradients already multiplied by the reduction's
factor; the Functions here only apply the upstream gradient
(:func:`scale_by_upstream`, also used by the embedding families whose ops
return their gradient). The helpers flatten ``(..., V)`` logits to rows and
compute the factors of the reductions.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastkd import _dispatch, _hard_labels, _validate

__all__ = [
    "Rows",
    "RowLossKernelFunction",
    "StudentHardSoftFunction",
    "StudentKernelCall",
    "as_rows",
    "as_rows_in_place",
    "graph_is_kept",
    "hard_soft_factors",
    "kept_rows",
    "loss_factor",
    "over_given_items",
    "row_major",
    "scale_by_upstream",
    "scale_over_kept",
    "split_hard_soft",
    "student_hard_soft",
]


def graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph`` / ``create_graph``): then
    the saved tensors are read again by a later backward. Unknown (no such query in this
    torch) counts as kept."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


def _device_scaling_available(grad: torch.Tensor, grad_output: torch.Tensor) -> bool:
    """Whether the Triton kernel that scales a CUDA gradient unless the factor is 1 can run."""
    if not _dispatch.backend_status("triton", grad.device.type).available:
        return False
    from fastkd.kernels import _upstream

    return _upstream.can_scale(grad, grad_output)


def scale_by_upstream(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """``grad · grad_output`` (scalar, or one value per row), reusing ``grad`` where that is safe.

    ``grad`` is the gradient the forward kernel already produced and saved.
    When the upstream gradient is exactly 1 (``loss.backward()``) it is
    returned as is: on CPU tensors after reading the factor, on CUDA tensors
    through a Triton kernel that reads it on the device and skips the
    product (no host synchronisation). Otherwise it is scaled in place when this backward frees
    the graph (nothing reads ``grad`` again: no second ``(N, V)`` buffer), and
    out of place when the graph is kept (``retain_graph=True``), so that a
    second backward reads the unscaled gradient again and accumulates the
    same result. Under ``torch.compile`` the product is out of place (no
    data-dependent branch).
    """
    factor = grad_output if grad_output.dim() == 0 else grad_output.reshape(-1, 1)
    if torch.compiler.is_compiling():
        return grad * factor.to(grad.dtype)
    kept = graph_is_kept()
    if grad_output.numel() == 1 and grad.device.type == "cuda":
        # grad_output.item() would synchronise with the device on every step:
        # the comparison with 1 happens on the device instead
        if not kept and _device_scaling_available(grad, grad_output):
            from fastkd.kernels import _upstream

            return _upstream.scale_unless_one_(grad, grad_output)
    elif grad_output.numel() == 1 and grad_output.item() == 1.0:
        return grad
    if kept:
        # as mul_ computes it: in the promoted dtype, rounded to grad's
        return torch.mul(grad, factor, out=torch.empty_like(grad))
    return grad.mul_(factor)


class RowLossKernelFunction(torch.autograd.Function):
    """A fused student-only op ``op(student, *op_args, student_grad) -> (row_loss, grad)``
    whose gradient, already multiplied by ``factor``, comes out of the forward
    (the top-k and multi-teacher divergences); the backward applies the
    upstream gradient. ``factor`` also scales the returned loss."""

    @staticmethod
    def forward(ctx, op, factor, per_row, student, *op_args):
        # the top-k and mixture ops also return the (empty) row cross-entropies
        row_loss, grad, *_ = op(student, *op_args, ctx.needs_input_grad[3])
        ctx.save_for_backward(grad)
        ctx.num_op_args = len(op_args)
        return row_loss * factor if per_row else row_loss.sum() * factor

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        grad_student = scale_by_upstream(grad, grad_output) if ctx.needs_input_grad[3] else None
        return (None, None, None, grad_student, *([None] * ctx.num_op_args))


def kernel_grad_scale(factor: float | torch.Tensor) -> float:
    """The ``grad_scale`` a two-sided row kernel bakes into its gradients: the
    loss ``factor`` when it is a float, 1 when it is a 0-d tensor (a kept-row
    count under ``torch.compile``, applied in the backward instead)."""
    return factor if isinstance(factor, float) else 1.0


def save_two_sided_grads(ctx, row_loss: torch.Tensor, grad_s, grad_t, factor, per_row: bool) -> torch.Tensor:
    """Forward's end for a kernel that returned the student's and the teacher's
    gradients (``(N, ...)`` or empty) with :func:`kernel_grad_scale` applied:
    save them for :func:`two_sided_grads_backward`, return the scaled loss
    (``(N,)`` for ``per_row``, else a scalar)."""
    deferred = None if isinstance(factor, float) else factor
    ctx.save_for_backward(grad_s, grad_t, deferred)
    return row_loss * factor if per_row else row_loss.sum() * factor


def two_sided_grads_backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The student's and the teacher's gradients (None where not needed: inputs
    0 and 1 of the Function) saved by :func:`save_two_sided_grads`, times the
    upstream gradient."""
    grad_s, grad_t, deferred = ctx.saved_tensors
    upstream = grad_output if deferred is None else grad_output * deferred
    grad_student = scale_by_upstream(grad_s, upstream) if ctx.needs_input_grad[0] else None
    grad_teacher = scale_by_upstream(grad_t, upstream) if ctx.needs_input_grad[1] else None
    return grad_student, grad_teacher


@dataclass(frozen=True)
class StudentKernelCall:
    """A fused student-only op with the hard-label CE in its pass (the top-k and
    mixture ops): ``op(student, teacher_a, teacher_b, row_mask, kind,
    inv_temperature, coef, grad_scale, student_grad, labels, hard_grad_scale)
    -> (row_loss, grad, row_ce)``, and the factors of its two terms."""

    op: object
    kind: int
    inv_temperature: float
    coef: float
    soft_factor: float  # multiplies the row divergences (and is the op's grad_scale)
    hard_factor: float  # multiplies the row cross-entropies (the op's hard_grad_scale)
    per_row: bool  # reduction == "none"
    separable: bool  # return_parts: the parts may be back-propagated apart


class StudentHardSoftFunction(torch.autograd.Function):
    """``(soft, hard)`` of a :class:`StudentKernelCall`: one kernel call, one combined
    student gradient (separated in the backward only as
    :class:`fastkd.divergence.HardSoftDivergenceFunction` does). Teachers get no gradient."""

    @staticmethod
    def forward(ctx, call, student, teacher_a, teacher_b, row_mask, labels):
        row_loss, grad, row_ce = call.op(
            student, teacher_a, teacher_b, row_mask, call.kind, call.inv_temperature, call.coef,
            call.soft_factor, ctx.needs_input_grad[1], labels, call.hard_factor,
        )
        kept_for_split = (student, labels, row_mask) if call.separable else (None, None, None)
        ctx.save_for_backward(grad, *kept_for_split)
        ctx.hard_factor = call.hard_factor
        if call.per_row:
            return row_loss * call.soft_factor, row_ce * call.hard_factor
        return row_loss.sum() * call.soft_factor, row_ce.sum() * call.hard_factor

    @staticmethod
    def backward(ctx, grad_soft, grad_hard):
        grad, student, labels, row_mask = ctx.saved_tensors
        grad_student = None
        if ctx.needs_input_grad[1]:
            grad_student = split_hard_soft(
                grad, grad_soft, grad_hard, student, labels, row_mask, ctx.hard_factor
            )
        return None, grad_student, None, None, None, None


def student_hard_soft(call: StudentKernelCall, student, teacher_a, teacher_b, keep, labels, lead_shape,
                      return_parts: bool):
    """``hard + soft`` (or ``(total, hard, soft)``) of a student-only op with the CE in its pass.

    ``student`` ``(N, V)`` rows, ``keep`` ``(N,)`` bool, ``labels`` ``(N,)``
    int64 (checked: kept rows' labels in ``[0, V)``); ``lead_shape`` the
    shape of ``"none"``'s per-row result.
    """
    soft, hard = StudentHardSoftFunction.apply(call, student, teacher_a, teacher_b, keep, labels)
    if call.per_row:
        soft, hard = soft.reshape(lead_shape), hard.reshape(lead_shape)
    total = hard + soft
    return (total, hard, soft) if return_parts else total


def split_hard_soft(grad, grad_soft, grad_hard, student, labels, row_mask, hard_factor):
    """The student gradient of ``grad_soft · soft + grad_hard · hard`` from the kernel's ``grad``
    (``= d(soft + hard)/ds``). ``student`` is None when the parts cannot be
    used apart (no ``return_parts``): then the upstream gradients are equal."""
    # under torch.compile no data-dependent branch: always separate when possible
    split = student is not None and (torch.compiler.is_compiling() or not torch.equal(grad_soft, grad_hard))
    if not split:
        return scale_by_upstream(grad, grad_soft)
    # grad · upstream_soft + (upstream_hard − upstream_soft) · dhard/ds, the
    # latter recomputed from the logits
    row_scale = ((grad_hard - grad_soft) * hard_factor).expand(student.shape[0])
    correction = _hard_labels.ce_grad(student, labels, row_mask, row_scale)
    return grad * grad_soft.reshape(-1, 1).to(grad.dtype) + correction


@dataclass(frozen=True)
class Rows:
    """Logits flattened to rows, and which rows count."""

    student: torch.Tensor  # (N, V)
    teacher: torch.Tensor  # (N, V)
    keep: torch.Tensor | None  # (N,) bool, None = every row
    lead_shape: torch.Size


def kept_rows(labels, ignore_index: int, mask) -> torch.Tensor | None:
    """``(N,)`` bool of the rows that count (label not ``ignore_index``, mask true); None: every row."""
    keep = None
    if labels is not None:
        keep = labels.reshape(-1) != ignore_index
    if mask is not None:
        keep = mask.reshape(-1) if keep is None else keep & mask.reshape(-1)
    return keep


def loss_factor(reduction: str, scale: float, n_rows: int, keep, vocab: int) -> float:
    """What the kernels' row losses (and gradients) are multiplied by: ``scale`` over the
    reduction's denominator (kept rows, × V for ``"mean"``; none for ``"sum"`` / ``"none"``)."""
    if reduction in ("none", "sum"):
        return scale
    return scale_over_kept(reduction, scale, n_rows if keep is None else int(keep.sum().item()), vocab)


def scale_over_kept(reduction: str, scale: float, n_kept: int, vocab: int) -> float:
    """:func:`loss_factor` for a known count of kept rows."""
    if reduction in ("none", "sum"):
        return scale
    return scale / max(n_kept * (vocab if reduction == "mean" else 1), 1)


def hard_soft_factors(reduction: str, scale: float, keep: torch.Tensor, vocab: int, hard_weight: float,
                       soft_weight: float) -> tuple[float, float]:
    """``(soft_factor, hard_factor)`` of a kernel call with the CE in its pass: what the row
    divergences and the row cross-entropies are multiplied by, the kept rows counted once."""
    n_kept = int(keep.sum().item())
    return (
        soft_weight * scale_over_kept(reduction, scale, n_kept, vocab),
        hard_weight * _hard_labels.reduce_factor(reduction, n_kept),
    )


def as_rows(s: torch.Tensor, t: torch.Tensor, labels, ignore_index: int, mask) -> Rows:
    """``(..., V)`` student and teacher logits as ``(N, V)`` rows, with the rows that count."""
    vocab = s.shape[-1]
    keep = kept_rows(labels, ignore_index, mask)
    return Rows(row_major(s.reshape(-1, vocab)), row_major(t.reshape(-1, vocab)), keep, s.shape[:-1])


def as_rows_in_place(s: torch.Tensor, t: torch.Tensor, labels, ignore_index: int, mask) -> Rows:
    """:func:`as_rows` for the divergence kernels, which also read ``(A, R, V)`` logits in place.

    ``(..., V)`` logits whose rows cannot be one ``(N, V)`` view, such as the
    causal shift ``logits[:, :-1]`` of ``(B, T, V)`` logits (the batch stride
    is not ``T - 1`` rows), are given as an ``(A, R, V)`` view with the same
    ``A · R = N`` rows in the same order, when both student and teacher have
    one; the kernel reads each row through two strides. Only logits strided
    along V, or with no such split of their leading dimensions, are copied.
    Under ``torch.compile`` the rows are ``(N, V)`` as in :func:`as_rows`.
    """
    vocab = s.shape[-1]
    flat_s, flat_t = _view_or_none(s, (-1, vocab)), _view_or_none(t, (-1, vocab))
    two_strides = flat_s is None or flat_t is None
    if two_strides and not torch.compiler.is_compiling() and _unit_stride_along_v(s, t):
        lead = s.shape[:-1]
        for split in range(1, len(lead)):
            shape = (math.prod(lead[:split]), math.prod(lead[split:]), vocab)
            blocked_s, blocked_t = _view_or_none(s, shape), _view_or_none(t, shape)
            if blocked_s is not None and blocked_t is not None:
                return Rows(blocked_s, blocked_t, kept_rows(labels, ignore_index, mask), lead)
    return as_rows(s, t, labels, ignore_index, mask)


def _view_or_none(x: torch.Tensor, shape) -> torch.Tensor | None:
    try:
        return x.view(shape)
    except RuntimeError:  # the strides do not allow that view
        return None


def _unit_stride_along_v(*tensors: torch.Tensor) -> bool:
    return all(x.stride(-1) == 1 or x.shape[-1] == 1 for x in tensors)


def row_major(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any row stride but need unit stride along V."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


# The reductions whose denominator ``num_items_in_batch`` replaces: only the
# kept-row mean has a count of kept rows to replace.
GIVEN_ITEMS_REDUCTIONS = ("batchmean",)


def _checked_items(num_items_in_batch, reduction: str) -> float | torch.Tensor:
    """``num_items_in_batch`` checked (ValueError naming it): a finite number > 0, or a 0-d real
    tensor (its value checked only on the CPU, where reading it costs no device synchronisation)."""
    _validate.choice("reduction", reduction, _validate.REDUCTIONS)
    if reduction not in GIVEN_ITEMS_REDUCTIONS:
        raise ValueError(
            "num_items_in_batch replaces the kept-row count of reduction='batchmean' (the loss is the "
            f"kept-row sum over num_items_in_batch); it cannot be combined with reduction={reduction!r}"
        )
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.dim() != 0:
            shape = tuple(num_items_in_batch.shape)
            raise ValueError(f"num_items_in_batch must be a number or a 0-d tensor, got shape {shape}")
        if num_items_in_batch.dtype == torch.bool or num_items_in_batch.is_complex():
            raise ValueError(f"num_items_in_batch must be real, got dtype {num_items_in_batch.dtype}")
        if num_items_in_batch.device.type == "cpu":
            value = float(num_items_in_batch)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"num_items_in_batch must be finite and > 0, got {value}")
        return num_items_in_batch
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Real):
        raise ValueError(
            f"num_items_in_batch must be a number or a 0-d tensor, got {type(num_items_in_batch).__name__}"
        )
    value = float(num_items_in_batch)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"num_items_in_batch must be finite and > 0, got {value}")
    return value


def over_given_items(call: Callable, num_items_in_batch, *, reduction: str, scale, temperature, hard_weight):
    """The loss of ``call`` with the kept-row sum divided by ``num_items_in_batch``.

    ``num_items_in_batch`` has TRL's and transformers' meaning: the number of
    kept tokens of the whole optimiser step (every micro-batch of the gradient
    accumulation, every rank), so that the micro-batch losses add up to the
    step's per-token mean. ``loss = scale · Σ_kept ℓ / num_items_in_batch``
    (with hard-label mixing the cross-entropy's kept-row sum is divided by it
    too, as transformers' causal-LM loss does). Only ``reduction="batchmean"``
    takes it.

    ``call(reduction=, scale=, hard_weight=)`` computes the loss with the
    other arguments bound. A number is folded into ``scale`` and
    ``hard_weight`` (the kernels' gradients come out already divided); a 0-d
    tensor divides the ``"sum"`` result (and each part of ``return_parts``)
    on its device, never read on the host, so the backward scales the saved
    gradient by ``1 / num_items_in_batch`` there. ``scale=None`` is
    ``temperature²`` (checked here only when it is needed).
    """
    items = _checked_items(num_items_in_batch, reduction)
    if isinstance(items, float):
        if scale is None:
            scale = _validate.real("temperature", temperature, low=0.0, low_open=True) ** 2
        # anything but a number is left for the call to reject, naming it
        if _is_number(scale):
            scale = float(scale) / items
        if _is_number(hard_weight):
            hard_weight = float(hard_weight) / items
        return call(reduction="sum", scale=scale, hard_weight=hard_weight)
    result = call(reduction="sum", scale=scale, hard_weight=hard_weight)
    if isinstance(result, tuple):
        return tuple(_divided(part, items) for part in result)
    return _divided(result, items)


def _divided(loss: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    # in the loss's dtype (a float64 or int64 0-d count must not promote a float32 loss)
    return loss / items.to(device=loss.device, dtype=loss.dtype)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
