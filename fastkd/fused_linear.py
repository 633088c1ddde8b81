"""Fused linear head + softmax divergence for LLM distillation (docs/spec.md §1, "Fused linear").

``fused_linear_divergence`` computes ``fastkd.divergence`` on
``student_hidden @ student_weightᵀ + student_bias`` and
``teacher_hidden @ teacher_weightᵀ + teacher_bias`` without ever holding the
full ``(N, V)`` logits. Rows are processed in chunks; per chunk:

1. student and teacher logits, one matmul each (``addmm`` with the bias);
2. the fused divergence op (``torch.ops.fastkd.divergence_forward`` or the
   Triton kernel), which returns the row losses *and* the gradient w.r.t. the
   chunk's student logits, already multiplied by the reduction's factor; with
   ``hard_weight`` the same pass gives the rows' cross-entropy and adds its
   gradient;
3. the chunk's contribution to ``grad_hidden`` (``g @ W``, its own rows),
   ``grad_weight`` (``gᵀ h``, accumulated) and ``grad_bias`` (``Σ g``).

So the forward produces the gradients (Liger-style) and the backward only
multiplies them by the upstream gradient. Memory beyond the inputs: one
chunk's logits and gradient (bounded by ``memory_budget``) plus the gradients
themselves. For bfloat16 / float16 the weight gradient is accumulated in the
input dtype by default (``addmm`` into it, one rounding per chunk: the
Liger-Kernel convention, no extra memory), or in a float32 accumulator with
``weight_grad_dtype=torch.float32`` (one rounding at the end, as the
unfused backward; ``V × H × 4`` bytes more). With ``reduction="none"`` the
upstream gradient differs per row and is only known in backward, which then
recomputes the chunks (twice the matmuls).
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

    128 MiB for float32 / float64 (349 rows at V = 32000 in float32) and
    32 MiB for bfloat16 / float16 (174 rows). Each chunk adds its ``gᵀ h``
    into the weight gradient, reading and writing all ``V × H`` of it, so
    fewer, larger chunks are faster: on the development CPU (N = 4096,
    H = 1024, V = 32000) float32 took 1.11× as long at 174-row chunks as at
    349-row ones, while bfloat16, whose gradient is half the size, took the
    same time at 174 and 349 rows. bfloat16 / float16 gradients being half
    the size, their chunks are kept small enough for the whole call to need a
    quarter of the unfused path's memory there.
    """
    return 32 * 2**20 if dtype in (torch.bfloat16, torch.float16) else 128 * 2**20


def chunk_rows(vocab: int, dtype: torch.dtype, per_row_upstream: bool, memory_budget: int) -> int:
    """Rows per chunk so that the chunk's temporaries fit in ``memory_budget`` bytes.

    Per row: student logits, teacher logits and their gradient in the input
    dtype; for bfloat16 / float16 with a per-row upstream gradient
    (``reduction="none"``) a float32 row more, the gradient it multiplies.
    Besides the chunk: the weight gradient (and with ``weight_grad_dtype=
    torch.float32`` for bfloat16 / float16 its float32 accumulator and one
    chunk's product ``gᵀ h``).
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_row = vocab * (3 * itemsize + (4 if itemsize < 4 and per_row_upstream else 0))
    return max(1, memory_budget // max(per_row, 1))


@dataclass(frozen=True)
class _Config:
    kind: int  # fastkd::divergence::Kind
    inv_temperature: float
    coef: float  # β (JSD) or α (skew), interior
    kd_factor: float  # soft_weight · scale / norm: multiplies the divergence row losses
    ce_factor: float  # hard_weight / norm: multiplies the CE row losses (0 = no CE)
    per_row: bool  # reduction == "none"
    chunk: int
    backend: str
    weight_grad_dtype: torch.dtype  # accumulator of grad_weight (and of grad_bias: float32 at least)


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool) -> None:
    """``out = a @ b``, or ``out += a @ b`` with ``accumulate``; out [M, N], a [M, K], b [K, N].

    On CPU tensors the product is ``fastkd::fused_linear_addmm_``, whose
    result does not depend on the thread count (a BLAS gemm may split a long
    K between threads); elsewhere ATen's.
    """
    if out.device.type == "cpu" and _ops.CPU_EXTENSION_ERROR is None:
        torch.ops.fastkd.fused_linear_addmm_(out, a, b, 1.0 if accumulate else 0.0)
    elif accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


if _ops.CPU_EXTENSION_ERROR is None:

    @torch.library.register_fake("fastkd::fused_linear_addmm_")
    def _fused_linear_addmm_fake(out, a, b, beta):
        return None


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``hidden @ weightᵀ (+ bias)``: [rows, H] and [V, H] give [rows, V]."""
    out = hidden.new_empty((hidden.shape[0], weight.shape[0]))
    if bias is not None:
        out.copy_(bias.expand_as(out))
    _matmul_into(out, hidden, weight.t(), accumulate=bias is not None)
    return out


