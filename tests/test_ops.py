"""The compiled ops themselves: torch.library registration, fake kernels,
torch.compile, the C++ argument checks and every SIMD variant of the CPU kernels."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastkd
from fastkd import _ops
from tests.common_checks import check_compiled_matches_eager
from tests.helpers import DEVICE, assert_matches

pytestmark = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR))

DISPATCH_KEY = "CUDA" if DEVICE.type == "cuda" else "CPU"


def divergence_op_args(kind: int, *, rows=5, vocab=37, dtype=torch.float32, mask=True):
    s = torch.randn(rows, vocab, device=DEVICE, dtype=dtype)
    t = torch.randn(rows, vocab, device=DEVICE, dtype=dtype)
    row_mask = torch.rand(rows, device=DEVICE) > 0.3 if mask else None
    coef = 0.3 if kind in (2, 3, 4) else 0.0
    return (s, t, row_mask, kind, 0.5, coef, 0.25, True, True)


@pytest.mark.parametrize("kind", range(6))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_opcheck_divergence_forward(kind, dtype):
    if not _ops.has_kernel("divergence_forward", DISPATCH_KEY):
        pytest.skip(f"no {DISPATCH_KEY} kernel for fastkd::divergence_forward")
    torch.library.opcheck(torch.ops.fastkd.divergence_forward.default, divergence_op_args(kind, dtype=dtype))
    torch.library.opcheck(torch.ops.fastkd.divergence_forward.default,
                          divergence_op_args(kind, mask=False)[:7] + (False, False))
    # with the hard-label cross-entropy (labels of excluded rows may be anything)
    args = divergence_op_args(kind, dtype=dtype)
    labels = torch.randint(0, 37, (5,), device=DEVICE).masked_fill(~args[2], -100)
    torch.library.opcheck(torch.ops.fastkd.divergence_forward.default, args + (labels, 0.7))


def test_op_row_ce_is_the_cross_entropy_and_adds_its_gradient():
    s, t, row_mask, *rest = divergence_op_args(2)
    labels = torch.randint(0, 37, (5,), device=DEVICE)
    loss, gs, gt, ce = torch.ops.fastkd.divergence_forward(s, t, row_mask, *rest, labels, 0.7)
    loss0, gs0, gt0, ce0 = torch.ops.fastkd.divergence_forward(s, t, row_mask, *rest)
    assert ce0.shape == (0,)
    expected_ce = torch.nn.functional.cross_entropy(s.double(), labels, reduction="none") * row_mask
    assert_matches(ce, expected_ce, torch.float32, "row_ce")
    expected_gs = gs0.double() + 0.7 * row_mask.unsqueeze(1) * (
        s.double().softmax(1) - torch.nn.functional.one_hot(labels, 37)
    )
    assert_matches(gs, expected_gs, torch.float32, "student grad with the CE term")
    torch.testing.assert_close(loss, loss0, rtol=0, atol=0)
    torch.testing.assert_close(gt, gt0, rtol=0, atol=0)


def test_op_outputs_follow_the_schema_contract():
    s, t, row_mask, *rest = divergence_op_args(2)
    labels = torch.full((5,), -100, device=DEVICE).masked_fill(row_mask, 3)
    loss, gs, gt, ce = torch.ops.fastkd.divergence_forward(s, t, row_mask, *rest, labels, 0.5)
    assert loss.shape == (5,) and loss.dtype == torch.float32
    assert ce.shape == (5,) and ce.dtype == torch.float32
    assert gs.shape == s.shape and gt.shape == t.shape and gs.is_contiguous()
    assert torch.all(loss[~row_mask] == 0) and torch.all(gs[~row_mask] == 0) and torch.all(gt[~row_mask] == 0)
    assert torch.all(ce[~row_mask] == 0) and torch.all(ce[row_mask] > 0)
    loss, gs, gt, ce = torch.ops.fastkd.divergence_forward(s, t, None, *rest[:4], False, False)
    assert gs.shape == (0, 0) and gt.shape == (0, 0) and ce.shape == (0,)


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"student": torch.randn(5)}, "student must be 2-D"),
        ({"student": torch.randn(5, 0), "teacher": torch.randn(5, 0)}, "at least one column"),
        ({"teacher": torch.randn(5, 36)}, "must have the same shape"),
        ({"teacher": torch.randn(5, 37, dtype=torch.float64)}, "same dtype"),
        ({"student": torch.randn(37, 5).t(), "teacher": torch.randn(37, 5).t()}, "unit stride"),
        ({"row_mask": torch.ones(5)}, "row_mask must be bool"),
        ({"row_mask": torch.ones(4, dtype=torch.bool)}, "one entry per row"),
        ({"kind": 6}, "kind must be in"),
        ({"inv_temperature": 0.0}, "inv_temperature must be finite and > 0"),
        ({"inv_temperature": float("inf")}, "inv_temperature must be finite and > 0"),
        ({"kind": 2, "coef": 1.0}, "beta"),
        ({"kind": 3, "coef": 0.0}, "alpha"),
        ({"grad_scale": float("nan")}, "grad_scale must be finite"),
        ({"labels": torch.zeros(5, dtype=torch.int32)}, "labels must be int64"),
        ({"labels": torch.zeros(4, dtype=torch.int64)}, "one entry per row"),
        ({"labels": torch.full((5,), 37)}, r"labels of kept rows must lie in \[0, 37\)"),
        ({"labels": torch.full((5,), -1)}, r"labels of kept rows must lie in \[0, 37\)"),
        ({"hard_grad_scale": 0.5}, "hard_grad_scale must be 0 without labels"),
        ({"labels": torch.zeros(5, dtype=torch.int64), "hard_grad_scale": float("inf")},
         "hard_grad_scale must be finite"),
    ],
)
def test_op_checks_its_arguments_in_cpp(change, needle):
    if DEVICE.type != "cpu":
        pytest.skip("argument tensors are built on the CPU")
    names = ["student", "teacher", "row_mask", "kind", "inv_temperature", "coef", "grad_scale",
             "student_grad", "teacher_grad", "labels", "hard_grad_scale"]
    args = dict(zip(names, divergence_op_args(0, mask=False) + (None, 0.0), strict=True))
    args.update(change)
    with pytest.raises(RuntimeError, match=needle):
        torch.ops.fastkd.divergence_forward(*[args[n] for n in names])


def test_torch_compile_fullgraph_without_graph_breaks():
    if DEVICE.type != "cpu":
        pytest.skip("CPU-only test")
    torch._dynamo.reset()

    def step(s, t):
        return fastkd.kd_loss(s, t, temperature=2.0, backend="cpu") * 2.0

    check_compiled_matches_eager(step, torch.randn(6, 50, requires_grad=True), torch.randn(6, 50))


def _supported_capabilities():
    order = ["default", "avx2", "avx512"]
    best = _ops._C.supported_cpu_capability() if _ops._C else "default"
    return order[: order.index(best) + 1]


@pytest.mark.parametrize("capability", _supported_capabilities())
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16, torch.float16), ids=str)
def test_every_simd_variant_matches_the_reference(capability, dtype, monkeypatch):
    if DEVICE.type != "cpu":
        pytest.skip("CPU-only test")
    monkeypatch.setenv("FASTKD_CPU_CAPABILITY", capability)
    assert _ops._C.cpu_capability() == capability
    from tests.test_divergence import DIVERGENCES, check_parity, logits

    for divergence in DIVERGENCES:
        s, t = logits((7, 203), dtype), logits((7, 203), dtype)  # 203: a SIMD tail in every width
        check_parity("cpu", s, t, divergence=divergence, temperature=1.7, teacher_grad=True)


def test_forcing_an_unknown_capability_is_an_error(monkeypatch):
    monkeypatch.setenv("FASTKD_CPU_CAPABILITY", "sse9")
    with pytest.raises(RuntimeError, match="FASTKD_CPU_CAPABILITY must be"):
        _ops._C.cpu_capability()


def test_backends_report_and_build_info():
    status = fastkd.backends()
    assert set(status) == {"reference", "cpu", "cuda", "triton"}
    assert status["reference"].available and status["cpu"].available
    assert all(isinstance(s.reason, str) and s.reason for s in status.values())
    info = _ops._C.build_info()
    assert "-O" in info["cxx_flags"] and info["simd_variants"] == ("default", "avx2", "avx512")


def test_output_cache_reuses_freed_gradients_never_live_ones():
    if DEVICE.type != "cpu":
        pytest.skip("CPU-only test")
    s = torch.randn(64, 8192, requires_grad=True)  # a 2 MiB gradient: cached size
    t = torch.randn(64, 8192)
    fastkd.empty_cache()
    fastkd.kd_loss(s, t, backend="cpu").backward()
    first_ptr, first = s.grad.data_ptr(), s.grad.clone()
    s.grad = None
    assert _ops._C.cached_bytes() >= s.numel() * 4
    fastkd.kd_loss(s, t, backend="cpu").backward()
    assert s.grad.data_ptr() == first_ptr and torch.equal(s.grad, first)
    kept, s.grad = s.grad, None
    fastkd.kd_loss(s, t, backend="cpu").backward()
    assert s.grad.data_ptr() != kept.data_ptr() and torch.equal(s.grad, kept)
    del kept
    s.grad = None
    assert fastkd.empty_cache() >= 2 * s.numel() * 4
    assert _ops._C.cached_bytes() == 0


def test_output_cache_can_be_disabled():
    script = (
        "import torch, fastkd; from fastkd import _ops\n"
        "s = torch.randn(64, 8192, requires_grad=True)\n"
        "fastkd.kd_loss(s, torch.randn(64, 8192), backend='cpu').backward()\n"
        "s.grad = None\n"
        "assert _ops._C.cached_bytes() == 0, _ops._C.cached_bytes()\n"
    )
    env = {**os.environ, "FASTKD_CPU_CACHE_MB": "0"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
