"""Fused linear head + softmax divergence for LLM distillation (docs/spec.md §1, "Fused linear").

``fused_linear_divergence`` computes ``fastkd.divergence`` on
``student_hidden @ student_weightᵀ + student_bias`` and
``teacher_hidden @ teacher_weightᵀ + teacher_bias`` without ever holding the
full ``(N, V)`` logits. Rows are processed in chunks; per chunk:

1. student and teacher logits, one matmul each (``addmm`` with the bias), in
   float32 (float64 for float64 inputs) whatever the inputs' dtypes, then
   each model's logit scale and soft cap;
2. the fused divergence op (``torch.ops.fastkd.divergence_forward`` or the
   Triton kernel), which returns the row losses *and* the gradient w.r.t. the
   chunk's student logits, already multiplied by the reduction's factor; with
   ``hard_weight`` the same pass gives the rows' cross-entropy and adds its
   gradient;
3. the chunk's contribution to ``grad_hidden`` (``g @ W``, its own rows),
   ``grad_weight`` (``gᵀ h``, accumulated) and ``grad_bias`` (``Σ g``), all
   in float32 (float64).

So the forward produces the gradients (Liger-style) and the backward only
multiplies them by the upstream gradient. Memory beyond the inputs: one
chunk's logits and gradient in float32 (bounded by ``memory_budget``), the
weight gradient's float32 accumulator (``V × H × 4`` bytes) and the gradients
themselves. On CPU tensors ``fastkd::fused_linear_addmm_`` reads bfloat16 /
float16 operands as they are (two bfloat16 operands: a bfloat16 gemm summing
in float32); elsewhere each bfloat16 / float16 weight is converted to float32
once per call (``V × H × 4`` bytes each). Keeping the chunk logits and their
gradient in float32 is what makes the bfloat16 fused head as accurate as a
float32 projection (docs/accuracy.md); with a bfloat16 student head on CPU
the gradient's products are bfloat16 gemms as well (:func:`_bfloat16_terms_`).
With ``reduction="none"``, or
``return_parts`` parts back-propagated with different upstream gradients, the
upstream gradient is only known in backward, which then recomputes the chunks
(twice the matmuls).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastkd import _dispatch, _hard_labels, _ops, _validate
from fastkd._backend import run_divergence_kernel
from fastkd._divergence_options import DivergenceOptions
from fastkd._row_loss import kept_rows, over_given_items, scale_by_upstream
from fastkd.reference import fused_linear as _reference

__all__ = ["FusedLinearDivergenceLoss", "default_memory_budget", "fused_linear_divergence"]


def default_memory_budget(dtype: torch.dtype) -> int:
    """Bytes of per-chunk temporaries (logits, their gradient) the automatic chunk size aims at.

    128 MiB for float32 / float64 inputs, 64 MiB for bfloat16 / float16 ones.
    The chunk's logits and gradient are float32 for every input dtype but
    float64 (:func:`chunk_rows`): 349 rows at V = 32000 for float32 and 174
    for bfloat16 / float16. Each chunk adds its ``gᵀ h`` into the weight
    gradient, reading and writing all ``V × H`` of it, so fewer, larger
    chunks are faster; the smaller budget for reduced-precision inputs keeps
    the whole call's memory a fraction of the unfused path's, whose logits
    are half the size there.
    """
    return 64 * 2**20 if dtype in (torch.bfloat16, torch.float16) else 128 * 2**20


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype of the chunk logits, their gradient and every product: float64 if
    any input is float64, else float32 (bfloat16 / float16 inputs included)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def chunk_rows(vocab: int, dtype: torch.dtype, per_row_upstream: bool, memory_budget: int) -> int:
    """Rows per chunk so that the chunk's temporaries fit in ``memory_budget`` bytes.

    Per row: student logits, teacher logits and their gradient, each ``V``
    entries in :func:`compute_dtype` of ``dtype`` (float32 for bfloat16 /
    float16 inputs). ``per_row_upstream`` (``reduction="none"``) needs
    nothing more: the upstream gradient multiplies the gradient in place.
    Besides the chunk: the weight gradient's accumulator (``V × H`` in the
    compute dtype) and, off CPU, compute-dtype copies of bfloat16 / float16
    weights.
    """
    del per_row_upstream
    itemsize = torch.empty((), dtype=compute_dtype(dtype)).element_size()
    per_row = vocab * 3 * itemsize
    return max(1, memory_budget // max(per_row, 1))


def default_chunk_rows(n_rows: int, vocab: int, hidden: int, dtype: torch.dtype, device_type: str) -> int:
    """Rows per chunk when neither ``chunk_size`` nor ``memory_budget`` is given.

    On CPU the :func:`default_memory_budget` rule (:func:`chunk_rows`). On a
    GPU the budget alone gives tiny chunks for LLM vocabularies (43 rows for
    bfloat16 at V = 128256: hundreds of Python-loop iterations, each chunk's
    kernels far from filling the device), so the chunks are at least
    ``⌈N / ⌈V/H⌉⌉`` rows: at most ``⌈V/H⌉`` chunks (32 for V = 128256,
    H = 4096), whose temporaries (``3 · rows · V`` float32) are about three
    float32 copies of the hidden states — memory proportional to the input,
    as the hidden states themselves. The chunk count also bounds how often a
    weight gradient summed in bfloat16 / float16 (``weight_grad_dtype``) is
    rounded.
    """
    rows = chunk_rows(vocab, dtype, False, default_memory_budget(dtype))
    if device_type == "cpu":
        return rows
    most_chunks = max(1, -(-vocab // max(hidden, 1)))
    return max(rows, -(-n_rows // most_chunks))


@dataclass(frozen=True)
class _LogitMap:
    """``cap · tanh(scale · z / cap)`` (no cap: ``scale · z``) applied to one model's logits ``z``."""

    scale: float = 1.0
    cap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.cap is None

    def apply_(self, logits: torch.Tensor) -> None:
        if self.scale != 1.0:
            logits.mul_(self.scale)
        if self.cap is not None:
            logits.div_(self.cap).tanh_().mul_(self.cap)

    def chain_(self, grad: torch.Tensor, mapped: torch.Tensor) -> None:
        """``grad`` w.r.t. the mapped logits → w.r.t. ``z``, in place; ``mapped`` = the mapped logits."""
        if self.cap is not None:
            # d(cap·tanh(u/cap))/du = 1 − tanh², tanh = mapped / cap
            ratio = mapped / self.cap
            grad.mul_(ratio.mul_(ratio).neg_().add_(1.0))
        if self.scale != 1.0:
            grad.mul_(self.scale)


