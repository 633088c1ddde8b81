"""Lowering variants of kernels/dkd.py."""

from __future__ import annotations

from tests.triton_variants import DTYPES, Variant


def dkd_variants(module):
    """Per dtype: with the student gradient (pass 2 writes it) and forward only,
    at a classification head (one chunk) and at a row wider than one chunk."""
    for classes in (1000, 32000):
        block, num_warps = module.launch_config(classes)
        for dtype in DTYPES:
            types = {
                "s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "y_ptr": "*i64", "loss_ptr": "*fp32",
                "g_ptr": f"*{dtype}", "stride_s": "i32", "stride_t": "i32", "C": "i32", "alpha": "fp32",
                "beta": "fp32", "inv_temperature": "fp32", "grad_factor": "fp32",
            }
            yield Variant(
                f"{dtype} C={classes} student-grad", types, {"STUDENT_GRAD": True, "BLOCK": block}, num_warps
            )
            yield Variant(
                f"{dtype} C={classes} forward-only", types,
                {"STUDENT_GRAD": False, "BLOCK": block, "g_ptr": None}, num_warps,
            )


VARIANTS = {"_dkd_fwd_kernel": dkd_variants}
