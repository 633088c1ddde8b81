"""Lowering variants of kernels/mmd.py."""

from __future__ import annotations

from fastkd._enums import MMDKernel
from tests.triton_variants import DTYPES, Variant

# (WITHIN, UNBIASED): the cross term, and a within-sample term with and
# without its diagonal (the only combinations the launchers use).
TERMS = {"cross": (False, False), "within": (True, False), "within-unbiased": (True, True)}


def _kernels(module):
    return {int(kernel): kernel.name.lower() for kernel in MMDKernel}


def _variants(module, extra_types: dict, backward: bool):
    for dtype in DTYPES:
        types = {
            "a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "a_norm_ptr": "*fp32", "b_norm_ptr": "*fp32",
            "exps_ptr": "*fp32", "n_a": "i32", "n_b": "i32", "D": "i32", "stride_a": "i32", "stride_b": "i32",
            "n_bw": "i32", "inv_c": "fp32", "degree": "i32", **extra_types,
        }
        for kernel, name in _kernels(module).items():
            # the launch configuration the launchers use for this kernel on a GPU
            block, block_d, block_e, num_warps = module.launch_config(kernel, 768, backward)
            for term, (within, unbiased) in TERMS.items():
                constexprs = {
                    "KERNEL": kernel, "WITHIN": within, "UNBIASED": unbiased,
                    "BLOCK": block, "BLOCK_D": block_d, "BLOCK_E": block_e,
                }
                if kernel == MMDKernel.POLYNOMIAL:
                    constexprs.update({"a_norm_ptr": None, "b_norm_ptr": None})
                yield Variant(f"{dtype} {name} {term}", types, constexprs, num_warps)


def forward_variants(module):
    """Every kernel × term × dtype: fp64 partial sums."""
    yield from _variants(module, {"partial_ptr": "*fp64"}, backward=False)


def backward_variants(module):
    """Every kernel × term × dtype: the fp32 gradient workspace."""
    yield from _variants(module, {"ws_ptr": "*fp32", "weight": "fp32"}, backward=True)


VARIANTS = {"_mmd_fwd_kernel": forward_variants, "_mmd_bwd_kernel": backward_variants}
