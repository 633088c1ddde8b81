"""The specification (SPEC.md) in plain PyTorch: the oracle for parity tests.

Nothing here is fused or fast; every function uses ordinary autograd and
computes in float32 (float64 for float64 inputs).
"""

from fastkd.reference.contrastive import info_nce
from fastkd.reference.divergence import divergence, row_divergence
from fastkd.reference.dkd import dkd_loss
from fastkd.reference.fused_linear import cross_entropy, fused_linear_divergence, mixed_divergence
from fastkd.reference.mmd import kernel_matrix, mmd_loss, nst_loss
from fastkd.reference.relational import cc_loss, pkt_loss, rkd_angle, rkd_distance, rkd_loss, sp_loss

__all__ = [
    "cc_loss",
    "cross_entropy",
    "divergence",
    "dkd_loss",
    "fused_linear_divergence",
    "info_nce",
    "kernel_matrix",
    "mixed_divergence",
    "mmd_loss",
    "nst_loss",
    "pkt_loss",
    "rkd_angle",
    "rkd_distance",
    "rkd_loss",
    "row_divergence",
    "sp_loss",
]
