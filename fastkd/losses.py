"""The ``nn.Module`` forms of the divergence, InfoNCE, MMD, NST and ULD losses in one namespace.

Each module lives next to its function in its family's module; this module
re-exports them.
"""

from fastkd.divergence import DivergenceLoss, KDLoss
from fastkd.info_nce import InfoNCELoss
from fastkd.mmd import MMDLoss
from fastkd.nst import NSTLoss
from fastkd.uld import ULDLoss

__all__ = ["DivergenceLoss", "InfoNCELoss", "KDLoss", "MMDLoss", "NSTLoss", "ULDLoss"]
