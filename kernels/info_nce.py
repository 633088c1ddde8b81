"""InfoNCE (docs/spec.md §4) in Triton, the ``triton`` backend of ``fastkd.info_nce``.

Same contract as the C++ ops ``fastkd::info_nce_forward`` /
``fastkd::info_nce_backward`` (csrc/fastkd.cpp, csrc/cpu/info_nce.cpp),
flash-attention style: the ``(N, M)`` logits ``q kᵀ / τ`` exist only one
``BLOCK_M × BLOCK_N`` tile at a time, in registers (64 × 64 in the forward
for large batches, see launch_config and backward_blocks).

  forward     one program per block of BLOCK_M query rows; it walks the key
              blocks, computing each logits tile with tl.dot (contracted over
              D in BLOCK_D chunks), keeps the online row max and Σ exp, and
              picks the positive logit (column labels_i) as it passes.
              Writes row_loss_i = lse_i − logit_{i, y_i} and lse_i: O(N).
  backward    G_ij = (softmax_ij − [j = y_i]) · grad_row_loss_i / τ, recomputed
              tile by tile from the saved lse (never stored):
                dq = G k   one program per (query block, BLOCK_DV columns of D),
                           walking the key blocks;
                dk = Gᵀ q  one program per (key block, BLOCK_DV columns of D),
                           walking the query blocks.
              Two kernels instead of atomics: each output element is written
              once, by one program, in a fixed summation order, so the
              gradients are deterministic.

FLOP / memory floor: the forward is 2·N·M·D multiply-adds of tl.dot and
reads q once per program and k once per query block (N/BLOCK_M passes over
k, from L2 while k fits in it); the backward recomputes the logits in both
kernels (2 × 2·N·M·D, times ⌈D / BLOCK_DV⌉ for D wider than one output
chunk) plus 2 × 2·N·M·D for dq and dk. Memory besides the inputs and the
gradients: 8·N bytes (row loss and lse).

Precision: q and k are widened to float32 as they are loaded. float32
inputs use ``input_precision="ieee"`` (true float32 products, parity with
the float64 reference at float32 tolerances); bfloat16 / float16 inputs
use ``"tf32"``: their values are exact in tf32 (8 and 10 mantissa bits), so
the logits are exact products accumulated in float32 on the tensor cores;
only G (a probability difference) is rounded to tf32's 10 bits in the
backward products, a relative 2⁻¹¹, below float16's 2e-3 tolerance. The
interpreter computes every tl.dot in float32 whatever the precision asks.

Labels: a query whose label lies outside [0, M) gets a NaN row loss and a
NaN row of G (so dq's row and every dk entry are NaN); a label is only ever
compared with column indices, never used as an address. The launchers also
refuse such labels (ValueError) where ``fastkd._validate.values_checked_on_host``
says so: for CPU tensors, or on a GPU with FASTKD_CHECK_DEVICE_VALUES=1
(elsewhere the check would be a device → host synchronisation on every call).

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernels run
on CPU tensors, which is how the tests check them without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastkd import _validate

from ._common import (
    DEVICE_TYPE,
    check_pair,
    check_positive,
    check_tensor,
    guard_device,
    stored_dtype,
)

__all__ = ["info_nce_backward", "info_nce_forward"]


@triton.jit
def _load_rows(x_ptr, idx, idx_ok, d, d_ok, stride_n, stride_d):
    # x[idx, d] of an [·, D] matrix (queries or keys, any strides) widened to float32, zeros
    # outside idx_ok × d_ok
    return tl.load(
        x_ptr + idx[:, None] * stride_n + d[None, :] * stride_d,
        mask=idx_ok[:, None] & d_ok[None, :], other=0.0,
    ).to(tl.float32)


@triton.jit
def _store_rows(out_ptr, acc, idx, idx_ok, d, d_ok, D):
    # out[idx, d] = acc (in out's dtype) of a contiguous [·, D] gradient, within idx_ok × d_ok
    tl.store(
        out_ptr + idx[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty),
        mask=idx_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _logits_tile(
    q_ptr, k_ptr, rows, cols, row_ok, col_ok,
    stride_qn, stride_qd, stride_kn, stride_kd, D, inv_temperature,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    # logits_ij = q_i · k_j / τ for a BLOCK_M × BLOCK_N tile; rows / cols past
    # N / M load zeros (their logits are 0 and are masked by the caller).
    dims = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dims
        d_ok = d < D
        q = _load_rows(q_ptr, rows, row_ok, d, d_ok, stride_qn, stride_qd)
        k = _load_rows(k_ptr, cols, col_ok, d, d_ok, stride_kn, stride_kd)
        acc = tl.dot(q, tl.trans(k), acc, input_precision=PRECISION)
    return acc * inv_temperature


@triton.jit
def _logit_gradient(s, lse, scale, labels, cols, col_ok):
    # G_ij = (exp(s_ij − lse_i) − [j = y_i]) · scale_i, with scale_i = grad_row_loss_i / τ;
    # columns past M are 0.
    p = tl.where(col_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
    return (p - tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)) * scale[:, None]


@triton.jit
def _gradient_rows(labels_ptr, lse_ptr, grad_ptr, rows, row_ok, M, inv_temperature):
    # What _logit_gradient needs of a block of rows: (labels, lse, scale), with
    # scale_i = grad_row_loss_i / τ: 0 for rows past N (their G is 0), NaN for
    # a row whose label lies outside [0, M) (its G row is NaN)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(grad_ptr + rows, mask=row_ok, other=0.0) * inv_temperature
    return labels, lse, tl.where(row_ok & ((labels < 0) | (labels >= M)), float("nan"), scale)


@triton.jit
def _info_nce_fwd_kernel(
    q_ptr,  # [N, D] queries, strides (stride_qn, stride_qd)
    k_ptr,  # [M, D] keys, strides (stride_kn, stride_kd)
    labels_ptr,  # [N] int64, the positive key of each query (outside [0, M): NaN row loss)
    loss_ptr,  # [N] float32 row loss lse_i − logit_{i, y_i}
    lse_ptr,  # [N] float32 row log-sum-exp
    N, M, D,
    stride_qn, stride_qd, stride_kn, stride_kd,
    inv_temperature,  # 1 / τ
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    bad_label = (labels < 0) | (labels >= M)
    # online log-sum-exp: m = max_j s_ij, l = Σ_j exp(s_ij − m); M >= 1, so the
    # first key block already gives every row a finite max (for finite inputs)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    positive = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(0, M, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < M
        s = _logits_tile(
            q_ptr, k_ptr, rows, cols, row_ok, col_ok, stride_qn, stride_qd, stride_kn, stride_kd, D,
            inv_temperature, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION,
        )
        s = tl.where(col_ok[None, :], s, float("-inf"))
        positive += tl.sum(tl.where(cols[None, :] == labels[:, None], s, 0.0), 1)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # the sums are shifted by the max, or by 0 once it is +inf (a +inf
        # logit): inf − inf would be NaN where torch.logsumexp gives +inf
        shift_old = tl.where(m_i == float("inf"), 0.0, m_i)
        shift_new = tl.where(m_new == float("inf"), 0.0, m_new)
        # a NaN logit makes Σ exp NaN, whatever the max does with it
        l_i = l_i * tl.exp(shift_old - shift_new) + tl.sum(tl.exp(s - shift_new[:, None]), 1)
        m_i = m_new
    lse = tl.where(m_i == float("inf"), 0.0, m_i) + tl.log(l_i)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(loss_ptr + rows, tl.where(bad_label, float("nan"), lse - positive), mask=row_ok)


@triton.jit
def _info_nce_bwd_dq_kernel(
    q_ptr,  # [N, D] queries, strides (stride_qn, stride_qd)
    k_ptr,  # [M, D] keys, strides (stride_kn, stride_kd)
    labels_ptr,  # [N] int64 (outside [0, M): NaN row of G)
    lse_ptr,  # [N] float32 row log-sum-exp of the forward
    grad_ptr,  # [N] float32 upstream gradient of each row loss
    dq_ptr,  # [N, D] contiguous, dq = G k
    N, M, D,
    stride_qn, stride_qd, stride_kn, stride_kd,
    inv_temperature,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    dv = tl.program_id(1).to(tl.int64) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_ok = dv < D
    # rows past N get scale 0, hence G = 0; a row with a bad label NaN
    labels, lse, scale = _gradient_rows(labels_ptr, lse_ptr, grad_ptr, rows, row_ok, M, inv_temperature)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for n0 in range(0, M, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < M
        s = _logits_tile(
            q_ptr, k_ptr, rows, cols, row_ok, col_ok, stride_qn, stride_qd, stride_kn, stride_kd, D,
            inv_temperature, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION,
        )
        g = _logit_gradient(s, lse, scale, labels, cols, col_ok)
        k = _load_rows(k_ptr, cols, col_ok, dv, dv_ok, stride_kn, stride_kd)
        # dq_i = Σ_j G_ij k_j
        acc = tl.dot(g, k, acc, input_precision=PRECISION)
    _store_rows(dq_ptr, acc, rows, row_ok, dv, dv_ok, D)


@triton.jit
def _info_nce_bwd_dk_kernel(
    q_ptr,  # [N, D] queries, strides (stride_qn, stride_qd)
    k_ptr,  # [M, D] keys, strides (stride_kn, stride_kd)
    labels_ptr,  # [N] int64 (outside [0, M): NaN row of G)
    lse_ptr,  # [N] float32 row log-sum-exp of the forward
    grad_ptr,  # [N] float32 upstream gradient of each row loss
    dk_ptr,  # [M, D] contiguous, dk = Gᵀ q
    N, M, D,
    stride_qn, stride_qd, stride_kn, stride_kd,
    inv_temperature,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < M
    dv = tl.program_id(1).to(tl.int64) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_ok = dv < D
    acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for m0 in range(0, N, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < N
        labels, lse, scale = _gradient_rows(labels_ptr, lse_ptr, grad_ptr, rows, row_ok, M, inv_temperature)
        s = _logits_tile(
            q_ptr, k_ptr, rows, cols, row_ok, col_ok, stride_qn, stride_qd, stride_kn, stride_kd, D,
            inv_temperature, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION,
        )
        g = _logit_gradient(s, lse, scale, labels, cols, col_ok)
        q = _load_rows(q_ptr, rows, row_ok, dv, dv_ok, stride_qn, stride_qd)
        # dk_j = Σ_i G_ij q_i
        acc = tl.dot(tl.trans(g), q, acc, input_precision=PRECISION)
    _store_rows(dk_ptr, acc, cols, col_ok, dv, dv_ok, D)


# Programs that fill an H100 / H200 once (one per SM).
_SMS = 132


def _rows_per_block(count: int) -> int:
    """64 rows per block (the most reuse of each loaded tile), or 32 / 16 when
    64 would leave more than a quarter of the SMs idle: the forward and dq
    grids have one program per query block, the dk grid one per key block
    (times the D slices). The interpreter runs one program at a time, so it
    always gets 64."""
    busy = 3 * _SMS // 4 if DEVICE_TYPE == "cuda" else 1
    for block in (64, 32):
        if triton.cdiv(count, block) >= busy:
            return block
    return 16


def launch_config(rows: int, keys: int, dim: int) -> dict:
    """Block sizes and num_warps for ``rows`` queries, ``keys`` keys of ``dim``
    features (one configuration per call, no autotuning).

    BLOCK_M (query rows) and BLOCK_N (keys) are 64 for large batches (8 warps);
    smaller batches get 32 or 16 (4 warps) so that every SM has a program
    (chosen so, not measured). tl.dot needs every dimension >= 16. BLOCK_D,
    the chunk of D one logits product contracts, is 16: float32's ieee
    products are FMAs on [rows, BLOCK_D] × [BLOCK_D, cols] operands held in
    registers. BLOCK_DV, the slice of D one backward program owns, is as wide
    as D up to 128: wider D recomputes the logits once per slice. With the
    backward's inner blocks of :func:`backward_blocks`, ptxas (sm_90) reports
    no spills for any dtype (at most 200 registers).
    """
    width = max(16, triton.next_power_of_2(max(dim, 1)))
    block_m, block_n = _rows_per_block(rows), _rows_per_block(keys)
    return {
        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": 16, "BLOCK_DV": min(width, 128),
        "num_warps": 8 if max(block_m, block_n) == 64 else 4,
    }


# The blocks a backward program walks (keys for dq, queries for dk): the
# [BLOCK_M, BLOCK_N] logits and G tiles live next to the [block, BLOCK_DV]
# accumulator, which at 64 × 64 tiles spill in float32.
BACKWARD_INNER_BLOCK = 32


def backward_blocks(cfg: dict) -> tuple[dict, dict]:
    """(BLOCK_M, BLOCK_N) of the dq and of the dk kernel from :func:`launch_config`'s:
    each keeps the block it owns and walks the other in blocks of at most
    BACKWARD_INNER_BLOCK."""
    dq = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": min(cfg["BLOCK_N"], BACKWARD_INNER_BLOCK)}
    dk = {"BLOCK_M": min(cfg["BLOCK_M"], BACKWARD_INNER_BLOCK), "BLOCK_N": cfg["BLOCK_N"]}
    return dq, dk


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_vector(name: str, x, rows: int, device: torch.device, dtype: torch.dtype | None = None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.shape[0] != rows:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a ({rows},) tensor, one entry per row of q, got {got}")
    if dtype is not None and x.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} ({x.device}) must be on q's device ({device})")


def _check_args(q, k, labels, inv_temperature) -> None:
    """The checks of csrc/cpu/info_nce.cpp's check_info_nce_args, as ValueError."""
    check_tensor("q", q, 2)
    check_tensor("k", k, 2)
    check_pair("q", q, "k", k)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"q and k must have the same feature dim D, got {q.shape[1]} and {k.shape[1]}")
    _check_vector("labels", labels, q.shape[0], q.device, torch.int64)
    # on a GPU only when asked for (a device → host sync); the kernels guard anyway
    if labels.numel() and _validate.values_checked_on_host(labels):
        low, high = (int(x) for x in torch.aminmax(labels))
        if low < 0 or high >= k.shape[0]:
            raise ValueError(f"labels must lie in [0, M) = [0, {k.shape[0]}), got values in [{low}, {high}]")
    check_positive("inv_temperature", inv_temperature)


