"""Every loss's ``nn.Module`` form in one namespace.

Each module lives next to its function in its family's module; this module
only re-exports them (``from fastkd.losses import *`` gives the modules alone).
"""

from fastkd.attention_relation import AttentionRelationLoss
from fastkd.attention_transfer import ATLoss
from fastkd.crd import CRDLoss
from fastkd.divergence import DivergenceLoss, KDLoss
from fastkd.dkd import DKDLoss
from fastkd.fused_linear import FusedLinearDivergenceLoss
from fastkd.gram_relation import CCLoss, PKTLoss, SPLoss
from fastkd.hidden_state import HiddenStateLoss
from fastkd.hint import HintLoss
from fastkd.info_nce import InfoNCELoss
from fastkd.mmd import MMDLoss
from fastkd.nst import NSTLoss
from fastkd.rkd import RKDLoss
from fastkd.topk import TopKDivergenceLoss
from fastkd.uld import ULDLoss

__all__ = [
    "ATLoss", "AttentionRelationLoss", "CCLoss", "CRDLoss", "DKDLoss", "DivergenceLoss",
    "FusedLinearDivergenceLoss", "HiddenStateLoss", "HintLoss", "InfoNCELoss", "KDLoss", "MMDLoss", "NSTLoss",
    "PKTLoss", "RKDLoss", "SPLoss", "TopKDivergenceLoss", "ULDLoss",
]
