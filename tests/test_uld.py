"""uld_loss (Universal Logit Distillation across vocabularies), docs/spec.md §1.14.

The oracle is a per-row loop in float64 that takes the loss from explicitly
sorted and padded rows and the gradient from the rank-count formula of the
spec (tied entries share the mean of their ranks' signs, sign(0) = 0) —
independent of the reference's run-averaging through ``torch.sort``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkd
import fastkd.functional
import fastkd.losses
from fastkd import uld as uld_module
from fastkd.reference import uld as reference_uld
from tests.common_checks import check_aot_eager_equals_eager
from tests.helpers import DEVICE, TOLERANCES, assert_matches, backend_params

# the backends with a kernel for this loss on DEVICE, and the reference
BACKENDS = backend_params(include_reference=True)
HAS_CPU_OP = uld_module.HAS_CPU_OP


def dtype_for(backend: str) -> torch.dtype:
    """float64 where the backend takes it; the GPU kernels' widest input, float32, otherwise."""
    return torch.float32 if backend in ("triton", "cuda") else torch.float64


def rank_coefficients(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """dℓ/dx of ℓ = Σ_k |sort↓(x)_k − sort↓(other)_k| for one row, by counting ranks:
    of the n ranks a value v's run occupies, B_gt − A face a larger value of
    ``other`` and A + n − B_ge a smaller one."""
    coef = torch.empty_like(x)
    for j, v in enumerate(x.tolist()):
        above_self = int((x > v).sum())
        run = int((x == v).sum())
        other_gt, other_ge = int((other > v).sum()), int((other >= v).sum())
        below = min(max(above_self + run - other_ge, 0), run)
        above = min(max(other_gt - above_self, 0), run)
        coef[j] = (below - above) / run
    return coef


def loop_oracle(s, t, student_temperature=1.0, teacher_temperature=1.0, mask=None):
    """``(rows (N,), dℓ_i/ds (N, V_s), dℓ_i/dt (N, V_t))`` in float64, zero on excluded rows."""
    s, t = s.double(), t.double()
    rows = torch.zeros(s.shape[0], dtype=torch.float64)
    grad_s, grad_t = torch.zeros_like(s), torch.zeros_like(t)
    width = max(s.shape[1], t.shape[1])
    for i in range(s.shape[0]):
        if mask is not None and not mask[i]:
            continue
        p = torch.softmax(s[i] / student_temperature, 0)
        q = torch.softmax(t[i] / teacher_temperature, 0)
        a = sorted(p.tolist(), reverse=True) + [0.0] * (width - p.numel())
        b = sorted(q.tolist(), reverse=True) + [0.0] * (width - q.numel())
        rows[i] = sum(abs(x - y) for x, y in zip(a, b, strict=True))
        g, h = rank_coefficients(p, q), rank_coefficients(q, p)
        grad_s[i] = p * (g - (p * g).sum()) / student_temperature
        grad_t[i] = q * (h - (q * h).sum()) / teacher_temperature
    return rows, grad_s, grad_t


def reduce(rows, mask, reduction):
    if reduction == "none":
        return rows
    kept = rows.numel() if mask is None else int(mask.sum())
    return rows.sum() if reduction == "sum" else rows.sum() / max(kept, 1)


def tied_logits(generator, rows, width, dtype=torch.float64):
    """Logits with many exact ties (few distinct values) and some −inf entries."""
    x = torch.randint(-2, 3, (rows, width), generator=generator).to(dtype) * 0.75
    x = torch.where(torch.rand(rows, width, generator=generator) < 0.15, -math.inf, x)
    x[:, 0] = 0.5  # never an all −inf row
    return x


def run(backend, s, t, dtype, upstream=None, **kwargs):
    """``(loss, grad_s, grad_t)`` of ``backend`` on ``dtype`` copies of float64 ``s``, ``t``."""
    s_in = s.detach().to(DEVICE, dtype).requires_grad_()
    t_in = t.detach().to(DEVICE, dtype).requires_grad_()
    if "mask" in kwargs and kwargs["mask"] is not None:
        kwargs["mask"] = kwargs["mask"].to(DEVICE)
    loss = fastkd.uld_loss(s_in, t_in, backend=backend, **kwargs)
    weighted = loss if upstream is None else loss * upstream.to(DEVICE, loss.dtype)
    grads = torch.autograd.grad(weighted.sum(), (s_in, t_in))
    return loss.detach().cpu(), grads[0].cpu(), grads[1].cpu()


def check_rows(backend, s, t, expected, upstream, **kwargs):
    """``backend``'s per-row losses (``reduction="none"``) and both gradients
    under the per-row ``upstream`` match ``expected = (rows, d rows/ds, d rows/dt)``."""
    rows, grad_s, grad_t = expected
    dtype = dtype_for(backend)
    got, got_s, got_t = run(backend, s, t, dtype, upstream, reduction="none", **kwargs)
    assert got.dtype == dtype
    assert_matches(got, rows, dtype, f"rows {backend}", elementwise=True)
    assert_matches(got_s, grad_s * upstream[:, None], dtype, f"student gradient {backend}")
    assert_matches(got_t, grad_t * upstream[:, None], dtype, f"teacher gradient {backend}")


SHAPES = [(5, 9), (9, 5), (7, 7), (1, 6), (6, 1), (130, 300)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("vs", "vt"), SHAPES)
@pytest.mark.parametrize("ties", [False, True])
def test_matches_the_loop_oracle(backend, vs, vt, ties):
    """Rows and both gradients, a non-unit upstream per row, temperatures, a mask,
    −inf entries and (``ties``) many exactly tied probabilities."""
    g = torch.Generator().manual_seed(vs * 1000 + vt + ties)
    n = 4
    if ties:
        s, t = tied_logits(g, n, vs), tied_logits(g, n, vt)
    else:
        s = torch.randn(n, vs, generator=g, dtype=torch.float64) * 2
        t = torch.randn(n, vt, generator=g, dtype=torch.float64) * 2
        if vs > 1:
            s[1, 0] = -math.inf
        if vt > 1:
            t[2, -1] = -math.inf
    mask = torch.tensor([True, True, True, False])
    upstream = torch.randn(n, generator=g, dtype=torch.float64)
    temps = dict(student_temperature=0.7, teacher_temperature=2.5)
    rows, grad_s, grad_t = loop_oracle(s, t, mask=mask, **temps)
    check_rows(backend, s, t, (rows, grad_s, grad_t), upstream, mask=mask, **temps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_reductions(backend, reduction):
    g = torch.Generator().manual_seed(7)
    s = torch.randn(6, 11, generator=g, dtype=torch.float64)
    t = torch.randn(6, 17, generator=g, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, False, True])
    rows, grad_s, grad_t = loop_oracle(s, t, mask=mask)
    dtype = dtype_for(backend)
    got, got_s, got_t = run(backend, s, t, dtype, reduction=reduction, mask=mask)
    factor = 1.0 if reduction in ("sum", "none") else 1.0 / 4
    assert_matches(got, reduce(rows, mask, reduction), dtype, f"loss {backend}")
    assert_matches(got_s, grad_s * factor, dtype, f"student gradient {backend}")
    assert_matches(got_t, grad_t * factor, dtype, f"teacher gradient {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_probabilities_share_the_mean_of_their_ranks_signs(backend):
    """p = (0.4, 0.4, 0.2) against q = (0.5, 0.3, 0.15, 0.05): the signs of the ranks
    are (−1, +1, +1, −1); the tied pair shares (−1 + 1) / 2 = 0, so
    dℓ/dp = (0, 0, 1) and dℓ/ds = p (g − Σ p g) = (−0.08, −0.08, 0.16),
    whichever of the pair a sort puts first."""
    s = torch.tensor([[0.4, 0.4, 0.2]], dtype=torch.float64).log()
    t = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64).log()
    dtype = dtype_for(backend)
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        loss, grad_s, grad_t = run(backend, s[:, order], t, dtype)
        assert loss.item() == pytest.approx(0.3, abs=1e-6)
        expected = torch.tensor([[-0.08, -0.08, 0.16]], dtype=torch.float64)[:, order]
        assert_matches(grad_s, expected, dtype, f"student gradient {backend} order {order}")
        assert grad_s[0, order.index(0)] == grad_s[0, order.index(1)]
        # teacher: signs (+1, −1, −1, +1), no ties
        q = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
        h = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
        assert_matches(grad_t, (q * (h - (q * h).sum()))[None], dtype, f"teacher gradient {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_sorted_values_have_a_zero_sign(backend):
    """sign(0) = 0: a row against itself (or against a permutation of itself, padded
    with −inf entries) has loss 0 and exactly zero gradients."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 8, generator=g, dtype=torch.float64)
    dtype = dtype_for(backend)
    loss, grad_s, grad_t = run(backend, s, s, dtype, reduction="none")
    assert torch.equal(loss, torch.zeros(3, dtype=dtype))
    assert torch.equal(grad_s, torch.zeros_like(grad_s)) and torch.equal(grad_t, torch.zeros_like(grad_t))
    # uniform rows of different lengths: 4 × 1/4 against 6 × 1/6
    # (and a uniform row has no direction to move in: zero gradients up to rounding)
    loss, grad_s, grad_t = run(backend, torch.zeros(1, 4), torch.full((1, 6), 3.0), dtype)
    assert loss.item() == pytest.approx(2 / 3, abs=1e-6)
    assert_matches(grad_s, torch.zeros(1, 4), dtype, f"uniform student gradient {backend}")
    assert_matches(grad_t, torch.zeros(1, 6), dtype, f"uniform teacher gradient {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_with_impossible_entries_changes_nothing(backend):
    """Extra −inf logits are zero probabilities, which the zero padding already
    supplies: the loss and the other entries' gradients are unchanged and theirs is 0."""
    g = torch.Generator().manual_seed(4)
    s = torch.randn(3, 6, generator=g, dtype=torch.float64)
    t = torch.randn(3, 9, generator=g, dtype=torch.float64)
    wide = torch.cat([s, torch.full((3, 5), -math.inf, dtype=torch.float64)], 1)
    dtype = dtype_for(backend)
    loss, grad_s, _ = run(backend, s, t, dtype, reduction="none")
    loss_wide, grad_wide, _ = run(backend, wide, t, dtype, reduction="none")
    assert_matches(loss_wide, loss.double(), dtype, f"rows {backend}")
    assert_matches(grad_wide[:, :6], grad_s.double(), dtype, f"student gradient {backend}")
    assert torch.equal(grad_wide[:, 6:], torch.zeros_like(grad_wide[:, 6:]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_kept_row_without_a_distribution(backend):
    """All −inf: the reference raises ValueError, the kernels give NaN for that row
    only (an excluded all −inf row is 0 with a zero gradient everywhere)."""
    s = torch.randn(3, 5, dtype=torch.float64)
    t = torch.randn(3, 4, dtype=torch.float64)
    s[1] = -math.inf
    dtype = dtype_for(backend)
    excluded = run(backend, s, t, dtype, reduction="none", mask=torch.tensor([True, False, True]))
    assert torch.isfinite(excluded[0]).all() and excluded[0][1] == 0
    assert torch.isfinite(excluded[1]).all() and torch.equal(excluded[1][1], torch.zeros(5, dtype=dtype))
    if backend == "reference":
        with pytest.raises(ValueError, match="entirely -inf"):
            run(backend, s, t, dtype, reduction="none")
        return
    loss, grad_s, grad_t = run(backend, s, t, dtype, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    assert torch.isnan(grad_s[1]).all() and torch.isfinite(grad_s[[0, 2]]).all()
    assert torch.isnan(grad_t[1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logit_gives_a_nan_row(backend):
    s = torch.randn(2, 5, dtype=torch.float64)
    s[0, 2] = math.nan
    loss, _, _ = run(backend, s, torch.randn(2, 6, dtype=torch.float64), dtype_for(backend), reduction="none")
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_empty_batch_and_no_kept_row_give_zero(backend, reduction):
    dtype = dtype_for(backend)
    loss, grad_s, grad_t = run(backend, torch.zeros(0, 5), torch.zeros(0, 3), dtype, reduction=reduction)
    assert loss.shape == ((0,) if reduction == "none" else ()) and (loss == 0).all()
    assert grad_s.shape == (0, 5) and grad_t.shape == (0, 3)
    mask = torch.zeros(2, dtype=torch.bool)
    loss, grad_s, grad_t = run(backend, torch.randn(2, 5), torch.randn(2, 3), dtype, reduction=reduction,
                               mask=mask)
    assert (loss == 0).all() and not grad_s.any() and not grad_t.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_against_float64(backend, dtype):
    """bf16 / fp16 logits (with their many exact ties) against the float64 oracle of
    the same rounded values; the loss in float32, gradients in the input dtype."""
    g = torch.Generator().manual_seed(5)
    s = (torch.randn(5, 40, generator=g) * 3).to(dtype).double()
    t = (torch.randn(5, 64, generator=g) * 3).to(dtype).double()
    rows, grad_s, grad_t = loop_oracle(s, t, 1.5, 0.8)
    loss, got_s, got_t = run(backend, s, t, dtype, reduction="sum", student_temperature=1.5,
                             teacher_temperature=0.8)
    assert loss.dtype == torch.float32 and got_s.dtype == dtype and got_t.dtype == dtype
    rtol, atol = TOLERANCES[dtype]
    assert abs(loss.item() - rows.sum().item()) <= atol + rtol * rows.sum().item()
    assert_matches(got_s, grad_s, dtype, f"student gradient {backend}")
    assert_matches(got_t, grad_t, dtype, f"teacher gradient {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_without_requires_grad_gets_none_and_the_student_the_same(backend):
    g = torch.Generator().manual_seed(6)
    dtype = dtype_for(backend)
    s = torch.randn(4, 7, generator=g, dtype=dtype, device=DEVICE, requires_grad=True)
    t = torch.randn(4, 10, generator=g, dtype=dtype, device=DEVICE)
    loss = fastkd.uld_loss(s, t, backend=backend)
    loss.backward()
    _, grad_s, _ = run(backend, s.detach().double(), t.double(), dtype)
    assert t.grad is None and torch.equal(s.grad.cpu(), grad_s)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id != "reference"])
def test_non_contiguous_inputs(backend):
    g = torch.Generator().manual_seed(8)
    dtype = dtype_for(backend)
    s = torch.randn(9, 4, generator=g, dtype=torch.float64)
    t = torch.randn(4, 20, generator=g, dtype=torch.float64)[:, ::2]
    expected = loop_oracle(s.t(), t)
    loss, grad_s, grad_t = run(backend, s.t(), t, dtype, reduction="none")
    assert_matches(loss, expected[0], dtype, f"rows {backend}")
    assert_matches(grad_s, expected[1], dtype, f"student gradient {backend}")
    assert_matches(grad_t, expected[2], dtype, f"teacher gradient {backend}")
    # an expanded (row stride 0) teacher
    row = torch.randn(1, 6, generator=g, dtype=torch.float64)
    loss, _, _ = run(backend, s.t(), row.expand(4, 6), dtype, reduction="none")
    assert_matches(loss, loop_oracle(s.t(), row.expand(4, 6).contiguous())[0], dtype, f"expanded {backend}")


def test_reference_gradcheck_both_inputs():
    g = torch.Generator().manual_seed(9)
    s = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, False, True])
    for reduction in ("batchmean", "none"):
        def loss(a, b, reduction=reduction):
            out = reference_uld.uld_loss(a, b, mask=mask, reduction=reduction, student_temperature=1.3)
            return out * torch.arange(1.0, 4.0, dtype=torch.float64) if reduction == "none" else out
        assert torch.autograd.gradcheck(loss, (s, t))


@pytest.mark.skipif(not HAS_CPU_OP, reason="no cpu uld op in the extension")
def test_cpu_gradcheck_both_inputs():
    g = torch.Generator().manual_seed(10)
    s = torch.randn(3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    for reduction in ("sum", "none"):
        def loss(a, b, reduction=reduction):
            out = fastkd.uld_loss(a, b, reduction=reduction, teacher_temperature=0.6, backend="cpu")
            return out * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) if reduction == "none" else out
        assert torch.autograd.gradcheck(loss, (s, t))


@pytest.mark.skipif(not HAS_CPU_OP, reason="no cpu uld op in the extension")
def test_opcheck_of_the_cpu_op():
    g = torch.Generator().manual_seed(11)
    s = torch.randn(4, 6, generator=g, dtype=torch.float64)
    t = torch.randn(4, 9, generator=g, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True])
    for args in ((s, t, mask, 1.0, 0.5, 0.25, True, True),
                 (s.float(), t.float(), None, 2.0, 1.0, 1.0, True, False),
                 (s.bfloat16(), t.bfloat16(), mask, 1.0, 1.0, 1.0, False, True)):
        torch.library.opcheck(torch.ops.fastkd.uld_forward, args)


@pytest.mark.skipif(not HAS_CPU_OP, reason="no cpu uld op in the extension")
def test_cpu_op_checks_its_arguments():
    s, t = torch.randn(3, 4), torch.randn(2, 5)
    with pytest.raises(RuntimeError, match="rows must be aligned"):
        torch.ops.fastkd.uld_forward(s, t, None, 1.0, 1.0, 1.0, True, False)
    with pytest.raises(RuntimeError, match="inv_student_temperature"):
        torch.ops.fastkd.uld_forward(s, torch.randn(3, 5), None, 0.0, 1.0, 1.0, True, False)


@pytest.mark.skipif(not HAS_CPU_OP, reason="no cpu uld op in the extension")
def test_compiles_with_fullgraph():
    g = torch.Generator().manual_seed(12)
    s = torch.randn(5, 9, generator=g, requires_grad=True)
    t = torch.randn(5, 13, generator=g)
    mask = torch.tensor([True, True, False, True, True])

    def loss(a, b):
        return fastkd.uld_loss(a, b, mask=mask, student_temperature=2.0, backend="cpu")

    check_aot_eager_equals_eager(loss, s, t)


def student_and_teacher_logits(g: torch.Generator, rows: int, vs: int, vt: int, tied: bool):
    """Float64 student ``(rows, vs)`` and teacher ``(rows, vt)`` logits drawn from ``g``:
    rows with tied values (:func:`tied_logits`) when ``tied``, else normal with spread 3."""
    if tied:
        return tied_logits(g, rows, vs), tied_logits(g, rows, vt)
    s = torch.randn(rows, vs, generator=g, dtype=torch.float64) * 3
    t = torch.randn(rows, vt, generator=g, dtype=torch.float64) * 3
    return s, t


def uld_sizes(*, min_rows: int, max_vocab: int) -> dict:
    """Hypothesis strategies, by argument name, of a small ULD problem: ``rows`` in
    [min_rows, 4], the student's and the teacher's vocabularies ``vs`` and ``vt`` in
    [1, max_vocab], and the ``seed`` of the generator that draws the logits."""
    return {
        "rows": st.integers(min_rows, 4),
        "vs": st.integers(1, max_vocab),
        "vt": st.integers(1, max_vocab),
        "seed": st.integers(0, 2**16),
    }


@settings(deadline=None, max_examples=40)
@given(
    **uld_sizes(min_rows=1, max_vocab=12),
    tied=st.booleans(),
    temperatures=st.tuples(st.sampled_from([0.5, 1.0, 4.0]), st.sampled_from([0.5, 1.0, 4.0])),
)
def test_reference_properties(rows, vs, vt, tied, temperatures, seed):
    """The reference against the oracle (value and tie-averaged gradients), 0 ≤ ℓ ≤ 2,
    symmetry under swapping the models, invariance under permuting a row."""
    g = torch.Generator().manual_seed(seed)
    s, t = student_and_teacher_logits(g, rows, vs, vt, tied)
    ts, tt = temperatures
    expected, grad_s, grad_t = loop_oracle(s, t, ts, tt)
    s_in, t_in = s.clone().requires_grad_(), t.clone().requires_grad_()
    got = reference_uld.uld_loss(s_in, t_in, student_temperature=ts, teacher_temperature=tt, reduction="none")
    got_s, got_t = torch.autograd.grad(got.sum(), (s_in, t_in))
    assert_matches(got, expected, torch.float64, "rows", elementwise=True)
    assert_matches(got_s, grad_s, torch.float64, "student gradient")
    assert_matches(got_t, grad_t, torch.float64, "teacher gradient")
    assert (got >= 0).all() and (got <= 2 + 1e-12).all()
    swapped = reference_uld.uld_loss(t, s, student_temperature=tt, teacher_temperature=ts, reduction="none")
    assert torch.allclose(swapped, got, rtol=0, atol=1e-15)
    perm = torch.randperm(vs, generator=g)
    permuted = reference_uld.uld_loss(s[:, perm], t, student_temperature=ts, teacher_temperature=tt,
                                      reduction="none")
    assert_matches(permuted, got.detach(), torch.float64, "permuted rows")


@pytest.mark.skipif(not HAS_CPU_OP or DEVICE.type != "cpu", reason="the cpu uld op on cpu tensors")
@settings(deadline=None, max_examples=30)
@given(**uld_sizes(min_rows=0, max_vocab=40), tied=st.booleans(), masked=st.booleans())
def test_cpu_op_matches_the_reference_in_float64(rows, vs, vt, tied, masked, seed):
    g = torch.Generator().manual_seed(seed)
    s, t = student_and_teacher_logits(g, rows, vs, vt, tied)
    mask = (torch.rand(rows, generator=g) < 0.7) if masked else None
    upstream = torch.randn(rows, generator=g, dtype=torch.float64)
    expected = run("reference", s, t, torch.float64, upstream, reduction="none", mask=mask)
    got = run("cpu", s, t, torch.float64, upstream, reduction="none", mask=mask)
    for what, a, b in zip(("rows", "student gradient", "teacher gradient"), got, expected, strict=True):
        assert_matches(a, b, torch.float64, what)


def test_hard_label_mixing_and_parts():
    g = torch.Generator().manual_seed(13)
    s = torch.randn(5, 7, generator=g, dtype=torch.float64)
    t = torch.randn(5, 11, generator=g, dtype=torch.float64)
    labels = torch.tensor([1, -100, 6, 0, 3])
    for backend in [p.values[0] for p in BACKENDS if not p.marks]:
        dtype = dtype_for(backend)
        total, hard, soft = fastkd.uld_loss(
            s.to(DEVICE, dtype), t.to(DEVICE, dtype), labels=labels.to(DEVICE), hard_weight=0.5,
            soft_weight=2.0, return_parts=True, backend=backend)
        keep = labels != -100
        ce = torch.nn.functional.cross_entropy(s[keep], labels[keep])
        uld = loop_oracle(s[keep], t[keep])[0].mean()
        assert_matches(hard, 0.5 * ce, dtype, f"hard part {backend}")
        assert_matches(soft, 2.0 * uld, dtype, f"soft part {backend}")
        assert_matches(total, 0.5 * ce + 2.0 * uld, dtype, f"total {backend}")


def test_module_form():
    g = torch.Generator().manual_seed(14)
    s, t = torch.randn(4, 6, generator=g), torch.randn(4, 9, generator=g)
    module = fastkd.ULDLoss(student_temperature=2.0, reduction="sum")
    expected = fastkd.uld_loss(s, t, student_temperature=2.0, reduction="sum")
    assert torch.equal(module(s, t), expected)
    assert torch.equal(fastkd.losses.ULDLoss()(s, t), fastkd.functional.uld_loss(s, t))
    with pytest.raises(ValueError, match="teacher_temperature must be > 0"):
        fastkd.ULDLoss(teacher_temperature=0.0)


def test_triton_rows_longer_than_a_block():
    """Rows past the triton kernel's register row take the sorted-keys path:
    the reference's loss and gradients through the public function."""
    if not fastkd._dispatch.backend_status("triton", DEVICE.type).available:
        pytest.skip("triton backend unavailable")
    kernels = pytest.importorskip("fastkd.kernels.uld")
    g = torch.Generator().manual_seed(7)
    wide = torch.randn(2, kernels.MAX_VOCAB + 1, generator=g)
    narrow = torch.randn(2, 3, generator=g) * 4
    for s, t in ((wide, narrow), (narrow, wide)):
        got_s, got_t = (x.clone().to(DEVICE).requires_grad_(True) for x in (s, t))
        upstream = torch.tensor([0.7, -1.3], dtype=torch.float64)  # per row, not unit
        got = fastkd.uld_loss(got_s, got_t, reduction="none", backend="triton")
        got.backward(upstream.to(got.device, got.dtype))
        want_s, want_t = s.double().requires_grad_(True), t.double().requires_grad_(True)
        want = reference_uld.uld_loss(want_s, want_t, reduction="none")
        want.backward(upstream)
        for name, a, b in (("loss", got, want), ("grad_s", got_s.grad, want_s.grad),
                           ("grad_t", got_t.grad, want_t.grad)):
            assert_matches(a.detach().cpu(), b.detach(), torch.float32, f"V={tuple(s.shape)} {name}")


BAD = [
    (dict(teacher_logits=torch.randn(3, 5)), "teacher_logits has 3 rows but student_logits has 2"),
    (dict(student_logits=torch.randn(2, 3, 4)), r"student_logits must be 2-D \(N, V_s\)"),
    (dict(teacher_logits=torch.randn(5)), r"teacher_logits must be 2-D \(N, V_t\)"),
    (dict(student_logits=torch.randn(2, 0)), "student_logits must have at least one vocabulary entry"),
    (dict(teacher_logits=torch.randn(2, 5, dtype=torch.float64)), "teacher_logits dtype torch.float64"),
    (dict(student_logits=torch.zeros(2, 4, dtype=torch.int64)), "student_logits must have dtype"),
    (dict(student_logits=[[1.0]]), "student_logits must be a torch.Tensor"),
    (dict(student_temperature=0.0), "student_temperature must be > 0"),
    (dict(teacher_temperature=math.inf), "teacher_temperature must be finite"),
    (dict(student_temperature="1"), "student_temperature must be a real number"),
    (dict(reduction="mean"), "reduction must be one of"),
    (dict(mask=torch.ones(2)), "mask must be a bool tensor"),
    (dict(mask=torch.ones(3, dtype=torch.bool)), r"mask shape \(3,\) must equal"),
    (dict(labels=torch.ones(2)), "labels must be an integer tensor"),
    (dict(hard_weight=1.0), "labels is required when hard_weight > 0"),
    (dict(hard_weight=-1.0), "hard_weight must be >= 0"),
    (dict(labels=torch.tensor([0, 9]), hard_weight=1.0), r"labels of kept rows must lie in \[0, V\)"),
    (dict(return_parts=1), "return_parts must be a bool"),
    (dict(ignore_index=1.5), "ignore_index must be an int"),
    (dict(backend="cuda"), "backend='cuda' (has no uld_loss kernel yet|is unavailable)"),
    (dict(backend="gpu"), "backend"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[m[:30] for _, m in BAD])
def test_bad_arguments_raise_value_error_naming_them(change, message):
    kwargs = dict(student_logits=torch.randn(2, 4), teacher_logits=torch.randn(2, 5))
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        fastkd.uld_loss(**kwargs)
