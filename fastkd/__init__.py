"""fastkd: fused knowledge-distillation losses for PyTorch.

Public API: the functional losses, their modules, and :func:`backends`.
"""

from fastkd._dispatch import BackendStatus, backends
from fastkd._ops import empty_cache
from fastkd.distiller import OUTPUT, Distiller, DistillerOutput, EMATeacher, Term
from fastkd.feature import ATLoss, HintLoss, at_loss
from fastkd.functional import divergence, info_nce, kd_loss, mmd_loss, nst_loss
from fastkd.losses import DivergenceLoss, InfoNCELoss, KDLoss, MMDLoss, NSTLoss

__version__ = "0.1.0"

__all__ = [
    "ATLoss",
    "Distiller",
    "DistillerOutput",
    "EMATeacher",
    "HintLoss",
    "OUTPUT",
    "Term",
    "at_loss",
    "BackendStatus",
    "DivergenceLoss",
    "InfoNCELoss",
    "KDLoss",
    "MMDLoss",
    "NSTLoss",
    "__version__",
    "backends",
    "divergence",
    "empty_cache",
    "info_nce",
    "kd_loss",
    "mmd_loss",
    "nst_loss",
]
