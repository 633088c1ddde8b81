"""The public losses: validate → pick a backend → autograd Function.

Each function here is the single entry point of one loss; ``losses.py`` wraps
them in modules. The mathematics is SPEC.md's; the reference implementations
in ``fastkd.reference`` define it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastkd import (
    _dispatch,
    _hard_labels,
    _ops,  # noqa: F401  (registers the fastkd:: ops and their fake kernels)
    _validate,
)
from fastkd import distributed as _distributed
from fastkd import reference as _reference
from fastkd.reference import contrastive as _reference_contrastive
from fastkd.reference import mmd as _reference_mmd

__all__ = ["divergence", "info_nce", "kd_loss", "mmd_loss", "nst_loss"]

# fastkd::divergence::Kind (csrc/common/divergence_math.h).
DIVERGENCE_CODES = {"kl": 0, "reverse_kl": 1, "jsd": 2, "skew_kl": 3, "skew_reverse_kl": 4, "tvd": 5}


def _kernel_divergence(divergence: str, beta: float, alpha: float) -> tuple[int, float]:
    """(kind code, interior coefficient) for the kernels.

    Endpoints are exact special cases (SPEC §1): JSD at β=0 is KL(p‖q) and at
    β=1 is KL(q‖p); skew divergences at α=0 are the plain ones. The kernels
    see β in (0, 1) and α in (0, 1] (α=1 is the zero divergence KL(p‖p),
    which the kernels' formulas handle without special-casing).
    """
    if divergence == "jsd":
        if beta == 0.0:
            return DIVERGENCE_CODES["kl"], 0.0
        if beta == 1.0:
            return DIVERGENCE_CODES["reverse_kl"], 0.0
        return DIVERGENCE_CODES["jsd"], beta
    if divergence in ("skew_kl", "skew_reverse_kl"):
        if alpha == 0.0:
            return DIVERGENCE_CODES[divergence.removeprefix("skew_")], 0.0
        return DIVERGENCE_CODES[divergence], alpha
    return DIVERGENCE_CODES[divergence], 0.0


def _run_kernel(backend: str, *args):
    if backend == "triton":
        from fastkd.kernels import divergence as triton_divergence

        return triton_divergence.divergence_forward(*args)
    return torch.ops.fastkd.divergence_forward(*args)


def _graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph`` / ``create_graph``): then
    the saved tensors are read again by a later backward. Unknown (no such query in this
    torch) counts as kept."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


def _scale_by_upstream(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """``grad · grad_output`` (scalar, or one value per row), reusing ``grad`` where that is safe.

    ``grad`` is the gradient the forward kernel already produced and saved.
    When the upstream gradient is exactly 1 (``loss.backward()``) it is
    returned as is. Otherwise it is scaled in place when this backward frees
    the graph (nothing reads ``grad`` again: no second ``(N, V)`` buffer), and
    out of place when the graph is kept (``retain_graph=True``), so that a
    second backward reads the unscaled gradient again and accumulates the
    same result. Under ``torch.compile`` the product is out of place (no
    data-dependent branch).
    """
    factor = grad_output if grad_output.dim() == 0 else grad_output.reshape(-1, 1)
    if torch.compiler.is_compiling():
        return grad * factor.to(grad.dtype)
    if grad_output.numel() == 1 and grad_output.item() == 1.0:
        return grad
    if _graph_is_kept():
        # as mul_ computes it: in the promoted dtype, rounded to grad's
        return torch.mul(grad, factor, out=torch.empty_like(grad))
    return grad.mul_(factor)


class DivergenceFunction(torch.autograd.Function):
    """Fused softmax divergence on ``(N, V)`` logits; one kernel call.

    The forward kernel returns the row losses and, for the inputs that need
    them, the gradients already multiplied by the reduction's factor; the
    backward only applies the upstream gradient.
    """

    @staticmethod
    def forward(ctx, student, teacher, row_mask, kind, inv_temperature, coef, factor, per_row, backend):
        row_loss, grad_s, grad_t, _ = _run_kernel(
            backend, student, teacher, row_mask, kind, inv_temperature, coef, factor,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )
        ctx.save_for_backward(grad_s, grad_t)
        return row_loss * factor if per_row else row_loss.sum() * factor

    @staticmethod
    def backward(ctx, grad_output):
        grad_s, grad_t = ctx.saved_tensors
        grad_student = _scale_by_upstream(grad_s, grad_output) if ctx.needs_input_grad[0] else None
        grad_teacher = _scale_by_upstream(grad_t, grad_output) if ctx.needs_input_grad[1] else None
        return grad_student, grad_teacher, None, None, None, None, None, None, None


class HardSoftDivergenceFunction(torch.autograd.Function):
    """``(soft, hard)``: the fused divergence and the hard-label cross-entropy
    of the same rows, from one kernel call (SPEC §1, hard-label mixing).

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
        row_loss, grad_s, grad_t, row_ce = _run_kernel(
            backend, student, teacher, row_mask, kind, inv_temperature, coef, soft_factor,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1], labels, hard_factor,
        )
        kept_for_split = (student, labels, row_mask) if separable else (None, None, None)
        ctx.save_for_backward(grad_s, grad_t, *kept_for_split)
        ctx.hard_factor = hard_factor
        if per_row:
            return row_loss * soft_factor, row_ce * hard_factor
        return row_loss.sum() * soft_factor, row_ce.sum() * hard_factor

    @staticmethod
    def backward(ctx, grad_soft, grad_hard):
        grad_s, grad_t, student, labels, row_mask = ctx.saved_tensors
        grad_student = grad_teacher = None
        if ctx.needs_input_grad[0]:
            grad_student = _split_hard_soft(
                grad_s, grad_soft, grad_hard, student, labels, row_mask, ctx.hard_factor
            )
        if ctx.needs_input_grad[1]:
            grad_teacher = _scale_by_upstream(grad_t, grad_soft)
        return (grad_student, grad_teacher) + (None,) * 10


