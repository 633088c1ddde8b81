"""DKD (SPEC §1): the reference against an explicit per-row loop, the fused cpu
op against the float64 reference (loss and gradient), the op itself and the
argument checks."""

from __future__ import annotations

import math

import pytest
import torch

import fastkd
from fastkd import _ops, reference
from tests.helpers import assert_matches

needs_cpu = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR))

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
UPSTREAM = 0.7


def logits(rows, classes, dtype, seed, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    return (spread * torch.randn(rows, classes, generator=g, dtype=torch.float64)).to(dtype)


def targets(rows, classes, seed):
    return torch.randint(0, classes, (rows,), generator=torch.Generator().manual_seed(seed))


def dkd_loop(s, t, y, alpha, beta, temperature):
    """mdistiller's dkd_loss written out element by element (float64, math module):
    b = [p_y, Σ_{j≠y} p_j]; TCKD = Σ b_t log(b_t / b_s); NCKD = KL of the softmaxes
    of z/T − 1000·onehot(y); (α TCKD + β NCKD) T², mean over rows."""
    total = 0.0
    n, c = s.shape
    for i in range(n):
        a_s = [float(s[i, j]) / temperature for j in range(c)]
        a_t = [float(t[i, j]) / temperature for j in range(c)]

        def softmax(a):
            m = max(a)
            e = [math.exp(v - m) for v in a]
            z = sum(e)
            return [v / z for v in e]

        q, p = softmax(a_s), softmax(a_t)
        b_s = [q[y[i]], sum(q[j] for j in range(c) if j != y[i])]
        b_t = [p[y[i]], sum(p[j] for j in range(c) if j != y[i])]
        tckd = sum(bt * math.log(bt / bs) for bt, bs in zip(b_t, b_s, strict=True) if bt > 0)
        off = [1000.0 if j == y[i] else 0.0 for j in range(c)]
        q2 = softmax([v - o for v, o in zip(a_s, off, strict=True)])
        p2 = softmax([v - o for v, o in zip(a_t, off, strict=True)])
        nckd = sum(pj * math.log(pj / qj) for pj, qj in zip(p2, q2, strict=True) if pj > 0)
        total += (alpha * tckd + beta * nckd) * temperature**2
    return total / n


@pytest.mark.parametrize("shape", ((1, 2), (5, 3), (9, 17)))
@pytest.mark.parametrize("params", ((1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 0.0, 0.7)))
def test_reference_matches_explicit_loop(shape, params):
    alpha, beta, temperature = params
    s, t = logits(*shape, torch.float64, 0), logits(*shape, torch.float64, 1)
    y = targets(shape[0], shape[1], 2)
    got = reference.dkd_loss(s, t, y, alpha=alpha, beta=beta, temperature=temperature)
    want = dkd_loop(s, t, y.tolist(), alpha, beta, temperature)
    assert got.dtype == torch.float64
    assert abs(got.item() - want) <= 1e-12 + 1e-10 * abs(want)


def test_reference_log_space_where_probability_space_fails():
    """p_y rounds to 1 in float32: mdistiller's log(1 − p_y) would be log 0; the
    log-space reference stays finite and matches float64."""
    s = torch.tensor([[80.0, 0.0, 1.0]])
    t = torch.tensor([[2.0, 0.0, 1.0]])
    y = torch.tensor([0])
    got = reference.dkd_loss(s, t, y, temperature=1.0)
    want = reference.dkd_loss(s.double(), t.double(), y, temperature=1.0)
    assert torch.isfinite(got)
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())


def run_with_grad(fn, s, t, y, upstream):
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s, t, y)
    loss.backward(upstream.to(loss.dtype) if loss.dim() else torch.tensor(UPSTREAM, dtype=loss.dtype))
    return loss.detach(), s.grad


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ((1, 2), (7, 10), (33, 101)))
@pytest.mark.parametrize("reduction", ("batchmean", "sum", "none"))
@pytest.mark.parametrize("temperature", (4.0, 1.0))
def test_cpu_parity(dtype, shape, reduction, temperature):
    n, c = shape
    s, t, y = logits(n, c, dtype, 3), logits(n, c, dtype, 4), targets(n, c, 5)
    upstream = torch.linspace(0.3, 1.7, n, dtype=torch.float64)
    kwargs = dict(alpha=1.0, beta=8.0, temperature=temperature, reduction=reduction)
    got = run_with_grad(
        lambda a, b, c_: fastkd.dkd_loss(a, b, c_, backend="cpu", **kwargs), s, t, y, upstream
    )
    want = run_with_grad(
        lambda a, b, c_: reference.dkd_loss(a, b, c_, **kwargs), s.double(), t.double(), y, upstream
    )
    same = run_with_grad(lambda a, b, c_: reference.dkd_loss(a, b, c_, **kwargs), s, t, y, upstream)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[1].dtype == dtype
    for name, a, b, c_ in zip(("loss", "grad"), got, want, same, strict=True):
        assert_matches(a, b, dtype, f"cpu dkd {name}", [c_])


