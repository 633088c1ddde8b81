"""Multi-teacher weights checked on the device (docs/spec.md §6): no host read of GPU weights.

On a GPU, reading the ``(K,)`` teacher weights on the host would synchronise
with the device on every step. There ``fastkd._validate.values_checked_on_host``
is False (unless ``FASTKD_CHECK_DEVICE_VALUES=1``) and invalid weights give a
NaN loss and NaN gradients instead of a ``ValueError``. These tests run that
mode on CPU tensors too, through the Triton interpreter and the reference, by
making the policy answer False. The ``cpu`` backend is not among them: its
op reads the weights on the host by contract (csrc/cpu/mixture.cpp).
"""

from __future__ import annotations

import contextlib
import importlib
import types

import pytest
import torch

import fastkd
from fastkd import _validate
from fastkd._divergence_options import kernel_divergence
from fastkd.reference import mixture as reference_mt
from tests.common_checks import run_with_grad
from tests.helpers import DEVICE
from tests.test_mixture import check_parity, logits, raw_forward

# The backends that guard the weights' values on the device.
GUARDED_BACKENDS = ("reference", "triton", "cuda")
BAD_WEIGHTS = {
    "sum above 1": [0.5, 0.5 + 2e-6, 0.0],
    "sum below 1": [0.2, 0.3, 0.4],
    "negative": [1.5, -0.5, 0.0],
    "nan": [float("nan"), 0.5, 0.5],
    "inf": [float("inf"), 0.0, 0.0],
    "-inf": [float("-inf"), 1.0, 1.0],
}
GOOD_WEIGHTS = [0.2, 0.5, 0.3]
# A Python-number read of a tensor's value: what a host synchronisation is on a GPU.
HOST_READS = ("__bool__", "__float__", "__int__", "item", "tolist")


def guarded_params():
    params = []
    for name in GUARDED_BACKENDS:
        if name == "reference":
            params.append(pytest.param(name, id=name))
            continue
        status = fastkd._dispatch.backend_status(name, DEVICE.type)
        marks = () if status.available else (pytest.mark.skip(reason=f"{name}: {status.reason}"),)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture
def device_checks(monkeypatch):
    """The policy of a GPU without FASTKD_CHECK_DEVICE_VALUES, for tensors on any device."""
    monkeypatch.delenv("FASTKD_CHECK_DEVICE_VALUES", raising=False)
    monkeypatch.setattr(_validate, "values_checked_on_host", lambda value: False)


def as_gpu(value):
    """A stand-in with ``value``'s place taken by a GPU: what the policy sees of a CUDA tensor."""
    return types.SimpleNamespace(device=torch.device("cuda", 0))


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Every read of a tensor's value into a Python number raises while inside."""
    with monkeypatch.context() as patch:
        for name in HOST_READS:
            def refuse(self, *args, _name=name, **kwargs):
                raise AssertionError(f"host read of a tensor value: Tensor.{_name}")

            patch.setattr(torch.Tensor, name, refuse)
        yield


