"""The upstream-gradient scaling of the fused losses' saved gradients, on the device.

The fused ops compute a loss's gradient in its forward pass; the backward
multiplies it by the upstream gradient, which is 1 for ``loss.backward()``.
Skipping that product when the factor is 1 would need the factor on the host
(``grad_output.item()``: a synchronisation per step, which also breaks CUDA
graph capture). Here every program reads the factor from device memory and
returns at once when it is 1, so ``loss.backward()`` costs one tiny launch
and no pass over the gradient, with no synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, INTERPRETED, guard_device

__all__ = ["INTERPRETED", "can_scale", "scale_unless_one_"]

BLOCK = 4096


@triton.jit
def _scale_unless_one_kernel(
    grad_ptr,  # [n] contiguous, scaled in place
    factor_ptr,  # [1] the upstream gradient
    n,
    BLOCK: tl.constexpr,
):
    factor = tl.load(factor_ptr).to(tl.float32)
    if factor != 1.0:  # NaN too: NaN · grad
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        grad = tl.load(grad_ptr + offsets, mask=inside).to(tl.float32)
        # as torch's mul_: in float32, rounded to the gradient's dtype
        tl.store(grad_ptr + offsets, (grad * factor).to(grad_ptr.dtype.element_ty), mask=inside)


def can_scale(grad: torch.Tensor, factor: torch.Tensor) -> bool:
    """Whether :func:`scale_unless_one_` takes these tensors."""
    return (grad.dtype in FLOAT_DTYPES and grad.is_contiguous() and factor.numel() == 1
            and factor.dtype.is_floating_point and factor.device == grad.device)


@guard_device
def scale_unless_one_(grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``grad.mul_(factor)`` unless ``factor`` is exactly 1, decided on the device.

    Args:
        grad: contiguous float32 / bfloat16 / float16 tensor, scaled in place.
        factor: one-element floating tensor on grad's device.
    Returns:
        ``grad``.
    """
    if not can_scale(grad, factor):
        raise ValueError("grad must be a contiguous float32 / bfloat16 / float16 tensor and factor one "
                         "floating value on its device")
    n = grad.numel()
    if n:
        _scale_unless_one_kernel[(triton.cdiv(n, BLOCK),)](grad, factor.reshape(1), n, BLOCK=BLOCK)
    return grad
