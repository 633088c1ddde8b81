"""fastkd.fused_linear_divergence (docs/spec.md §1, "Fused linear") against the
float64 unfused reference (logits = hidden @ Wᵀ + b, then
fastkd.reference.divergence / mixed_divergence): loss and the gradients of the
student hidden states, weight and bias; chunking; argument checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import fused_linear, reference
from tests.helpers import DEVICE, assert_matches, backend_params, coefficients

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
N, H_S, H_T, V = 13, 24, 20, 301


def randn(shape, dtype, seed, std=1.0):
    g = torch.Generator().manual_seed(seed)
    return (std * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).to(DEVICE)


def problem(dtype, lead=(N,), bias=True, seed=0):
    """Student / teacher hidden states, weights and biases (logits of O(1-3))."""
    return dict(
        student_hidden=randn((*lead, H_S), dtype, seed),
        student_weight=randn((V, H_S), dtype, seed + 1, std=H_S**-0.5 * 2),
        teacher_hidden=randn((*lead, H_T), dtype, seed + 2),
        teacher_weight=randn((V, H_T), dtype, seed + 3, std=H_T**-0.5 * 2),
        student_bias=randn((V,), dtype, seed + 4) if bias else None,
        teacher_bias=randn((V,), dtype, seed + 5) if bias else None,
    )


STUDENT = ("student_hidden", "student_weight", "student_bias")


def run(fn, tensors, upstream):
    """(loss, grad hidden, grad weight, grad bias) of fn(**tensors) with the given upstream gradient."""
    tensors = {k: None if v is None else v.detach().clone() for k, v in tensors.items()}
    for name in STUDENT:
        if tensors[name] is not None:
            tensors[name].requires_grad_(True)
    loss = fn(**tensors)
    grad = upstream.to(loss) if loss.dim() else torch.tensor(upstream.flatten()[0].item(), dtype=loss.dtype)
    loss.backward(grad)
    grads = tuple(tensors[name].grad for name in STUDENT if tensors[name] is not None)
    return (loss.detach(), *grads)


def unfused(**kwargs):
    """The oracle written out: full logits, then the reference loss."""
    tensors = {k: kwargs.pop(k) for k in (*STUDENT, "teacher_hidden", "teacher_weight", "teacher_bias")}
    s = F.linear(tensors["student_hidden"], tensors["student_weight"], tensors["student_bias"])
    t = F.linear(tensors["teacher_hidden"], tensors["teacher_weight"], tensors["teacher_bias"]).detach()
    if kwargs.get("hard_weight"):
        return reference.mixed_divergence(s, t, **kwargs)[0]
    return reference.divergence(s, t, **kwargs)


def check(backend, tensors, upstream=None, **kwargs):
    dtype = tensors["student_hidden"].dtype
    lead = tensors["student_hidden"].shape[:-1]
    if upstream is None:
        upstream = torch.linspace(0.3, 1.8, lead.numel(), dtype=torch.float64).reshape(lead)
    got = run(lambda **x: fastkd.fused_linear_divergence(**x, backend=backend, **kwargs), tensors, upstream)
    oracle = {k for k in ("chunk_size", "memory_budget", "weight_grad_dtype")}
    ref_kwargs = {k: v for k, v in kwargs.items() if k not in oracle}
    want = run(
        lambda **x: unfused(**x, **ref_kwargs),
        {k: None if v is None else v.double() for k, v in tensors.items()},
        upstream,
    )
    same = run(lambda **x: unfused(**x, **ref_kwargs), tensors, upstream)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert all(g.dtype == dtype for g in got[1:])
    names = ("loss", "grad hidden", "grad weight", "grad bias")
    for name, a, b, c in zip(names[: len(got)], got, want, same, strict=True):
        assert_matches(a, b, dtype, f"{backend} fused linear {name}", [c])


# The reference backend is the unfused oracle itself: only the kernels are
# compared with it.
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk_size", (None, 1, 4, 5, 64))  # 5 does not divide N = 13
def test_parity_chunks(backend, dtype, chunk_size):
    check(backend, problem(dtype), temperature=2.0, chunk_size=chunk_size)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("divergence", ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"))
@pytest.mark.parametrize("reduction", ("batchmean", "mean", "sum", "none"))
def test_parity_every_divergence_and_reduction(backend, divergence, reduction):
    check(
        backend,
        problem(torch.float32, seed=10),
        divergence=divergence,
        reduction=reduction,
        temperature=1.5,
        **coefficients(divergence, beta=0.3, alpha=0.2),
        chunk_size=4,
    )


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ("batchmean", "none"))
def test_parity_tokens_labels_mask(backend, dtype, reduction):
    """(B, T, H) input, ignored labels and a mask; rows excluded from the loss and gradients."""
    tensors = problem(dtype, lead=(3, 5), seed=20)
    labels = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(21)).to(DEVICE)
    labels[0, 1] = labels[2, 4] = -100
    mask = torch.ones(3, 5, dtype=torch.bool, device=DEVICE)
    mask[1, 2] = False
    check(backend, tensors, labels=labels, mask=mask, reduction=reduction, chunk_size=4, scale=1.0)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ("batchmean", "mean", "sum", "none"))
def test_parity_hard_labels(backend, dtype, reduction):
    tensors = problem(dtype, lead=(N,), seed=30)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(31)).to(DEVICE)
    labels[[2, 9]] = -100
    check(
        backend,
        tensors,
        labels=labels,
        hard_weight=0.4,
        soft_weight=0.6,
        reduction=reduction,
        divergence="jsd",
        chunk_size=5,
    )


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_parity_single_row_no_bias_float64(backend, dtype):
    if dtype == torch.float64 and backend != "cpu":
        pytest.skip(f"{backend} takes no float64 inputs")
    check(backend, problem(dtype, lead=(1,), bias=False, seed=40), temperature=4.0)


@pytest.mark.parametrize("backend", backend_params())
def test_non_contiguous_inputs(backend):
    tensors = problem(torch.float32, seed=50)
    tensors["student_hidden"] = tensors["student_hidden"].t().contiguous().t()
    tensors["student_weight"] = torch.cat([tensors["student_weight"]] * 2, dim=1)[:, ::2]
    tensors["teacher_hidden"] = tensors["teacher_hidden"].t().contiguous().t()
    assert not tensors["student_hidden"].is_contiguous() and not tensors["student_weight"].is_contiguous()
    check(backend, tensors, chunk_size=3)


@pytest.mark.parametrize("backend", backend_params())
def test_return_parts_teacher_no_grad_and_module(backend):
    tensors = problem(torch.float32, seed=60)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(61)).to(DEVICE)
    for name in ("teacher_hidden", "teacher_weight", "teacher_bias"):
        tensors[name].requires_grad_(True)
    tensors["student_hidden"].requires_grad_(True)
    total, hard, soft = fastkd.fused_linear_divergence(
        **tensors, labels=labels, hard_weight=0.5, return_parts=True, backend=backend, chunk_size=4
    )
    s = F.linear(tensors["student_hidden"], tensors["student_weight"], tensors["student_bias"]).detach()
    t = F.linear(tensors["teacher_hidden"], tensors["teacher_weight"], tensors["teacher_bias"]).detach()
    assert torch.allclose(hard, 0.5 * F.cross_entropy(s.double(), labels).float(), rtol=1e-5)
    assert torch.allclose(soft, reference.divergence(s, t), rtol=1e-5)
    assert torch.allclose(total, hard + soft, rtol=1e-6)
    assert hard.requires_grad and soft.requires_grad  # as fastkd.divergence's parts
    total.backward()
    assert all(tensors[name].grad is None for name in ("teacher_hidden", "teacher_weight", "teacher_bias"))
    module = fastkd.FusedLinearDivergenceLoss(temperature=2.0, chunk_size=4, backend=backend)
    args = [tensors[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    assert torch.equal(
        module(*args),
        fastkd.fused_linear_divergence(*args, temperature=2.0, chunk_size=4, backend=backend),
    )
    assert "chunk_size=4" in repr(module)


@pytest.mark.parametrize("backend", backend_params())
def test_no_kept_rows_gives_zero(backend):
    tensors = problem(torch.float32, seed=70)
    tensors["student_weight"].requires_grad_(True)
    loss = fastkd.fused_linear_divergence(
        **tensors, labels=torch.full((N,), -100, device=DEVICE), backend=backend
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(tensors["student_weight"].grad) == 0


def test_logits_never_materialised():
    """Between forward and backward only gradients of the inputs' sizes are saved; nothing is N × V."""
    n, vocab, hidden = 64, 500, 8
    s_h = randn((n, hidden), torch.float32, 80).requires_grad_(True)
    s_w = randn((vocab, hidden), torch.float32, 81).requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = fastkd.fused_linear_divergence(
            s_h,
            s_w,
            randn((n, hidden), torch.float32, 82),
            randn((vocab, hidden), torch.float32, 83),
            chunk_size=16,
        )
    assert saved and max(t.numel() for t in saved) <= vocab * hidden < n * vocab
    loss.backward()


