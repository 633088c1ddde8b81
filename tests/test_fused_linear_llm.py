"""fastkd.fused_linear_divergence as LLM training uses it (docs/spec.md §1, "Fused linear"):

- under ``torch.autocast`` (bfloat16) with float32 parameters: the loss and
  gradients of a float64 computation on the autocast-cast inputs;
- bfloat16 inputs: chunk logits, softmax and gradient in float32, at least as
  accurate as projecting in float32 with autograd;
- mixed dtypes (a bfloat16 teacher with a float32 student, bfloat16 hidden
  states with a float32 head), each gradient in its input's dtype;
- logit post-processing per model (``logit_scale``, ``final_logit_softcapping``);
- ``return_parts``: every part differentiable, as in ``fastkd.divergence``;
- the matrix-product op ``fastkd::fused_linear_addmm_`` (opcheck, bad inputs).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import _ops, fused_linear, reference
from tests.helpers import DEVICE, backend_params, relative_error

N, H_S, H_T, V = 13, 24, 20, 301
STUDENT = ("student_hidden", "student_weight", "student_bias")
TEACHER = ("teacher_hidden", "teacher_weight", "teacher_bias")


def randn(shape, seed, std=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (std * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).to(DEVICE)


def problem(seed=0, dtype=torch.float32, n=N, h_s=H_S, h_t=H_T, vocab=V, bias=True):
    return dict(
        student_hidden=randn((n, h_s), seed, dtype=dtype),
        student_weight=randn((vocab, h_s), seed + 1, std=h_s**-0.5 * 2, dtype=dtype),
        student_bias=randn((vocab,), seed + 2, dtype=dtype) if bias else None,
        teacher_hidden=randn((n, h_t), seed + 3, dtype=dtype),
        teacher_weight=randn((vocab, h_t), seed + 4, std=h_t**-0.5 * 2, dtype=dtype),
        teacher_bias=randn((vocab,), seed + 5, dtype=dtype) if bias else None,
    )


def labels_for(n, seed, vocab=V):
    y = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    y[1] = -100
    return y


def grads_of(fn, tensors, upstream=None):
    """(loss, grads of the student tensors) of fn(**tensors); each tensor a fresh leaf."""
    tensors = {k: None if v is None else v.detach().clone() for k, v in tensors.items()}
    for name in STUDENT:
        if tensors[name] is not None:
            tensors[name].requires_grad_(True)
    loss = fn(**tensors)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream.to(loss))
    return loss.detach(), tuple(tensors[k].grad for k in STUDENT if tensors[k] is not None)


def float64_oracle(tensors, **kwargs):
    """The reference on the same values in float64."""
    as64 = {k: None if v is None else v.detach().double() for k, v in tensors.items()}
    return grads_of(lambda **x: reference.fused_linear_divergence(**x, **kwargs), as64)


# -- 1. autocast -------------------------------------------------------------

AUTOCAST_CASES = {
    "batchmean": dict(divergence="jsd", beta=0.5),
    "sum": dict(reduction="sum", temperature=2.0),
    "hard+soft": dict(hard_weight=0.3, soft_weight=0.7, divergence="jsd", beta=0.5),
    "none": dict(reduction="none"),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", AUTOCAST_CASES)
def test_autocast_bfloat16_with_float32_parameters(backend, case):
    """The standard mixed-precision set-up: float32 parameters under autocast.

    Autocast casts a linear layer's inputs to bfloat16; the fused head does the
    same, so its loss and gradients are those of a float64 computation on the
    bfloat16-cast inputs (gradients rounded to bfloat16 once, where autocast
    would round them, then returned in float32)."""
    tensors = problem(seed=100)
    labels = labels_for(N, 101)
    kwargs = dict(AUTOCAST_CASES[case], labels=labels)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        got = grads_of(
            lambda **x: fastkd.fused_linear_divergence(**x, backend=backend, chunk_size=4, **kwargs), tensors
        )
    assert got[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in got[1])
    cast = {k: None if v is None else v.to(torch.bfloat16) for k, v in tensors.items()}
    want = float64_oracle(cast, **kwargs)
    assert relative_error(got[0], want[0]) < 1e-5
    for g, w in zip(got[1], want[1], strict=True):
        # one bfloat16 rounding of each gradient entry (2^-8 relative at most)
        assert relative_error(g, w) < 8e-3


def test_autocast_matches_explicit_bfloat16_inputs():
    tensors = problem(seed=110)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        under_autocast = fastkd.fused_linear_divergence(**tensors, temperature=2.0)
    cast = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    assert torch.equal(under_autocast, fastkd.fused_linear_divergence(**cast, temperature=2.0))


def test_autocast_disabled_region_keeps_float32():
    tensors = problem(seed=120)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16), torch.autocast(DEVICE.type, enabled=False):
        inside = fastkd.fused_linear_divergence(**tensors)
    assert torch.equal(inside, fastkd.fused_linear_divergence(**tensors))


# -- 2. bfloat16 precision ---------------------------------------------------

def float32_projection(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=None,
                       teacher_bias=None, **kwargs):
    """Project in float32 with autograd (the chunked losses of TRL do this):
    float32 logits, their divergence and gradient, gradients rounded once to
    the input dtype by the casts' backward."""
    s = F.linear(student_hidden.float(), student_weight.float(), student_bias.float())
    with torch.no_grad():
        t = F.linear(teacher_hidden.float(), teacher_weight.float(), teacher_bias.float())
    return reference.divergence(s, t, **kwargs)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("weight_grad_dtype", (None, torch.float32), ids=("default", "fp32"))
