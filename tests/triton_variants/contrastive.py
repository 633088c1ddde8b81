"""Lowering variants of kernels/contrastive.py."""

from __future__ import annotations

from tests.triton_variants import DTYPES, Variant

# The launch configuration of a CLIP-sized embedding (D = 512: BLOCK_D 64,
# BLOCK_DV 128) and of a narrow one (D = 40: every block 64 wide).
DIMS = (512, 40)


def _types(dtype: str, pointers: dict) -> dict:
    types = {
        "q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "labels_ptr": "*i64",
        "N": "i32", "M": "i32", "D": "i32",
        "stride_qn": "i32", "stride_qd": "i32", "stride_kn": "i32", "stride_kd": "i32",
        "inv_temperature": "fp32",
    }
    types.update(pointers)
    return types


def _variants(module, pointers, uses_dv: bool):
    for dtype in DTYPES:
        for dim in DIMS:
            cfg = module.launch_config(dim)
            constexprs = {
                "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": cfg["BLOCK_D"],
                # float32 ieee products, tf32 for bf16 / fp16 (exact on their values)
                "PRECISION": "ieee" if dtype == "fp32" else "tf32",
            }
            if uses_dv:
                constexprs["BLOCK_DV"] = cfg["BLOCK_DV"]
            yield Variant(f"{dtype} D={dim}", _types(dtype, pointers(dtype)), constexprs, cfg["num_warps"])


def forward_variants(module):
    return _variants(module, lambda dtype: {"loss_ptr": "*fp32", "lse_ptr": "*fp32"}, uses_dv=False)


def dq_variants(module):
    return _variants(
        module, lambda dtype: {"lse_ptr": "*fp32", "grad_ptr": "*fp32", "dq_ptr": f"*{dtype}"}, uses_dv=True
    )


def dk_variants(module):
    return _variants(
        module, lambda dtype: {"lse_ptr": "*fp32", "grad_ptr": "*fp32", "dk_ptr": f"*{dtype}"}, uses_dv=True
    )


VARIANTS = {
    "_info_nce_fwd_kernel": forward_variants,
    "_info_nce_bwd_dq_kernel": dq_variants,
    "_info_nce_bwd_dk_kernel": dk_variants,
}
