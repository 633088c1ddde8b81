"""fastkd: fused knowledge-distillation losses for PyTorch.

Public API: the functional losses, their modules, and :func:`backends`.
"""

from fastkd._dispatch import BackendStatus, backends
from fastkd._ops import empty_cache
from fastkd.attention_relation import AttentionRelationLoss, attention_relation_loss
from fastkd.attention_transfer import ATLoss, at_loss
from fastkd.crd import CRDLoss, crd_nce
from fastkd.distiller import OUTPUT, Distiller, DistillerOutput, EMATeacher, Term
from fastkd.divergence import DivergenceLoss, KDLoss, divergence, kd_loss
from fastkd.dkd import DKDLoss, dkd_loss
from fastkd.fused_linear import FusedLinearDivergenceLoss, fused_linear_divergence
from fastkd.gram_relation import CCLoss, PKTLoss, SPLoss, cc_loss, pkt_loss, sp_loss
from fastkd.hidden_state import HiddenStateLoss, hidden_state_loss
from fastkd.hint import HintLoss
from fastkd.info_nce import InfoNCELoss, info_nce
from fastkd.mmd import MMDLoss, mmd_loss
from fastkd.nst import NSTLoss, nst_loss
from fastkd.rkd import RKDLoss, rkd_angle, rkd_distance, rkd_loss
from fastkd.token_alignment import TokenAlignment, align_by_offsets, merge_aligned
from fastkd.topk import TopKDivergenceLoss, topk_divergence
from fastkd.uld import ULDLoss, uld_loss

# fastkd.divergence and fastkd.info_nce name a function here and a module in
# sys.modules: the package imports both modules above, before binding the
# functions, so the attributes stay the functions. Reach the modules with
# importlib.import_module("fastkd.divergence").

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
    "TokenAlignment",
    "TopKDivergenceLoss",
    "ULDLoss",
    "align_by_offsets",
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
    "merge_aligned",
    "mmd_loss",
    "nst_loss",
    "pkt_loss",
    "rkd_angle",
    "rkd_distance",
    "rkd_loss",
    "sp_loss",
    "topk_divergence",
    "uld_loss",
    "__version__",
]
