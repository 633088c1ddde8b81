"""Helpers of the reference tests of the sample-based losses (MMD, NST, InfoNCE):
float64 inputs on DEVICE, an exact comparison, and the contract every such
reference keeps (loss and gradient dtypes, NaN propagation, any layout)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import DEVICE

F64 = torch.float64

# (input dtype, loss dtype): float64 stays float64, the rest compute in float32
LOSS_DTYPES = (
    (torch.float64, torch.float64),
    (torch.float32, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
)


def randn(*shape, dtype=F64, requires_grad=False):
    return torch.randn(shape, dtype=F64).to(device=DEVICE, dtype=dtype).requires_grad_(requires_grad)


def close(actual: torch.Tensor, expected: float) -> None:
    assert actual.dtype == F64
    assert math.isclose(actual.item(), expected, rel_tol=1e-12, abs_tol=1e-12), (actual.item(), expected)


def dot(a, b):
    return sum(u * v for u, v in zip(a, b, strict=True))


def check_loss_dtype_and_gradient_dtype(fn, a_shape, b_shape, dtype, loss_dtype):
    """``fn(a (a_shape), b (b_shape))``: a ``()`` loss of ``loss_dtype``, ``a``'s gradient in ``dtype``."""
    a, b = randn(*a_shape, dtype=dtype, requires_grad=True), randn(*b_shape, dtype=dtype)
    loss = fn(a, b)
    assert loss.dtype == loss_dtype and loss.shape == ()
    loss.backward()
    assert a.grad.dtype == dtype
    # half-precision values are exact in float32 and float64: only the arithmetic differs
    expected = fn(a.detach().double(), b.double())
    rel_tol = 1e-12 if dtype == F64 else 1e-5
    assert math.isclose(loss.item(), expected.item(), rel_tol=rel_tol, abs_tol=1e-6)


def check_nan_input_gives_nan_loss(fn, a_shape, b_shape):
    a, b = randn(*a_shape), randn(*b_shape)
    a.view(-1)[1] = float("nan")
    assert torch.isnan(fn(a, b))


def check_non_contiguous_inputs(fn, a_shape, b_shape):
    a, b = randn(*a_shape), randn(*b_shape)
    a_strided, b_strided = (v.transpose(0, -1).contiguous().transpose(0, -1) for v in (a, b))
    assert not a_strided.is_contiguous() and not b_strided.is_contiguous()
    close(fn(a_strided, b_strided), fn(a, b).item())


class ReferenceContract:
    """The three checks above as pytest tests. A reference test module binds
    them to its loss by subclassing, ``class TestContract(ReferenceContract)``,
    with ``CALL = (fn, a_shape, b_shape)`` as the checks take it."""

    CALL: tuple

    @pytest.mark.parametrize(("dtype", "loss_dtype"), LOSS_DTYPES, ids=str)
    def test_loss_dtype_and_gradient_dtype(self, dtype, loss_dtype):
        check_loss_dtype_and_gradient_dtype(*self.CALL, dtype, loss_dtype)

    def test_nan_input_gives_nan_loss(self):
        check_nan_input_gives_nan_loss(*self.CALL)

    def test_non_contiguous_inputs(self):
        check_non_contiguous_inputs(*self.CALL)


def check_raises_value_error(pattern: str, call) -> None:
    """``call()`` raises ValueError with a message matching ``pattern`` (the
    invalid-argument tests: the message starts with the argument's name and
    says what is wrong)."""
    with pytest.raises(ValueError, match=pattern):
        call()