def _split_hard_soft(grad, grad_soft, grad_hard, student, labels, row_mask, hard_factor):
    """The student gradient of ``grad_soft · soft + grad_hard · hard`` from the kernel's ``grad``
    (``= d(soft + hard)/ds``). ``student`` is None when the parts cannot be
    used apart (no ``return_parts``): then the upstream gradients are equal."""
    # under torch.compile no data-dependent branch: always separate when possible
    split = student is not None and (torch.compiler.is_compiling() or not torch.equal(grad_soft, grad_hard))
    if not split:
        return _scale_by_upstream(grad, grad_soft)
    # grad · upstream_soft + (upstream_hard − upstream_soft) · dhard/ds, the
    # latter recomputed from the logits
    row_scale = ((grad_hard - grad_soft) * hard_factor).expand(student.shape[0])
    correction = _hard_labels.ce_grad(student, labels, row_mask, row_scale)
    return grad * grad_soft.reshape(-1, 1).to(grad.dtype) + correction


@dataclass(frozen=True)
class StudentKernelCall:
    """A fused student-only op with the hard-label CE in its pass (the top-k and
    mixture ops): ``op(student, teacher_a, teacher_b, row_mask, kind,
    inv_temperature, coef, grad_scale, student_grad, labels, hard_grad_scale)
    -> (row_loss, grad, row_ce)``, and the factors of its two terms."""

    op: object
    kind: int
    inv_temperature: float
    coef: float
    soft_factor: float  # multiplies the row divergences (and is the op's grad_scale)
    hard_factor: float  # multiplies the row cross-entropies (the op's hard_grad_scale)
    per_row: bool  # reduction == "none"
    separable: bool  # return_parts: the parts may be back-propagated apart