def weights_tensor(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("backend", guarded_params())
@pytest.mark.parametrize("divergence", ("kl", "reverse_kl", "jsd"))
@pytest.mark.parametrize("bad", BAD_WEIGHTS, ids=str)
def test_bad_weights_give_nan_loss_and_gradient(device_checks, backend, divergence, bad):
    """KL (gradient in the loss pass), reverse KL (the mode read) and JSD (the gradient
    pass): every row's loss and every gradient entry NaN, for per-row and reduced losses."""
    s, t = logits((3, 50)), logits((3, 3, 50))
    w = weights_tensor(BAD_WEIGHTS[bad])
    for reduction in ("none", "batchmean"):
        loss, grad = run_with_grad(
            lambda a, reduction=reduction: fastkd.divergence(
                a, t, teacher_weights=w, divergence=divergence, temperature=2.0, reduction=reduction,
                backend=backend,
            ), s
        )
        assert torch.isnan(loss).all(), (reduction, loss)
        assert torch.isnan(grad).all(), reduction


@pytest.mark.parametrize("backend", guarded_params())
def test_bad_float32_weights_with_hard_labels_give_nan(device_checks, backend):
    """float32 weights (converted on the device) and the hard-label CE mixed in: the
    soft term is NaN, so the total and the student gradient are too."""
    s, t = logits((4, 40)), logits((3, 4, 40))
    labels = torch.randint(0, 40, (4,), device=DEVICE)
    w = weights_tensor([0.5, 0.6, 0.0], torch.float32)
    loss, grad = run_with_grad(
        lambda a: fastkd.divergence(a, t, teacher_weights=w, labels=labels, hard_weight=0.5,
                                    backend=backend), s
    )
    assert torch.isnan(loss).all() and torch.isnan(grad).all()


@pytest.mark.parametrize("bad", BAD_WEIGHTS, ids=str)
def test_bad_weights_give_nan_log_weights_in_the_triton_launcher(device_checks, bad):
    """The launcher guards weights handed to it directly too (not only through
    fastkd.divergence, which already makes them NaN)."""
    if not fastkd._dispatch.backend_status("triton", DEVICE.type).available:
        pytest.skip("no triton backend on this device")
    op, _ = raw_forward("triton")
    s, t = logits((2, 30)), logits((3, 2, 30))
    loss, grad, _ = op(s, t, weights_tensor(BAD_WEIGHTS[bad]), None, 2, 0.5, 0.3, 1.0, True)
    assert torch.isnan(loss).all() and torch.isnan(grad).all()


@pytest.mark.parametrize("backend", guarded_params())
@pytest.mark.parametrize("divergence", ("kl", "reverse_kl", "jsd", "tvd"))
def test_good_weights_unchanged(device_checks, backend, divergence):
    """Valid weights checked on the device: the float64 reference's loss and gradient
    within the usual tolerance, and on CPU tensors bit for bit what the host checks
    give (the same arithmetic on the same weights). Weights within the sum tolerance
    of 1 are renormalised as on the host."""
    s, t = logits((4, 97)), logits((3, 4, 97))
    kwargs = dict(divergence=divergence, temperature=2.0)
    for values in (GOOD_WEIGHTS, [0.5, 0.3, 0.2000006], [0.25, 0.75, 0.0]):
        w = weights_tensor(values)
        check_parity(backend, s, t, w / w.sum(), **kwargs)

        def loss_fn(a, w=w):
            return fastkd.divergence(a, t, teacher_weights=w, backend=backend, **kwargs)

        got = run_with_grad(loss_fn, s)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_validate, "values_checked_on_host", lambda value: True)
            host = run_with_grad(loss_fn, s)
        for a, b in zip(got, host, strict=True):
            if DEVICE.type == "cpu":
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("layout", ("expanded", "permuted"))
def test_good_weights_raw_triton_forward_float64(device_checks, layout):
    """The launcher with device-checked weights, in float64 against the reference."""
    if not fastkd._dispatch.backend_status("triton", DEVICE.type).available:
        pytest.skip("no triton backend on this device")
    op, _ = raw_forward("triton")
    s = logits((3, 211), torch.float64)
    t = logits((3, 211), torch.float64).expand(4, 3, 211) if layout == "expanded" else \
        logits((3, 4, 211), torch.float64).transpose(0, 1)
    w = weights_tensor([0.1, 0.2, 0.3, 0.4])
    kind, coef = kernel_divergence("skew_kl", 0.5, 0.3)
    loss, grad, _ = op(s, t, w, None, kind, 1 / 1.3, coef, 0.8, True)
    a = s.clone().requires_grad_(True)
    want = reference_mt.mixture_divergence(a, t, w, divergence="skew_kl", alpha=0.3, temperature=1.3,
                                           scale=1.0, reduction="none")
    want.backward(torch.full_like(want, 0.8))
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, a.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("weights", ("tensor", "list", "bad tensor"))
def test_triton_path_reads_no_tensor_value_on_the_host(device_checks, monkeypatch, weights):
    """With the checks on the device, the forward (which also computes the gradient)
    turns no tensor value into a Python number: on a GPU that is a synchronisation."""
    if not fastkd._dispatch.backend_status("triton", DEVICE.type).available:
        pytest.skip("no triton backend on this device")
    s, t = logits((2, 60)), logits((3, 2, 60))
    w = {"tensor": weights_tensor(GOOD_WEIGHTS), "list": GOOD_WEIGHTS,
         "bad tensor": weights_tensor(BAD_WEIGHTS["sum below 1"])}[weights]
    fastkd.divergence(s, t, teacher_weights=w, backend="triton")  # compiled and cached outside the check
    a = s.clone().requires_grad_(True)
    with no_host_reads(monkeypatch):
        loss = fastkd.divergence(a, t, teacher_weights=w, backend="triton", divergence="jsd")
        per_row = fastkd.divergence(a, t, teacher_weights=w, backend="triton", reduction="none")
    assert loss.shape == () and per_row.shape == (2,)
    with pytest.raises(AssertionError, match="host read"), no_host_reads(monkeypatch):
        bool(loss)  # the check itself is armed


