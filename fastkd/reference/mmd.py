"""Kernel two-sample losses, SPEC §3 (MMD and NST), as plain PyTorch with autograd.

Every kernel matrix is materialised here; the fused kernels must not.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastkd import _validate

KERNELS = ("gaussian", "laplacian", "polynomial")
# A convention of this package, not from the SPEC or a paper: a geometric
# ladder of bandwidths around 1, for features of unit scale. Choose your own
# for other scales (a bandwidth far below the typical distance contributes ~0).
DEFAULT_BANDWIDTHS = (0.5, 1.0, 2.0, 4.0, 8.0)
# The smallest bandwidth accepted, on every backend: below ~1e-154 the
# gaussian's 1/(2σ²) is no finite float64. (Where 1/(2σ²) or 1/σ overflows
# float32, the float32 kernels use the largest finite exponent instead: any
# distance that is a normal float32 then gives k = 0, as it should.)
MIN_BANDWIDTH = 1e-150


def _samples(name: str, value) -> torch.Tensor:
    """A non-empty ``(rows, D)`` floating-point matrix."""
    value = _validate.tensor(name, value, min_dim=2)
    if value.dim() != 2 or value.numel() == 0:
        raise ValueError(f"{name} must have shape (rows, D) with rows, D >= 1, got {tuple(value.shape)}")
    return value


def _same_features(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``value`` must match ``ref`` in its last dim, dtype and device (the row counts may differ)."""
    if value.shape[-1] != ref.shape[-1]:
        raise ValueError(
            f"{name} has feature dim {value.shape[-1]} but {ref_name} has {ref.shape[-1]} "
            f"(shapes {tuple(value.shape)} and {tuple(ref.shape)})"
        )
    if value.dtype != ref.dtype:
        raise ValueError(f"{name} dtype {value.dtype} does not match {ref_name} dtype {ref.dtype}")
    _validate.same_device(name, value, ref_name, ref)


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


def _accumulation_dtype(value: torch.Tensor) -> torch.dtype:
    return torch.float64 if value.dtype == torch.float64 else torch.float32


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
    x = _samples("x", x)
    y = _samples("y", y)
    _same_features("y", y, "x", x)
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
    """Squared maximum mean discrepancy between two samples (SPEC §3).

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
            ``(0.5, 1, 2, 4, 8)`` is this package's convention, not the SPEC's.
        unbiased: exclude the diagonals of the within-sample means (then
            ``N >= 2`` and ``M >= 2``).
        degree: polynomial degree, an integer ``>= 1``.
        c: polynomial scale, ``> 0``.
    Returns:
        ``()`` loss, float32 (float64 for float64 inputs).
    """
    x, y, bandwidths, degree, c = check_mmd_arguments(x, y, kernel, bandwidths, unbiased, degree, c)
    acc = _accumulation_dtype(x)
    x, y = x.to(acc), y.to(acc)
    params = {"bandwidths": bandwidths, "degree": degree, "c": c}
    k_xx = kernel_matrix(x, x, kernel, **params)
    k_yy = kernel_matrix(y, y, kernel, **params)
    k_xy = kernel_matrix(x, y, kernel, **params)
    return _within_mean(k_xx, unbiased) + _within_mean(k_yy, unbiased) - 2 * k_xy.mean()


def _feature_maps(name: str, value) -> torch.Tensor:
    """A non-empty ``(N, C, H, W)`` floating-point tensor."""
    value = _validate.tensor(name, value, min_dim=4)
    if value.dim() != 4 or value.numel() == 0:
        raise ValueError(f"{name} must have shape (N, C, H, W) with every dim >= 1, got {tuple(value.shape)}")
    return value


def check_nst_arguments(student_maps, teacher_maps) -> tuple[torch.Tensor, torch.Tensor]:
    """Validates :func:`nst_loss`'s arguments (``ValueError`` naming the bad one)."""
    s = _feature_maps("student_maps", student_maps)
    t = _feature_maps("teacher_maps", teacher_maps)
    if t.shape[0] != s.shape[0]:
        raise ValueError(
            f"teacher_maps batch size {t.shape[0]} does not match student_maps batch size {s.shape[0]}"
        )
    if t.dtype != s.dtype:
        raise ValueError(f"teacher_maps dtype {t.dtype} does not match student_maps dtype {s.dtype}")
    _validate.same_device("teacher_maps", t, "student_maps", s)
    return s, t


def nst_features(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated maps → pooled to a common size, ``(N, C, HW)``, L2-normalised over HW.

    Computed in float32 (float64 for float64 inputs).
    """
    acc = _accumulation_dtype(s)
    s, t = s.to(acc), t.to(acc)
    size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
    if s.shape[2:] != size:
        s = F.adaptive_avg_pool2d(s, size)
    if t.shape[2:] != size:
        t = F.adaptive_avg_pool2d(t, size)
    return F.normalize(s.flatten(2), dim=2), F.normalize(t.flatten(2), dim=2)


def nst_loss(student_maps: torch.Tensor, teacher_maps: torch.Tensor) -> torch.Tensor:
    """Neural selectivity transfer (RepDistiller ``NSTLoss``, SPEC §3).

    Both maps are adaptive-average-pooled to ``(min(H, H'), min(W, W'))``
    (for square maps: the larger map pooled to the smaller, RepDistiller's
    rule; a map already of that size is left as it is), flattened to
    ``(N, C, HW)`` and L2-normalised over ``HW`` (``F.normalize``, eps 1e-12).
    With the polynomial kernel ``k(a, b) = (a·b)²`` over channel pairs, per
    sample ``mean K(t, t) + mean K(s, s) − 2 mean K(s, t)``, averaged over N.

    This reference builds the ``(N, C, C')`` kernel matrices; the closed form
    ``Σ_{c,c'} (a_c·b_{c'})² = ⟨AᵀA, BᵀB⟩_F`` is for the fused kernels.
    Nothing is detached: RepDistiller detaches the ``K(t, t)`` term, which
    changes only the teacher's gradient; detach ``teacher_maps`` for the usual
    frozen teacher.

    Args:
        student_maps: ``(N, C_s, H, W)`` student feature maps.
        teacher_maps: ``(N, C_t, H', W')`` teacher feature maps; channel counts
            and spatial sizes may differ from the student's.
    Returns:
        ``()`` loss, float32 (float64 for float64 inputs).
    """
    s, t = check_nst_arguments(student_maps, teacher_maps)
    s, t = nst_features(s, t)

    def poly(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # (N, C_a, HW), (N, C_b, HW) → per-sample mean over channel pairs of (a_c·b_c')², (N,)
        return (a @ b.transpose(1, 2)).square().mean(dim=(1, 2))

    return (poly(t, t) + poly(s, s) - 2 * poly(s, t)).mean()
