"""Lowering variants of kernels/hidden_state.py."""

from __future__ import annotations

from tests.triton_variants import DTYPES, Variant

# (student_grad, teacher_grad, has_mask): the training step (student gradient, a
# padding mask or none), both gradients, and forward only
GRADS_AND_MASKS = ((True, False, False), (True, False, True), (True, True, True), (False, False, True))


def hidden_state_variants(module):
    """Per dtype and kind: a BERT-sized row held in registers (D = 768), the widest
    such row (the launcher's largest block) and a row streamed in chunks (D = 16384)."""
    for dim in (768, 4096, 16384):
        block, num_warps = module.launch_config(dim)
        for dtype in DTYPES:
            types = {
                "h_ptr": f"*{dtype}", "g_ptr": f"*{dtype}", "mask_ptr": "*i1", "loss_ptr": "*fp32",
                "gh_ptr": f"*{dtype}", "gg_ptr": f"*{dtype}", "stride_h": "i32", "stride_g": "i32",
                "D": "i32", "grad_scale": "fp32",
            }
            for kind in (0, 1):
                for student_grad, teacher_grad, has_mask in GRADS_AND_MASKS:
                    constexprs = {
                        "KIND": kind, "HAS_MASK": has_mask, "STUDENT_GRAD": student_grad,
                        "TEACHER_GRAD": teacher_grad, "SINGLE_CHUNK": dim <= block, "BLOCK": block,
                    }
                    for name, wanted in (("mask_ptr", has_mask), ("gh_ptr", student_grad),
                                         ("gg_ptr", teacher_grad)):
                        if not wanted:
                            constexprs[name] = None
                    label = (f"{dtype} D={dim} {('mse', 'cosine')[kind]} grads={int(student_grad)}"
                             f"{int(teacher_grad)} mask={int(has_mask)}")
                    yield Variant(label, types, constexprs, num_warps)


VARIANTS = {"_hidden_state_fwd_kernel": hidden_state_variants}