def test_host_checks_still_raise(device_checks):
    """The guard replaces the ValueError only for tensors: a sequence of numbers is
    checked in Python (no tensor read), and shapes and dtypes are metadata."""
    s, t = logits((4, 30)), logits((2, 4, 30))
    with pytest.raises(ValueError, match="sum to 1"):
        fastkd.divergence(s, t, teacher_weights=[0.5, 0.6], backend="reference")
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        fastkd.divergence(s, t, teacher_weights=weights_tensor([1.0]), backend="reference")
    with pytest.raises(ValueError, match="floating point"):
        fastkd.divergence(s, t, teacher_weights=torch.tensor([1, 0], device=DEVICE), backend="reference")


def test_check_device_values_environment(monkeypatch):
    """``FASTKD_CHECK_DEVICE_VALUES=1`` turns the host checks back on for GPU tensors. Here
    the policy is asked about every tensor as if it were on a GPU, so that the variable
    decides, on CPU tensors too."""
    policy = _validate.values_checked_on_host
    monkeypatch.setattr(_validate, "values_checked_on_host", lambda value: policy(as_gpu(value)))
    s, t = logits((3, 30)), logits((2, 3, 30))
    bad = weights_tensor([0.5, 0.6])
    backends = [b for b in ("reference", "triton", "cuda")
                if b == "reference" or fastkd._dispatch.backend_status(b, DEVICE.type).available]
    monkeypatch.setenv("FASTKD_CHECK_DEVICE_VALUES", "1")
    for backend in backends:
        with pytest.raises(ValueError, match="sum to 1"):
            fastkd.divergence(s, t, teacher_weights=bad, backend=backend)
    if "triton" in backends:
        op, _ = raw_forward("triton")
        with pytest.raises(ValueError, match="sum to 1"):
            op(s, t, bad, None, 0, 1.0, 0.0, 1.0, True)
    for unset in ("0", None):
        if unset is None:
            monkeypatch.delenv("FASTKD_CHECK_DEVICE_VALUES")
        else:
            monkeypatch.setenv("FASTKD_CHECK_DEVICE_VALUES", unset)
        for backend in backends:
            assert torch.isnan(fastkd.divergence(s, t, teacher_weights=bad, backend=backend))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="GPU tensors: FASTKD_TEST_DEVICE=cuda")
def test_gpu_weights_follow_the_policy_on_the_gpu(monkeypatch):
    """On real CUDA tensors: NaN without the variable, ValueError with it."""
    s, t = logits((3, 30)), logits((2, 3, 30))
    bad = weights_tensor([0.5, 0.6])
    monkeypatch.delenv("FASTKD_CHECK_DEVICE_VALUES", raising=False)
    assert not _validate.values_checked_on_host(bad)
    for backend in ("triton", "cuda"):
        if fastkd._dispatch.backend_status(backend, "cuda").available:
            assert torch.isnan(fastkd.divergence(s, t, teacher_weights=bad, backend=backend))
            monkeypatch.setenv("FASTKD_CHECK_DEVICE_VALUES", "1")
            with pytest.raises(ValueError, match="sum to 1"):
                fastkd.divergence(s, t, teacher_weights=bad, backend=backend)
            monkeypatch.delenv("FASTKD_CHECK_DEVICE_VALUES")


def test_host_weights_under_graph_capture_become_fill_kernels(monkeypatch):
    """Host weights (a list) for a CUDA stream that is capturing a graph reach the
    kernels as device weights built by fill kernels: no pinned buffer whose
    address a replay would read after the call released it. Outside a capture,
    and off CUDA, the weights pass unchanged."""
    fkmixture = importlib.import_module("fastkd.mixture")
    weights = torch.tensor([0.25, 0.0, 0.75, 1 / 3], dtype=torch.float64)
    built = fkmixture.graph_constants(weights, DEVICE)
    assert built.device == DEVICE and built.dtype == torch.float64
    assert torch.equal(built.cpu(), weights)
    assert fkmixture._weights_for_capture(weights, torch.device("cpu")) is weights
    if DEVICE.type != "cuda":
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        assert fkmixture._weights_for_capture(weights, torch.device("cpu")) is weights
    else:
        assert fkmixture._weights_for_capture(weights, DEVICE) is weights  # not capturing
