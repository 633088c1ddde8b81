"""Backend choice per loss, and the divergence kernel of each backend."""

from __future__ import annotations

import importlib

import torch

from fastkd import (
    _dispatch,
    _ops,  # noqa: F401  (registers the fastkd:: ops and their fake kernels)
)

__all__ = ["backend_for", "kernel_op", "run_divergence_kernel"]


def backend_for(loss_name: str, kernels: tuple[str, ...], backend: str, tensor: torch.Tensor) -> str:
    """``_dispatch.resolve``, restricted to ``kernels``, the backends with a kernel for ``loss_name``.

    ``backend="auto"`` falls back to the reference where the resolved backend
    has no such kernel; an explicit request for one raises ``ValueError``.
    """
    chosen = _dispatch.resolve(backend, tensor)
    if chosen == "reference" or chosen in kernels:
        return chosen
    if backend == "auto":
        return "reference"
    raise ValueError(f"backend={chosen!r} has no {loss_name} kernel yet")


def kernel_op(backend: str, stem: str, name: str):
    """The function with the contract of the op ``fastkd::<name>`` on ``backend``:
    the Triton launcher ``name`` of ``kernels/<stem>.py`` (imported only then:
    importing it imports triton), or the registered op (cpu, cuda: chosen by
    the inputs' device)."""
    if backend == "triton":
        return getattr(importlib.import_module(f"fastkd.kernels.{stem}"), name)
    return getattr(torch.ops.fastkd, name)


def run_divergence_kernel(backend: str, *args):
    """``fastkd::divergence_forward`` on ``backend`` (``"cpu"`` / ``"cuda"``: the op;
    ``"triton"``: the launcher with the same contract)."""
    if backend == "triton":
        from fastkd.kernels import divergence as triton_divergence

        return triton_divergence.divergence_forward(*args)
    return torch.ops.fastkd.divergence_forward(*args)
