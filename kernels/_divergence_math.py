"""The divergence family's shared math in Triton: what the divergence, top-k and
mixture kernels (``kernels/divergence.py``, ``topk.py``, ``mixture.py``) and their
launchers have in common, as ``csrc/common/divergence_math.h`` is for the C++ ops.

- per-element terms of every divergence kind (``element_terms``: loss, u, v),
  the log-space helpers they use, and the hard-label CE gradient;
- the online row normalisers (float64 sums) and the row stores, including an
  excluded row's;
- the host-side checks of the row mask, the labels and the scalar arguments,
  as ValueError in the words of csrc/common/checks.h.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastkd._enums import DivergenceKind

from ._common import (
    JSD,
    KINDS_WITH_COEF,
    KL,
    REVERSE_KL,
    SKEW_KL,
    SKEW_REVERSE_KL,
    TVD,
    check_finite,
    check_positive,
    log1p,
    max_nan,
    min_nan,
)


@triton.jit
def zero_where_zero(gate, value):
    # The xlogy rule: gate == 0 → 0 (even where value is NaN); a NaN gate keeps the value.
    return tl.where(gate == 0.0, 0.0, value)


@triton.jit
def logaddexp(a, b):
    # log(e^a + e^b) = hi + log1p(e^(lo − hi)); −inf when both are −inf (no NaN)
    hi = max_nan(a, b)
    lo = min_nan(a, b)
    return tl.where(hi == float("-inf"), float("-inf"), hi + log1p(tl.exp(lo - hi)))


@triton.jit
def half_sign(d):
    # ½ sign(d) with sign(0) = 0 (torch.abs's subgradient)
    return tl.where(d > 0.0, 0.5, tl.where(d < 0.0, -0.5, 0.0))


@triton.jit
def expm1(x):
    # e^x − 1 = (u − 1) · x / log u with u = fl(e^x) (Kahan): the ratio cancels
    # the rounding of u; accurate for the |x| < 1 it is used at
    u = tl.exp(x)
    return tl.where(u == 1.0, x, (u - 1.0) * (x / tl.log(u)))


@triton.jit
def log_mixture_ratio(d, one_minus_c, log_c, log_one_minus_c):
    # log(c + (1 − c) e^d) for a log ratio d: the log of m / (the reference
    # side) for m = c·ref + (1 − c)·other and d = log(other / ref). Near d = 0
    # the result is near 0 and is formed as log1p((1 − c) expm1(d)), so no
    # difference of two log-probabilities of magnitude ~log V is taken.
    near = log1p(one_minus_c * expm1(d))
    far = logaddexp(log_c + tl.zeros_like(d), log_one_minus_c + d)
    return tl.where(tl.abs(d) < 1.0, near, far)


@triton.jit
def element_terms(
    p, q, log_ratio, ratio_q, ratio_p, c, one_minus_c, log_c, log_one_minus_c, KIND: tl.constexpr
):
    """Per-element (loss, u, v, p, q) of divergence KIND: element_terms() of divergence_math.h.

    u = q ∂L/∂q and v = p ∂L/∂p, less the terms proportional to q (p) that
    cancel in the softmax Jacobian, including a row constant: ratio_q is
    log(q/p) and ratio_p is log(p/q), each minus its value at the mode of
    q (p). c is β (JSD) or α (skew). log_ratio is log(q/p) itself, formed
    from the logit difference and one row constant (see _terms_at in kernels/divergence.py), which
    every log ratio below is written in: the same quantities as
    divergence_math.h's, with the cancellation of log p − log q (both ~log V,
    their difference ~1e-3 at T = 100) taken out of the per-element work.
    """
    if KIND == KL:
        # KL(p‖q) = Σ p (log p − log q);  u = −p,  v = p (log p − log q − c_p)
        loss = zero_where_zero(p, -p * log_ratio)
        u = -p
        v = zero_where_zero(p, p * ratio_p)
    elif KIND == REVERSE_KL:
        # KL(q‖p) = Σ q (log q − log p);  u = q (log q − log p − c_q),  v = −q
        loss = zero_where_zero(q, q * log_ratio)
        u = zero_where_zero(q, q * ratio_q)
        v = -q
    elif KIND == JSD:
        # m = β p + (1−β) q;  L = β KL(p‖m) + (1−β) KL(q‖m)
        # u = (1−β) q (log q − log m),  v = β p (log p − log m)
        # with log(m/p) = log(β + (1−β) q/p) and log(m/q) = log((1−β) + β p/q)
        # (each finite where its own probability is positive)
        log_m_over_p = log_mixture_ratio(log_ratio, one_minus_c, log_c, log_one_minus_c)
        log_m_over_q = log_mixture_ratio(-log_ratio, c, log_one_minus_c, log_c)
        u = one_minus_c * zero_where_zero(q, -q * log_m_over_q)
        v = c * zero_where_zero(p, -p * log_m_over_p)
        loss = v + u
    elif KIND == SKEW_KL:
        # m = α p + (1−α) q;  L = KL(p‖m)
        # u = −(1−α) q p / m,  v = p (log p − log m) − α p² / m,  p / m = e^(−log(m/p))
        log_m_over_p = log_mixture_ratio(log_ratio, one_minus_c, log_c, log_one_minus_c)
        p_over_m = tl.exp(-log_m_over_p)
        loss = zero_where_zero(p, -p * log_m_over_p)
        u = -one_minus_c * zero_where_zero(p, q * p_over_m)
        v = loss - c * zero_where_zero(p, p * p_over_m)
    elif KIND == SKEW_REVERSE_KL:
        # m = α q + (1−α) p;  L = KL(q‖m)  (SKEW_KL with the roles swapped:
        # log(m/q) = log(α + (1−α) p/q), p/q = e^(−log_ratio))
        log_m_over_q = log_mixture_ratio(-log_ratio, one_minus_c, log_c, log_one_minus_c)
        q_over_m = tl.exp(-log_m_over_q)
        loss = zero_where_zero(q, -q * log_m_over_q)
        u = loss - c * zero_where_zero(q, q * q_over_m)
        v = -one_minus_c * zero_where_zero(q, p * q_over_m)
    else:
        tl.static_assert(KIND == TVD, "unknown divergence kind")
        # TVD = ½ Σ |p − q|;  u = q · ½ sign(q − p),  v = −p · ½ sign(q − p)
        d = q - p
        hs = half_sign(d)
        loss = 0.5 * tl.abs(d)
        u = q * hs
        v = -p * hs
    return loss, u, v, p, q


@triton.jit
def online_normaliser(m, d, at, x, offs, V, inv_temperature, TRACK_AT: tl.constexpr):
    # Running m = max x, d = Σ exp((x − m) / T) and (if TRACK_AT) `at`, the
    # first index holding m (V while there is none), after the chunk x. While
    # the row has been all −inf the shift is 0, so no −inf − (−inf) appears;
    # a NaN (or +inf) logit makes d NaN. d is float64: the chunk's terms are
    # summed in float64, so log d (and the log ratio's row constant built
    # from it) carry about float32's rounding of one value, not of a sum.
    chunk_max = tl.max(x, 0)
    if TRACK_AT:
        at = tl.where(chunk_max > m, tl.min(tl.where(x == chunk_max, offs, V), 0), at)
    m_new = max_nan(m, chunk_max)
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    rescale = tl.exp((m - shift) * inv_temperature).to(tl.float64)
    d = d * rescale + tl.sum(tl.exp((x - shift) * inv_temperature).to(tl.float64), 0)
    return m_new, d, at


@triton.jit
def store_grad(g_ptr, row, V, offs, grad):
    # one chunk of row `row` of a contiguous [N, V] gradient, rounded to its dtype
    tl.store(g_ptr + row * V + offs, grad.to(g_ptr.dtype.element_ty), mask=offs < V)


@triton.jit
def zero_grad_row(g_ptr, row, V, cols, BLOCK: tl.constexpr):
    # row `row` of a contiguous [N, V] gradient set to 0 (an excluded row's)
    zero = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        store_grad(g_ptr, row, V, start + cols, zero)


@triton.jit
def excluded_row_loss(loss_ptr, ce_ptr, row, HAS_LABELS: tl.constexpr):
    # an excluded row: ℓ = 0 (and CE = 0), written without reading the logits or the label
    tl.store(loss_ptr + row, 0.0)
    if HAS_LABELS:
        tl.store(ce_ptr + row, 0.0)


@triton.jit
def logit_at(x_row, at, V):
    # x[at] in float32, for an index already clamped into the row (masked for V = 0)
    return tl.load(x_row + at, mask=at < V, other=0.0).to(tl.float32)


@triton.jit
def rescaled_sum_exp(d, m_old, m_new, x):
    # Σ exp(x − m) at temperature 1, online, sharing the running max m of the
    # same logits at temperature T (max x is the same at every T > 0): d was
    # relative to m_old, the result is relative to m_new. Float64 sums, the
    # shift rule and the NaN behaviour of online_normaliser.
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    return d * tl.exp(m_old - shift).to(tl.float64) + tl.sum(tl.exp(x - shift).to(tl.float64), 0)


@triton.jit
def ce_grad(s, q, offs, m_s, log_d_ce, label, label_ok, hard_grad_scale, CE_SHARES_NORMALISER: tl.constexpr):
    # hard_grad_scale · d(CE)/ds_j = hard_grad_scale · (softmax(s)_j − [j = y]);
    # at T = 1 softmax(s) is q itself, otherwise one exp per element. A row
    # whose label is not a class id gets NaN (the kernel's own guard).
    if CE_SHARES_NORMALISER:
        prob = q
    else:
        prob = tl.exp((s - m_s) - log_d_ce)
    term = hard_grad_scale * (prob - tl.where(offs == label, 1.0, 0.0))
    return tl.where(label_ok, term, float("nan"))


def coefficient_terms(kind: int, coef: float) -> tuple[float, float, float, float]:
    """(c, 1 − c, log c, log(1 − c)) for the kernel; only JSD and the skew kinds read them."""
    if kind not in KINDS_WITH_COEF:
        return 0.0, 1.0, -math.inf, 0.0
    c = float(coef)
    return c, 1.0 - c, math.log(c), math.log1p(-c) if c < 1.0 else -math.inf


def check_row_mask(row_mask, student: torch.Tensor) -> None:
    """``row_mask``: None or an ``(N,)`` bool tensor on ``student``'s device (ValueError)."""
    if row_mask is None:
        return
    if not isinstance(row_mask, torch.Tensor) or row_mask.dtype != torch.bool:
        raise ValueError("row_mask must be None or a bool tensor")
    if row_mask.shape != student.shape[:1]:
        raise ValueError(f"row_mask must have shape ({student.shape[0]},), got {tuple(row_mask.shape)}")
    if row_mask.device != student.device:
        raise ValueError(f"row_mask ({row_mask.device}) must be on student's device ({student.device})")


