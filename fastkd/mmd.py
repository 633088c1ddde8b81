"""Squared maximum mean discrepancy (docs/spec.md §3): :func:`mmd_loss` and :class:`MMDLoss`.

The fused ops (``fastkd::mmd_forward`` / ``_backward`` on cpu / cuda,
``kernels/mmd.py`` on triton) never hold a kernel matrix. The mathematics is
:func:`fastkd.reference.mmd_loss`'s.
"""

from __future__ import annotations

import torch

from fastkd import _validate
from fastkd import distributed as _distributed
from fastkd._backend import backend_for
from fastkd._enums import MMDKernel
from fastkd._module_form import LossModule
from fastkd.reference import mmd as _reference

__all__ = ["MMD_KERNELS", "MMDFunction", "MMDLoss", "mmd_loss"]

# The compiled backends that have an MMD kernel: csrc/cpu/mmd.cpp,
# kernels/mmd.py (triton) and csrc/cuda/mmd.cu.
MMD_KERNELS = ("cpu", "triton", "cuda")


def _mmd_tile_rows(n: int, m: int) -> int:
    """Rows of x (then of y) per tile of the MMD ops.

    A tile's kernel block (tile_rows × max(N, M)) and its few same-sized
    temporaries are the ops' only large allocations: 2**22 elements each,
    16 MiB in float32 (32 MiB for float64 input), whatever N and M.
    """
    return max(1, 2**22 // max(n, m, 1))


def _run_mmd_forward(backend: str, x, y, kernel, bandwidths, degree, c, unbiased, tile_rows):
    if backend == "triton":
        from fastkd.kernels import mmd as triton_mmd

        # the Triton kernels tile by their own launch configuration, not by tile_rows
        return triton_mmd.mmd_forward(x, y, kernel, bandwidths, degree, c, unbiased)
    return torch.ops.fastkd.mmd_forward(x, y, kernel, bandwidths, degree, c, unbiased, tile_rows)


def _run_mmd_backward(backend: str, grad, x, y, kernel, bandwidths, degree, c, unbiased, tile_rows):
    if backend == "triton":
        from fastkd.kernels import mmd as triton_mmd

        return triton_mmd.mmd_backward(grad, x, y, kernel, bandwidths, degree, c, unbiased)
    return torch.ops.fastkd.mmd_backward(grad, x, y, kernel, bandwidths, degree, c, unbiased, tile_rows)


class MMDFunction(torch.autograd.Function):
    """Squared MMD on the fused ops (``fastkd::mmd_*`` for cpu / cuda, kernels/mmd.py for triton).

    Nothing is saved between forward and backward besides references to
    ``x`` and ``y`` themselves: the backward recomputes the kernel blocks.
    """

    @staticmethod
    def forward(ctx, x, y, kernel, bandwidths, degree, c, unbiased, tile_rows, backend):
        loss = _run_mmd_forward(backend, x, y, kernel, bandwidths, degree, c, unbiased, tile_rows)
        ctx.save_for_backward(x, y)
        ctx.params = (kernel, bandwidths, degree, c, unbiased, tile_rows)
        ctx.backend = backend
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        x, y = ctx.saved_tensors
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return (None,) * 9
        grad_x, grad_y = _run_mmd_backward(ctx.backend, grad_output, x, y, *ctx.params)
        return (
            grad_x if ctx.needs_input_grad[0] else None,
            grad_y if ctx.needs_input_grad[1] else None,
            None, None, None, None, None, None, None,
        )


def mmd_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    kernel: str = "gaussian",
    bandwidths: float | tuple[float, ...] = _reference.DEFAULT_BANDWIDTHS,
    unbiased: bool = False,
    degree: int = 2,
    c: float = 1.0,
    backend: str = "auto",
    gather: bool = False,
    process_group=None,
) -> torch.Tensor:
    """Squared maximum mean discrepancy between two samples (docs/spec.md §3).

    ``MMD² = mean k(x, x') + mean k(y, y') − 2 mean k(x, y)``; the semantics,
    kernels and defaults are :func:`fastkd.reference.mmd_loss`'s:

    - ``"gaussian"``: ``Σ_σ exp(−‖a−b‖² / (2σ²))`` (summed over bandwidths);
    - ``"laplacian"``: ``Σ_σ exp(−‖a−b‖₂ / σ)``, gradient 0 at coincident points;
    - ``"polynomial"``: ``(a·b / c + 1)^degree``.

    The fused kernels never hold a kernel matrix and save nothing for the
    backward, which recomputes the blocks. The CPU op walks the rows in tiles
    (blocks of about 2**22 kernel values), so memory is O((N + M)·D) besides
    a few fixed-size blocks instead of O((N + M)²); the CUDA op tiles the same
    way (cuBLAS GEMMs per tile plus its own block kernels); the Triton kernels
    work on 64 × 64 (laplacian: 32 × 32) tiles in registers, with an fp32
    O((N + M)·D) gradient workspace. Squared distances come from the norms
    (``‖a‖² + ‖b‖² − 2a·b``), exact 0 for a point against itself; for the
    laplacian, whose square root amplifies that form's rounding at small
    distances, near pairs are recomputed from their differences (gradient 0
    at exactly coincident points, as the reference). For the distance
    kernels the samples are first shifted by a common centre for which every
    subtraction is exact (per feature, where all values share a sign and span
    at most a factor 4), so a common offset costs no accuracy and distances
    and gradients are otherwise unchanged. The cpu op's result does not
    depend on the number of threads.

    Bandwidths below 1e-150 are rejected (``1/(2σ²)`` is no finite float64);
    where ``1/(2σ²)`` or ``1/σ`` overflows float32, the float32 kernels use
    the largest finite exponent, which gives ``k = 0`` and a zero gradient
    for every pair whose squared distance is a normal float32.

    Args:
        x: ``(N, D)`` samples, float32 / bfloat16 / float16 / float64.
        y: ``(M, D)`` samples, same dtype and device; ``M`` may differ from ``N``.
        kernel: ``"gaussian"``, ``"laplacian"`` or ``"polynomial"``.
        bandwidths: one ``σ >= 1e-150`` or a non-empty sequence of them
            (gaussian, laplacian); default ``(0.5, 1, 2, 4, 8)``, for features
            of unit scale.
        unbiased: leave the within-sample diagonals out (then ``N, M >= 2``).
        degree: polynomial degree, an integer ``>= 1``.
        c: polynomial scale, ``> 0``.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``
            (those in ``MMD_KERNELS`` have an MMD kernel; the GPU kernels take
            float32 / bfloat16 / float16).
        gather: gather ``x`` and ``y`` from every rank of ``process_group``
            (default: the world) and compute the MMD of the global samples
            (:mod:`fastkd.distributed`: same value on every rank; each rank's
            gradient is ``world_size`` × the single-process one of its rows).

    Returns:
        ``()`` loss, float32 (float64 for float64 inputs).
    """
    if gather:
        _reference.check_mmd_arguments(x, y, kernel, bandwidths, unbiased, degree, c)
        x = _distributed.gather_with_grad("x", x, process_group)
        y = _distributed.gather_with_grad("y", y, process_group)
    x, y, bandwidths, degree, c = _reference.check_mmd_arguments(
        x, y, kernel, bandwidths, unbiased, degree, c
    )
    chosen = backend_for("mmd", MMD_KERNELS, backend, x)
    if chosen == "reference":
        return _reference.mmd_loss(
            x, y, kernel=kernel, bandwidths=bandwidths, unbiased=unbiased, degree=degree, c=c
        )
    return MMDFunction.apply(
        x, y, int(MMDKernel.from_name(kernel)), list(bandwidths), degree, c, unbiased,
        _mmd_tile_rows(x.shape[0], y.shape[0]), chosen,
    )


class MMDLoss(LossModule):
    """Module form of :func:`fastkd.mmd_loss`; keyword arguments as there.

    ``forward(x (N, D), y (M, D))`` → ``()`` loss. With ``gather=True`` the
    samples of every rank of ``process_group`` (default: the world) are
    compared, as :func:`fastkd.mmd_loss`'s ``gather``.
    """

    loss_function = staticmethod(mmd_loss)

    def __init__(
        self, *, kernel: str = "gaussian",
        bandwidths: float | tuple[float, ...] = _reference.DEFAULT_BANDWIDTHS,
        unbiased: bool = False, degree: int = 2, c: float = 1.0, backend: str = "auto", gather: bool = False,
        process_group=None,
    ) -> None:
        super().__init__(
            kernel=kernel, bandwidths=bandwidths, unbiased=unbiased, degree=degree, c=c, backend=backend,
            gather=_validate.flag("gather", gather), process_group=process_group,
        )
