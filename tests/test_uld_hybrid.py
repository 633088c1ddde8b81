"""uld_loss's hybrid mode (``hybrid=`` an ``(M, 2)`` table of shared tokens), docs/spec.md §1.14.

The oracle is a per-row loop in float64 over the definition: the matched
pairs' generalised JSD term by term (no renormalisation), the unmatched
probabilities sorted and zero-padded as Python lists. The reference is
checked against it (values) and by gradcheck (gradients); every backend
against the reference (values and both gradients, upstream gradient ≠ 1).
"""

from __future__ import annotations

import math

import pytest
import torch

import fastkd
from fastkd.reference import uld as reference_uld
from tests.helpers import DEVICE, assert_matches, backend_params

BACKENDS = backend_params(include_reference=True)


def dtype_for(backend: str) -> torch.dtype:
    """float64 where the backend takes it; the GPU kernels' widest input, float32, otherwise."""
    return torch.float32 if backend in ("triton", "cuda") else torch.float64


def jsd_term(p: float, q: float, beta: float) -> float:
    """The matched pair's term: student probability ``p``, teacher ``q``, β on the teacher."""
    def xlog(x: float, y: float) -> float:
        return 0.0 if x == 0.0 else x * math.log(x / y)

    if beta == 0.0:
        return xlog(q, p)
    if beta == 1.0:
        return xlog(p, q)
    m = beta * q + (1 - beta) * p
    return beta * xlog(q, m) + (1 - beta) * xlog(p, m)


def loop_oracle(s, t, table, *, beta=0.5, weights=None, student_temperature=1.0, teacher_temperature=1.0,
                mask=None):
    """``(N,)`` hybrid row losses in float64, 0 on excluded rows."""
    s, t = s.double(), t.double()
    pairs = [tuple(pair) for pair in table.tolist()]
    student_rest = sorted(set(range(s.shape[1])) - {a for a, _ in pairs})
    teacher_rest = sorted(set(range(t.shape[1])) - {b for _, b in pairs})
    w_m, w_u = weights if weights is not None else (len(pairs) / t.shape[1], 1 - len(pairs) / t.shape[1])
    rows = torch.zeros(s.shape[0], dtype=torch.float64)
    for i in range(s.shape[0]):
        if mask is not None and not mask[i]:
            continue
        p = torch.softmax(s[i] / student_temperature, 0).tolist()
        q = torch.softmax(t[i] / teacher_temperature, 0).tolist()
        matched = sum(jsd_term(p[a], q[b], beta) for a, b in pairs)
        unmatched = 0.0
        if student_rest and teacher_rest:
            width = max(len(student_rest), len(teacher_rest))
            x = sorted((p[j] for j in student_rest), reverse=True) + [0.0] * (width - len(student_rest))
            y = sorted((q[j] for j in teacher_rest), reverse=True) + [0.0] * (width - len(teacher_rest))
            unmatched = sum(abs(u - v) for u, v in zip(x, y, strict=True))
        rows[i] = w_m * matched + w_u * unmatched
    return rows


def random_table(generator, vs, vt, m):
    """``(m, 2)`` int64: m distinct student ids paired with m distinct teacher ids."""
    student = torch.randperm(vs, generator=generator)[:m]
    teacher = torch.randperm(vt, generator=generator)[:m]
    return torch.stack([student, teacher], 1)