def test_automatic_chunk_size():
    # logits of both models and their gradient in float32 (float64 for
    # float64 inputs), whatever the input dtype and the reduction
    assert fused_linear.chunk_rows(32000, torch.float32, False, 128 * 2**20) == 128 * 2**20 // (32000 * 12)
    assert fused_linear.chunk_rows(32000, torch.bfloat16, False, 128 * 2**20) == 128 * 2**20 // (32000 * 12)
    assert fused_linear.chunk_rows(32000, torch.bfloat16, True, 128 * 2**20) == 128 * 2**20 // (32000 * 12)
    assert fused_linear.chunk_rows(32000, torch.float64, False, 128 * 2**20) == 128 * 2**20 // (32000 * 24)
    assert fused_linear.chunk_rows(10**9, torch.float32, False, 1) == 1


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_float32_weight_grad_accumulator(backend, dtype):
    # one rounding of the weight gradient at the end, as the unfused backward
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(51)).to(DEVICE)
    check(backend, problem(dtype, seed=50), temperature=2.0, chunk_size=2, weight_grad_dtype=torch.float32,
          labels=labels, hard_weight=0.5)


@pytest.mark.parametrize(
    "change, match",
    (
        (dict(student_weight=torch.zeros(V, H_S + 1)), "student_weight shape"),
        (dict(teacher_weight=torch.zeros(V, H_T - 1)), "teacher_weight shape"),
        (dict(teacher_weight=torch.zeros(V + 1, H_T)), "teacher_weight vocabulary"),
        (dict(student_weight=torch.zeros(V, H_S, 1)), "student_weight must be 2-D"),
        (dict(student_hidden=torch.zeros(H_S)), "student_hidden"),
        (dict(teacher_hidden=torch.zeros(N + 1, H_T)), "teacher_hidden leading shape"),
        (dict(student_bias=torch.zeros(V + 1)), "student_bias shape"),
        (dict(teacher_bias=torch.zeros(V, dtype=torch.float64)), "teacher_bias dtype"),
        (dict(student_weight=torch.zeros(V, H_S, dtype=torch.float64)), "student_weight dtype"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=-3), "chunk_size"),
        (dict(chunk_size=2.5), "chunk_size"),
        (dict(memory_budget=0), "memory_budget"),
        (dict(weight_grad_dtype=torch.float32), "weight_grad_dtype"),  # float32 inputs: already float32
        (dict(weight_grad_dtype=torch.float16), "weight_grad_dtype"),
        (dict(labels=torch.zeros(N + 1, dtype=torch.long)), "labels shape"),
        (dict(mask=torch.ones(N)), "mask must be a bool"),
        (dict(hard_weight=1.0), "labels is required"),
        (dict(hard_weight=1.0, labels=torch.full((N,), V)), "labels of kept rows"),
        (dict(temperature=-1.0), "temperature"),
        (dict(divergence="l2"), "divergence"),
        (dict(reduction="avg"), "reduction"),
        (dict(beta=1.5), "beta"),
    ),
)
def test_bad_arguments(change, match):
    args = dict(
        student_hidden=torch.zeros(N, H_S),
        student_weight=torch.zeros(V, H_S),
        teacher_hidden=torch.zeros(N, H_T),
        teacher_weight=torch.zeros(V, H_T),
    )
    args.update(change)
    with pytest.raises(ValueError, match=match):
        fastkd.fused_linear_divergence(**args)


def test_default_memory_budget_by_dtype():
    assert fused_linear.default_memory_budget(torch.float32) == 128 * 2**20
    assert fused_linear.default_memory_budget(torch.float64) == 128 * 2**20
    assert fused_linear.default_memory_budget(torch.bfloat16) == 64 * 2**20
    assert fused_linear.default_memory_budget(torch.float16) == 64 * 2**20
