"""Checks and views that tests of several families share."""

from __future__ import annotations

import pytest
import torch

import fastkd
from tests.helpers import DEVICE, KERNEL_BACKENDS, assert_matches


def strided(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a non-contiguous view with the same values."""
    if x.dim() == 1:
        other = ~x if x.dtype == torch.bool else x.flip(0)
        view = torch.stack([x, other], 1)[:, 0]
    else:
        view = x.t().contiguous().t()
    assert not view.is_contiguous() and torch.equal(view, x)
    return view


def check_compiled_matches_eager(step, s: torch.Tensor, t: torch.Tensor) -> None:
    """``torch.compile(step, fullgraph=True)`` (inductor, as users run it:
    fails on any graph break) gives eager ``step``'s float32 loss and
    student gradient; ``s`` requires grad."""
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(s, t)
    loss.backward()
    s_eager = s.detach().clone().requires_grad_(True)
    expected = step(s_eager, t)
    expected.backward()
    assert_matches(loss, expected.double(), torch.float32, "compiled loss")
    assert_matches(s.grad, s_eager.grad.double(), torch.float32, "compiled grad")


def assert_results_close(got, want, rtol: float) -> None:
    """Two runs' ``(tensors, a, b)`` results agree: each tensor of the sequence
    ``got[0]``, then ``got[1]`` and ``got[2]``, equal ``want``'s within
    ``rtol`` (``atol`` = ``rtol · 1e-3``)."""
    for g, w in zip(got[0], want[0], strict=True):
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * 1e-3)
    torch.testing.assert_close(got[1], want[1], rtol=rtol, atol=rtol * 1e-3)
    torch.testing.assert_close(got[2], want[2], rtol=rtol, atol=rtol * 1e-3)


def backend_param(name: str, unavailable: str | None = None):
    """The pytest param of backend ``name`` on DEVICE, skipped with the reason
    when the backend is unavailable there, or with ``unavailable`` when given
    (a backend without the family's kernel)."""
    status = fastkd._dispatch.backend_status(name, DEVICE.type)
    reason = unavailable if unavailable is not None else (None if status.available else status.reason)
    marks = () if reason is None else (pytest.mark.skip(reason=f"{name}: {reason}"),)
    return pytest.param(name, marks=marks, id=name)


def family_backend_params(family_backends, missing: str) -> list:
    """Every backend of KERNEL_BACKENDS as a pytest param (:func:`backend_param`),
    those not in ``family_backends`` skipped with the reason ``missing``."""
    return [backend_param(name, None if name in family_backends else missing) for name in KERNEL_BACKENDS]


def check_aot_eager_equals_eager(loss, s: torch.Tensor, t: torch.Tensor) -> None:
    """``torch.compile(loss, fullgraph=True, backend="aot_eager")`` (fails on a
    graph break; the ops traced through their fake kernels) gives eager
    ``loss``'s value and gradient with respect to ``s`` bit for bit."""
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(s, t)
    (got_grad,) = torch.autograd.grad(got, s)
    expected = loss(s, t)
    (expected_grad,) = torch.autograd.grad(expected, s)
    assert torch.equal(got, expected) and torch.equal(got_grad, expected_grad)
