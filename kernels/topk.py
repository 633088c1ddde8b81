"""Divergence against a top-k (sparse) teacher (docs/spec.md §1) in Triton, the
``triton`` backend of ``fastkd.topk_divergence``.

Same contract as the C++ op ``fastkd::topk_divergence_forward``
(csrc/fastkd.cpp) and the same numerics as its CPU kernel
(csrc/cpu/topk_kernel.cpp, whose header derives the formulas): every
divergence the op takes is, as a function of the student's q, a sum of terms
on the teacher's k ids plus ``c · R`` with ``R = Σ_{v ∉ ids} q_v`` the student's
off-support mass and ``c`` a constant of the divergence (0 for KL and skew KL,
``−(1−β) log(1−β)`` for JSD, ``−log α`` for skew reverse KL, ½ for TVD); the
gradient is ``dℓ/ds_v = q_v (g_v − G) / T`` with ``g_v = c`` off the support
and ``G = Σ_ids q_j g_j + c R``. KL(q‖p) is +∞ off the support and refused.

One program per row:

  stream 1  online max and Σ exp((s − max)/T) over the row's off-support
            entries only: the k ids of the chunk are masked out as the chunk
            is read, so R is summed directly, never as 1 − Σ_ids q (which
            cancels when the ids hold nearly all of the student's mass)  read s
  support   k gathers of s: the row max, Σ_ids exp, then the k terms, ℓ and G
            — in float64 (k ≪ V, so it costs nothing next to the stream)
  support   the gradient at the k ids                         write k values
  stream 2  the gradient e_v (c − G)·grad_scale/(T Σe) off the support, the
            ids masked out again, so every gradient entry is written once
                                                             read s; write N·V

With hard labels y the op also computes the cross-entropy at temperature 1,
CE_i = log Σ_v exp(s_iv) − s_iy = (max − s_y) + log Σ_v exp(s_v − max), and
adds hard_grad_scale · (softmax(s_i) − onehot(y_i)) to the student gradient,
in the same passes (the contract of kernels/divergence.py). At T = 1 exactly
(the launcher's CE_SHARES_NORMALISER) the student's normaliser Σe is the
CE's and softmax(s) is q: no exp at all. At T ≠ 1 stream 1 also sums
exp(s − max) over the off-support entries (sharing the running max, which is
the same at every T), support 2 over the ids (float64), and stream 2 pays one
more exp per element for softmax(s). The CE term is added to the gradient
before it is rounded to the input dtype: in float64 at the ids, in float32 in
stream 2's store. s_y is one load at an index clamped into the row; a kept
row whose label is not in [0, V) gets CE NaN and a NaN gradient row.

Which ids fall into a chunk: the launcher sorts each row's ids (a device
op); a cursor walks the sorted row alongside the chunks, so each stream costs
one BLOCK-wide compare per id in total, k · BLOCK per row (≈ 2 operations per
logit at V = 128256, k = 64, BLOCK = 4096).

Bad ids: an id outside [0, V) would send a gather or scatter out of the row,
a repeated one would be written twice. Where tensor values are checked on
the host (CPU tensors; fastkd._validate.values_checked_on_host) they are
refused with a ValueError before the launch. On a GPU that check would be a
device → host synchronisation on every step, so the kernel checks its own
row first, on the sorted ids (first < 0, last ≥ V, or two equal
neighbours: k loads): such a row gets a NaN loss (and CE) and a NaN
gradient row and nothing else runs for it (docs/spec.md §6).

Memory traffic floor: read N·V·b (b bytes per logit) and write N·V·b of
gradient, plus 20·N·k bytes of ids and values (with labels 8·N bytes read
and 4·N bytes of row CE written: the CE adds no pass over the row). Stream 2 re-reads the row, from
L2 while the rows resident at once (about one per SM, V·b bytes each) fit in
it: on a 50 MiB L2 with 132 SMs up to V ≈ 99K in fp32; beyond that the
re-read goes to HBM (3 N·V·b in all).

Precision: the stream's element math is float32 (bf16 / fp16 widened on
load, gradients rounded to the input dtype on store; each chunk's Σ exp is
summed in float64 by kernels/_divergence_math.py's online_normaliser); the k
support terms, the
normaliser Σe and R are float64, as on CPU, so the divergence of a student
that matches the teacher closely (a tiny ℓ, a difference of nearly equal
log-probabilities) keeps its digits (tests/test_topk.py: ~5e-8 relative
error on ℓ ~ 1e-7 at T = 1 and T = 100, where the reference computed in
float32 is off by 60–180 %). The scalar arguments 1/T and β (α) arrive in
float32 — Triton passes Python floats as fp32 — and are widened; 1 − β,
log β, log(1 − β) and c are derived from the widened β in the kernel, so
the mixture weights sum to 1 in float64 (rounded separately, they would
shift a tiny divergence by their rounding). That is the exact loss at a T
and β within a relative 6e-8 of the requested ones: no cancellation, far
inside every tolerance. Under ``TRITON_INTERPRET=1`` (set before triton is
imported) the kernel runs on CPU tensors, which is how the tests check it
without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastkd import _validate
from fastkd._enums import DivergenceKind

from ._common import (
    DEVICE_TYPE,  # noqa: F401  (re-exported: callers ask a module where its kernels run)
    JSD,
    KINDS_WITH_COEF,
    KL,
    SKEW_KL,
    SKEW_REVERSE_KL,
    TVD,
    check_tensor,
    guard_device,
    log1p,
    max_nan,
    row_launch_config,
    stored_dtype,
)
from ._divergence_math import (
    check_kept_label_range,
    check_labels,
    check_row_mask,
    check_scalars,
    excluded_row_loss,
    half_sign,
    logaddexp,
    logit_at,
    online_normaliser,
    rescaled_sum_exp,
    store_grad,
    zero_grad_row,
    zero_where_zero,
)

__all__ = ["KINDS", "topk_divergence_forward"]

# (BLOCK, num_warps) for rows of V logits, as the divergence kernel streams them.
launch_config = row_launch_config

# The kinds the op takes, REVERSE_KL excluded.
KINDS = tuple(kind for kind in DivergenceKind if kind != DivergenceKind.REVERSE_KL)
# Widest tile of a row's k ids one support loop iteration holds: the support
# loops keep about six float64 values per id live, at most 2 per thread with
# 16 warps.
MAX_KBLOCK = 1024


@triton.jit
def _chunk_hits(sorted_row, cursor, K, start, offs, BLOCK: tl.constexpr):
    """Which lanes of the chunk [start, start + BLOCK) hold one of the row's ids.

    ``sorted_row`` holds the row's k ids in ascending order, ``cursor`` the
    number of them below ``start``; returns the hit mask and the cursor for
    the next chunk. The sentinel past the last id is ≥ every chunk's end.
    """
    hits = offs < 0
    nxt = tl.load(sorted_row + cursor, mask=cursor < K, other=start + 2 * BLOCK)
    while nxt < start + BLOCK:
        hits = hits | (offs == nxt)
        cursor += 1
        nxt = tl.load(sorted_row + cursor, mask=cursor < K, other=start + 2 * BLOCK)
    return hits, cursor


@triton.jit
def _load_ids(idx_row, kk, K, V):
    # a tile of the row's ids and the lanes that hold one; the range test
    # repeats the launcher's check, so no gather or scatter can leave the row
    ids = tl.load(idx_row + kk, mask=kk < K, other=0)
    return ids, (kk < K) & (ids >= 0) & (ids < V)


@triton.jit
def _support_logits(s_row, val_row, idx_row, kk, K, V, OTHER: tl.constexpr, DTYPE: tl.constexpr):
    # (ids, ok, s_j, t_j): a tile kk of the row's ids (_load_ids), the student's
    # logits there and the teacher's values, as DTYPE; lanes without an id read OTHER
    ids, ok = _load_ids(idx_row, kk, K, V)
    s_j = tl.load(s_row + ids, mask=ok, other=OTHER).to(DTYPE)
    t_j = tl.load(val_row + kk, mask=ok, other=OTHER).to(DTYPE)
    return ids, ok, s_j, t_j


@triton.jit
def _support_log_probs(s_row, val_row, idx_row, kk, K, V, m_s64, m_t64, inv_t, log_total, log_sum_t):
    # (ids, ok, s_j, log q_j, log p_j) in float64 at a tile kk of the row's ids, once
    # the row's maxima and normalisers are known (supports 3 and 4); lanes without
    # an id read 0 (their terms are masked by the caller)
    ids, ok, s_j, t_j = _support_logits(s_row, val_row, idx_row, kk, K, V, 0.0, tl.float64)
    log_q = (s_j - m_s64) * inv_t - log_total
    log_p = (t_j - m_t64) * inv_t - log_sum_t
    return ids, ok, s_j, log_q, log_p


@triton.jit
def _ids_leave_row_or_repeat(sorted_row, K, V, kcols, KBLOCK: tl.constexpr):
    """Whether the row's ids (``sorted_row``, ascending) hold one outside
    ``[0, V)`` or one twice: its first or last id out of range, or two
    neighbours equal. The launcher's host check, made on the device."""
    bad = (tl.load(sorted_row) < 0) | (tl.load(sorted_row + K - 1) >= V)
    for kstart in range(0, K, KBLOCK):
        kk = kstart + kcols
        pair = (kk >= 1) & (kk < K)
        here = tl.load(sorted_row + kk, mask=pair, other=0)
        before = tl.load(sorted_row + kk - 1, mask=pair, other=0)
        bad = bad | (tl.max((pair & (here == before)).to(tl.int32), 0) > 0)
    return bad


