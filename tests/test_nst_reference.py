"""The NST reference (docs/spec.md §3) against explicit loops, autograd and the closed form."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastkd.reference.nst import nst_loss
from tests.reference_checks import (
    ReferenceContract,
    check_raises_value_error,
    close,
    dot,
    randn,
)

# ---- loop oracles: one channel at a time, in Python floats ---------------------------------


def loop_adaptive_pool(plane, out_h, out_w):
    """``F.adaptive_avg_pool2d`` of one (H, W) list-of-lists: bins [⌊iH/h⌋, ⌈(i+1)H/h⌉)."""
    h, w = len(plane), len(plane[0])
    out = []
    for i in range(out_h):
        r0, r1 = (i * h) // out_h, -((-(i + 1) * h) // out_h)
        row = []
        for j in range(out_w):
            c0, c1 = (j * w) // out_w, -((-(j + 1) * w) // out_w)
            cells = [plane[r][q] for r in range(r0, r1) for q in range(c0, c1)]
            row.append(sum(cells) / len(cells))
        out.append(row)
    return out


def loop_nst(s, t):
    out_h, out_w = min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3])

    def channels(maps, n):
        vectors = []
        for plane in maps[n].tolist():
            flat = [v for row in loop_adaptive_pool(plane, out_h, out_w) for v in row]
            norm = max(math.sqrt(sum(v * v for v in flat)), 1e-12)
            vectors.append([v / norm for v in flat])
        return vectors

    def mean_k(a, b):
        return sum(dot(p, q) ** 2 for p in a for q in b) / (len(a) * len(b))

    total = 0.0
    for n in range(s.shape[0]):
        a, b = channels(s, n), channels(t, n)
        total += mean_k(b, b) + mean_k(a, a) - 2 * mean_k(a, b)
    return total / s.shape[0]


# ---- NST ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("s_shape", "t_shape"),
    (
        ((2, 3, 4, 4), (2, 5, 4, 4)),  # same spatial size, different channel counts
        ((1, 2, 3, 3), (1, 4, 5, 5)),  # N = 1; teacher pooled 5×5 → 3×3 (uneven bins)
        ((2, 4, 6, 6), (2, 3, 4, 4)),  # student pooled
        ((2, 2, 4, 6), (2, 3, 5, 3)),  # non-square: both pooled to 4×3
        ((3, 1, 1, 1), (3, 1, 2, 2)),  # one channel, one pixel
    ),
    ids=str,
)
def test_nst_matches_loops(s_shape, t_shape):
    s, t = randn(*s_shape), randn(*t_shape)
    close(nst_loss(s, t), loop_nst(s, t))


def test_nst_equals_gram_closed_form():
    """Σ_{c,c'} (a_c·b_c')² = ⟨AᵀA, BᵀB⟩_F with A = (C, HW): the form the fused kernels use."""
    s, t = randn(3, 4, 5, 5), randn(3, 6, 5, 5)
    a, b = F.normalize(s.flatten(2), dim=2), F.normalize(t.flatten(2), dim=2)

    def mean_k(u, v):
        gram_u, gram_v = u.transpose(1, 2) @ u, v.transpose(1, 2) @ v  # (N, HW, HW)
        return (gram_u * gram_v).sum(dim=(1, 2)) / (u.shape[1] * v.shape[1])

    closed = (mean_k(b, b) + mean_k(a, a) - 2 * mean_k(a, b)).mean()
    close(nst_loss(s, t), closed.item())


def test_nst_pools_the_larger_map():
    s_small, s_big = randn(2, 3, 4, 4), randn(2, 3, 8, 8)
    t_small, t_big = randn(2, 5, 4, 4), randn(2, 5, 8, 8)
    close(nst_loss(s_small, t_big), nst_loss(s_small, F.adaptive_avg_pool2d(t_big, (4, 4))).item())
    close(nst_loss(s_big, t_small), nst_loss(F.adaptive_avg_pool2d(s_big, (4, 4)), t_small).item())


def test_nst_of_identical_maps_is_zero():
    s = randn(2, 3, 4, 4)
    assert abs(nst_loss(s, s.clone()).item()) < 1e-14


@pytest.mark.parametrize(("s_shape", "t_shape"), (((2, 3, 3, 3), (2, 2, 3, 3)), ((1, 2, 2, 3), (1, 3, 4, 4))),
                         ids=str)
def test_nst_gradcheck(s_shape, t_shape):
    s, t = randn(*s_shape, requires_grad=True), randn(*t_shape, requires_grad=True)
    assert torch.autograd.gradcheck(nst_loss, (s, t))


# ---- shared contract: dtypes, NaN, layout -------------------------------------------------


class TestContract(ReferenceContract):
    CALL = (nst_loss, (2, 3, 4, 4), (2, 2, 6, 6))


# ---- invalid arguments ------------------------------------------------------------------------


def _bad_cases():
    s, t = randn(2, 3, 4, 4), randn(2, 2, 4, 4)
    return [
        (r"^student_maps must have at least 4 dim", lambda: nst_loss(randn(2, 3, 4), t)),
        (r"^student_maps must have dtype in", lambda: nst_loss(s.int(), t)),
        (r"^teacher_maps must be a torch\.Tensor", lambda: nst_loss(s, "maps")),
        (r"^teacher_maps batch size 3 does not match", lambda: nst_loss(s, randn(3, 2, 4, 4))),
        (r"^teacher_maps dtype torch\.float32 does not match", lambda: nst_loss(s, t.float())),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_invalid_arguments_raise_value_error_naming_the_argument(case):
    check_raises_value_error(*_bad_cases()[case])