def check_scalars(kind: int, inv_temperature, coef, grad_scale) -> None:
    """The scalar arguments every divergence launcher takes (``kind`` already checked) (ValueError)."""
    check_positive("inv_temperature", inv_temperature)
    if kind == DivergenceKind.JSD and not 0.0 < coef < 1.0:
        raise ValueError(f"coef (beta) must be in (0, 1) for JSD, got {coef}")
    if kind in (DivergenceKind.SKEW_KL, DivergenceKind.SKEW_REVERSE_KL) and not 0.0 < coef <= 1.0:
        raise ValueError(f"coef (alpha) must be in (0, 1] for skew divergences, got {coef}")
    check_finite("grad_scale", grad_scale)


def check_labels(labels, hard_grad_scale, student: torch.Tensor) -> None:
    """``labels``: None or an ``(N,)`` int64 tensor on ``student``'s device; ``hard_grad_scale``
    finite, and 0 without labels (ValueError). Their range: :func:`check_kept_label_range`."""
    check_finite("hard_grad_scale", hard_grad_scale)
    if labels is None:
        if hard_grad_scale != 0.0:
            raise ValueError(f"hard_grad_scale must be 0 without labels, got {hard_grad_scale}")
        return
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be None or an int64 tensor, got {got}")
    if labels.shape != student.shape[:1]:
        raise ValueError(f"labels must have shape ({student.shape[0]},), got {tuple(labels.shape)}")
    if labels.device != student.device:
        raise ValueError(f"labels ({labels.device}) must be on student's device ({student.device})")


def check_kept_label_range(labels, row_mask, vocab: int) -> None:
    """Every kept row's label (``row_mask`` None: every row) lies in ``[0, vocab)``
    (ValueError, in csrc/common/checks.h's words), before the kernel indexes the
    row with it. One device sync on CUDA (the kernels' guard, a NaN row, stays
    for the rows this cannot see)."""
    if labels is None or labels.numel() == 0:
        return
    outside = (labels < 0) | (labels >= vocab)
    if row_mask is not None:
        outside &= row_mask
    if bool(outside.any()):
        row = int(outside.nonzero()[0, 0])
        raise ValueError(f"labels of kept rows must lie in [0, {vocab}), got {int(labels[row])} at row {row}")
