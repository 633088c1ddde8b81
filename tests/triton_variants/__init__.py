"""What ``tests/_lower_triton.py`` lowers: one module per ``kernels/<stem>.py``.

``tests/triton_variants/<stem>.py`` defines ``VARIANTS = {kernel name: f}``
where ``f(kernel_module)`` yields a :class:`Variant` for every dtype and every
specialisation that changes the kernel's code, with the launch configuration
its launcher uses. A kernel without an entry fails the lowering check.
"""

from __future__ import annotations

DTYPES = ("fp32", "bf16", "fp16")
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
