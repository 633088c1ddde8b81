"""Multi-teacher divergence (docs/spec.md §1): mixture target, reference and fused kernels vs float64."""

from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd._divergence_options import kernel_divergence
from fastkd.mixture import MIXTURE_KERNELS
from fastkd.reference import mixture as reference_mt
from tests.common_checks import (
    check_student_parity,
    explicit_divergence,
    reference_in_summation_orders,
    row_exclusion_kwargs,
)
from tests.helpers import DEVICE, assert_matches

DIVERGENCES = ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (K, N..., V)
SHAPES = ((1, (1,), 1), (2, (3,), 7), (3, (41,), 1271), (3, (2,), 5000), (2, (2, 3), 257))
UPSTREAM = 0.7
HAS_OP = fastkd._ops.has_kernel("mixture_divergence_forward", "CPU")
# The Triton interpreter runs one program (row) after another, milliseconds
# per loop iteration: on CPU tensors the triton backend gets at most this many
# rows of each shape (its V, K and the chunking of V stay as given).
INTERPRETER_MAX_ROWS = 5


def kernel_params():
    params = []
    for name in MIXTURE_KERNELS:
        status = fastkd._dispatch.backend_status(name, DEVICE.type)
        marks = () if status.available else (pytest.mark.skip(reason=f"{name}: {status.reason}"),)
        params.append(pytest.param(name, marks=marks, id=name))
    none = pytest.param("none", marks=pytest.mark.skip(reason=f"no multi-teacher kernel on {DEVICE.type}"))
    return params or [none]


def interpreter_rows(backend, lead):
    """``lead`` (the student's leading dims), its first dim capped for the Triton interpreter."""
    if backend == "triton" and DEVICE.type == "cpu":
        return (min(lead[0], INTERPRETER_MAX_ROWS), *lead[1:])
    return lead


def raw_forward(backend):
    """(the backend's function with the contract of fastkd::mixture_divergence_forward,
    the exception its argument checks raise)."""
    if backend == "triton":
        from fastkd.kernels import mixture

        return mixture.mixture_divergence_forward, ValueError
    return torch.ops.fastkd.mixture_divergence_forward, RuntimeError


def logits(shape, dtype=torch.float32, spread=3.0):
    return (torch.randn(shape, dtype=torch.float64) * spread).to(device=DEVICE, dtype=dtype)


def random_weights(count: int) -> torch.Tensor:
    w = torch.rand(count, dtype=torch.float64) + 0.1
    return w / w.sum()


def check_parity(backend, s, t, weights, **kwargs):
    """fastkd on ``backend`` vs the float64 reference (and the reference in s.dtype as baseline)."""
    t64 = t.double()
    check_student_parity(
        backend, lambda a: fastkd.divergence(a, t, teacher_weights=weights, backend=backend, **kwargs),
        lambda a: reference_mt.mixture_divergence(a, t64, weights, **kwargs), s,
        reference_in_input_dtype(s, t, weights, **kwargs),
    )


def reference_in_input_dtype(s, t, weights, samples=3, **kwargs):
    """The reference from the same ``s.dtype`` inputs in ``samples`` summation
    orders (vocabulary permuted alike in student and teachers)."""
    return reference_in_summation_orders(
        lambda perm, inverse: lambda a: reference_mt.mixture_divergence(a, t[..., perm], weights, **kwargs),
        s, samples,
    )


# ---- the reference against the formulas written out ----------------------------


