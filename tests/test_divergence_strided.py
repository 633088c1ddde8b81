"""The causal shift ``logits[:, :-1]`` of ``(B, T, V)`` logits is read in place by the
divergence kernels (two row strides): same loss and gradients as contiguous rows, and the
kernel receives the caller's memory, not a copy."""

from __future__ import annotations

import sys

import pytest
import torch

import fastkd
from tests.helpers import DEVICE, backend_params

BACKENDS = backend_params()
B, T, V = 3, 6, 40


def shifted_logits(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2).to(device=DEVICE, dtype=dtype)
    t = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2).to(device=DEVICE, dtype=dtype)
    labels = torch.randint(0, V, (B, T - 1), generator=g).to(DEVICE)
    labels[:, :2] = -100  # the prompt
    return s, t, labels


def loss_and_grads(kwargs, s_full, t_full, view):
    s_full = s_full.detach().clone().requires_grad_(True)
    t_full = t_full.detach().clone().requires_grad_(True)
    loss = fastkd.divergence(view(s_full), view(t_full), **kwargs)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).reshape(loss.shape)
    (loss * upstream).sum().backward()
    return loss.detach(), s_full.grad, t_full.grad


def shifted(x):
    return x[:, :-1]


def shifted_copy(x):
    return x[:, :-1].contiguous()


CASES = (
    pytest.param(dict(divergence="kl"), id="kl"),
    pytest.param(dict(divergence="jsd", beta=0.3, temperature=2.0, reduction="none"), id="jsd-none"),
    pytest.param(dict(divergence="reverse_kl", labels="labels"), id="reverse_kl-labels"),
    pytest.param(dict(divergence="kl", labels="labels", hard_weight=0.5), id="kl-hard"),
    pytest.param(dict(divergence="tvd", mask="mask", reduction="sum"), id="tvd-mask"),
)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_shifted_view_matches_contiguous_rows(backend, case, dtype):
    s, t, labels = shifted_logits(dtype)
    kwargs = dict(case, backend=backend)
    if kwargs.get("labels") == "labels":
        kwargs["labels"] = labels
    if kwargs.get("mask") == "mask":
        kwargs["mask"] = labels != -100
    expected = loss_and_grads(kwargs, s, t, shifted_copy)
    actual = loss_and_grads(kwargs, s, t, shifted)
    for a, e in zip(actual, expected, strict=True):
        # the same rows through the same kernel: bit for bit
        assert torch.equal(a, e)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("labels", (False, True), ids=("plain", "hard-labels"))
def test_kernel_reads_the_shifted_view_in_place(backend, labels, monkeypatch):
    s, t, y = shifted_logits(torch.float32)
    s_view, t_view = s[:, :-1], t[:, :-1]
    module = sys.modules["fastkd.divergence"]
    received = []
    kernel = module.run_divergence_kernel

    def recording_kernel(backend_name, student, teacher, *args):
        received.append((student, teacher))
        return kernel(backend_name, student, teacher, *args)

    monkeypatch.setattr(module, "run_divergence_kernel", recording_kernel)
    kwargs = dict(labels=y, hard_weight=0.5) if labels else {}
    fastkd.divergence(s_view.requires_grad_(False), t_view, backend=backend, **kwargs)
    ((student, teacher),) = received
    assert student.data_ptr() == s.data_ptr() and teacher.data_ptr() == t.data_ptr()
    assert student.untyped_storage().data_ptr() == s.untyped_storage().data_ptr()


def test_logits_strided_along_v_are_still_copied():
    s, t, _ = shifted_logits(torch.float32)
    s_t = s.transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, V), stride 1 along T
    expected = fastkd.divergence(s, t, backend="reference")
    torch.testing.assert_close(fastkd.divergence(s_t, t), expected)