@triton.jit
def _widen(x):
    # a float32 scalar argument as float64; the interpreter passes Python
    # floats through unrounded, so round to float32 first as CUDA receives it
    return (x + tl.zeros([], tl.float32)).to(tl.float64)


@triton.jit
def _off_support_slope(c, log_c, log_one_minus_c, one_minus_c, KIND: tl.constexpr):
    # c = g_v off the teacher's ids (module docstring), off_support_slope() of the CPU kernel
    if KIND == JSD:
        slope = -one_minus_c * log_one_minus_c
    elif KIND == SKEW_REVERSE_KL:
        slope = -log_c
    elif KIND == TVD:
        slope = 0.5 + 0.0 * c
    else:
        slope = 0.0 * c
    return slope


@triton.jit
def _xlog_ratio(x, log_x, log_y):
    # x (log x − log y) with the xlogy rule: 0 where x is 0
    return zero_where_zero(x, x * (log_x - log_y))


@triton.jit
def _support_terms(log_q, log_p, c, one_minus_c, log_c, log_one_minus_c, KIND: tl.constexpr):
    """Loss term and q_j g_j (g = ∂ℓ/∂q) at support ids, float64: support_term() of
    csrc/cpu/topk_kernel.cpp. c is β (JSD) or α (skew)."""
    q = tl.exp(log_q)
    p = tl.exp(log_p)
    if KIND == KL:
        # KL(p‖q) = Σ p (log p − log q);  g = −p/q
        loss = _xlog_ratio(p, log_p, log_q)
        qg = -p
    elif KIND == JSD:
        # m = β p + (1−β) q (log space);  ℓ = β KL(p‖m) + (1−β) KL(q‖m);  g = (1−β) log(q/m)
        log_m = logaddexp(log_c + log_p, log_one_minus_c + log_q)
        q_term = _xlog_ratio(q, log_q, log_m)
        loss = c * _xlog_ratio(p, log_p, log_m) + one_minus_c * q_term
        qg = one_minus_c * q_term
    elif KIND == SKEW_KL:
        # m = α p + (1−α) q;  ℓ = KL(p‖m);  g = −(1−α) p/m
        log_m = logaddexp(log_c + log_p, log_one_minus_c + log_q)
        loss = _xlog_ratio(p, log_p, log_m)
        qg = -one_minus_c * zero_where_zero(p, tl.exp(log_q + log_p - log_m))
    elif KIND == SKEW_REVERSE_KL:
        # m = α q + (1−α) p;  ℓ = KL(q‖m);  g = log(q/m) + (1−α) p/m
        log_m = logaddexp(log_c + log_q, log_one_minus_c + log_p)
        loss = _xlog_ratio(q, log_q, log_m)
        mix = one_minus_c * tl.exp(log_q + log_p - log_m)
        qg = loss + tl.where((q == 0.0) | (p == 0.0), 0.0, mix)
    else:
        tl.static_assert(KIND == TVD, "unknown divergence kind (reverse KL is refused by the launcher)")
        # TVD = ½ Σ |p − q|;  g = ½ sign(q − p)
        d = q - p
        loss = 0.5 * tl.abs(d)
        qg = q * half_sign(d)
    return loss, qg


