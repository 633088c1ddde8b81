"""Backend registry and choice (docs/design.md §2).

``backend="auto"`` (or the environment variable ``FASTKD_BACKEND``) picks, for
CUDA tensors, ``triton`` then ``cuda`` then ``reference``; for CPU tensors,
``cpu`` then ``reference``. An automatic choice that is unavailable falls back
with one warning per process; an explicitly requested backend that is
unavailable raises ``ValueError``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from dataclasses import dataclass

import torch

from fastkd import _ops

BACKENDS = ("reference", "cpu", "cuda", "triton")
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
# Dtypes the compiled kernels take; float64 only on the CPU path (the GPU
# kernels accumulate in float32).
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
}


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: str


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_importable() -> str | None:
    """None when triton imports, else the reason it does not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure makes it unavailable
        return f"triton failed to import: {exc}"
    return None


def backend_status(name: str, device_type: str | None = None) -> BackendStatus:
    """Whether ``name`` can run ``fastkd::`` kernels (on ``device_type`` if given)."""
    if name == "reference":
        return BackendStatus(True, "plain PyTorch, runs anywhere")
    if name in ("cpu", "cuda"):
        # each C++ backend takes the tensors of its own device, from its own extension
        if device_type not in (None, name):
            return BackendStatus(False, f"the {name} backend takes {name.upper()} tensors, not {device_type}")
        extension_error = _ops.CPU_EXTENSION_ERROR if name == "cpu" else _ops.CUDA_EXTENSION_ERROR
        if extension_error:
            return BackendStatus(False, extension_error)
    if name == "cpu":
        return BackendStatus(True, "fastkd._C (SIMD variant: see backends())")
    if name == "cuda":
        if not torch.cuda.is_available():
            return BackendStatus(False, "no CUDA device")
        return BackendStatus(True, "fastkd._C_cuda")
    if name == "triton":
        reason = _triton_importable()
        if reason:
            return BackendStatus(False, reason)
        if device_type == "cpu" or (device_type is None and not torch.cuda.is_available()):
            if _triton_interpreting():
                return BackendStatus(True, "triton interpreter on CPU tensors (TRITON_INTERPRET=1)")
            return BackendStatus(False, "triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
        if device_type not in (None, "cuda"):
            return BackendStatus(False, f"triton does not take {device_type} tensors")
        return BackendStatus(True, "triton JIT on CUDA")
    raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")


def backends() -> dict[str, BackendStatus]:
    """Every backend, whether it is available on this machine, and why (not)."""
    report = {name: backend_status(name) for name in BACKENDS}
    if report["cpu"].available:
        # Asked here, not in backend_status: that one runs inside traced code.
        report["cpu"] = BackendStatus(True, f"fastkd._C, SIMD variant {_ops._C.cpu_capability()}")
    return report


_warned_fallbacks: set[tuple[str, str]] = set()


def resolve(backend: str, tensor: torch.Tensor) -> str:
    """The backend that will run ``tensor``'s computation, or ``ValueError``."""
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a string, got {type(backend).__name__}")
    requested = backend
    if backend == "auto":
        backend = os.environ.get("FASTKD_BACKEND", "auto") or "auto"
    device_type = tensor.device.type
    if backend != "auto":
        status = backend_status(backend, device_type)
        if not status.available:
            source = "FASTKD_BACKEND" if requested == "auto" else "backend"
            raise ValueError(f"{source}={backend!r} is unavailable: {status.reason}")
        if backend != "reference" and tensor.dtype not in KERNEL_DTYPES[backend]:
            raise ValueError(f"backend={backend!r} does not take {tensor.dtype} inputs")
        return backend
    order = AUTO_ORDER.get(device_type, ("reference",))
    for name in order:
        if name == "reference":
            break
        if backend_status(name, device_type).available and tensor.dtype in KERNEL_DTYPES[name]:
            return name
    first = order[0]
    if first != "reference" and (first, device_type) not in _warned_fallbacks:
        _warned_fallbacks.add((first, device_type))
        warnings.warn(
            f"fastkd: no compiled backend for {device_type} {tensor.dtype} tensors "
            f"({backend_status(first, device_type).reason}); using the reference",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"