def test_bfloat16_at_least_as_accurate_as_a_float32_projection(backend, weight_grad_dtype):
    tensors = problem(seed=200, dtype=torch.bfloat16, n=96, h_s=64, h_t=64, vocab=2000)
    kwargs = dict(divergence="jsd", beta=0.5)
    exact = float64_oracle(tensors, **kwargs)
    fused = grads_of(
        lambda **x: fastkd.fused_linear_divergence(
            **x, backend=backend, chunk_size=16, weight_grad_dtype=weight_grad_dtype, **kwargs
        ),
        tensors,
    )
    projected = grads_of(lambda **x: float32_projection(**x, **kwargs), tensors)
    for name, a, b, e in zip(("loss", "hidden", "weight", "bias"), (fused[0], *fused[1]),
                             (projected[0], *projected[1]), (exact[0], *exact[1]), strict=True):
        mine, theirs = relative_error(a, e), relative_error(b, e)
        # both round each gradient once to bfloat16; the loss is float32 arithmetic on exact products
        assert mine <= 1.5 * theirs + 1e-7, f"{name}: fused {mine:.2e} vs float32 projection {theirs:.2e}"


# -- 3. mixed dtypes ---------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("reduction", ("batchmean", "none"))
def test_bfloat16_teacher_with_float32_student(backend, reduction):
    tensors = problem(seed=300)
    for name in TEACHER:
        tensors[name] = tensors[name].to(torch.bfloat16)
    labels = labels_for(N, 301)
    kwargs = dict(reduction=reduction, labels=labels, hard_weight=0.5, temperature=2.0)
    got = grads_of(lambda **x: fastkd.fused_linear_divergence(**x, backend=backend, chunk_size=4, **kwargs),
                   tensors)
    want = float64_oracle(tensors, **kwargs)
    assert got[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in got[1])
    for a, e in zip((got[0], *got[1]), (want[0], *want[1]), strict=True):
        assert relative_error(a, e) < 2e-5


@pytest.mark.parametrize("backend", backend_params())
def test_bfloat16_hidden_states_with_float32_head(backend):
    tensors = problem(seed=310)
    tensors["student_hidden"] = tensors["student_hidden"].to(torch.bfloat16)
    tensors["teacher_hidden"] = tensors["teacher_hidden"].to(torch.bfloat16)
    got = grads_of(lambda **x: fastkd.fused_linear_divergence(**x, backend=backend, chunk_size=4), tensors)
    want = float64_oracle(tensors)
    grad_h, grad_w, grad_b = got[1]
    assert grad_h.dtype == torch.bfloat16 and grad_w.dtype == grad_b.dtype == torch.float32
    assert relative_error(got[0], want[0]) < 2e-5
    assert relative_error(grad_h, want[1][0]) < 8e-3  # one bfloat16 rounding
    assert relative_error(grad_w, want[1][1]) < 2e-5 and relative_error(grad_b, want[1][2]) < 2e-5


