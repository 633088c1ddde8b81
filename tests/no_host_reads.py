"""A context in which reading a tensor's values on the host raises: the check that
a GPU path never synchronises with the host, run here on CPU tensors (the
Triton interpreter).

On a GPU, ``Tensor.item``, ``tolist``, ``bool(t)``, ``float(t)`` and ``int(t)``
wait for the device; under :func:`no_host_reads` each of them raises
``AssertionError`` naming the call, so a launcher that would stall a CUDA
stream (or break CUDA-graph capture) fails on the CPU already.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def no_host_reads():
    """Within the block, every host read of a tensor's values raises ``AssertionError``."""
    with pytest.MonkeyPatch.context() as patch:
        for name in READS:

            def refuse(self, *args, _name=name, **kwargs):
                raise AssertionError(
                    f"host read of a tensor's value: Tensor.{_name} (shape {tuple(self.shape)})"
                )

            patch.setattr(torch.Tensor, name, refuse)
        yield


def values_checked_in_kernels(monkeypatch) -> None:
    """The GPU policy on CPU tensors: no value check on the host (docs/spec.md §6)."""
    from fastkd import _validate

    monkeypatch.setattr(_validate, "values_checked_on_host", lambda value: False)
