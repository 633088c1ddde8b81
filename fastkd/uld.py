"""Universal Logit Distillation (ULD; Boizard et al. 2024), docs/spec.md §1.14.

Distillation across tokenizers: the student and teacher rows are aligned (they
predict the same text) but the vocabularies differ, so the two distributions
are compared as sorted probability vectors, ``Σ_k |sort↓(p)_k − sort↓(q)_k|``
with the shorter one zero-padded (the 1-D optimal-transport distance between
the two sets of probability values). With one shared tokenizer use
:func:`fastkd.divergence`, which compares the same token's probabilities.
Either side may be given as log-probabilities used as they are
(``student_is_logprob`` / ``teacher_is_logprob``: ``exp`` of the row, no
softmax), which is how the unnormalised rows of :func:`fastkd.merge_aligned`
are compared.

The fused kernels (``cpu`` and ``cuda``: ``fastkd::uld_forward``,
csrc/cpu/uld.cpp, csrc/cuda/uld.cu; ``triton``: kernels/uld.py) sort each row
inside the kernel (``cuda``: a bounded scratch of a chunk of rows) and return the
row losses and, from the same pass, the gradients already multiplied by the
reduction's factor: no sorted ``(N, V)`` tensor is written or kept; the
backward only applies the upstream gradient. The reference
(:mod:`fastkd.reference.uld`) sorts and pads whole rows with ``torch.sort``.
"""

from __future__ import annotations

import math

import torch

from fastkd import _dispatch, _hard_labels, _row_loss, _validate
from fastkd import _ops as _extension
from fastkd._backend import backend_for, run_divergence_kernel
from fastkd._divergence_options import kernel_divergence
from fastkd._module_form import LossModule
from fastkd.reference import uld as _reference
from fastkd.reference.divergence import row_divergence

__all__ = ["ULDFunction", "ULDLoss", "uld_loss"]



def _run_kernel(backend: str, *args):
    """``fastkd::uld_forward`` on ``backend`` (``"cpu"``: the op; ``"triton"``: the launcher)."""
    if backend == "triton":
        from fastkd.kernels import uld as triton_uld

        return triton_uld.uld_forward(*args)
    return torch.ops.fastkd.uld_forward(*args)


# a build of the extension older than this family has no such op: the cpu
# backend is then unavailable for it, and the package still imports
HAS_CPU_OP = _extension.has_kernel("uld_forward", "CPU")

HAS_CUDA_OP = _extension.has_kernel("uld_forward", "CUDA")

# backends with a kernel for this loss (the reference always runs)
KERNEL_BACKENDS: tuple[str, ...] = (
    ("cpu",) * HAS_CPU_OP + ("triton",) + ("cuda",) * HAS_CUDA_OP
)

if HAS_CPU_OP:

    @torch.library.register_fake("fastkd::uld_forward")
    def _uld_forward_fake(student, teacher, row_mask, inv_student_temperature, inv_teacher_temperature,
                          grad_scale, student_grad, teacher_grad, student_is_logprob=False,
                          teacher_is_logprob=False):
        rows = student.shape[0]
        loss_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        return (
            student.new_empty((rows,), dtype=loss_dtype),
            student.new_empty((rows, student.shape[1]) if student_grad else (0, 0)),
            teacher.new_empty((rows, teacher.shape[1]) if teacher_grad else (0, 0)),
        )


class ULDFunction(torch.autograd.Function):
    """Fused ULD on aligned ``(N, V_s)`` / ``(N, V_t)`` rows (logits, or
    log-probabilities on a side whose ``*_is_logprob`` is set); one kernel call.

    The kernel returns the row losses and the gradients of the inputs that need
    them, already multiplied by ``factor`` (a float); the backward applies the
    upstream gradient (scalar, or one value per row for ``per_row``). A
    ``factor`` given as a 0-d tensor (the kept-row count of a mask under
    ``torch.compile``, not known while tracing) is applied with the upstream
    gradient instead.
    """

    @staticmethod
    def forward(ctx, student, teacher, row_mask, inv_ts, inv_tt, factor, per_row, backend,
                student_is_logprob=False, teacher_is_logprob=False):
        row_loss, grad_s, grad_t = _run_kernel(
            backend, student, teacher, row_mask, inv_ts, inv_tt, _row_loss.kernel_grad_scale(factor),
            ctx.needs_input_grad[0], ctx.needs_input_grad[1], student_is_logprob, teacher_is_logprob,
        )
        return _row_loss.save_two_sided_grads(ctx, row_loss, grad_s, grad_t, factor, per_row)

    @staticmethod
    def backward(ctx, grad_output):
        return *_row_loss.two_sided_grads_backward(ctx, grad_output), *([None] * 8)


