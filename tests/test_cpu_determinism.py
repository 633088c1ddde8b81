"""The cpu backend gives the same loss and gradients, bit for bit, whatever
torch's intra-op thread count (1, 2 or 4), for every cpu op family: the
divergences (with hard labels and reduction="none"), top-k, multi-teacher,
fused linear head, DKD, attention transfer, InfoNCE, CRD, MMD (every kernel),
NST, RKD, PKT, SP and CC.

Sizes make the OpenMP loops split: at least 64 rows and V = 4096 for the
logit families, N = 256 for the pairwise ones.
"""

from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd import _ops

pytestmark = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR))

THREADS = (1, 2, 4)
BACKEND = "cpu"


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def randn(*shape, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def outputs(fn, tensors: list[torch.Tensor], upstream: float = 0.7) -> list[torch.Tensor]:
    """The loss (or per-row losses) of ``fn`` and the gradients of ``tensors``
    that require one, with a non-unit upstream gradient."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    loss = fn(*leaves)
    if isinstance(loss, tuple):
        loss = loss[0]
    wanted = [x for x in leaves if x.requires_grad]
    grads = torch.autograd.grad(loss, wanted, torch.full_like(loss, upstream)) if wanted else ()
    return [loss.detach()] + [g for g in grads]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_thread_invariant(fn, tensors, what: str) -> None:
    results = {}
    for threads in THREADS:
        torch.set_num_threads(threads)
        results[threads] = outputs(fn, tensors)
    first = results[THREADS[0]]
    for threads in THREADS[1:]:
        for i, (a, b) in enumerate(zip(first, results[threads], strict=True)):
            assert a.shape == b.shape and torch.equal(bits(a), bits(b)), (
                f"{what}: output {i} (0 = loss) differs between 1 and {threads} threads; "
                f"max |Δ| {(a.double() - b.double()).abs().max().item():.3g}"
            )


def grad(t: torch.Tensor) -> torch.Tensor:
    return t.requires_grad_(True)


# ---- logit families -------------------------------------------------------------

ROWS, VOCAB = 64, 4096


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("name", ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"))
def test_divergence(name, dtype):
    s = grad(randn(ROWS, VOCAB, seed=0, scale=3, dtype=dtype))
    t = grad(randn(ROWS, VOCAB, seed=1, scale=3, dtype=dtype))
    assert_thread_invariant(
        lambda a, b: fastkd.divergence(a, b, divergence=name, temperature=2.0, backend=BACKEND),
        [s, t], f"divergence {name} {dtype}")


def test_divergence_hard_labels_and_rows():
    s, t = grad(randn(ROWS, VOCAB, seed=0, scale=3)), randn(ROWS, VOCAB, seed=1, scale=3)
    labels = _labels()
    assert_thread_invariant(
        lambda a, b: fastkd.divergence(a, b, labels=labels, hard_weight=0.3, soft_weight=0.7,
                                       backend=BACKEND),
        [s, t], "divergence with hard labels")
    assert_thread_invariant(
        lambda a, b: fastkd.divergence(a, b, divergence="jsd", reduction="none", backend=BACKEND),
        [s, t], "divergence reduction='none'")


def _labels():
    labels = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(2))
    labels[::5] = -100
    return labels


@pytest.mark.parametrize("hard", (False, True))
@pytest.mark.parametrize("name", ("kl", "jsd", "tvd"))
def test_topk_divergence(name, hard):
    s = grad(randn(ROWS, VOCAB, seed=0, scale=3))
    values, index = randn(ROWS, VOCAB, seed=1, scale=3).topk(64, dim=-1)
    kwargs = {"labels": _labels(), "hard_weight": 0.4} if hard else {}
    assert_thread_invariant(
        lambda a: fastkd.topk_divergence(a, index, values, divergence=name, backend=BACKEND, **kwargs),
        [s], f"topk {name} hard={hard}")


@pytest.mark.parametrize("hard", (False, True))
@pytest.mark.parametrize("name", ("kl", "jsd"))
def test_multi_teacher(name, hard):
    s = grad(randn(ROWS, VOCAB, seed=0, scale=3))
    t = randn(3, ROWS, VOCAB, seed=1, scale=3)
    weights = torch.tensor([0.5, 0.3, 0.2])
    kwargs = {"labels": _labels(), "hard_weight": 0.4} if hard else {}
    assert_thread_invariant(
        lambda a: fastkd.divergence(a, t, teacher_weights=weights, divergence=name, backend=BACKEND,
                                    **kwargs),
        [s], f"multi-teacher {name} hard={hard}")


def test_fused_linear_divergence():
    h_s, w_s = grad(randn(ROWS, 64, seed=0)), grad(randn(VOCAB, 64, seed=1, scale=0.2))
    h_t, w_t = randn(ROWS, 48, seed=2), randn(VOCAB, 48, seed=3, scale=0.2)
    assert_thread_invariant(lambda a, b: fastkd.fused_linear_divergence(a, b, h_t, w_t, backend=BACKEND),
                            [h_s, w_s], "fused_linear_divergence")


def test_fused_linear_divergence_loss():
    h_s, w_s = randn(ROWS, 64, seed=0), randn(VOCAB, 64, seed=1, scale=0.2)
    h_t, w_t = randn(ROWS, 48, seed=2), randn(VOCAB, 48, seed=3, scale=0.2)
    assert_thread_invariant(lambda a, b: fastkd.fused_linear_divergence(a, b, h_t, w_t, backend=BACKEND),
                            [h_s, w_s], "fused_linear_divergence loss")


def test_dkd():
    s, t = grad(randn(ROWS, VOCAB, seed=0, scale=3)), randn(ROWS, VOCAB, seed=1, scale=3)
    labels = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(2))
    assert_thread_invariant(lambda a, b: fastkd.dkd_loss(a, b, labels, backend=BACKEND), [s, t], "dkd")


# ---- embedding and feature-map families ----------------------------------------

PAIRS = 256


def test_at_loss():
    s, t = grad(randn(64, 8, 16, 16, seed=0)), grad(randn(64, 4, 8, 8, seed=1))
    assert_thread_invariant(lambda a, b: fastkd.at_loss(a, b, backend=BACKEND), [s, t], "at_loss")


def test_nst_loss():
    s, t = grad(randn(64, 16, 8, 8, seed=0)), grad(randn(64, 16, 8, 8, seed=1))
    assert_thread_invariant(lambda a, b: fastkd.nst_loss(a, b, backend=BACKEND), [s, t], "nst_loss")


@pytest.mark.parametrize("kwargs", (
    {}, {"symmetric": True, "normalize": True},  # the default budget: the softmax is kept
    {"logits_memory_budget": 0}, {"symmetric": True, "normalize": True, "logits_memory_budget": 0},
))
def test_info_nce(kwargs):
    q, k = grad(randn(PAIRS, 64, seed=0, scale=0.125)), grad(randn(PAIRS, 64, seed=1, scale=0.125))
    assert_thread_invariant(lambda a, b: fastkd.info_nce(a, b, backend=BACKEND, **kwargs), [q, k], "info_nce")


def test_crd_nce():
    v = grad(torch.nn.functional.normalize(randn(64, 128, seed=0), dim=1))
    bank = torch.nn.functional.normalize(randn(8192, 128, seed=1), dim=1)
    idx = torch.randint(0, 8192, (64, 4097), generator=torch.Generator().manual_seed(2))
    assert_thread_invariant(lambda a: fastkd.crd_nce(a, bank, idx, backend=BACKEND), [v], "crd_nce")


@pytest.mark.parametrize("kernel", ("gaussian", "laplacian", "polynomial"))
@pytest.mark.parametrize("unbiased", (False, True))
def test_mmd(kernel, unbiased):
    x, y = grad(randn(PAIRS, 32, seed=0)), grad(randn(PAIRS + 3, 32, seed=1, scale=1.2))
    assert_thread_invariant(
        lambda a, b: fastkd.mmd_loss(a, b, kernel=kernel, unbiased=unbiased, backend=BACKEND),
        [x, y], f"mmd {kernel} unbiased={unbiased}")


RELATIONAL = ("rkd_distance", "rkd_angle", "rkd_loss", "pkt_loss", "sp_loss", "cc_loss")


@pytest.mark.parametrize("name", RELATIONAL)
def test_relational(name):
    s, t = grad(randn(PAIRS, 32, seed=0)), randn(PAIRS, 24, seed=1)
    assert_thread_invariant(lambda a, b: getattr(fastkd, name)(a, b, backend=BACKEND), [s, t], name)