def _chunk_pass(cfg: _Config, s_h, s_w, s_b, t_h, t_w, t_b, keep, labels, need, row_upstream=None):
    """One walk over the row chunks.

    Args:
        need: ``(hidden, weight, bias)``: which student gradients to produce.
        row_upstream: ``(N,)`` per-row upstream gradient (``reduction="none"``
            backward), or None.

    Returns:
        ``(kd_rows (N,), ce_rows (N,), grad_hidden, grad_weight, grad_bias)``;
        the row losses unscaled (accumulation dtype), the gradients already
        multiplied by the reduction factors (and ``row_upstream``), None where
        not needed.
    """
    n, vocab = s_h.shape[0], s_w.shape[0]
    dtype = s_h.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    any_grad = any(need)
    hard = cfg.ce_factor != 0.0
    kd_rows = s_h.new_empty((n,), dtype=acc)
    ce_rows = s_h.new_zeros((n,), dtype=acc)
    grad_h = s_h.new_empty(s_h.shape) if need[0] else None  # new_empty is contiguous
    grad_w = s_w.new_zeros(s_w.shape, dtype=cfg.weight_grad_dtype) if need[1] else None
    grad_b = s_w.new_zeros((vocab,), dtype=acc) if need[2] else None
    for start in range(0, n, cfg.chunk):
        rows = slice(start, min(start + cfg.chunk, n))
        h = s_h[rows]
        s_logits = _logits(h, s_w, s_b)
        t_logits = _logits(t_h[rows], t_w, t_b)
        chunk_keep = None if keep is None else keep[rows]
        # the divergence and (with labels) the cross-entropy in one kernel
        # pass; g = kd_factor · dℓ/ds + ce_factor · dCE/ds
        row_loss, g, _, row_ce = run_divergence_kernel(
            cfg.backend, s_logits, t_logits, chunk_keep, cfg.kind, cfg.inv_temperature, cfg.coef,
            cfg.kd_factor, any_grad, False, labels[rows] if hard else None,
            cfg.ce_factor if hard else 0.0,
        )
        kd_rows[rows] = row_loss
        if hard:
            ce_rows[rows] = row_ce
        if not any_grad:
            continue
        del s_logits, t_logits
        if row_upstream is not None:
            # in the accumulation dtype (for float32 / float64 the kernel's
            # own buffer), then rounded once to the input dtype
            g_acc = g if g.dtype == acc else g.to(acc)
            g_acc.mul_(row_upstream[rows].to(acc).unsqueeze(1))
            g = g_acc if g_acc.dtype == dtype else g_acc.to(dtype)
        if need[0]:
            _matmul_into(grad_h[rows], g, s_w, accumulate=False)
        if need[1]:
            if grad_w.dtype == dtype:
                # accumulated inside the product (float32 accumulation within
                # a chunk's product; for bfloat16 / float16 rounded per chunk)
                _matmul_into(grad_w, g.t(), h, accumulate=True)
            else:
                # bfloat16 / float16 into a float32 accumulator: the chunk's
                # product in the input dtype (twice as fast as a float32 one
                # on CPUs with bf16 units), summed in float32
                product = s_w.new_empty(s_w.shape)
                _matmul_into(product, g.t(), h, accumulate=False)
                grad_w.add_(product)
        if need[2]:
            grad_b.add_(g.sum(0, dtype=acc))
    cast = (lambda x: x) if acc == dtype else (lambda x: None if x is None else x.to(dtype))
    return kd_rows, ce_rows, grad_h, cast(grad_w), cast(grad_b)


