"""Multi-teacher divergence (the mixture family, docs/spec.md §1): the student against a mixture of teachers.

``fastkd.divergence(student (..., V), teachers (K, ..., V), teacher_weights=(K,))``
lands here. The target is ``p = Σ_k w_k softmax(t_k / T)``; the fused kernel
forms it per row, in log space, in the same call that evaluates the
divergence and its gradient — no ``(N, V)`` mixture tensor, no K passes of
the dense kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fastkd import _hard_labels, _ops, _validate  # noqa: F401  (_ops registers the fastkd:: ops)
from fastkd._backend import backend_for
from fastkd._divergence_options import DivergenceOptions
from fastkd._row_loss import (
    RowLossKernelFunction,
    StudentKernelCall,
    hard_soft_factors,
    kept_rows,
    loss_factor,
    row_major,
    student_hard_soft,
)
from fastkd.reference import mixture as _reference

__all__ = ["mixture_divergence"]

# The compiled backends with a multi-teacher kernel. All of them compute in
# float64 whatever the input dtype (see csrc/cpu/mixture_kernel.cpp); float64
# inputs on CUDA still go to the reference under backend="auto", as
# fastkd._dispatch routes no float64 to the GPU backends.
MIXTURE_KERNELS = ("cpu", "triton", "cuda")
# The CUDA kernel keeps the teachers' row statistics in shared memory (the
# limit of csrc/cuda/mixture.cu); the triton kernel takes any K.
CUDA_MAX_TEACHERS = 2048

# How far the weights' sum may be from 1 (docs/spec.md §6: "weights not summing to 1"
# is an error); loose enough for float32 weights from a softmax.
WEIGHT_SUM_TOLERANCE = 1e-6


def check_teacher_weights(teacher_weights, count: int, student: torch.Tensor) -> torch.Tensor:
    """``(K,)`` float64 weights: finite, >= 0, summing to 1 (``None``: uniform).

    Weights within ``WEIGHT_SUM_TOLERANCE`` of summing to 1 are accepted and
    returned divided by their sum, so that every backend (and the reference)
    mixes with the same weights and the mixture is a distribution.

    A sequence of numbers is checked in Python and returned on the CPU (the
    kernels copy it to the device without waiting). A tensor is read on the
    host when :func:`fastkd._validate.values_checked_on_host` says so (a CPU
    tensor; a GPU tensor under ``FASTKD_CHECK_DEVICE_VALUES=1``), and bad
    values raise ``ValueError``; otherwise (a GPU tensor, on ``student``'s
    device type) it stays on its device and its values are never read on the
    host: invalid weights come back all NaN, which makes the loss and its
    gradient NaN (docs/spec.md §6).
    """
    if teacher_weights is None:
        return torch.full((count,), 1.0 / count, dtype=torch.float64)
    if isinstance(teacher_weights, torch.Tensor):
        if not teacher_weights.dtype.is_floating_point:
            raise ValueError(f"teacher_weights must be floating point, got {teacher_weights.dtype}")
        _check_weight_count(teacher_weights.shape, count)
        on_device = teacher_weights.device.type == student.device.type
        if on_device and not _validate.values_checked_on_host(teacher_weights):
            return _weights_or_nan(teacher_weights.detach().to(device=student.device, dtype=torch.float64))
        weights = teacher_weights.detach().to(device="cpu", dtype=torch.float64)
    elif isinstance(teacher_weights, Sequence) and all(
        isinstance(w, (int, float)) and not isinstance(w, bool) for w in teacher_weights
    ):
        # the values are Python numbers: checked without building a tensor first
        values = [float(w) for w in teacher_weights]
        _check_weight_count((len(values),), count)
        _check_weight_values(all(math.isfinite(w) and w >= 0 for w in values), math.fsum(values))
        weights = torch.tensor(values, dtype=torch.float64)
        return weights / weights.sum()
    else:
        raise ValueError("teacher_weights must be a (K,) tensor or a sequence of numbers")
    _check_weight_values(
        bool(torch.isfinite(weights).all()) and not bool((weights < 0).any()), float(weights.sum())
    )
    return weights / weights.sum()


def _check_weight_count(shape, count: int) -> None:
    if tuple(shape) != (count,):
        raise ValueError(f"teacher_weights must have shape ({count},) (one per teacher), got {tuple(shape)}")


def _check_weight_values(finite_non_negative: bool, total: float) -> None:
    if not finite_non_negative:
        raise ValueError("teacher_weights must be finite and >= 0")
    if not math.isclose(total, 1.0, rel_tol=0.0, abs_tol=WEIGHT_SUM_TOLERANCE):
        raise ValueError(f"teacher_weights must sum to 1, got {total}")


def _weights_or_nan(weights: torch.Tensor) -> torch.Tensor:
    """``(K,)`` float64 ``weights / Σ weights``, or all NaN where the checks of
    :func:`check_teacher_weights` would fail; computed on the weights' device
    (no host read)."""
    total = weights.sum()
    valid = (
        torch.isfinite(weights).all() & (weights >= 0).all()
        & ((total - 1.0).abs() <= WEIGHT_SUM_TOLERANCE)
    )
    return torch.where(valid, weights / total, torch.nan)


def _mixture_op(backend: str):
    """The forward of ``backend`` with the contract of ``fastkd::mixture_divergence_forward``
    (``-> (row_loss, grad, row_ce)``)."""
    if backend == "triton":
        from fastkd.kernels import mixture as triton_mixture

        return triton_mixture.mixture_divergence_forward
    return torch.ops.fastkd.mixture_divergence_forward


def mixture_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    teacher_weights=None,
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
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Divergence between the mixture of K teachers and the student (docs/spec.md §1, multi-teacher).

    ``p = Σ_k w_k softmax(t_k / T)``, ``q = softmax(s / T)``, then the chosen
    divergence, ``scale`` and reduction exactly as :func:`fastkd.divergence`
    (which calls this for ``(K, ..., V)`` teachers).

    Args:
        student_logits: ``(..., V)``.
        teacher_logits: ``(K, ..., V)``, same dtype and device; gets no
            gradient (must not require one).
        teacher_weights: ``(K,)`` tensor or sequence, >= 0, summing to 1;
            ``None`` means uniform ``1/K``. Bad values raise ``ValueError``,
            except in a GPU tensor (unless ``FASTKD_CHECK_DEVICE_VALUES=1``),
            whose values are not read on the host: there they give a NaN
            loss and NaN gradients (docs/spec.md §6).
        The rest: as :func:`fastkd.divergence`; with ``hard_weight > 0`` the
            loss is ``hard_weight · CE(student, labels) + soft_weight ·
            divergence``, the CE computed in the fused kernel's pass from the
            student normaliser.

    A teacher row that is entirely ``−inf`` gives NaN (every backend).
    """
    s = _validate.tensor("student_logits", student_logits)
    t = _validate.tensor("teacher_logits", teacher_logits)
    if t.dim() != s.dim() + 1 or t.shape[1:] != s.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(t.shape)} must be (K, *student shape) for student_logits "
            f"shape {tuple(s.shape)}"
        )
    if t.dtype != s.dtype:
        raise ValueError(f"teacher_logits dtype {t.dtype} does not match student_logits dtype {s.dtype}")
    _validate.same_device("teacher_logits", t, "student_logits", s)
    if t.requires_grad:
        raise ValueError(
            "teacher_logits requires grad, but a mixture of teachers gets no gradient; pass a detached tensor"
        )
    if t.shape[0] == 0:
        raise ValueError("teacher_logits must hold at least one teacher (K >= 1)")
    weights = check_teacher_weights(teacher_weights, t.shape[0], s)
    options = DivergenceOptions.from_arguments(
        divergence=divergence, temperature=temperature, beta=beta, alpha=alpha, scale=scale,
        reduction=reduction, ignore_index=ignore_index, labels=labels, mask=mask, hard_weight=hard_weight,
        soft_weight=soft_weight, ref=s,
    )
    if not isinstance(return_parts, bool):
        raise ValueError(f"return_parts must be a bool, got {type(return_parts).__name__}")

    chosen = backend_for("multi-teacher divergence", MIXTURE_KERNELS, backend, s)
    if chosen == "reference":
        soft = _reference.mixture_divergence(s, t, weights, **options.divergence_kwargs())
    else:
        soft = _fused_mixture(s, t, weights, options, return_parts, chosen)
        if options.mixing:
            return soft  # (total, hard, soft) or total: the CE came from the kernel's pass
    if not (options.mixing or options.soft_weight != 1.0 or return_parts):
        return soft
    return _hard_labels.mix_soft_with_reference_ce(
        soft, s, options.labels, reduction=options.reduction, ignore_index=options.ignore_index,
        mask=options.mask, hard_weight=options.hard_weight, soft_weight=options.soft_weight,
        return_parts=return_parts,
    )