def explicit_row_divergence(p, q, divergence, beta=0.5, alpha=0.1):
    """(N,) from probabilities, float64, docs/spec.md §1 as written (0 log 0 = 0)."""
    return explicit_divergence(p, q, divergence, beta, alpha)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_reference_equals_written_out_mixture(divergence):
    t = logits((3, 6, 40), torch.float64)
    s = logits((6, 40), torch.float64)
    w = random_weights(3)
    p = sum(w[k] * torch.softmax(t[k] / 1.5, dim=-1) for k in range(3))
    q = torch.softmax(s / 1.5, dim=-1)
    got = reference_mt.mixture_divergence(
        s, t, w, divergence=divergence, temperature=1.5, scale=1.0, reduction="none"
    )
    torch.testing.assert_close(got, explicit_row_divergence(p, q, divergence), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(reference_mt.mixture_log_probs(t, w, 1.5).exp(), p, rtol=1e-12, atol=1e-15)


# ---- parity ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_parity_every_divergence_dtype_shape(backend, dtype, divergence, shape):
    count, lead, vocab = shape
    lead = interpreter_rows(backend, lead)
    s = logits((*lead, vocab), dtype)
    t = logits((count, *lead, vocab), dtype)
    check_parity(backend, s, t, random_weights(count), divergence=divergence, temperature=2.0)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("temperature", (0.05, 1.0, 4.0, 100.0))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_parity_temperatures(backend, temperature, divergence):
    s, t = logits((5, 300)), logits((3, 5, 300))
    check_parity(backend, s, t, random_weights(3), divergence=divergence, temperature=temperature)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("reduction", ("batchmean", "sum", "mean", "none"))
@pytest.mark.parametrize("selector", ("all", "labels", "mask", "both"))
def test_parity_reductions_and_row_exclusion(backend, reduction, selector):
    s, t = logits((3, 5, 97)), logits((2, 3, 5, 97))
    kwargs = row_exclusion_kwargs(selector, 97)
    check_parity(backend, s, t, random_weights(2), divergence="jsd", temperature=2.0, reduction=reduction,
                 **kwargs)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_large_logits_neg_inf_and_a_zero_weight(backend, divergence):
    s, t = logits((6, 500), spread=1e4), logits((3, 6, 500), spread=1e4)
    s[0, 3] = -torch.inf
    t[:, 1, 7] = -torch.inf  # no teacher puts mass there
    t[0, 2, 9] = -torch.inf  # one does not
    weights = torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64)  # the third adds nothing
    check_parity(backend, s, t, weights, divergence=divergence, temperature=3.0)
    t[2, 4, 0] = torch.nan  # ... but NaN in it is not dropped (docs/spec.md §6)
    got = fastkd.divergence(s, t, teacher_weights=weights, divergence=divergence, temperature=3.0,
                            backend=backend)
    assert torch.isnan(got)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_one_teacher_equals_single_teacher_divergence(backend, divergence):
    s, t = logits((9, 333)), logits((9, 333))
    mixed = fastkd.divergence(s, t[None], teacher_weights=[1.0], divergence=divergence, temperature=2.0,
                              backend=backend)
    single = fastkd.divergence(s, t, divergence=divergence, temperature=2.0, backend=backend)
    torch.testing.assert_close(mixed, single, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("backend", kernel_params())
def test_identical_teachers_equal_one(backend):
    """A mixture of copies of one teacher is that teacher, whatever the weights."""
    s, t = logits((4, 200)), logits((4, 200))
    mixed = fastkd.divergence(s, torch.stack([t, t, t]), teacher_weights=[0.2, 0.3, 0.5], backend=backend,
                              divergence="reverse_kl", temperature=2.0)
    single = fastkd.divergence(s, t, divergence="reverse_kl", temperature=2.0, backend=backend)
    torch.testing.assert_close(mixed, single, rtol=1e-5, atol=1e-6)
    expanded = t.expand(3, *t.shape)  # stride 0 over the teachers: read-only, so allowed
    mixed = fastkd.divergence(s, expanded, teacher_weights=[0.2, 0.3, 0.5], backend=backend,
                              divergence="reverse_kl", temperature=2.0)
    torch.testing.assert_close(mixed, single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", kernel_params())
def test_non_contiguous_teachers_and_float64(backend):
    # float64 where the backend's dispatch takes it (fastkd._dispatch.KERNEL_DTYPES), else float32
    dtype = torch.float64 if torch.float64 in fastkd._dispatch.KERNEL_DTYPES[backend] else torch.float32
    t = logits((5, 3, 130), dtype).transpose(0, 1)  # (K, N, V) with a permuted stride
    s = logits((5, 2 * 130), dtype)[:, ::2]  # stride 2 along V
    check_parity(backend, s, t, random_weights(3), divergence="skew_reverse_kl", temperature=1.5)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("divergence", ("kl", "reverse_kl", "jsd"))
def test_many_teachers(backend, divergence):
    """K = 11: more teachers than the Triton kernel holds in one tile (groups of 8, an
    online log-sum-exp across groups); one of them of weight 0."""
    s, t = logits((3, 1500)), logits((11, 3, 1500))
    weights = random_weights(11)
    weights[4] = 0.0
    check_parity(backend, s, t, weights / weights.sum(), divergence=divergence, temperature=1.5)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("divergence", ("kl", "jsd"))
@pytest.mark.parametrize("count", (2, 3, 4, 5, 6))
def test_every_teacher_count(backend, dtype, divergence, count):
    """K = 2 to 6 teachers, the last of weight 0 (so 1 to 5 take part). The
    CPU kernel unrolls its log-ratio pass for 2, 3 and 4 teachers of positive
    weight and loops over any other count; V = 1271 leaves 7 tail entries after
    the vector lanes."""
    lead = interpreter_rows(backend, (4,))
    s, t = logits((*lead, 1271), dtype), logits((count, *lead, 1271), dtype)
    weights = random_weights(count)
    weights[-1] = 0.0
    check_parity(backend, s, t, weights / weights.sum(), divergence=divergence, temperature=1.5)
    check_parity(backend, s, t, random_weights(count), divergence=divergence, temperature=1.5)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("layout", ("expanded", "permuted"))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_raw_forward_float64_strided_teachers_and_mask(backend, layout, divergence):
    """The op contract itself in float64 (the kernels compute in float64 for every dtype,
    so they take it even where the dispatch does not route it): teachers with outer
    strides as given (one teacher expanded over K with stride 0, or a permuted
    stack), a masked row, every kind's loss and gradient against the float64
    reference at the float64 tolerance."""
    op, _ = raw_forward(backend)
    s = logits((4, 301), torch.float64)
    if layout == "expanded":
        t = logits((4, 301), torch.float64).expand(4, 4, 301)
    else:
        t = logits((4, 4, 301), torch.float64).transpose(0, 1)
    weights = random_weights(4)
    mask = torch.tensor([True, False, True, True], device=DEVICE)
    kind, coef = kernel_divergence(divergence, 0.3, 0.2)
    loss, grad, row_ce = op(s, t, weights, mask, kind, 1 / 1.7, coef, 0.6, True)
    assert row_ce.shape == (0,)  # no labels
    assert loss.dtype == grad.dtype == torch.float64
    a = s.clone().requires_grad_(True)
    want = reference_mt.mixture_divergence(a, t, weights, divergence=divergence, beta=0.3, alpha=0.2,
                                           temperature=1.7, scale=1.0, reduction="none", mask=mask)
    want.backward(torch.full_like(want, 0.6))
    assert_matches(loss, want, torch.float64, f"{backend} float64 row loss")
    assert_matches(grad, a.grad, torch.float64, f"{backend} float64 grad")
    assert torch.equal(grad[1], torch.zeros_like(grad[1])) and loss[1].item() == 0.0


@pytest.mark.parametrize("backend", kernel_params())
def test_nan_propagates(backend):
    s, t = logits((3, 40)), logits((2, 3, 40))
    t[1, 2, 5] = torch.nan
    assert torch.isnan(fastkd.divergence(s, t, teacher_weights=[0.5, 0.5], backend=backend))


def test_uniform_default_and_module():
    s, t = logits((4, 30)), logits((2, 4, 30))
    uniform = fastkd.divergence(s, t, temperature=2.0)
    explicit = fastkd.divergence(s, t, teacher_weights=torch.tensor([0.5, 0.5]), temperature=2.0)
    torch.testing.assert_close(uniform, explicit)
    module = fastkd.DivergenceLoss(divergence="kl", temperature=2.0)
    torch.testing.assert_close(module(s, t, teacher_weights=[0.5, 0.5]), explicit)


# ---- bad input --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([0.5, 0.6], "sum to 1"),
        ([1.5, -0.5], ">= 0"),
        ([1.0], r"shape \(2,\)"),
        (torch.tensor([1, 0]), "floating point"),
        ([float("nan"), 1.0], "finite"),
        ("ab", "sequence of numbers"),
    ],
)
def test_bad_weights_raise_value_error(weights, match):
    s, t = logits((4, 30)), logits((2, 4, 30))
    with pytest.raises(ValueError, match=match):
        fastkd.divergence(s, t, teacher_weights=weights)


