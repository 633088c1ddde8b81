"""Build fastkd's compiled extensions.

    pip install -e . --no-build-isolation      (torch must already be installed)

Extensions:
  fastkd._C       always: the fastkd:: operator schemas, the CPU kernels
                  (csrc/fastkd.cpp, csrc/cpu/*.cpp) and build information.
                  The SIMD kernel sources (csrc/cpu/*_kernel.cpp) are compiled
                  once per CPU capability (default, avx2, avx512); the best one
                  the CPU supports is chosen at run time.
  fastkd._C_cuda  only when torch was built with CUDA and a CUDA toolkit is
                  found: the CUDA kernels (csrc/cuda/*.cu).

Environment switches (all optional; each is printed when it takes effect):
  FASTKD_SKIP_CUDA=1          never build fastkd._C_cuda              (default 0)
  FASTKD_CUDA_ARCH_LIST="8.0;9.0"
                              GPU architectures for fastkd._C_cuda     (default "8.0;9.0")
  FASTKD_DEBUG=1              -O0 -g, no NDEBUG                        (default 0)
  MAX_JOBS=N                  torch's own switch: compile jobs run side by
                              side, shared by the SIMD capability variants
                              and ninja; also nvcc's --threads (capped at the
                              number of architectures)    (default: all cores)
  FASTKD_BUILD_JOBS=N         deprecated alias of MAX_JOBS, read only when
                              MAX_JOBS is unset
Do not use `build_ext -j`, which races with the SIMD variants' compilation.

With ninja on PATH (pip install ninja), each extension's sources compile in
parallel and only changed objects are rebuilt; without it, one by one.

A missing or unusable CUDA toolchain gives a warning and a CPU-only build.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()


def env_flag(name: str, default: str) -> str:
    value = os.environ.get(name, default)
    if name in os.environ:
        print(f"fastkd setup: {name}={value}", file=sys.stderr)
    return value


SKIP_CUDA = env_flag("FASTKD_SKIP_CUDA", "0") == "1"
CUDA_ARCH_LIST = env_flag("FASTKD_CUDA_ARCH_LIST", "8.0;9.0")
DEBUG = env_flag("FASTKD_DEBUG", "0") == "1"


def build_jobs() -> int:
    """Compile jobs to run side by side: torch's MAX_JOBS, else the deprecated
    FASTKD_BUILD_JOBS, else the number of CPU cores."""
    if "MAX_JOBS" in os.environ:
        return max(1, int(env_flag("MAX_JOBS", "1")))
    if "FASTKD_BUILD_JOBS" in os.environ:
        print("fastkd setup: FASTKD_BUILD_JOBS is deprecated; set MAX_JOBS", file=sys.stderr)
        jobs = max(1, int(env_flag("FASTKD_BUILD_JOBS", "1")))
        # torch's ninja build reads MAX_JOBS too: one number for both
        os.environ["MAX_JOBS"] = str(jobs)
        return jobs
    return os.cpu_count() or 1


BUILD_JOBS = build_jobs()

# Flags for each SIMD variant of the CPU kernels (the flag sets PyTorch uses
# for its own ATen/native/cpu kernels). No -ffast-math: it breaks -inf.
SIMD_VARIANTS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mlzcnt"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}

OPT_FLAGS = ["-O0", "-g", "-UNDEBUG"] if DEBUG else ["-O3", "-DNDEBUG"]
CXX_FLAGS = ["-std=c++20", "-fopenmp", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized", *OPT_FLAGS]


def cpu_sources() -> tuple[list[str], list[str]]:
    """(plain sources, SIMD kernel sources) of fastkd._C, relative to ROOT."""
    cpu = sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))
    kernels = [p for p in cpu if p.stem.endswith("_kernel")]
    plain = [ROOT / "csrc" / "fastkd.cpp", *[p for p in cpu if p not in kernels]]
    return ([str(p.relative_to(ROOT)) for p in plain], [str(p.relative_to(ROOT)) for p in kernels])


def cuda_sources() -> list[str]:
    cuda = ROOT / "csrc" / "cuda"
    return [str(p.relative_to(ROOT)) for p in sorted([*cuda.glob("*.cu"), *cuda.glob("*.cpp")])]


def want_cuda() -> bool:
    if SKIP_CUDA:
        return False
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        print("fastkd setup: torch has no CUDA; building the CPU extension only", file=sys.stderr)
        return False
    if cpp_extension.CUDA_HOME is None:
        print("fastkd setup: WARNING no CUDA toolkit found; CPU-only build", file=sys.stderr)
        return False
    return True


def nvcc_threads() -> int:
    """nvcc's --threads: one per architecture of FASTKD_CUDA_ARCH_LIST, at most
    BUILD_JOBS (more threads than architectures have nothing to do)."""
    archs = [arch for arch in CUDA_ARCH_LIST.replace(",", ";").replace(" ", ";").split(";") if arch]
    return max(1, min(len(archs), BUILD_JOBS))


def make_extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    plain, kernels = cpu_sources()
    cxx_flags = [*CXX_FLAGS, f"-DFASTKD_BUILD_CXX_FLAGS=\"{' '.join(CXX_FLAGS)}\""]
    headers = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc").rglob("*.h"))]
    cpu_ext = CppExtension(
        "fastkd._C",
        plain,
        # the SIMD sources are compiled separately: list them so that a change
        # to one of them (or to any header) triggers a rebuild
        depends=[*kernels, *headers],
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
    cpu_ext.simd_sources = kernels
    extensions = [cpu_ext]
    if want_cuda():
        # The fastkd switch wins over any TORCH_CUDA_ARCH_LIST in the environment.
        os.environ["TORCH_CUDA_ARCH_LIST"] = CUDA_ARCH_LIST
        print(f"fastkd setup: building fastkd._C_cuda for {CUDA_ARCH_LIST}", file=sys.stderr)
        extensions.append(
            CUDAExtension(
                "fastkd._C_cuda",
                cuda_sources(),
                include_dirs=[str(ROOT / "csrc")],
                depends=headers,
                extra_compile_args={
                    "cxx": [*CXX_FLAGS, f"-DFASTKD_CUDA_ARCHS=\"{CUDA_ARCH_LIST}\""],
                    # --threads: compile the architectures of one source in parallel
                    "nvcc": ["-std=c++20", "-lineinfo", "--threads", str(nvcc_threads()), *OPT_FLAGS],
                },
            )
        )
    return extensions


def make_build_ext():
    from torch.utils.cpp_extension import BuildExtension

    class FastkdBuildExt(BuildExtension):
        """BuildExtension that also compiles each SIMD kernel source once per
        capability, with that capability's flags, and links all variants."""

        def build_extension(self, ext):
            simd_sources = getattr(ext, "simd_sources", [])
            if simd_sources:
                ext.extra_objects = [*ext.extra_objects, *self._compile_simd_variants(ext, simd_sources)]
            super().build_extension(ext)

        def _compile_simd_variants(self, ext, sources):
            base = ext.extra_compile_args
            base = list(base["cxx"] if isinstance(base, dict) else base)

            def compile_variant(item):
                capability, flags = item
                return self.compiler.compile(
                    sources,
                    output_dir=os.path.join(self.build_temp, f"simd_{capability}"),
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs=[*base, *flags, f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"],
                    depends=ext.depends,
                )

            # BUILD_JOBS jobs in all: variants side by side, and with ninja each
            # variant's sources side by side within its share (ninja reads MAX_JOBS)
            workers = min(len(SIMD_VARIANTS), BUILD_JOBS)
            saved = os.environ.get("MAX_JOBS")
            os.environ["MAX_JOBS"] = str(max(1, BUILD_JOBS // workers))
            try:
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    objects = list(pool.map(compile_variant, SIMD_VARIANTS.items()))
            finally:
                if saved is None:
                    del os.environ["MAX_JOBS"]
                else:
                    os.environ["MAX_JOBS"] = saved
            return [obj for variant in objects for obj in variant]

    from torch.utils.cpp_extension import is_ninja_available

    return FastkdBuildExt.with_options(use_ninja=is_ninja_available())


setup(
    ext_modules=make_extensions(),
    cmdclass={"build_ext": make_build_ext()},
)
