"""RKD distance and angle (docs/spec.md §2): the reference against explicit loops, its invariances,
the documented small-batch values and the weights' checks."""

from __future__ import annotations

import math

import pytest
import torch

from fastkd.reference import rkd
from tests.helpers import assert_matches
from tests.pairwise_helpers import check_reference_equals_loop, reference_embeddings
from tests.reference_checks import dot

LOSSES = {
    "rkd_distance": rkd.rkd_distance,
    "rkd_angle": rkd.rkd_angle,
    "rkd_loss": rkd.rkd_loss,
}


def _smooth_l1(a, b):
    z = abs(a - b)
    return 0.5 * z * z if z < 1 else z - 0.5


def loop_distance(xs, xt):
    def normalised(x):
        n = len(x)
        d = [[math.sqrt(sum((a - b) ** 2 for a, b in zip(x[i], x[j], strict=True))) if i != j else 0.0
              for j in range(n)] for i in range(n)]
        off = [d[i][j] for i in range(n) for j in range(n) if i != j]
        mean = sum(off) / len(off)
        return [[d[i][j] / mean for j in range(n)] for i in range(n)]

    ds, dt = normalised(xs), normalised(xt)
    n = len(xs)
    return sum(_smooth_l1(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / n**2


def loop_angle(xs, xt):
    def unit(x, i, j):
        v = [b - a for a, b in zip(x[i], x[j], strict=True)]  # x_j − x_i
        norm = math.sqrt(dot(v, v))
        return [c / max(norm, 1e-12) for c in v]

    n = len(xs)
    total = 0.0
    for i in range(n):
        for j in range(n):
            for k in range(n):
                a_s = dot(unit(xs, i, j), unit(xs, i, k))
                a_t = dot(unit(xt, i, j), unit(xt, i, k))
                total += _smooth_l1(a_s, a_t)
    return total / n**3


LOOPS = {
    "rkd_distance": loop_distance,
    "rkd_angle": loop_angle,
    "rkd_loss": lambda xs, xt: 25 * loop_distance(xs, xt) + 50 * loop_angle(xs, xt),
}


@pytest.mark.parametrize("d_teacher", (3, 5))
@pytest.mark.parametrize("name", LOSSES)
def test_reference_equals_loops(name, d_teacher):
    check_reference_equals_loop(LOSSES[name], LOOPS[name], d_teacher, name)


@pytest.mark.parametrize("name", ("rkd_distance", "rkd_angle"))
def test_rkd_invariant_to_translating_and_scaling_the_student(name):
    s, t = reference_embeddings(6, 4), reference_embeddings(6, 5)
    base = LOSSES[name](s, t)
    shift = reference_embeddings(1, 4)
    assert_matches(LOSSES[name](s + shift, t), base, torch.float64, f"{name} translated")
    assert_matches(LOSSES[name](s * 3.7, t), base, torch.float64, f"{name} scaled")
    assert_matches(LOSSES[name](0.25 * s - shift, t), base, torch.float64, f"{name} scaled and translated")


@pytest.mark.parametrize("name", ("rkd_distance", "rkd_angle"))
def test_rkd_invariant_to_rotating_the_student(name):
    s, t = reference_embeddings(6, 4), reference_embeddings(6, 5)
    rotation, _ = torch.linalg.qr(reference_embeddings(4, 4))
    assert_matches(LOSSES[name](s @ rotation, t), LOSSES[name](s, t), torch.float64, f"{name} rotated")


def test_non_default_weights_equal_loops():
    s, t = reference_embeddings(4, 3), reference_embeddings(4, 3)
    xs, xt = s.tolist(), t.tolist()
    got = rkd.rkd_loss(s, t, distance_weight=1.0, angle_weight=2.0)
    want = loop_distance(xs, xt) + 2 * loop_angle(xs, xt)
    assert_matches(got, torch.tensor(want, dtype=torch.float64), torch.float64, "hyper-parameters")


def test_documented_values_for_one_and_two_samples():
    one_s = reference_embeddings(1, 3).requires_grad_(True)
    one_t = reference_embeddings(1, 4)
    for name in ("rkd_distance", "rkd_angle", "rkd_loss"):
        loss = LOSSES[name](one_s, one_t)
        (grad,) = torch.autograd.grad(loss, one_s)
        assert loss.item() == 0 and torch.all(grad == 0), name
    two_s, two_t = reference_embeddings(2, 3), reference_embeddings(2, 4)
    assert rkd.rkd_distance(two_s, two_t).item() == 0  # both normalise to the same [[0, 1], [1, 0]]
    assert abs(rkd.rkd_angle(two_s, two_t).item()) < 1e-15


@pytest.mark.parametrize(
    "needle,call",
    [
        ("distance_weight must be >=", lambda s, t: rkd.rkd_loss(s, t, distance_weight=-1.0)),
        ("angle_weight must be finite", lambda s, t: rkd.rkd_loss(s, t, angle_weight=math.nan)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_weight_raises_value_error_naming_it(needle, call):
    with pytest.raises(ValueError, match=needle):
        call(torch.randn(4, 3), torch.randn(4, 3))