def test_bad_teachers_raise_value_error():
    s = logits((4, 30))
    with pytest.raises(ValueError, match="must be \\(K, \\*student shape\\)"):
        fastkd.divergence(s, logits((2, 4, 31)), teacher_weights=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"^teacher_logits dtype torch.float64 does not match"):
        fastkd.divergence(s, logits((2, 4, 30), torch.float64))
    with pytest.raises(ValueError, match="requires grad"):
        fastkd.divergence(s, logits((2, 4, 30)).requires_grad_(True))
    with pytest.raises(ValueError, match="K >= 1"):
        fastkd.divergence(s, logits((0, 4, 30)))
    with pytest.raises(ValueError, match="must be \\(K, \\*student shape\\)"):
        fastkd.divergence(s, logits((4, 30)), teacher_weights=[1.0])  # weights but one teacher, no K dim


def test_explicit_backend_without_kernel_raises(monkeypatch):
    monkeypatch.setattr(fastkd.mixture, "MIXTURE_KERNELS", ("cpu",))
    s, t = logits((2, 10)), logits((2, 2, 10))
    with pytest.raises(ValueError, match="no multi-teacher divergence kernel"):
        fastkd.divergence(s, t, backend="triton")


# ---- the op itself --------------------------------------------------------------------


@pytest.mark.parametrize("backend", kernel_params())
def test_op_checks_its_arguments(backend):
    """The checks of the op / launcher itself, before any kernel runs."""
    op, error = raw_forward(backend)
    s, t = logits((2, 10)), logits((2, 2, 10))
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    with pytest.raises(error, match="sum to 1"):
        op(s, t, torch.tensor([0.5, 0.6], dtype=torch.float64), None, 0, 1.0, 0.0, 1.0, True)
    with pytest.raises(error, match=">= 0"):
        op(s, t, torch.tensor([1.5, -0.5], dtype=torch.float64), None, 0, 1.0, 0.0, 1.0, True)
    with pytest.raises(error, match="one entry per teacher"):
        op(s, t, torch.tensor([1.0], dtype=torch.float64), None, 0, 1.0, 0.0, 1.0, True)
    with pytest.raises(error, match=r"^teacher_weights must be (a )?float64"):
        op(s, t, w.float(), None, 0, 1.0, 0.0, 1.0, True)
    with pytest.raises(error, match="at least one teacher"):
        op(s, t[:0], w[:0], None, 0, 1.0, 0.0, 1.0, True)
    with pytest.raises(error, match="same dtype"):
        op(s, t.half(), w, None, 0, 1.0, 0.0, 1.0, True)
    with pytest.raises(error, match=r"must be \(K|must be \[K"):
        op(s, t[:, :1], w, None, 0, 1.0, 0.0, 1.0, True)
    with pytest.raises(error, match="unit stride"):
        op(s, logits((2, 2, 20))[..., ::2], w, None, 0, 1.0, 0.0, 1.0, True)
    with pytest.raises(error, match="row_mask"):
        op(s, t, w, torch.ones(3, dtype=torch.bool, device=DEVICE), 0, 1.0, 0.0, 1.0, True)
    with pytest.raises(error, match=r"^kind must be (an int )?in \[0, 6\)"):
        op(s, t, w, None, 6, 1.0, 0.0, 1.0, True)
    with pytest.raises(error, match="inv_temperature"):
        op(s, t, w, None, 0, 0.0, 0.0, 1.0, True)
    with pytest.raises(error, match=r"^coef \(beta\) must be in \(0, 1\)"):
        op(s, t, w, None, 2, 1.0, 1.0, 1.0, True)
    with pytest.raises(error, match="grad_scale"):
        op(s, t, w, None, 0, 1.0, 0.0, float("nan"), True)


