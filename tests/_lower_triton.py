"""Lower every Triton kernel in kernels/*.py to PTX for CUDA sm_90, without a GPU.

Run as a script (``python tests/_lower_triton.py``), not collected by pytest:
the kernels must be compiled, not interpreted, so ``TRITON_INTERPRET`` is
removed before triton is imported. Each kernel (a ``@triton.jit`` function
named ``*_kernel``) is lowered once per variant listed in
``tests/triton_variants/<stem>.py`` — every dtype and every specialisation
that changes its code — with the launch configuration its launcher uses.
Prints one line per variant and exits 1 if any lowering fails or a kernel
has no variants listed.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KERNELS_DIR = ROOT / "kernels"
VARIANTS_DIR = ROOT / "tests" / "triton_variants"
TARGET = GPUTarget("cuda", 90, 32)


def variants_of(stem: str) -> dict:
    """``VARIANTS`` of tests/triton_variants/<stem>.py ({} when that file does not exist)."""
    if not (VARIANTS_DIR / f"{stem}.py").exists():
        return {}
    return importlib.import_module(f"tests.triton_variants.{stem}").VARIANTS


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
        listed = variants_of(path.stem)
        for name in sorted(kernels.keys() - listed.keys()):
            failures.append(f"{path.name}:{name}: no variants listed in tests/triton_variants/{path.stem}.py")
        for name in sorted(listed.keys() - kernels.keys()):
            failures.append(
                f"{path.name}:{name}: in tests/triton_variants/{path.stem}.py but not a @triton.jit kernel"
            )
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