@dataclass(frozen=True)
class _Config:
    kind: int  # fastkd::divergence::Kind
    inv_temperature: float
    coef: float  # β (JSD) or α (skew), interior
    kd_factor: float  # soft_weight · scale / norm: multiplies the divergence row losses
    ce_factor: float  # hard_weight / norm: multiplies the CE row losses (0 = no CE)
    per_row: bool  # reduction == "none"
    separable: bool  # return_parts: hard and soft may be back-propagated with different upstreams
    chunk: int
    backend: str
    compute: torch.dtype  # logits, their gradient, every product and accumulator
    weight_grad_dtype: torch.dtype  # what grad_weight is summed over the chunks in
    student_map: _LogitMap
    teacher_map: _LogitMap


def _native_mixed_matmul(device: torch.device) -> bool:
    """Whether :func:`_matmul_into` takes bfloat16 / float16 operands into a float32
    ``out`` without converting them whole (the CPU op does)."""
    return device.type == "cpu" and _ops.CPU_EXTENSION_ERROR is None


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool) -> None:
    """``out = a @ b``, or ``out += a @ b`` with ``accumulate``; out [M, N], a [M, K], b [K, N].

    On CPU tensors the product is ``fastkd::fused_linear_addmm_``, whose
    result does not depend on the thread count (a BLAS gemm may split a long
    K between threads) and which takes bfloat16 / float16 operands into a
    float32 ``out`` (summing their products in float32); elsewhere ATen's,
    with operands of ``out``'s dtype.
    """
    if _native_mixed_matmul(out.device):
        torch.ops.fastkd.fused_linear_addmm_(out, a, b, 1.0 if accumulate else 0.0)
    elif accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


if _ops.CPU_EXTENSION_ERROR is None:

    @torch.library.register_fake("fastkd::fused_linear_addmm_")
    def _fused_linear_addmm_fake(out, a, b, beta):
        return None


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
            logit_map: _LogitMap) -> torch.Tensor:
    """``map(hidden @ weightᵀ (+ bias))`` in ``dtype``: [rows, H] and [V, H] (and [V]) give [rows, V]."""
    out = hidden.new_empty((hidden.shape[0], weight.shape[0]), dtype=dtype)
    if bias is not None:
        out.copy_(bias.expand_as(out))
    _matmul_into(out, hidden, weight.t(), accumulate=bias is not None)
    logit_map.apply_(out)
    return out


