"""The mathematical definitions in plain PyTorch: the oracle for parity tests.

One module per loss family (``fastkd.reference.<family>``). Nothing here is
fused or fast; every function uses ordinary autograd and computes in float32
(float64 for float64 inputs).
"""

from fastkd.reference.divergence import divergence, row_divergence
from fastkd.reference.dkd import dkd_loss
from fastkd.reference.fused_linear import cross_entropy, fused_linear_divergence, mixed_divergence
from fastkd.reference.gram_relation import cc_loss, pkt_loss, sp_loss
from fastkd.reference.info_nce import info_nce
from fastkd.reference.mmd import kernel_matrix, mmd_loss
from fastkd.reference.nst import nst_loss
from fastkd.reference.rkd import rkd_angle, rkd_distance, rkd_loss

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
