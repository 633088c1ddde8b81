"""What every ``kernels/<stem>.py`` shares.

- Where the kernels run (:data:`DEVICE_TYPE`): ``triton.jit`` returns an
  interpreted function under ``TRITON_INTERPRET=1``, which takes CPU tensors;
  otherwise the kernels are compiled for CUDA.
- :func:`guard_device`, the decorator of every public launcher: Triton launches
  on the *current* device and its current stream, so a launcher runs under its
  tensors' device.
- The argument checks every launcher repeats, as ValueError in the words of
  the C++ ops' TORCH_CHECKs.
- The divergence-kind and MMD-kernel codes as the kernels compare them
  (``tl.constexpr`` globals, from :mod:`fastkd._enums`).
- The NaN-keeping jit helpers (``tl.maximum`` drops a NaN on a GPU, and
  libdevice's log1p does not exist in the interpreter).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from fastkd._enums import DivergenceKind, MMDKernel

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The divergences that read the coefficient (β for JSD, α for the skew kinds).
KINDS_WITH_COEF = (DivergenceKind.JSD, DivergenceKind.SKEW_KL, DivergenceKind.SKEW_REVERSE_KL)

# The codes as the kernels read them: a jit function may only read globals
# that are constexpr.
KL = tl.constexpr(int(DivergenceKind.KL))
REVERSE_KL = tl.constexpr(int(DivergenceKind.REVERSE_KL))
JSD = tl.constexpr(int(DivergenceKind.JSD))
SKEW_KL = tl.constexpr(int(DivergenceKind.SKEW_KL))
SKEW_REVERSE_KL = tl.constexpr(int(DivergenceKind.SKEW_REVERSE_KL))
TVD = tl.constexpr(int(DivergenceKind.TVD))
GAUSSIAN = tl.constexpr(int(MMDKernel.GAUSSIAN))
LAPLACIAN = tl.constexpr(int(MMDKernel.LAPLACIAN))
POLYNOMIAL = tl.constexpr(int(MMDKernel.POLYNOMIAL))


@triton.jit
def max_nan(a, b):
    # max that propagates NaN from either side
    return tl.where((a != a) | (a > b), a, b)


@triton.jit
def min_nan(a, b):
    # min that propagates NaN from either side
    return tl.where((a != a) | (a < b), a, b)


@triton.jit
def log1p(x):
    # log(1 + x) = log(u) · x / (u − 1) with u = fl(1 + x) (Goldberg 1991,
    # Theorem 4): the ratio cancels the rounding of 1 + x, so a tiny x is not
    # rounded away; x = +inf gives +inf.
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.where(u == float("inf"), u, tl.log(u) * (x / (u - 1.0))))


@triton.jit
def online_max_sum_exp(m, d, x, inv_temperature, AXIS: tl.constexpr):
    # Running m = max x and d = Σ exp((x − m) / T) along AXIS (0 for a 1-D
    # chunk, 1 for the rows of a 2-D tile) after the chunk x. While everything
    # seen is −inf the shift is 0, so no −inf − (−inf) appears; a NaN (or
    # +inf) entry makes d NaN.
    m_new = max_nan(m, tl.max(x, AXIS))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    if AXIS == 0:
        tail = tl.sum(tl.exp((x - shift) * inv_temperature), 0)
    else:
        tail = tl.sum(tl.exp((x - shift[:, None]) * inv_temperature), 1)
    return m_new, d * tl.exp((m - shift) * inv_temperature) + tail


# Widest chunk of a row one loop iteration of the row kernels (divergence,
# top-k, DKD) holds, with 8 elements per thread: at 4096 and 16 warps ptxas
# (sm_90) reports about 100 registers and no spills for every divergence kind.
# The interpreter pays milliseconds per iteration, so it wants wide chunks too.
ROW_MAX_BLOCK = 4096
ELEMENTS_PER_THREAD = 8


def row_launch_config(length: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of a row kernel over rows of ``length`` entries."""
    block = min(triton.next_power_of_2(max(length, 1)), ROW_MAX_BLOCK)
    return block, max(1, min(16, block // (32 * ELEMENTS_PER_THREAD)))


# The kernels run where triton.jit put them: the interpreter on CPU tensors, or CUDA.
DEVICE_TYPE = "cpu" if isinstance(max_nan, InterpretedFunction) else "cuda"
INTERPRETED = DEVICE_TYPE == "cpu"


def stored_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel stores a ``dtype`` result in. The interpreter truncates
    float32 → bfloat16 (triton 3.7 casts there without a rounding mode) where
    CUDA rounds to nearest even, doubling the rounding error: under it, bfloat16
    results are stored in float32 and rounded by torch."""
    return torch.float32 if INTERPRETED and dtype == torch.bfloat16 else dtype


def _first_tensor_device(args, kwargs) -> torch.device | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def guard_device(launcher):
    """Run ``launcher`` under the device of its first tensor argument.

    Triton launches on the current CUDA device and stream: without the guard,
    tensors on ``cuda:1`` while ``cuda:0`` is current would be handed to a
    kernel running on ``cuda:0``. CPU tensors (the interpreter) run unguarded.
    Sets ``guards_device = True`` on the wrapper (tests/test_kernels_package.py
    checks every launcher carries it).
    """

    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        device = _first_tensor_device(args, kwargs)
        if device is None or device.type != "cuda":
            return launcher(*args, **kwargs)
        with torch.cuda.device(device):
            return launcher(*args, **kwargs)

    guarded.guards_device = True
    return guarded


def _dtype_names(dtypes) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_device(name: str, x: torch.Tensor) -> None:
    """``x`` is on the device type the kernels run on (ValueError)."""
    if x.device.type != DEVICE_TYPE:
        takes = "CPU tensors (TRITON_INTERPRET=1)" if INTERPRETED else "CUDA tensors"
        raise ValueError(f"{name} is on {x.device}, but this triton kernel takes {takes}")


def check_tensor(name: str, x, dims: int, layout: str = "", dtypes=FLOAT_DTYPES) -> None:
    """``x`` is a ``dims``-D tensor (``layout``, e.g. ``"N, V"``, names its axes in
    the message) of one of ``dtypes`` (None: any) on the kernels' device (ValueError)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dims:
        axes = f" ({layout})" if layout else ""
        raise ValueError(f"{name} must be {dims}-D{axes}, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise ValueError(f"{name} must be {_dtype_names(dtypes)} for triton, got {x.dtype}")
    check_device(name, x)


def check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """``a`` and ``b`` have the same dtype and device (ValueError)."""
    if a.dtype != b.dtype:
        raise ValueError(f"{name_a} ({a.dtype}) and {name_b} ({b.dtype}) must have the same dtype")
    if a.device != b.device:
        raise ValueError(f"{name_a} ({a.device}) and {name_b} ({b.device}) must share a device")


def check_positive(name: str, value) -> None:
    """``value`` is finite and > 0 (ValueError)."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")


def check_finite(name: str, value) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def square_row_config(n: int) -> tuple[int, int, int]:
    """(BLOCK_I, BLOCK_J, num_warps) of a row pass over ``[N, N]`` matrices: [4, 256]
    tiles on a GPU; under the interpreter, whose cost is per operation and per
    program, blocks as wide as the problem up to 32 × 32."""
    block = min(triton.next_power_of_2(max(n, 1)), 32 if INTERPRETED else 256)
    return (block if INTERPRETED else 4), block, 4


def check_embedding_pair(student, teacher, student_grad) -> None:
    """``(N, D)`` student and teacher embeddings of the relational launchers (RKD,
    SP, CC, PKT): the checks of csrc/cpu/rkd.cpp's check_relational_args and of
    csrc/common/gram_relation.h's check_args, as ValueError.

    The relational launchers' contract: each takes ``student`` ``(N, D_s)``
    float32 / bfloat16 / float16, ``teacher`` ``(N, D_t)`` (same N, dtype and
    device) and ``student_grad`` (whether to compute the gradient), and returns
    ``loss`` ``()`` float32 and ``grad`` ``(N, D_s)`` in the student's dtype
    (``d loss / d student``), or ``(0, 0)`` when not requested."""
    for name, x in (("student", student), ("teacher", teacher)):
        check_tensor(name, x, 2, "N, D")
        if x.shape[1] < 1:
            raise ValueError(f"{name} must have at least one feature per sample, got shape {tuple(x.shape)}")
    if student.shape[0] < 1:
        raise ValueError(f"student must hold at least one sample, got shape {tuple(student.shape)}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher must have the same number of samples N, got {student.shape[0]} "
            f"and {teacher.shape[0]}"
        )
    check_pair("student", student, "teacher", teacher)
    if not isinstance(student_grad, bool):
        raise ValueError(f"student_grad must be a bool, got {type(student_grad).__name__}")
