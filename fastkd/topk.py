"""Divergence against a top-k (sparse) teacher, docs/spec.md §1.

What LLM distillation pipelines store offline instead of full teacher logits:
per token, the teacher's k most likely vocabulary ids and their logits (or
log-probabilities). The teacher distribution is renormalised over those k ids;
the student's is its full-vocabulary softmax. The fused kernel never builds an
``(N, V)`` teacher tensor: its dense work is the student row alone.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from fastkd import _hard_labels, _ops, _validate  # noqa: F401  (_ops registers the fastkd:: ops)
from fastkd._backend import backend_for
from fastkd._divergence_options import DivergenceOptions
from fastkd._row_loss import (
    RowLossKernelFunction,
    StudentKernelCall,
    hard_soft_factors,
    kept_rows,
    loss_factor,
    over_given_items,
    row_major,
    student_hard_soft,
)
from fastkd.reference import topk as _reference_topk

__all__ = ["TOPK_DIVERGENCES", "TopKDivergenceLoss", "topk_divergence"]

# The compiled backends with a top-k kernel (fastkd::topk_divergence_forward on
# cpu and cuda, kernels/topk.py on triton).
TOPK_KERNELS = ("cpu", "triton", "cuda")

# Divergences defined for a teacher with support on k ids: everything in the
# family except KL(q‖p), which is +∞ whenever the student puts mass off the
# teacher's ids (always, for a softmax student and k < V). So are its
# endpoint forms: JSD with β = 1 and the skew reverse KL with α = 0.
TOPK_DIVERGENCES = ("kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")

# How far above 0 a stored log-probability may be (rounding of a fp16 / bf16
# store) before teacher_is_logprob=True rejects it as not a log-probability.
_LOGPROB_SLACK = 1e-2


def _check_teacher(student: torch.Tensor, index, values, teacher_is_logprob: bool):
    """Validates the sparse teacher against ``student`` ``(..., V)``: its shapes,
    dtypes and devices always; its values (ids in range and distinct per row,
    no all ``-inf`` row, log-probabilities) only where
    :func:`fastkd._validate.values_checked_on_host` — on a GPU those rows come
    out NaN instead (:func:`_mark_bad_rows`)."""
    if not isinstance(index, torch.Tensor):
        raise ValueError(f"teacher_index must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype != torch.int64:
        raise ValueError(f"teacher_index must be int64, got {index.dtype}")
    values = _validate.tensor("teacher_values", values)
    if index.shape[:-1] != student.shape[:-1] or index.dim() != student.dim():
        raise ValueError(
            f"teacher_index shape {tuple(index.shape)} must be the student's leading shape "
            f"{tuple(student.shape[:-1])} followed by k"
        )
    if values.shape != index.shape:
        raise ValueError(
            f"teacher_values shape {tuple(values.shape)} does not match "
            f"teacher_index shape {tuple(index.shape)}"
        )
    _validate.same_device("teacher_index", index, "student_logits", student)
    _validate.same_device("teacher_values", values, "student_logits", student)
    if values.requires_grad:
        raise ValueError(
            "teacher_values requires grad, but the top-k teacher gets no gradient; "
            "pass teacher_values.detach()"
        )
    vocab, k = student.shape[-1], index.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher_index must hold between 1 and V={vocab} ids per row, got k={k}")
    if index.numel() == 0 or not _validate.values_checked_on_host(index):
        return values
    if bool(((index < 0) | (index >= vocab)).any()):
        raise ValueError(
            f"teacher_index has ids outside [0, {vocab}) (the student's vocabulary); if the teacher's "
            f"vocabulary is padded beyond the student's (same tokenizer), its padding ids carry no mass: "
            f"take the top-k of teacher_logits[..., :{vocab}]"
        )
    ordered = index.sort(dim=-1).values
    if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
        raise ValueError("teacher_index has an id twice in one row")
    if bool(torch.isneginf(values).all(dim=-1).any()):
        raise ValueError("teacher_values has a row whose values are all -inf (no teacher distribution)")
    if teacher_is_logprob:
        if bool((values > _LOGPROB_SLACK).any()):
            raise ValueError("teacher_is_logprob=True but teacher_values has entries > 0")
        mass = torch.logsumexp(values.float(), dim=-1)
        if bool((mass > _LOGPROB_SLACK).any()):
            raise ValueError("teacher_is_logprob=True but a row of teacher_values has total probability > 1")
    return values


def _mark_bad_rows(index: torch.Tensor, values: torch.Tensor, vocab: int, teacher_is_logprob: bool,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, values)`` ``(..., k)`` for a teacher whose values were not checked
    on the host: every row that :func:`_check_teacher` would refuse comes out of
    the loss NaN, with device ops only (no device → host synchronisation).

    The fused kernels guard the ids themselves (an id outside ``[0, V)`` or
    twice in a row: NaN loss and gradient row, nothing read or written out of
    bounds), and an all ``-inf`` row has no teacher normaliser, which makes
    its loss and gradient row NaN in their arithmetic. What is left here: rows
    of ``teacher_is_logprob=True`` values that are not log-probabilities get
    NaN values; and for the reference, which scatters the values into a dense
    row (and refuses an all ``-inf`` one), a row with bad ids gets the
    in-range ids ``0 … k−1`` and NaN values, as does an all ``-inf`` row.
    """
    bad = None
    if teacher_is_logprob:
        bad = (values > _LOGPROB_SLACK).any(dim=-1)
        bad |= torch.logsumexp(values.float(), dim=-1) > _LOGPROB_SLACK
    if backend == "reference":
        ordered = index.sort(dim=-1).values
        bad_ids = (ordered[..., 0] < 0) | (ordered[..., -1] >= vocab)
        bad_ids |= (ordered[..., 1:] == ordered[..., :-1]).any(dim=-1)
        in_range = torch.arange(index.shape[-1], device=index.device).expand_as(index)
        index = torch.where(bad_ids.unsqueeze(-1), in_range, index)
        bad_ids |= torch.isneginf(values).all(dim=-1)
        bad = bad_ids if bad is None else bad | bad_ids
    if bad is not None:
        values = values.masked_fill(bad.unsqueeze(-1), float("nan"))
    return index, values


