"""Relational losses (SPEC §2): the reference against explicit loops, its
gradients, invariances, edge cases and argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from fastkd.reference import relational
from tests.helpers import assert_matches

LOSSES = {
    "rkd_distance": relational.rkd_distance,
    "rkd_angle": relational.rkd_angle,
    "rkd_loss": relational.rkd_loss,
    "pkt_loss": relational.pkt_loss,
    "sp_loss": relational.sp_loss,
    "cc_loss": relational.cc_loss,
}


def embeddings(n, d, dtype=torch.float64):
    """``(n, d)`` random embeddings, drawn in float64 first."""
    return torch.randn(n, d, dtype=torch.float64).to(dtype)


# ---- independent loop implementations (Python floats, one index at a time) ----


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


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
        norm = math.sqrt(_dot(v, v))
        return [c / max(norm, 1e-12) for c in v]

    n = len(xs)
    total = 0.0
    for i in range(n):
        for j in range(n):
            for k in range(n):
                a_s = _dot(unit(xs, i, j), unit(xs, i, k))
                a_t = _dot(unit(xt, i, j), unit(xt, i, k))
                total += _smooth_l1(a_s, a_t)
    return total / n**3


def loop_pkt(xs, xt, eps=1e-7):
    def probabilities(x):
        n = len(x)
        xh = [[c / (math.sqrt(_dot(row, row)) + eps) for c in row] for row in x]
        sim = [[(_dot(xh[i], xh[j]) + 1) / 2 for j in range(n)] for i in range(n)]
        return [[sim[i][j] / sum(sim[i]) for j in range(n)] for i in range(n)]

    ps, pt = probabilities(xs), probabilities(xt)
    n = len(xs)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps))
               for i in range(n) for j in range(n)) / n**2


def loop_sp(xs, xt):
    def normalised_gram(x):
        n = len(x)
        g = [[_dot(x[i], x[j]) for j in range(n)] for i in range(n)]
        return [[g[i][j] / max(math.sqrt(_dot(g[i], g[i])), 1e-12) for j in range(n)] for i in range(n)]

    gs, gt = normalised_gram(xs), normalised_gram(xt)
    n = len(xs)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2


def loop_cc(xs, xt, gamma=0.4, order=2):
    def kernel(x, i, j):
        g = _dot(x[i], x[j])
        taylor = sum((2 * gamma) ** p / math.factorial(p) * g**p for p in range(order + 1))
        return math.exp(-2 * gamma) * taylor

    n = len(xs)
    sq = sum((kernel(xs, i, j) - kernel(xt, i, j)) ** 2 for i in range(n) for j in range(n))
    return math.sqrt(sq) / n**2


LOOPS = {
    "rkd_distance": loop_distance,
    "rkd_angle": loop_angle,
    "rkd_loss": lambda xs, xt: 25 * loop_distance(xs, xt) + 50 * loop_angle(xs, xt),
    "pkt_loss": loop_pkt,
    "sp_loss": loop_sp,
    "cc_loss": loop_cc,
}


# ---- values ------------------------------------------------------------------------


@pytest.mark.parametrize("d_teacher", (3, 5))
@pytest.mark.parametrize("name", LOSSES)
def test_reference_equals_loops(name, d_teacher):
    s, t = embeddings(4, 3), embeddings(4, d_teacher)
    got = LOSSES[name](s, t)
    want = torch.tensor(LOOPS[name](s.tolist(), t.tolist()), dtype=torch.float64)
    assert got.shape == () and got.dtype == torch.float64
    assert_matches(got, want, torch.float64, name)


def test_non_default_hyper_parameters_equal_loops():
    s, t = embeddings(4, 3), embeddings(4, 3)
    xs, xt = s.tolist(), t.tolist()
    cases = [
        (relational.rkd_loss(s, t, distance_weight=1.0, angle_weight=2.0),
         loop_distance(xs, xt) + 2 * loop_angle(xs, xt)),
        (relational.pkt_loss(s, t, eps=1e-3), loop_pkt(xs, xt, eps=1e-3)),
        (relational.cc_loss(s, t, gamma=0.7, order=4), loop_cc(xs, xt, gamma=0.7, order=4)),
    ]
    for got, want in cases:
        assert_matches(got, torch.tensor(want, dtype=torch.float64), torch.float64, "hyper-parameters")


@pytest.mark.parametrize("name", LOSSES)
def test_samples_are_flattened(name):
    s, t = embeddings(5, 12), embeddings(5, 8)
    flat = LOSSES[name](s, t)
    assert torch.equal(LOSSES[name](s.reshape(5, 3, 2, 2), t.reshape(5, 2, 4)), flat)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16, torch.float16), ids=str)
def test_loss_and_gradient_dtypes(name, dtype):
    s = embeddings(6, 4, dtype).requires_grad_(True)
    loss = LOSSES[name](s, embeddings(6, 3, dtype))
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    loss.backward()
    assert s.grad.dtype == dtype


# ---- gradients -----------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSSES)
def test_gradcheck_student(name):
    s = embeddings(5, 3).requires_grad_(True)
    t = embeddings(5, 4)
    assert torch.autograd.gradcheck(lambda x: LOSSES[name](x, t), (s,))


@pytest.mark.parametrize("name", LOSSES)
def test_teacher_gets_no_gradient(name):
    s = embeddings(5, 3).requires_grad_(True)
    t = embeddings(5, 3).requires_grad_(True)
    LOSSES[name](s, t).backward()
    assert t.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all()


# ---- invariances -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ("rkd_distance", "rkd_angle"))
def test_rkd_invariant_to_translating_and_scaling_the_student(name):
    s, t = embeddings(6, 4), embeddings(6, 5)
    base = LOSSES[name](s, t)
    shift = embeddings(1, 4)
    assert_matches(LOSSES[name](s + shift, t), base, torch.float64, f"{name} translated")
    assert_matches(LOSSES[name](s * 3.7, t), base, torch.float64, f"{name} scaled")
    assert_matches(LOSSES[name](0.25 * s - shift, t), base, torch.float64, f"{name} scaled and translated")


@pytest.mark.parametrize("name", ("rkd_distance", "rkd_angle"))
def test_rkd_invariant_to_rotating_the_student(name):
    s, t = embeddings(6, 4), embeddings(6, 5)
    rotation, _ = torch.linalg.qr(embeddings(4, 4))
    assert_matches(LOSSES[name](s @ rotation, t), LOSSES[name](s, t), torch.float64, f"{name} rotated")


@pytest.mark.parametrize("name", LOSSES)
def test_identical_student_and_teacher_give_zero(name):
    s = embeddings(5, 3)
    loss = LOSSES[name](s, s.clone())
    assert abs(loss.item()) < 1e-12


# ---- edge cases ------------------------------------------------------------------------


@pytest.mark.parametrize("n", (1, 2))
@pytest.mark.parametrize("name", LOSSES)
def test_one_or_two_samples_are_finite(name, n):
    s = embeddings(n, 3).requires_grad_(True)
    loss = LOSSES[name](s, embeddings(n, 4))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_documented_values_for_one_and_two_samples():
    one_s = embeddings(1, 3).requires_grad_(True)
    one_t = embeddings(1, 4)
    for name in ("rkd_distance", "rkd_angle", "rkd_loss"):
        loss = LOSSES[name](one_s, one_t)
        (grad,) = torch.autograd.grad(loss, one_s)
        assert loss.item() == 0 and torch.all(grad == 0), name
    pkt = relational.pkt_loss(one_s, one_t)  # P = [[1]] on both sides; the gradient is rounding only
    (grad,) = torch.autograd.grad(pkt, one_s)
    assert pkt.item() == 0 and grad.abs().max() < 1e-15
    two_s, two_t = embeddings(2, 3), embeddings(2, 4)
    assert relational.rkd_distance(two_s, two_t).item() == 0  # both normalise to the same [[0, 1], [1, 0]]
    assert abs(relational.rkd_angle(two_s, two_t).item()) < 1e-15


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("where", ("student", "teacher", "both"))
def test_duplicate_embeddings_are_finite(name, where):
    s, t = embeddings(5, 3), embeddings(5, 3)
    if where in ("student", "both"):
        s[3] = s[1]
    if where in ("teacher", "both"):
        t[4] = t[0]
    s.requires_grad_(True)
    loss = LOSSES[name](s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", LOSSES)
def test_all_samples_identical_is_finite(name):
    s = embeddings(1, 3).expand(4, 3).clone().requires_grad_(True)
    loss = LOSSES[name](s, embeddings(1, 2).expand(4, 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_pkt_zero_row_has_a_finite_gradient():
    s = embeddings(4, 3)
    s[2] = 0
    s.requires_grad_(True)
    relational.pkt_loss(s, embeddings(4, 3)).backward()
    assert torch.isfinite(s.grad).all()


def test_pkt_sets_normalisation_nan_to_zero_as_repdistiller():
    # An infinite entry makes x̂ = [inf/inf, 0/inf] = [NaN, 0] → [0, 0]: the row counts as a zero row.
    s, t = embeddings(4, 2), embeddings(4, 2)
    with_inf, zeroed = s.clone(), s.clone()
    with_inf[1, 0] = math.inf
    zeroed[1] = 0
    assert torch.equal(relational.pkt_loss(with_inf, t), relational.pkt_loss(zeroed, t))


@pytest.mark.parametrize("n", (1, 3))
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("which", ("student", "teacher"))
def test_nan_input_gives_nan_loss(name, which, n):
    s, t = embeddings(n, 3), embeddings(n, 3)
    (s if which == "student" else t)[n - 1, 1] = math.nan
    assert torch.isnan(LOSSES[name](s, t))


# ---- bad input ------------------------------------------------------------------------------


def _bad_calls():
    s, t = torch.randn(4, 3), torch.randn(4, 5)
    return [
        ("teacher shape", lambda f: f(s, torch.randn(3, 5))),
        ("student must have dtype", lambda f: f(s.long(), t.long())),
        ("teacher must have dtype", lambda f: f(s, t.int())),
        ("teacher dtype", lambda f: f(s, t.double())),
        ("teacher is on meta", lambda f: f(s, torch.randn(4, 5, device="meta"))),
        ("student must be a torch.Tensor", lambda f: f([[1.0, 2.0]], t)),
        ("teacher must be a torch.Tensor", lambda f: f(s, None)),
        ("student must have at least 2 dim", lambda f: f(torch.randn(4), t)),
        ("student must hold at least one sample", lambda f: f(torch.randn(0, 3), torch.randn(0, 5))),
        ("teacher must have a non-empty feature size", lambda f: f(s, torch.randn(4, 0))),
    ]


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("needle,call", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_input_raises_value_error_naming_the_argument(name, needle, call):
    with pytest.raises(ValueError, match=needle):
        call(LOSSES[name])


@pytest.mark.parametrize(
    "needle,call",
    [
        ("distance_weight must be >=", lambda s, t: relational.rkd_loss(s, t, distance_weight=-1.0)),
        ("angle_weight must be finite", lambda s, t: relational.rkd_loss(s, t, angle_weight=math.nan)),
        ("eps must be >", lambda s, t: relational.pkt_loss(s, t, eps=0.0)),
        ("gamma must be >", lambda s, t: relational.cc_loss(s, t, gamma=0.0)),
        ("gamma must be a real number", lambda s, t: relational.cc_loss(s, t, gamma="0.4")),
        ("order must be >= 1", lambda s, t: relational.cc_loss(s, t, order=0)),
        ("order must be an int", lambda s, t: relational.cc_loss(s, t, order=2.0)),
        ("order must be an int", lambda s, t: relational.cc_loss(s, t, order=True)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_hyper_parameter_raises_value_error_naming_it(needle, call):
    with pytest.raises(ValueError, match=needle):
        call(torch.randn(4, 3), torch.randn(4, 3))
