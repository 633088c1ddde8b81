"""CRD's NCE loss (docs/spec.md §4, RepDistiller ``CRDLoss``) in Triton, the ``triton``
backend of ``fastkd.crd_nce``.

Same contract as the C++ op ``fastkd::crd_nce_forward`` (csrc/fastkd.cpp),
whose CPU implementation (csrc/cpu/crd.cpp) derives the terms. For sample b
and its K+1 bank indices j (column 0 the positive):

  s_bj = bank[idx_bj] · v_b,   P_bj = exp(s_bj / T) / Z,   c = K / n_data,  c' = c + 1e-7
  row_loss_b = log1p(c' / P_b0) + Σ_{k≥1} log1p(P_bk / c') + K log(c' / c)
  d row_loss_b / d v_b = Σ_j g_bj bank[idx_bj],
      g_b0 = −c' / (T (P_b0 + c')),   g_bk = P_bk / (T (P_bk + c'))

One program per (sample, slice of its columns): it gathers BLOCK_K bank rows
at a time into a BLOCK_K × BLOCK_D register tile, takes the dot products with
v_b, the NCE terms and their gradient weights, and adds g · rows to the
gradient while the tile is in registers: the (B, K+1, D) gather of the
reference never exists. A batch has few samples (64–256) against K+1 =
16385 columns, so the columns are split over SPLITS programs per sample to
fill the GPU; each writes a partial loss and a partial gradient, summed by
torch in a fixed order (deterministic, no atomics). Memory besides the
inputs: SPLITS × B × (D + 1) partials.

Memory traffic floor: the gather, B·(K+1)·D·4 bytes of random bank rows
(plus the indices); one pass (two when Z is set from the batch: the first
only sums exp(s / T)). The arithmetic is 2·B·(K+1)·D multiply-adds per pass
plus the gradient's as many: far below the gather's bandwidth cost.

float32 only (the op's dtypes are float32 / float64, and the GPU kernels do
not compute in double): dot products, exp and log1p in float32; the loss
and the exp sum for Z are accumulated in float64, as on CPU.

Indices: a bank index outside [0, n_data) gathers row 0 instead and makes
its score NaN, so its sample's loss and gradient are NaN (and Z, when it is
set from the batch) and nothing outside the bank is read. The launcher also
refuses such indices (ValueError) where ``fastkd._validate.values_checked_on_host``
says so: for CPU tensors, or on a GPU with FASTKD_CHECK_DEVICE_VALUES=1
(elsewhere the check would be a device → host synchronisation on every call).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastkd import _validate

from ._common import (
    DEVICE_TYPE,  # noqa: F401  (re-exported: callers ask a module where its kernels run)
    check_positive,
    check_tensor,
    guard_device,
    log1p,
)

__all__ = ["MAX_FEAT_DIM", "crd_nce_forward"]

# RepDistiller's ContrastLoss eps, in the denominators P + c'.
NCE_EPS = 1e-7
# One program holds a BLOCK_K × BLOCK_D tile of gathered rows and a BLOCK_D
# gradient in registers; beyond this feat_dim (BLOCK_K = 1, 8 warps: 32 + 32
# registers per thread) the rows would not fit.
MAX_FEAT_DIM = 8192
# Gathered elements per loop iteration: 32 per thread at 4 warps.
_TILE = 4096
# Programs to aim for when splitting the columns: several per SM on a 132-SM GPU.
_TARGET_PROGRAMS = 1024


@triton.jit
def _gather_scores(
    v, idx_ptr, bank_ptr, b, cols, col_ok, d, d_ok, n_data,
    stride_ib, stride_ik, stride_bank_n, stride_bank_d,
):
    # the BLOCK_K gathered bank rows of sample b (zeros past the last column
    # and past D) and their dot products s_bj with v_b; an index outside
    # [0, n_data) reads row 0 and gets a NaN score
    idx = tl.load(idx_ptr + b * stride_ib + cols * stride_ik, mask=col_ok, other=0)
    in_bank = (idx >= 0) & (idx < n_data)
    idx = tl.where(in_bank, idx, 0)
    rows = tl.load(
        bank_ptr + idx[:, None] * stride_bank_n + d[None, :] * stride_bank_d,
        mask=col_ok[:, None] & d_ok[None, :], other=0.0,
    ).to(tl.float32)
    return rows, tl.where(in_bank, tl.sum(rows * v[None, :], 1), float("nan"))


@triton.jit
def _column_range(cols_total, COLS_PER_SPLIT: tl.constexpr):
    lo = tl.program_id(1) * COLS_PER_SPLIT
    return lo, tl.minimum(lo + COLS_PER_SPLIT, cols_total)


@triton.jit
def _crd_exp_sum_kernel(
    v_ptr,  # [B, D] float32 embeddings, strides (stride_vb, stride_vd)
    bank_ptr,  # [n_data, D] float32 memory bank, strides (stride_bank_n, stride_bank_d)
    idx_ptr,  # [B, K+1] int64 bank indices (outside [0, n_data): NaN), strides (stride_ib, stride_ik)
    z_ptr,  # [] float32 the Z passed in: the sum is needed only where it is <= 0
    partial_ptr,  # [SPLITS, B] float64: Σ_j exp(s_bj / T) over this program's columns (0 if Z is given)
    B, D, cols_total, n_data,
    stride_vb, stride_vd, stride_bank_n, stride_bank_d, stride_ib, stride_ik,
    inv_temperature,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, COLS_PER_SPLIT: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    v = tl.load(v_ptr + b * stride_vb + d * stride_vd, mask=d_ok, other=0.0).to(tl.float32)
    lo, hi = _column_range(cols_total, COLS_PER_SPLIT)
    # a given Z (> 0, or NaN, which the loss then carries) needs no sum: no
    # column is gathered. Decided here, on the device, so that the launcher
    # never reads Z on the host.
    hi = tl.where(tl.load(z_ptr) <= 0.0, hi, lo)
    total = tl.zeros([BLOCK_K], tl.float64)
    for start in range(lo, hi, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K).to(tl.int64)
        col_ok = cols < hi
        _, s = _gather_scores(
            v, idx_ptr, bank_ptr, b, cols, col_ok, d, d_ok, n_data,
            stride_ib, stride_ik, stride_bank_n, stride_bank_d,
        )
        total += tl.where(col_ok, tl.exp(s * inv_temperature), 0.0).to(tl.float64)
    tl.store(partial_ptr + tl.program_id(1).to(tl.int64) * B + b, tl.sum(total, 0))


@triton.jit
def _crd_nce_kernel(
    v_ptr,  # [B, D] float32 embeddings, strides (stride_vb, stride_vd)
    bank_ptr,  # [n_data, D] float32 memory bank, strides (stride_bank_n, stride_bank_d)
    idx_ptr,  # [B, K+1] int64 bank indices (outside [0, n_data): NaN), strides (stride_ib, stride_ik)
    z_ptr,  # [] float32 normalisation constant Z used
    loss_ptr,  # [SPLITS, B] float64 partial row losses (without the constant K log(c'/c))
    grad_ptr,  # [SPLITS, B, D] float32 partial d row_loss_b / d v_b (None unless STUDENT_GRAD)
    B, D, cols_total, n_data,
    stride_vb, stride_vd, stride_bank_n, stride_bank_d, stride_ib, stride_ik,
    inv_temperature,  # 1 / T
    c_eps,  # c' = K / n_data + 1e-7
    inv_c_eps,  # 1 / c'
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, COLS_PER_SPLIT: tl.constexpr, STUDENT_GRAD: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    v = tl.load(v_ptr + b * stride_vb + d * stride_vd, mask=d_ok, other=0.0).to(tl.float32)
    inv_z = 1.0 / tl.load(z_ptr).to(tl.float32)
    lo, hi = _column_range(cols_total, COLS_PER_SPLIT)
    loss = tl.zeros([BLOCK_K], tl.float64)
    grad = tl.zeros([BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K).to(tl.int64)
        col_ok = cols < hi
        rows, s = _gather_scores(
            v, idx_ptr, bank_ptr, b, cols, col_ok, d, d_ok, n_data,
            stride_ib, stride_ik, stride_bank_n, stride_bank_d,
        )
        # P = exp(s / T) / Z
        p = tl.exp(s * inv_temperature) * inv_z
        denom = p + c_eps
        positive = cols == 0
        # −log(P0 / (P0 + c')) = log1p(c' / P0);  −log(c / (Pk + c')) − log(c'/c) = log1p(Pk / c')
        # P0 = inf (an infinite score): the ratio is inf / inf, NaN, where
        # log1p(c' / P0) would give 0
        term_positive = tl.where(p == float("inf"), float("nan"), log1p(c_eps / p))
        term = tl.where(positive, term_positive, log1p(p * inv_c_eps))
        loss += tl.where(col_ok, term, 0.0).to(tl.float64)
        if STUDENT_GRAD:
            # d/ds: −c' / (T (P0 + c')) for the positive, Pk / (T (Pk + c')) for a negative
            g = tl.where(positive, -c_eps / denom, p / denom) * inv_temperature
            g = tl.where(col_ok, g, 0.0)
            grad += tl.sum(g[:, None] * rows, 0)
    tl.store(loss_ptr + split * B + b, tl.sum(loss, 0))
    if STUDENT_GRAD:
        tl.store(grad_ptr + (split * B + b) * D + d, grad, mask=d_ok)




def launch_config(batch: int, cols: int, dim: int) -> dict:
    """BLOCK_D (D rounded up to a power of two), BLOCK_K (rows gathered per
    iteration: a _TILE-element tile), SPLITS (programs per sample, so that
    about _TARGET_PROGRAMS run; each gets whole BLOCK_K blocks of columns)
    and num_warps (8 for the widest rows, whose tile exceeds _TILE)."""
    block_d = triton.next_power_of_2(max(dim, 1))
    block_k = max(1, min(triton.next_power_of_2(max(cols, 1)), _TILE // block_d))
    blocks = triton.cdiv(cols, block_k)
    splits = max(1, min(blocks, triton.cdiv(_TARGET_PROGRAMS, max(batch, 1))))
    return {
        "BLOCK_K": block_k,
        "BLOCK_D": block_d,
        "SPLITS": splits,
        "num_warps": 4 if block_k * block_d <= _TILE else 8,
    }


def _check_args(v, bank, contrast_idx, z, inv_temperature, student_grad) -> None:
    """The checks of csrc/cpu/crd.cpp's check_crd_args as ValueError, float32 only."""
    for name, x in (("v", v), ("bank", bank), ("contrast_idx", contrast_idx)):
        check_tensor(name, x, 2, dtypes=None)
    if v.dtype != torch.float32 or bank.dtype != torch.float32:
        raise ValueError(f"v and bank must be float32 for triton, got {v.dtype} and {bank.dtype}")
    if bank.device != v.device or contrast_idx.device != v.device:
        raise ValueError(f"v ({v.device}), bank ({bank.device}) and contrast_idx ({contrast_idx.device}) "
                         "must share a device")
    if bank.shape[1] != v.shape[1]:
        raise ValueError(f"bank and v must have the same feature dim, got {bank.shape[1]} and {v.shape[1]}")
    if bank.shape[0] < 1:
        raise ValueError("bank must have at least one row")
    if v.shape[1] > MAX_FEAT_DIM:
        raise ValueError(f"feat_dim must be <= {MAX_FEAT_DIM} for triton, got {v.shape[1]}")
    if contrast_idx.dtype != torch.int64:
        raise ValueError(f"contrast_idx must be int64, got {contrast_idx.dtype}")
    if contrast_idx.shape[0] != v.shape[0]:
        raise ValueError(
            f"contrast_idx must have one row per row of v ({v.shape[0]}), got {contrast_idx.shape[0]}"
        )
    if contrast_idx.shape[1] < 1:
        raise ValueError("contrast_idx must have at least one column (the positive)")
    if contrast_idx.numel() and _validate.values_checked_on_host(contrast_idx):
        # on a GPU only when asked for (a device → host sync); the kernels guard anyway
        low, high = (int(x) for x in torch.aminmax(contrast_idx))
        if low < 0 or high >= bank.shape[0]:
            raise ValueError(
                f"contrast_idx must lie in [0, n_data) = [0, {bank.shape[0]}), got values in [{low}, {high}]"
            )
    if not isinstance(z, torch.Tensor) or z.dim() != 0 or not z.dtype.is_floating_point:
        got = f"{z.dtype} of shape {tuple(z.shape)}" if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"z must be a 0-dim floating-point tensor, got {got}")
    if z.device != v.device:
        raise ValueError(f"z ({z.device}) must be on v's device ({v.device})")
    if _validate.values_checked_on_host(z) and not math.isfinite(float(z)):
        raise ValueError(f"z must be finite, got {float(z)}")
    check_positive("inv_temperature", inv_temperature)
    if not isinstance(student_grad, bool):
        raise ValueError(f"student_grad must be a bool, got {type(student_grad).__name__}")