def topk_divergence(
    student_logits: torch.Tensor,
    teacher_index: torch.Tensor,
    teacher_values: torch.Tensor,
    *,
    teacher_is_logprob: bool = False,
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
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Divergence between a top-k teacher and the full-vocabulary student.

    Per row: ``p_j = softmax_j(values / T)`` over the row's k ids (the teacher,
    renormalised over them) and ``q = softmax(s / T)`` over all V entries; the
    row loss is the chosen divergence between ``p`` (zero off the k ids) and
    ``q``. For KL: ``ℓ = Σ_j p_j (log p_j − log q_{idx_j})``. Equal to
    :func:`fastkd.divergence` with teacher logits ``values`` at the k ids and
    ``−inf`` elsewhere. ``loss = scale · reduce(ℓ)`` as in :func:`fastkd.divergence`.

    Args:
        student_logits: ``(..., V)`` float32 / bfloat16 / float16 / float64.
        teacher_index: ``(..., k)`` int64, distinct ids in ``[0, V)`` per row
            (ValueError otherwise; on a GPU, where reading them would
            synchronise with the host, such a row's loss and gradient are
            NaN instead unless ``FASTKD_CHECK_DEVICE_VALUES=1``, as for the
            value checks below: docs/spec.md §6).
        teacher_values: ``(..., k)`` floating, the teacher's logits at those
            ids (any floating dtype; the fused kernel reads them in float32,
            float64 for a float64 student). Gets no gradient (must not
            require one). ``−inf`` entries are legal (zero mass) but not a
            whole row of them.
        teacher_is_logprob: the values are log-probabilities (log-softmax at
            temperature 1, as generation logs store them) rather than logits.
            After renormalisation over the k ids both give the same ``p`` — a
            log-probability differs from its logit by a per-row constant — so
            the temperature rescales stored log-probabilities exactly as it
            rescales logits; the flag only checks that the values are
            log-probabilities (≤ 0, total mass ≤ 1).
        divergence: ``"kl"``, ``"jsd"``, ``"skew_kl"``, ``"skew_reverse_kl"``
            or ``"tvd"`` — see :func:`fastkd.divergence`. ``"reverse_kl"`` is
            not defined here (KL(q‖p) is +∞ when ``q`` has mass off the k
            ids), nor are its endpoint forms ``jsd`` with ``beta=1`` and
            ``skew_reverse_kl`` with ``alpha=0``.
        temperature, beta, alpha, scale, reduction, labels, ignore_index, mask,
        hard_weight, soft_weight, return_parts, num_items_in_batch, backend: as
            :func:`fastkd.divergence` (``"mean"`` divides by kept rows · V, the
            full vocabulary; with ``hard_weight > 0`` the loss is
            ``hard_weight · CE(student, labels) + soft_weight · divergence``,
            the CE over the full vocabulary at temperature 1, computed in
            the fused kernel's pass from the student normaliser, as in
            :func:`fastkd.divergence`).

    Returns:
        A float32 scalar (float64 for float64 input), or ``(...)`` for ``"none"``.
    """
    if num_items_in_batch is not None:
        def summed(*, reduction, scale, hard_weight):
            return topk_divergence(
                student_logits, teacher_index, teacher_values, teacher_is_logprob=teacher_is_logprob,
                divergence=divergence, temperature=temperature, beta=beta, alpha=alpha, scale=scale,
                reduction=reduction, labels=labels, ignore_index=ignore_index, mask=mask,
                hard_weight=hard_weight, soft_weight=soft_weight, return_parts=return_parts, backend=backend,
            )

        return over_given_items(
            summed, num_items_in_batch, reduction=reduction, scale=scale, temperature=temperature,
            hard_weight=hard_weight,
        )
    s = _validate.tensor("student_logits", student_logits)
    if s.shape[-1] == 0:
        raise ValueError("student_logits must have a non-empty last (vocabulary) dimension")
    values = _check_teacher(s, teacher_index, teacher_values, teacher_is_logprob)
    options = DivergenceOptions.from_arguments(
        divergence=divergence, temperature=temperature, beta=beta, alpha=alpha, scale=scale,
        reduction=reduction, ignore_index=ignore_index, labels=labels, mask=mask, hard_weight=hard_weight,
        soft_weight=soft_weight, ref=s, divergences=TOPK_DIVERGENCES, check_endpoints=_check_endpoints,
    )

    chosen = backend_for("top-k divergence", TOPK_KERNELS, backend, s)
    ids_checked = _validate.values_checked_on_host(teacher_index)
    if not ids_checked and teacher_index.numel() > 0:
        teacher_index, values = _mark_bad_rows(teacher_index, values, s.shape[-1], teacher_is_logprob, chosen)
    if options.mixing and chosen != "reference":
        return _fused_topk_hard_soft(s, teacher_index, values, options, return_parts, chosen, ids_checked)
    if chosen == "reference":
        soft = _reference_topk.topk_divergence(s, teacher_index, values, **options.divergence_kwargs())
    else:
        soft = _fused_topk(s, teacher_index, values, options, chosen, ids_checked)
    if not (options.mixing or options.soft_weight != 1.0 or return_parts):
        return soft
    return _hard_labels.mix_soft_with_reference_ce(
        soft, s, options.labels, reduction=options.reduction, ignore_index=options.ignore_index,
        mask=options.mask, hard_weight=options.hard_weight, soft_weight=options.soft_weight,
        return_parts=return_parts,
    )


def _check_endpoints(divergence: str, beta: float, alpha: float) -> None:
    """Rejects the endpoint values that make a divergence the reverse KL (undefined here)."""
    if divergence == "jsd" and beta == 1.0:
        raise ValueError("beta=1 makes jsd the reverse KL, which is not defined for a top-k teacher")
    if divergence == "skew_reverse_kl" and alpha == 0.0:
        raise ValueError(
            "alpha=0 makes skew_reverse_kl the reverse KL, which is not defined for a top-k teacher"
        )


def _teacher_rows(s, teacher_index, values):
    """``(N, k)`` contiguous ids and values (float32; float64 for a float64 student)."""
    k = teacher_index.shape[-1]
    value_dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
    return teacher_index.reshape(-1, k).contiguous(), values.reshape(-1, k).to(value_dtype).contiguous()


def _fused_topk_hard_soft(s, teacher_index, values, options: DivergenceOptions, return_parts: bool,
                          backend: str, ids_checked: bool):
    """``hard_weight · CE + soft_weight · divergence`` in one pass of ``backend``'s kernel."""
    vocab = s.shape[-1]
    student = row_major(s.reshape(-1, vocab))
    flat_labels = options.labels.reshape(-1).long()
    keep = kept_rows(options.labels, options.ignore_index, options.mask)
    _hard_labels.check_label_range(flat_labels, keep, vocab)
    kind, coef = options.kernel_divergence()
    soft_factor, hard_factor = hard_soft_factors(
        options.reduction, options.scale, keep, vocab, options.hard_weight, options.soft_weight
    )
    call = StudentKernelCall(
        op=_topk_op(backend, ids_checked), kind=kind, inv_temperature=options.inv_temperature, coef=coef,
        soft_factor=soft_factor, hard_factor=hard_factor, per_row=options.per_row, separable=return_parts,
    )
    index, value_rows = _teacher_rows(s, teacher_index, values)
    return student_hard_soft(call, student, index, value_rows, keep, flat_labels, s.shape[:-1], return_parts)


