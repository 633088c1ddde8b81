"""RKD distance and angle losses (docs/spec.md §2) in Triton: the ``triton`` backend of
``fastkd.rkd_distance`` / ``fastkd.rkd_angle``.

Same contract as the C++ ops ``fastkd::rkd_distance_forward`` and
``fastkd::rkd_angle_forward`` (csrc/fastkd.cpp) and the same formulation as
their CPU implementation (csrc/cpu/rkd.cpp, rkd_kernel.cpp):
Gram matrices of the centred embeddings (``torch.mm`` here), O(N²) memory,
pairs that the Gram form cannot resolve recomputed from their differences,
the student's gradient produced in the same call.

Distance (float32 Gram; every pass is one program per block of rows, the first also per j-block):

  _pair_sq_kernel          ‖x_i − x_j‖² = G_ii + G_jj − 2 G_ij; the pairs
                           below ``factor · (G_ii + G_jj)`` (the Gram form's
                           rounding, NaN included) from x_i − x_j; row sums
                           of d = sqrt(max(‖·‖², 1e-12))    read G, x (near pairs); write sq, near
  _distance_loss_kernel    ρ = d_s/μ_s − d_t/μ_t; Σ smooth_l1(ρ), Σ q·d_s with
                           q = clamp(ρ, −1, 1)/N²           read sq_s, sq_t
  _distance_coef_kernel    C_ij = 2 (q − Q/(μ_s M)) / (μ_s d_ij), split into
                           far pairs (→ torch.mm) and near pairs   read sq, near; write C
  _near_grad_kernel        Σ_j C_ij (x_i − x_j) over the near pairs only, from
                           the differences (the matrix form would cancel)
  then dX = x·rowsum(C_far) − C_far x + near part (torch.mm, float32).

Traffic floor: the Gram matmuls (2·N·D·N), then a few passes over N² floats.
The scalars between the passes (1/μ_s, 1/μ_t from float64 totals, and the
mean's share of ∂loss/∂ρ) stay float64 tensors on the device that the
kernels read: the launcher never synchronises with the host.

Angle (float64 Gram, split into float32 hi + lo halves, as on CPU): for anchor i,

  a_ijk = (G_jk − G_ik − G_ij + G_ii) · u_ij · u_ik,   u = 1 / max(e, 1e-12),

``_rkd_angle_kernel``: one program per (j-block, chunk of anchors). The
program keeps the four [BLOCK_J, BLOCK_K] tiles of G_s, G_t (hi, lo) of its
(j-block, k-block) in registers while it sweeps its anchors, so each anchor
costs only its rows (O(BLOCK_J + BLOCK_K) loads) against BLOCK_J·BLOCK_K
angles: the O(N³) part is compute-bound. Its outputs, without races:

  d_part[p]  Σ_{i in chunk p} W^(i)  (W = ∂loss/∂numerator, [BLOCK_J, BLOCK_K]
             accumulated in registers over the anchors, stored once per tile)
  R[i, j]    Σ_k W^(i)_jk,  S[i, j] = Σ_k g a_ijk: rows j of anchors i, owned by
             this program (read-modify-write once per k-block, after a barrier)

and the partial loss sums. Every (j, k) pair is visited (twice the work of the
CPU kernel's k ≥ j, but no program has to add into another's rows of R, S).
Memory: (P + 8)·N²·4 bytes for P anchor chunks (P ≤ 8, bounded by
``_MAX_PARTIAL_ELEMENTS``). The launcher then forms dG and
dX = (dG + dGᵀ) X and the normalisers' part in float64 (torch.mm), exactly as
rkd.cpp does.

Everything in the kernels is float32 (the angle numerators by the hi + lo
pairing of the CPU kernel); bfloat16 / float16 embeddings are widened first and
the gradient rounded by torch at the end.

The launchers follow the relational launchers' contract (see
``_common.check_embedding_pair``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import (
    DEVICE_TYPE,  # noqa: F401  (re-exported: callers ask a module where its kernels run)
    INTERPRETED,
    check_embedding_pair,
    guard_device,
    max_nan,
    square_row_config,
)

__all__ = ["rkd_angle_forward", "rkd_distance_forward"]


_PDIST_EPS = 1e-12  # RepDistiller's clamp on squared distances
_NORMALIZE_EPS = 1e-12  # F.normalize's eps
_EPS32 = 1.1920928955078125e-07
_EPS64 = 2.220446049250313e-16
# Gram-form squared distances below factor · (‖x_i‖² + ‖x_j‖²) are recomputed
# from x_i − x_j: (eps / target)² for a distance accurate to `target` relative
# to the norms (rkd.cpp's near_factor): 1e-6 from a float32 Gram for
# the distance term, 1e-8 from the float64 Gram for the angle's normalisers.
_DISTANCE_FACTOR = (_EPS32 / 1e-6) ** 2
_ANGLE_FACTOR = (_EPS64 / 1e-8) ** 2
# The anchor chunks' partial dG buffers together hold at most this many
# floats (256 MiB), or one chunk when N² alone exceeds it.
_MAX_PARTIAL_ELEMENTS = 1 << 26
_MAX_ANCHOR_CHUNKS = 8


@triton.jit
def _positive(u):
    # max(u, 0), NaN kept: 0 for the diagonal and for coinciding samples (u < 0)
    return tl.where(u < 0.0, 0.0, u)


@triton.jit
def _clamp_unit(d):
    # clamp(d, −1, 1), NaN kept: smooth-L1's derivative (β = 1)
    return tl.where(d > 1.0, 1.0, tl.where(d < -1.0, -1.0, d))


@triton.jit
def _smooth_l1(d):
    # ½ d² for |d| < 1, |d| − ½ otherwise (β = 1)
    ad = tl.abs(d)
    return tl.where(ad < 1.0, 0.5 * d * d, ad - 0.5)


@triton.jit
def _tile_distances(sq_ptr, rows, js, N):
    # d_ij = sqrt(max(‖x_i − x_j‖², 1e-12)) on a [rows, js] tile; 0 on the
    # diagonal and outside [N, N]. Also returns the squared distances.
    m = (rows < N)[:, None] & (js < N)[None, :]
    sq = tl.load(sq_ptr + rows[:, None] * N + js[None, :], mask=m, other=0.0)
    d = tl.sqrt(max_nan(sq, 1e-12))
    return tl.where((rows[:, None] == js[None, :]) | ~m, 0.0, d), sq


@triton.jit
def _pair_sq_kernel(
    g_ptr,  # [N, N] Gram matrix of the centred rows (float32 or float64), contiguous
    x_ptr,  # [N, D] the rows (g's dtype), contiguous: the near pairs' differences
    sq_ptr,  # [N, N] out: squared distances ‖x_i − x_j‖², g's dtype
    near_ptr,  # [N, N] int8 out: 1 where recomputed from x_i − x_j, and on the diagonal
    dsum_ptr,  # [N, cdiv(N, BLOCK_J)] out: Σ_j d_ij over the block, off the diagonal
    N,
    D,
    factor,  # near: !(sq >= factor · (G_ii + G_jj))
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    jb = tl.program_id(1)
    js = jb * BLOCK_J + tl.arange(0, BLOCK_J).to(tl.int64)
    im = rows < N
    jm = js < N
    m = im[:, None] & jm[None, :]
    diag = rows[:, None] == js[None, :]
    g_ii = tl.load(g_ptr + rows * (N + 1), mask=im, other=0.0)
    g_jj = tl.load(g_ptr + js * (N + 1), mask=jm, other=0.0)
    g_ij = tl.load(g_ptr + rows[:, None] * N + js[None, :], mask=m, other=0.0)
    norms = g_ii[:, None] + g_jj[None, :]
    sq = norms - 2.0 * g_ij
    # NaN compares false: a NaN pair is near, and its recomputation stays NaN
    near = (~(sq >= factor * norms)) & m & ~diag
    if tl.max(tl.max(near.to(tl.int32), 1), 0) > 0:
        # ‖x_i − x_j‖² from the rows, one row of the block at a time (the far
        # lanes of the row are dropped)
        for r in range(0, BLOCK_I):
            i = tl.program_id(0).to(tl.int64) * BLOCK_I + r
            if i < N:
                direct = tl.zeros([BLOCK_J], dtype=sq.dtype)
                for d0 in range(0, D, BLOCK_D):
                    ds = d0 + tl.arange(0, BLOCK_D)
                    dm = ds < D
                    xi = tl.load(x_ptr + i * D + ds, mask=dm, other=0.0)
                    xj = tl.load(
                        x_ptr + js[:, None] * D + ds[None, :], mask=jm[:, None] & dm[None, :], other=0.0
                    )
                    diff = xj - xi[None, :]
                    direct += tl.sum(diff * diff, 1)
                sq = tl.where(near & (rows == i)[:, None], direct[None, :], sq)
    tl.store(sq_ptr + rows[:, None] * N + js[None, :], sq, mask=m)
    tl.store(near_ptr + rows[:, None] * N + js[None, :], (near | diag).to(tl.int8), mask=m)
    d = tl.where(diag | ~m, 0.0, tl.sqrt(max_nan(sq, 1e-12)))
    tl.store(dsum_ptr + rows * tl.num_programs(1) + jb, tl.sum(d, 1), mask=im)


@triton.jit
def _distance_loss_kernel(
    sq_s_ptr,  # [N, N] float32 student squared distances
    sq_t_ptr,  # [N, N] float32 teacher squared distances
    loss_ptr,  # [N] float32 out: Σ_j smooth_l1(ρ_ij)
    qd_ptr,  # [N] float32 out: Σ_j q_ij d_s,ij
    inv_mean_ptr,  # [2] float64: 1 / μ_s, 1 / μ_t (μ: mean off-diagonal distance)
    N,
    inv_n2,  # 1 / N²
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    inv_s = tl.load(inv_mean_ptr).to(tl.float32)
    inv_t = tl.load(inv_mean_ptr + 1).to(tl.float32)
    loss = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    qd = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    for j0 in range(0, N, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        d_s, _ = _tile_distances(sq_s_ptr, rows, js, N)
        d_t, _ = _tile_distances(sq_t_ptr, rows, js, N)
        # ρ = d_s/μ_s − d_t/μ_t;  q = ∂(mean smooth_l1)/∂ρ
        rho = d_s * inv_s - d_t * inv_t
        loss += _smooth_l1(rho)
        qd += _clamp_unit(rho) * inv_n2 * d_s
    tl.store(loss_ptr + rows, tl.sum(loss, 1), mask=rows < N)
    tl.store(qd_ptr + rows, tl.sum(qd, 1), mask=rows < N)


@triton.jit
def _distance_coef_kernel(
    sq_s_ptr,  # [N, N] float32 student squared distances
    sq_t_ptr,  # [N, N] float32 teacher squared distances
    near_ptr,  # [N, N] int8 student near pairs (and diagonal)
    far_ptr,  # [N, N] float32 out: C_ij of the far pairs, 0 elsewhere (may alias sq_t_ptr)
    close_ptr,  # [N, N] float32 out: C_ij of the near pairs off the diagonal, 0 elsewhere
    csum_ptr,  # [N] float32 out: Σ_j far C_ij
    ncount_ptr,  # [N] int32 out: number of near pairs in row i, off the diagonal
    inv_mean_ptr,  # [2] float64: 1 / μ_s, 1 / μ_t
    shift_ptr,  # [] float64: Q / (μ_s · N (N − 1)), Q = Σ q d_s: the mean's share of ∂loss/∂ρ
    N,
    inv_n2,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    inv_s = tl.load(inv_mean_ptr).to(tl.float32)
    inv_t = tl.load(inv_mean_ptr + 1).to(tl.float32)
    shift = tl.load(shift_ptr).to(tl.float32)
    csum = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    count = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.int32)
    for j0 in range(0, N, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        m = (rows < N)[:, None] & (js < N)[None, :]
        at = rows[:, None] * N + js[None, :]
        off_diag = m & (rows[:, None] != js[None, :])
        d_s, sq_s = _tile_distances(sq_s_ptr, rows, js, N)
        d_t, _ = _tile_distances(sq_t_ptr, rows, js, N)
        q = _clamp_unit(d_s * inv_s - d_t * inv_t) * inv_n2
        # ∂loss/∂d_ij = (q − shift)/μ_s; x_i's gradient Σ_j C_ij (x_i − x_j) with
        # C = 2 ∂loss/∂d / d, 0 where the 1e-12 clamp holds d (and on the diagonal)
        live = (sq_s > 1e-12) & off_diag
        c = tl.where(live, 2.0 * inv_s * (q - shift) / tl.where(live, d_s, 1.0), 0.0)
        near = (tl.load(near_ptr + at, mask=m, other=0) != 0) & off_diag
        far_c = tl.where(near, 0.0, c)
        # (each program reads its rows of sq_t before it overwrites them)
        tl.store(far_ptr + at, far_c, mask=m)
        tl.store(close_ptr + at, tl.where(near, c, 0.0), mask=m)
        csum += far_c
        count += near.to(tl.int32)
    tl.store(csum_ptr + rows, tl.sum(csum, 1), mask=rows < N)
    tl.store(ncount_ptr + rows, tl.sum(count, 1), mask=rows < N)


@triton.jit
def _near_grad_kernel(
    close_ptr,  # [N, N] float32 C_ij of the near pairs, 0 elsewhere
    ncount_ptr,  # [N] int32 near pairs per row
    x_ptr,  # [N, D] float32 rows, contiguous
    grad_ptr,  # [N, D] float32 out: Σ_j close_ij (x_i − x_j)
    N,
    D,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    dm = ds < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    if tl.load(ncount_ptr + i) > 0:
        xi = tl.load(x_ptr + i * D + ds, mask=dm, other=0.0)
        for j0 in range(0, N, BLOCK_J):
            js = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
            jm = js < N
            c = tl.load(close_ptr + i * N + js, mask=jm, other=0.0)
            # NaN != 0: a NaN coefficient is applied
            if tl.max((c != 0.0).to(tl.int32), 0) > 0:
                xj = tl.load(x_ptr + js[:, None] * D + ds[None, :], mask=jm[:, None] & dm[None, :], other=0.0)
                acc += tl.sum(c[:, None] * (xi[None, :] - xj), 0)
    tl.store(grad_ptr + i * D + ds, acc, mask=dm)


@triton.jit
def _angle_numerator(gjk_hi, gjk_lo, gik_hi, gik_lo, gij_hi, gij_lo, gii_hi, gii_lo, k_nearer):
    # (x_j − x_i)·(x_k − x_i) = G_jk − G_ik − G_ij + G_ii on a [j, k] tile. The
    # hi terms are paired so that each difference cancels exactly where it
    # cancels at all (Sterbenz): (G_jk − G_ik) + (G_ii − G_ij) when x_j is the
    # nearer of x_j, x_k to x_i, (G_jk − G_ij) + (G_ii − G_ik) when x_k is;
    # the small lo halves are added last (rkd_kernel.cpp's numerator()).
    j_first = (gjk_hi - gik_hi[None, :]) + (gii_hi - gij_hi)[:, None]
    k_first = (gjk_hi - gij_hi[:, None]) + (gii_hi - gik_hi)[None, :]
    hi = tl.where(k_nearer, k_first, j_first)
    lo = (gjk_lo - gik_lo[None, :]) + (gii_lo - gij_lo)[:, None]
    return hi + lo


@triton.jit
def _anchor_numerator(hi, lo, hi_ptr, lo_ptr, row, i, js, jm, ks, km, u_j, u_k):
    # Anchor i's numerators on the [js, ks] tile whose Gram halves are hi, lo:
    # rows i of the halves at js and ks, G_ii, and which of j, k is nearer to i.
    return _angle_numerator(
        hi, lo,
        tl.load(hi_ptr + row + ks, mask=km, other=0.0), tl.load(lo_ptr + row + ks, mask=km, other=0.0),
        tl.load(hi_ptr + row + js, mask=jm, other=0.0), tl.load(lo_ptr + row + js, mask=jm, other=0.0),
        tl.load(hi_ptr + row + i), tl.load(lo_ptr + row + i),
        tl.abs(u_k)[None, :] > tl.abs(u_j)[:, None],
    )


@triton.jit
def _rkd_angle_kernel(
    gs_hi_ptr,  # [N, N] float32 hi half of the student's float64 Gram matrix (centred rows)
    gs_lo_ptr,  # [N, N] float32 lo half: float32(G − hi)
    us_ptr,  # [N, N] float32 signed inverse distances (0 diagonal, −1e12 coinciding)
    gt_hi_ptr,  # [N, N] teacher, likewise
    gt_lo_ptr,
    ut_ptr,
    d_part_ptr,  # [P, N, N] float32 out: Σ_{i in chunk p} W^(i) (GRAD)
    row_ptr,  # [N, N] float32, zeroed: R[i, j] = Σ_k W^(i)_jk (GRAD)
    ang_ptr,  # [N, N] float32, zeroed: S[i, j] = Σ_k g_ijk a_ijk (GRAD)
    loss_ptr,  # [P, cdiv(N, BLOCK_J)] float64 out: partial Σ smooth_l1
    N,
    anchors,  # anchors per chunk
    GRAD: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    jb = tl.program_id(0)
    p = tl.program_id(1)
    js = jb * BLOCK_J + tl.arange(0, BLOCK_J).to(tl.int64)
    jm = js < N
    first = p.to(tl.int64) * anchors  # int64 loop variable: row offsets i · N
    last = tl.minimum(first + anchors, N)
    loss = tl.zeros([1], dtype=tl.float64)
    for k0 in range(0, N, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        km = ks < N
        tile = js[:, None] * N + ks[None, :]
        tm = jm[:, None] & km[None, :]
        # Lanes past N load zeros, so u = 0 there: a = 0 on both sides, nothing added.
        s_hi = tl.load(gs_hi_ptr + tile, mask=tm, other=0.0)
        s_lo = tl.load(gs_lo_ptr + tile, mask=tm, other=0.0)
        t_hi = tl.load(gt_hi_ptr + tile, mask=tm, other=0.0)
        t_lo = tl.load(gt_lo_ptr + tile, mask=tm, other=0.0)
        tile_loss = tl.zeros([BLOCK_J, BLOCK_K], dtype=tl.float32)
        d_acc = tl.zeros([BLOCK_J, BLOCK_K], dtype=tl.float32)
        for i in range(first, last):
            row = i * N
            us_j = tl.load(us_ptr + row + js, mask=jm, other=0.0)
            us_k = tl.load(us_ptr + row + ks, mask=km, other=0.0)
            ut_j = tl.load(ut_ptr + row + js, mask=jm, other=0.0)
            ut_k = tl.load(ut_ptr + row + ks, mask=km, other=0.0)
            num_s = _anchor_numerator(s_hi, s_lo, gs_hi_ptr, gs_lo_ptr, row, i, js, jm, ks, km, us_j, us_k)
            num_t = _anchor_numerator(t_hi, t_lo, gt_hi_ptr, gt_lo_ptr, row, i, js, jm, ks, km, ut_j, ut_k)
            # a_ijk = num · u_ij · u_ik (0 where j or k coincides with i, or is i)
            a_s = num_s * _positive(us_j)[:, None] * _positive(us_k)[None, :]
            a_t = num_t * _positive(ut_j)[:, None] * _positive(ut_k)[None, :]
            diff = a_s - a_t
            tile_loss += _smooth_l1(diff)
            if GRAD:
                g = _clamp_unit(diff)
                # W = ∂/∂num = g |u_ij| |u_ik|: a coinciding j (or k) keeps F.normalize's
                # 1/eps derivative through the other factor; when both coincide the
                # term has no derivative at all
                w = g * tl.abs(us_j)[:, None] * tl.abs(us_k)[None, :]
                w = tl.where((us_j < 0.0)[:, None] & (us_k < 0.0)[None, :], 0.0, w)
                d_acc += w
                # rows j of anchor i's R and S belong to this program alone; the
                # barrier orders one k-block's store before the next one's load
                r_at = row_ptr + row + js
                tl.store(r_at, tl.load(r_at, mask=jm, other=0.0) + tl.sum(w, 1), mask=jm)
                s_at = ang_ptr + row + js
                tl.store(s_at, tl.load(s_at, mask=jm, other=0.0) + tl.sum(g * a_s, 1), mask=jm)
                tl.debug_barrier()
        loss += tl.sum(tl.sum(tile_loss, 1), 0).to(tl.float64)
        if GRAD:
            tl.store(d_part_ptr + p.to(tl.int64) * N * N + tile, d_acc, mask=tm)
    tl.store(loss_ptr + p * tl.num_programs(0) + jb + tl.arange(0, 1), loss)




def pair_config(n: int, d: int) -> tuple[int, int, int, int]:
    """(BLOCK_I, BLOCK_J, BLOCK_D, num_warps) of _pair_sq_kernel.

    On a GPU [8, 128] Gram tiles (8 values per thread at 4 warps); a block
    with a near pair recomputes its rows one at a time from [128, 16]
    difference tiles (ptxas, sm_90: 125 registers, no spills; [128, 32] needs
    255). Under the interpreter, whose cost is per operation and per program,
    the blocks are as wide as the problem (up to 32 × 32 × 128).
    """
    if INTERPRETED:
        block = min(triton.next_power_of_2(max(n, 1)), 32)
        return block, block, min(triton.next_power_of_2(max(d, 1)), 128), 4
    return 8, 128, 16, 4


# (BLOCK_I, BLOCK_J, num_warps) of the distance term's row passes.
row_config = square_row_config


def near_grad_config(n: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_J, BLOCK_D, num_warps) of _near_grad_kernel: [64, 64] difference tiles on a GPU."""
    if INTERPRETED:
        return min(triton.next_power_of_2(max(n, 1)), 32), min(triton.next_power_of_2(max(d, 1)), 128), 4
    return 64, min(triton.next_power_of_2(max(d, 1)), 64), 4


