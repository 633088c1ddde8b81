"""Hidden-state distillation: TinyBERT's MSE and DistilBERT's cosine loss, docs/spec.md §5.4.

The mathematics is :mod:`fastkd.reference.hidden_state`'s. The projection
(TinyBERT's ``W_h``) stays a user module applied first; the fused kernels take
the projected student rows and the teacher rows. Each compiled backend is one
call with the contract of ``fastkd::hidden_state_forward``: ``cpu``
(csrc/cpu/hidden_state.cpp), ``triton`` (kernels/hidden_state.py) and ``cuda``
(csrc/cuda/hidden_state.cu). It reads each row of both inputs once and returns
the row losses and, from the same pass, the gradients already multiplied by
the reduction's factor; the backward only applies the upstream gradient.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastkd import _ops as _extension
from fastkd import _row_loss
from fastkd._backend import backend_for, kernel_op
from fastkd._enums import HiddenStateKind
from fastkd.reference import hidden_state as _reference

__all__ = ["KERNEL_BACKENDS", "HiddenStateLoss", "hidden_state_loss"]

# a build of the extension older than this family has no such op: the cpu
# backend is then unavailable for it, and the package still imports
HAS_CPU_OP = _extension.has_kernel("hidden_state_forward", "CPU")
HAS_CUDA_OP = _extension.has_kernel("hidden_state_forward", "CUDA")

# backends with a kernel for this loss (the reference always runs)
KERNEL_BACKENDS: tuple[str, ...] = ("cpu",) * HAS_CPU_OP + ("triton",) + ("cuda",) * HAS_CUDA_OP

if HAS_CPU_OP:

    @torch.library.register_fake("fastkd::hidden_state_forward")
    def _hidden_state_forward_fake(student, teacher, row_mask, kind, grad_scale, student_grad, teacher_grad):
        rows, dim = student.shape
        loss_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        return (
            student.new_empty((rows,), dtype=loss_dtype),
            student.new_empty((rows, dim) if student_grad else (0, 0)),
            teacher.new_empty((rows, dim) if teacher_grad else (0, 0)),
        )


class HiddenStateFunction(torch.autograd.Function):
    """The fused op on ``(N, D)`` student and teacher rows; one kernel call.

    The kernel returns the row losses and the gradients of the inputs that
    need them, already multiplied by ``factor`` (a float); the backward
    applies the upstream gradient (scalar, or one value per row for
    ``per_row``). A ``factor`` given as a 0-d tensor (the kept-row count of a
    mask under ``torch.compile``, not known while tracing) is applied with the
    upstream gradient instead.
    """

    @staticmethod
    def forward(ctx, student, teacher, row_mask, kind, factor, per_row, backend):
        op = kernel_op(backend, "hidden_state", "hidden_state_forward")
        want_s, want_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_scale = _row_loss.kernel_grad_scale(factor)
        row_loss, grad_s, grad_t = op(student, teacher, row_mask, int(kind), grad_scale, want_s, want_t)
        return _row_loss.save_two_sided_grads(ctx, row_loss, grad_s, grad_t, factor, per_row)

    @staticmethod
    def backward(ctx, grad_output):
        return *_row_loss.two_sided_grads_backward(ctx, grad_output), None, None, None, None, None


def hidden_state_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    kind: str = "mse",
    projection=None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """TinyBERT (``kind="mse"``) or DistilBERT (``kind="cosine"``) hidden-state loss over the kept tokens.

    Per token: ``mean_d (h − g)²`` or ``1 − h·g / √((h·h + ε)(g·g + ε))``
    with ``ε = 1e-12`` (``nn.CosineEmbeddingLoss`` with target 1: ε is added
    to each squared norm, not ``nn.CosineSimilarity``'s clamp of
    ``‖h‖·‖g‖``), where ``h = projection(student_hidden)`` and
    ``g = teacher_hidden``.

    The fused kernels (``"cpu"``, ``"triton"``, ``"cuda"``) read each token's
    ``h`` and ``g`` once and write the loss and the gradients in the same
    pass (float32 accumulation; float64 for float64 inputs on ``"cpu"``). The
    projection, if any, runs before them as an ordinary module. Excluded
    tokens get loss 0 and a zero gradient whatever their values (the
    reference's gradient there is NaN for non-finite values).

    Args:
        student_hidden: ``(..., D_s)`` float32 / float64 / bfloat16 / float16.
        teacher_hidden: ``(..., D_t)``, same leading shape, dtype and device.
            Gets a gradient when it requires one (detach it for a frozen teacher).
        kind: ``"mse"`` or ``"cosine"``.
        projection: None or a callable ``(..., D_s) → (..., D_t)`` such as
            ``nn.Linear(D_s, D_t)`` (TinyBERT's ``W_h``).
        mask: bool with the leading shape, False for excluded tokens (padding).
        reduction: ``"mean"`` over the kept tokens (for ``"mse"`` the mean over
            their channels too, ``nn.MSELoss``'s), ``"sum"``, or ``"none"``
            (the leading shape, 0 for excluded tokens).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``.
            The GPU kernels take float32 / bfloat16 / float16 (``"auto"``
            runs float64 on CUDA with the reference). States with no feature
            (``D = 0``) always run on the reference.

    Returns:
        float32 scalar (float64 for float64 inputs); 0 when no token is kept.
    """
    _reference.check_options(kind, reduction)
    h, g, mask = _reference.check_arguments(
        _reference.project(student_hidden, projection), teacher_hidden, kind, mask, reduction
    )
    chosen = backend_for("hidden_state_loss", KERNEL_BACKENDS, backend, h)
    dim = h.shape[-1]
    if chosen == "reference" or dim == 0:
        return _reference.hidden_state_loss(h, g, kind=kind, mask=mask, reduction=reduction)
    lead_shape = h.shape[:-1]
    keep = None if mask is None else mask.reshape(-1)
    rows = math.prod(lead_shape)
    if reduction == "mean" and keep is not None and torch.compiler.is_compiling():
        # no host read of the kept-row count while tracing
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        factor = 1.0 / keep.sum().clamp(min=1).to(acc)
    else:
        # "mean" is the batchmean of the row losses: ℓ_i already averages the channels
        factor = _row_loss.loss_factor("batchmean" if reduction == "mean" else reduction, 1.0, rows, keep, 1)
    out = HiddenStateFunction.apply(
        _row_loss.row_major(h.reshape(-1, dim)), _row_loss.row_major(g.reshape(-1, dim)), keep,
        HiddenStateKind.from_name(kind), factor, reduction == "none", chosen,
    )
    return out.reshape(lead_shape) if reduction == "none" else out


class HiddenStateLoss(nn.Module):
    """Module form of :func:`hidden_state_loss`, with TinyBERT's learnable projection.

    ``HiddenStateLoss(kind, student_dim=D_s, teacher_dim=D_t)`` holds
    ``projection = nn.Linear(D_s, D_t)`` (train it with the student); without
    dims there is no projection and the widths must match.
    ``forward(student_hidden, teacher_hidden, mask=None)``.
    """

    def __init__(self, kind: str = "mse", *, student_dim: int | None = None, teacher_dim: int | None = None,
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        _reference.check_options(kind, reduction)
        if (student_dim is None) != (teacher_dim is None):
            raise ValueError("student_dim and teacher_dim must be given together (or neither)")
        self.projection = None
        if student_dim is not None:
            for name, value in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{name} must be an int >= 1, got {value!r}")
            self.projection = nn.Linear(student_dim, teacher_dim)
        self.kind = kind
        self.reduction = reduction
        self.backend = backend

    def forward(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return hidden_state_loss(student_hidden, teacher_hidden, kind=self.kind, projection=self.projection,
                                 mask=mask, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, reduction={self.reduction!r}, backend={self.backend!r}"
