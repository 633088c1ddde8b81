"""The MMD reference (docs/spec.md §3) against explicit loops, autograd and the published formulas."""

from __future__ import annotations

import math

import pytest
import torch

from fastkd.reference.mmd import mmd_loss
from tests.helpers import DEVICE
from tests.reference_checks import (
    F64,
    ReferenceContract,
    check_raises_value_error,
    close,
    dot,
    randn,
)

KERNELS = ("gaussian", "laplacian", "polynomial")


# ---- loop oracles: one pair, one row at a time, in Python floats --------------------------


def loop_kernel(a, b, kernel, bandwidths, degree, c):
    if kernel == "polynomial":
        return (dot(a, b) / c + 1) ** degree
    sq = sum((u - v) ** 2 for u, v in zip(a, b, strict=True))
    if kernel == "gaussian":
        return sum(math.exp(-sq / (2 * s * s)) for s in bandwidths)
    return sum(math.exp(-math.sqrt(sq) / s) for s in bandwidths)


def loop_mmd(x, y, kernel, bandwidths=(0.5, 1.0, 2.0, 4.0, 8.0), unbiased=False, degree=2, c=1.0):
    x, y = x.tolist(), y.tolist()

    def mean_k(a, b, skip_diagonal):
        total, count = 0.0, 0
        for i, u in enumerate(a):
            for j, v in enumerate(b):
                if skip_diagonal and i == j:
                    continue
                total += loop_kernel(u, v, kernel, bandwidths, degree, c)
                count += 1
        return total / count

    return mean_k(x, x, unbiased) + mean_k(y, y, unbiased) - 2 * mean_k(x, y, False)


# ---- MMD ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("unbiased", (False, True))
@pytest.mark.parametrize("shape", ((3, 5, 2), (4, 4, 1), (6, 2, 7)), ids=str)
def test_mmd_matches_loops(kernel, unbiased, shape):
    n, m, d = shape
    x, y = randn(n, d), randn(m, d)
    close(mmd_loss(x, y, kernel=kernel, unbiased=unbiased), loop_mmd(x, y, kernel, unbiased=unbiased))


@pytest.mark.parametrize("kernel", ("gaussian", "laplacian"))
@pytest.mark.parametrize("bandwidths", (1.3, (0.3, 1.7), [2.0]), ids=str)
def test_mmd_bandwidths(kernel, bandwidths):
    x, y = randn(4, 3), randn(5, 3)
    listed = (bandwidths,) if isinstance(bandwidths, float) else tuple(bandwidths)
    close(mmd_loss(x, y, kernel=kernel, bandwidths=bandwidths), loop_mmd(x, y, kernel, listed))


@pytest.mark.parametrize(("degree", "c"), ((1, 1.0), (3, 2.5), (4, 0.5)))
def test_mmd_polynomial_degree_and_c(degree, c):
    x, y = randn(4, 3), randn(3, 3)
    got = mmd_loss(x, y, kernel="polynomial", degree=degree, c=c, unbiased=True)
    close(got, loop_mmd(x, y, "polynomial", unbiased=True, degree=degree, c=c))


@pytest.mark.parametrize("kernel", KERNELS)
def test_mmd_single_rows(kernel):
    x, y = randn(1, 4), randn(1, 4)
    close(mmd_loss(x, y, kernel=kernel), loop_mmd(x, y, kernel))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("unbiased", (False, True))
def test_mmd_gradcheck(kernel, unbiased):
    x, y = randn(4, 3, requires_grad=True), randn(3, 3, requires_grad=True)
    fn = lambda a, b: mmd_loss(a, b, kernel=kernel, unbiased=unbiased, bandwidths=(0.8, 2.0))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, y))


@pytest.mark.parametrize("kernel", KERNELS)
def test_mmd_of_a_sample_with_itself_is_zero_with_finite_gradient(kernel):
    x = randn(5, 3, requires_grad=True)
    loss = mmd_loss(x, x.detach().clone(), kernel=kernel)
    assert loss.item() == 0.0
    loss.backward()
    # a point's distance to itself is 0; the laplacian's gradient there must not be NaN
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().max().item() < 1e-12


def test_mmd_is_a_two_sample_statistic():
    """Unbiased MMD² averages to ~0 for one distribution and is clearly positive for two."""
    gen = torch.Generator().manual_seed(1)
    same, shifted = [], []
    for _ in range(20):
        x, y = (torch.randn(48, 4, generator=gen, dtype=F64).to(DEVICE) for _ in range(2))
        same.append(mmd_loss(x, y, unbiased=True).item())
        shifted.append(mmd_loss(x, y + 0.75, unbiased=True).item())
        assert mmd_loss(x, y).item() >= 0  # the biased estimator is a squared norm
    mean_same, mean_shifted = sum(same) / len(same), sum(shifted) / len(shifted)
    assert min(shifted) > 0
    assert abs(mean_same) < 0.05 * mean_shifted, (mean_same, mean_shifted)


# ---- shared contract: dtypes, NaN, layout -------------------------------------------------


class TestContract(ReferenceContract):
    CALL = (lambda a, b: mmd_loss(a, b, kernel="laplacian"), (4, 3), (5, 3))


# ---- invalid arguments ------------------------------------------------------------------------


def _bad_cases():
    x, y = randn(4, 3), randn(5, 3)
    return [
        (r"^x must be a torch\.Tensor", lambda: mmd_loss([[1.0]], y)),
        (r"^x must have dtype in", lambda: mmd_loss(x.long(), y)),
        (r"^x must have shape \(rows, D\)", lambda: mmd_loss(randn(2, 4, 3), y)),
        (r"^x must have shape \(rows, D\)", lambda: mmd_loss(randn(0, 3), y)),
        (r"^y has feature dim 4 but x has 3", lambda: mmd_loss(x, randn(5, 4))),
        (r"^y dtype torch\.float32 does not match x", lambda: mmd_loss(x, y.float())),
        (r"^kernel must be one of", lambda: mmd_loss(x, y, kernel="rbf")),
        (r"^bandwidths must be >= 1e-150, got ", lambda: mmd_loss(x, y, bandwidths=0.0)),
        (r"^bandwidths must be a positive number", lambda: mmd_loss(x, y, bandwidths=())),
        (r"^bandwidths must be >= 1e-150, got ", lambda: mmd_loss(x, y, bandwidths=(1.0, -2.0))),
        (r"^bandwidths must be a positive number", lambda: mmd_loss(x, y, bandwidths="1")),
        (r"^degree must be an integer >= 1", lambda: mmd_loss(x, y, kernel="polynomial", degree=0)),
        (r"^degree must be an integer >= 1", lambda: mmd_loss(x, y, kernel="polynomial", degree=2.5)),
        (r"^c must be > 0", lambda: mmd_loss(x, y, kernel="polynomial", c=0.0)),
        (r"^unbiased must be a bool", lambda: mmd_loss(x, y, unbiased=1)),
        (r"^unbiased=True needs at least 2 rows in x", lambda: mmd_loss(randn(1, 3), y, unbiased=True)),
        (r"^unbiased=True needs at least 2 rows in y", lambda: mmd_loss(x, randn(1, 3), unbiased=True)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_invalid_arguments_raise_value_error_naming_the_argument(case):
    check_raises_value_error(*_bad_cases()[case])
