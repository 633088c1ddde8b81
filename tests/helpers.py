"""Tolerances (SPEC §6, declared once) and parity assertions shared by every test."""

from __future__ import annotations

import math
import os

import pytest
import torch

import fastkd

# (rtol, atol): |actual − expected| <= atol + rtol · max|expected|, against the
# float64 reference (SPEC §6). Losses and accumulation are float32 for every
# reduced-precision input, so the float32 atol applies to them too (it only
# matters where the exact value is ~0, e.g. any divergence at V = 1).
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-6),
    torch.bfloat16: (2e-2, 1e-6),
}

# FASTKD_TEST_DEVICE=cuda runs the suite on CUDA tensors (bench/gpu_check.sh).
DEVICE = torch.device(os.environ.get("FASTKD_TEST_DEVICE", "cpu"))
KERNEL_BACKENDS = ("triton", "cuda") if DEVICE.type == "cuda" else ("cpu", "triton")


def backend_params(*, include_reference: bool = False):
    """pytest params for the compiled backends on DEVICE, skipped with the reason when unavailable."""
    names = (("reference",) if include_reference else ()) + KERNEL_BACKENDS
    params = []
    for name in names:
        status = fastkd._dispatch.backend_status(name, DEVICE.type)
        marks = () if status.available else (pytest.mark.skip(reason=f"{name}: {status.reason}"),)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected| (NaN-aware: any NaN mismatch is inf)."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if not torch.equal(torch.isnan(actual), torch.isnan(expected)):
        return float("inf")
    finite = ~torch.isnan(expected)
    if not torch.equal(actual[finite & torch.isinf(expected)], expected[finite & torch.isinf(expected)]):
        return float("inf")
    finite &= ~torch.isinf(expected)
    if not finite.any():
        return 0.0
    diff = (actual[finite] - expected[finite]).abs().max().item()
    scale = expected[finite].abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_matches(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype,
    what: str,
    baselines: tuple[torch.Tensor, ...] = (),
) -> None:
    """``actual`` (computed from ``dtype`` inputs) agrees with the float64 ``expected``.

    Passes within TOLERANCES, or (SPEC §6, the flash-attention rule) when its
    error is at most twice that of the reference computed from the same
    ``dtype`` inputs. ``baselines`` are such reference results; where the
    problem is ill-conditioned in ``dtype`` (a tiny divergence at a high
    temperature, say) one rounding sample of the reference can be lucky, so
    callers pass several, computed in different summation orders, and the
    largest of their errors is the reference's error.
    """
    rtol, atol = TOLERANCES[dtype]
    actual64 = actual.detach().to(torch.float64).cpu()
    expected64 = expected.detach().to(torch.float64).cpu()
    err = relative_error(actual64, expected64)
    finite = torch.isfinite(expected64)
    scale = expected64[finite].abs().max().item() if finite.any() else 0.0
    diff = err * scale if scale > 0 else err  # relative_error is absolute when scale is 0
    # |actual − expected| <= atol + rtol · max|expected|
    if diff <= atol + rtol * scale:
        return
    baseline_err = max((relative_error(b, expected64) for b in baselines), default=None)
    assert baseline_err is not None and err <= 2 * baseline_err, (
        f"{what}: relative error {err:.3g} > rtol {rtol:g} (dtype {dtype}, max |ref| {scale:.3g}; "
        f"reference in {dtype}: {baseline_err})"
    )


def bad_label_arguments(rows: int) -> tuple[tuple[dict, str], ...]:
    """(keyword changes, the argument the error must name) for the hard-label
    arguments (``labels``, ``hard_grad_scale``) of the divergence, top-k and
    mixture ops with ``rows`` rows."""
    labels = torch.zeros(rows, dtype=torch.int64, device=DEVICE)
    return (
        ({"labels": torch.zeros(rows, dtype=torch.int32, device=DEVICE)}, "labels"),
        ({"labels": torch.zeros(rows + 1, dtype=torch.int64, device=DEVICE)}, "labels"),
        ({"labels": torch.zeros(rows, 1, dtype=torch.int64, device=DEVICE)}, "labels"),
        ({"labels": None, "hard_grad_scale": 0.5}, "hard_grad_scale"),
        ({"labels": labels, "hard_grad_scale": math.inf}, "hard_grad_scale"),
        ({"labels": labels, "hard_grad_scale": math.nan}, "hard_grad_scale"),
    )
