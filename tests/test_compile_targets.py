"""Compile targets that need no GPU: every CUDA source through nvcc for sm_80
and sm_90, and every Triton kernel lowered to PTX and SASS for sm_90
(``tests/_lower_triton.py``), which prints each variant's registers and
spills and fails on any spill. Marked ``slow``: ``make check`` runs them,
``make test`` does not.

The nvcc command mirrors what ``torch.utils.cpp_extension`` (through
setup.py's ``CUDAExtension``) passes for ``fastkd._C_cuda``: torch's include
dirs and extension defines, its half/bfloat16 flags (``COMMON_NVCC_FLAGS``)
and setup.py's own nvcc flags, compiled to an object only (a CPU-only torch
cannot link a CUDA extension).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CUDA_SOURCES = sorted((CSRC / "cuda").glob("*.cu"))
LOWER_TRITON = ROOT / "tests" / "_lower_triton.py"

ARCHS = ("80", "90")
# setup.py's nvcc flags (keep in step with its CUDAExtension).
SETUP_NVCC_FLAGS = ["-std=c++20", "-lineinfo", "-O3", "-DNDEBUG"]
SUBPROCESS_TIMEOUT_S = 900
pytestmark = [pytest.mark.slow, pytest.mark.timeout(SUBPROCESS_TIMEOUT_S + 60)]


def nvcc_command(source: Path, output: Path) -> list[str]:
    torch_include = Path(cpp_extension.include_paths()[0])
    defines = [
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-DTORCH_EXTENSION_NAME=_C_cuda",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
    ]
    # A CUDA build of torch ships this generated header; the CPU wheel does
    # not. On Linux it only defines C10_CUDA_BUILD_SHARED_LIBS, which matters
    # on Windows alone, so skipping it changes nothing here.
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return [
        "nvcc", "-c", str(source), "-o", str(output),
        *SETUP_NVCC_FLAGS,
        *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS],
        "--threads", "2",  # the two archs' device compilations side by side
        *cpp_extension.COMMON_NVCC_FLAGS,
        "--compiler-options", "-fPIC,-Wall",
        *[f"-I{path}" for path in cpp_extension.include_paths()],
        f"-I{CSRC}",
        *defines,
    ]


def warning_lines(output: str) -> list[str]:
    """Every warning nvcc, the host compiler, ptxas or nvlink printed."""
    return [line for line in output.splitlines() if "warning" in line.lower()]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.skipif(not CUDA_SOURCES, reason="no csrc/cuda/*.cu sources")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles(source: Path, tmp_path: Path):
    result = subprocess.run(
        nvcc_command(source, tmp_path / f"{source.stem}.o"),
        cwd=tmp_path, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{output}"
    assert (tmp_path / f"{source.stem}.o").stat().st_size > 0
    warnings = warning_lines(output)
    assert not warnings, f"nvcc warnings in {source.name}:\n" + "\n".join(warnings)


@pytest.mark.skipif(not LOWER_TRITON.exists(), reason="tests/_lower_triton.py not written yet")
def test_triton_lowers_to_ptx(capsys):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, str(LOWER_TRITON)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
    )
    # The register / spill report of every variant, printed whether the check
    # passes or not (`make check` shows it).
    with capsys.disabled():
        print(f"\n{LOWER_TRITON.name}: registers and spills per thread of every Triton variant")
        print(result.stdout, end="")
        print(result.stderr, end="")
    summary = result.stdout.strip().splitlines()[-1:]
    assert result.returncode == 0, (
        f"{LOWER_TRITON.name} exited {result.returncode}: {''.join(summary)}\n{result.stderr[-20000:]}"
    )
