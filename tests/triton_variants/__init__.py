"""What ``tests/_lower_triton.py`` lowers: one module per ``kernels/<stem>.py``.

``tests/triton_variants/<stem>.py`` defines ``VARIANTS = {kernel name: f}``
where ``f(kernel_module)`` yields a :class:`Variant` for every dtype and every
specialisation that changes the kernel's code, with the launch configuration
its launcher uses. A kernel without an entry fails the lowering check.
"""

from __future__ import annotations

DTYPES = ("fp32", "bf16", "fp16")

# Kernels known to spill registers in some of their variants, per triton
# version (major.minor): tests/_lower_triton.py reports their spills and fails
# on a spill anywhere else, and on a kernel listed here that no longer spills
# (so that the list only shrinks). Each spills a few bytes (4 to 76 B per
# thread of stack) at the register cap of 16 warps (64 registers) or 8 warps
# (128): retuning them is open work.
KNOWN_SPILLS = {
    "3.7": {
        "dkd.py:_dkd_fwd_kernel": "forward only at C = 32000, 16 warps",
        "mixture.py:_mixture_fwd_kernel": "jsd with mask, gradient and labels, 8 warps",
        "mmd.py:_mmd_fwd_kernel": "bf16/fp16 samples",
        "mmd.py:_mmd_bwd_kernel": "bf16/fp16 samples",
        "topk.py:_topk_divergence_fwd_kernel": "skew_reverse_kl with mask, gradient and labels, 16 warps",
    },
    "3.6": {
        "divergence.py:_divergence_fwd_kernel": "fp32 kl with student gradient and labels, 16 warps",
        "gram_relation.py:_pkt_kernel": "fp32 with gradient, 4 B",
        "mixture.py:_mixture_fwd_kernel": "most kinds and dtypes, 8 warps",
        "mmd.py:_mmd_fwd_kernel": "bf16/fp16 samples",
        "topk.py:_topk_divergence_fwd_kernel": "skew kinds with mask, gradient and labels, 16 warps",
    },
}
# What torch allocations give the JIT: 16-byte aligned pointers.
ALIGNED = [["tt.divisibility", 16]]


class Variant:
    """One specialisation of a kernel: argument types, constexpr values, launch options.

    ``types`` maps every non-constexpr argument to a Triton type string
    (``"*fp32"``, ``"i32"``, ``"fp32"`` ...); ``constexprs`` maps the
    constexpr arguments (and pointer arguments passed as None) to values.
    """

    def __init__(self, label: str, types: dict, constexprs: dict, num_warps: int):
        self.label = label
        self.types = types
        self.constexprs = constexprs
        self.num_warps = num_warps

    def source(self, kernel):
        from triton.compiler import ASTSource

        signature = {
            name: "constexpr" if name in self.constexprs else self.types[name] for name in kernel.arg_names
        }
        attrs = {(i,): ALIGNED for i, name in enumerate(kernel.arg_names) if signature[name].startswith("*")}
        return ASTSource(fn=kernel, signature=signature, constexprs=self.constexprs, attrs=attrs)
