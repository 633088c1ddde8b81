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

import torch

from fastkd import _hard_labels, _row_loss, _validate
from fastkd import _ops as _extension
from fastkd._backend import backend_for
from fastkd._module_form import LossModule
from fastkd.reference import uld as _reference

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
        grad_scale = factor if isinstance(factor, float) else 1.0
        row_loss, grad_s, grad_t = _run_kernel(
            backend, student, teacher, row_mask, inv_ts, inv_tt, grad_scale, ctx.needs_input_grad[0],
            ctx.needs_input_grad[1], student_is_logprob, teacher_is_logprob,
        )
        deferred = None if isinstance(factor, float) else factor
        ctx.save_for_backward(grad_s, grad_t, deferred)
        return row_loss * factor if per_row else row_loss.sum() * factor

    @staticmethod
    def backward(ctx, grad_output):
        grad_s, grad_t, deferred = ctx.saved_tensors
        upstream = grad_output if deferred is None else grad_output * deferred
        grad_student = _row_loss.scale_by_upstream(grad_s, upstream) if ctx.needs_input_grad[0] else None
        grad_teacher = _row_loss.scale_by_upstream(grad_t, upstream) if ctx.needs_input_grad[1] else None
        return grad_student, grad_teacher, None, None, None, None, None, None, None, None


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

    Returns:
        A float32 scalar (float64 for float64 input), or ``(N,)`` for ``"none"``.
        With no kept row the loss is 0 with a zero gradient.

    Subgradient: ``sign(0) = 0``, and entries of a row with equal probabilities
    share the mean of the signs of the ranks they occupy, whatever order a
    sort gives them. A kept row whose logits are all ``−inf`` has no
    distribution: the reference raises ``ValueError``, the kernels return NaN.
    A NaN entry, or a log-probability whose ``exp`` is ``+inf``, gives a NaN row.
    """
    s, t, mask, ts, tt = _reference.check_arguments(student_logits, teacher_logits, mask, student_temperature,
                                                    teacher_temperature, reduction, student_is_logprob,
                                                    teacher_is_logprob)
    labels = _validate.row_selector("labels", labels, s.shape[:1], s, integer=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    hard_weight, soft_weight, mixing = _hard_labels.mixing_weights(hard_weight, soft_weight, labels)
    _validate.flag("return_parts", return_parts)
    keep = _row_loss.kept_rows(labels, ignore_index, mask)
    if mixing:
        _hard_labels.check_label_range(labels.reshape(-1), keep, s.shape[1])
    chosen = backend_for("uld_loss", KERNEL_BACKENDS, backend, s)
    if chosen == "reference":
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

    def __init__(self, *, student_temperature: float = 1.0, teacher_temperature: float = 1.0,
                 reduction: str = "batchmean", ignore_index: int = -100, hard_weight: float | None = None,
                 soft_weight: float = 1.0, student_is_logprob: bool = False, teacher_is_logprob: bool = False,
                 backend: str = "auto") -> None:
        # validated here so that a bad module fails at construction
        _reference.check_options(student_temperature, teacher_temperature, reduction, student_is_logprob,
                                 teacher_is_logprob)
        super().__init__(
            student_temperature=student_temperature, teacher_temperature=teacher_temperature,
            reduction=reduction, ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight,
            student_is_logprob=student_is_logprob, teacher_is_logprob=teacher_is_logprob, backend=backend,
        )

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(student_logits, teacher_logits, labels=labels, mask=mask)
