"""Tolerances (docs/spec.md §6, declared once) and parity assertions shared by every test."""

from __future__ import annotations

import math
import os

import pytest
import torch

import fastkd

# (rtol, atol): |actual − expected| <= atol + rtol · max|expected|, against the
# float64 reference (docs/spec.md §6). Losses and accumulation are float32 for every
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


def _nonfinite_mismatch(actual: torch.Tensor, expected: torch.Tensor) -> str | None:
    """Why the NaN / ±inf pattern of ``actual`` differs from ``expected``'s, or None."""
    if not torch.equal(torch.isnan(actual), torch.isnan(expected)):
        return "NaN positions differ"
    inf = torch.isinf(expected)
    if not torch.equal(torch.isinf(actual), inf) or not torch.equal(actual[inf], expected[inf]):
        return "±inf positions differ"
    return None


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected| over the finite entries of
    ``expected``; inf when the NaN / ±inf patterns differ."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if _nonfinite_mismatch(actual, expected) is not None:
        return float("inf")
    finite = torch.isfinite(expected)
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
    *,
    elementwise: bool = False,
) -> None:
    """``actual`` (computed from ``dtype`` inputs) agrees with the float64 ``expected``.

    1. The NaN and ±inf entries of ``actual`` are exactly those of ``expected``
       (with the same signs), whatever the baselines say.
    2. On the finite entries, ``|actual − expected| <= atol + rtol · max|expected|``
       (TOLERANCES), or (the flash-attention rule) the error is at most twice
       the error of the reference computed from the same ``dtype`` inputs.
       ``baselines`` are such reference results; where the problem is
       ill-conditioned in ``dtype`` one rounding sample of the reference can
       be lucky, so callers may pass several (different summation orders) and
       the largest of their errors counts. A baseline counts only where its
       own error is finite: a baseline with NaN or inf where the float64
       result is finite grants nothing.
    3. With ``elementwise=True`` (families whose contract is per entry, e.g.
       per-row losses of ``reduction="none"``), each finite entry must also
       satisfy ``|a − e| <= atol + rtol · |e|``, or be within twice the
       baselines' error at that entry.
    """
    rtol, atol = TOLERANCES[dtype]
    actual64 = actual.detach().to(torch.float64).cpu()
    expected64 = expected.detach().to(torch.float64).cpu()
    if actual64.shape != expected64.shape:
        raise AssertionError(f"{what}: shape {tuple(actual64.shape)} != {tuple(expected64.shape)}")
    mismatch = _nonfinite_mismatch(actual64, expected64)
    assert mismatch is None, f"{what}: {mismatch} (dtype {dtype})"
    finite = torch.isfinite(expected64)
    if not finite.any():
        return
    a, e = actual64[finite], expected64[finite]
    diff = (a - e).abs()
    baseline_diffs = []
    for b in baselines:
        b64 = b.detach().to(torch.float64).cpu()[finite]
        if torch.isfinite(b64).all():
            baseline_diffs.append((b64 - e).abs())
    baseline_diff = torch.stack(baseline_diffs).amax(0) if baseline_diffs else None
    scale = e.abs().max().item()
    worst = diff.max().item()
    if worst > atol + rtol * scale:
        allowed = None if baseline_diff is None else 2 * baseline_diff.max().item()
        assert allowed is not None and worst <= allowed, (
            f"{what}: max error {worst:.3g} > atol {atol:g} + rtol {rtol:g} · max|ref| {scale:.3g} "
            f"(dtype {dtype}; twice the {dtype} reference's error: {allowed})"
        )
    if elementwise:
        bound = atol + rtol * e.abs()
        if baseline_diff is not None:
            bound = torch.maximum(bound, 2 * baseline_diff)
        bad = diff > bound
        assert not bad.any(), (
            f"{what}: {int(bad.sum())} entries beyond their own tolerance (dtype {dtype}); worst "
            f"|error| / |ref| = {(diff / e.abs().clamp_min(atol)).max().item():.3g}"
        )


