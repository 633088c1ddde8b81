"""fastkd: fused knowledge-distillation losses for PyTorch.

Public API: the functional losses, their modules, and :func:`backends`.
"""

from fastkd._dispatch import BackendStatus, backends
from fastkd._ops import empty_cache
from fastkd.attention_relation import AttentionRelationLoss, attention_relation_loss
from fastkd.crd import CRDLoss, crd_nce
from fastkd.distiller import OUTPUT, Distiller, DistillerOutput, EMATeacher, Term
from fastkd.dkd import DKDLoss, dkd_loss
from fastkd.feature import ATLoss, HintLoss, at_loss
from fastkd.hidden_state import HiddenStateLoss, hidden_state_loss
from fastkd.functional import divergence, info_nce, kd_loss, mmd_loss, nst_loss
from fastkd.fused_linear import FusedLinearDivergenceLoss, fused_linear_divergence
from fastkd.losses import DivergenceLoss, InfoNCELoss, KDLoss, MMDLoss, NSTLoss
from fastkd.relational import cc_loss, pkt_loss, rkd_angle, rkd_distance, rkd_loss, sp_loss
from fastkd.relational_losses import CCLoss, PKTLoss, RKDLoss, SPLoss
from fastkd.topk import TopKDivergenceLoss, topk_divergence

__version__ = "0.1.0"

__all__ = [
    "ATLoss",
    "AttentionRelationLoss",
    "BackendStatus",
    "CCLoss",
    "CRDLoss",
    "DKDLoss",
    "Distiller",
    "DistillerOutput",
    "DivergenceLoss",
    "EMATeacher",
    "FusedLinearDivergenceLoss",
    "HiddenStateLoss",
    "HintLoss",
    "InfoNCELoss",
    "KDLoss",
    "MMDLoss",
    "NSTLoss",
    "OUTPUT",
    "PKTLoss",
    "RKDLoss",
    "SPLoss",
    "Term",
    "TopKDivergenceLoss",
    "at_loss",
    "attention_relation_loss",
    "backends",
    "cc_loss",
    "crd_nce",
    "divergence",
    "dkd_loss",
    "empty_cache",
    "fused_linear_divergence",
    "hidden_state_loss",
    "info_nce",
    "kd_loss",
    "mmd_loss",
    "nst_loss",
    "pkt_loss",
    "rkd_angle",
    "rkd_distance",
    "rkd_loss",
    "sp_loss",
    "topk_divergence",
    "__version__",
]
