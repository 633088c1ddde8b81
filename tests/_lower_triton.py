"""Lower every Triton kernel in kernels/*.py to PTX and SASS for CUDA sm_90, without a GPU.

    python tests/_lower_triton.py [--allow-spills]

Run as a script, not collected by pytest: the kernels must be compiled, not
interpreted, so ``TRITON_INTERPRET`` is removed before triton is imported.
Each kernel (a ``@triton.jit`` function named ``*_kernel``) is lowered once
per variant listed in ``tests/triton_variants/<stem>.py`` — every dtype and
every specialisation that changes its code — with the launch configuration
its launcher uses.

Prints one line per variant with its registers per thread and its stack
frame (the per-thread local memory; Triton reports a quarter of it as
``n_spills`` once a kernel is loaded on a GPU), read from the compiled cubin,
and for a variant with a stack frame the spill stores / loads that ptxas
reports when run again on its PTX. Exits 1 if any
lowering fails, a kernel has no variants listed, or (without
``--allow-spills``) a variant spills outside the kernels that
``tests/triton_variants.KNOWN_SPILLS`` lists for this triton version (a kernel
that spills reads and writes local memory in its inner loop and loses most of
its speed), or a kernel listed there no longer spills.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from tests.triton_variants import KNOWN_SPILLS  # noqa: E402

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


@dataclass
class ResourceUsage:
    """Per-thread resources of one compiled kernel.

    ``stack_bytes`` is the stack frame (local memory; 0 unless registers
    spill); ``spill_stores`` / ``spill_loads`` are bytes from ``ptxas -v``,
    None when ptxas was not asked (no stack frame) or could not be run.
    """

    registers: int
    stack_bytes: int
    spill_stores: int | None = None
    spill_loads: int | None = None

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or bool(self.spill_stores) or bool(self.spill_loads)

    def describe(self) -> str:
        text = f"regs={self.registers} stack={self.stack_bytes} B"
        if self.spill_stores is not None:
            text += f" spill stores={self.spill_stores} B loads={self.spill_loads} B"
        return text


def _nvidia_tool(name: str) -> str | None:
    """Path of the CUDA binary tool ``name`` that this triton uses (it ships its own), else PATH's."""
    try:
        from triton import knobs

        path = getattr(knobs.nvidia, name).path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - older triton without knobs: fall back to PATH
        pass
    return shutil.which(name)


def _ptxas_spills(ptx: str, arch: str) -> tuple[int, int] | None:
    """(spill store bytes, spill load bytes) that ``ptxas -v`` reports for ``ptx`` (None: no ptxas)."""
    from triton.backends.nvidia import compiler as nvidia

    ptxas = nvidia.get_ptxas(TARGET.arch).path
    # The flag of triton's own ptxas call that changes register allocation, where this triton passes it.
    reg_alloc = ["--regAllocOptLevel=2"] if "regAllocOptLevel" in inspect.getsource(nvidia) else []
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run(
            [ptxas, "-v", "-lineinfo", *reg_alloc, f"--gpu-name={arch}", str(source),
             "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True, text=True,
        )
    found = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    return (int(found[1]), int(found[2])) if found else None


def resource_usage(compiled) -> ResourceUsage:
    """Registers and stack frame of ``compiled`` (a ``triton.compile`` result) from its cubin.

    ``cuobjdump --dump-resource-usage`` reads them from the cubin, so a
    cached compile reports them too; spill bytes come from ptxas, asked only
    when there is a stack frame.
    """
    cuobjdump = _nvidia_tool("cuobjdump")
    if cuobjdump is None:
        raise RuntimeError("no cuobjdump (neither triton's nor on PATH): cannot read registers and spills")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        result = subprocess.run(
            [cuobjdump, "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
        )
    found = re.search(r"REG:(\d+) STACK:(\d+)", result.stdout)
    if found is None:
        raise RuntimeError(f"no REG/STACK in cuobjdump's output:\n{result.stdout}{result.stderr}")
    usage = ResourceUsage(registers=int(found[1]), stack_bytes=int(found[2]))
    if usage.stack_bytes > 0:
        arch = re.search(r"^\.target (sm_\w+)", compiled.asm["ptx"], flags=re.MULTILINE)
        spills = _ptxas_spills(compiled.asm["ptx"], arch[1] if arch else f"sm_{TARGET.arch}a")
        if spills is not None:
            usage.spill_stores, usage.spill_loads = spills
    return usage


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--allow-spills", action="store_true", help="report spilling variants without failing on them"
    )
    args = parser.parse_args(argv)
    failures = []
    spilling = []
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
                where = f"{path.name}:{name} [{variant.label}] num_warps={variant.num_warps}"
                try:
                    usage = resource_usage(compiled)
                except Exception:  # noqa: BLE001 - an unreadable cubin fails the check
                    failures.append(f"{where}: registers unreadable:\n{traceback.format_exc()}")
                    continue
                print(f"{where} {usage.describe()} ptx={len(compiled.asm['ptx'])} B")
                if usage.spills:
                    spilling.append(f"{where} {usage.describe()}")
    if lowered == 0 and not failures:
        failures.append(f"no Triton kernels found in {KERNELS_DIR}")
    known = KNOWN_SPILLS.get(".".join(triton.__version__.split(".")[:2]), {})
    unknown = [line for line in spilling if line.split(" [")[0] not in known]
    for line in spilling:
        print(f"{'SPILLS' if line in unknown else 'KNOWN SPILL'}: {line}", file=sys.stderr)
    spilling_kernels = {line.split(" [")[0] for line in spilling}
    for kernel in sorted(known.keys() - spilling_kernels):
        failures.append(f"{kernel} is listed in tests/triton_variants KNOWN_SPILLS but no longer spills: "
                        "remove it from the list")
    for failure in failures:
        print(f"LOWERING FAILED: {failure}", file=sys.stderr)
    print(
        f"{lowered} variants lowered to PTX for {TARGET} with triton {triton.__version__}, "
        f"{len(failures)} failures, {len(spilling)} spilling ({len(unknown)} not in KNOWN_SPILLS)"
    )
    return 1 if failures or (unknown and not args.allow_spills) else 0


if __name__ == "__main__":
    sys.exit(main())