class StudentHardSoftFunction(torch.autograd.Function):
    """``(soft, hard)`` of a :class:`StudentKernelCall`: one kernel call, one combined
    student gradient (separated in the backward only as
    :class:`HardSoftDivergenceFunction` does). Teachers get no gradient."""

    @staticmethod
    def forward(ctx, call, student, teacher_a, teacher_b, row_mask, labels):
        row_loss, grad, row_ce = call.op(
            student, teacher_a, teacher_b, row_mask, call.kind, call.inv_temperature, call.coef,
            call.soft_factor, ctx.needs_input_grad[1], labels, call.hard_factor,
        )
        kept_for_split = (student, labels, row_mask) if call.separable else (None, None, None)
        ctx.save_for_backward(grad, *kept_for_split)
        ctx.hard_factor = call.hard_factor
        if call.per_row:
            return row_loss * call.soft_factor, row_ce * call.hard_factor
        return row_loss.sum() * call.soft_factor, row_ce.sum() * call.hard_factor

    @staticmethod
    def backward(ctx, grad_soft, grad_hard):
        grad, student, labels, row_mask = ctx.saved_tensors
        grad_student = None
        if ctx.needs_input_grad[1]:
            grad_student = _split_hard_soft(
                grad, grad_soft, grad_hard, student, labels, row_mask, ctx.hard_factor
            )
        return None, grad_student, None, None, None, None


def student_hard_soft(call: StudentKernelCall, student, teacher_a, teacher_b, keep, labels, lead_shape,
                      return_parts: bool):
    """``hard + soft`` (or ``(total, hard, soft)``) of a student-only op with the CE in its pass.

    ``student`` ``(N, V)`` rows, ``keep`` ``(N,)`` bool, ``labels`` ``(N,)``
    int64 (checked: kept rows' labels in ``[0, V)``); ``lead_shape`` the
    shape of ``"none"``'s per-row result.
    """
    soft, hard = StudentHardSoftFunction.apply(call, student, teacher_a, teacher_b, keep, labels)
    if call.per_row:
        soft, hard = soft.reshape(lead_shape), hard.reshape(lead_shape)
    total = hard + soft
    return (total, hard, soft) if return_parts else total


@dataclass(frozen=True)
class _Rows:
    """Logits flattened to rows, and which rows count."""

    student: torch.Tensor  # (N, V)
    teacher: torch.Tensor  # (N, V)
    keep: torch.Tensor | None  # (N,) bool, None = every row
    lead_shape: torch.Size


def _kept_rows(labels, ignore_index: int, mask) -> torch.Tensor | None:
    """``(N,)`` bool of the rows that count (label not ``ignore_index``, mask true); None: every row."""
    keep = None
    if labels is not None:
        keep = labels.reshape(-1) != ignore_index
    if mask is not None:
        keep = mask.reshape(-1) if keep is None else keep & mask.reshape(-1)
    return keep


def _loss_factor(reduction: str, scale: float, n_rows: int, keep, vocab: int) -> float:
    """What the kernels' row losses (and gradients) are multiplied by: ``scale`` over the
    reduction's denominator (kept rows, × V for ``"mean"``; none for ``"sum"`` / ``"none"``)."""
    if reduction in ("none", "sum"):
        return scale
    return _scale_over_kept(reduction, scale, n_rows if keep is None else int(keep.sum().item()), vocab)


def _scale_over_kept(reduction: str, scale: float, n_kept: int, vocab: int) -> float:
    """:func:`_loss_factor` for a known count of kept rows."""
    if reduction in ("none", "sum"):
        return scale
    return scale / max(n_kept * (vocab if reduction == "mean" else 1), 1)


def _hard_soft_factors(reduction: str, scale: float, keep: torch.Tensor, vocab: int, hard_weight: float,
                       soft_weight: float) -> tuple[float, float]:
    """``(soft_factor, hard_factor)`` of a kernel call with the CE in its pass: what the row
    divergences and the row cross-entropies are multiplied by, the kept rows counted once."""
    n_kept = int(keep.sum().item())
    return (
        soft_weight * _scale_over_kept(reduction, scale, n_kept, vocab),
        hard_weight * _hard_labels.reduce_factor(reduction, n_kept),
    )


