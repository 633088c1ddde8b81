"""Lowering variants of kernels/uld.py."""

from __future__ import annotations

from tests.triton_variants import DTYPES, Variant

SCALARS = {
    "Vs": "i32", "Vt": "i32", "s_stride": "i32", "t_stride": "i32",
    "inv_ts": "fp32", "inv_tt": "fp32", "scale_s": "fp32", "scale_t": "fp32",
}


def forward_variants(module):
    # the widest row (most entries per thread at the most warps) and a short one;
    # both gradients with a mask, the student's alone without one; logits on
    # both sides, and the widest row with log-probabilities on one or both
    for vocab in (module.MAX_VOCAB, 1024):
        block, warps = module.launch_config(vocab)
        for dtype in DTYPES if vocab == module.MAX_VOCAB else ("fp32",):
            for has_mask, teacher_grad in ((True, True), (False, False)):
                logprob_cases = ((False, False), (True, False), (True, True)) if (
                    vocab == module.MAX_VOCAB and dtype == "fp32" and has_mask) else ((False, False),)
                for student_logprob, teacher_logprob in logprob_cases:
                    types = {"s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "mask_ptr": "*i8",
                             "loss_ptr": "*fp32", "gs_ptr": f"*{dtype}", "gt_ptr": f"*{dtype}", **SCALARS}
                    flags = {"HAS_MASK": has_mask, "STUDENT_GRAD": True, "TEACHER_GRAD": teacher_grad,
                             "STUDENT_LOGPROB": student_logprob, "TEACHER_LOGPROB": teacher_logprob,
                             "BLOCK": block}
                    label = f"{dtype} V={vocab} mask={has_mask} teacher_grad={teacher_grad}"
                    if student_logprob or teacher_logprob:
                        label += f" logprob=({student_logprob}, {teacher_logprob})"
                    yield Variant(label, types, flags, warps)


def keys_variants(module):
    # logits in each dtype, and float32 log-probabilities
    for dtype in DTYPES:
        for is_logprob in (False, True) if dtype == "fp32" else (False,):
            types = {"x_ptr": f"*{dtype}", "keys_ptr": "*i64", "unusable_ptr": "*i32", "V": "i32", "W": "i32",
                     "x_stride": "i32", "inv_temperature": "fp32"}
            flags = {"IS_LOGPROB": is_logprob, "BLOCK": module.SORTED_BLOCK}
            yield Variant(f"{dtype} logprob={is_logprob}", types, flags, module.SORTED_WARPS)


def sorted_variants(module):
    # both gradients with a mask, the student's alone without one, in each
    # dtype; log-probabilities on one or both sides in float32
    for dtype in DTYPES:
        for has_mask, teacher_grad in ((True, True), (False, False)):
            logprob_cases = ((False, False), (True, False), (True, True)) if (
                dtype == "fp32" and has_mask) else ((False, False),)
            for student_logprob, teacher_logprob in logprob_cases:
                types = {"ks_ptr": "*i64", "kt_ptr": "*i64",
                         "unusable_s_ptr": "*i32", "unusable_t_ptr": "*i32",
                         "mask_ptr": "*i8", "loss_ptr": "*fp32", "gs_ptr": f"*{dtype}", "gt_ptr": f"*{dtype}",
                         "prefix_s_ptr": "*i32", "start_s_ptr": "*i32", "mean_s_ptr": "*fp32",
                         "prefix_t_ptr": "*i32", "start_t_ptr": "*i32", "mean_t_ptr": "*fp32",
                         "Vs": "i32", "Vt": "i32", "W": "i32", "scale_s": "fp32", "scale_t": "fp32"}
                flags = {"HAS_MASK": has_mask, "STUDENT_GRAD": True, "TEACHER_GRAD": teacher_grad,
                         "STUDENT_LOGPROB": student_logprob, "TEACHER_LOGPROB": teacher_logprob,
                         "BLOCK": module.SORTED_BLOCK}
                label = f"{dtype} mask={has_mask} teacher_grad={teacher_grad}"
                if student_logprob or teacher_logprob:
                    label += f" logprob=({student_logprob}, {teacher_logprob})"
                yield Variant(label, types, flags, module.SORTED_WARPS)


VARIANTS = {"_uld_fwd_kernel": forward_variants, "_uld_keys_kernel": keys_variants,
            "_uld_sorted_kernel": sorted_variants}
