"""Lowering variants of kernels/topk.py."""

from __future__ import annotations

from fastkd._enums import DivergenceKind
from tests.triton_variants import DTYPES, Variant

# A Llama-3-size vocabulary and a typical stored top-k.
VOCAB, TOP_K = 128256, 64


def topk_variants(module):
    """Every kind × dtype × (row mask, student gradient) combination, each of
    which changes the code (the masked-row branch; the support and stream
    gradient passes), at the launch configuration of V = 128256, k = 64; per
    dtype the widest support tile (float64 registers) on the kind with the
    most support work; and with hard labels, per dtype, the gradient path at
    T = 1 (the CE shares the student's normaliser) and at T ≠ 1 (its own
    sums in stream 1 and support 2, one more exp in stream 2), also at the
    widest support tile, and the CE without the gradient."""
    block, num_warps = module.launch_config(VOCAB)
    names = {int(kind): kind.name.lower() for kind in module.KINDS}
    for dtype in DTYPES:
        types = {
            "s_ptr": f"*{dtype}", "idx_ptr": "*i64", "sorted_ptr": "*i64", "val_ptr": "*fp32",
            "mask_ptr": "*i1", "labels_ptr": "*i64", "loss_ptr": "*fp32", "ce_ptr": "*fp32",
            "g_ptr": f"*{dtype}", "stride_s": "i32", "V": "i32", "K": "i32", "inv_temperature": "fp32",
            "grad_factor": "fp32", "hard_grad_scale": "fp32", "coef": "fp32",
        }
        no_labels = {"HAS_LABELS": False, "CE_SHARES_NORMALISER": False, "labels_ptr": None, "ce_ptr": None}
        for kind, name in names.items():
            for has_mask in (True, False):
                for grad in (True, False):
                    constexprs = {
                        "KIND": kind, "HAS_MASK": has_mask, "STUDENT_GRAD": grad, "BLOCK": block,
                        "KBLOCK": module.support_block(TOP_K), **no_labels,
                    }
                    if not has_mask:
                        constexprs["mask_ptr"] = None
                    if not grad:
                        constexprs["g_ptr"] = None
                    mask_label = "mask" if has_mask else "no-mask"
                    grad_label = "grad" if grad else "no-grad"
                    yield Variant(f"{dtype} {name} {mask_label} {grad_label}", types, constexprs, num_warps)
        constexprs = {
            "KIND": int(DivergenceKind.SKEW_REVERSE_KL), "HAS_MASK": True, "STUDENT_GRAD": True,
            "BLOCK": block, "KBLOCK": module.MAX_KBLOCK, **no_labels,
        }
        label = f"{dtype} skew_reverse_kl mask grad KBLOCK={module.MAX_KBLOCK}"
        yield Variant(label, types, constexprs, num_warps)
        for shares, at in ((True, "T=1"), (False, "T!=1")):
            labelled = {"HAS_LABELS": True, "CE_SHARES_NORMALISER": shares}
            for kblock in (module.support_block(TOP_K), module.MAX_KBLOCK):
                constexprs = {
                    "KIND": int(DivergenceKind.SKEW_REVERSE_KL), "HAS_MASK": True, "STUDENT_GRAD": True,
                    "BLOCK": block, "KBLOCK": kblock, **labelled,
                }
                label = f"{dtype} skew_reverse_kl mask grad labels {at} KBLOCK={kblock}"
                yield Variant(label, types, constexprs, num_warps)
            constexprs = {
                "KIND": int(DivergenceKind.KL), "HAS_MASK": False, "STUDENT_GRAD": True, "BLOCK": block,
                "KBLOCK": module.support_block(TOP_K), "mask_ptr": None, **labelled,
            }
            yield Variant(f"{dtype} kl no-mask grad labels {at}", types, constexprs, num_warps)
        constexprs = {
            "KIND": int(DivergenceKind.TVD), "HAS_MASK": True, "STUDENT_GRAD": False, "BLOCK": block,
            "KBLOCK": module.support_block(TOP_K), "g_ptr": None, "HAS_LABELS": True,
            "CE_SHARES_NORMALISER": False,
        }
        yield Variant(f"{dtype} tvd mask labels T!=1 no-grad", types, constexprs, num_warps)


VARIANTS = {"_topk_divergence_fwd_kernel": topk_variants}
