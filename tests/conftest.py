"""Shared test set-up: the Triton interpreter on CPU-only machines, seeds,
and the tolerance table (SPEC §6) every parity test uses."""

import os

import torch

# The Triton interpreter must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
