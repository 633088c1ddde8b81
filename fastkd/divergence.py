"""The divergence family (docs/spec.md §1): KL, reverse KL, JSD, skew KL, TVD and Hinton KD.

:func:`divergence` validates, picks a backend and runs one fused row kernel
(``fastkd::divergence_forward`` on cpu / cuda, ``kernels/divergence.py`` on
triton) through :class:`DivergenceFunction`, or, with hard labels on a
compiled backend, :class:`HardSoftDivergenceFunction`. Several teachers and a
vocabulary-parallel ``process_group`` route to :mod:`fastkd.mixture` and
:mod:`fastkd.vocab_parallel`. The mathematics is
:func:`fastkd.reference.divergence`'s.
"""

from __future__ import annotations

import torch
from torch import nn

from fastkd import _dispatch, _hard_labels, _row_loss, _validate
from fastkd import reference as _reference
from fastkd._backend import run_divergence_kernel
from fastkd._divergence_options import DivergenceOptions
from fastkd.mixture import mixture_divergence
from fastkd.vocab_parallel import vocab_parallel_divergence

__all__ = [
    "DivergenceFunction",
    "DivergenceLoss",
    "HardSoftDivergenceFunction",
    "KDLoss",
    "divergence",
    "kd_loss",
]


class DivergenceFunction(torch.autograd.Function):
    """Fused softmax divergence on ``(N, V)`` logits, or the rows of an ``(A, R, V)`` view
    (:func:`fastkd._row_loss.as_rows_in_place`); one kernel call.

    The forward kernel returns the row losses and, for the inputs that need
    them, the gradients already multiplied by the reduction's factor; the
    backward only applies the upstream gradient.
    """

    @staticmethod
    def forward(ctx, student, teacher, row_mask, kind, inv_temperature, coef, factor, per_row, backend):
        row_loss, grad_s, grad_t, _ = run_divergence_kernel(
            backend, student, teacher, row_mask, kind, inv_temperature, coef, factor,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )
        ctx.save_for_backward(grad_s, grad_t)
        ctx.shapes = student.shape, teacher.shape
        return row_loss * factor if per_row else row_loss.sum() * factor

    @staticmethod
    def backward(ctx, grad_output):
        grad_s, grad_t = ctx.saved_tensors
        student_shape, teacher_shape = ctx.shapes
        # the kernel's gradients are (N, V) rows; (A, R, V) inputs take them as (A, R, V)
        grad_student = grad_teacher = None
        if ctx.needs_input_grad[0]:
            grad_student = _row_loss.scale_by_upstream(grad_s, grad_output).view(student_shape)
        if ctx.needs_input_grad[1]:
            grad_teacher = _row_loss.scale_by_upstream(grad_t, grad_output).view(teacher_shape)
        return grad_student, grad_teacher, None, None, None, None, None, None, None


