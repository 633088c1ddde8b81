"""Lowering variants of kernels/divergence.py."""

from __future__ import annotations

from fastkd._enums import DivergenceKind
from tests.triton_variants import DTYPES, Variant


def divergence_variants(module):
    """Per dtype: every kind with the row mask and both gradients (the gradient
    pass), and KL with the student gradient only (written in the loss pass);
    with hard labels, each of those two paths at T = 1 (the CE shares the
    student's normaliser) and at T ≠ 1 (its own Σ exp in pass 1), and the CE
    without gradients."""
    block, num_warps = module.launch_config(128256)
    names = {int(kind): kind.name.lower() for kind in DivergenceKind}
    for dtype in DTYPES:
        types = {
            "s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "mask_ptr": "*i1", "labels_ptr": "*i64",
            "loss_ptr": "*fp32", "ce_ptr": "*fp32", "gs_ptr": f"*{dtype}", "gt_ptr": f"*{dtype}",
            "stride_s": "i32", "stride_t": "i32", "V": "i32", "inv_temperature": "fp32",
            # (B, T, V) logits read in place: B·T·V of an LLM batch passes 2^31, so the block strides are i64
            "rows_per_block": "i32", "block_stride_s": "i64", "block_stride_t": "i64",
            "grad_factor": "fp32", "hard_grad_scale": "fp32", "c": "fp32", "one_minus_c": "fp32",
            "log_c": "fp32", "log_one_minus_c": "fp32",
        }
        no_labels = {"HAS_LABELS": False, "CE_SHARES_NORMALISER": False, "labels_ptr": None, "ce_ptr": None}
        for kind, name in names.items():
            constexprs = {
                "KIND": kind, "HAS_MASK": True, "STUDENT_GRAD": True, "TEACHER_GRAD": True, "BLOCK": block,
                **no_labels,
            }
            yield Variant(f"{dtype} {name} mask+both-grads", types, constexprs, num_warps)
        kl_student = {
            "KIND": int(DivergenceKind.KL), "HAS_MASK": False, "STUDENT_GRAD": True, "TEACHER_GRAD": False,
            "BLOCK": block, "mask_ptr": None, "gt_ptr": None,
        }
        yield Variant(f"{dtype} kl student-grad", types, {**kl_student, **no_labels}, num_warps)
        for shares, at in ((True, "T=1"), (False, "T!=1")):
            labelled = {"HAS_LABELS": True, "CE_SHARES_NORMALISER": shares}
            constexprs = {**kl_student, **labelled}
            yield Variant(f"{dtype} kl student-grad labels {at}", types, constexprs, num_warps)
            constexprs = {
                "KIND": int(DivergenceKind.JSD), "HAS_MASK": True, "STUDENT_GRAD": True, "TEACHER_GRAD": True,
                "BLOCK": block, **labelled,
            }
            yield Variant(f"{dtype} jsd mask+both-grads labels {at}", types, constexprs, num_warps)
        constexprs = {
            "KIND": int(DivergenceKind.REVERSE_KL), "HAS_MASK": True, "STUDENT_GRAD": False,
            "TEACHER_GRAD": False,
            "BLOCK": block, "gs_ptr": None, "gt_ptr": None, "HAS_LABELS": True, "CE_SHARES_NORMALISER": False,
        }
        yield Variant(f"{dtype} reverse_kl labels no-grads", types, constexprs, num_warps)


VARIANTS = {"_divergence_fwd_kernel": divergence_variants}
