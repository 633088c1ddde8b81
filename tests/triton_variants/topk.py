"""Lowering variants of kernels/topk.py."""

from __future__ import annotations

from tests.triton_variants import DTYPES, Variant

# A Llama-3-size vocabulary and a typical stored top-k.
VOCAB, TOP_K = 128256, 64


def topk_variants(module):
    """Every kind × dtype × (row mask, student gradient) combination, each of
    which changes the code (the masked-row branch; the support and stream
    gradient passes), at the launch configuration of V = 128256, k = 64; and
    per dtype the widest support tile (float64 registers) on the kind with the
    most support work."""
    block, num_warps = module.launch_config(VOCAB)
    names = {
        module.KL: "kl", module.JSD: "jsd", module.SKEW_KL: "skew_kl",
        module.SKEW_REVERSE_KL: "skew_reverse_kl", module.TVD: "tvd",
    }
    assert set(names) == set(module.KINDS)
    for dtype in DTYPES:
        types = {
            "s_ptr": f"*{dtype}", "idx_ptr": "*i64", "sorted_ptr": "*i64", "val_ptr": "*fp32",
            "mask_ptr": "*i1", "loss_ptr": "*fp32", "g_ptr": f"*{dtype}", "stride_s": "i32", "V": "i32",
            "K": "i32", "inv_temperature": "fp32", "grad_factor": "fp32", "coef": "fp32",
        }
        for kind, name in names.items():
            for has_mask in (True, False):
                for grad in (True, False):
                    constexprs = {
                        "KIND": kind, "HAS_MASK": has_mask, "STUDENT_GRAD": grad, "BLOCK": block,
                        "KBLOCK": module.support_block(TOP_K),
                    }
                    if not has_mask:
                        constexprs["mask_ptr"] = None
                    if not grad:
                        constexprs["g_ptr"] = None
                    mask_label = "mask" if has_mask else "no-mask"
                    grad_label = "grad" if grad else "no-grad"
                    yield Variant(f"{dtype} {name} {mask_label} {grad_label}", types, constexprs, num_warps)
        constexprs = {
            "KIND": module.SKEW_REVERSE_KL, "HAS_MASK": True, "STUDENT_GRAD": True, "BLOCK": block,
            "KBLOCK": module.MAX_KBLOCK,
        }
        label = f"{dtype} skew_reverse_kl mask grad KBLOCK={module.MAX_KBLOCK}"
        yield Variant(label, types, constexprs, num_warps)


VARIANTS = {"_topk_divergence_fwd_kernel": topk_variants}
