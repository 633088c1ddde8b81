"""The module form of a loss function: options fixed at construction, tensors per call.

Every ``XLoss`` module of a family whose ``forward`` only forwards its tensors
to the family's function derives from :class:`LossModule`. The subclass keeps
its own keyword-only ``__init__`` (so the options, their defaults and their
documentation stay where a user looks for them) and hands them to
``super().__init__``; storing, forwarding and printing them is done once, here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["LossModule"]


class LossModule(nn.Module):
    """``forward(*tensors, **per_call)`` → ``loss_function(*tensors, **per_call, **options)``.

    Subclasses set ``loss_function = staticmethod(f)`` and call
    ``super().__init__(**options)`` with the keyword options of ``f`` they
    take. Each option becomes an attribute of the same name, so a module can
    be adjusted after construction (``module.temperature = 2.0``) and the next
    call uses the new value. ``extra_repr`` lists the options in order, except
    those in ``repr_hidden`` (objects such as a process group that print as
    noise).
    """

    loss_function: Callable[..., torch.Tensor]
    repr_hidden: tuple[str, ...] = ("process_group",)

    def __init__(self, **options) -> None:
        super().__init__()
        self._option_names = tuple(options)
        for name, value in options.items():
            setattr(self, name, value)

    def options(self) -> dict:
        """The keyword options the next call passes, by name."""
        return {name: getattr(self, name) for name in self._option_names}

    def forward(self, *tensors: torch.Tensor, **per_call) -> torch.Tensor:
        return self.loss_function(*tensors, **per_call, **self.options())

    def extra_repr(self) -> str:
        return ", ".join(
            f"{name}={value!r}" for name, value in self.options().items() if name not in self.repr_hidden
        )