class FusedLinearDivergenceFunction(torch.autograd.Function):
    """Chunked linear head + divergence (+ CE); returns ``(total, hard_part, soft_part)``.

    Only ``total`` is differentiable. Gradients flow to the student hidden
    states, weight and bias; never to the teacher's.
    """

    @staticmethod
    def forward(ctx, s_h, s_w, s_b, t_h, t_w, t_b, keep, labels, cfg):
        need = tuple(ctx.needs_input_grad[:3])
        if cfg.per_row:
            kd, ce, *_ = _chunk_pass(cfg, s_h, s_w, s_b, t_h, t_w, t_b, keep, labels, (False,) * 3)
            ctx.save_for_backward(s_h, s_w, s_b, t_h, t_w, t_b, keep, labels)
            soft, hard = kd * cfg.kd_factor, ce * cfg.ce_factor
        else:
            kd, ce, grad_h, grad_w, grad_b = _chunk_pass(
                cfg, s_h, s_w, s_b, t_h, t_w, t_b, keep, labels, need
            )
            ctx.save_for_backward(grad_h, grad_w, grad_b)
            soft, hard = kd.sum() * cfg.kd_factor, ce.sum() * cfg.ce_factor
        ctx.cfg = cfg
        ctx.need = need
        ctx.mark_non_differentiable(hard, soft)
        return hard + soft, hard, soft

    @staticmethod
    def backward(ctx, grad_total, _grad_hard, _grad_soft):
        cfg, need = ctx.cfg, ctx.need
        if not any(need):
            return (None,) * 9
        if cfg.per_row:
            s_h, s_w, s_b, t_h, t_w, t_b, keep, labels = ctx.saved_tensors
            _, _, grad_h, grad_w, grad_b = _chunk_pass(
                cfg, s_h, s_w, s_b, t_h, t_w, t_b, keep, labels, need, row_upstream=grad_total
            )
        else:
            grad_h, grad_w, grad_b = (
                None if g is None else scale_by_upstream(g, grad_total)
                for g in ctx.saved_tensors
            )
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def _check_linear(prefix: str, hidden, weight, bias):
    """Validated ``(hidden, weight, bias)`` of one model."""
    hidden = _validate.tensor(f"{prefix}_hidden", hidden, min_dim=2)
    weight = _validate.tensor(f"{prefix}_weight", weight, min_dim=2)
    if weight.dim() != 2:
        raise ValueError(f"{prefix}_weight must be 2-D (V, H), got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{prefix}_weight shape {tuple(weight.shape)} must be (V, H) with H = {prefix}_hidden's "
            f"last dim {hidden.shape[-1]}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"{prefix}_weight dtype {weight.dtype} does not match {prefix}_hidden dtype {hidden.dtype}"
        )
    _validate.same_device(f"{prefix}_weight", weight, f"{prefix}_hidden", hidden)
    if bias is not None:
        bias = _validate.tensor(f"{prefix}_bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{prefix}_bias shape {tuple(bias.shape)} must be (V,) = ({weight.shape[0]},)")
        if bias.dtype != hidden.dtype:
            raise ValueError(
                f"{prefix}_bias dtype {bias.dtype} does not match {prefix}_hidden dtype {hidden.dtype}"
            )
        _validate.same_device(f"{prefix}_bias", bias, f"{prefix}_hidden", hidden)
    return hidden, weight, bias


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
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    weight_grad_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fastkd.divergence` on two linear heads' logits, without materialising them.

    ``student_logits = student_hidden @ student_weightᵀ + student_bias`` and
    ``teacher_logits = teacher_hidden @ teacher_weightᵀ + teacher_bias``; the
    loss is exactly ``fastkd.divergence(student_logits, teacher_logits, ...)``
    (or, with ``hard_weight``, ``hard_weight · CE(student_logits, labels) +
    soft_weight · divergence``, as :func:`fastkd.divergence` defines it), but
    rows are processed ``chunk_size`` at a time and the ``(N, V)`` logits never
    exist. The teacher side runs without autograd: ``teacher_hidden``,
    ``teacher_weight`` and ``teacher_bias`` get no gradient, even if they
    require one.

    Args:
        student_hidden: ``(N, H_s)`` or ``(B, T, H_s)`` (any leading dims,
            flattened into rows) float32 / bfloat16 / float16 / float64.
        student_weight: ``(V, H_s)``, the student's output projection
            (``nn.Linear(H_s, V).weight``), same dtype and device.
        teacher_hidden: ``(N, H_t)`` / ``(B, T, H_t)``: same leading dims, same dtype.
        teacher_weight: ``(V, H_t)``, same V as ``student_weight``.
        student_bias, teacher_bias: optional ``(V,)``.
        divergence, temperature, beta, alpha, scale, reduction, labels,
        ignore_index, mask, hard_weight, soft_weight: as :func:`fastkd.divergence`
            (``labels`` / ``mask`` have the hidden states' leading shape;
            ``"batchmean"`` divides by kept tokens).
        return_parts: return ``(total, hard_part, soft_part)``; ``total`` is
            the only one with a gradient (the parts are for logging).
        num_items_in_batch: as :func:`fastkd.divergence` (the kept-token sum
            over this count, in place of the kept-token count; ``"batchmean"``
            only).
        chunk_size: rows per chunk; ``None`` chooses it from ``memory_budget``.
        memory_budget: bytes of per-chunk temporaries (logits, their gradient)
            when ``chunk_size`` is None; ``None``: :func:`default_memory_budget`
            (128 MiB for float32 / float64, 32 MiB for bfloat16 / float16).
        weight_grad_dtype: what ``grad_weight`` is summed over the chunks in:
            ``None`` (default) the input dtype (for bfloat16 / float16 one
            rounding per chunk, Liger-Kernel's convention, no extra memory),
            or ``torch.float32`` for bfloat16 / float16 inputs (one rounding
            at the end, as the unfused backward, at ``V × H × 4`` bytes of
            accumulator plus one chunk's ``V × H`` product). The bias gradient
            is always summed in float32 (float64 for float64).
        backend: ``"auto"``, ``"reference"`` (unfused: full logits and
            autograd, the parity oracle), ``"cpu"``, ``"cuda"``, ``"triton"``
            (the divergence kernel each chunk runs).

    Returns:
        float32 scalar (float64 for float64 inputs), or ``(N,)`` / ``(B, T)``
        for ``"none"``. Gradients come back in the input dtype (see
        ``weight_grad_dtype`` for how the weight gradient is summed).
    """
    if num_items_in_batch is not None:
        def summed(*, reduction, scale, hard_weight):
            return fused_linear_divergence(
                student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=student_bias,
                teacher_bias=teacher_bias, divergence=divergence, temperature=temperature, beta=beta,
                alpha=alpha, scale=scale, reduction=reduction, labels=labels, ignore_index=ignore_index,
                mask=mask, hard_weight=hard_weight, soft_weight=soft_weight, return_parts=return_parts,
                chunk_size=chunk_size, memory_budget=memory_budget, weight_grad_dtype=weight_grad_dtype,
                backend=backend,
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
    if t_h.dtype != s_h.dtype:
        raise ValueError(f"teacher_hidden dtype {t_h.dtype} does not match student_hidden dtype {s_h.dtype}")
    _validate.same_device("teacher_hidden", t_h, "student_hidden", s_h)
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
    lead = s_h.shape[:-1]
    if chunk_size is not None:
        chunk_size = _positive_int("chunk_size", chunk_size)
    if memory_budget is None:
        memory_budget = default_memory_budget(s_h.dtype)
    memory_budget = _positive_int("memory_budget", memory_budget)
    if weight_grad_dtype is None:
        weight_grad_dtype = s_h.dtype
    elif weight_grad_dtype != torch.float32 or s_h.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            "weight_grad_dtype must be None (the input dtype) or torch.float32 for bfloat16 / float16 "
            f"inputs, got {weight_grad_dtype} for {s_h.dtype} inputs"
        )
    if not isinstance(return_parts, bool):
        raise ValueError(f"return_parts must be a bool, got {type(return_parts).__name__}")

    keep = kept_rows(labels, ignore_index, mask)
    if mixing:
        _hard_labels.check_label_range(labels.reshape(-1), keep, vocab)

    chosen = _dispatch.resolve(backend, s_h)
    if chosen == "reference":
        return _reference.fused_linear_divergence(
            s_h,
            s_w,
            t_h,
            t_w,
            student_bias=s_b,
            teacher_bias=t_b,
            labels=labels,
            hard_weight=hard_weight,
            soft_weight=soft_weight,
            return_parts=return_parts,
            divergence=divergence,
            temperature=temperature,
            beta=beta,
            alpha=alpha,
            scale=scale,
            reduction=reduction,
            ignore_index=ignore_index,
            mask=mask,
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
    cfg = _Config(
        kind=kind,
        inv_temperature=1.0 / temperature,
        coef=coef,
        kd_factor=soft_weight * scale / kd_norm,
        ce_factor=hard_weight / ce_norm,
        per_row=reduction == "none",
        chunk=chunk_size or chunk_rows(vocab, s_h.dtype, reduction == "none", memory_budget),
        backend=chosen,
        weight_grad_dtype=weight_grad_dtype,
    )
    flat_labels = labels.reshape(-1).long() if mixing else None
    total, hard, soft = FusedLinearDivergenceFunction.apply(
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
        total, hard, soft = total.reshape(lead), hard.reshape(lead), soft.reshape(lead)
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
