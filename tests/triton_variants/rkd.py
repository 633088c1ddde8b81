"""Lowering variants of kernels/rkd.py.

The launchers widen every input to float32 first (the angle's Gram matrix is
float64, split into float32 halves), so the kernels see float32 only, and
_pair_sq_kernel also float64 (the angle's normalisers). N = 4096 picks the
GPU launch configuration of a large batch.
"""

from __future__ import annotations

from tests.triton_variants import Variant

N = 4096


def pair_sq_variants(module):
    block_i, block_j, block_d, num_warps = module.pair_config(N, 512)
    constexprs = {"BLOCK_I": block_i, "BLOCK_J": block_j, "BLOCK_D": block_d}
    for dtype, use in (("fp32", "distance"), ("fp64", "angle")):
        types = {
            "g_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "sq_ptr": f"*{dtype}", "near_ptr": "*i8",
            "dsum_ptr": f"*{dtype}", "N": "i32", "D": "i32", "factor": "fp32",
        }
        yield Variant(f"{dtype} ({use})", types, constexprs, num_warps)


def distance_loss_variants(module):
    block_i, block_j, num_warps = module.row_config(N)
    types = {
        "sq_s_ptr": "*fp32", "sq_t_ptr": "*fp32", "loss_ptr": "*fp32", "qd_ptr": "*fp32",
        "inv_mean_ptr": "*fp64", "N": "i32", "inv_n2": "fp32",
    }
    yield Variant("fp32", types, {"BLOCK_I": block_i, "BLOCK_J": block_j}, num_warps)


def distance_coef_variants(module):
    block_i, block_j, num_warps = module.row_config(N)
    types = {
        "sq_s_ptr": "*fp32", "sq_t_ptr": "*fp32", "near_ptr": "*i8", "far_ptr": "*fp32", "close_ptr": "*fp32",
        "csum_ptr": "*fp32", "ncount_ptr": "*i32", "inv_mean_ptr": "*fp64", "shift_ptr": "*fp64",
        "N": "i32", "inv_n2": "fp32",
    }
    yield Variant("fp32", types, {"BLOCK_I": block_i, "BLOCK_J": block_j}, num_warps)


def near_grad_variants(module):
    for d in (512, 48):
        block_j, block_d, num_warps = module.near_grad_config(N, d)
        types = {
            "close_ptr": "*fp32", "ncount_ptr": "*i32", "x_ptr": "*fp32", "grad_ptr": "*fp32",
            "N": "i32", "D": "i32",
        }
        yield Variant(f"fp32 D={d}", types, {"BLOCK_J": block_j, "BLOCK_D": block_d}, num_warps)


def angle_variants(module):
    """With the gradient (dG tiles, R and S rows) and loss only."""
    block_j, block_k, num_warps = module.angle_config(N)
    types = {
        "gs_hi_ptr": "*fp32", "gs_lo_ptr": "*fp32", "us_ptr": "*fp32", "gt_hi_ptr": "*fp32",
        "gt_lo_ptr": "*fp32", "ut_ptr": "*fp32", "d_part_ptr": "*fp32", "row_ptr": "*fp32",
        "ang_ptr": "*fp32", "loss_ptr": "*fp64", "N": "i32", "anchors": "i32",
    }
    blocks = {"BLOCK_J": block_j, "BLOCK_K": block_k}
    yield Variant("fp32 grad", types, {"GRAD": True, **blocks}, num_warps)
    loss_only = {"GRAD": False, "d_part_ptr": None, "row_ptr": None, "ang_ptr": None, **blocks}
    yield Variant("fp32 loss only", types, loss_only, num_warps)


VARIANTS = {
    "_pair_sq_kernel": pair_sq_variants,
    "_distance_loss_kernel": distance_loss_variants,
    "_distance_coef_kernel": distance_coef_variants,
    "_near_grad_kernel": near_grad_variants,
    "_rkd_angle_kernel": angle_variants,
}