@guard_device
def crd_nce_forward(
    v: torch.Tensor,
    bank: torch.Tensor,
    contrast_idx: torch.Tensor,
    z: torch.Tensor,
    inv_temperature: float,
    student_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One CRD direction's row losses and gradient; the contract of ``fastkd::crd_nce_forward``.

    Args:
        v: ``(B, D)`` float32 embeddings, any strides.
        bank: ``(n_data, D)`` float32 memory bank, any strides.
        contrast_idx: ``(B, K+1)`` int64 bank indices (column 0 the positive),
            in ``[0, n_data)``, any strides (an index outside gives its
            sample a NaN loss and gradient where the launcher does not
            check values: module docstring).
        z: ``()`` floating-point tensor on v's device, the normalisation
            constant ``Z``; ``z <= 0`` sets it from this batch,
            ``Z = mean_bj exp(s_bj / T) · n_data`` (one more gather pass). The
            choice is made on the device: Z is never read on the host (its
            finiteness is checked there only where
            ``fastkd._validate.values_checked_on_host`` says so).
        inv_temperature: ``1 / T``.
        student_grad: whether to compute the gradient.

    Returns:
        ``row_loss`` ``(B,)`` float32; ``grad`` ``(B, D)`` float32
        ``d row_loss_b / d v_b`` (``(0, 0)`` without ``student_grad``); ``z_used``,
        a ``()`` float32 tensor (no host synchronisation).
    """
    _check_args(v, bank, contrast_idx, z, inv_temperature, student_grad)
    batch, dim = v.shape
    n_data, cols = bank.shape[0], contrast_idx.shape[1]
    device = v.device
    grad_shape = (batch, dim) if student_grad else (0, 0)
    z_in = z.to(torch.float32)
    if batch == 0:
        return (torch.empty(0, dtype=torch.float32, device=device),
                torch.empty(grad_shape, dtype=torch.float32, device=device),
                z_in.clone())
    cfg = launch_config(batch, cols, dim)
    splits = cfg["SPLITS"]
    cols_per_split = triton.cdiv(triton.cdiv(cols, cfg["BLOCK_K"]), splits) * cfg["BLOCK_K"]
    splits = triton.cdiv(cols, cols_per_split)  # no empty trailing split
    grid = (batch, splits)
    strides = (v.stride(0), v.stride(1), bank.stride(0), bank.stride(1), contrast_idx.stride(0),
               contrast_idx.stride(1))
    meta = {"BLOCK_K": cfg["BLOCK_K"], "BLOCK_D": cfg["BLOCK_D"], "COLS_PER_SPLIT": cols_per_split,
            "num_warps": cfg["num_warps"]}
    partial = torch.empty((splits, batch), dtype=torch.float64, device=device)
    _crd_exp_sum_kernel[grid](
        v, bank, contrast_idx, z_in, partial, batch, dim, cols, n_data, *strides, float(inv_temperature),
        **meta,
    )
    # Z = mean_bj exp(s_bj / T) · n_data, rounded to float32 once (as on
    # CPU), so that the stored Z reproduces this batch's loss exactly; or
    # the Z passed in (the kernel then summed nothing)
    batch_z = (partial.sum() / (batch * cols) * n_data).to(torch.float32)
    z_used = torch.where(z_in <= 0, batch_z, z_in)

    negatives = cols - 1
    c = negatives / n_data
    c_eps = c + NCE_EPS
    loss_partial = torch.empty((splits, batch), dtype=torch.float64, device=device)
    grad_partial = None
    if student_grad:
        grad_partial = torch.empty((splits, batch, dim), dtype=torch.float32, device=device)
    _crd_nce_kernel[grid](
        v, bank, contrast_idx, z_used, loss_partial, grad_partial, batch, dim, cols, n_data, *strides,
        float(inv_temperature), float(c_eps), float(1.0 / c_eps), STUDENT_GRAD=student_grad, **meta,
    )
    # Σ_k log((P_k + c') / c) = Σ_k log1p(P_k / c') + K log(c' / c)
    shift = negatives * math.log1p(NCE_EPS / c) if negatives > 0 else 0.0
    row_loss = (loss_partial.sum(0) + shift).to(torch.float32)
    no_grad = torch.empty(grad_shape, dtype=torch.float32, device=device)
    grad = grad_partial.sum(0) if student_grad else no_grad
    return row_loss, grad, z_used
