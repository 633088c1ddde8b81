"""Helpers shared by the tests of the pairwise-relation losses (RKD, PKT, SP, CC)."""

from __future__ import annotations

import pytest
import torch

from fastkd import _ops
from tests.helpers import DEVICE, assert_matches

UPSTREAM = 0.7  # never test only with an upstream gradient of 1
INTERPRETED_MAX_N = 24


# The ops on DEVICE: the cpu implementation here, the cuda one under FASTKD_TEST_DEVICE=cuda.
OPS_ON_DEVICE = pytest.mark.skipif(
    DEVICE.type == "cuda" and _ops.CUDA_EXTENSION_ERROR is not None, reason=str(_ops.CUDA_EXTENSION_ERROR)
)


def embeddings(shape, dtype, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) + shift).to(device=DEVICE, dtype=dtype)


def reference_embeddings(n, d, dtype=torch.float64):
    """``(n, d)`` random embeddings for the reference tests, drawn in float64 first (default device)."""
    return torch.randn(n, d, dtype=torch.float64).to(dtype)


def check_reference_equals_loop(loss, loop, d_teacher: int, name: str) -> None:
    """The reference ``loss`` of (4, 3) student and (4, ``d_teacher``) teacher
    float64 embeddings: a float64 ``()`` tensor equal to the Python-float oracle
    ``loop(student_rows, teacher_rows)``."""
    s, t = reference_embeddings(4, 3), reference_embeddings(4, d_teacher)
    got = loss(s, t)
    want = torch.tensor(loop(s.tolist(), t.tolist()), dtype=torch.float64)
    assert got.shape == () and got.dtype == torch.float64
    assert_matches(got, want, torch.float64, name)


def run(fn, student, teacher, upstream=UPSTREAM):
    """(loss, student gradient) of ``fn`` with a non-unit upstream gradient; the teacher needs none."""
    s = student.detach().clone().requires_grad_(True)
    loss = fn(s, teacher)
    loss.backward(torch.tensor(upstream, dtype=loss.dtype, device=loss.device))
    return loss.detach(), s.grad


def interpreted(backend) -> bool:
    return backend == "triton" and DEVICE.type == "cpu"


# (N, student feature shape, teacher feature shape): N = 1 and 2, tiny and
# awkward feature sizes, SIMD tails (N not a multiple of 8 / 16), (N, C, H, W);
# N = 37 beyond one 32-wide block (compiled backends), N = 21 for the interpreter.
SHAPES = (
    (1, (3,), (4,)),
    (2, (5,), (3,)),
    (3, (1,), (1,)),
    (13, (17,), (9,)),
    (21, (130,), (65,)),
    (37, (130,), (65,)),
    (6, (2, 3, 5), (7,)),
)
