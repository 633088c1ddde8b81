"""Squared MMD (docs/spec.md §3) in Triton, the ``triton`` backend of ``fastkd.mmd_loss``.

Same contract as the C++ ops ``fastkd::mmd_forward`` / ``fastkd::mmd_backward``
(csrc/cpu/mmd.cpp): ``MMD² = w_xx Σ k(x, x') + w_yy Σ k(y, y') − w_xy Σ k(x, y)``
with ``w = 1/N², 1/M², 2/(NM)`` (``1/(N(N−1))``, ``1/(M(M−1))`` and the
diagonals left out when unbiased), never holding an (N, M) kernel matrix.

Each program owns a BLOCK × BLOCK tile at a time: the tile's dot products
a_i·b_j come from ``tl.dot`` over D in BLOCK_D chunks (IEEE fp32, no TF32:
the distances are a difference of norms and would lose three digits), then
every bandwidth's kernel value (forward) or gradient coefficient (backward)
is formed in registers. Squared distances come from the norms,
``‖a‖² + ‖b‖² − 2 a·b`` clamped at 0, exactly as on CPU, after the samples
are shifted by a common centre for which every subtraction is exact (see
``_centred``: distances and gradients unchanged, the norms do not grow
with a common offset):

- a point against itself (the diagonal of a within-sample term) has distance
  exactly 0, so ``k(a, a)`` is exact and its gradient contribution is 0;
- laplacian: the square root turns the norm form's absolute rounding error
  ``eps·(‖a‖² + ‖b‖²)`` into ``sqrt(eps)·‖a‖`` at small distances, so pairs
  with ``sq < (eps/1e-6)² (‖a‖² + ‖b‖²)`` ("near" pairs, the CPU kernel's
  rule) are recomputed from their differences: a tile holding any near pair
  (a uniform runtime branch, rare for spread-out data) forms ``Σ_d (a − b)²``
  as a (BLOCK, BLOCK, BLOCK_E) broadcast, and in the backward their gradient
  ``C_ij (a_i − b_j)`` is summed from the differences too, where the matrix
  form ``a_i Σ_j C_ij − (C b)_i`` would cancel two terms of size ``|C|·‖a‖``.
  At exactly coincident points the gradient is 0 (cdist's convention).

Forward: grid (row blocks, SPLITS); program (r, s) walks the column blocks
``c ≡ s (mod SPLITS)`` (within-sample terms only ``c ≥ r``: the kernel is
symmetric, so off-diagonal tiles count twice and half the tiles are skipped),
sums each tile's rows in fp32 and the row sums in fp64, and writes one fp64
partial; the launcher sums the partials in a fixed order (deterministic, no
atomics) and combines the three terms in fp64 (the loss is a small difference
of three large means).

Backward: the gradient of ``Σ_ij k(a_i, b_j)`` w.r.t. ``a_i`` is
``Σ_j C_ij (a_i − b_j) = a_i Σ_j C_ij − (C b)_i`` (distance kernels,
``C = k'``-type coefficients) or ``(C b)_i`` (polynomial). Program (r, s)
accumulates, for its rows, ``weight · (−C b)`` per column block by ``tl.dot``
into an fp32 workspace slice ``ws[s, rows, :]`` it alone owns (read-modify-
write in D chunks, a barrier after each store because the load and store
layouts need not map an element to the same thread), and ``weight · a Σ_j C``
at the end. The cross term's gradient w.r.t. y is the row side of ``k(y, x)``:
a second launch with the roles swapped (the cross tiles are computed twice
instead of accumulating column sums with atomics). The launcher sums the
SPLITS slices and multiplies by the upstream gradient.

FLOP / memory floor: forward ``2·D`` flops per pair (N² / 2 + M² / 2 + NM pairs)
plus one exp per bandwidth; backward ``4·D`` flops per pair over N² + M² + 2NM
pairs. Reads are O((N + M)·D) per row block (L2-resident for moderate sizes);
memory is O((N + M)·D) for norms and the fp32 workspace (× SPLITS, capped).

bfloat16 / float16 inputs are widened as they are loaded; every dot product
and every kernel value is fp32; gradients come back in the input dtype
(rounded by torch from the fp32 workspace, which also sidesteps the
interpreter's truncating bf16 stores).
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
import triton
import triton.language as tl

from fastkd._enums import MMDKernel

from ._common import (
    DEVICE_TYPE,
    GAUSSIAN,
    LAPLACIAN,
    POLYNOMIAL,
    check_pair,
    check_tensor,
    guard_device,
)

__all__ = ["mmd_backward", "mmd_forward"]

# The laplacian's near-pair rule of csrc/cpu/mmd.cpp (refine_near_pairs) in
# float32: sq < (eps / 1e-6)² (‖a‖² + ‖b‖²) is recomputed from differences,
# which keeps the distance error below about 1e-6 times the norms.
_NEAR_FACTOR = tl.constexpr((2.0**-23 / 1e-6) ** 2)
# Workspace elements the backward may use beyond one (rows, D) slice for
# splitting the column range (SPLITS > 1): 64 MiB of fp32.
_SPLIT_WORKSPACE_ELEMENTS = 2**24
_MAX_SPLITS = 16
# fastkd.reference.mmd.MIN_BANDWIDTH: 1/(2σ²) must be a finite float64.
MIN_BANDWIDTH = 1e-150
# The most negative exponent the kernels use (fp32), see _exponents.
_MOST_NEGATIVE_EXPONENT = -float(torch.finfo(torch.float32).max) / 2


# ---- per-tile helpers ---------------------------------------------------------------


@triton.jit
def _dot_tile(a_ptr, b_ptr, rows, cols, n_a, n_b, D, stride_a, stride_b,
              BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    # (BLOCK, BLOCK) a_i · b_j in fp32 over D, IEEE products and sums
    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    dd = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        k = d0 + dd
        a = tl.load(a_ptr + rows[:, None] * stride_a + k[None, :],
                    mask=(rows[:, None] < n_a) & (k[None, :] < D), other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols[:, None] * stride_b + k[None, :],
                    mask=(cols[:, None] < n_b) & (k[None, :] < D), other=0.0).to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    return acc


@triton.jit
def _difference_tile(a_ptr, b_ptr, rows, cols, n_a, n_b, D, stride_a, stride_b, d0,
                     BLOCK_E: tl.constexpr):
    # (BLOCK, BLOCK, BLOCK_E) a_i[d] − b_j[d] for d in [d0, d0 + BLOCK_E); 0 outside
    e = d0 + tl.arange(0, BLOCK_E)
    a = tl.load(a_ptr + rows[:, None] * stride_a + e[None, :],
                mask=(rows[:, None] < n_a) & (e[None, :] < D), other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols[:, None] * stride_b + e[None, :],
                mask=(cols[:, None] < n_b) & (e[None, :] < D), other=0.0).to(tl.float32)
    return a[:, None, :] - b[None, :, :]


@triton.jit
def _squared_distance(dots, a_norm, b_norm, is_self, WITHIN: tl.constexpr):
    # ‖a‖² + ‖b‖² − 2 a·b clamped at 0 (NaN stays NaN), exactly 0 for a point against itself
    sq = a_norm[:, None] + b_norm[None, :] - 2.0 * dots
    sq = tl.where(sq < 0.0, 0.0, sq)
    if WITHIN:
        sq = tl.where(is_self, 0.0, sq)
    return sq


@triton.jit
def _near_pairs(sq, a_norm, b_norm, valid, is_self, WITHIN: tl.constexpr):
    # The laplacian pairs whose norm-form distance is too inaccurate (module
    # docstring). A within-sample self-pair is exact already (distance 0); it
    # is left out so that diagonal tiles do not all take the difference path.
    near = (sq < (a_norm[:, None] + b_norm[None, :]) * _NEAR_FACTOR) & valid
    if WITHIN:
        near = near & (is_self == 0)
    return near, tl.max(near.to(tl.int32)) > 0


@triton.jit
def _exact_squared_distance(sq, near, a_ptr, b_ptr, rows, cols, n_a, n_b, D, stride_a, stride_b,
                            BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    # sq with the near pairs replaced by Σ_d (a_i[d] − b_j[d])²
    exact = tl.zeros([BLOCK, BLOCK], tl.float32)
    for d0 in range(0, D, BLOCK_E):
        diff = _difference_tile(a_ptr, b_ptr, rows, cols, n_a, n_b, D, stride_a, stride_b, d0, BLOCK_E)
        exact += tl.sum(diff * diff, axis=2)
    return tl.where(near, exact, sq)


@triton.jit
def _int_power(u, exponent):
    # u^exponent for an integer exponent >= 0 (1 for exponent 0)
    p = tl.full(u.shape, 1.0, tl.float32)
    for _ in range(0, exponent):
        p = p * u
    return p


@triton.jit
def _accumulate(ws_ptr, rows, n_a, D, d0, value, BLOCK_W: tl.constexpr):
    # ws[rows, d0:d0 + BLOCK_W] += value, a slice only this program touches. The
    # barrier makes the stores visible to whichever thread loads them next.
    k = d0 + tl.arange(0, BLOCK_W)
    ptrs = ws_ptr + rows[:, None] * D + k[None, :]
    mask = (rows[:, None] < n_a) & (k[None, :] < D)
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + value, mask=mask)
    tl.debug_barrier()


@triton.jit
def _program_rows(BLOCK: tl.constexpr):
    # (pid_m, split, splits, rows) of this program: grid axis 0 walks the blocks of BLOCK
    # rows of a, axis 1 the `splits` interleaved shares of their column blocks
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    return pid_m, split, splits, pid_m.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _row_norms(a_norm_ptr, rows, n_a, KERNEL: tl.constexpr, BLOCK: tl.constexpr):
    # ‖a_i‖² of the program's rows, zeros past n_a; the polynomial kernel reads no norms (zeros)
    a_norm = tl.zeros([BLOCK], tl.float32)
    if KERNEL != POLYNOMIAL:
        a_norm = tl.load(a_norm_ptr + rows, mask=rows < n_a, other=0.0)
    return a_norm


@triton.jit
def _pair_tile(a_ptr, b_ptr, rows, cb, n_a, n_b, D, stride_a, stride_b,
               BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    # The [BLOCK, BLOCK] tile of column block cb against the program's rows:
    # (cols, valid (both in range), is_self (i = j), dots = a_i · b_j)
    cols = cb * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = (rows[:, None] < n_a) & (cols[None, :] < n_b)
    is_self = rows[:, None] == cols[None, :]
    dots = _dot_tile(a_ptr, b_ptr, rows, cols, n_a, n_b, D, stride_a, stride_b, BLOCK, BLOCK_D)
    return cols, valid, is_self, dots


# ---- kernels ------------------------------------------------------------------------


@triton.jit
def _mmd_fwd_kernel(
    a_ptr,  # [n_a, D] samples, row stride stride_a, unit stride along D
    b_ptr,  # [n_b, D] samples (a_ptr itself when WITHIN)
    a_norm_ptr,  # [n_a] fp32 ‖a_i‖² (unused for POLYNOMIAL)
    b_norm_ptr,  # [n_b] fp32 ‖b_j‖²
    exps_ptr,  # [n_bw] fp32 exponents: −1/(2σ²) (gaussian), −1/σ (laplacian)
    partial_ptr,  # [row blocks, SPLITS] fp64 partial sums of k(a_i, b_j)
    n_a, n_b, D, stride_a, stride_b,
    n_bw,
    inv_c,  # polynomial: 1/c
    degree,  # polynomial degree >= 1
    KERNEL: tl.constexpr,
    WITHIN: tl.constexpr,  # b is a itself: exact self-pairs, symmetric tiles
    UNBIASED: tl.constexpr,  # leave the self-pairs out (WITHIN only)
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,  # D chunk of the laplacian's near-pair differences
):
    pid_m, split, splits, rows = _program_rows(BLOCK)
    a_norm = _row_norms(a_norm_ptr, rows, n_a, KERNEL, BLOCK)
    first = split
    if WITHIN:
        # the upper triangle of column blocks, c >= pid_m, c ≡ split (mod splits)
        first = pid_m + (split - pid_m % splits + splits) % splits
    total = tl.zeros([BLOCK], tl.float64)
    for cb in range(first, tl.cdiv(n_b, BLOCK), splits):
        cols, valid, is_self, dots = _pair_tile(a_ptr, b_ptr, rows, cb, n_a, n_b, D, stride_a, stride_b,
                                                BLOCK, BLOCK_D)
        if KERNEL == POLYNOMIAL:
            # k = (a·b / c + 1)^degree
            k = _int_power(dots * inv_c + 1.0, degree)
        else:
            b_norm = tl.load(b_norm_ptr + cols, mask=cols < n_b, other=0.0)
            arg = _squared_distance(dots, a_norm, b_norm, is_self, WITHIN)
            if KERNEL == LAPLACIAN:
                near, any_near = _near_pairs(arg, a_norm, b_norm, valid, is_self, WITHIN)
                if any_near:
                    arg = _exact_squared_distance(arg, near, a_ptr, b_ptr, rows, cols, n_a, n_b, D,
                                                  stride_a, stride_b, BLOCK, BLOCK_E)
                arg = tl.sqrt_rn(arg)
            # k = Σ_σ exp(e_σ · sq) (gaussian) or Σ_σ exp(e_σ · d) (laplacian)
            k = tl.zeros([BLOCK, BLOCK], tl.float32)
            for s in range(0, n_bw):
                k += tl.exp(arg * tl.load(exps_ptr + s))
        if WITHIN and UNBIASED:
            k = tl.where(is_self, 0.0, k)
        k = tl.where(valid, k, 0.0)
        row_sum = tl.sum(k, axis=1).to(tl.float64)
        if WITHIN:
            row_sum = row_sum * tl.where(cb == pid_m, 1.0, 2.0).to(tl.float64)
        total += row_sum
    tl.store(partial_ptr + pid_m * splits + split, tl.sum(total, axis=0))


@triton.jit
def _mmd_bwd_kernel(
    a_ptr,  # [n_a, D] samples whose gradient is accumulated, row stride stride_a
    b_ptr,  # [n_b, D] the other argument of k (a_ptr itself when WITHIN)
    a_norm_ptr,  # [n_a] fp32 ‖a_i‖² (unused for POLYNOMIAL)
    b_norm_ptr,  # [n_b] fp32 ‖b_j‖²
    exps_ptr,  # [n_bw] fp32 exponents: −1/(2σ²) (gaussian), −1/σ (laplacian)
    ws_ptr,  # [SPLITS, n_a, D] contiguous fp32 workspace, += weight · Σ_j ∂k(a_i, b_j)/∂a_i
    n_a, n_b, D, stride_a, stride_b,
    n_bw,
    inv_c,  # polynomial: 1/c
    degree,  # polynomial degree >= 1
    weight,  # estimator weight of this term (2 w_xx for within terms: both arguments)
    KERNEL: tl.constexpr,
    WITHIN: tl.constexpr,
    UNBIASED: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid_m, split, splits, rows = _program_rows(BLOCK)
    ws = ws_ptr + split.to(tl.int64) * n_a * D
    a_norm = _row_norms(a_norm_ptr, rows, n_a, KERNEL, BLOCK)
    coef_sum = tl.zeros([BLOCK], tl.float32)
    for cb in range(split, tl.cdiv(n_b, BLOCK), splits):
        cols, valid, is_self, dots = _pair_tile(a_ptr, b_ptr, rows, cb, n_a, n_b, D, stride_a, stride_b,
                                                BLOCK, BLOCK_D)
        if KERNEL == POLYNOMIAL:
            # ∂k/∂a = degree/c · u^(degree−1) · b with u = a·b/c + 1
            coef = (degree * inv_c) * _int_power(dots * inv_c + 1.0, degree - 1)
            if WITHIN and UNBIASED:
                coef = tl.where(is_self, 0.0, coef)
            coef = tl.where(valid, coef, 0.0)
        else:
            b_norm = tl.load(b_norm_ptr + cols, mask=cols < n_b, other=0.0)
            sq = _squared_distance(dots, a_norm, b_norm, is_self, WITHIN)
            coef = tl.zeros([BLOCK, BLOCK], tl.float32)
            if KERNEL == GAUSSIAN:
                # ∂k/∂a = Σ_σ −exp(−sq/(2σ²))/σ² · (a − b) = Σ_σ 2e_σ exp(e_σ sq) · (a − b)
                for s in range(0, n_bw):
                    e = tl.load(exps_ptr + s)
                    coef += (2.0 * e) * tl.exp(sq * e)
            else:
                # ∂k/∂a = Σ_σ −exp(−d/σ)/(σ d) · (a − b) = Σ_σ e_σ exp(e_σ d)/d · (a − b), 0 at d = 0
                near, any_near = _near_pairs(sq, a_norm, b_norm, valid, is_self, WITHIN)
                if any_near:
                    sq = _exact_squared_distance(sq, near, a_ptr, b_ptr, rows, cols, n_a, n_b, D,
                                                 stride_a, stride_b, BLOCK, BLOCK_E)
                dist = tl.sqrt_rn(sq)
                for s in range(0, n_bw):
                    e = tl.load(exps_ptr + s)
                    coef += e * tl.exp(dist * e)
                # (a NaN distance keeps its NaN: only an exact 0 is special)
                coef = tl.where(dist == 0.0, 0.0, coef / tl.where(dist == 0.0, 1.0, dist))
            # the self-pair's a − a = 0 contributes nothing
            if WITHIN:
                coef = tl.where(is_self, 0.0, coef)
            coef = tl.where(valid, coef, 0.0)
            if KERNEL == LAPLACIAN:
                if any_near:
                    # near pairs: weight · Σ_j C_ij (a_i − b_j) from the differences
                    near_coef = tl.where(near, coef, 0.0)
                    coef = tl.where(near, 0.0, coef)
                    for d0 in range(0, D, BLOCK_E):
                        diff = _difference_tile(a_ptr, b_ptr, rows, cols, n_a, n_b, D, stride_a, stride_b,
                                                d0, BLOCK_E)
                        near_grad = tl.sum(near_coef[:, :, None] * diff, axis=1)
                        _accumulate(ws, rows, n_a, D, d0, weight * near_grad, BLOCK_E)
            coef_sum += tl.sum(coef, axis=1)
            # the − (C b)_i of Σ_j C_ij (a_i − b_j) = a_i Σ_j C_ij − (C b)_i
            coef = -coef
        # weight · (C b) over D chunks
        dd = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            k = d0 + dd
            b = tl.load(b_ptr + cols[:, None] * stride_b + k[None, :],
                        mask=(cols[:, None] < n_b) & (k[None, :] < D), other=0.0).to(tl.float32)
            _accumulate(ws, rows, n_a, D, d0, weight * tl.dot(coef, b, input_precision="ieee"), BLOCK_D)
    if KERNEL != 2:
        # weight · a_i Σ_j C_ij
        dd = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            k = d0 + dd
            a = tl.load(a_ptr + rows[:, None] * stride_a + k[None, :],
                        mask=(rows[:, None] < n_a) & (k[None, :] < D), other=0.0).to(tl.float32)
            _accumulate(ws, rows, n_a, D, d0, (weight * a) * coef_sum[:, None], BLOCK_D)




# ---- launch configuration -----------------------------------------------------------


def launch_config(kernel: int, dim: int, backward: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK, BLOCK_D, BLOCK_E, num_warps) for samples of ``dim`` features.

    IEEE fp32 ``tl.dot`` runs on FMA units with its operands replicated
    across threads, so registers, not the tile, set the limit. On a GPU
    (ptxas -v for sm_90 on the lowered variants): 64 × 64 tiles at 8 warps,
    D in chunks of 32 in the forward and 16 in the backward, which also holds
    the coefficient tile and a (64, 16) product; the laplacian's near-pair
    path holds a (BLOCK, BLOCK, BLOCK_E) difference tensor, so it runs
    32 × 32 tiles, BLOCK_D 16, BLOCK_E 8. fp32 variants: 114–191 registers,
    no spills (64 × 64 with D chunks of 32 at 4 warps spilled 744 bytes in
    the backward); bf16 / fp16 variants are held to 128 registers and spill
    at most 36 bytes. Not tuned on hardware.
    The interpreter pays per operation, not per element: one wide D chunk,
    and 32-row tiles.
    """
    if DEVICE_TYPE == "cpu":
        block_d = max(16, min(triton.next_power_of_2(max(dim, 1)), 128))
        return 32, block_d, block_d, 4
    if kernel == MMDKernel.LAPLACIAN:
        return 32, 16, 8, 8
    return 64, 16 if backward else 32, 4, 8


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def splits_for(row_blocks: int, col_blocks: int, rows: int, dim: int, device: torch.device) -> int:
    """How many programs share one row block's columns.

    Enough programs for two waves on the GPU's SMs when there are few row
    blocks, no more than the column blocks, and (backward) a workspace of at
    most 64 MiB beyond one (rows, D) slice. The interpreter runs programs one
    after another, so it takes 1.
    """
    if DEVICE_TYPE == "cpu":
        return 1
    wanted = -(-2 * _multiprocessors(device) // row_blocks)
    memory_cap = 1 + _SPLIT_WORKSPACE_ELEMENTS // max(rows * dim, 1)
    return max(1, min(wanted, col_blocks, _MAX_SPLITS, memory_cap))


# ---- launchers ----------------------------------------------------------------------


def _check_args(x, y, kernel, bandwidths, degree, c, unbiased) -> None:
    """The checks of csrc/cpu/mmd.cpp (check_mmd_args) as ValueError, before any launch."""
    for name, t in (("x", x), ("y", y)):
        check_tensor(name, t, 2, "rows, D")
        if t.shape[0] < 1 or t.shape[1] < 1:
            raise ValueError(f"{name} must have at least one row and one feature, got {tuple(t.shape)}")
    check_pair("x", x, "y", y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same feature dim D, got {x.shape[1]} and {y.shape[1]}")
    if not isinstance(kernel, int) or isinstance(kernel, bool) or kernel not in tuple(MMDKernel):
        raise ValueError(f"kernel must be 0 (gaussian), 1 (laplacian) or 2 (polynomial), got {kernel!r}")
    if kernel != MMDKernel.POLYNOMIAL:
        if len(bandwidths) == 0:
            raise ValueError("bandwidths must not be empty")
        for s in bandwidths:
            if not math.isfinite(s):
                raise ValueError(f"bandwidths must be finite, got {s}")
            if s < MIN_BANDWIDTH:
                raise ValueError(f"bandwidths must be >= {MIN_BANDWIDTH:g}, got {s}")
    if isinstance(degree, bool) or not isinstance(degree, numbers.Integral) or degree < 1:
        raise ValueError(f"degree must be an integer >= 1, got {degree!r}")
    if not isinstance(c, numbers.Real) or isinstance(c, bool) or not (math.isfinite(c) and c > 0):
        raise ValueError(f"c must be finite and > 0, got {c}")
    if not isinstance(unbiased, bool):
        raise ValueError(f"unbiased must be a bool, got {type(unbiased).__name__}")
    if unbiased and (x.shape[0] < 2 or y.shape[0] < 2):
        raise ValueError(f"unbiased needs at least 2 rows in x and in y, got {x.shape[0]} and {y.shape[0]}")


def _bandwidth_list(bandwidths) -> list[float]:
    try:
        return [float(s) for s in bandwidths]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bandwidths must be a sequence of numbers, got {bandwidths!r}") from exc


def _centred(x: torch.Tensor, y: torch.Tensor, kernel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x and y (fp32) less an exact common centre, for the distance kernels.

    Distances do not change under a common shift, but the rounding of
    ``‖a‖² + ‖b‖² − 2a·b`` scales with the norms: a common offset of 1e3 on
    unit-scale data costs percents, and beyond ~1e19 ``‖a‖²`` overflows. Each
    feature is shifted by a centre ``c`` for which every ``v − c`` is exact
    (Sterbenz: ``c/2 <= v <= 2c``), so every difference ``a − b``, hence
    every distance and gradient, is unchanged: where the feature's values
    (x and y together, in ``[lo, hi]``) share a sign and ``|hi| <= 4 |lo|``,
    ``c`` is the midpoint clamped to ``[hi/2, 2 lo]`` (mirrored for negative
    values); elsewhere ``c = 0`` (the offset is then at most a few spreads).
    The rule of csrc/common/mmd_centre.h (exactly_centred). The polynomial
    kernel is not translation-invariant and keeps the samples as they are.
    """
    if kernel == MMDKernel.POLYNOMIAL:
        return x, y
    x, y = x.float(), y.float()
    lo = torch.minimum(x.amin(0), y.amin(0))
    hi = torch.maximum(x.amax(0), y.amax(0))
    mid = lo * 0.5 + hi * 0.5
    positive = (lo > 0) & (hi <= lo * 4)
    negative = (hi < 0) & (lo >= hi * 4)
    zero = torch.zeros((), dtype=lo.dtype, device=lo.device)
    centre = torch.where(
        positive, torch.clamp(mid, hi * 0.5, lo * 2),
        torch.where(negative, torch.clamp(mid, hi * 2, lo * 0.5), zero),
    )
    return x - centre, y - centre


def _prepare(t: torch.Tensor, kernel: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unit stride along D, and the fp32 squared row norms (distance kernels)."""
    t = t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()
    norm = None if kernel == MMDKernel.POLYNOMIAL else t.float().square().sum(1)
    return t, norm


def _exponents(kernel: int, bandwidths, device) -> torch.Tensor:
    # k = Σ exp(e σ-term): e = −1/(2σ²) on sq (gaussian), −1/σ on d (laplacian).
    # An e beyond fp32 is held at −FLT_MAX / 2 (2e, the gaussian's slope, stays
    # finite): exp(e·sq) is still 0 for every distance that is a normal fp32,
    # and 1 at distance 0, where −inf would give 0·inf = NaN.
    if kernel == MMDKernel.POLYNOMIAL:
        values = [0.0]  # unread
    else:
        values = [-1.0 / s if kernel == MMDKernel.LAPLACIAN else -0.5 / (s * s) for s in bandwidths]
        values = [max(v, _MOST_NEGATIVE_EXPONENT) for v in values]
    return torch.tensor(values, dtype=torch.float32, device=device)


def _estimator_weights(n: int, m: int, unbiased: bool) -> tuple[float, float, float]:
    nn = n * (n - 1) if unbiased else n * n
    mm = m * (m - 1) if unbiased else m * m
    return 1.0 / nn, 1.0 / mm, 2.0 / (n * m)


def _term_sum(a, a_norm, b, b_norm, exps, kernel, n_bw, degree, c, within, unbiased) -> torch.Tensor:
    """Σ_ij k(a_i, b_j) over the term (self-pairs left out when ``within and unbiased``), fp64 ()."""
    block, block_d, block_e, num_warps = launch_config(kernel, a.shape[1])
    row_blocks, col_blocks = triton.cdiv(a.shape[0], block), triton.cdiv(b.shape[0], block)
    splits = splits_for(row_blocks, col_blocks, a.shape[0], a.shape[1], a.device)
    partial = torch.zeros(row_blocks, splits, dtype=torch.float64, device=a.device)
    _mmd_fwd_kernel[(row_blocks, splits)](
        a, b, a_norm, b_norm, exps, partial,
        a.shape[0], b.shape[0], a.shape[1], a.stride(0), b.stride(0),
        n_bw, 1.0 / c, degree,
        KERNEL=kernel, WITHIN=within, UNBIASED=unbiased,
        BLOCK=block, BLOCK_D=block_d, BLOCK_E=block_e, num_warps=num_warps,
    )
    return partial.sum()


@guard_device
def mmd_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    kernel: int,
    bandwidths,
    degree: int,
    c: float,
    unbiased: bool,
) -> torch.Tensor:
    """Squared MMD, the contract of ``fastkd::mmd_forward`` (without its CPU tiling argument).

    Args:
        x: ``(N, D)`` samples, float32 / bfloat16 / float16, any strides.
        y: ``(M, D)`` samples, same dtype and device.
        kernel: 0 gaussian, 1 laplacian, 2 polynomial.
        bandwidths: the σ of the gaussian / laplacian (summed over).
        degree, c: the polynomial ``(a·b / c + 1)^degree``.
        unbiased: leave the within-sample diagonals out.

    Returns:
        ``()`` float32 loss.
    """
    bandwidths = _bandwidth_list(bandwidths)
    _check_args(x, y, kernel, bandwidths, degree, c, unbiased)
    x, y = _centred(x, y, kernel)
    x, x_norm = _prepare(x, kernel)
    y, y_norm = _prepare(y, kernel)
    exps = _exponents(kernel, bandwidths, x.device)
    n_bw = len(bandwidths) if kernel != MMDKernel.POLYNOMIAL else 0
    w_xx, w_yy, w_xy = _estimator_weights(x.shape[0], y.shape[0], unbiased)
    common = (exps, kernel, n_bw, int(degree), float(c))
    s_xx = _term_sum(x, x_norm, x, x_norm, *common, True, unbiased)
    s_yy = _term_sum(y, y_norm, y, y_norm, *common, True, unbiased)
    s_xy = _term_sum(x, x_norm, y, y_norm, *common, False, False)
    return (w_xx * s_xx + w_yy * s_yy - w_xy * s_xy).to(torch.float32)


def _row_side_grad(ws, a, a_norm, b, b_norm, exps, kernel, n_bw, degree, c, weight, within, unbiased) -> None:
    """ws[s] += weight · Σ_j ∂k(a_i, b_j)/∂a_i, the columns split over ws's first dim."""
    block, block_d, block_e, num_warps = launch_config(kernel, a.shape[1], backward=True)
    row_blocks = triton.cdiv(a.shape[0], block)
    splits = min(ws.shape[0], triton.cdiv(b.shape[0], block))
    _mmd_bwd_kernel[(row_blocks, splits)](
        a, b, a_norm, b_norm, exps, ws,
        a.shape[0], b.shape[0], a.shape[1], a.stride(0), b.stride(0),
        n_bw, 1.0 / c, degree, weight,
        KERNEL=kernel, WITHIN=within, UNBIASED=unbiased,
        BLOCK=block, BLOCK_D=block_d, BLOCK_E=block_e, num_warps=num_warps,
    )


def _workspace(t: torch.Tensor, kernel: int, other_rows: int) -> torch.Tensor:
    block = launch_config(kernel, t.shape[1], backward=True)[0]
    row_blocks = triton.cdiv(t.shape[0], block)
    col_blocks = triton.cdiv(max(t.shape[0], other_rows), block)
    splits = splits_for(row_blocks, col_blocks, t.shape[0], t.shape[1], t.device)
    return torch.zeros(splits, *t.shape, dtype=torch.float32, device=t.device)


@guard_device
def mmd_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    kernel: int,
    bandwidths,
    degree: int,
    c: float,
    unbiased: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``grad · MMD²``, the contract of ``fastkd::mmd_backward``.

    Args:
        grad: one-element upstream gradient (any float dtype, x's device).
        x, y, kernel, bandwidths, degree, c, unbiased: as :func:`mmd_forward`.

    Returns:
        ``(grad_x (N, D), grad_y (M, D))`` contiguous, in the input dtype.
    """
    bandwidths = _bandwidth_list(bandwidths)
    _check_args(x, y, kernel, bandwidths, degree, c, unbiased)
    if not isinstance(grad, torch.Tensor) or grad.numel() != 1:
        raise ValueError("grad must be a tensor with one element")
    if grad.device != x.device:
        raise ValueError(f"grad ({grad.device}) must be on x's device ({x.device})")
    dtype = x.dtype
    x, y = _centred(x, y, kernel)
    x, x_norm = _prepare(x, kernel)
    y, y_norm = _prepare(y, kernel)
    exps = _exponents(kernel, bandwidths, x.device)
    n_bw = len(bandwidths) if kernel != MMDKernel.POLYNOMIAL else 0
    n, m = x.shape[0], y.shape[0]
    w_xx, w_yy, w_xy = _estimator_weights(n, m, unbiased)
    common = (exps, kernel, n_bw, int(degree), float(c))
    # Σ k(x, x') has x_i in both arguments: twice the row side.
    ws_x = _workspace(x, kernel, m)
    _row_side_grad(ws_x, x, x_norm, x, x_norm, *common, 2.0 * w_xx, True, unbiased)
    _row_side_grad(ws_x, x, x_norm, y, y_norm, *common, -w_xy, False, False)
    ws_y = _workspace(y, kernel, n)
    _row_side_grad(ws_y, y, y_norm, y, y_norm, *common, 2.0 * w_yy, True, unbiased)
    _row_side_grad(ws_y, y, y_norm, x, x_norm, *common, -w_xy, False, False)
    g = grad.reshape(()).to(torch.float32)
    return (ws_x.sum(0) * g).to(dtype), (ws_y.sum(0) * g).to(dtype)
