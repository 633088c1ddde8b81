"""Argument checks shared by every entry point.

Each check raises ``ValueError`` naming the offending argument, before any
kernel runs (docs/spec.md §6).
"""

from __future__ import annotations

import math
import numbers
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
DIVERGENCES = ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
REDUCTIONS = ("batchmean", "sum", "mean", "none")


def tensor(name: str, value, *, dtypes=FLOAT_DTYPES, min_dim: int = 1) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({allowed}), got {value.dtype}")
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dim(s), got shape {tuple(value.shape)}")
    return value


def same_layout(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``value`` must match ``ref`` in shape, dtype and device."""
    if value.shape != ref.shape:
        raise ValueError(
            f"{name} shape {tuple(value.shape)} does not match {ref_name} shape {tuple(ref.shape)}"
        )
    if value.dtype != ref.dtype:
        raise ValueError(f"{name} dtype {value.dtype} does not match {ref_name} dtype {ref.dtype}")
    same_device(name, value, ref_name, ref)


def teacher_vocabulary(mismatch: str, teacher_size: int, student_size: int, slice_hint: str) -> None:
    """A teacher vocabulary larger than the student's: ``ValueError`` naming both sizes and the slice.

    Models of one tokenizer often pad their embedding tables to different
    sizes (152064 vs 151936 rows); the ids beyond the tokenizer's are never
    produced. Dropping the teacher's extra entries is right only when they are
    such padding (their mass would otherwise vanish from the target), so the
    caller slices. ``mismatch`` opens the message (naming the arguments);
    ``slice_hint`` is the slice, ``{V}`` standing for the student size
    (``"teacher_logits[..., :{V}]"``).
    """
    if teacher_size > student_size:
        raise ValueError(
            f"{mismatch}: the teacher vocabulary ({teacher_size}) is larger than the student's "
            f"({student_size}). If the teacher's extra ids are padding of the same tokenizer (never "
            f"produced), pass {slice_hint.format(V=student_size)}; if they are real tokens, the "
            f"vocabularies differ and a cross-vocabulary loss (fastkd.uld_loss) applies"
        )


def same_device(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} is on {ref.device}")


def real(name: str, value, *, low: float | None = None, high: float | None = None,
         low_open: bool = False) -> float:
    """A finite Python number in [low, high] (or (low, high] with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def choice(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def row_selector(name: str, value, rows_shape: torch.Size, ref: torch.Tensor, *, integer: bool):
    """``labels`` (integer) or ``mask`` (bool) with one entry per row of ``ref``."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if integer and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got {value.dtype}")
    if not integer and value.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got {value.dtype}")
    if value.shape != rows_shape:
        raise ValueError(
            f"{name} shape {tuple(value.shape)} must equal the logits' leading shape {tuple(rows_shape)}"
        )
    same_device(name, value, "student_logits", ref)
    return value


def flag(name: str, value) -> bool:
    """``value`` if it is a bool, else ``ValueError`` naming the argument."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def values_checked_on_host(value: torch.Tensor) -> bool:
    """Whether checks that read a tensor's *values* (ids in range, weights
    finite and >= 0, ...) run on the host for ``value``.

    Reading a CPU tensor costs nothing. Reading a GPU tensor is a device →
    host synchronisation, on every step, that stalls the pipeline and breaks
    CUDA-graph capture. So on a GPU the kernels guard instead: the rows
    (or the whole loss) that bad values touch come out NaN, and nothing is
    read or written out of bounds (docs/spec.md §6). ``FASTKD_CHECK_DEVICE_VALUES=1``
    in the environment asks for the host checks and their ``ValueError`` on
    every device, which is what one wants while debugging. Shape, dtype and
    device checks never read values and always run.
    """
    if value.device.type in ("cpu", "meta"):
        return value.device.type == "cpu"
    return os.environ.get("FASTKD_CHECK_DEVICE_VALUES", "") == "1"