def _topk_op(backend: str, ids_checked: bool):
    """``backend``'s ``op(student, index, values, row_mask, kind, inv_t, coef, grad_scale, student_grad,
    labels=None, hard_grad_scale=0.0) -> (row_loss, grad, row_ce)``.

    ``ids_checked``: the ids were checked on the host (:func:`_check_teacher`),
    so the Triton launcher does not read them again; otherwise its kernel
    guards each row. The ``fastkd::`` op checks on the host on CPU and guards
    in the kernel on CUDA by itself.
    """
    if backend == "triton":
        from fastkd.kernels import topk as triton_topk

        return functools.partial(triton_topk.topk_divergence_forward, ids_checked=ids_checked)
    return torch.ops.fastkd.topk_divergence_forward


def _fused_topk(s, teacher_index, values, options: DivergenceOptions, backend: str, ids_checked: bool):
    """The divergence term on the fused kernel of ``backend`` (validated arguments)."""
    vocab = s.shape[-1]
    student = row_major(s.reshape(-1, vocab))
    index, value_rows = _teacher_rows(s, teacher_index, values)
    keep = kept_rows(options.labels, options.ignore_index, options.mask)
    factor = loss_factor(options.reduction, options.scale, student.shape[0], keep, vocab)
    kind, coef = options.kernel_divergence()
    loss = RowLossKernelFunction.apply(
        _topk_op(backend, ids_checked), factor, options.per_row,
        student, index, value_rows, keep, kind, options.inv_temperature, coef, factor,
    )
    return loss.reshape(s.shape[:-1]) if options.per_row else loss


class TopKDivergenceLoss(nn.Module):
    """Module form of :func:`topk_divergence` (options fixed at construction).

    ``forward(student_logits (..., V), teacher_index (..., k), teacher_values (..., k),
    labels=None, mask=None)``.
    """

    def __init__(
        self,
        divergence: str = "kl",
        *,
        temperature: float = 1.0,
        beta: float | None = None,
        alpha: float | None = None,
        scale: float | None = None,
        reduction: str = "batchmean",
        ignore_index: int = -100,
        teacher_is_logprob: bool = False,
        hard_weight: float | None = None,
        soft_weight: float = 1.0,
        backend: str = "auto",
    ):
        super().__init__()
        self.options = dict(
            divergence=divergence, temperature=temperature, beta=beta, alpha=alpha, scale=scale,
            reduction=reduction, ignore_index=ignore_index, teacher_is_logprob=teacher_is_logprob,
            hard_weight=hard_weight, soft_weight=soft_weight, backend=backend,
        )

    def forward(self, student_logits, teacher_index, teacher_values, labels=None, mask=None):
        return topk_divergence(
            student_logits, teacher_index, teacher_values, labels=labels, mask=mask, **self.options
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
