"""Lowering variants of kernels/gram_relation.py.

The launchers widen every input to float32 first, so the kernels see float32
only. N = 4096 picks the GPU launch configuration of a large batch.
"""

from __future__ import annotations

from tests.triton_variants import Variant

N = 4096


def sp_variants(module):
    """With the gradient (written over the student's Gram matrix) and loss only."""
    block_i, block_j, num_warps = module.gram_config(N)
    types = {
        "gs_ptr": "*fp32", "gt_ptr": "*fp32", "loss_ptr": "*fp32", "dg_ptr": "*fp32",
        "N": "i32", "inv_n2": "fp32",
    }
    blocks = {"BLOCK_I": block_i, "BLOCK_J": block_j}
    yield Variant("fp32 grad", types, {"GRAD": True, **blocks}, num_warps)
    yield Variant("fp32 loss only", types, {"GRAD": False, "dg_ptr": None, **blocks}, num_warps)


def cc_variants(module):
    """The norm pass and the gradient pass."""
    block_i, block_j, num_warps = module.gram_config(N)
    types = {
        "gs_ptr": "*fp32", "gt_ptr": "*fp32", "sq_ptr": "*fp32", "dg_ptr": "*fp32", "coef_ptr": "*fp64",
        "N": "i32", "two_gamma": "fp32", "scale": "fp32", "order": "i32",
    }
    blocks = {"BLOCK_I": block_i, "BLOCK_J": block_j}
    norm_pass = {"FIRST": True, "dg_ptr": None, "coef_ptr": None, **blocks}
    yield Variant("fp32 norm pass", types, norm_pass, num_warps)
    yield Variant("fp32 gradient pass", types, {"FIRST": False, **blocks}, num_warps)


def pkt_variants(module):
    """With the gradient (written over the student's Gram matrix) and loss only."""
    block_i, block_j, num_warps = module.gram_config(N)
    types = {
        "hs_ptr": "*fp32", "ht_ptr": "*fp32", "loss_ptr": "*fp32", "dh_ptr": "*fp32",
        "N": "i32", "eps": "fp32", "inv_n2": "fp32",
    }
    blocks = {"BLOCK_I": block_i, "BLOCK_J": block_j}
    yield Variant("fp32 grad", types, {"GRAD": True, **blocks}, num_warps)
    yield Variant("fp32 loss only", types, {"GRAD": False, "dh_ptr": None, **blocks}, num_warps)


VARIANTS = {
    "_pkt_kernel": pkt_variants,
    "_sp_kernel": sp_variants,
    "_cc_kernel": cc_variants,
}
