"""Attention transfer (docs/spec.md §5): :func:`at_loss` and :class:`ATLoss`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastkd import _ops  # noqa: F401  (registers the fastkd:: ops and their fake kernels)
from fastkd._backend import backend_for, kernel_op
from fastkd.reference import attention_transfer as _reference

__all__ = ["ATLoss", "at_loss"]

# The compiled backends that have an attention-transfer kernel.
AT_KERNELS = ("cpu", "triton", "cuda")


class ATFunction(torch.autograd.Function):
    """Attention transfer on the fused ops of ``backend``, for maps of equal spatial size.

    Between forward and backward it keeps the two ``(N,)`` norms of the
    attention maps (besides references to the maps themselves); the backward
    rebuilds the attention maps in one pass over the channels.
    """

    @staticmethod
    def forward(ctx, student, teacher, p, eps, backend):
        forward_op = kernel_op(backend, "attention_transfer", "attention_transfer_forward")
        loss, s_norm, t_norm = forward_op(student, teacher, p, eps)
        ctx.save_for_backward(student, teacher, s_norm, t_norm)
        ctx.p, ctx.eps, ctx.backend = p, eps, backend
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        student, teacher, s_norm, t_norm = ctx.saved_tensors
        want_s, want_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (want_s or want_t):
            return None, None, None, None, None
        backward_op = kernel_op(ctx.backend, "attention_transfer", "attention_transfer_backward")
        grad_s, grad_t = backward_op(
            grad_output, student, teacher, s_norm, t_norm, ctx.p, ctx.eps, want_s, want_t
        )
        return (grad_s if want_s else None), (grad_t if want_t else None), None, None, None


def at_loss(
    student_maps: torch.Tensor, teacher_maps: torch.Tensor, *, p: int = 2, backend: str = "auto"
) -> torch.Tensor:
    """Attention transfer for one pair of feature maps (RepDistiller ``Attention``, docs/spec.md §5).

    ``a(f) = normalize(mean_c f^p)`` over each sample's ``H·W`` positions
    (``F.normalize``, eps 1e-12); ``L = mean((a_s − a_t)²)`` over ``N·H·W``.
    Maps of different spatial size are adaptive-average-pooled to
    ``(min(H, H'), min(W, W'))`` first (in float32, float64 for float64
    input). Nothing is detached: ``teacher_maps`` gets a gradient when it
    requires one (detach it for a frozen teacher).

    The fused kernels (``"cpu"``, ``"triton"``, ``"cuda"``) build each
    sample's attention map in one pass over the channels (NCHW and
    channels_last inputs are read in place), fuse the normalisation and the
    squared difference, and keep only the two ``(N,)`` map norms for the
    backward, which is fused the same way.

    Args:
        student_maps: ``(N, C_s, H, W)``, float32 / bfloat16 / float16 / float64.
        teacher_maps: ``(N, C_t, H', W')``, same dtype and device; channels and
            spatial size may differ.
        p: the power, an integer ``>= 1`` (2 in the paper and RepDistiller).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``.
            The GPU kernels take float32 / bfloat16 / float16 (``"auto"``
            runs float64 on CUDA with the reference).

    Returns:
        ``()`` loss, float32 (float64 for float64 inputs).

    RepDistiller weights this loss by ``β = 1000`` (summed over layer pairs).
    """
    s, t, p = _reference.check_at_arguments(student_maps, teacher_maps, p)
    chosen = backend_for("at", AT_KERNELS, backend, s)
    if chosen == "reference":
        return _reference.at_loss(s, t, p=p)
    if s.shape[2:] != t.shape[2:]:
        # Pooling averages; doing it in the accumulation dtype keeps reduced
        # precision inputs as accurate as the reference.
        acc = torch.float64 if s.dtype == torch.float64 else torch.float32
        s, t = _reference.pool_to_common_size(s.to(acc), t.to(acc))
    return ATFunction.apply(s, t, p, _reference.NORMALIZE_EPS, chosen)


class ATLoss(nn.Module):
    """Attention transfer summed over layer pairs (RepDistiller ``Attention``, docs/spec.md §5).

    ``forward(student_maps, teacher_maps)`` takes two equally long sequences of
    ``(N, C, H, W)`` maps (or one map each) and returns
    ``Σ_i at_loss(student_maps[i], teacher_maps[i])``, a ``()`` loss.
    Weight it yourself (RepDistiller uses ``β = 1000``).
    """

    def __init__(self, *, p: int = 2, backend: str = "auto") -> None:
        super().__init__()
        self.p = p
        self.backend = backend

    def forward(
        self,
        student_maps: torch.Tensor | Sequence[torch.Tensor],
        teacher_maps: torch.Tensor | Sequence[torch.Tensor],
    ) -> torch.Tensor:
        s_list = _as_list("student_maps", student_maps)
        t_list = _as_list("teacher_maps", teacher_maps)
        if len(s_list) != len(t_list):
            raise ValueError(
                f"teacher_maps has {len(t_list)} maps but student_maps has {len(s_list)}; "
                "give one teacher map per student map"
            )
        losses = [at_loss(s, t, p=self.p, backend=self.backend) for s, t in zip(s_list, t_list, strict=True)]
        return torch.stack(losses).sum()

    def extra_repr(self) -> str:
        return f"p={self.p}, backend={self.backend!r}"


def _as_list(name: str, value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) == 0:
        raise ValueError(
            f"{name} must be a tensor or a non-empty sequence of tensors, got {type(value).__name__}"
        )
    return list(value)
