"""Lowering variants of kernels/crd.py (float32 only: the kernels take float32 banks)."""

from __future__ import annotations

from tests.triton_variants import Variant

# (batch, K+1, feat_dim): RepDistiller's defaults (feat_dim 128, K = 16384)
# and the widest feat_dim the kernel takes (one row per tile, 8 warps).
SHAPES = ((64, 16385, 128), (64, 16385, 8192))

_COMMON = {
    "v_ptr": "*fp32", "bank_ptr": "*fp32", "idx_ptr": "*i64",
    "B": "i32", "D": "i32", "cols_total": "i32", "n_data": "i32",
    "stride_vb": "i32", "stride_vd": "i32", "stride_bank_n": "i32", "stride_bank_d": "i32",
    "stride_ib": "i32", "stride_ik": "i32", "inv_temperature": "fp32",
}


def _configs(module):
    for batch, cols, dim in SHAPES:
        cfg = module.launch_config(batch, cols, dim)
        blocks = -(-cols // cfg["BLOCK_K"])
        cols_per_split = -(-blocks // cfg["SPLITS"]) * cfg["BLOCK_K"]
        constexprs = {"BLOCK_K": cfg["BLOCK_K"], "BLOCK_D": cfg["BLOCK_D"], "COLS_PER_SPLIT": cols_per_split}
        yield f"D={dim}", constexprs, cfg["num_warps"]


def exp_sum_variants(module):
    for label, constexprs, num_warps in _configs(module):
        yield Variant(f"fp32 {label}", {**_COMMON, "z_ptr": "*fp32", "partial_ptr": "*fp64"}, constexprs,
                      num_warps)


def nce_variants(module):
    types = {**_COMMON, "z_ptr": "*fp32", "loss_ptr": "*fp64", "grad_ptr": "*fp32", "c_eps": "fp32",
             "inv_c_eps": "fp32"}
    for label, constexprs, num_warps in _configs(module):
        yield Variant(f"fp32 {label} grad", types, {**constexprs, "STUDENT_GRAD": True}, num_warps)
        yield Variant(
            f"fp32 {label} loss only", types, {**constexprs, "STUDENT_GRAD": False, "grad_ptr": None},
            num_warps,
        )


VARIANTS = {"_crd_exp_sum_kernel": exp_sum_variants, "_crd_nce_kernel": nce_variants}