@needs_cpu
def test_cpu_non_contiguous_and_large_logits():
    s = logits(12, 40, torch.float32, 6, spread=300.0).t().contiguous().t()
    t = logits(24, 40, torch.float32, 7, spread=300.0)[::2]
    assert not s.is_contiguous() and not t.is_contiguous()
    y = targets(12, 40, 8)
    got = run_with_grad(lambda a, b, c: fastkd.dkd_loss(a, b, c, backend="cpu"), s, t, y, None)
    want = run_with_grad(lambda a, b, c: reference.dkd_loss(a, b, c), s.double(), t.double(), y, None)
    for a, b in zip(got, want, strict=True):
        assert_matches(a, b, torch.float32, "non-contiguous dkd")


@needs_cpu
def test_teacher_gets_no_gradient_and_module_and_auto():
    s, t, y = logits(6, 5, torch.float32, 9), logits(6, 5, torch.float32, 10), targets(6, 5, 11)
    t = t.requires_grad_(True)
    s = s.requires_grad_(True)
    loss = fastkd.dkd_loss(s, t, y)
    loss.backward()
    assert t.grad is None and s.grad is not None
    module = fastkd.DKDLoss(alpha=0.5, beta=2.0, temperature=2.0)
    assert torch.equal(
        module(s, t, y), fastkd.dkd_loss(s, t, y, alpha=0.5, beta=2.0, temperature=2.0, backend="cpu")
    )
    assert "beta=2.0" in repr(module)


@needs_cpu
def test_nan_propagates():
    s, t, y = logits(4, 6, torch.float32, 12), logits(4, 6, torch.float32, 13), targets(4, 6, 14)
    s[1, 3] = float("nan")
    rows = fastkd.dkd_loss(s, t, y, reduction="none", backend="cpu")
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2, 3]]).all()


@needs_cpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_opcheck(dtype):
    s, t, y = logits(5, 7, dtype, 15), logits(5, 7, dtype, 16), targets(5, 7, 17)
    for student_grad in (True, False):
        torch.library.opcheck(
            torch.ops.fastkd.dkd_forward.default,
            (s, t, y, 1.0, 8.0, 0.25, 0.5, student_grad),
            test_utils=("test_schema", "test_faketensor"),
        )


@needs_cpu
def test_op_checks_arguments():
    s, t, y = logits(3, 4, torch.float32, 18), logits(3, 4, torch.float32, 19), targets(3, 4, 20)
    with pytest.raises(RuntimeError, match="labels must lie"):
        torch.ops.fastkd.dkd_forward(s, t, torch.tensor([0, 4, 1]), 1.0, 8.0, 0.25, 1.0, True)
    with pytest.raises(RuntimeError, match="at least 2 classes"):
        torch.ops.fastkd.dkd_forward(s[:, :1], t[:, :1], y * 0, 1.0, 8.0, 0.25, 1.0, True)
    with pytest.raises(RuntimeError, match="inv_temperature"):
        torch.ops.fastkd.dkd_forward(s, t, y, 1.0, 8.0, 0.0, 1.0, True)


@pytest.mark.parametrize(
    "change, match",
    (
        (dict(teacher_logits=torch.zeros(3, 5)), "teacher_logits shape"),
        (dict(student_logits=torch.zeros(3, 1), teacher_logits=torch.zeros(3, 1)), "at least 2 classes"),
        (dict(student_logits=torch.zeros(3)), "student_logits"),
        (dict(labels=torch.tensor([0, 1, 4])), "labels must lie"),
        (dict(labels=torch.tensor([0, -1, 2])), "labels must lie"),
        (dict(labels=torch.zeros(2, dtype=torch.long)), "labels shape"),
        (dict(labels=torch.zeros(3)), "labels must be an integer"),
        (dict(alpha=-1.0), "alpha"),
        (dict(beta=float("inf")), "beta"),
        (dict(temperature=0.0), "temperature"),
        (dict(reduction="mean"), "reduction"),
        (dict(backend="cuda"), "backend"),
    ),
)
def test_bad_arguments(change, match):
    args = dict(
        student_logits=torch.zeros(3, 4), teacher_logits=torch.zeros(3, 4), labels=torch.tensor([0, 1, 3])
    )
    args.update(change)
    with pytest.raises(ValueError, match=match):
        fastkd.dkd_loss(**args)