class RowLossKernelFunction(torch.autograd.Function):
    """A fused student-only op ``op(student, *op_args, student_grad) -> (row_loss, grad)``
    whose gradient, already multiplied by ``factor``, comes out of the forward
    (the top-k and multi-teacher divergences); the backward applies the
    upstream gradient. ``factor`` also scales the returned loss."""

    @staticmethod
    def forward(ctx, op, factor, per_row, student, *op_args):
        # the top-k and mixture ops also return the (empty) row cross-entropies
        row_loss, grad, *_ = op(student, *op_args, ctx.needs_input_grad[3])
        ctx.save_for_backward(grad)
        ctx.num_op_args = len(op_args)
        return row_loss * factor if per_row else row_loss.sum() * factor

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        grad_student = _scale_by_upstream(grad, grad_output) if ctx.needs_input_grad[3] else None
        return (None, None, None, grad_student, *([None] * ctx.num_op_args))


def _as_rows(s: torch.Tensor, t: torch.Tensor, labels, ignore_index: int, mask) -> _Rows:
    vocab = s.shape[-1]
    keep = _kept_rows(labels, ignore_index, mask)
    return _Rows(_row_major(s.reshape(-1, vocab)), _row_major(t.reshape(-1, vocab)), keep, s.shape[:-1])


def _row_major(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any row stride but need unit stride along V."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
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
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Divergence between the temperature-softened teacher and student distributions.

    Per row ``i``: ``p = softmax(t_i / T)``, ``q = softmax(s_i / T)`` and ``ℓ_i``
    is the chosen divergence (SPEC §1). ``loss = scale · reduce(ℓ)``.

    Args:
        student_logits: ``(..., V)`` float32 / bfloat16 / float16 / float64.
        teacher_logits: ``(..., V)``, same shape, dtype and device. Gets a
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
            uniform). See :func:`fastkd.multi_teacher.mixture_divergence`.
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
    s = _validate.tensor("student_logits", student_logits)
    t = _validate.tensor("teacher_logits", teacher_logits)
    several_teachers = teacher_weights is not None or t.dim() == s.dim() + 1
    if process_group is not None:
        if backend not in ("auto", "reference") or teacher_weights is not None:
            raise ValueError(
                "process_group (vocabulary-parallel) runs a composite path: backend must be 'auto' or "
                "'reference', and a mixture of teachers is not supported with it yet"
            )
        from fastkd.vocab_parallel import vocab_parallel_divergence

        return vocab_parallel_divergence(
            s, t, process_group=process_group, divergence=divergence, temperature=temperature,
            beta=beta, alpha=alpha, scale=scale, reduction=reduction, labels=labels,
            ignore_index=ignore_index, mask=mask, hard_weight=hard_weight, soft_weight=soft_weight,
            return_parts=return_parts,
        )
    if several_teachers:
        from fastkd.multi_teacher import mixture_divergence

        return mixture_divergence(
            s, t, teacher_weights=teacher_weights, divergence=divergence, temperature=temperature,
            beta=beta, alpha=alpha, scale=scale, reduction=reduction, labels=labels,
            ignore_index=ignore_index, mask=mask, hard_weight=hard_weight, soft_weight=soft_weight,
            return_parts=return_parts, backend=backend,
        )
    _validate.same_layout("teacher_logits", t, "student_logits", s)
    _validate.choice("divergence", divergence, _validate.DIVERGENCES)
    _validate.choice("reduction", reduction, _validate.REDUCTIONS)
    temperature = _validate.real("temperature", temperature, low=0.0, low_open=True)
    beta = _validate.real("beta", beta, low=0.0, high=1.0)
    alpha = _validate.real("alpha", alpha, low=0.0, high=1.0)
    scale = temperature**2 if scale is None else _validate.real("scale", scale)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    labels = _validate.row_selector("labels", labels, s.shape[:-1], s, integer=True)
    mask = _validate.row_selector("mask", mask, s.shape[:-1], s, integer=False)
    if s.shape[-1] == 0:
        raise ValueError("student_logits must have a non-empty last (vocabulary) dimension")
    hard_weight, soft_weight, mixing = _hard_labels.mixing_weights(hard_weight, soft_weight, labels)
    chosen = _dispatch.resolve(backend, s)
    if mixing and chosen != "reference":
        return _fused_hard_soft_divergence(
            s, t, divergence=divergence, temperature=temperature, beta=beta, alpha=alpha, scale=scale,
            reduction=reduction, labels=labels, ignore_index=ignore_index, mask=mask,
            hard_weight=hard_weight, soft_weight=soft_weight, return_parts=return_parts, backend=chosen,
        )
    if mixing or soft_weight != 1.0 or return_parts:
        return _mixed_divergence(
            s, t, divergence=divergence, temperature=temperature, beta=beta, alpha=alpha, scale=scale,
            reduction=reduction, labels=labels, ignore_index=ignore_index, mask=mask,
            hard_weight=hard_weight, soft_weight=soft_weight, return_parts=return_parts, backend=backend,
        )
    if chosen == "reference":
        return _reference.divergence(
            s, t, divergence=divergence, temperature=temperature, beta=beta, alpha=alpha, scale=scale,
            reduction=reduction, labels=labels, ignore_index=ignore_index, mask=mask,
        )

    rows = _as_rows(s, t, labels, ignore_index, mask)
    n_rows, vocab = rows.student.shape
    factor = _loss_factor(reduction, scale, n_rows, rows.keep, vocab)
    kind, coef = _kernel_divergence(divergence, beta, alpha)
    loss = DivergenceFunction.apply(
        rows.student, rows.teacher, rows.keep, kind, 1.0 / temperature, coef, factor,
        reduction == "none", chosen,
    )
    return loss.reshape(rows.lead_shape) if reduction == "none" else loss