def test_mixed_dtype_reads_no_full_teacher_logits():
    """A bfloat16 teacher: nothing of N × V size is allocated in float32 besides one chunk."""
    tensors = problem(seed=320, n=64, vocab=500)
    for name in TEACHER:
        tensors[name] = tensors[name].to(torch.bfloat16)
    saved = []
    tensors["student_weight"].requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = fastkd.fused_linear_divergence(**tensors, chunk_size=8)
    assert max(t.numel() for t in saved) < 64 * 500
    loss.backward()


# -- 7. logit_scale and final_logit_softcapping -----------------------------

POST = dict(student_logit_scale=0.8, student_logit_softcapping=3.0, teacher_logit_scale=1.3,
            teacher_logit_softcapping=2.0)


def capped(z, scale, cap):
    z = z * scale
    return z if cap is None else cap * torch.tanh(z / cap)


def test_reference_applies_scale_then_softcapping_per_model():
    tensors = {k: v.double() for k, v in problem(seed=400).items()}
    s = F.linear(tensors["student_hidden"], tensors["student_weight"], tensors["student_bias"])
    t = F.linear(tensors["teacher_hidden"], tensors["teacher_weight"], tensors["teacher_bias"])
    s, t = capped(s, 0.8, 3.0), capped(t, 1.3, 2.0)
    want = reference.divergence(s, t, divergence="jsd", beta=0.4)
    got = reference.fused_linear_divergence(**tensors, divergence="jsd", beta=0.4, **POST)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("reduction", ("batchmean", "none"))
@pytest.mark.parametrize("post", ({}, POST, dict(student_logit_softcapping=30.0),
                                  dict(teacher_logit_scale=0.5)), ids=("plain", "both", "s-cap", "t-scale"))
def test_logit_post_processing_parity(backend, reduction, post):
    tensors = problem(seed=410)
    labels = labels_for(N, 411)
    kwargs = dict(reduction=reduction, labels=labels, hard_weight=0.4, temperature=1.5, **post)
    upstream = torch.linspace(0.5, 1.5, N, dtype=torch.float64) if reduction == "none" else None
    got = grads_of(lambda **x: fastkd.fused_linear_divergence(**x, backend=backend, chunk_size=5, **kwargs),
                   tensors, upstream)
    as64 = {k: v.double() for k, v in tensors.items()}
    want = grads_of(lambda **x: reference.fused_linear_divergence(**x, **kwargs), as64, upstream)
    for a, e in zip((got[0], *got[1]), (want[0], *want[1]), strict=True):
        assert relative_error(a, e) < 2e-5


@pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason="needs the cpu backend (float64)")
@pytest.mark.parametrize("reduction", ("sum", "none"))
def test_logit_post_processing_gradcheck(reduction):
    tensors = {k: v.double() for k, v in problem(seed=420, n=4, h_s=5, h_t=3, vocab=7).items()}
    leaves = [tensors[k].requires_grad_(True) for k in STUDENT]

    def fn(*student):
        return fastkd.fused_linear_divergence(
            *student[:1], student[1], tensors["teacher_hidden"], tensors["teacher_weight"],
            student_bias=student[2], teacher_bias=tensors["teacher_bias"], reduction=reduction,
            divergence="jsd", labels=labels_for(4, 421, vocab=7), hard_weight=0.5, chunk_size=3,
            backend="cpu", **POST,
        )

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize(
    "change, match",
    (
        (dict(student_logit_softcapping=0.0), "student_logit_softcapping"),
        (dict(teacher_logit_softcapping=-1.0), "teacher_logit_softcapping"),
        (dict(student_logit_scale=float("nan")), "student_logit_scale"),
        (dict(teacher_logit_scale=0.0), "teacher_logit_scale"),
        (dict(student_logit_softcapping="3"), "student_logit_softcapping"),
    ),
)
def test_bad_logit_post_processing(change, match):
    with pytest.raises(ValueError, match=match):
        fastkd.fused_linear_divergence(**problem(seed=430), **change)


