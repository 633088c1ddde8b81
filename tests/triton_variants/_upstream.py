"""Lowering variants of kernels/_upstream.py."""

from __future__ import annotations

from tests.triton_variants import DTYPES, Variant


def scale_variants(module):
    for dtype in DTYPES:
        for factor in ("fp32", "bf16"):
            types = {"grad_ptr": f"*{dtype}", "factor_ptr": f"*{factor}", "n": "i64"}
            yield Variant(f"{dtype} factor {factor}", types, {"BLOCK": module.BLOCK}, 4)


VARIANTS = {"_scale_unless_one_kernel": scale_variants}