class _RowDivergenceFunction(torch.autograd.Function):
    """``(N,)`` fused divergence rows (``fastkd::divergence_forward`` at temperature 1, no
    reduction) of ``(N, V)`` student / teacher logits; the gradients come from the same
    kernel pass and the backward applies the per-row upstream gradient."""

    @staticmethod
    def forward(ctx, student, teacher, row_mask, kind, coef, backend):
        row_loss, grad_s, grad_t, _ = run_divergence_kernel(
            backend, student, teacher, row_mask, kind, 1.0, coef, 1.0, ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
        )
        ctx.save_for_backward(grad_s, grad_t)
        return row_loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_s, grad_t = ctx.saved_tensors
        grad_student = _row_loss.scale_by_upstream(grad_s, grad_output) if ctx.needs_input_grad[0] else None
        grad_teacher = _row_loss.scale_by_upstream(grad_t, grad_output) if ctx.needs_input_grad[1] else None
        return grad_student, grad_teacher, None, None, None, None


def _log_rest_mass(log_probs: torch.Tensor, matched: torch.Tensor, rest_ids: torch.Tensor,
                   is_logprob: bool) -> torch.Tensor:
    """``(N,)`` ``log(1 − Σ exp(matched))``: the mass that completes the matched entries
    ``(N, M)`` to a distribution.

    From logits it is the unmatched ids' mass (a log-sum-exp, exact however
    small); a log-probability row need not be normalised, so there it is
    ``1 − Σ`` itself, clamped at 0 against rounding above 1.
    """
    if not is_logprob:
        if rest_ids.numel() == 0:
            return torch.full_like(log_probs[:, 0], -math.inf)
        return torch.logsumexp(log_probs.index_select(1, rest_ids), 1)
    return torch.log((-torch.expm1(torch.logsumexp(matched, 1))).clamp(min=0))


def _matched_divergence(log_p, log_q, table, keep, beta, backend, student_is_logprob, teacher_is_logprob,
                        student_rest, teacher_rest):
    """``(N,)`` ``D_i``: the generalised JSD of the matched entries, not renormalised
    (docs/spec.md §1.14), through the fused divergence kernel, which renormalises what it is
    given. Two exact identities undo that renormalisation:

    - ``0 < β < 1``: the divergence is a sum over entries, so ``D_i`` is the
      kernel's JSD of the matched entries completed by one *rest* entry each (the
      mass ``1 − Σ`` they lack, so that the completed rows are distributions and
      the kernel's softmax leaves them as they are) minus that rest entry's term,
      which is finite for such β (the subtraction's error is absolute: about
      the dtype's epsilon times that term, at most ``log 2``).
    - ``β = 0`` (``β = 1`` mirrored): with ``T = Σ q_b``, ``S = Σ p_a`` over the
      matched ids, ``Σ q_b log(q_b / p_a) = T·(KL(q/T ‖ p/S) + log T − log S)``,
      and the kernel's KL of the matched entries is ``KL(q/T ‖ p/S)``; 0 where ``T = 0``.
    """
    matched_s = log_p.index_select(1, table[:, 0])
    matched_t = log_q.index_select(1, table[:, 1])
    if backend == "reference":
        return row_divergence(matched_t, matched_s, "jsd", beta=beta)
    kind, coef = kernel_divergence("jsd", beta, 0.0)
    if 0.0 < beta < 1.0:
        rest_s = _log_rest_mass(log_p, matched_s, student_rest, student_is_logprob)
        rest_t = _log_rest_mass(log_q, matched_t, teacher_rest, teacher_is_logprob)
        completed = _RowDivergenceFunction.apply(
            torch.cat([matched_s, rest_s[:, None]], 1), torch.cat([matched_t, rest_t[:, None]], 1), keep,
            kind, coef, backend,
        )
        return completed - row_divergence(rest_t[:, None], rest_s[:, None], "jsd", beta=beta)
    mass_s, mass_t = torch.logsumexp(matched_s, 1), torch.logsumexp(matched_t, 1)
    log_weight, log_other = (mass_t, mass_s) if beta == 0.0 else (mass_s, mass_t)
    live = log_weight > -math.inf
    # a row whose weighting side has no matched mass is 0, and one whose other
    # side has none (but the weighting side has) is +inf; both are kept out of
    # the kernel, whose softmax of an all -inf row is NaN
    infinite = live & (log_other == -math.inf)
    finite = live & ~infinite
    row_mask = finite if keep is None else finite & keep
    zero = torch.zeros_like(matched_s[:, :1])
    kl = _RowDivergenceFunction.apply(
        torch.where(finite[:, None], matched_s, zero), torch.where(finite[:, None], matched_t, zero),
        row_mask, kind, coef, backend,
    )
    log_weight = torch.where(finite, log_weight, 0.0)
    log_other = torch.where(finite, log_other, 0.0)
    rows = torch.where(finite, log_weight.exp() * (kl + log_weight - log_other), 0.0)
    return torch.where(infinite, math.inf, rows)