# -- 9. return_parts ---------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("reduction", ("batchmean", "none"))
@pytest.mark.parametrize("weights", ((2.0, 0.5), (1.0, 0.0), (0.0, 1.0)), ids=("mixed", "hard", "soft"))
def test_return_parts_are_differentiable_like_divergence(backend, reduction, weights):
    """Back-propagating ``w_h · hard + w_s · soft`` gives the reference's gradients,
    as with ``fastkd.divergence(..., return_parts=True)``."""
    tensors = problem(seed=500)
    labels = labels_for(N, 501)
    kwargs = dict(reduction=reduction, labels=labels, hard_weight=0.4, soft_weight=0.6, divergence="jsd")

    def combine(fn):
        def combined(**x):
            total, hard, soft = fn(**x, return_parts=True, **kwargs)
            assert total.requires_grad and hard.requires_grad and soft.requires_grad
            return weights[0] * hard + weights[1] * soft

        return combined

    got = grads_of(combine(lambda **x: fastkd.fused_linear_divergence(**x, backend=backend, chunk_size=4)),
                   tensors)
    as64 = {k: v.double() for k, v in tensors.items()}
    want = grads_of(combine(reference.fused_linear_divergence), as64)
    for a, e in zip((got[0], *got[1]), (want[0], *want[1]), strict=True):
        assert relative_error(a, e) < 2e-5


# -- fastkd::fused_linear_addmm_ ---------------------------------------------

needs_cpu_ops = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR))


@needs_cpu_ops
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("beta", (0.0, 1.0))
def test_addmm_op_opcheck(dtype, beta):
    g = torch.Generator().manual_seed(600)
    out = torch.randn(7, 9, generator=g).to(dtype)
    a = torch.randn(7, 5, generator=g).to(dtype)
    b = torch.randn(9, 5, generator=g).to(dtype).t()  # non-contiguous
    torch.library.opcheck(torch.ops.fastkd.fused_linear_addmm_, (out, a, b, beta))
    want = (beta * out.double() + a.double() @ b.double())
    torch.ops.fastkd.fused_linear_addmm_(out, a, b, beta)
    assert relative_error(out, want) < (1e-2 if dtype == torch.bfloat16 else 1e-6)


@needs_cpu_ops
@pytest.mark.parametrize(
    "out, a, b, beta, match",
    (
        (torch.zeros(3, 4), torch.zeros(3, 2), torch.zeros(3, 4), 0.0, "a @ b must have"),
        (torch.zeros(3, 4), torch.zeros(3, 2, 1), torch.zeros(2, 4), 0.0, "a"),
        (torch.zeros(3, 4), torch.zeros(3, 2, dtype=torch.float64), torch.zeros(2, 4), 0.0, "dtype"),
        (torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64),
         torch.zeros(2, 4, dtype=torch.int64), 0.0, "floating point"),
        (torch.zeros(3, 4), torch.zeros(3, 2), torch.zeros(2, 4), 0.5, "beta must be 0 or 1"),
    ),
    ids=("shape", "dims", "dtype", "integer", "beta"),
)
def test_addmm_op_rejects_bad_inputs(out, a, b, beta, match):
    with pytest.raises((RuntimeError, NotImplementedError), match=match):
        torch.ops.fastkd.fused_linear_addmm_(out, a, b, beta)


