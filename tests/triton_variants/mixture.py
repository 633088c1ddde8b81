"""Lowering variants of kernels/mixture.py."""

from __future__ import annotations

from tests.triton_variants import DTYPES, Variant

KINDS = ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")


def _types(dtype: str) -> dict:
    loss = "*fp64" if dtype == "fp64" else "*fp32"
    return {
        "s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "log_w_ptr": "*fp64", "stats_ptr": "*fp64",
        "mask_ptr": "*i1", "loss_ptr": loss, "g_ptr": f"*{dtype}",
        "stride_s": "i32", "stride_tk": "i32", "stride_tn": "i32", "K": "i32", "V": "i32",
        "inv_temperature": "fp64", "grad_factor": "fp64", "c": "fp64", "one_minus_c": "fp64",
        "log_c": "fp64", "log_one_minus_c": "fp64",
    }


def _variant(module, dtype, kind, has_mask, grad, teachers=3):
    teacher_block, block, num_warps = module.launch_config(128256, teachers)
    constexprs = {
        "KIND": kind, "HAS_MASK": has_mask, "STUDENT_GRAD": grad, "SINGLE_GROUP": teachers <= teacher_block,
        "TEACHER_BLOCK": teacher_block, "BLOCK": block,
    }
    if not has_mask:
        constexprs["mask_ptr"] = None
    if not grad:
        constexprs["g_ptr"] = None
    flags = f"{'mask' if has_mask else 'no-mask'} {'grad' if grad else 'no-grad'}"
    label = f"{dtype} {KINDS[kind]} {flags} K={teachers}"
    return Variant(label, _types(dtype), constexprs, num_warps)


def mixture_variants(module):
    """Every kind × dtype, each with (mask, gradient) both on and both off,
    K = 3 teachers in one tile, vocabulary-sized rows. The kind only changes
    the per-element math and, with the gradient, which passes run (KL fuses
    it into the loss pass, REVERSE_KL reads the mode); the mask and the
    dtype only change loads and stores. So the two mixed (mask, gradient)
    pairs are lowered for every kind in float32, float64 inputs for KL and
    JSD, and K = 11 (groups of teachers, an online log-sum-exp across them)
    for KL, REVERSE_KL and JSD. Each variant takes seconds (float64 libdevice
    math), hence not the full product."""
    for dtype in DTYPES:
        for kind in range(len(KINDS)):
            for on in (True, False):
                yield _variant(module, dtype, kind, on, on)
    for kind in range(len(KINDS)):
        yield _variant(module, "fp32", kind, True, False)
        yield _variant(module, "fp32", kind, False, True)
    for kind in (KINDS.index("kl"), KINDS.index("jsd")):
        yield _variant(module, "fp64", kind, True, True)
    for kind in (KINDS.index("kl"), KINDS.index("reverse_kl"), KINDS.index("jsd")):
        yield _variant(module, "bf16", kind, True, True, teachers=11)


VARIANTS = {"_mixture_fwd_kernel": mixture_variants}
