"""The integer codes the compiled kernels take, defined once for Python and Triton.

Each enum mirrors a C++ enum (names and values; ``tests/test_enums.py``
checks that they agree):

- :class:`DivergenceKind`: ``fastkd::divergence::Kind`` in
  ``csrc/common/divergence_math.h``, the ``kind`` argument of the divergence,
  top-k and mixture ops.
- :class:`MMDKernel`: the C++ ``MmdKernel``, the ``kernel`` argument of the
  MMD ops.
- :class:`HiddenStateKind`: ``fastkd::hidden_state::HiddenStateKind`` in
  ``csrc/common/hidden_state_op.h``, the ``kind`` argument of
  ``fastkd::hidden_state_forward``.
"""

from __future__ import annotations

import enum

__all__ = ["DivergenceKind", "HiddenStateKind", "MMDKernel"]


class DivergenceKind(enum.IntEnum):
    """Which divergence a row kernel evaluates (the ``kind`` argument)."""

    KL = 0  # KL(p‖q)
    REVERSE_KL = 1  # KL(q‖p)
    JSD = 2  # β KL(p‖m) + (1−β) KL(q‖m),  m = β p + (1−β) q
    SKEW_KL = 3  # KL(p‖m),  m = α p + (1−α) q
    SKEW_REVERSE_KL = 4  # KL(q‖m),  m = α q + (1−α) p
    TVD = 5  # ½ Σ |p − q|

    @classmethod
    def from_name(cls, name: str) -> DivergenceKind:
        """The member for a ``divergence=`` argument (``"kl"``, ``"jsd"``, ...)."""
        return cls[name.upper()]


class MMDKernel(enum.IntEnum):
    """Which kernel the MMD ops sum (the ``kernel`` argument)."""

    GAUSSIAN = 0
    LAPLACIAN = 1
    POLYNOMIAL = 2

    @classmethod
    def from_name(cls, name: str) -> MMDKernel:
        """The member for a ``kernel=`` argument (``"gaussian"``, ...)."""
        return cls[name.upper()]


class HiddenStateKind(enum.IntEnum):
    """Which hidden-state loss the row kernels evaluate (the ``kind`` argument)."""

    MSE = 0  # (1/D) Σ (h − g)², TinyBERT
    COSINE = 1  # 1 − cos(h, g), DistilBERT

    @classmethod
    def from_name(cls, name: str) -> HiddenStateKind:
        """The member for a ``kind=`` argument (``"mse"``, ``"cosine"``)."""
        return cls[name.upper()]