def _in(dtype: torch.dtype, x: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` in ``dtype`` (itself when it already is)."""
    return x if x is None or x.dtype == dtype else x.to(dtype)


def _splits_gradient(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the logits' gradient enters the gradients' products as two bfloat16
    terms: a bfloat16 student head (hidden states and weight) on CPU, where
    the op multiplies two bfloat16 operands at the bfloat16 rate."""
    return _native_mixed_matmul(hidden.device) and hidden.dtype == weight.dtype == torch.bfloat16


def _bfloat16_terms_(x: torch.Tensor) -> torch.Tensor:
    """``x`` [r, C] float32 as two bfloat16 terms stacked, [2r, C]: ``hi = bf16(x)``
    on top of ``lo = bf16(x − hi)``.

    ``x − hi`` is exact in float32, so ``hi + lo`` is ``x`` to ``2⁻¹⁶ |x|``
    (16 significant bits), and ``terms @ b`` for a bfloat16 ``b`` gives both
    terms' products, to be added. This is how the logits' float32 gradient
    enters a bfloat16 head's two gradient products on CPU (:func:`_splits_gradient`):
    every product is then a bfloat16 gemm summing in float32 (the CPU op's
    fast path), and the terms' ``2⁻¹⁶`` relative error is far below the
    gradients' one final rounding to bfloat16 (``2⁻⁸``). Overwrites ``x``
    with ``x − hi``.
    """
    r = x.shape[0]
    terms = x.new_empty((2 * r, x.shape[1]), dtype=torch.bfloat16)
    hi, lo = terms[:r], terms[r:]
    hi.copy_(x)
    lo.copy_(x.sub_(hi))
    return terms


def _hidden_gradient_(grad_h, rows, kept_index, g, weight, *, terms: bool) -> None:
    """``grad_h[rows] = g @ weight``, weight [V, H] (as the products take it); g the
    logits' gradient [r, V] in the compute dtype, or with ``terms`` its two
    bfloat16 terms [2r, V] (:func:`_bfloat16_terms_`), whose products are added."""
    r = g.shape[0] // 2 if terms else g.shape[0]
    if not terms and grad_h.dtype == g.dtype and kept_index is None:
        _matmul_into(grad_h[rows], g, weight, accumulate=False)
        return
    if terms:
        pair = torch.empty((2 * r, weight.shape[1]), device=g.device, dtype=torch.float32)
        _matmul_into(pair, g, weight, accumulate=False)
        product = pair[:r].add_(pair[r:])
    else:
        product = g.new_empty((r, weight.shape[1]))
        _matmul_into(product, g, weight, accumulate=False)
    if kept_index is None:
        grad_h[rows].copy_(product)
    else:
        grad_h.index_copy_(0, rows, product.to(grad_h.dtype))


def _weight_gradient_(grad_w, g, h, *, terms: bool) -> None:
    """``grad_w += gᵀ h``, h [r, H] (as the products take it); g the logits'
    gradient [r, V] in the compute dtype, or with ``terms`` its two bfloat16
    terms [2r, V] (:func:`_bfloat16_terms_`)."""
    if not terms and grad_w.dtype == g.dtype:
        _matmul_into(grad_w, g.t(), h, accumulate=True)
    elif terms and grad_w.dtype == torch.float32:
        # [V, 2r] @ [2r, H]: both terms' products summed in one gemm (h twice,
        # stored transposed: the op packs its columns as they lie)
        h_twice = torch.cat((h.t(), h.t()), dim=1).t()
        _matmul_into(grad_w, g.t(), h_twice, accumulate=True)
    else:
        # summed in the weight's bfloat16 / float16: the chunk's product of g
        # rounded to it (the terms' first half), added with one rounding per chunk
        g_rounded = g[: g.shape[0] // 2] if terms else g.to(grad_w.dtype)
        _matmul_into(grad_w, g_rounded.t(), _in(grad_w.dtype, h), accumulate=True)


def _chunk_pass(cfg: _Config, s_h, s_w, s_b, t_h, t_w, t_b, keep, labels, need, upstream=None):
    """One walk over the row chunks.

    Every product, the chunk logits and their gradient are in ``cfg.compute``
    (float32 for bfloat16 / float16 inputs, float64 for float64), the
    products' operands read in their own dtypes on CPU (elsewhere converted:
    each weight once per pass, each hidden chunk as it is read). The
    gradients are rounded to their inputs' dtypes once, at the end (the
    hidden states' per chunk, its own rows).

    Args:
        need: ``(hidden, weight, bias)``: which student gradients to produce.
        upstream: ``(soft, hard)`` upstream gradients, each a 0-dim tensor or
            ``(N,)`` (``reduction="none"``); ``hard`` None when it equals
            ``soft``. None: the gradients of ``hard + soft`` (upstream 1).

    Returns:
        ``(kd_rows (N,), ce_rows (N,), grad_hidden, grad_weight, grad_bias)``;
        the row losses unscaled (compute dtype), the gradients already
        multiplied by the reduction factors (and ``upstream``), None where not
        needed.
    """
    n, vocab = s_h.shape[0], s_w.shape[0]
    acc = cfg.compute
    any_grad = any(need)
    hard = cfg.ce_factor != 0.0
    # operands as the products take them: the CPU op reads each in its own
    # dtype; elsewhere each weight is converted once per pass
    operand = (lambda x: x) if _native_mixed_matmul(s_h.device) else (lambda x: _in(acc, x))
    s_w_acc, t_w_acc = operand(s_w), operand(t_w)
    # Excluded rows (labels == ignore_index, mask False: prompt and padding
    # tokens) are never projected: the kept rows' indices are found once, up
    # front (one host synchronisation, for their count), and the chunks walk
    # them; excluded rows keep loss 0 and a zero hidden-state gradient.
    kept_index = None if keep is None else keep.nonzero().squeeze(1)
    n_walked = n if kept_index is None else kept_index.numel()
    kd_rows = s_h.new_empty((n,), dtype=acc) if kept_index is None else s_h.new_zeros((n,), dtype=acc)
    ce_rows = s_h.new_zeros((n,), dtype=acc)
    grad_h = None
    if need[0]:  # contiguous either way
        grad_h = s_h.new_empty(s_h.shape) if kept_index is None else s_h.new_zeros(s_h.shape)
    grad_w = s_w.new_zeros(s_w.shape, dtype=cfg.weight_grad_dtype) if need[1] else None
    grad_b = s_w.new_zeros((vocab,), dtype=acc) if need[2] else None
    u_soft, u_hard = upstream if upstream is not None else (None, None)
    split_g = _splits_gradient(s_h, s_w)  # g as two bfloat16 terms (_bfloat16_terms_)
    for start in range(0, n_walked, cfg.chunk):
        stop = min(start + cfg.chunk, n_walked)
        # a slice of the rows, or the indices of the chunk's kept rows
        rows = slice(start, stop) if kept_index is None else kept_index[start:stop]
        h = operand(s_h[rows])
        s_logits = _logits(h, s_w_acc, s_b, acc, cfg.student_map)
        t_logits = _logits(operand(t_h[rows]), t_w_acc, t_b, acc, cfg.teacher_map)
        chunk_keep = None  # every walked row is kept
        # the divergence and (with labels) the cross-entropy in one kernel
        # pass; g = kd_factor · dℓ/ds + ce_factor · dCE/ds
        row_loss, g, _, row_ce = run_divergence_kernel(
            cfg.backend, s_logits, t_logits, chunk_keep, cfg.kind, cfg.inv_temperature, cfg.coef,
            cfg.kd_factor, any_grad, False, labels[rows] if hard else None,
            cfg.ce_factor if hard else 0.0,
        )
        del t_logits
        kd_rows[rows] = row_loss
        if hard:
            ce_rows[rows] = row_ce
        if not any_grad:
            continue
        if u_soft is not None:
            soft_rows = u_soft if u_soft.dim() == 0 else u_soft[rows]
            g.mul_(soft_rows.to(acc).reshape(-1, 1))
            if hard and u_hard is not None:
                # g · u_soft + (u_hard − u_soft) · ce_factor · dCE/ds
                hard_rows = u_hard if u_hard.dim() == 0 else u_hard[rows]
                row_scale = ((hard_rows - soft_rows).to(acc) * cfg.ce_factor).expand(g.shape[0])
                g.add_(_hard_labels.ce_grad(s_logits, labels[rows], chunk_keep, row_scale))
        cfg.student_map.chain_(g, s_logits)
        del s_logits
        if need[2]:
            grad_b.add_(g.sum(0))
        if split_g:
            # the terms replace g, whose memory goes back before the products
            g = _bfloat16_terms_(g)
        if need[0]:
            _hidden_gradient_(grad_h, rows, kept_index, g, s_w_acc, terms=split_g)
        if need[1]:
            _weight_gradient_(grad_w, g, h, terms=split_g)
    return (
        kd_rows,
        ce_rows,
        grad_h,
        None if grad_w is None else _in(s_w.dtype, grad_w),
        None if grad_b is None else _in(s_b.dtype, grad_b),
    )


class FusedLinearDivergenceFunction(torch.autograd.Function):
    """Chunked linear head + divergence (+ CE); returns ``(hard_part, soft_part)``.

    Both are differentiable w.r.t. the student hidden states, weight and bias
    (never the teacher's). The forward produces the gradients of
    ``hard + soft``; the backward scales them by the upstream gradient, or,
    when the two parts get different upstream gradients (``return_parts``) or
    one per row (``reduction="none"``), recomputes the chunks.
    """

    @staticmethod
    def forward(ctx, s_h, s_w, s_b, t_h, t_w, t_b, keep, labels, cfg):
        need = tuple(ctx.needs_input_grad[:3])
        inputs = (s_h, s_w, s_b, t_h, t_w, t_b, keep, labels)
        if cfg.per_row:
            kd, ce, *_ = _chunk_pass(cfg, *inputs, (False,) * 3)
            ctx.save_for_backward(*inputs)
            soft, hard = kd * cfg.kd_factor, ce * cfg.ce_factor
        else:
            kd, ce, grad_h, grad_w, grad_b = _chunk_pass(cfg, *inputs, need)
            # the inputs only for a recompute with separate upstream gradients
            ctx.save_for_backward(grad_h, grad_w, grad_b, *(inputs if cfg.separable else (None,) * 8))
            soft, hard = kd.sum() * cfg.kd_factor, ce.sum() * cfg.ce_factor
        ctx.cfg = cfg
        ctx.need = need
        return hard, soft

    @staticmethod
    def backward(ctx, grad_hard, grad_soft):
        cfg, need = ctx.cfg, ctx.need
        if not any(need):
            return (None,) * 9
        # without return_parts the parts are only used through hard + soft:
        # their upstream gradients are equal
        split = cfg.separable and cfg.ce_factor != 0.0 and (
            torch.compiler.is_compiling() or not torch.equal(grad_hard, grad_soft)
        )
        if cfg.per_row or split:
            inputs = ctx.saved_tensors[-8:]
            upstream = (grad_soft, grad_hard if split else None)
            _, _, grad_h, grad_w, grad_b = _chunk_pass(cfg, *inputs, need, upstream)
        else:
            grad_h, grad_w, grad_b = (
                None if g is None else scale_by_upstream(g, grad_soft) for g in ctx.saved_tensors[:3]
            )
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def _check_linear(prefix: str, hidden, weight, bias):
    """Validated ``(hidden, weight, bias)`` of one model (their dtypes may differ)."""
    hidden = _validate.tensor(f"{prefix}_hidden", hidden, min_dim=2)
    weight = _validate.tensor(f"{prefix}_weight", weight, min_dim=2)
    if weight.dim() != 2:
        raise ValueError(f"{prefix}_weight must be 2-D (V, H), got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{prefix}_weight shape {tuple(weight.shape)} must be (V, H) with H = {prefix}_hidden's "
            f"last dim {hidden.shape[-1]}"
        )
    _validate.same_device(f"{prefix}_weight", weight, f"{prefix}_hidden", hidden)
    if bias is not None:
        bias = _validate.tensor(f"{prefix}_bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{prefix}_bias shape {tuple(bias.shape)} must be (V,) = ({weight.shape[0]},)")
        _validate.same_device(f"{prefix}_bias", bias, f"{prefix}_hidden", hidden)
    return hidden, weight, bias


def _check_float64_not_mixed(tensors: dict[str, torch.Tensor | None]) -> None:
    """float32, bfloat16 and float16 inputs mix freely; float64 ones (the precision of
    gradient checks) only with float64, so that a stray float64 tensor is not silently
    promoting a whole float32 computation."""
    ref_name, ref = next(iter(tensors.items()))
    for name, x in tensors.items():
        if x is not None and (x.dtype == torch.float64) != (ref.dtype == torch.float64):
            raise ValueError(
                f"{name} dtype {x.dtype} does not match {ref_name} dtype {ref.dtype}: float64 inputs "
                "cannot be mixed with other dtypes"
            )


def _logit_map(prefix: str, scale, softcapping) -> _LogitMap:
    scale = _validate.real(f"{prefix}_logit_scale", scale, low=0.0, low_open=True)
    if softcapping is not None:
        softcapping = _validate.real(f"{prefix}_logit_softcapping", softcapping, low=0.0, low_open=True)
    return _LogitMap(scale, softcapping)


def _autocast_cast(tensors: list[torch.Tensor | None], device_type: str) -> list[torch.Tensor | None]:
    """What autocast does to a linear layer's inputs: floating tensors other than
    float64 to the autocast dtype of ``device_type`` (differentiably), when autocast
    is enabled there; otherwise ``tensors`` unchanged."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return [x if x is None or x.dtype == torch.float64 else x.to(dtype) for x in tensors]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    divergence: str = "kl",
    temperature: float = 1.0,
    beta: float | None = None,
    alpha: float | None = None,
    scale: float | None = None,
    reduction: str = "batchmean",
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    hard_weight: float | None = None,
    soft_weight: float = 1.0,
    return_parts: bool = False,
    num_items_in_batch: float | torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_logit_softcapping: float | None = None,
    teacher_logit_softcapping: float | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    weight_grad_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fastkd.divergence` on two linear heads' logits, without materialising them.

    ``student_logits = m_s(student_hidden @ student_weightᵀ + student_bias)``
    and ``teacher_logits = m_t(teacher_hidden @ teacher_weightᵀ +
    teacher_bias)``, where ``m(z) = c · tanh(a · z / c)`` with ``a`` the
    model's ``*_logit_scale`` and ``c`` its ``*_logit_softcapping`` (``a · z``
    without a cap: Gemma's ``final_logit_softcapping``, Cohere's
    ``logit_scale``). The loss is exactly ``fastkd.divergence(student_logits,
    teacher_logits, ...)`` (or, with ``hard_weight``, ``hard_weight ·
    CE(student_logits, labels) + soft_weight · divergence``, as
    :func:`fastkd.divergence` defines it), but rows are processed
    ``chunk_size`` at a time and the ``(N, V)`` logits never exist. The
    teacher side runs without autograd: ``teacher_hidden``,
    ``teacher_weight`` and ``teacher_bias`` get no gradient, even if they
    require one.

    Precision: every chunk's logits, their softmax and gradient, and every
    matrix product are float32 (float64 for float64 inputs), whatever the
    inputs' dtypes (the products of bfloat16 / float16 operands are summed in
    float32; nothing of size ``(N, V)`` is converted). On CPU the operands
    are read in their own dtypes; on other devices each bfloat16 / float16
    weight is converted to float32 once per call (``V × H × 4`` bytes). Each
    gradient is rounded to its input's dtype once. For a bfloat16 student
    head on CPU, the logits' float32 gradient enters the gradients' products
    as two bfloat16 terms (16 significant bits: ``2⁻¹⁶`` relative, against
    the final rounding's ``2⁻⁸``), so that every product is a bfloat16 gemm.

    Under ``torch.autocast`` (``cpu`` or ``cuda``) the floating inputs other
    than float64 are cast to the autocast dtype first, as autocast casts a
    linear layer's inputs; the gradients flow back through the casts (float32
    parameters get float32 gradients).

    Args:
        student_hidden: ``(N, H_s)`` or ``(B, T, H_s)`` (any leading dims,
            flattened into rows) float32 / bfloat16 / float16 / float64.
        student_weight: ``(V, H_s)``, the student's output projection
            (``nn.Linear(H_s, V).weight``), same device; its dtype may differ
            from ``student_hidden``'s (float64 mixes only with float64).
        teacher_hidden: ``(N, H_t)`` / ``(B, T, H_t)``: same leading dims; any
            of the dtypes above (a bfloat16 teacher with a float32 student).
        teacher_weight: ``(V, H_t)``, same V as ``student_weight`` (a teacher
            vocabulary padded beyond it raises a ``ValueError`` giving the slice
            ``teacher_weight[:V]``).
        student_bias, teacher_bias: optional ``(V,)``.
        divergence, temperature, beta, alpha, scale, reduction, labels,
        ignore_index, mask, hard_weight, soft_weight: as :func:`fastkd.divergence`
            (``labels`` / ``mask`` have the hidden states' leading shape;
            ``"batchmean"`` divides by kept tokens).
        return_parts: return ``(total, hard_part, soft_part)``, each
            differentiable, as :func:`fastkd.divergence`'s (back-propagating
            the parts with different upstream gradients recomputes the chunks).
        num_items_in_batch: as :func:`fastkd.divergence` (the kept-token sum
            over this count, in place of the kept-token count; ``"batchmean"``
            only).
        student_logit_scale, teacher_logit_scale: positive factor ``a`` of
            each model's logits (default 1).
        student_logit_softcapping, teacher_logit_softcapping: positive cap
            ``c`` of each model's logits, or None (default) for no cap.
        chunk_size: rows per chunk; ``None`` chooses it from ``memory_budget``.
        memory_budget: bytes of per-chunk temporaries (logits, their gradient)
            when ``chunk_size`` is None; ``None``: :func:`default_chunk_rows`
            (on CPU :func:`default_memory_budget`, 128 MiB for float32 /
            float64, 64 MiB for bfloat16 / float16; on a GPU at most
            ``⌈V/H⌉`` chunks).
        weight_grad_dtype: what the weight gradient is summed over the
            chunks in: ``None`` (default) or ``torch.float32``, the compute
            dtype (float32; float64 for float64), rounded to the weight's
            dtype once at the end (``V × H × 4`` bytes of accumulator); or,
            for bfloat16 / float16 weights, the weight's dtype (the chunk's
            gradient rounded to it for this product and one rounding per
            chunk, Liger-Kernel's convention: no accumulator, a larger
            error, docs/accuracy.md). The bias gradient is always summed in
            the compute dtype.
        backend: ``"auto"``, ``"reference"`` (unfused: full logits and
            autograd, the parity oracle), ``"cpu"``, ``"cuda"``, ``"triton"``
            (the divergence kernel each chunk runs).

    Returns:
        float32 scalar (float64 for float64 inputs), or ``(N,)`` / ``(B, T)``
        for ``"none"``. Gradients come back in each input's dtype.
    """
    if num_items_in_batch is not None:
        def summed(*, reduction, scale, hard_weight):
            return fused_linear_divergence(
                student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=student_bias,
                teacher_bias=teacher_bias, divergence=divergence, temperature=temperature, beta=beta,
                alpha=alpha, scale=scale, reduction=reduction, labels=labels, ignore_index=ignore_index,
                mask=mask, hard_weight=hard_weight, soft_weight=soft_weight, return_parts=return_parts,
                student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                student_logit_softcapping=student_logit_softcapping,
                teacher_logit_softcapping=teacher_logit_softcapping, chunk_size=chunk_size,
                memory_budget=memory_budget, weight_grad_dtype=weight_grad_dtype, backend=backend,
            )

        return over_given_items(
            summed, num_items_in_batch, reduction=reduction, scale=scale, temperature=temperature,
            hard_weight=hard_weight,
        )
    s_h, s_w, s_b = _check_linear("student", student_hidden, student_weight, student_bias)
    t_h, t_w, t_b = _check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias)
    if t_h.shape[:-1] != s_h.shape[:-1]:
        raise ValueError(
            f"teacher_hidden leading shape {tuple(t_h.shape[:-1])} does not match student_hidden's "
            f"{tuple(s_h.shape[:-1])}"
        )
    _validate.same_device("teacher_hidden", t_h, "student_hidden", s_h)
    _check_float64_not_mixed(
        {"student_hidden": s_h, "student_weight": s_w, "student_bias": s_b, "teacher_hidden": t_h,
         "teacher_weight": t_w, "teacher_bias": t_b}
    )
    _validate.teacher_vocabulary(
        f"teacher_weight vocabulary size {t_w.shape[0]} does not match student_weight's {s_w.shape[0]}",
        t_w.shape[0], s_w.shape[0], "teacher_weight[:{V}] (and teacher_bias[:{V}])",
    )
    if t_w.shape[0] != s_w.shape[0]:
        raise ValueError(
            f"teacher_weight vocabulary size {t_w.shape[0]} does not match student_weight's {s_w.shape[0]}"
        )
    vocab = s_w.shape[0]
    if vocab == 0:
        raise ValueError("student_weight must have at least one row (vocabulary entry)")
    options = DivergenceOptions.from_arguments(
        divergence=divergence, temperature=temperature, beta=beta, alpha=alpha, scale=scale,
        reduction=reduction, ignore_index=ignore_index, labels=labels, mask=mask, hard_weight=hard_weight,
        soft_weight=soft_weight, ref=s_h, check_vocab=False,
    )
    temperature, beta, alpha, scale = options.temperature, options.beta, options.alpha, options.scale
    labels, mask = options.labels, options.mask
    hard_weight, soft_weight, mixing = options.hard_weight, options.soft_weight, options.mixing
    if not isinstance(return_parts, bool):
        raise ValueError(f"return_parts must be a bool, got {type(return_parts).__name__}")
    student_map = _logit_map("student", student_logit_scale, student_logit_softcapping)
    teacher_map = _logit_map("teacher", teacher_logit_scale, teacher_logit_softcapping)
    lead = s_h.shape[:-1]
    if chunk_size is not None:
        chunk_size = _positive_int("chunk_size", chunk_size)
    if memory_budget is not None:
        memory_budget = _positive_int("memory_budget", memory_budget)
    reduced_weight = s_w.dtype in (torch.bfloat16, torch.float16)
    if weight_grad_dtype is not None and (
        not reduced_weight or weight_grad_dtype not in (torch.float32, s_w.dtype)
    ):
        raise ValueError(
            "weight_grad_dtype must be None, or torch.float32 or the weight's dtype for bfloat16 / float16 "
            f"weights, got {weight_grad_dtype} for {s_w.dtype} weights"
        )

    keep = kept_rows(labels, ignore_index, mask)
    if mixing:
        _hard_labels.check_label_range(labels.reshape(-1), keep, vocab)

    device_type = s_h.device.type
    s_h, s_w, s_b, t_h, t_w, t_b = _autocast_cast([s_h, s_w, s_b, t_h, t_w, t_b], device_type)
    # the casts above are autocast's; nothing below is autocast again
    with torch.autocast(device_type, enabled=False):
        chosen = _dispatch.resolve(backend, s_h)
        if chosen == "reference":
            return _reference.fused_linear_divergence(
                s_h, s_w, t_h, t_w, student_bias=s_b, teacher_bias=t_b, labels=labels,
                hard_weight=hard_weight, soft_weight=soft_weight, return_parts=return_parts,
                student_logit_scale=student_map.scale, teacher_logit_scale=teacher_map.scale,
                student_logit_softcapping=student_map.cap, teacher_logit_softcapping=teacher_map.cap,
                divergence=divergence, temperature=temperature, beta=beta, alpha=alpha, scale=scale,
                reduction=reduction, ignore_index=ignore_index, mask=mask,
            )

        s_rows = s_h.reshape(-1, s_h.shape[-1])
        t_rows = t_h.reshape(-1, t_h.shape[-1])
        n_rows = s_rows.shape[0]
        if reduction in ("none", "sum"):
            kd_norm = ce_norm = 1
        else:
            n_kept = n_rows if keep is None else int(keep.sum().item())
            kd_norm = max(n_kept * (vocab if reduction == "mean" else 1), 1)
            ce_norm = max(n_kept, 1)
        kind, coef = options.kernel_divergence()
        compute = compute_dtype(*(x.dtype for x in (s_h, s_w, t_h, t_w)))
        cfg = _Config(
            kind=kind,
            inv_temperature=1.0 / temperature,
            coef=coef,
            kd_factor=soft_weight * scale / kd_norm,
            ce_factor=hard_weight / ce_norm,
            per_row=reduction == "none",
            separable=return_parts,
            chunk=chunk_size or (
                default_chunk_rows(n_rows, vocab, s_rows.shape[1], s_h.dtype, device_type)
                if memory_budget is None
                else chunk_rows(vocab, compute, reduction == "none", memory_budget)
            ),
            backend=chosen,
            compute=compute,
            weight_grad_dtype=compute if weight_grad_dtype is None else weight_grad_dtype,
            student_map=student_map,
            teacher_map=teacher_map,
        )
        flat_labels = labels.reshape(-1).long() if mixing else None
        hard, soft = FusedLinearDivergenceFunction.apply(
            s_rows,
            s_w,
            s_b,
            t_rows.detach(),
            t_w.detach(),
            None if t_b is None else t_b.detach(),
            keep,
            flat_labels,
            cfg,
        )
        if reduction == "none":
            hard, soft = hard.reshape(lead), soft.reshape(lead)
        total = hard + soft
    return (total, hard, soft) if return_parts else total


class FusedLinearDivergenceLoss(nn.Module):
    """Module form of :func:`fused_linear_divergence`; keyword arguments as there.

    ``forward(student_hidden, student_weight, teacher_hidden, teacher_weight,
    student_bias=None, teacher_bias=None, labels=None, mask=None)``; pass
    ``lm_head.weight`` / ``lm_head.bias`` of each model.
    """

    def __init__(
        self,
        *,
        divergence: str = "kl",
        temperature: float = 1.0,
        beta: float | None = None,
        alpha: float | None = None,
        scale: float | None = None,
        reduction: str = "batchmean",
        ignore_index: int = -100,
        hard_weight: float | None = None,
        soft_weight: float = 1.0,
        student_logit_scale: float = 1.0,
        teacher_logit_scale: float = 1.0,
        student_logit_softcapping: float | None = None,
        teacher_logit_softcapping: float | None = None,
        chunk_size: int | None = None,
        memory_budget: int | None = None,
        weight_grad_dtype: torch.dtype | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.options = dict(
            divergence=divergence,
            temperature=temperature,
            beta=beta,
            alpha=alpha,
            scale=scale,
            reduction=reduction,
            ignore_index=ignore_index,
            hard_weight=hard_weight,
            soft_weight=soft_weight,
            student_logit_scale=student_logit_scale,
            teacher_logit_scale=teacher_logit_scale,
            student_logit_softcapping=student_logit_softcapping,
            teacher_logit_softcapping=teacher_logit_softcapping,
            chunk_size=chunk_size,
            memory_budget=memory_budget,
            weight_grad_dtype=weight_grad_dtype,
            backend=backend,
        )

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return fused_linear_divergence(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            labels=labels,
            mask=mask,
            **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
