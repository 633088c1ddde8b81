"""Lowering variants of kernels/divergence.py."""

from __future__ import annotations

from tests.triton_variants import DTYPES, Variant


def divergence_variants(module):
    """Every kind with the row mask and both gradients (the gradient pass), and
    KL with the student gradient only (written in the loss pass), per dtype."""
    block, num_warps = module.launch_config(128256)
    names = {
        module.KL: "kl", module.REVERSE_KL: "reverse_kl", module.JSD: "jsd",
        module.SKEW_KL: "skew_kl", module.SKEW_REVERSE_KL: "skew_reverse_kl", module.TVD: "tvd",
    }
    for dtype in DTYPES:
        types = {
            "s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "mask_ptr": "*i1", "loss_ptr": "*fp32",
            "gs_ptr": f"*{dtype}", "gt_ptr": f"*{dtype}", "stride_s": "i32", "stride_t": "i32", "V": "i32",
            "inv_temperature": "fp32", "grad_factor": "fp32", "c": "fp32", "one_minus_c": "fp32",
            "log_c": "fp32", "log_one_minus_c": "fp32",
        }
        for kind, name in names.items():
            constexprs = {
                "KIND": kind, "HAS_MASK": True, "STUDENT_GRAD": True, "TEACHER_GRAD": True, "BLOCK": block,
            }
            yield Variant(f"{dtype} {name} mask+both-grads", types, constexprs, num_warps)
        constexprs = {
            "KIND": module.KL, "HAS_MASK": False, "STUDENT_GRAD": True, "TEACHER_GRAD": False,
            "BLOCK": block, "mask_ptr": None, "gt_ptr": None,
        }
        yield Variant(f"{dtype} kl student-grad", types, constexprs, num_warps)


VARIANTS = {"_divergence_fwd_kernel": divergence_variants}
