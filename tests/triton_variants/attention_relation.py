"""Lowering variants of kernels/attention_relation.py."""

from __future__ import annotations

from tests.triton_variants import DTYPES, Variant

# MiniLM's relation heads: 384 / 12 = 32 student channels against 768 / 12 = 64 teacher ones.
BLOCK_DS, BLOCK_DT = 32, 64
SCALARS = {
    "T": "i32", "A": "i32", "width_s": "i32", "width_t": "i32",
    "s_stride_b": "i32", "s_stride_t": "i32", "s_stride_d": "i32",
    "t_stride_b": "i32", "t_stride_t": "i32", "t_stride_d": "i32",
    "scale_s": "fp32", "scale_t": "fp32",
}


def _constexprs(block: int, dtype: str, **flags) -> dict:
    return {
        "BLOCK_M": block, "BLOCK_N": block, "BLOCK_DS": BLOCK_DS, "BLOCK_DT": BLOCK_DT,
        "PRECISION": "ieee" if dtype == "fp32" else "tf32", **flags,
    }


def forward_variants(module):
    for dtype in DTYPES:
        for has_mask in (False, True):
            for causal in (False, True):
                types = {"s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "mask_ptr": "*i8", "lse_s_ptr": "*fp32",
                         "lse_t_ptr": "*fp32", "kl_ptr": "*fp32", **SCALARS}
                yield Variant(f"{dtype} mask={has_mask} causal={causal}", types,
                              _constexprs(module.BLOCK_M, dtype, HAS_MASK=has_mask, CAUSAL=causal),
                              module.FORWARD_WARPS)


def backward_variants(module):
    # the student's gradient with a mask, and both gradients without one
    for dtype in DTYPES:
        for causal in (False, True):
            for has_mask, teacher_grad in ((True, False), (False, True)):
                types = {"s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "mask_ptr": "*i8", "lse_s_ptr": "*fp32",
                         "lse_t_ptr": "*fp32", "kl_ptr": "*fp32", "grad_ptr": "*fp32", "ds_ptr": "*fp32",
                         "dt_ptr": "*fp32", "head_share": "fp32", **SCALARS}
                flags = {
                    "HAS_MASK": has_mask, "CAUSAL": causal,
                    "STUDENT_GRAD": True, "TEACHER_GRAD": teacher_grad,
                }
                yield Variant(f"{dtype} mask={has_mask} causal={causal} teacher_grad={teacher_grad}", types,
                              _constexprs(module.BACKWARD_BLOCK, dtype, **flags), module.BACKWARD_WARPS)


VARIANTS = {
    "_attention_relation_fwd_kernel": forward_variants,
    "_attention_relation_bwd_rows_kernel": backward_variants,
    "_attention_relation_bwd_cols_kernel": backward_variants,
}