def _labels(labels: torch.Tensor) -> torch.Tensor:
    """The kernels read labels at unit stride: a strided view is copied."""
    return labels.contiguous()


def _strides(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int]:
    return q.stride(0), q.stride(1), k.stride(0), k.stride(1)


@guard_device
def info_nce_forward(
    q: torch.Tensor, k: torch.Tensor, labels: torch.Tensor, inv_temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row losses and row log-sum-exp; the contract of ``fastkd::info_nce_forward``.

    Args:
        q: ``(N, D)`` queries, float32 / bfloat16 / float16, any strides.
        k: ``(M, D)`` keys, same dtype and device.
        labels: ``(N,)`` int64, the positive key of each query, in ``[0, M)``,
            any stride. Checked on the host where
            ``fastkd._validate.values_checked_on_host`` says so (ValueError);
            elsewhere a query with a label outside gets a NaN row loss.
        inv_temperature: ``1 / τ``.

    Returns:
        ``row_loss`` ``(N,)`` float32, ``lse_j(q_i·k_j/τ) − q_i·k_{y_i}/τ``, and
        ``row_lse`` ``(N,)`` float32, the log-sum-exp the backward needs.
    """
    _check_args(q, k, labels, inv_temperature)
    n, d = q.shape
    m = k.shape[0]
    row_loss = torch.empty(n, dtype=torch.float32, device=q.device)
    row_lse = torch.empty(n, dtype=torch.float32, device=q.device)
    if n == 0:
        return row_loss, row_lse
    cfg = launch_config(n, m, d)
    _info_nce_fwd_kernel[(triton.cdiv(n, cfg["BLOCK_M"]),)](
        q, k, _labels(labels), row_loss, row_lse, n, m, d, *_strides(q, k), float(inv_temperature),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        PRECISION=_precision(q.dtype), num_warps=cfg["num_warps"],
    )
    return row_loss, row_lse


@guard_device
def info_nce_backward(
    grad_row_loss: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    labels: torch.Tensor,
    row_lse: torch.Tensor,
    inv_temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``Σ_i grad_row_loss_i · row_loss_i``; the contract of ``fastkd::info_nce_backward``.

    Args:
        grad_row_loss: ``(N,)`` floating-point upstream gradient of each row loss.
        q, k, labels, inv_temperature: as for :func:`info_nce_forward`.
        row_lse: ``(N,)`` the forward's row log-sum-exp.

    Returns:
        ``(grad_q (N, D), grad_k (M, D))``, contiguous, in q's dtype. A query
        with a label outside ``[0, M)`` (where the launcher does not refuse
        it) gets a NaN gradient row, and so every entry of grad_k is NaN.
    """
    _check_args(q, k, labels, inv_temperature)
    n, d = q.shape
    m = k.shape[0]
    for name, x in (("grad_row_loss", grad_row_loss), ("row_lse", row_lse)):
        _check_vector(name, x, n, q.device)
        if not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    out_dtype = stored_dtype(q.dtype)
    grad_q = torch.empty((n, d), dtype=out_dtype, device=q.device)
    # without queries no kernel runs and dk = 0
    grad_k = (torch.empty if n > 0 else torch.zeros)((m, d), dtype=out_dtype, device=q.device)
    if n > 0:
        cfg = launch_config(n, m, d)
        labels = _labels(labels)
        grad = grad_row_loss.to(torch.float32).contiguous()
        lse = row_lse.to(torch.float32).contiguous()
        common = (n, m, d, *_strides(q, k), float(inv_temperature))
        meta = {
            "BLOCK_D": cfg["BLOCK_D"], "BLOCK_DV": cfg["BLOCK_DV"], "PRECISION": _precision(q.dtype),
            "num_warps": cfg["num_warps"],
        }
        dq_blocks, dk_blocks = backward_blocks(cfg)
        d_slices = triton.cdiv(d, cfg["BLOCK_DV"])
        _info_nce_bwd_dq_kernel[(triton.cdiv(n, cfg["BLOCK_M"]), d_slices)](
            q, k, labels, lse, grad, grad_q, *common, **dq_blocks, **meta
        )
        _info_nce_bwd_dk_kernel[(triton.cdiv(m, cfg["BLOCK_N"]), d_slices)](
            q, k, labels, lse, grad, grad_k, *common, **dk_blocks, **meta
        )
    return grad_q.to(q.dtype), grad_k.to(q.dtype)
