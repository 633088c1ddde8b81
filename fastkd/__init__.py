"""fastkd: fused knowledge-distillation losses for PyTorch.

Public API: the functional losses, their modules, and :func:`backends`.
"""

from fastkd._dispatch import BackendStatus, backends
from fastkd._ops import empty_cache
from fastkd.functional import divergence, info_nce, kd_loss, mmd_loss, nst_loss
from fastkd.losses import DivergenceLoss, InfoNCELoss, KDLoss, MMDLoss, NSTLoss
from fastkd.relational import cc_loss, pkt_loss, rkd_angle, rkd_distance, rkd_loss, sp_loss
from fastkd.relational_losses import CCLoss, PKTLoss, RKDLoss, SPLoss

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "CCLoss",
    "DivergenceLoss",
    "InfoNCELoss",
    "KDLoss",
    "MMDLoss",
    "NSTLoss",
    "PKTLoss",
    "RKDLoss",
    "SPLoss",
    "__version__",
    "backends",
    "cc_loss",
    "divergence",
    "empty_cache",
    "info_nce",
    "kd_loss",
    "mmd_loss",
    "nst_loss",
    "pkt_loss",
    "rkd_angle",
    "rkd_distance",
    "rkd_loss",
    "sp_loss",
]