def _fused_hard_soft_divergence(s, t, *, divergence, temperature, beta, alpha, scale, reduction, labels,
                                ignore_index, mask, hard_weight, soft_weight, return_parts, backend):
    """``hard_weight · CE + soft_weight · divergence`` in one kernel pass (one teacher, a
    compiled backend, ``hard_weight > 0``; arguments validated)."""
    rows = _as_rows(s, t, labels, ignore_index, mask)
    vocab = rows.student.shape[1]
    flat_labels = labels.reshape(-1).long()
    _hard_labels.check_label_range(flat_labels, rows.keep, vocab)
    kind, coef = _kernel_divergence(divergence, beta, alpha)
    soft, hard = HardSoftDivergenceFunction.apply(
        rows.student, rows.teacher, rows.keep, flat_labels, kind, 1.0 / temperature, coef,
        *_hard_soft_factors(reduction, scale, rows.keep, vocab, hard_weight, soft_weight),
        reduction == "none", return_parts, backend,
    )
    if reduction == "none":
        soft, hard = soft.reshape(rows.lead_shape), hard.reshape(rows.lead_shape)
    total = hard + soft
    return (total, hard, soft) if return_parts else total


def _mixed_divergence(s, t, *, labels, ignore_index, mask, reduction, hard_weight, soft_weight,
                      return_parts, backend, **divergence_kwargs):
    """``hard_weight · CE + soft_weight · divergence`` for :func:`divergence` (validated arguments)."""
    soft = divergence(
        s, t, labels=labels, ignore_index=ignore_index, mask=mask, reduction=reduction, backend=backend,
        **divergence_kwargs,
    )
    # the compiled backends compute the CE in the kernel's pass
    # (_fused_hard_soft_divergence); here it is the reference's, if any
    return _hard_labels.mix_soft_with_reference_ce(
        soft, s, labels, reduction=reduction, ignore_index=ignore_index, mask=mask,
        hard_weight=hard_weight, soft_weight=soft_weight, return_parts=return_parts,
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


# ---- InfoNCE (SPEC §4) --------------------------------------------------------

# The compiled backends that have an InfoNCE kernel.
INFO_NCE_KERNELS = ("cpu", "triton", "cuda")


def _info_nce_tile_rows(m: int) -> int:
    """Rows of q per tile of the InfoNCE ops.

    A tile's logits (tile_rows × M) are the ops' only large temporary: 2**23
    elements, i.e. 32 MiB in float32 (64 MiB for float64 input), whatever N.
    """
    return max(1, 2**23 // max(m, 1))


def _info_nce_ops(backend: str):
    """``(forward, backward)`` of ``backend`` with the signatures of ``fastkd::info_nce_forward`` /
    ``fastkd::info_nce_backward``. The Triton kernels keep their logits tile in
    registers, so they take no ``tile_rows`` (it only sizes the ATen tiles of
    the cpu / cuda ops)."""
    if backend == "triton":
        from fastkd.kernels import contrastive as triton_contrastive

        def forward(q, k, labels, inv_temperature, tile_rows):
            return triton_contrastive.info_nce_forward(q, k, labels, inv_temperature)

        def backward(grad_rows, q, k, labels, row_lse, inv_temperature, tile_rows):
            return triton_contrastive.info_nce_backward(grad_rows, q, k, labels, row_lse, inv_temperature)

        return forward, backward
    return torch.ops.fastkd.info_nce_forward, torch.ops.fastkd.info_nce_backward


class InfoNCEFunction(torch.autograd.Function):
    """One InfoNCE direction, ``mean_i (lse_j logits_ij − logits_{i, y_i})``, on the fused kernels.

    Between forward and backward it keeps only ``labels`` and the row
    log-sum-exp (O(N), besides references to ``q`` and ``k`` themselves); the
    backward recomputes the logits tile by tile.
    """

    @staticmethod
    def forward(ctx, q, k, labels, inv_temperature, tile_rows, backend):
        forward_op, _ = _info_nce_ops(backend)
        row_loss, row_lse = forward_op(q, k, labels, inv_temperature, tile_rows)
        ctx.save_for_backward(q, k, labels, row_lse)
        ctx.inv_temperature = inv_temperature
        ctx.tile_rows = tile_rows
        ctx.backend = backend
        return row_loss.mean()

    @staticmethod
    def backward(ctx, grad_output):
        q, k, labels, row_lse = ctx.saved_tensors
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None, None, None, None
        n = q.shape[0]
        grad_rows = (grad_output.to(row_lse.dtype) / n).expand(n).contiguous()
        _, backward_op = _info_nce_ops(ctx.backend)
        grad_q, grad_k = backward_op(grad_rows, q, k, labels, row_lse, ctx.inv_temperature, ctx.tile_rows)
        return (
            grad_q if ctx.needs_input_grad[0] else None,
            grad_k if ctx.needs_input_grad[1] else None,
            None, None, None, None,
        )


def _backend_for(loss_name: str, kernels: tuple[str, ...], backend: str, tensor: torch.Tensor) -> str:
    """``_dispatch.resolve``, restricted to ``kernels``, the backends with a kernel for ``loss_name``.

    ``backend="auto"`` falls back to the reference where the resolved backend
    has no such kernel; an explicit request for one raises ``ValueError``.
    """
    chosen = _dispatch.resolve(backend, tensor)
    if chosen == "reference" or chosen in kernels:
        return chosen
    if backend == "auto":
        return "reference"
    raise ValueError(f"backend={chosen!r} has no {loss_name} kernel yet")


def info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    temperature: float = 0.07,
    labels: torch.Tensor | None = None,
    symmetric: bool = False,
    normalize: bool = False,
    backend: str = "auto",
    gather: bool = False,
    process_group=None,
) -> torch.Tensor:
    """InfoNCE / CLIP loss with in-batch negatives (SPEC §4).

    ``logits = q kᵀ / τ``, ``L = mean_i (lse_j logits_ij − logits_{i, y_i})``
    (``F.cross_entropy(q @ k.T / τ, y)``) with ``y = labels`` or, without
    labels, ``y_i = i`` (keys beyond the N-th are extra negatives).

    The fused kernels keep only the row log-sum-exp between forward and
    backward and recompute the logits in the backward, so memory is O(N)
    instead of O(N·M) (Inf-CL style): the cpu and cuda ops tile the
    similarity matrix (ATen GEMMs on about 32 MiB of logits at a time, plus
    their own row log-sum-exp / softmax-gradient kernels), the triton kernels
    hold one 64 × 64 logits tile per program, flash-attention style.

    Args:
        q: ``(N, D)`` queries, float32 / bfloat16 / float16 / float64.
        k: ``(M, D)`` keys, same dtype and device; without ``labels`` ``M >= N``.
        temperature: ``τ > 0``.
        labels: optional ``(N,)`` integer tensor, each query's positive key in
            ``[0, M)``. Not allowed with ``symmetric=True``.
        symmetric: average with the key→query direction (needs ``M == N``).
        normalize: L2-normalise the rows of ``q`` and ``k`` first (in float32,
            float64 for float64 input), as the reference does.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``
            (the GPU kernels take float32 / bfloat16 / float16).
        gather: gather ``q``, ``k`` (and ``labels``, each rank's indexing its
            own keys) from every rank of ``process_group`` (default: the world)
            and compute the loss of the global batch, negatives from every rank
            (:mod:`fastkd.distributed`: same value on every rank; each rank's
            gradient is ``world_size`` × the single-process one of its rows).
            Every rank passes ``labels`` or every rank passes None.

    Returns:
        ``()`` loss, float32 (float64 for float64 inputs).
    """
    if gather:
        # Every rank must make the same collective calls in the same order.
        diagonal = labels is None and k.shape[0] == q.shape[0]
        q, k, temperature, labels = _reference_contrastive.check_arguments(
            q, k, temperature, labels, symmetric, normalize
        )
        keys_per_rank = k.shape[0]
        q = _distributed.gather_with_grad("q", q, process_group)
        k = _distributed.gather_with_grad("k", k, process_group)
        labels = None if diagonal else _distributed.gather_labels(labels, keys_per_rank, process_group)
    q, k, temperature, labels = _reference_contrastive.check_arguments(
        q, k, temperature, labels, symmetric, normalize
    )
    chosen = _backend_for("info_nce", INFO_NCE_KERNELS, backend, q)
    if chosen == "reference":
        # check_arguments filled in arange labels; the reference rejects labels
        # with symmetric=True (whose positives are the diagonal by definition)
        return _reference.info_nce(
            q, k, temperature=temperature, labels=None if symmetric else labels, symmetric=symmetric,
            normalize=normalize,
        )
    if normalize:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        q = torch.nn.functional.normalize(q.to(acc), dim=1)
        k = torch.nn.functional.normalize(k.to(acc), dim=1)
    inv_temperature = 1.0 / temperature
    loss = InfoNCEFunction.apply(q, k, labels, inv_temperature, _info_nce_tile_rows(k.shape[0]), chosen)
    if symmetric:
        back = InfoNCEFunction.apply(k, q, labels, inv_temperature, _info_nce_tile_rows(q.shape[0]), chosen)
        loss = (loss + back) / 2
    return loss


# ---- MMD and NST (SPEC §3) ------------------------------------------------------

# The compiled backends that have an MMD kernel: csrc/cpu/mmd.cpp,
# kernels/mmd.py (triton) and csrc/cuda/mmd.cu.
MMD_KERNELS = ("cpu", "triton", "cuda")
# The backends on which nst_loss runs its closed form. That form is composite
# ATen (two batched GEMMs and a reduction, autograd through them), not a
# kernel of any backend: it runs on whatever device the tensors are on, and
# the backend name only says that the closed form, not the reference's
# (N, C, C') kernel matrices, is wanted.
NST_CLOSED_FORM_BACKENDS = ("cpu", "triton", "cuda")
# The ops' `kernel` codes (csrc/cpu/mmd.cpp, MmdKernel).
MMD_KERNEL_CODES = {"gaussian": 0, "laplacian": 1, "polynomial": 2}


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
    bandwidths: float | tuple[float, ...] = _reference_mmd.DEFAULT_BANDWIDTHS,
    unbiased: bool = False,
    degree: int = 2,
    c: float = 1.0,
    backend: str = "auto",
    gather: bool = False,
    process_group=None,
) -> torch.Tensor:
    """Squared maximum mean discrepancy between two samples (SPEC §3).

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
        _reference_mmd.check_mmd_arguments(x, y, kernel, bandwidths, unbiased, degree, c)
        x = _distributed.gather_with_grad("x", x, process_group)
        y = _distributed.gather_with_grad("y", y, process_group)
    x, y, bandwidths, degree, c = _reference_mmd.check_mmd_arguments(
        x, y, kernel, bandwidths, unbiased, degree, c
    )
    chosen = _backend_for("mmd", MMD_KERNELS, backend, x)
    if chosen == "reference":
        return _reference.mmd_loss(
            x, y, kernel=kernel, bandwidths=bandwidths, unbiased=unbiased, degree=degree, c=c
        )
    return MMDFunction.apply(
        x, y, MMD_KERNEL_CODES[kernel], list(bandwidths), degree, c, unbiased,
        _mmd_tile_rows(x.shape[0], y.shape[0]), chosen,
    )


def _nst_closed_form(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """NST on pooled, normalised ``(N, C_s, HW)`` and ``(N, C_t, HW)`` features.

    Per sample, with ``A = s_n``, ``B = t_n`` and ``(a·b)²`` over channel pairs,
    ``mean K(t,t) + mean K(s,s) − 2 mean K(s,t) = ‖AᵀA / C_s − BᵀB / C_t‖²_F``
    (``Σ_{c,c'} (a_c·b_c')² = ⟨AᵀA, BᵀB⟩_F``). That needs two HW × HW Grams
    per sample; the channel form needs C × C products. Whichever is smaller
    is used, so memory is O(N · min(max(C_s, C_t), HW)²).
    """
    c_s, c_t, hw = s.shape[1], t.shape[1], s.shape[2]
    if hw < max(c_s, c_t):
        gram_s = s.transpose(1, 2) @ s  # (N, HW, HW)
        gram_t = t.transpose(1, 2) @ t
        return (gram_s / c_s - gram_t / c_t).square().sum(dim=(1, 2)).mean()

    def pair_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.transpose(1, 2)).square().mean(dim=(1, 2))

    return (pair_mean(t, t) + pair_mean(s, s) - 2 * pair_mean(s, t)).mean()


def nst_loss(
    student_maps: torch.Tensor, teacher_maps: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Neural selectivity transfer (RepDistiller ``NSTLoss``, SPEC §3).

    Same semantics as :func:`fastkd.reference.nst_loss`: both maps pooled to
    ``(min(H, H'), min(W, W'))``, flattened to ``(N, C, HW)``, L2-normalised
    over HW; per sample ``mean K(t,t) + mean K(s,s) − 2 mean K(s,t)`` with
    ``k(a, b) = (a·b)²`` over channel pairs, averaged over N. Nothing is
    detached (detach ``teacher_maps`` for a frozen teacher).

    There is no NST kernel on any backend: the compiled backends
    (``NST_CLOSED_FORM_BACKENDS``) run composite ATen with autograd, the
    closed form ``‖AᵀA / C_s − BᵀB / C_t‖²_F`` (two HW × HW Grams per sample)
    when HW is smaller than the channel counts, else the C × C channel
    products, so memory is O(N · min(max(C_s, C_t), HW)²). Those are batched
    GEMMs, which is what a kernel would do too; on CUDA tensors they are
    cuBLAS's, whichever of ``"triton"`` / ``"cuda"`` is named.

    Args:
        student_maps: ``(N, C_s, H, W)`` student feature maps.
        teacher_maps: ``(N, C_t, H', W')``; channels and spatial size may differ.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``:
            ``"reference"`` builds the kernel matrices, the others (where
            available) take the closed form above.

    Returns:
        ``()`` loss, float32 (float64 for float64 inputs).
    """
    s, t = _reference_mmd.check_nst_arguments(student_maps, teacher_maps)
    chosen = _backend_for("nst", NST_CLOSED_FORM_BACKENDS, backend, s)
    if chosen == "reference":
        return _reference.nst_loss(s, t)
    return _nst_closed_form(*_reference_mmd.nst_features(s, t))