@needs_cpu_ops
@pytest.mark.parametrize("reduced", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("operands", ("both", "a", "b"))
@pytest.mark.parametrize("layout", ("weight_t", "row_major"))
@pytest.mark.parametrize("beta", (0.0, 1.0))
def test_addmm_op_reduced_operands_into_float32(reduced, operands, layout, beta):
    """bfloat16 / float16 operands into a float32 out: products summed in float32, no rounding
    of the result to the operands' dtype (out 300 × 700 spans several 128 × 512 tiles)."""
    g = torch.Generator().manual_seed(610)
    m, k, n = 300, 96, 700
    a = torch.randn(m, k, generator=g)
    b = torch.randn(n, k, generator=g).t() if layout == "weight_t" else torch.randn(k, n, generator=g)
    a = a.to(reduced) if operands in ("both", "a") else a
    b = b.to(reduced) if operands in ("both", "b") else b
    out = torch.randn(m, n, generator=g)
    want = beta * out.double() + a.double() @ b.double()
    torch.library.opcheck(torch.ops.fastkd.fused_linear_addmm_, (out.clone(), a, b, beta))
    torch.ops.fastkd.fused_linear_addmm_(out, a, b, beta)
    assert relative_error(out, want) < 1e-6


@needs_cpu_ops
@pytest.mark.parametrize(
    "m, k, n, layout",
    (
        # out no larger than b: out's tiles through a transposed scratch
        (150, 1031, 700, "b_t"),  # the logits' layout (b a weight's transpose); an odd K, 3 K blocks
        (150, 1031, 700, "dense"),  # a row-major b (the hidden-state gradient's)
        (40, 9000, 60, "dense"),  # one tile, long K: K split into blocks, each a bfloat16 product
        (300, 64, 700, "out_t"),  # out transposed: no tile written in place
        (1, 1, 5, "b_t"),  # K = 1: no pair of rows to pack
        # out the larger: out's tiles written in place
        (2000, 1031, 100, "dense"),  # an odd K, 3 K blocks
        (1000, 36, 200, "grad_w"),  # the weight gradient's layout: a transposed, bᵀ row-major
        (3, 1, 5, "dense"),
    ),
    ids=("weight-t", "row-major", "k-split", "out-transposed", "k1-scratch", "out-larger", "weight-grad",
         "k1-in-place"),
)
@pytest.mark.parametrize("beta", (0.0, 1.0))
def test_addmm_op_bfloat16_products_summed_in_float32(m, k, n, layout, beta):
    """Two bfloat16 operands into a float32 out (the brgemm micro-kernel on CPUs that have it):
    the exact products summed in float32 at every shape and layout the fused head gives it."""
    g = torch.Generator().manual_seed(620)
    a = torch.randn(k, m, generator=g).t() if layout == "grad_w" else torch.randn(m, k, generator=g)
    b = torch.randn(n, k, generator=g).t() if layout in ("b_t", "grad_w") else torch.randn(k, n, generator=g)
    a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)
    out = torch.randn(n, m, generator=g).t() if layout == "out_t" else torch.randn(m, n, generator=g)
    want = beta * out.double() + a.double() @ b.double()
    torch.ops.fastkd.fused_linear_addmm_(out, a, b, beta)
    assert relative_error(out, want) < 2e-6


def test_bfloat16_terms_carry_sixteen_bits():
    """g's two bfloat16 terms (the bfloat16 head's gradient products) sum to g within 2⁻¹⁶ |g|."""
    g = torch.randn(64, 300, generator=torch.Generator().manual_seed(630)) * torch.logspace(-30, 30, 300)
    terms = fused_linear._bfloat16_terms_(g.clone())
    assert terms.dtype == torch.bfloat16 and terms.shape == (128, 300)
    total = terms[:64].double() + terms[64:].double()
    assert ((total - g.double()).abs() <= 2.0**-16 * g.double().abs()).all()
    assert (terms[:64] == g.to(torch.bfloat16)).all()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_weight_grad_summed_in_the_weight_dtype(backend, dtype):
    """``weight_grad_dtype=<the weight's dtype>``: one rounding per chunk, no float32 accumulator;
    within the reduced-precision tolerance of float64, the rest exactly as the default."""
    tensors = problem(seed=700, dtype=dtype)
    labels = labels_for(N, 701)
    kwargs = dict(labels=labels, hard_weight=0.5, temperature=2.0, chunk_size=3, backend=backend)
    def low_precision_dw(**x):
        return fastkd.fused_linear_divergence(**x, weight_grad_dtype=dtype, **kwargs)

    low = grads_of(low_precision_dw, tensors)
    default = grads_of(lambda **x: fastkd.fused_linear_divergence(**x, **kwargs), tensors)
    want = float64_oracle(tensors, labels=labels, hard_weight=0.5, temperature=2.0)
    assert low[1][1].dtype == dtype
    assert torch.equal(low[0], default[0]) and torch.equal(low[1][0], default[1][0])
    assert torch.equal(low[1][2], default[1][2])
    assert relative_error(low[1][1], want[1][1]) < 2e-2
