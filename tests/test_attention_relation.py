"""attention_relation_loss (MiniLM / MiniLMv2 self-attention relations).

The oracle is a per-row loop in float64 that builds each row's relation from
the kept keys it selects by index (no masking by −inf, no batched softmax),
independent of the reference's batched formulation.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastkd
from tests.common_checks import check_aot_eager_equals_eager
from tests.helpers import DEVICE, TOLERANCES, assert_matches, backend_params

# the backends with a kernel for this loss on DEVICE, and the reference
BACKENDS = backend_params(include_reference=True)


def dtype_for(backend: str) -> torch.dtype:
    """float64 where the backend takes it; the GPU kernels' widest input, float32, otherwise."""
    return torch.float32 if backend in ("triton", "cuda") else torch.float64


def loop_oracle(s, t, heads, mask=None, causal=False, temperature=1.0):
    """``(B, T)`` row losses: the head-mean KL(teacher ‖ student), 0 on excluded rows, float64."""
    s, t = s.double(), t.double()
    batch, length = s.shape[:2]
    ds, dt = s.shape[2] // heads, t.shape[2] // heads
    rows = [[torch.zeros((), dtype=torch.float64) for _ in range(length)] for _ in range(batch)]
    for b in range(batch):
        for i in range(length):
            if mask is not None and not mask[b, i]:
                continue
            keys = [j for j in range(length) if (mask is None or mask[b, j]) and (not causal or j <= i)]
            total = 0.0
            for a in range(heads):
                xs, xt = s[b, :, a * ds:(a + 1) * ds], t[b, :, a * dt:(a + 1) * dt]
                log_q = torch.log_softmax(xs[keys] @ xs[i] / (math.sqrt(ds) * temperature), 0)
                log_p = torch.log_softmax(xt[keys] @ xt[i] / (math.sqrt(dt) * temperature), 0)
                total = total + (log_p.exp() * (log_p - log_q)).sum()
            rows[b][i] = total / heads
    return torch.stack([torch.stack(row) for row in rows])


def reduce(rows, mask, reduction):
    if reduction == "none":
        return rows
    kept = rows.numel() if mask is None else int(mask.sum())
    return rows.sum() if reduction == "sum" else rows.sum() / max(kept, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 9),
    heads=st.sampled_from([1, 2, 3]),
    widths=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    masked=st.booleans(),
    causal=st.booleans(),
    temperature=st.sampled_from([0.5, 1.0, 3.0]),
    reduction=st.sampled_from(["batchmean", "sum", "none"]),
    seed=st.integers(0, 2**16),
)
def test_matches_the_row_loop_in_float64(backend, batch, length, heads, widths, masked, causal, temperature,
                                         reduction, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, length, heads * widths[0], generator=g, dtype=torch.float64) * 2
    t = torch.randn(batch, length, heads * widths[1], generator=g, dtype=torch.float64) * 2
    mask = None
    if masked:
        mask = torch.rand(batch, length, generator=g) < 0.7
        mask[0] = False  # one fully padded sequence
    expected = reduce(loop_oracle(s, t, heads, mask, causal, temperature), mask, reduction)
    dtype = dtype_for(backend)
    got = fastkd.attention_relation_loss(s.to(DEVICE, dtype), t.to(DEVICE, dtype), num_relation_heads=heads,
                                         mask=None if mask is None else mask.to(DEVICE), causal=causal,
                                         temperature=temperature, reduction=reduction, backend=backend)
    assert got.dtype == dtype
    assert_matches(got.cpu(), expected.detach(), dtype, f"attention_relation_loss {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("length", "causal"), [(7, False), (7, True), (300, True), (70, False)])
def test_gradients_match_the_row_loop(backend, length, causal):
    """Both inputs' gradients against autograd through the row loop, float64, a
    non-unit upstream per row; T = 70 / 300 cross the kernels' row blocks and key tiles."""
    g = torch.Generator().manual_seed(length)
    s = torch.randn(2, length, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, length, 9, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, length, generator=g) < 0.8
    upstream = torch.randn(2, length, generator=g, dtype=torch.float64)
    if length > 100:  # the loop oracle is slow: rows of one sequence only
        mask[1] = False
    dtype = dtype_for(backend)
    s_in, t_in = s.detach().to(DEVICE, dtype).requires_grad_(), t.detach().to(DEVICE, dtype).requires_grad_()
    got = fastkd.attention_relation_loss(s_in, t_in, num_relation_heads=3, mask=mask.to(DEVICE),
                                         causal=causal, reduction="none", backend=backend)
    got_grads = torch.autograd.grad((got * upstream.to(DEVICE, dtype)).sum(), (s_in, t_in))
    expected = loop_oracle(s, t, 3, mask, causal)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (s, t))
    assert_matches(got.detach().cpu(), expected.detach(), dtype, f"rows {backend}")
    for name, a, b in zip(("student", "teacher"), got_grads, expected_grads, strict=True):
        assert_matches(a.cpu(), b, dtype, f"{name} gradient {backend}")


