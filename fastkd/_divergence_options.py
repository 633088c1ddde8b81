"""The options shared by the divergence-like entry points, validated once.

:func:`fastkd.divergence`, :func:`fastkd.topk_divergence`, the mixture of
teachers, :func:`fastkd.fused_linear_divergence` and the vocabulary-parallel
divergence take the same options (divergence, temperature, β, α, scale,
reduction, ignore_index, labels, mask, hard / soft weights) with the same
checks and error messages; :meth:`DivergenceOptions.from_arguments` is that
check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastkd import _hard_labels, _validate
from fastkd._enums import DivergenceKind

__all__ = ["DEFAULT_ALPHA", "DEFAULT_BETA", "DivergenceOptions", "kernel_divergence", "used_coefficients"]


def kernel_divergence(divergence: str, beta: float, alpha: float) -> tuple[int, float]:
    """(kind code, interior coefficient) for the kernels.

    Endpoints are exact special cases (docs/spec.md §1): JSD at β=0 is KL(p‖q) and at
    β=1 is KL(q‖p); skew divergences at α=0 are the plain ones. The kernels
    see β in (0, 1) and α in (0, 1] (α=1 is the zero divergence KL(p‖p),
    which the kernels' formulas handle without special-casing).
    """
    if divergence == "jsd":
        if beta == 0.0:
            return int(DivergenceKind.KL), 0.0
        if beta == 1.0:
            return int(DivergenceKind.REVERSE_KL), 0.0
        return int(DivergenceKind.JSD), beta
    if divergence in ("skew_kl", "skew_reverse_kl"):
        if alpha == 0.0:
            return int(DivergenceKind.from_name(divergence.removeprefix("skew_"))), 0.0
        return int(DivergenceKind.from_name(divergence)), alpha
    return int(DivergenceKind.from_name(divergence)), 0.0


# The coefficients' defaults, for the divergences that use them.
DEFAULT_BETA = 0.5  # JSD, TRL's default
DEFAULT_ALPHA = 0.1  # skew KL / skew reverse KL, DistiLLM's default
SKEW_DIVERGENCES = ("skew_kl", "skew_reverse_kl")


def used_coefficients(divergence: str, beta, alpha) -> tuple[float, float]:
    """``(beta, alpha)`` validated, their defaults filled in; a coefficient given
    to a divergence that does not use it is a ``ValueError`` naming it (it would
    otherwise be dropped without a word)."""
    if beta is not None and divergence != "jsd":
        raise ValueError(
            f"beta is the JSD weight; divergence={divergence!r} does not use it (leave beta=None)"
        )
    if alpha is not None and divergence not in SKEW_DIVERGENCES:
        raise ValueError(
            "alpha is the skew weight of skew_kl / skew_reverse_kl; "
            f"divergence={divergence!r} does not use it "
            "(leave alpha=None)"
        )
    beta = DEFAULT_BETA if beta is None else _validate.real("beta", beta, low=0.0, high=1.0)
    alpha = DEFAULT_ALPHA if alpha is None else _validate.real("alpha", alpha, low=0.0, high=1.0)
    return beta, alpha


@dataclass(frozen=True)
class DivergenceOptions:
    """Validated options of one divergence-like call (see :func:`fastkd.divergence`)."""

    divergence: str
    temperature: float  # > 0
    beta: float  # in [0, 1]
    alpha: float  # in [0, 1]
    scale: float  # the argument, or temperature² for scale=None
    reduction: str
    ignore_index: int
    labels: torch.Tensor | None  # (...) integer, the logits' leading shape
    mask: torch.Tensor | None  # (...) bool
    hard_weight: float  # 0 when hard-label mixing is off
    soft_weight: float
    mixing: bool  # hard-label cross-entropy mixed in

    @classmethod
    def from_arguments(
        cls,
        *,
        divergence,
        temperature,
        beta,
        alpha,
        scale,
        reduction,
        ignore_index,
        labels,
        mask,
        hard_weight,
        soft_weight,
        ref: torch.Tensor,
        check_vocab: bool = True,
        divergences: tuple[str, ...] = _validate.DIVERGENCES,
        check_endpoints: Callable[[str, float, float], None] | None = None,
    ) -> DivergenceOptions:
        """Checks the options against ``ref``, the ``(..., V)`` student logits (or ``(..., H)``
        hidden states), in a fixed order, raising ``ValueError`` naming the argument.

        ``labels`` / ``mask`` must have ``ref``'s leading shape.
        ``check_vocab``: ``ref``'s last dimension is the vocabulary and must
        not be empty. ``divergences``: the accepted ``divergence`` names;
        ``check_endpoints(divergence, beta, alpha)`` rejects endpoint values
        the caller does not define (checked right after ``alpha``).
        """
        _validate.choice("divergence", divergence, divergences)
        _validate.choice("reduction", reduction, _validate.REDUCTIONS)
        temperature = _validate.real("temperature", temperature, low=0.0, low_open=True)
        beta, alpha = used_coefficients(divergence, beta, alpha)
        if check_endpoints is not None:
            check_endpoints(divergence, beta, alpha)
        scale = temperature**2 if scale is None else _validate.real("scale", scale)
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise ValueError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        lead = ref.shape[:-1]
        labels = _validate.row_selector("labels", labels, lead, ref, integer=True)
        mask = _validate.row_selector("mask", mask, lead, ref, integer=False)
        if check_vocab and ref.shape[-1] == 0:
            raise ValueError("student_logits must have a non-empty last (vocabulary) dimension")
        hard_weight, soft_weight, mixing = _hard_labels.mixing_weights(hard_weight, soft_weight, labels)
        return cls(
            divergence=divergence, temperature=temperature, beta=beta, alpha=alpha, scale=scale,
            reduction=reduction, ignore_index=ignore_index, labels=labels, mask=mask,
            hard_weight=hard_weight, soft_weight=soft_weight, mixing=mixing,
        )

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature

    @property
    def per_row(self) -> bool:
        """``reduction == "none"``: one loss per row."""
        return self.reduction == "none"

    def kernel_divergence(self) -> tuple[int, float]:
        """:func:`kernel_divergence` of these options."""
        return kernel_divergence(self.divergence, self.beta, self.alpha)

    def divergence_kwargs(self) -> dict:
        """The divergence keywords of :func:`fastkd.reference.divergence` and friends (and of
        :func:`fastkd.divergence` itself): only the coefficient the divergence reads."""
        coefficient = ({"beta": self.beta} if self.divergence == "jsd" else
                       {"alpha": self.alpha} if self.divergence in SKEW_DIVERGENCES else {})
        return dict(
            divergence=self.divergence, temperature=self.temperature, **coefficient,
            scale=self.scale, reduction=self.reduction, labels=self.labels, ignore_index=self.ignore_index,
            mask=self.mask,
        )
