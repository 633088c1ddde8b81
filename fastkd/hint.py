"""FitNets hints (docs/spec.md §5): :class:`HintLoss`, a trained adapter and an MSE."""

from __future__ import annotations

import numbers

import torch
from torch import nn

from fastkd.reference import hint as _reference

__all__ = ["HintLoss"]

ADAPTERS = ("conv1x1", "conv3x3", "linear")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


class HintLoss(nn.Module):
    """FitNets hint loss (docs/spec.md §5): ``MSE(adapter(f_s), f_t)``.

    The adapter maps the student's channels to the teacher's and is trained
    with the student (give ``HintLoss.parameters()`` to the optimizer;
    :class:`fastkd.Distiller` does that through its own ``parameters()``):

    - ``"conv1x1"`` (default): ``Conv2d(C_s, C_t, 1, bias=False)`` + ``BatchNorm2d(C_t)``,
      for ``(N, C, H, W)`` maps;
    - ``"conv3x3"``: the same with a 3×3 convolution (padding 1);
    - ``"linear"``: ``Linear(C_s, C_t)``, for ``(N, C)`` vectors.

    Maps of different spatial size are adaptive-average-pooled (after the
    adapter) to ``(min(H, H'), min(W, W'))``, i.e. the larger map to the
    smaller. The mean is over every element (``nn.MSELoss()``, as
    RepDistiller's ``HintLoss``), computed in float32 (float64 for float64
    input). ``teacher_features`` is detached: the hint is a regression target,
    so the teacher never gets a gradient from it.

    Args:
        student_channels: ``C_s``.
        teacher_channels: ``C_t``.
        adapter: ``"conv1x1"``, ``"conv3x3"`` or ``"linear"``.

    ``forward(student_features (N, C_s, H, W) or (N, C_s), teacher_features (N, C_t, H', W') or (N, C_t))``
    → ``()`` loss.
    """

    def __init__(self, student_channels: int, teacher_channels: int, *, adapter: str = "conv1x1") -> None:
        super().__init__()
        self.student_channels = _positive_int("student_channels", student_channels)
        self.teacher_channels = _positive_int("teacher_channels", teacher_channels)
        if adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
        self.adapter_kind = adapter
        c_s, c_t = self.student_channels, self.teacher_channels
        if adapter == "linear":
            self.adapter = nn.Linear(c_s, c_t)
        else:
            k = 1 if adapter == "conv1x1" else 3
            self.adapter = nn.Sequential(
                nn.Conv2d(c_s, c_t, kernel_size=k, padding=k // 2, bias=False), nn.BatchNorm2d(c_t)
            )

    def _check(self, name: str, value, channels: int, channels_name: str) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if not value.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
        want_dim, layout = (
            (2, "(N, C) vectors") if self.adapter_kind == "linear" else (4, "(N, C, H, W) maps")
        )
        if value.dim() != want_dim:
            other = "a conv adapter ('conv1x1')" if want_dim == 2 else "adapter='linear'"
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}, but adapter={self.adapter_kind!r} takes "
                f"{layout}; for {value.dim()}-D features use {other}"
            )
        if value.shape[1] != channels:
            raise ValueError(
                f"{name} has {value.shape[1]} channels (shape {tuple(value.shape)}) but the "
                f"HintLoss was built with {channels_name}={channels}"
            )
        if value.numel() == 0:
            raise ValueError(f"{name} must be non-empty, got shape {tuple(value.shape)}")
        return value

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        s = self._check("student_features", student_features, self.student_channels, "student_channels")
        t = self._check("teacher_features", teacher_features, self.teacher_channels, "teacher_channels")
        if t.shape[0] != s.shape[0]:
            raise ValueError(
                f"teacher_features batch size {t.shape[0]} does not match "
                f"student_features batch size {s.shape[0]}"
            )
        if t.device != s.device:
            raise ValueError(f"teacher_features is on {t.device} but student_features is on {s.device}")
        return _reference.hint_loss(self.adapter(s), t)

    def extra_repr(self) -> str:
        return (
            f"student_channels={self.student_channels}, teacher_channels={self.teacher_channels}, "
            f"adapter={self.adapter_kind!r}"
        )