def assert_matches_at_scale(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype,
    what: str,
    baselines: tuple[torch.Tensor, ...] = (),
) -> None:
    """:func:`assert_matches` on the results divided by the largest finite
    ``|expected|``: for quantities whose natural scale is itself small (the
    relational losses are means over N² or N³ terms, and their gradients at
    N = 37 are ~1e-6, at N = 2085 ~1e-10), where the dtype's absolute atol
    alone would accept an error as large as the result.

    Compared as it is (absolute atol) instead: an ``expected`` that is 0 or
    has no finite entry, and one that a baseline (the reference in ``dtype``)
    misses by its whole size. That is a result whose exact value is 0 (an
    N = 1 gradient, the loss of two samples) and whose float64 value is
    rounding residue, not a scale."""
    e = expected.detach().to(torch.float64).cpu()
    finite = torch.isfinite(e)
    scale = e[finite].abs().max().item() if finite.any() else 0.0
    for b in baselines:
        b64 = b.detach().to(torch.float64).cpu()[finite]
        if torch.isfinite(b64).all() and finite.any() and (b64 - e[finite]).abs().max().item() >= scale:
            scale = 0.0
    if scale == 0.0:
        assert_matches(actual, expected, dtype, what, baselines)
        return
    assert_matches(actual / scale, expected / scale, dtype, f"{what} (/ {scale:.3g})",
                   tuple(b / scale for b in baselines))


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


# Kept rows 0 and 2 carry labels −1 and V, excluded row 3 a label far out of range.
OUT_OF_RANGE_ROW_MASK = (True, True, True, False, True)


def out_of_range_labels(vocab: int, last: int = 0) -> torch.Tensor:
    """Labels of five rows for OUT_OF_RANGE_ROW_MASK: −1 and ``vocab`` on kept rows 0 and 2."""
    return torch.tensor([-1, 7, vocab, 10**12, last], device=DEVICE)


def run_past_the_label_check(backend: str, call, triton_module, monkeypatch, vocab: int):
    """``call()`` with out_of_range_labels: the CPU op raises RuntimeError and
    the Triton launcher ValueError, both naming ``labels``. On cpu that is all
    (returns None); on triton the launcher's check is then patched out, so that
    ``call()`` reaches the kernels' own guard, as the CUDA op (which does not
    synchronise to check) always does. Returns ``call()``'s outputs."""
    if backend == "cpu":
        with pytest.raises(RuntimeError, match=r"^labels\b"):
            call()
        return None
    if backend == "triton":
        message = rf"^labels of kept rows must lie in \[0, {vocab}\), got -1 at row 0"
        with pytest.raises(ValueError, match=message):
            call()
        monkeypatch.setattr(triton_module, "check_kept_label_range", lambda *args: None)
    return call()


def assert_nan_on_out_of_range_rows(row_ce: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The kernels' guard: NaN CE and gradient on the kept rows with out-of-range
    labels, zeros on the excluded row. Returns the mask of the other rows."""
    bad = torch.tensor([True, False, True, False, False], device=DEVICE)
    assert torch.isnan(row_ce[bad]).all() and torch.isnan(grad[bad]).all()
    assert row_ce[3] == 0 and torch.all(grad[3] == 0)
    return ~bad


UPSTREAM = 0.7  # a loss's upstream gradient in the parity checks: never only 1


def run_with_grads(fn, *inputs, upstream=UPSTREAM):
    """``(loss, *d(upstream · loss)/d input)`` of ``fn(*inputs)`` on fresh leaf copies of ``inputs``."""
    inputs = [a.detach().clone().requires_grad_(True) for a in inputs]
    loss = fn(*inputs)
    loss.backward(torch.tensor(upstream, dtype=loss.dtype, device=loss.device))
    return (loss.detach(), *(a.grad for a in inputs))


def check_parity_with_grads(fused, reference, inputs, what, names=None):
    """``fused(*inputs)`` against ``reference`` in float64: the loss and every input's gradient.

    The tolerance is :func:`assert_matches`' for the inputs' dtype, widened by
    the reference's own error in that dtype. The loss is float32 (float64 for
    float64 inputs); each gradient has its input's dtype and device.
    """
    dtype = inputs[0].dtype
    got = run_with_grads(fused, *inputs)
    want = run_with_grads(reference, *(a.double() for a in inputs))
    same = run_with_grads(reference, *inputs)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert all(g.dtype == dtype and g.device == inputs[0].device for g in got[1:])
    names = names or ("loss",) + tuple(f"grad {i}" for i in range(len(inputs)))
    for name, a, b, c in zip(names, got, want, same, strict=True):
        assert_matches(a, b, dtype, f"{what} {name}", [c])


def coefficients(divergence: str, *, beta: float = 0.5, alpha: float = 0.1) -> dict:
    """The coefficient ``divergence`` reads, as keyword arguments: ``beta`` for
    ``jsd``, ``alpha`` for the skew kinds, nothing otherwise (a coefficient the
    divergence does not use is a ``ValueError``)."""
    if divergence == "jsd":
        return {"beta": beta}
    if divergence in ("skew_kl", "skew_reverse_kl"):
        return {"alpha": alpha}
    return {}