class HardSoftDivergenceFunction(torch.autograd.Function):
    """``(soft, hard)``: the fused divergence and the hard-label cross-entropy
    of the same rows, from one kernel call (docs/spec.md §1, hard-label mixing).

    The kernel computes the row divergences, the row cross-entropies (from the
    student log-sum-exp it already has) and one student gradient,
    ``soft_factor · dℓ/ds + hard_factor · dCE/ds``. When both outputs reach
    the loss with the same upstream gradient (``total = soft + hard``, all
    that is possible without ``return_parts``) the backward only scales it.
    With ``return_parts`` the parts may be used apart; only then are the
    logits kept, and where the two upstream gradients differ the CE gradient
    is recomputed from them (chunked ATen, ``fastkd._hard_labels``) to
    separate the terms.
    """

    @staticmethod
    def forward(ctx, student, teacher, row_mask, labels, kind, inv_temperature, coef, soft_factor,
                hard_factor, per_row, separable, backend):
        row_loss, grad_s, grad_t, row_ce = run_divergence_kernel(
            backend, student, teacher, row_mask, kind, inv_temperature, coef, soft_factor,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1], labels, hard_factor,
        )
        kept_for_split = (student, labels, row_mask) if separable else (None, None, None)
        ctx.save_for_backward(grad_s, grad_t, *kept_for_split)
        ctx.hard_factor = hard_factor
        ctx.shapes = student.shape, teacher.shape
        if per_row:
            return row_loss * soft_factor, row_ce * hard_factor
        return row_loss.sum() * soft_factor, row_ce.sum() * hard_factor

    @staticmethod
    def backward(ctx, grad_soft, grad_hard):
        grad_s, grad_t, student, labels, row_mask = ctx.saved_tensors
        grad_student = grad_teacher = None
        if ctx.needs_input_grad[0]:
            grad_student = _row_loss.split_hard_soft(
                grad_s, grad_soft, grad_hard, student, labels, row_mask, ctx.hard_factor
            ).view(ctx.shapes[0])
        if ctx.needs_input_grad[1]:
            grad_teacher = _row_loss.scale_by_upstream(grad_t, grad_soft).view(ctx.shapes[1])
        return (grad_student, grad_teacher) + (None,) * 10


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "kl",
    temperature: float = 1.0,
    beta: float | None = None,
    alpha: float | None = None,
    scale: float | None = None,
    reduction: str = "batchmean",
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    teacher_weights=None,
    process_group=None,
    hard_weight: float | None = None,
    soft_weight: float = 1.0,
    return_parts: bool = False,
    num_items_in_batch: float | torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Divergence between the temperature-softened teacher and student distributions.

    Per row ``i``: ``p = softmax(t_i / T)``, ``q = softmax(s_i / T)`` and ``ℓ_i``
    is the chosen divergence (docs/spec.md §1). ``loss = scale · reduce(ℓ)``.

    Args:
        student_logits: ``(..., V)`` float32 / bfloat16 / float16 / float64.
        teacher_logits: ``(..., V)``, same shape, dtype and device. A teacher
            vocabulary padded beyond the student's (same tokenizer) raises a
            ``ValueError`` that gives the slice ``teacher_logits[..., :V]``. Gets a
            gradient when it requires one (online / mutual distillation).
        divergence: ``"kl"`` KL(p‖q), ``"reverse_kl"`` KL(q‖p), ``"jsd"``
            (β-weighted; β=0 is KL(p‖q), β=1 is KL(q‖p) exactly),
            ``"skew_kl"`` KL(p‖αp+(1−α)q), ``"skew_reverse_kl"``
            KL(q‖αq+(1−α)p), ``"tvd"`` ½Σ|p−q|.
        temperature: ``T > 0``.
        beta: JSD weight on the teacher side, in [0, 1].
        alpha: skew weight, in [0, 1].
        scale: loss multiplier; ``None`` means ``T²`` (Hinton). Pass 1.0 for the
            TRL / Liger convention.
        reduction: ``"batchmean"`` (sum over kept rows / number of kept rows —
            for ``(B, T, V)`` input that is per token, not per sequence as in
            ``torch.nn.KLDivLoss``), ``"sum"``, ``"mean"`` (/ kept rows · V),
            ``"none"`` (one value per row, 0 for excluded rows).
        labels: ``(...)`` integer; rows with ``labels == ignore_index`` are excluded.
        mask: ``(...)`` bool; rows where it is False are excluded.
        teacher_weights: for several teachers, ``teacher_logits`` is
            ``(K, ..., V)`` and the target is the mixture
            ``Σ_k w_k softmax(t_k / T)`` with these ``(K,)`` weights (>= 0,
            summing to 1; ``None`` with ``(K, ..., V)`` teachers means
            uniform). See :func:`fastkd.mixture.mixture_divergence`.
        process_group: logits sharded along the vocabulary across the ranks
            of this ``torch.distributed`` group (tensor parallelism); the
            loss equals the unsharded one. See
            :func:`fastkd.vocab_parallel.vocab_parallel_divergence` (a
            composite path: ``backend`` must be ``"auto"`` or ``"reference"``).
        hard_weight: ``None`` / 0 (default: off) or ``> 0``: mix in the
            cross-entropy of the student against ``labels`` (required then),
            ``loss = hard_weight · CE + soft_weight · KD``. CE is at
            temperature 1, not multiplied by ``scale``, over the same kept
            rows; for ``"batchmean"`` and ``"mean"`` it is divided by the kept
            rows (not by V), for ``"sum"`` summed, for ``"none"`` per row.
            Kept rows' labels must lie in ``[0, V)``. Works with several
            teachers (the mixture is the soft term) and with
            ``process_group`` (global class ids).
        soft_weight: ``>= 0`` multiplier of the divergence term (default 1).
        return_parts: return ``(total, hard_part, soft_part)`` (weighted, so
            ``total = hard_part + soft_part``; ``hard_part`` is 0 when mixing is
            off); all three carry gradients.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``.

    Returns:
        A float32 scalar (float64 for float64 input), or ``(...)`` for ``"none"``.
        With no kept rows the loss is 0 and so is its gradient.

    With hard labels the fused backends compute the cross-entropy inside the
    divergence (or mixture) kernel's pass, from the student log-sum-exp it
    already has (the same one at ``temperature=1``; one more exponential per
    logit otherwise), and produce one combined student gradient.

    A kept row whose logits are all ``−inf`` has no distribution: the
    reference raises ``ValueError``, the fused kernels return NaN for it.
    """
    if num_items_in_batch is not None:
        def summed(*, reduction, scale, hard_weight):
            return _divergence_function(
                student_logits, teacher_logits, divergence=divergence, temperature=temperature, beta=beta,
                alpha=alpha, scale=scale, reduction=reduction, labels=labels, ignore_index=ignore_index,
                mask=mask, teacher_weights=teacher_weights, process_group=process_group,
                hard_weight=hard_weight, soft_weight=soft_weight, return_parts=return_parts, backend=backend,
            )

        return _row_loss.over_given_items(
            summed, num_items_in_batch, reduction=reduction, scale=scale, temperature=temperature,
            hard_weight=hard_weight,
        )
    s = _validate.tensor("student_logits", student_logits)
    t = _validate.tensor("teacher_logits", teacher_logits)
    several_teachers = teacher_weights is not None or t.dim() == s.dim() + 1
    if process_group is not None:
        if backend not in ("auto", "reference") or teacher_weights is not None:
            raise ValueError(
                "process_group (vocabulary-parallel) runs a composite path: backend must be 'auto' or "
                "'reference', and a mixture of teachers is not supported with it yet"
            )
        return vocab_parallel_divergence(
            s, t, process_group=process_group, divergence=divergence, temperature=temperature,
            beta=beta, alpha=alpha, scale=scale, reduction=reduction, labels=labels,
            ignore_index=ignore_index, mask=mask, hard_weight=hard_weight, soft_weight=soft_weight,
            return_parts=return_parts,
        )
    if several_teachers:
        return mixture_divergence(
            s, t, teacher_weights=teacher_weights, divergence=divergence, temperature=temperature,
            beta=beta, alpha=alpha, scale=scale, reduction=reduction, labels=labels,
            ignore_index=ignore_index, mask=mask, hard_weight=hard_weight, soft_weight=soft_weight,
            return_parts=return_parts, backend=backend,
        )
    if t.shape[:-1] == s.shape[:-1]:
        _validate.teacher_vocabulary(
            f"teacher_logits shape {tuple(t.shape)} does not match student_logits shape {tuple(s.shape)}",
            t.shape[-1], s.shape[-1], "teacher_logits[..., :{V}]",
        )
    _validate.same_layout("teacher_logits", t, "student_logits", s)
    options = DivergenceOptions.from_arguments(
        divergence=divergence, temperature=temperature, beta=beta, alpha=alpha, scale=scale,
        reduction=reduction, ignore_index=ignore_index, labels=labels, mask=mask, hard_weight=hard_weight,
        soft_weight=soft_weight, ref=s,
    )
    chosen = _dispatch.resolve(backend, s)
    if options.mixing and chosen != "reference":
        return _fused_hard_soft_divergence(s, t, options, return_parts, chosen)
    if options.mixing or options.soft_weight != 1.0 or return_parts:
        return _mixed_divergence(s, t, options, return_parts, backend)
    if chosen == "reference":
        return _reference.divergence(s, t, **options.divergence_kwargs())

    rows = _row_loss.as_rows_in_place(s, t, options.labels, options.ignore_index, options.mask)
    n_rows, vocab = rows.lead_shape.numel(), s.shape[-1]
    factor = _row_loss.loss_factor(options.reduction, options.scale, n_rows, rows.keep, vocab)
    kind, coef = options.kernel_divergence()
    loss = DivergenceFunction.apply(
        rows.student, rows.teacher, rows.keep, kind, options.inv_temperature, coef, factor,
        options.per_row, chosen,
    )
    return loss.reshape(rows.lead_shape) if options.per_row else loss


# the function, under a name its ``divergence`` argument does not shadow
_divergence_function = divergence


def _fused_hard_soft_divergence(s, t, options: DivergenceOptions, return_parts: bool, backend: str):
    """``hard_weight · CE + soft_weight · divergence`` in one kernel pass (one teacher, a
    compiled backend, ``hard_weight > 0``; arguments validated)."""
    # with return_parts the backward may recompute the CE gradient from (N, V) rows
    as_rows = _row_loss.as_rows if return_parts else _row_loss.as_rows_in_place
    rows = as_rows(s, t, options.labels, options.ignore_index, options.mask)
    vocab = s.shape[-1]
    flat_labels = options.labels.reshape(-1).long()
    _hard_labels.check_label_range(flat_labels, rows.keep, vocab)
    kind, coef = options.kernel_divergence()
    soft, hard = HardSoftDivergenceFunction.apply(
        rows.student, rows.teacher, rows.keep, flat_labels, kind, options.inv_temperature, coef,
        *_row_loss.hard_soft_factors(
            options.reduction, options.scale, rows.keep, vocab, options.hard_weight, options.soft_weight
        ),
        options.per_row, return_parts, backend,
    )
    if options.per_row:
        soft, hard = soft.reshape(rows.lead_shape), hard.reshape(rows.lead_shape)
    total = hard + soft
    return (total, hard, soft) if return_parts else total


def _mixed_divergence(s, t, options: DivergenceOptions, return_parts: bool, backend: str):
    """``hard_weight · CE + soft_weight · divergence`` for :func:`divergence` (validated arguments)."""
    soft = divergence(s, t, backend=backend, **options.divergence_kwargs())
    # the compiled backends compute the CE in the kernel's pass
    # (_fused_hard_soft_divergence); here it is the reference's, if any
    return _hard_labels.mix_soft_with_reference_ce(
        soft, s, options.labels, reduction=options.reduction, ignore_index=options.ignore_index,
        mask=options.mask, hard_weight=options.hard_weight, soft_weight=options.soft_weight,
        return_parts=return_parts,
    )


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 4.0,
    **kwargs,
) -> torch.Tensor:
    """Hinton knowledge distillation: ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, batchmean.

    Shorthand for :func:`divergence` with ``divergence="kl"``; every other
    keyword of :func:`divergence` is accepted.
    """
    if "divergence" in kwargs:
        raise ValueError("kd_loss is KL divergence; use fastkd.divergence(divergence=...) for others")
    return divergence(student_logits, teacher_logits, temperature=temperature, **kwargs)


class DivergenceLoss(nn.Module):
    """Module form of :func:`fastkd.divergence`; keyword arguments as there.

    ``forward(student_logits (..., V), teacher_logits (..., V), labels=None, mask=None)``
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
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.divergence = divergence
        self.temperature = temperature
        self.beta = beta
        self.alpha = alpha
        self.scale = scale
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.backend = backend

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        teacher_weights=None,
    ) -> torch.Tensor:
        """``teacher_logits`` ``(..., V)``, or ``(K, ..., V)`` for a mixture of K
        teachers weighted by ``teacher_weights`` (see :func:`fastkd.divergence`)."""
        return divergence(
            student_logits,
            teacher_logits,
            teacher_weights=teacher_weights,
            divergence=self.divergence,
            temperature=self.temperature,
            beta=self.beta,
            alpha=self.alpha,
            scale=self.scale,
            reduction=self.reduction,
            labels=labels,
            ignore_index=self.ignore_index,
            mask=mask,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, temperature={self.temperature}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )


class KDLoss(DivergenceLoss):
    """Hinton KD (:func:`fastkd.kd_loss`): ``T² · KL(p‖q)``, batchmean, ``T=4`` by default."""

    def __init__(self, *, temperature: float = 4.0, **kwargs) -> None:
        if "divergence" in kwargs:
            raise ValueError("KDLoss is KL divergence; use DivergenceLoss(divergence=...) for others")
        super().__init__(divergence="kl", temperature=temperature, **kwargs)