@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cpu", marks=pytest.mark.skipif(not HAS_OP, reason="no CPU extension")),
        pytest.param("cuda", marks=pytest.mark.skipif(
            DEVICE.type != "cuda" or not fastkd._ops.has_kernel("mixture_divergence_forward", "CUDA"),
            reason="no CUDA kernel on this device")),
    ],
)
@pytest.mark.parametrize("student_grad", (True, False))
def test_opcheck(device, student_grad):
    s, t = torch.randn(5, 33, device=device), torch.randn(3, 5, 33, device=device)
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, True], device=device)
    torch.library.opcheck(
        torch.ops.fastkd.mixture_divergence_forward, (s, t, weights, mask, 2, 0.5, 0.3, 0.25, student_grad)
    )


@pytest.mark.parametrize("backend", ["reference", *kernel_params()])
def test_weights_off_by_rounding_are_renormalised(backend):
    # weights summing to 1 + 6e-7 (accepted: within WEIGHT_SUM_TOLERANCE) mix
    # exactly as the same weights divided by their sum, on every backend
    s = torch.randn(4, 37, device=DEVICE)
    t = torch.randn(3, 4, 37, device=DEVICE)
    off = torch.tensor([0.5, 0.3, 0.2000006], dtype=torch.float64)
    exact = off / off.sum()
    kwargs = dict(divergence="jsd", temperature=2.0, backend=backend)
    got = fastkd.divergence(s, t, teacher_weights=off, **kwargs)
    want = fastkd.divergence(s, t, teacher_weights=exact, **kwargs)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("divergence", ("reverse_kl", "jsd", "kl"))
