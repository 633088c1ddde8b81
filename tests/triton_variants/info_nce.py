"""Lowering variants of kernels/info_nce.py."""

from __future__ import annotations

from tests.triton_variants import DTYPES, Variant

# (N, M, D) as launch_config sizes them on a GPU: a large batch of CLIP-sized
# embeddings (64-row blocks, BLOCK_DV 128), a small batch of narrow ones
# (N = M = 1024: 16-row blocks; D = 40: BLOCK_DV = 64) and N = 4096 queries
# against 2048 keys (32-row query blocks, 16-key blocks).
SHAPES = ((32768, 32768, 512), (1024, 1024, 40), (4096, 2048, 128))


def _types(dtype: str, pointers: dict) -> dict:
    types = {
        "q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "labels_ptr": "*i64",
        "N": "i32", "M": "i32", "D": "i32",
        "stride_qn": "i32", "stride_qd": "i32", "stride_kn": "i32", "stride_kd": "i32",
        "inv_temperature": "fp32",
    }
    types.update(pointers)
    return types


def _variants(module, pointers, kernel: str):
    """``kernel``: "fwd" (launch_config's blocks), "dq" or "dk" (backward_blocks', with BLOCK_DV)."""
    for dtype in DTYPES:
        for rows, keys, dim in SHAPES:
            cfg = module.launch_config(rows, keys, dim)
            blocks = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}
            if kernel != "fwd":
                blocks = module.backward_blocks(cfg)[0 if kernel == "dq" else 1]
                blocks["BLOCK_DV"] = cfg["BLOCK_DV"]
            constexprs = {
                **blocks, "BLOCK_D": cfg["BLOCK_D"],
                # float32 ieee products, tf32 for bf16 / fp16 (exact on their values)
                "PRECISION": "ieee" if dtype == "fp32" else "tf32",
            }
            label = f"{dtype} N={rows} M={keys} D={dim}"
            yield Variant(label, _types(dtype, pointers(dtype)), constexprs, cfg["num_warps"])


def forward_variants(module):
    return _variants(module, lambda dtype: {"loss_ptr": "*fp32", "lse_ptr": "*fp32"}, "fwd")


def dq_variants(module):
    return _variants(
        module, lambda dtype: {"lse_ptr": "*fp32", "grad_ptr": "*fp32", "dq_ptr": f"*{dtype}"}, "dq"
    )


def dk_variants(module):
    return _variants(
        module, lambda dtype: {"lse_ptr": "*fp32", "grad_ptr": "*fp32", "dk_ptr": f"*{dtype}"}, "dk"
    )


VARIANTS = {
    "_info_nce_fwd_kernel": forward_variants,
    "_info_nce_bwd_dq_kernel": dq_variants,
    "_info_nce_bwd_dk_kernel": dk_variants,
}