@triton.jit
def _topk_divergence_fwd_kernel(
    s_ptr,  # [N, V] student logits, row stride stride_s, unit stride along V
    idx_ptr,  # [N, k] int64 teacher ids, contiguous; a row not distinct and in [0, V) comes out NaN
    sorted_ptr,  # [N, k] int64 the same ids in ascending order per row, contiguous
    val_ptr,  # [N, k] float32 teacher logits at idx, contiguous
    mask_ptr,  # [N] bool, False → row excluded (None when HAS_MASK is False)
    labels_ptr,  # [N] int64 hard labels (None unless HAS_LABELS)
    loss_ptr,  # [N] float32 row losses ℓ_i
    ce_ptr,  # [N] float32 row cross-entropies log Σ_v exp(s_iv) − s_iy (None unless HAS_LABELS)
    g_ptr,  # [N, V] contiguous grad_scale · dℓ_i/ds (+ the CE term) (None unless STUDENT_GRAD)
    stride_s,
    V,
    K,
    inv_temperature,  # 1 / T
    grad_factor,  # grad_scale / T
    hard_grad_scale,  # factor of the CE gradient (unused unless HAS_LABELS)
    coef,  # β (JSD) or α (skew); unused by the other kinds
    KIND: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    CE_SHARES_NORMALISER: tl.constexpr,  # inv_temperature == 1: the CE's lse and softmax are the student's
    STUDENT_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
    KBLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    kcols = tl.arange(0, KBLOCK)
    # The CE's own Σ exp(s − max) at temperature 1 (stream 1 and support 2)
    CE_OWN_SUM: tl.constexpr = HAS_LABELS and not CE_SHARES_NORMALISER

    if HAS_MASK:
        if tl.load(mask_ptr + row) == 0:
            excluded_row_loss(loss_ptr, ce_ptr, row, HAS_LABELS)
            if STUDENT_GRAD:
                zero_grad_row(g_ptr, row, V, cols, BLOCK)
            return

    s_row = s_ptr + row * stride_s
    idx_row = idx_ptr + row * K
    sorted_row = sorted_ptr + row * K

    # ids the launcher did not check (a GPU, docs/spec.md §6): a row with an
    # id outside [0, V) or twice gets a NaN loss (and CE) and a NaN gradient
    # row, and nothing below runs for it, so no gather or scatter leaves the
    # row and no gradient entry is written twice
    if _ids_leave_row_or_repeat(sorted_row, K, V, kcols, KBLOCK):
        tl.store(loss_ptr + row, float("nan"))
        if HAS_LABELS:
            tl.store(ce_ptr + row, float("nan"))
        if STUDENT_GRAD:
            nan = tl.full([BLOCK], float("nan"), tl.float32)
            for start in range(0, V, BLOCK):
                store_grad(g_ptr, row, V, start + cols, nan)
        return

    val_row = val_ptr + row * K
    inv_t = _widen(inv_temperature)

    # stream 1: max and Σ exp((s − max)/T) of the off-support entries, online;
    # the ids read −inf (no off-support entry at all leaves max −inf, sum 0);
    # with labels at T ≠ 1 also their Σ exp(s − max)
    m_off = float("-inf")
    d_off = tl.zeros([], tl.float64)  # online_normaliser sums in float64
    d_ce_off = tl.zeros([], tl.float64)
    cursor = 0
    for start in range(0, V, BLOCK):
        offs = start + cols
        hits, cursor = _chunk_hits(sorted_row, cursor, K, start, offs, BLOCK)
        x = tl.load(s_row + offs, mask=(offs < V) & ~hits, other=float("-inf")).to(tl.float32)
        m_prev = m_off
        m_off, d_off, _ = online_normaliser(m_off, d_off, 0, x, offs, V, inv_temperature, False)
        if CE_OWN_SUM:
            d_ce_off = rescaled_sum_exp(d_ce_off, m_prev, m_off, x)

    # support 1: the row max over the ids too, and the teacher's max
    m_s = m_off
    m_t = float("-inf")
    for kstart in range(0, K, KBLOCK):
        kk = kstart + kcols
        ids, ok, s_j, t_j = _support_logits(s_row, val_row, idx_row, kk, K, V, float("-inf"), tl.float32)
        m_s = max_nan(m_s, tl.max(s_j, 0))
        m_t = max_nan(m_t, tl.max(t_j, 0))
    m_s64 = m_s.to(tl.float64)
    m_t64 = m_t.to(tl.float64)

    # support 2: Σe over the ids and the teacher's normaliser, float64;
    # (s_j − max) is exact in float64, and exact at the max
    sum_ids = tl.zeros([KBLOCK], tl.float64)
    sum_t = tl.zeros([KBLOCK], tl.float64)
    sum_ce_ids = tl.zeros([KBLOCK], tl.float64)
    for kstart in range(0, K, KBLOCK):
        kk = kstart + kcols
        ids, ok, s_j, t_j = _support_logits(s_row, val_row, idx_row, kk, K, V, float("-inf"), tl.float64)
        sum_ids += tl.where(ok, tl.exp((s_j - m_s64) * inv_t), 0.0)
        sum_t += tl.where(ok, tl.exp((t_j - m_t64) * inv_t), 0.0)
        if CE_OWN_SUM:
            sum_ce_ids += tl.where(ok, tl.exp(s_j - m_s64), 0.0)
    # the off-support sum, rescaled from its own max to the row max (without
    # a finite entry d_off is 0, or NaN after a NaN; an all −inf row has no
    # max and a NaN loss, as on CPU)
    off_sum = d_off.to(tl.float64)
    rescale = tl.exp((m_off.to(tl.float64) - m_s64) * inv_t)
    off_sum = tl.where(m_off == float("-inf"), off_sum, off_sum * rescale)
    total = off_sum + tl.sum(sum_ids, 0)
    log_total = tl.log(total)

    # CE = log Σ exp(s) − s_y = (max − s_y) + log Σ exp(s − max), in float64
    # and rounded once; at T = 1 the log Σ is log_total itself. s_y is one
    # load at an index clamped into the row, so that a label outside [0, V)
    # reads nothing out of bounds; such a row's CE and gradient are NaN.
    label = 0
    label_ok = False
    log_ce = tl.zeros([], tl.float64)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        label_ok = (label >= 0) & (label < V)
        s_label = logit_at(s_row, tl.where(label_ok, label, 0), V)
        if CE_SHARES_NORMALISER:
            log_ce = log_total
        else:
            ce_rescale = tl.exp(m_off.to(tl.float64) - m_s64)
            ce_off = d_ce_off.to(tl.float64)
            ce_off = tl.where(m_off == float("-inf"), ce_off, ce_off * ce_rescale)
            log_ce = tl.log(ce_off + tl.sum(sum_ce_ids, 0))
        ce = (m_s64 - s_label.to(tl.float64) + log_ce).to(tl.float32)
        tl.store(ce_ptr + row, tl.where(label_ok, ce, float("nan")))
    log_sum_t = tl.log(tl.sum(sum_t, 0))
    off_mass = off_sum / total  # R
    # β or α and what the formulas derive from it, all from the one float32
    # value: the mixture weights c and 1 − c must sum to 1 in float64, or a
    # tiny divergence shifts by their rounding
    c64 = _widen(coef)
    one_minus_c64 = 1.0 - c64
    log_c64 = tl.log(c64)
    log_one_minus_c64 = log1p(-c64)  # −inf for α = 1
    slope = _off_support_slope(c64, log_c64, log_one_minus_c64, one_minus_c64, KIND)

    # support 3: ℓ = c R + Σ_ids terms, G = c R + Σ_ids q_j g_j
    loss_acc = tl.zeros([KBLOCK], tl.float64)
    g_acc = tl.zeros([KBLOCK], tl.float64)
    for kstart in range(0, K, KBLOCK):
        kk = kstart + kcols
        _, ok, _, log_q, log_p = _support_log_probs(
            s_row, val_row, idx_row, kk, K, V, m_s64, m_t64, inv_t, log_total, log_sum_t)
        loss, qg = _support_terms(log_q, log_p, c64, one_minus_c64, log_c64, log_one_minus_c64, KIND)
        loss_acc += tl.where(ok, loss, 0.0)
        g_acc += tl.where(ok, qg, 0.0)
    big_g = slope * off_mass + tl.sum(g_acc, 0)
    # a divergence is never negative (rounding of a tiny one); NaN stays NaN
    row_loss = slope * off_mass + tl.sum(loss_acc, 0)
    tl.store(loss_ptr + row, tl.where(row_loss < 0.0, 0.0, row_loss).to(tl.float32))

    if STUDENT_GRAD:
        g_row = g_ptr + row * V
        factor = _widen(grad_factor)
        hard64 = _widen(hard_grad_scale)
        # support 4: dℓ/ds_j = (q_j g_j − q_j G)/T at the ids (+ the CE term
        # hard_grad_scale · (softmax(s)_j − [j = y]), in float64)
        for kstart in range(0, K, KBLOCK):
            kk = kstart + kcols
            ids, ok, s_j, log_q, log_p = _support_log_probs(
                s_row, val_row, idx_row, kk, K, V, m_s64, m_t64, inv_t, log_total, log_sum_t)
            _, qg = _support_terms(log_q, log_p, c64, one_minus_c64, log_c64, log_one_minus_c64, KIND)
            q = tl.exp(log_q)
            grad64 = (qg - q * big_g) * factor
            if HAS_LABELS:
                if CE_SHARES_NORMALISER:
                    prob = q
                else:
                    prob = tl.exp((s_j - m_s64) - log_ce)
                ce_term = hard64 * (prob - tl.where(ids == label, 1.0, 0.0))
                grad64 += tl.where(label_ok, ce_term, float("nan"))
            grad = grad64.to(tl.float32)
            tl.store(g_row + ids, grad.to(g_ptr.dtype.element_ty), mask=ok)

        # stream 2: off the support q_v (c − G)/T = e_v (c − G)/(T Σe), the ids
        # skipped (written above); + hard_grad_scale · (softmax(s)_v − [v = y])
        # in float32, softmax(s)_v = e_v / Σe at T = 1
        off_factor = ((slope - big_g) * factor / total).to(tl.float32)
        inv_total = (1.0 / total).to(tl.float32)
        log_ce32 = log_ce.to(tl.float32)
        cursor = 0
        for start in range(0, V, BLOCK):
            offs = start + cols
            hits, cursor = _chunk_hits(sorted_row, cursor, K, start, offs, BLOCK)
            off = (offs < V) & ~hits
            x = tl.load(s_row + offs, mask=off, other=float("-inf")).to(tl.float32)
            e = tl.exp((x - m_s) * inv_temperature)
            grad = e * off_factor
            if HAS_LABELS:
                if CE_SHARES_NORMALISER:
                    prob = e * inv_total
                else:
                    prob = tl.exp((x - m_s) - log_ce32)
                ce_term = hard_grad_scale * (prob - tl.where(offs == label, 1.0, 0.0))
                grad += tl.where(label_ok, ce_term, float("nan"))
            tl.store(g_row + offs, grad.to(g_ptr.dtype.element_ty), mask=off)


def support_block(k: int) -> int:
    """KBLOCK: the tile of a row's k ids one support loop iteration holds."""
    return min(triton.next_power_of_2(max(k, 1)), MAX_KBLOCK)


def _check_tensors(student, teacher_index, teacher_value, row_mask) -> None:
    """The tensor checks of the CPU op (csrc/cpu/topk.cpp) as ValueError."""
    for name, x in (("student", student), ("teacher_index", teacher_index), ("teacher_value", teacher_value)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
        if x.device != student.device:
            raise ValueError(f"{name} ({x.device}) must be on student's device ({student.device})")
    check_tensor("student", student, 2)
    rows, vocab = student.shape
    if vocab == 0:
        raise ValueError("student must have at least one column (vocabulary entry)")
    if vocab > 1 and student.stride(1) != 1:
        raise ValueError(f"student must have unit stride along V, got strides {student.stride()}")
    # any row stride (0 for an expanded row): the student is only read
    if teacher_index.dtype != torch.int64:
        raise ValueError(f"teacher_index must be int64, got {teacher_index.dtype}")
    if teacher_value.dtype != torch.float32:
        raise ValueError(
            f"teacher_value must be float32 for a {student.dtype} student, got {teacher_value.dtype}"
        )
    if teacher_index.shape != teacher_value.shape:
        raise ValueError(
            f"teacher_index {tuple(teacher_index.shape)} and teacher_value {tuple(teacher_value.shape)} "
            "must have the same shape"
        )
    if teacher_index.shape[0] != rows:
        raise ValueError(
            f"teacher_index must have one row per student row ({rows}), got {teacher_index.shape[0]}"
        )
    if not 1 <= teacher_index.shape[1] <= vocab:
        raise ValueError(f"k (teacher ids per row) must be in [1, {vocab}], got {teacher_index.shape[1]}")
    check_row_mask(row_mask, student)


def _check_scalars(kind, inv_temperature, coef, grad_scale) -> None:
    if not isinstance(kind, int) or isinstance(kind, bool) or kind not in KINDS:
        raise ValueError(
            "kind must be KL (0), JSD (2), skew KL (3), skew reverse KL (4) or TVD (5) for a top-k teacher "
            f"(reverse KL is infinite off the teacher's ids), got {kind!r}"
        )
    check_scalars(kind, inv_temperature, coef, grad_scale)


def sorted_ids(teacher_index: torch.Tensor, vocab: int, *, check: bool) -> torch.Tensor:
    """``(N, k)``: each row's ids in ascending order, which the kernel walks
    alongside the chunks, and where it finds an id out of range (the first or
    last) or twice (two equal neighbours). With ``check``, an id outside
    ``[0, vocab)`` or twice in a row is refused first (ValueError): one
    device → host read, so only where values are checked on the host."""
    ordered = teacher_index.sort(dim=1).values
    if not check:
        return ordered
    outside = (ordered[:, 0] < 0) | (ordered[:, -1] >= vocab)
    twice = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
    outside_any, twice_any = torch.stack([outside.any(), twice.any()]).tolist()
    if outside_any:
        raise ValueError(f"teacher_index has ids outside [0, {vocab})")
    if twice_any:
        raise ValueError("teacher_index has an id twice in one row")
    return ordered


@guard_device
def topk_divergence_forward(
    student: torch.Tensor,
    teacher_index: torch.Tensor,
    teacher_value: torch.Tensor,
    row_mask: torch.Tensor | None,
    kind: int,
    inv_temperature: float,
    coef: float,
    grad_scale: float,
    student_grad: bool,
    labels: torch.Tensor | None = None,
    hard_grad_scale: float = 0.0,
    *,
    ids_checked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row divergences against a top-k teacher, the scaled student gradient and
    optionally the hard-label CE; the contract of ``fastkd::topk_divergence_forward``.

    Args:
        student: ``(N, V)`` logits, float32 / bfloat16 / float16, unit stride
            along V, any row stride.
        teacher_index: ``(N, k)`` int64, distinct ids in ``[0, V)`` per row,
            ``1 ≤ k ≤ V`` (see ``ids_checked`` for who checks the ids).
        teacher_value: ``(N, k)`` float32 teacher logits at those ids.
        row_mask: ``(N,)`` bool or None; False rows get loss 0, CE 0 and a zero gradient.
        kind: divergence code: 0 kl, 2 jsd, 3 skew_kl, 4 skew_reverse_kl,
            5 tvd (1, reverse KL, is refused: +∞ off the teacher's ids).
        inv_temperature: ``1 / T``.
        coef: β in (0, 1) for JSD, α in (0, 1] for the skew divergences.
        grad_scale: factor applied to the gradient (not to the loss).
        student_grad: whether to compute the gradient.
        labels: ``(N,)`` int64 on the student's device, or None: the hard-label
            cross-entropy at temperature 1 is computed in the same pass. Kept
            rows' labels must lie in ``[0, V)`` (ValueError otherwise).
        hard_grad_scale: factor of the CE gradient, 0 without labels.
        ids_checked: the caller has checked the ids' range and distinctness
            on the host (``fastkd.topk_divergence`` does where
            ``fastkd._validate.values_checked_on_host``). Otherwise this
            launcher checks them (ValueError) where values are checked on
            the host, and elsewhere (a GPU) leaves them to the kernel, with
            no device → host synchronisation: a row with an id outside
            ``[0, V)`` or twice gets a NaN ``row_loss`` (and ``row_ce``) and
            a NaN gradient row, and nothing is read or written out of bounds.

    Returns:
        ``row_loss`` ``(N,)`` float32, the unscaled ``ℓ_i``; ``grad``
        ``(N, V)`` contiguous in the student's dtype, ``grad_scale · dℓ_i/ds``
        (+ ``hard_grad_scale · (softmax(s_i) − onehot(y_i))`` with labels), or
        ``(0, 0)`` when not requested; ``row_ce`` ``(N,)`` float32,
        ``log Σ_v exp(s_iv) − s_iy_i`` (0 for excluded rows), or ``(0,)``
        without labels.
    """
    _check_tensors(student, teacher_index, teacher_value, row_mask)
    _check_scalars(kind, inv_temperature, coef, grad_scale)
    check_labels(labels, hard_grad_scale, student)
    _validate.flag("ids_checked", ids_checked)
    rows, vocab = student.shape
    check_kept_label_range(labels, row_mask, vocab)
    k = teacher_index.shape[1]
    has_labels = labels is not None
    row_loss = torch.empty(rows, dtype=torch.float32, device=student.device)
    row_ce = torch.empty(rows if has_labels else 0, dtype=torch.float32, device=student.device)
    grad_dtype = stored_dtype(student.dtype)
    grad = student.new_empty((rows, vocab) if student_grad else (0, 0), dtype=grad_dtype)
    if rows == 0:
        return row_loss, grad.to(student.dtype), row_ce
    index = teacher_index.contiguous()
    ordered = sorted_ids(index, vocab, check=not ids_checked and _validate.values_checked_on_host(index))
    block, num_warps = launch_config(vocab)
    _topk_divergence_fwd_kernel[(rows,)](
        student, index, ordered, teacher_value.contiguous(),
        None if row_mask is None else row_mask.contiguous(),
        labels.contiguous() if has_labels else None, row_loss, row_ce if has_labels else None,
        grad if student_grad else None,
        student.stride(0), vocab, k, float(inv_temperature), float(grad_scale * inv_temperature),
        float(hard_grad_scale),
        # the other kinds ignore coef: 0.5 keeps log c and log(1 − c) finite
        float(coef) if kind in KINDS_WITH_COEF else 0.5,
        KIND=kind, HAS_MASK=row_mask is not None, HAS_LABELS=has_labels,
        # at T = 1 exactly the CE's log Σ exp and softmax are the student's own
        CE_SHARES_NORMALISER=has_labels and float(inv_temperature) == 1.0,
        STUDENT_GRAD=bool(student_grad), BLOCK=block, KBLOCK=support_block(k), num_warps=num_warps,
    )
    return row_loss, grad.to(student.dtype), row_ce
