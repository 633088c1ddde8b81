"""Checks and views that tests of several families share."""

from __future__ import annotations

import pytest
import torch

import fastkd
from tests.helpers import DEVICE, KERNEL_BACKENDS, UPSTREAM, assert_matches


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


def run_with_grad(fn, s: torch.Tensor, upstream=UPSTREAM):
    """Loss of ``fn(s)`` and the gradient with respect to ``s`` of ``upstream · loss``; a
    per-row loss (reduction "none") is weighted by ``upstream`` times a ramp from 0.5 to
    1.5 over its rows, so that a gradient landing on the wrong row shows."""
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s)
    weight = torch.full_like(loss, upstream)
    if loss.dim():
        ramp = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device)
        weight = weight * ramp.reshape(loss.shape)
    loss.backward(weight)
    return loss.detach(), s.grad


def check_student_parity(backend: str, fused, reference, s: torch.Tensor, same) -> None:
    """``fused(a)`` on the student logits ``s`` (..., V) against ``reference(a)`` on ``s``
    in float64, loss and student gradient (:func:`run_with_grad`): the loss in float32
    (float64 for float64 input), the gradient in ``s.dtype``, both within docs/spec.md
    §6's pass mark relative to ``same``, the reference's ``(loss, grad)`` runs from the
    inputs in ``s.dtype``."""
    dtype = s.dtype
    got = run_with_grad(fused, s)
    want = run_with_grad(reference, s.double())
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[1].dtype == dtype
    assert_matches(got[0], want[0], dtype, f"{backend} loss", [r[0] for r in same])
    assert_matches(got[1], want[1], dtype, f"{backend} student grad", [r[1] for r in same])


def reference_in_summation_orders(permuted_reference, s: torch.Tensor, samples: int = 3) -> list:
    """``samples`` runs (:func:`run_with_grad`) of a reference on the student logits ``s``
    (..., V) with the vocabulary permuted: the same loss, a different rounding. The first
    run keeps the order; the others use seeded random permutations. ``permuted_reference(perm,
    inverse)`` returns the loss function of the permuted student ``s[..., perm]`` (the teacher
    permuted alike: original id j sits at position ``inverse[j]``). Returns ``(loss, grad)``
    pairs, the gradients mapped back to the original order."""
    results = []
    for perm, inverse in vocabulary_permutations(s, samples):
        loss, grad = run_with_grad(permuted_reference(perm, inverse), s[..., perm])
        results.append((loss, grad[..., inverse]))
    return results


def vocabulary_permutations(s: torch.Tensor, samples: int = 3):
    """``samples`` pairs ``(perm, inverse)`` of (V,) int64 permutations of the last (vocabulary)
    dimension of ``s`` (on its device): the identity first, then seeded random ones, which leave a
    divergence unchanged but not its rounding. Original id j sits at position ``inverse[j]``."""
    for k in range(samples):
        perm = torch.arange(s.shape[-1], device=s.device)
        if k:
            perm = torch.randperm(s.shape[-1], generator=torch.Generator().manual_seed(k)).to(s.device)
        yield perm, torch.argsort(perm)


def explicit_divergence(p: torch.Tensor, q: torch.Tensor, divergence: str, beta: float, alpha: float):
    """Row divergences (N,) between the teacher's and the student's probabilities ``p``, ``q``
    (N, V), float64, from docs/spec.md §1's formulas as written (0 log 0 = 0)."""

    def kl(a, b):
        return torch.where(a > 0, a * (a.log() - b.log()), torch.zeros_like(a)).sum(-1)

    if divergence == "kl":
        return kl(p, q)
    if divergence == "reverse_kl":
        return kl(q, p)
    if divergence == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if divergence == "skew_kl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if divergence == "skew_reverse_kl":
        return kl(q, alpha * q + (1 - alpha) * p)
    assert divergence == "tvd"
    return 0.5 * (p - q).abs().sum(-1)


def row_exclusion_kwargs(selector: str, vocab: int) -> dict:
    """The ``labels`` and ``mask`` keyword arguments for (3, 5) rows of ``vocab`` classes
    that ``selector`` asks for (all: neither; labels; mask; both), None otherwise: random
    (3, 5) int64 labels with rows (0, 1) and (2, 4) ignored (−100), and a (3, 5) bool mask
    that drops row (1, 2)."""
    labels = torch.randint(0, vocab, (3, 5), device=DEVICE)
    labels[0, 1] = labels[2, 4] = -100
    mask = torch.ones(3, 5, dtype=torch.bool, device=DEVICE)
    mask[1, 2] = False
    return {"labels": labels if selector in ("labels", "both") else None,
            "mask": mask if selector in ("mask", "both") else None}