def tables(generator, vs, vt):
    """name -> table: a partial overlap, none, and the full smaller vocabulary."""
    small = min(vs, vt)
    return {
        "partial": random_table(generator, vs, vt, max(small // 2, 1)),
        "empty": torch.zeros(0, 2, dtype=torch.int64),
        "full": random_table(generator, vs, vt, small),
    }


def run(backend, s, t, dtype, upstream=None, **kwargs):
    """``(loss, grad_s, grad_t)`` of ``backend`` on ``dtype`` copies of float64 ``s``, ``t``."""
    s_in = s.detach().to(DEVICE, dtype).requires_grad_()
    t_in = t.detach().to(DEVICE, dtype).requires_grad_()
    if kwargs.get("mask") is not None:
        kwargs["mask"] = kwargs["mask"].to(DEVICE)
    loss = fastkd.uld_loss(s_in, t_in, backend=backend, **kwargs)
    weighted = loss if upstream is None else loss * upstream.to(DEVICE, loss.dtype)
    grads = torch.autograd.grad(weighted.sum(), (s_in, t_in))
    return loss.detach().cpu(), grads[0].cpu(), grads[1].cpu()


def reference_run(s, t, upstream=None, **kwargs):
    """``(loss, grad_s, grad_t)`` of the reference in float64."""
    s_in, t_in = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    loss = reference_uld.uld_loss(s_in, t_in, **kwargs)
    weighted = loss if upstream is None else loss * upstream
    grads = torch.autograd.grad(weighted.sum(), (s_in, t_in))
    return loss.detach(), grads[0], grads[1]


SHAPES = [(6, 9), (9, 6), (7, 7), (40, 130)]
BETAS = [0.5, 0.2, 0.0, 1.0]


@pytest.mark.parametrize(("vs", "vt"), SHAPES)
@pytest.mark.parametrize("table_kind", ["partial", "empty", "full"])
@pytest.mark.parametrize("beta", BETAS)
def test_reference_matches_the_loop_oracle(vs, vt, table_kind, beta):
    g = torch.Generator().manual_seed(vs * 100 + vt)
    s = torch.randn(4, vs, generator=g, dtype=torch.float64) * 2
    t = torch.randn(4, vt, generator=g, dtype=torch.float64) * 2
    table = tables(g, vs, vt)[table_kind]
    mask = torch.tensor([True, False, True, True])
    options = dict(student_temperature=0.8, teacher_temperature=1.7, mask=mask)
    expected = loop_oracle(s, t, table, beta=beta, **options)
    got = reference_uld.uld_loss(s, t, hybrid=table, hybrid_beta=beta, reduction="none", **options)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    weights = (0.3, 1.4)
    expected = loop_oracle(s, t, table, beta=beta, weights=weights, **options)
    got = reference_uld.uld_loss(s, t, hybrid=table, hybrid_beta=beta, hybrid_weights=weights,
                                 reduction="none", **options)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("table_kind", ["partial", "full"])
def test_reference_gradcheck(beta, table_kind):
    g = torch.Generator().manual_seed(11)
    s = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    table = tables(g, 5, 7)[table_kind]

    def loss(s, t):
        return reference_uld.uld_loss(s, t, hybrid=table, hybrid_beta=beta, student_temperature=1.3,
                                      reduction="none")

    assert torch.autograd.gradcheck(loss, (s, t))


# every small shape with every table and β (β has no effect without a table);
# the wider shape, slow in the Triton interpreter, at two β
BACKEND_CASES = [
    (vs, vt, table_kind, beta)
    for vs, vt in SHAPES[:-1] for table_kind in ("partial", "empty", "full") for beta in BETAS
    if table_kind != "empty" or beta == 0.5
] + [(*SHAPES[-1], "partial", 0.5), (*SHAPES[-1], "full", 0.0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("vs", "vt", "table_kind", "beta"), BACKEND_CASES)
def test_backends_match_the_reference(backend, vs, vt, table_kind, beta):
    """Rows and both gradients with a per-row upstream gradient, temperatures, a mask
    and a −inf entry on each side."""
    g = torch.Generator().manual_seed(vs * 1000 + vt + int(beta * 10))
    n = 5
    s = torch.randn(n, vs, generator=g, dtype=torch.float64) * 2
    t = torch.randn(n, vt, generator=g, dtype=torch.float64) * 2
    table = tables(g, vs, vt)[table_kind]
    if beta in (0.0, 1.0) and table_kind != "empty":
        # an entry with probability 0 on a matched id makes the KL endpoints infinite: keep them on the rest
        s[1, reference_uld.unmatched_ids(table[:, 0], vs)[:1]] = -math.inf
        t[2, reference_uld.unmatched_ids(table[:, 1], vt)[:1]] = -math.inf
    else:
        s[1, 0] = -math.inf
        t[2, -1] = -math.inf
    mask = torch.tensor([True, True, True, False, True])
    upstream = torch.randn(n, generator=g, dtype=torch.float64)
    options = dict(hybrid=table, hybrid_beta=beta, student_temperature=0.7, teacher_temperature=2.5,
                   mask=mask, reduction="none")
    expected = reference_run(s, t, upstream, **options)
    dtype = dtype_for(backend)
    got = run(backend, s, t, dtype, upstream, **options)
    assert got[0].dtype == dtype
    assert_matches(got[0], expected[0], dtype, f"rows {backend}", elementwise=True)
    assert_matches(got[1], expected[1], dtype, f"student gradient {backend}")
    assert_matches(got[2], expected[2], dtype, f"teacher gradient {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("weights", [None, (0.25, 2.0)])
def test_reductions_and_weights(backend, reduction, weights):
    g = torch.Generator().manual_seed(5)
    s = torch.randn(6, 11, generator=g, dtype=torch.float64)
    t = torch.randn(6, 17, generator=g, dtype=torch.float64)
    table = random_table(g, 11, 17, 6)
    mask = torch.tensor([True, False, True, True, False, True])
    options = dict(hybrid=table, hybrid_weights=weights, mask=mask, reduction=reduction)
    expected = reference_run(s, t, **options)
    rows = loop_oracle(s, t, table, weights=weights, mask=mask)
    oracle = rows if reduction == "none" else rows.sum() / (4 if reduction == "batchmean" else 1)
    torch.testing.assert_close(expected[0], oracle, rtol=1e-12, atol=1e-14)
    dtype = dtype_for(backend)
    got = run(backend, s, t, dtype, **options)
    assert_matches(got[0], expected[0], dtype, f"loss {backend}")
    assert_matches(got[1], expected[1], dtype, f"student gradient {backend}")
    assert_matches(got[2], expected[2], dtype, f"teacher gradient {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.5, 0.0, 1.0])
@pytest.mark.parametrize("sides", ["student", "teacher", "both"])
def test_log_probability_sides(backend, beta, sides):
    """Unnormalised rows (as fastkd.merge_aligned gives) taken as log-probabilities: the
    matched entries are compared as they are, whatever mass the row lacks."""
    g = torch.Generator().manual_seed(9)
    s = torch.log_softmax(torch.randn(4, 8, generator=g, dtype=torch.float64), 1)
    t = torch.log_softmax(torch.randn(4, 12, generator=g, dtype=torch.float64), 1)
    # rows of mass 0.3 .. 0.9
    s = s + torch.linspace(0.3, 0.9, 4, dtype=torch.float64).log()[:, None]
    t = t + torch.linspace(0.9, 0.4, 4, dtype=torch.float64).log()[:, None]
    flags = dict(student_is_logprob=sides in ("student", "both"),
                 teacher_is_logprob=sides in ("teacher", "both"))
    upstream = torch.randn(4, generator=g, dtype=torch.float64)
    for table in (random_table(g, 8, 12, 5), random_table(g, 8, 12, 8)):
        options = dict(hybrid=table, hybrid_beta=beta, reduction="none", **flags)
        expected = reference_run(s, t, upstream, **options)
        dtype = dtype_for(backend)
        got = run(backend, s, t, dtype, upstream, **options)
        assert_matches(got[0], expected[0], dtype, f"rows {backend}", elementwise=True)
        assert_matches(got[1], expected[1], dtype, f"student gradient {backend}")
        assert_matches(got[2], expected[2], dtype, f"teacher gradient {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_table_is_plain_uld(backend):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(5, 9, generator=g, dtype=torch.float64)
    t = torch.randn(5, 13, generator=g, dtype=torch.float64)
    dtype = dtype_for(backend)
    empty = torch.zeros(0, 2, dtype=torch.int64)
    got = run(backend, s, t, dtype, hybrid=empty, student_temperature=1.5)
    plain = run(backend, s, t, dtype, student_temperature=1.5)
    for a, b, name in zip(got, plain, ("loss", "student gradient", "teacher gradient"), strict=True):
        assert_matches(a, b.double(), dtype, f"{name} {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.5, 0.0, 1.0])
def test_full_table_of_one_vocabulary_is_the_divergence(backend, beta):
    """V_s = V_t and every id matched (any permutation): no unmatched term, weight 1, and
    the matched rows are whole distributions, so the loss is fastkd.divergence's jsd of
    the permuted teacher."""
    g = torch.Generator().manual_seed(8)
    s = torch.randn(4, 10, generator=g, dtype=torch.float64)
    t = torch.randn(4, 10, generator=g, dtype=torch.float64)
    permutation = torch.randperm(10, generator=g)
    table = torch.stack([torch.arange(10), permutation], 1)
    dtype = dtype_for(backend)
    got = run(backend, s, t, dtype, hybrid=table, hybrid_beta=beta)
    expected = fastkd.divergence(s, t[:, permutation], divergence="jsd", beta=beta, scale=1.0,
                                 backend="reference")
    assert_matches(got[0], expected, dtype, f"loss {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_order_of_the_pairs_does_not_matter(backend):
    g = torch.Generator().manual_seed(6)
    s = torch.randn(3, 9, generator=g, dtype=torch.float64)
    t = torch.randn(3, 7, generator=g, dtype=torch.float64)
    table = random_table(g, 9, 7, 4)
    dtype = dtype_for(backend)
    got = run(backend, s, t, dtype, hybrid=table)
    shuffled = run(backend, s, t, dtype, hybrid=table[torch.randperm(4, generator=g)])
    for a, b in zip(got, shuffled, strict=True):
        assert_matches(a, b.double(), dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hard_labels_and_parts(backend):
    g = torch.Generator().manual_seed(12)
    s = torch.randn(5, 9, generator=g, dtype=torch.float64)
    t = torch.randn(5, 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([1, -100, 4, 0, 8])
    table = random_table(g, 9, 6, 3)
    dtype = dtype_for(backend)
    total, hard, soft = fastkd.uld_loss(s.to(DEVICE, dtype), t.to(DEVICE, dtype), hybrid=table,
                                        labels=labels.to(DEVICE), hard_weight=0.5, soft_weight=2.0,
                                        return_parts=True, backend=backend)
    mask = labels != -100
    expected_soft = 2.0 * reference_uld.uld_loss(s, t, hybrid=table, mask=mask)
    expected_hard = 0.5 * torch.nn.functional.cross_entropy(s, labels, ignore_index=-100)
    assert_matches(soft.cpu(), expected_soft, dtype, f"soft {backend}")
    assert_matches(hard.cpu(), expected_hard, dtype, f"hard {backend}")
    assert_matches(total.cpu(), expected_soft + expected_hard, dtype, f"total {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_zero_matched_probabilities(backend, beta):
    """Rows where one side, or both, give matched ids probability 0: the same loss
    values as the reference, +inf included (the KL endpoints), never NaN."""
    s = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.randn(4, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    table = torch.tensor([[0, 0], [1, 1], [2, 2]])
    s[0, 0] = -math.inf  # the student has no probability on one matched id
    t[1, :3] = -math.inf  # the teacher has no matched mass
    s[2, :3] = t[2, :3] = -math.inf  # neither has
    t[3, 1] = -math.inf
    expected = reference_uld.uld_loss(s, t, hybrid=table, hybrid_beta=beta, reduction="none")
    got = fastkd.uld_loss(s.to(DEVICE, dtype_for(backend)), t.to(DEVICE, dtype_for(backend)), hybrid=table,
                          hybrid_beta=beta, reduction="none", backend=backend).cpu()
    assert not got.isnan().any()
    assert_matches(got, expected, dtype_for(backend), f"rows {backend}", elementwise=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_kept_row(backend):
    s = torch.randn(3, 5, dtype=torch.float64)
    t = torch.randn(3, 4, dtype=torch.float64)
    dtype = dtype_for(backend)
    got = run(backend, s, t, dtype, hybrid=torch.tensor([[0, 1]]), mask=torch.zeros(3, dtype=torch.bool))
    assert got[0].item() == 0.0
    assert torch.equal(got[1], torch.zeros_like(got[1])) and torch.equal(got[2], torch.zeros_like(got[2]))


def test_module_form():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 9, generator=g, dtype=torch.float64)
    t = torch.randn(4, 6, generator=g, dtype=torch.float64)
    table = random_table(g, 9, 6, 4)
    module = fastkd.ULDLoss(hybrid=table, hybrid_beta=0.3, hybrid_weights=(0.5, 0.5), teacher_temperature=2.0)
    expected = fastkd.uld_loss(s, t, hybrid=table, hybrid_beta=0.3, hybrid_weights=(0.5, 0.5),
                               teacher_temperature=2.0)
    torch.testing.assert_close(module(s, t), expected, rtol=0, atol=0)
    assert "hybrid=" not in repr(module).replace("hybrid_", "")


BAD_TABLES = [
    ([[0, 1]], r"an \(M, 2\) int64 tensor, got list"),
    (torch.tensor([[0, 1]], dtype=torch.int32), "int64"),
    (torch.tensor([0, 1]), r"\(M, 2\)"),
    (torch.tensor([[0, 1, 2]]), r"\(M, 2\)"),
    (torch.tensor([[5, 1]]), r"hybrid\[:, 0\].*student"),
    (torch.tensor([[-1, 1]]), r"hybrid\[:, 0\].*student"),
    (torch.tensor([[0, 4]]), r"hybrid\[:, 1\].*teacher"),
    (torch.tensor([[0, 1], [0, 2]]), r"hybrid\[:, 0\].*more than once"),
    (torch.tensor([[0, 1], [2, 1]]), r"hybrid\[:, 1\].*more than once"),
]


@pytest.mark.parametrize(("table", "message"), BAD_TABLES)
@pytest.mark.parametrize("function", [fastkd.uld_loss, reference_uld.uld_loss])
def test_bad_tables_raise(function, table, message):
    s, t = torch.randn(2, 5), torch.randn(2, 4)
    with pytest.raises(ValueError, match="hybrid") as raised:
        function(s, t, hybrid=table)
    assert raised.match(message)


@pytest.mark.parametrize("options", [
    dict(hybrid_beta=1.5), dict(hybrid_beta=-0.1), dict(hybrid_beta=math.nan), dict(hybrid_weights=(1.0,)),
    dict(hybrid_weights=(-1.0, 1.0)), dict(hybrid_weights=(1.0, math.inf)), dict(hybrid_weights="ab"),
])
def test_bad_hybrid_options_raise(options):
    s, t = torch.randn(2, 5), torch.randn(2, 4)
    name = next(iter(options))
    with pytest.raises(ValueError, match=name):
        fastkd.uld_loss(s, t, hybrid=torch.tensor([[0, 1]]), **options)
    with pytest.raises(ValueError, match=name):
        fastkd.ULDLoss(**options)


def test_module_rejects_a_bad_table_at_construction():
    with pytest.raises(ValueError, match="hybrid"):
        fastkd.ULDLoss(hybrid=torch.tensor([[0, 1], [0, 2]]))
    with pytest.raises(ValueError, match="hybrid"):
        fastkd.ULDLoss(hybrid=torch.tensor([[0.0, 1.0]]))
