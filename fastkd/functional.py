"""The functional losses of the divergence, InfoNCE, MMD, NST and ULD families in one namespace.

Each family lives in its own module (:mod:`fastkd.divergence`,
:mod:`fastkd.info_nce`, :mod:`fastkd.mmd`, :mod:`fastkd.nst`); this module
re-exports their functions and the constants that name their kernels.
"""

from fastkd._enums import DivergenceKind, MMDKernel
from fastkd.divergence import (  # noqa: F401  (re-exported)
    DivergenceFunction,
    HardSoftDivergenceFunction,
    divergence,
    kd_loss,
)
from fastkd.info_nce import INFO_NCE_KERNELS, InfoNCEFunction, info_nce  # noqa: F401  (re-exported)
from fastkd.mmd import MMD_KERNELS, MMDFunction, mmd_loss  # noqa: F401  (re-exported)
from fastkd.nst import NST_CLOSED_FORM_BACKENDS, nst_loss  # noqa: F401  (re-exported)
from fastkd.uld import ULDFunction, uld_loss  # noqa: F401  (re-exported)

__all__ = ["divergence", "info_nce", "kd_loss", "mmd_loss", "nst_loss", "uld_loss"]

# The kernels' integer codes by argument name (fastkd._enums defines them).
DIVERGENCE_CODES = {kind.name.lower(): int(kind) for kind in DivergenceKind}
MMD_KERNEL_CODES = {kernel.name.lower(): int(kernel) for kernel in MMDKernel}

