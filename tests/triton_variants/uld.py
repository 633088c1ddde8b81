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


VARIANTS = {"_uld_fwd_kernel": forward_variants}