def angle_config(n: int) -> tuple[int, int, int]:
    """(BLOCK_J, BLOCK_K, num_warps) of _rkd_angle_kernel.

    Four float32 [32, 64] Gram tiles, the dG and loss accumulators stay in
    registers across the anchor loop: 6 × 8 values per thread at 8 warps,
    with the per-anchor temporaries of the same shape 206 registers and no
    spills (ptxas, sm_90); at 4 warps, or [64, 64] at 8, it spills.
    """
    if INTERPRETED:
        block = min(triton.next_power_of_2(max(n, 1)), 32)
        return block, block, 4
    return 32, 64, 8


def anchor_chunks(n: int, j_blocks: int) -> int:
    """Number of anchor chunks P: enough programs to fill a GPU (about 256 with
    the j-blocks), at most 8 partial dG copies, within _MAX_PARTIAL_ELEMENTS;
    two under the interpreter (the partial sums still exercised)."""
    want = 2 if INTERPRETED else triton.cdiv(256, j_blocks)
    fits = max(1, _MAX_PARTIAL_ELEMENTS // (n * n))
    return max(1, min(want, fits, _MAX_ANCHOR_CHUNKS, n))


def _single_sample(student, teacher, student_grad):
    # N = 1: no pair, loss 0 and gradient 0; a NaN (or inf) input still gives NaN.
    loss = (student.float().sum() + teacher.float().sum()) * 0.0
    return loss, torch.zeros_like(student) if student_grad else student.new_zeros((0, 0))


def _rkd_launcher(term):
    """The launcher of an RKD term that ``term(student, teacher, student_grad)``
    computes for N ≥ 2: device-guarded, the arguments checked
    (``_common.check_embedding_pair``, the relational launchers' contract) and
    one sample, which has no pair, answered by ``_single_sample``."""

    @guard_device
    @functools.wraps(term)
    def launcher(student: torch.Tensor, teacher: torch.Tensor, student_grad: bool):
        check_embedding_pair(student, teacher, student_grad)
        if student.shape[0] == 1:
            return _single_sample(student, teacher, student_grad)
        return term(student, teacher, student_grad)

    return launcher


def _pair_sq(gram: torch.Tensor, x: torch.Tensor, factor: float):
    """(sq, near, Σ d) of the rows ``x`` ``(N, D)``; ``gram``: of the centred rows, same dtype.

    ``sq`` ``(N, N)`` in gram's dtype, ``near`` ``(N, N)`` int8, and Σ d a ``()``
    float64 tensor on the device: reading it on the host would synchronise.
    """
    n, d = x.shape
    block_i, block_j, block_d, num_warps = pair_config(n, d)
    j_blocks = triton.cdiv(n, block_j)
    sq = torch.empty_like(gram)
    near = torch.empty((n, n), dtype=torch.int8, device=x.device)
    dsum = torch.empty((n, j_blocks), dtype=gram.dtype, device=x.device)
    _pair_sq_kernel[(triton.cdiv(n, block_i), j_blocks)](
        gram, x, sq, near, dsum, n, d, factor,
        BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_D=block_d, num_warps=num_warps,
    )
    return sq, near, dsum.sum(dtype=torch.float64)


def _centred_gram(x: torch.Tensor) -> torch.Tensor:
    xc = x - x.mean(0, keepdim=True)
    return xc, torch.mm(xc, xc.t())


@_rkd_launcher
def rkd_distance_forward(
    student: torch.Tensor, teacher: torch.Tensor, student_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """RKD distance loss and the student's gradient; the contract of ``fastkd::rkd_distance_forward``.

    ``student``, ``teacher``, ``student_grad`` and the results: the relational
    launchers' contract (``_common.check_embedding_pair``).
    """
    n = student.shape[0]
    xs = student.float().contiguous()
    xt = teacher.float().contiguous()
    xs_c, gram_s = _centred_gram(xs)
    _, gram_t = _centred_gram(xt)
    sq_s, near_s, sum_s = _pair_sq(gram_s, xs, _DISTANCE_FACTOR)
    sq_t, _, sum_t = _pair_sq(gram_t, xt, _DISTANCE_FACTOR)
    del gram_s, gram_t
    pairs = float(n) * float(n - 1)
    # 1 / μ from the float64 totals, on the device: the kernels read them
    # (pairs / Σ d in one division, as a tensor divided by a tensor)
    totals = torch.stack((sum_s, sum_t))
    inv_mean = torch.full_like(totals, pairs).div_(totals)
    inv_n2 = 1.0 / (float(n) * float(n))
    block_i, block_j, num_warps = row_config(n)
    row_grid = (triton.cdiv(n, block_i),)
    loss_rows = torch.empty(n, dtype=torch.float32, device=student.device)
    qd_rows = torch.empty(n, dtype=torch.float32, device=student.device)
    _distance_loss_kernel[row_grid](
        sq_s, sq_t, loss_rows, qd_rows, inv_mean, n, inv_n2,
        BLOCK_I=block_i, BLOCK_J=block_j, num_warps=num_warps,
    )
    loss = (loss_rows.sum(dtype=torch.float64) * inv_n2).float()
    if not student_grad:
        return loss, student.new_zeros((0, 0))

    shift = qd_rows.sum(dtype=torch.float64) * inv_mean[0] / pairs
    far = sq_t  # each program reads its rows of sq_t, then overwrites them
    close = torch.empty_like(sq_s)
    csum = torch.empty(n, dtype=torch.float32, device=student.device)
    ncount = torch.empty(n, dtype=torch.int32, device=student.device)
    _distance_coef_kernel[row_grid](
        sq_s, sq_t, near_s, far, close, csum, ncount, inv_mean, shift, n, inv_n2,
        BLOCK_I=block_i, BLOCK_J=block_j, num_warps=num_warps,
    )
    d = xs.shape[1]
    block_j, block_d, pair_warps = near_grad_config(n, d)
    grad = torch.empty_like(xs)
    _near_grad_kernel[(n, triton.cdiv(d, block_d))](
        close, ncount, xs, grad, n, d, BLOCK_J=block_j, BLOCK_D=block_d, num_warps=pair_warps
    )
    # far pairs: Σ_j C_ij (x_i − x_j) = x_i Σ_j C_ij − (C x)_i, on the centred rows
    grad.add_(xs_c * csum[:, None]).sub_(torch.mm(far, xs_c))
    return loss, grad.to(student.dtype)


def _angle_side(x: torch.Tensor):
    """One side's kernel inputs (rkd.cpp's angle_side): the centred rows
    in float64, their Gram matrix split into float32 hi + lo halves, and the
    signed inverse distances u ([N, N] float32: 1 / max(e_ij, 1e-12), −1e12
    for distinct samples that coincide, 0 on the diagonal)."""
    x64 = x.double().contiguous()
    centred, gram = _centred_gram(x64)
    hi = gram.float()
    lo = (gram - hi.double()).float()
    sq, _, _ = _pair_sq(gram, x64, _ANGLE_FACTOR)
    del gram
    sq.clamp_(min=0.0)  # NaN stays NaN
    u = torch.where(sq == 0, -1.0 / _NORMALIZE_EPS, 1.0 / sq.sqrt().clamp(min=_NORMALIZE_EPS))
    u.fill_diagonal_(0.0)
    return centred, hi, lo, u.float()


def _angle_gradient(d_gram, row_sums, ang_sums, u, centred, n):
    """dX of the angle loss from the kernel's sums, in float64 (rkd.cpp's rkd_angle_impl).

    ∂loss/∂G from the numerators G_jk − G_ij − G_ik + G_ii, summed over the
    anchors: dG = Σ_i W^(i) − 2 R + diag(rowsum R); dX = M X with
    M = dG + dGᵀ, whose rows sum to 0, written Σ_m M_km (x_m − x_k) so that
    the large weights of nearby samples multiply differences. The normalisers:
    ∂loss/∂‖x_i − x_j‖² = −S_ij u_ij² where e_ij > eps, both (i, j) and (j, i).
    """
    d_g = d_gram.double()
    r = row_sums.double()
    d_g.sub_(r, alpha=2.0)
    d_g.diagonal().add_(r.sum(1))
    del r
    d_g.add_(d_g.t().clone())
    grad = torch.mm(d_g, centred).sub_(centred * d_g.sum(1, keepdim=True))
    del d_g
    u64 = u.double()
    live = (u64 > 0) & (u64 < 1.0 / _NORMALIZE_EPS)
    c = ang_sums.double().mul_(u64.square()).neg_().mul_(live)
    del u64, live
    c.add_(c.t().clone())
    grad.addcmul_(centred, c.sum(1, keepdim=True), value=2.0).sub_(torch.mm(c, centred), alpha=2.0)
    grad.mul_(1.0 / (float(n) ** 3))
    # x enters through its centred copy: project out the mean (a no-op up to rounding)
    return grad.sub_(grad.mean(0, keepdim=True))


@_rkd_launcher
def rkd_angle_forward(
    student: torch.Tensor, teacher: torch.Tensor, student_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """RKD angle loss and the student's gradient; the contract of ``fastkd::rkd_angle_forward``.

    ``student``, ``teacher``, ``student_grad`` and the results: the relational
    launchers' contract (``_common.check_embedding_pair``).
    """
    n = student.shape[0]
    centred, gs_hi, gs_lo, us = _angle_side(student)
    _, gt_hi, gt_lo, ut = _angle_side(teacher)
    block_j, block_k, num_warps = angle_config(n)
    j_blocks = triton.cdiv(n, block_j)
    chunks = anchor_chunks(n, j_blocks)
    anchors = triton.cdiv(n, chunks)
    chunks = triton.cdiv(n, anchors)
    loss_parts = torch.empty((chunks, j_blocks), dtype=torch.float64, device=student.device)
    if student_grad:
        d_part = torch.empty((chunks, n, n), dtype=torch.float32, device=student.device)
        row_sums = torch.zeros((n, n), dtype=torch.float32, device=student.device)
        ang_sums = torch.zeros((n, n), dtype=torch.float32, device=student.device)
    else:
        d_part = row_sums = ang_sums = None
    _rkd_angle_kernel[(j_blocks, chunks)](
        gs_hi, gs_lo, us, gt_hi, gt_lo, ut, d_part, row_sums, ang_sums, loss_parts, n, anchors,
        GRAD=student_grad, BLOCK_J=block_j, BLOCK_K=block_k, num_warps=num_warps,
    )
    loss = (loss_parts.sum() / (float(n) ** 3)).float()
    if not student_grad:
        return loss, student.new_zeros((0, 0))
    del gs_hi, gs_lo, gt_hi, gt_lo, ut
    d_gram = d_part.sum(0) if chunks > 1 else d_part[0]
    del d_part
    grad = _angle_gradient(d_gram, row_sums, ang_sums, us, centred, n)
    return loss, grad.to(student.dtype)