def test_hand_computed_value():
    """A = 1, T = 2, D = 1: a constant student has uniform relations; the
    teacher's first row has scores (1, 0), its second (0, 0)."""
    s = torch.zeros(1, 2, 1, dtype=torch.float64)
    t = torch.tensor([[[1.0], [0.0]]], dtype=torch.float64)
    p = torch.tensor([math.e, 1.0], dtype=torch.float64) / (math.e + 1)
    kl_first = float((p * (p / 0.5).log()).sum())
    got = fastkd.attention_relation_loss(s, t, num_relation_heads=1)
    assert got.item() == pytest.approx(kl_first / 2, rel=1e-12, abs=0)


def test_equal_states_give_zero_and_losses_are_never_negative():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 12, generator=g)
    assert fastkd.attention_relation_loss(x, x, num_relation_heads=4).item() == 0.0
    y = torch.randn(2, 7, 8, generator=g)
    assert (fastkd.attention_relation_loss(x, y, num_relation_heads=4, reduction="none") >= 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_both_inputs(causal):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False, True, True], [False] * 5])
    weights = torch.randn(2, 5, generator=g, dtype=torch.float64)
    for reduction in ("batchmean", "none"):
        def loss(a, b, reduction=reduction):
            out = fastkd.attention_relation_loss(a, b, num_relation_heads=2, mask=mask, causal=causal,
                                                 reduction=reduction)
            return out * weights if reduction == "none" else out
        assert torch.autograd.gradcheck(loss, (s, t))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_against_float64(backend, dtype):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 16, 32, generator=g).to(dtype)
    t = torch.randn(2, 16, 48, generator=g).to(dtype)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 10:] = False
    got = fastkd.attention_relation_loss(s, t, num_relation_heads=4, mask=mask, backend=backend)
    assert got.dtype == torch.float32
    expected = reduce(loop_oracle(s, t, 4, mask), mask, "batchmean").detach()
    rtol, atol = TOLERANCES[dtype]
    assert abs(got.item() - expected.item()) <= atol + rtol * abs(expected.item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_kept_row_gives_zero_with_a_zero_gradient(backend):
    s = torch.randn(2, 3, 4, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss = fastkd.attention_relation_loss(s, torch.randn(2, 3, 4), num_relation_heads=2, mask=mask,
                                          backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


def test_module_form():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 12, generator=g)
    module = fastkd.AttentionRelationLoss(4, causal=True, temperature=2.0)
    expected = fastkd.attention_relation_loss(s, t, num_relation_heads=4, causal=True, temperature=2.0)
    assert torch.equal(module(s, t), expected)
    with pytest.raises(ValueError, match="num_relation_heads must be an int >= 1"):
        fastkd.AttentionRelationLoss(0)


BAD = [
    (dict(num_relation_heads=3), "student_states width 8 must be a positive multiple of num_relation_heads"),
    (dict(num_relation_heads=True), "num_relation_heads must be an int >= 1"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(reduction="mean"), "reduction must be one of"),
    (dict(causal=1), "causal must be a bool"),
    (dict(mask=torch.ones(2, 4)), "mask must be a bool tensor"),
    (dict(mask=torch.ones(2, 5, dtype=torch.bool)), r"mask shape \(2, 5\) must be the states' \(B, T\)"),
    (dict(teacher_states=torch.randn(2, 5, 8)), r"teacher_states \(B, T\) \(2, 5\) does not match"),
    (dict(teacher_states=torch.randn(2, 4, 8, dtype=torch.float64)), "teacher_states dtype torch.float64"),
    (dict(student_states=torch.randn(8, 4)), "student_states must have at least 3 dim"),
    (dict(backend="cuda"), "backend='cuda' (has no attention_relation_loss kernel yet|is unavailable)"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[m[:30] for _, m in BAD])
def test_bad_arguments_raise_value_error_naming_them(change, message):
    kwargs = dict(student_states=torch.randn(2, 4, 8), teacher_states=torch.randn(2, 4, 12),
                  num_relation_heads=4)
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        fastkd.attention_relation_loss(**kwargs)


@pytest.mark.skipif(fastkd._ops.CPU_EXTENSION_ERROR is not None, reason="no cpu extension")
def test_opcheck_of_the_cpu_ops():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    t = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, False, True, True, True], [True] * 5])
    args = (s, t, 2, mask, True, 1.5)
    torch.library.opcheck(torch.ops.fastkd.attention_relation_forward, args)
    _, lse_s, lse_t, kl = torch.ops.fastkd.attention_relation_forward(*args)
    row_grad = torch.randn(2, 5, generator=g, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastkd.attention_relation_backward,
                          (row_grad, *args, lse_s, lse_t, kl, True, True))


@pytest.mark.skipif(fastkd._ops.CPU_EXTENSION_ERROR is not None, reason="no cpu extension")
def test_compiles_with_fullgraph():
    g = torch.Generator().manual_seed(6)
    s = torch.randn(2, 9, 8, generator=g, requires_grad=True)
    t = torch.randn(2, 9, 12, generator=g)

    def loss(a, b):
        return fastkd.attention_relation_loss(a, b, num_relation_heads=4, causal=True, backend="cpu")

    check_aot_eager_equals_eager(loss, s, t)
