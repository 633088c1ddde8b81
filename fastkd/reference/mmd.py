"""Maximum mean discrepancy, docs/spec.md §3, as plain PyTorch with autograd.

Every kernel matrix is materialised here; the fused kernels must not.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from fastkd import _validate
from fastkd.reference._common import accumulation_dtype, same_features, samples

KERNELS = ("gaussian", "laplacian", "polynomial")
# A convention of this package, not from docs/spec.md's sources or a paper: a geometric
# ladder of bandwidths around 1, for features of unit scale. Choose your own
# for other scales (a bandwidth far below the typical distance contributes ~0).
DEFAULT_BANDWIDTHS = (0.5, 1.0, 2.0, 4.0, 8.0)
# The smallest bandwidth accepted, on every backend: below ~1e-154 the
# gaussian's 1/(2σ²) is no finite float64. (Where 1/(2σ²) or 1/σ overflows
# float32, the float32 kernels use the largest finite exponent instead: any
# distance that is a normal float32 then gives k = 0, as it should.)
MIN_BANDWIDTH = 1e-150


def _bandwidths(value) -> tuple[float, ...]:
    """One finite number ``>= MIN_BANDWIDTH`` or a non-empty sequence of them."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) == 0:
        raise ValueError(
            f"bandwidths must be a positive number or a non-empty sequence of them, got {value!r}"
        )
    return tuple(_validate.real("bandwidths", s, low=MIN_BANDWIDTH) for s in value)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def kernel_matrix(
    a: torch.Tensor,
    b: torch.Tensor,
    kernel: str,
    *,
    bandwidths: tuple[float, ...] = DEFAULT_BANDWIDTHS,
    degree: int = 2,
    c: float = 1.0,
) -> torch.Tensor:
    """Kernel values between every row of ``a`` and every row of ``b``.

    ``gaussian``: ``Σ_σ exp(−‖a−b‖² / (2σ²))``; ``laplacian``:
    ``Σ_σ exp(−‖a−b‖ / σ)`` (Euclidean norm); ``polynomial``:
    ``(a·b / c + 1)^degree``.

    Distances are taken from the differences (``torch.cdist`` without the
    matrix-product shortcut), so a point's distance to itself is exactly 0 and
    its gradient there is 0 (``cdist``'s convention), where ``‖a‖² + ‖b‖² −
    2a·b`` would leave a rounding residue whose square root has a huge gradient.

    Args:
        a: ``(N, D)`` samples, already validated and in the accumulation dtype.
        b: ``(M, D)`` samples, same dtype and device.
        kernel: one of ``KERNELS``.
    Returns:
        ``(N, M)`` kernel matrix.
    """
    if kernel == "polynomial":
        return (a @ b.T / c + 1) ** degree
    dist = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
    if kernel == "gaussian":
        sq = dist * dist
        return sum(torch.exp(sq / (-2.0 * s * s)) for s in bandwidths)
    if kernel == "laplacian":
        return sum(torch.exp(dist / -s) for s in bandwidths)
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def _within_mean(k: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """Mean of a square kernel matrix, without its diagonal when ``unbiased``."""
    n = k.shape[0]
    if not unbiased:
        return k.mean()
    return (k.sum() - k.diagonal().sum()) / (n * (n - 1))


def check_mmd_arguments(x, y, kernel, bandwidths, unbiased, degree, c):
    """Validates :func:`mmd_loss`'s arguments (``ValueError`` naming the bad one).

    Returns ``(x, y, bandwidths as a tuple of floats, degree, c)``; shared
    with the fused backends so that every backend rejects the same inputs.
    """
    x = samples("x", x)
    y = samples("y", y)
    same_features("y", y, "x", x)
    _validate.choice("kernel", kernel, KERNELS)
    bandwidths = _bandwidths(bandwidths)
    degree = _positive_int("degree", degree)
    c = _validate.real("c", c, low=0.0, low_open=True)
    if not isinstance(unbiased, bool):
        raise ValueError(f"unbiased must be a bool, got {type(unbiased).__name__}")
    if unbiased:
        for name, value in (("x", x), ("y", y)):
            if value.shape[0] < 2:
                raise ValueError(f"unbiased=True needs at least 2 rows in {name}, got {value.shape[0]}")
    return x, y, bandwidths, degree, c


def mmd_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    kernel: str = "gaussian",
    bandwidths: float | Sequence[float] = DEFAULT_BANDWIDTHS,
    unbiased: bool = False,
    degree: int = 2,
    c: float = 1.0,
) -> torch.Tensor:
    """Squared maximum mean discrepancy between two samples (docs/spec.md §3).

    ``MMD² = mean k(x, x') + mean k(y, y') − 2 mean k(x, y)``. The biased
    estimator (default) averages the within-sample kernel matrices over all
    ``N²`` and ``M²`` pairs, diagonal included, so ``mmd_loss(x, x) == 0`` and
    the value is never negative for a positive-definite kernel. ``unbiased=True``
    leaves the diagonals out (``N(N−1)`` and ``M(M−1)`` pairs): its expectation
    is 0 when ``x`` and ``y`` come from the same distribution, and a single
    value may be negative. The cross term always uses all ``N·M`` pairs.

    Kernels (``bandwidths`` only for the first two, ``degree`` and ``c`` only
    for the third; all are validated whatever the kernel):

    - ``"gaussian"``: ``k(a, b) = Σ_σ exp(−‖a−b‖² / (2σ²))``, summed over the
      bandwidths (not averaged), so ``k(a, a)`` is the number of bandwidths;
    - ``"laplacian"``: ``k(a, b) = Σ_σ exp(−‖a−b‖₂ / σ)``, the Euclidean
      distance (scikit-learn's ``laplacian_kernel`` uses the L1 distance
      instead); its gradient at coincident points is taken as 0;
    - ``"polynomial"``: ``k(a, b) = (a·b / c + 1)^degree``.

    Args:
        x: ``(N, D)`` samples (student embeddings, say).
        y: ``(M, D)`` samples (teacher embeddings); ``M`` may differ from ``N``.
        kernel: ``"gaussian"``, ``"laplacian"`` or ``"polynomial"``.
        bandwidths: one ``σ >= 1e-150`` (``MIN_BANDWIDTH``) or a non-empty
            sequence of them. The default
            ``(0.5, 1, 2, 4, 8)`` is this package's convention, not a published one.
        unbiased: exclude the diagonals of the within-sample means (then
            ``N >= 2`` and ``M >= 2``).
        degree: polynomial degree, an integer ``>= 1``.
        c: polynomial scale, ``> 0``.
    Returns:
        ``()`` loss, float32 (float64 for float64 inputs).
    """
    x, y, bandwidths, degree, c = check_mmd_arguments(x, y, kernel, bandwidths, unbiased, degree, c)
    acc = accumulation_dtype(x)
    x, y = x.to(acc), y.to(acc)
    params = {"bandwidths": bandwidths, "degree": degree, "c": c}
    k_xx = kernel_matrix(x, x, kernel, **params)
    k_yy = kernel_matrix(y, y, kernel, **params)
    k_xy = kernel_matrix(x, y, kernel, **params)
    return _within_mean(k_xx, unbiased) + _within_mean(k_yy, unbiased) - 2 * k_xy.mean()
