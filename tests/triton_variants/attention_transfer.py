"""Lowering variants of kernels/attention_transfer.py."""

from __future__ import annotations

import torch

from tests.triton_variants import DTYPES, Variant

# (C, H, W) of typical attention-transfer maps: a ResNet stage at 32×32 with
# few channels, and a deep stage at 8×8 with many.
MAP_SHAPES = ((64, 32, 32), (512, 8, 8))
POWERS = (1, 2, 3)


def _maps(module, shape, channels_last):
    x = torch.empty((1, *shape), device="meta")
    return module._Maps(x.contiguous(memory_format=torch.channels_last) if channels_last else x)


def _map_variants(module, kernel_types):
    """Per dtype, layout (the unit stride is specialised: the loads coalesce
    along positions for NCHW, along channels for channels_last), map shape and
    power (P is a constexpr)."""
    for dtype in DTYPES:
        for channels_last in (False, True):
            layout = "channels_last" if channels_last else "nchw"
            for shape in MAP_SHAPES:
                maps = _maps(module, shape, channels_last)
                block_c, block_k, num_warps = maps.tile()
                types = kernel_types(dtype)
                # the launcher passes stride 1 as 1: triton specialises it to a constexpr
                unit = "stride_c" if channels_last else "stride_k"
                strided = "stride_k" if channels_last else "stride_c"
                types[strided] = "i32"
                for p in POWERS:
                    constexprs = {"P": p, "BLOCK_C": block_c, "BLOCK_K": block_k, unit: 1}
                    yield Variant(f"{dtype} {layout} {shape} p={p}", types, constexprs, num_warps)


def attention_map_variants(module):
    return _map_variants(
        module,
        lambda dtype: {
            "f_ptr": f"*{dtype}", "v_ptr": "*fp32", "C": "i32", "HW": "i32", "stride_n": "i32",
            "inv_c": "fp32",
        },
    )


def attention_map_grad_variants(module):
    return _map_variants(
        module,
        lambda dtype: {
            "f_ptr": f"*{dtype}", "g_ptr": "*fp32", "out_ptr": f"*{dtype}", "C": "i32", "HW": "i32",
            "stride_n": "i32", "scale": "fp32",
        },
    )


def _row_variants(module, types):
    """The per-sample kernels read only float32 scratch: one variant per chunk width."""
    for positions in (64, 1024, 12544):
        block, num_warps = module._row_config(positions)
        yield Variant(f"HW={positions}", types, {"BLOCK": block}, num_warps)


def at_loss_variants(module):
    types = {
        "vs_ptr": "*fp32", "vt_ptr": "*fp32", "s_norm_ptr": "*fp32", "t_norm_ptr": "*fp32",
        "loss_ptr": "*fp32", "HW": "i32", "eps": "fp32",
    }
    return _row_variants(module, types)


def at_grad_coef_variants(module):
    types = {
        "vs_ptr": "*fp32", "vt_ptr": "*fp32", "s_norm_ptr": "*fp32", "t_norm_ptr": "*fp32",
        "upstream_ptr": "*fp32", "HW": "i32", "factor": "fp32", "eps": "fp32",
    }
    return _row_variants(module, types)


VARIANTS = {
    "_attention_map_kernel": attention_map_variants,
    "_at_loss_kernel": at_loss_variants,
    "_at_grad_coef_kernel": at_grad_coef_variants,
    "_attention_map_grad_kernel": attention_map_grad_variants,
}