def _hybrid_rows(s, t, keep, ts, tt, student_is_logprob, teacher_is_logprob, table, beta, weights, backend):
    """``(N,)`` hybrid row losses ``w_m·D_i + w_u·U_i`` (docs/spec.md §1.14), 0 on excluded rows,
    in the accumulation dtype, from fused pieces on the backend ``backend`` names (or
    ``"auto"``): the divergence kernel on the matched ids and the ULD kernel on the
    unmatched ones, joined by eager log-softmax / index_select, differentiated by autograd."""
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    s, t = s.to(acc), t.to(acc)
    if keep is not None:
        # excluded rows become finite dummies, so that no NaN of theirs reaches a gradient
        s = torch.where(keep[:, None], s, torch.zeros_like(s))
        t = torch.where(keep[:, None], t, torch.zeros_like(t))
    log_p = _reference.log_probabilities(s, ts, student_is_logprob)
    log_q = _reference.log_probabilities(t, tt, teacher_is_logprob)
    student_rest = _reference.unmatched_ids(table[:, 0], s.shape[1]).to(s.device)
    teacher_rest = _reference.unmatched_ids(table[:, 1], t.shape[1]).to(s.device)
    w_matched, w_unmatched = _reference.hybrid_weights_for(table, t.shape[1], weights)
    rows = torch.zeros(s.shape[0], dtype=acc, device=s.device)
    if table.shape[0] > 0:
        divergence_backend = _dispatch.resolve(backend, s)
        rows = rows + w_matched * _matched_divergence(
            log_p, log_q, table.to(s.device), keep, beta, divergence_backend, student_is_logprob,
            teacher_is_logprob, student_rest, teacher_rest,
        )
    if student_rest.numel() > 0 and teacher_rest.numel() > 0:
        rest_s, rest_t = log_p.index_select(1, student_rest), log_q.index_select(1, teacher_rest)
        chosen = backend_for("uld_loss", KERNEL_BACKENDS, backend, rest_s)
        if chosen == "reference":
            every = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
            unmatched = _reference.uld_rows(rest_s, rest_t, every if keep is None else keep, 1.0, 1.0, True,
                                            True)
        else:
            unmatched = ULDFunction.apply(rest_s, rest_t, keep, 1.0, 1.0, 1.0, True, chosen, True, True)
        rows = rows + w_unmatched * unmatched
    return rows if keep is None else torch.where(keep, rows, torch.zeros_like(rows))


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    reduction: str = "batchmean",
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    hard_weight: float | None = None,
    soft_weight: float = 1.0,
    return_parts: bool = False,
    student_is_logprob: bool = False,
    teacher_is_logprob: bool = False,
    hybrid: torch.Tensor | None = None,
    hybrid_beta: float = 0.5,
    hybrid_weights: tuple[float, float] | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Universal Logit Distillation loss between aligned rows of two vocabularies.

    Per kept row ``i``: ``p = softmax(s_i / T_s)``, ``q = softmax(t_i / T_t)`` and
    ``ℓ_i = Σ_k |sort↓(p)_k − sort↓(q)_k|``, the shorter sorted vector padded
    with zeros (docs/spec.md §1.14). ``0 ≤ ℓ_i ≤ 2`` (for rows of total
    probability at most 1).

    A side flagged ``*_is_logprob`` holds log-probabilities used as given:
    ``p = exp(s_i)`` with no softmax and no renormalisation. This is how the
    rows of :func:`fastkd.merge_aligned` (not normalised: ``exp(row)`` is the
    merged probability row) are compared::

        student_rows = fastkd.merge_aligned(student_logits, student_ids, alignment.student_groups)
        teacher_rows = fastkd.merge_aligned(teacher_logits, teacher_ids, alignment.teacher_groups)
        loss = fastkd.uld_loss(student_rows, teacher_rows, student_is_logprob=True, teacher_is_logprob=True)

    Args:
        student_logits: ``(N, V_s)`` float32 / bfloat16 / float16 / float64.
        teacher_logits: ``(N, V_t)``, same N, dtype and device; ``V_t`` may
            differ from ``V_s``. Gets a gradient when it requires one.
        student_temperature, teacher_temperature: ``T_s, T_t > 0``; 1 on a side
            given as log-probabilities (apply a temperature before the
            log-softmax, e.g. ``merge_aligned(..., temperature=T)``).
        reduction: ``"batchmean"`` (sum over kept rows / number of kept rows),
            ``"sum"``, ``"none"`` (``(N,)``, 0 for excluded rows). There is no
            ``"mean"``: the rows have two lengths.
        mask: ``(N,)`` bool; rows where it is False are excluded.
        labels: ``(N,)`` integer student token ids; rows with
            ``labels == ignore_index`` are excluded. Needed for ``hard_weight``.
        hard_weight: ``None`` / 0 (off) or ``> 0``: add the student's
            cross-entropy on ``labels`` (temperature 1, over the same kept rows,
            reduced as :func:`fastkd.divergence` reduces it):
            ``loss = hard_weight · CE + soft_weight · ULD`` (the ULD paper's
            objective).
        soft_weight: ``>= 0`` multiplier of the ULD term (default 1).
        return_parts: return ``(total, hard_part, soft_part)``.
        student_is_logprob, teacher_is_logprob: that side's rows are
            log-probabilities, compared as ``exp(x)`` (no softmax, no
            normalisation; the values are not checked to be ``≤ 0``), with the
            gradient ``dℓ/dx_j = g_j · exp(x_j)``. An all ``−inf`` row of such a
            side is the zero vector, a legal input. The hard-label term always
            takes the student rows as logits (its softmax renormalises them).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or
            ``"triton"``. The triton kernel sorts a whole row in registers up
            to ``kernels.uld.MAX_VOCAB`` entries, longer rows by a device sort
            of packed (probability, column) keys per chunk of rows.
        hybrid: None, or an ``(M, 2)`` int64 tensor of ``(student id, teacher
            id)`` pairs, the tokens both vocabularies hold (e.g. the same
            token string in both tokenizers), one-to-one: TRL GOLD's hybrid
            ULD. Per kept row ``ℓ_i = w_m·D_i + w_u·U_i``: ``D_i`` the
            generalised JSD (β = ``hybrid_beta``, weighing the teacher side as
            :func:`fastkd.divergence`'s ``"jsd"``) of the matched probabilities
            compared id to id and *not* renormalised over them (as TRL), and
            ``U_i`` the sorted L1 above of the unmatched probabilities (0 when
            either side has none); docs/spec.md §1.14. An empty table is plain
            ULD. Checked on the host (a host-side constant of the tokenizers).
        hybrid_beta: β in [0, 1] of ``D_i`` (default 0.5; 0 is
            ``Σ q log(q/p)``, 1 is ``Σ p log(p/q)`` over the matched ids).
        hybrid_weights: ``(w_m, w_u)``, both ``>= 0``; None (default): TRL's
            ``(M / V_t, 1 − M / V_t)``.

    Returns:
        A float32 scalar (float64 for float64 input), or ``(N,)`` for ``"none"``.
        With no kept row the loss is 0 with a zero gradient.

    Subgradient: ``sign(0) = 0``, and entries of a row with equal probabilities
    share the mean of the signs of the ranks they occupy, whatever order a
    sort gives them. A kept row whose logits are all ``−inf`` has no
    distribution: the reference raises ``ValueError``, the kernels return NaN.
    A NaN entry, or a log-probability whose ``exp`` is ``+inf``, gives a NaN row.

    The hybrid loss is composed on the chosen backend: an eager log-softmax,
    ``index_select`` of the matched and unmatched ids, the fused divergence
    kernel on the matched ids (through the exact identities of
    ``_matched_divergence`` that turn its renormalised JSD / KL into the
    unnormalised one) and the fused ULD kernel on the unmatched ids as
    log-probabilities; its gradient is autograd's through those pieces. The
    log-softmax and the gathers are not fused: they hold a few ``(N, V)``
    copies in memory.
    """
    s, t, mask, ts, tt = _reference.check_arguments(student_logits, teacher_logits, mask, student_temperature,
                                                    teacher_temperature, reduction, student_is_logprob,
                                                    teacher_is_logprob)
    labels = _validate.row_selector("labels", labels, s.shape[:1], s, integer=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    hard_weight, soft_weight, mixing = _hard_labels.mixing_weights(hard_weight, soft_weight, labels)
    _validate.flag("return_parts", return_parts)
    hybrid_beta, hybrid_weights = _reference.check_hybrid_options(hybrid_beta, hybrid_weights)
    table = _reference.check_hybrid(hybrid, s.shape[1], t.shape[1])
    keep = _row_loss.kept_rows(labels, ignore_index, mask)
    if mixing:
        _hard_labels.check_label_range(labels.reshape(-1), keep, s.shape[1])
    chosen = backend_for("uld_loss", KERNEL_BACKENDS, backend, s)
    if table is not None:
        if chosen == "reference":
            every = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
            rows = _reference.uld_rows(s, t, every if keep is None else keep, ts, tt, student_is_logprob,
                                       teacher_is_logprob, table, hybrid_beta, hybrid_weights)
        else:
            rows = _hybrid_rows(s, t, keep, ts, tt, student_is_logprob, teacher_is_logprob, table,
                                hybrid_beta, hybrid_weights, chosen)
        if reduction == "none":
            soft = rows
        elif reduction == "sum" or keep is None:
            soft = rows.sum() / (max(s.shape[0], 1) if reduction == "batchmean" else 1)
        else:
            # a tensor count: no host read of the kept rows (torch.compile)
            soft = rows.sum() / keep.sum().clamp(min=1).to(rows.dtype)
    elif chosen == "reference":
        every = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
        rows = _reference.uld_rows(s, t, every if keep is None else keep, ts, tt, student_is_logprob,
                                   teacher_is_logprob)
        n_kept = s.shape[0] if keep is None else int(keep.sum())
        denominator = max(n_kept, 1) if reduction == "batchmean" else 1
        soft = rows if reduction == "none" else rows.sum() / denominator
    else:
        if reduction == "batchmean" and keep is not None and torch.compiler.is_compiling():
            # no host read of the kept-row count while tracing
            acc = torch.float64 if s.dtype == torch.float64 else torch.float32
            factor = 1.0 / keep.sum().clamp(min=1).to(acc)
        else:
            factor = _row_loss.loss_factor(reduction, 1.0, s.shape[0], keep, 1)
        soft = ULDFunction.apply(
            _row_loss.row_major(s), _row_loss.row_major(t), keep, 1.0 / ts, 1.0 / tt, factor,
            reduction == "none", chosen, student_is_logprob, teacher_is_logprob,
        )
    if not mixing and soft_weight == 1.0 and not return_parts:
        return soft
    return _hard_labels.mix_soft_with_reference_ce(
        soft, s, labels, reduction=reduction, ignore_index=ignore_index, mask=mask, hard_weight=hard_weight,
        soft_weight=soft_weight, return_parts=return_parts,
    )


class ULDLoss(LossModule):
    """Module form of :func:`uld_loss`; keyword arguments as there.

    ``forward(student_logits (N, V_s), teacher_logits (N, V_t), labels=None, mask=None)``
    """

    loss_function = staticmethod(uld_loss)
    # the hybrid table has one row per shared token: too long to print
    repr_hidden = ("hybrid",)

    def __init__(self, *, student_temperature: float = 1.0, teacher_temperature: float = 1.0,
                 reduction: str = "batchmean", ignore_index: int = -100, hard_weight: float | None = None,
                 soft_weight: float = 1.0, student_is_logprob: bool = False, teacher_is_logprob: bool = False,
                 hybrid: torch.Tensor | None = None, hybrid_beta: float = 0.5,
                 hybrid_weights: tuple[float, float] | None = None, backend: str = "auto") -> None:
        # validated here so that a bad module fails at construction (the hybrid
        # table's ids are checked against the vocabularies at each call)
        _reference.check_options(student_temperature, teacher_temperature, reduction, student_is_logprob,
                                 teacher_is_logprob)
        _reference.check_hybrid_options(hybrid_beta, hybrid_weights)
        if hybrid is not None:
            _reference.check_hybrid(hybrid, 2**62, 2**62)
        super().__init__(
            student_temperature=student_temperature, teacher_temperature=teacher_temperature,
            reduction=reduction, ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight,
            student_is_logprob=student_is_logprob, teacher_is_logprob=teacher_is_logprob, hybrid=hybrid,
            hybrid_beta=hybrid_beta, hybrid_weights=hybrid_weights, backend=backend,
        )

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(student_logits, teacher_logits, labels=labels, mask=mask)