def _weights_for_capture(weights: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``weights`` ``(K,)``, or, when they are host weights (checked in Python)
    for a CUDA stream that is capturing a graph, the same values on ``device``.

    Outside a capture the kernels copy host weights from a pinned buffer
    without waiting. A captured copy would read that buffer's address again at
    every replay, after the call has released it to the allocator for other
    data; so under capture the values go into the graph as the arguments of
    fill kernels (K of them, once per replay) and reach the kernels as device
    weights, which they take without reading them on the host.
    """
    if weights.device == device or device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
        return weights
    return graph_constants(weights, device)


def graph_constants(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of the CPU tensor ``values`` ``(K,)`` on ``device``, made by K fill
    kernels whose scalar arguments hold the values (no host buffer)."""
    return torch.stack(
        [torch.full((), value, dtype=values.dtype, device=device) for value in values.tolist()]
    )


def _fused_mixture(s, t, weights, options: DivergenceOptions, return_parts: bool, chosen: str):
    """The mixture divergence on ``chosen``'s kernel (validated arguments); with hard labels
    mixed in, ``(total, hard, soft)`` / ``total`` with the CE from the same pass."""
    vocab, count = s.shape[-1], t.shape[0]
    if chosen == "cuda" and count > CUDA_MAX_TEACHERS:
        raise ValueError(
            f"teacher_logits holds {count} teachers; the cuda backend takes at most {CUDA_MAX_TEACHERS}"
        )
    weights = _weights_for_capture(weights, s.device)
    student = row_major(s.reshape(-1, vocab))
    teachers = t.reshape(count, -1, vocab)
    if vocab > 1 and teachers.stride(-1) != 1:
        teachers = teachers.contiguous()
    keep = kept_rows(options.labels, options.ignore_index, options.mask)
    kind, coef = options.kernel_divergence()
    if options.mixing:
        flat_labels = options.labels.reshape(-1).long()
        _hard_labels.check_label_range(flat_labels, keep, vocab)
        soft_factor, hard_factor = hard_soft_factors(
            options.reduction, options.scale, keep, vocab, options.hard_weight, options.soft_weight
        )
        call = StudentKernelCall(
            op=_mixture_op(chosen), kind=kind, inv_temperature=options.inv_temperature, coef=coef,
            soft_factor=soft_factor, hard_factor=hard_factor, per_row=options.per_row,
            separable=return_parts,
        )
        lead = s.shape[:-1]
        return student_hard_soft(call, student, teachers, weights, keep, flat_labels, lead, return_parts)
    factor = loss_factor(options.reduction, options.scale, student.shape[0], keep, vocab)
    loss = RowLossKernelFunction.apply(
        _mixture_op(chosen), factor, options.per_row,
        student, teachers, weights, keep, kind, options.inv_temperature, coef, factor,
    )
    return loss.reshape(s.shape[:-1]) if options.per_row else loss