def test_probability_underflowing_in_every_teacher_keeps_its_log(backend, divergence):
    """float32 rows where every teacher puts ~e^−300 on entries that carry the student's
    mass: p underflows float32 there in each teacher and in the mixture, but log p is
    finite, and the reverse KL (~300 per row) and its gradient follow from it."""
    s, t = logits((4, 300)), logits((3, 4, 300))
    t[:, :, :5] -= 600.0  # at T = 2: every teacher's p ~ e^−300 on the first five entries
    s[:, :5] += 20.0  # where the student has nearly all its mass
    check_parity(backend, s, t, random_weights(3), divergence=divergence, temperature=2.0, reduction="none")


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_small_divergence_at_high_temperature_float32(backend, divergence):
    """T = 100, teachers near the student: log p − log q ~ 1e-3 against log p ~ log V,
    so the mixture's log must not carry rounding at the size of log V."""
    s = logits((6, 2000))
    t = s.unsqueeze(0) + 0.1 * logits((3, 6, 2000))
    weights = random_weights(3)
    kwargs = dict(divergence=divergence, temperature=100.0, reduction="none")
    check_parity(backend, s, t, weights, **kwargs)
    # log p − log q is rounded at the size of 1 (or of itself), not of log V as
    # in PyTorch's float32 log_softmax difference: the row losses are at most
    # half as far from float64 as that computation's (measured: 0.21 on CPU)
    got = fastkd.divergence(s, t, teacher_weights=weights, backend=backend, **kwargs).double().cpu()
    want = reference_mt.mixture_divergence(s.double(), t.double(), weights, **kwargs).cpu()
    in_float32 = reference_mt.mixture_divergence(s, t, weights, **kwargs).double().cpu()
    assert (got - want).abs().max() <= 0.5 * (in_float32 - want).abs().max()


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("divergence", ("kl", "reverse_kl", "jsd"))
def test_log_ratio_across_the_underflow_range(backend, divergence):
    """Logits whose (x − max)/T sweep 0 to −120 in steps that cross e^−69.3 = 2^−100 (where
    the CPU float path leaves the ratio p/q of its stored exponentials for the exact
    form) and float32's subnormals (e^−87.3), in the student and in every teacher, in
    vectors that mix both forms and in the tail after them."""
    T, V = 2.0, 16 * 9 + 5
    ramp = torch.linspace(0.0, -240.0, V, dtype=torch.float64)
    s = (ramp + 0.3 * torch.randn(4, V, dtype=torch.float64)).float().to(DEVICE)
    t = (ramp.flip(0) * torch.rand(3, 4, 1, dtype=torch.float64) + torch.randn(3, 4, V, dtype=torch.float64))
    check_parity(backend, s, t.float().to(DEVICE), random_weights(3), divergence=divergence, temperature=T,
                 reduction="none")
