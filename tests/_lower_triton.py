"""Lower every Triton kernel in kernels/*.py to PTX for CUDA sm_90, without a GPU.

Run as a script (``python tests/_lower_triton.py``), not collected by pytest:
the kernels must be compiled, not interpreted, so ``TRITON_INTERPRET`` is
removed before triton is imported. Each kernel (a ``@triton.jit`` function
named ``*_kernel``) is lowered once per variant listed in ``VARIANTS`` — every
dtype and every specialisation that changes its code — with the launch
configuration its launcher uses. Prints one line per variant and exits 1 if
any lowering fails or a kernel has no variants listed.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import traceback
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"
TARGET = GPUTarget("cuda", 90, 32)
DTYPES = ("fp32", "bf16", "fp16")
# What torch allocations give the JIT: 16-byte aligned pointers.
ALIGNED = [["tt.divisibility", 16]]


class Variant:
    """One specialisation of a kernel: argument types, constexpr values, launch options."""

    def __init__(self, label: str, types: dict, constexprs: dict, num_warps: int):
        self.label = label
        self.types = types
        self.constexprs = constexprs
        self.num_warps = num_warps

    def source(self, kernel: JITFunction) -> ASTSource:
        signature = {
            name: "constexpr" if name in self.constexprs else self.types[name] for name in kernel.arg_names
        }
        attrs = {(i,): ALIGNED for i, name in enumerate(kernel.arg_names) if signature[name].startswith("*")}
        return ASTSource(fn=kernel, signature=signature, constexprs=self.constexprs, attrs=attrs)


def divergence_variants(module):
    """Every kind with the row mask and both gradients (the gradient pass), and
    KL with the student gradient only (written in the loss pass), per dtype."""
    block, num_warps = module.launch_config(128256)
    names = {
        module.KL: "kl", module.REVERSE_KL: "reverse_kl", module.JSD: "jsd",
        module.SKEW_KL: "skew_kl", module.SKEW_REVERSE_KL: "skew_reverse_kl", module.TVD: "tvd",
    }
    for dtype in DTYPES:
        types = {
            "s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "mask_ptr": "*i1", "loss_ptr": "*fp32",
            "gs_ptr": f"*{dtype}", "gt_ptr": f"*{dtype}", "stride_s": "i32", "stride_t": "i32", "V": "i32",
            "inv_temperature": "fp32", "grad_factor": "fp32", "c": "fp32", "one_minus_c": "fp32",
            "log_c": "fp32", "log_one_minus_c": "fp32",
        }
        for kind, name in names.items():
            constexprs = {
                "KIND": kind, "HAS_MASK": True, "STUDENT_GRAD": True, "TEACHER_GRAD": True, "BLOCK": block,
            }
            yield Variant(f"{dtype} {name} mask+both-grads", types, constexprs, num_warps)
        constexprs = {
            "KIND": module.KL, "HAS_MASK": False, "STUDENT_GRAD": True, "TEACHER_GRAD": False,
            "BLOCK": block, "mask_ptr": None, "gt_ptr": None,
        }
        yield Variant(f"{dtype} kl student-grad", types, constexprs, num_warps)


# kernels/<stem>.py → {kernel name: variants(module)}
VARIANTS = {
    "divergence": {"_divergence_fwd_kernel": divergence_variants},
}


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"fastkd.kernels.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    failures = []
    lowered = 0
    for path in sorted(KERNELS_DIR.glob("*.py")):
        if path.name == "__init__.py":
            continue
        module = load(path)
        kernels = {
            name: obj for name, obj in vars(module).items()
            if isinstance(obj, JITFunction) and name.endswith("_kernel")
        }
        listed = VARIANTS.get(path.stem, {})
        for name in sorted(kernels.keys() - listed.keys()):
            failures.append(f"{path.name}:{name}: no variants listed in tests/_lower_triton.py VARIANTS")
        for name in sorted(listed.keys() - kernels.keys()):
            failures.append(f"{path.name}:{name}: listed in VARIANTS but not a @triton.jit kernel there")
        for name in sorted(kernels.keys() & listed.keys()):
            kernel = kernels[name]
            for variant in listed[name](module):
                try:
                    compiled = triton.compile(
                        variant.source(kernel), target=TARGET, options={"num_warps": variant.num_warps}
                    )
                except Exception:  # noqa: BLE001 - report every failing variant, then fail
                    failures.append(f"{path.name}:{name} [{variant.label}]:\n{traceback.format_exc()}")
                    continue
                lowered += 1
                print(
                    f"{path.name}:{name} [{variant.label}] num_warps={variant.num_warps} "
                    f"ptx={len(compiled.asm['ptx'])} B"
                )
    if lowered == 0 and not failures:
        failures.append(f"no Triton kernels found in {KERNELS_DIR}")
    for failure in failures:
        print(f"LOWERING FAILED: {failure}", file=sys.stderr)
    print(f"{lowered} variants lowered to PTX for {TARGET}, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
