"""PKT, SP and CC (docs/spec.md §2): the reference against explicit loops, PKT's zero rows and
normalisation NaN, and the hyper-parameters' checks."""

from __future__ import annotations

import math

import pytest
import torch

from fastkd.reference import gram_relation
from tests.helpers import assert_matches
from tests.pairwise_helpers import check_reference_equals_loop, reference_embeddings
from tests.reference_checks import dot

LOSSES = {
    "pkt_loss": gram_relation.pkt_loss,
    "sp_loss": gram_relation.sp_loss,
    "cc_loss": gram_relation.cc_loss,
}


def loop_pkt(xs, xt, eps=1e-7):
    def probabilities(x):
        n = len(x)
        xh = [[c / (math.sqrt(dot(row, row)) + eps) for c in row] for row in x]
        sim = [[(dot(xh[i], xh[j]) + 1) / 2 for j in range(n)] for i in range(n)]
        return [[sim[i][j] / sum(sim[i]) for j in range(n)] for i in range(n)]

    ps, pt = probabilities(xs), probabilities(xt)
    n = len(xs)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps))
               for i in range(n) for j in range(n)) / n**2


def loop_sp(xs, xt):
    def normalised_gram(x):
        n = len(x)
        g = [[dot(x[i], x[j]) for j in range(n)] for i in range(n)]
        return [[g[i][j] / max(math.sqrt(dot(g[i], g[i])), 1e-12) for j in range(n)] for i in range(n)]

    gs, gt = normalised_gram(xs), normalised_gram(xt)
    n = len(xs)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2


def loop_cc(xs, xt, gamma=0.4, order=2):
    def kernel(x, i, j):
        g = dot(x[i], x[j])
        taylor = sum((2 * gamma) ** p / math.factorial(p) * g**p for p in range(order + 1))
        return math.exp(-2 * gamma) * taylor

    n = len(xs)
    sq = sum((kernel(xs, i, j) - kernel(xt, i, j)) ** 2 for i in range(n) for j in range(n))
    return math.sqrt(sq) / n**2


LOOPS = {
    "pkt_loss": loop_pkt,
    "sp_loss": loop_sp,
    "cc_loss": loop_cc,
}


@pytest.mark.parametrize("d_teacher", (3, 5))
@pytest.mark.parametrize("name", LOSSES)
def test_reference_equals_loops(name, d_teacher):
    check_reference_equals_loop(LOSSES[name], LOOPS[name], d_teacher, name)


def test_pkt_zero_row_has_a_finite_gradient():
    s = reference_embeddings(4, 3)
    s[2] = 0
    s.requires_grad_(True)
    gram_relation.pkt_loss(s, reference_embeddings(4, 3)).backward()
    assert torch.isfinite(s.grad).all()


def test_pkt_sets_normalisation_nan_to_zero_as_repdistiller():
    # An infinite entry makes x̂ = [inf/inf, 0/inf] = [NaN, 0] → [0, 0]: the row counts as a zero row.
    s, t = reference_embeddings(4, 2), reference_embeddings(4, 2)
    with_inf, zeroed = s.clone(), s.clone()
    with_inf[1, 0] = math.inf
    zeroed[1] = 0
    assert torch.equal(gram_relation.pkt_loss(with_inf, t), gram_relation.pkt_loss(zeroed, t))


def test_non_default_hyper_parameters_equal_loops():
    s, t = reference_embeddings(4, 3), reference_embeddings(4, 3)
    xs, xt = s.tolist(), t.tolist()
    cases = [
        (gram_relation.pkt_loss(s, t, eps=1e-3), loop_pkt(xs, xt, eps=1e-3)),
        (gram_relation.cc_loss(s, t, gamma=0.7, order=4), loop_cc(xs, xt, gamma=0.7, order=4)),
    ]
    for got, want in cases:
        assert_matches(got, torch.tensor(want, dtype=torch.float64), torch.float64, "hyper-parameters")


def test_documented_value_for_one_sample():
    one_s = reference_embeddings(1, 3).requires_grad_(True)
    one_t = reference_embeddings(1, 4)
    pkt = gram_relation.pkt_loss(one_s, one_t)  # P = [[1]] on both sides; the gradient is rounding only
    (grad,) = torch.autograd.grad(pkt, one_s)
    assert pkt.item() == 0 and grad.abs().max() < 1e-15


@pytest.mark.parametrize(
    "needle,call",
    [
        ("eps must be >", lambda s, t: gram_relation.pkt_loss(s, t, eps=0.0)),
        ("gamma must be >", lambda s, t: gram_relation.cc_loss(s, t, gamma=0.0)),
        ("gamma must be a real number", lambda s, t: gram_relation.cc_loss(s, t, gamma="0.4")),
        ("order must be >= 1", lambda s, t: gram_relation.cc_loss(s, t, order=0)),
        ("order must be an int", lambda s, t: gram_relation.cc_loss(s, t, order=2.0)),
        ("order must be an int", lambda s, t: gram_relation.cc_loss(s, t, order=True)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_hyper_parameter_raises_value_error_naming_it(needle, call):
    with pytest.raises(ValueError, match=needle):
        call(torch.randn(4, 3), torch.randn(4, 3))
