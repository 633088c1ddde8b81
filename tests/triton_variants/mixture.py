"""Lowering variants of kernels/mixture.py."""

from __future__ import annotations

from fastkd._enums import DivergenceKind
from tests.triton_variants import DTYPES, Variant

KINDS = tuple(kind.name.lower() for kind in DivergenceKind)


def _types(dtype: str) -> dict:
    loss = "*fp64" if dtype == "fp64" else "*fp32"
    return {
        "s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "log_w_ptr": "*fp64", "stats_ptr": "*fp64",
        "mask_ptr": "*i1", "labels_ptr": "*i64", "loss_ptr": loss, "ce_ptr": loss, "g_ptr": f"*{dtype}",
        "stride_s": "i32", "stride_tk": "i32", "stride_tn": "i32", "K": "i32", "V": "i32",
        "inv_temperature": "fp64", "grad_factor": "fp64", "hard_grad_scale": "fp64", "c": "fp64",
        "one_minus_c": "fp64", "log_c": "fp64", "log_one_minus_c": "fp64",
    }


def _variant(module, dtype, kind, has_mask, grad, teachers=3, labels=None):
    """``labels``: None (no CE), "T=1" (the CE shares the student's normaliser) or "T!=1"."""
    teacher_block, block, num_warps = module.launch_config(128256, teachers)
    constexprs = {
        "KIND": kind, "HAS_MASK": has_mask, "STUDENT_GRAD": grad, "SINGLE_GROUP": teachers <= teacher_block,
        "TEACHER_BLOCK": teacher_block, "BLOCK": block,
        "HAS_LABELS": labels is not None, "CE_SHARES_NORMALISER": labels == "T=1",
    }
    if not has_mask:
        constexprs["mask_ptr"] = None
    if not grad:
        constexprs["g_ptr"] = None
    if labels is None:
        constexprs["labels_ptr"] = None
        constexprs["ce_ptr"] = None
    flags = f"{'mask' if has_mask else 'no-mask'} {'grad' if grad else 'no-grad'}"
    if labels is not None:
        flags += f" labels {labels}"
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
    for KL, REVERSE_KL and JSD. With hard labels (the CE fused in): KL (its
    gradient written in the loss pass) and JSD (the gradient pass) with the
    gradient, each at T = 1 (the CE shares the student's normaliser) and at
    T ≠ 1 (its own Σ exp in pass 1 and an exp in the gradient store), in
    every dtype; the CE without the gradient; float64 and K = 11 once each.
    Each variant takes seconds (float64 libdevice math), hence not the full
    product."""
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
    for dtype in DTYPES:
        for at in ("T=1", "T!=1"):
            yield _variant(module, dtype, KINDS.index("kl"), False, True, labels=at)
            yield _variant(module, dtype, KINDS.index("jsd"), True, True, labels=at)
    yield _variant(module, "fp32", KINDS.index("reverse_kl"), True, False, labels="T!=1")
    yield _variant(module, "fp64", KINDS.index("skew_kl"), True, True, labels="T!=1")
    yield _variant(module, "bf16", KINDS.index("reverse_kl"), True, True, teachers=11, labels="T=1")


VARIANTS = {"_mixture_fwd_kernel": mixture_variants}
