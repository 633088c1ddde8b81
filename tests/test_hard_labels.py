"""Hard-label mixing in fastkd.divergence / kd_loss (docs/spec.md §1):
``hard_weight · CE + soft_weight · KD`` against the float64 reference, and
the reference CE against torch's cross_entropy. Every tensor lives on the
test device (``FASTKD_TEST_DEVICE``), drawn on the CPU first so that the
values are the same on every device."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import reference
from tests.helpers import DEVICE, assert_matches, backend_params

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def logits(shape, dtype, seed):
    """``shape`` logits of ``dtype`` on DEVICE, ~N(0, 4)."""
    g = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(DEVICE, dtype)


def class_labels(shape, vocab, seed, ignored=()):
    """``shape`` int64 labels in [0, vocab) on DEVICE, -100 at the flat positions ``ignored``."""
    y = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
    flat = y.view(-1)
    for i in ignored:
        flat[i] = -100
    return y.to(DEVICE)


def on_device(values, dtype=None):
    """``torch.tensor(values)`` on DEVICE."""
    return torch.tensor(values, dtype=dtype, device=DEVICE)


def run(fn, s, t, upstream):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    out = fn(s, t)
    grad = upstream.to(out) if out.dim() else torch.full((), 0.6, dtype=out.dtype, device=out.device)
    out.backward(grad)
    return out.detach(), s.grad, t.grad


@pytest.mark.parametrize("reduction", ("batchmean", "mean", "sum", "none"))
def test_reference_cross_entropy_matches_torch(reduction):
    s = logits((4, 5, 11), torch.float64, 0)
    y = class_labels((4, 5), 11, 1, ignored=(0, 7, 19))
    got = reference.cross_entropy(s, y, reduction=reduction)
    torch_reduction = {"batchmean": "mean", "mean": "mean"}.get(reduction, reduction)
    want = F.cross_entropy(s.reshape(-1, 11), y.reshape(-1), reduction=torch_reduction, ignore_index=-100)
    assert torch.allclose(got.reshape(-1) if reduction == "none" else got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("temperature", (1.0, 2.0))
def test_reference_mixing_against_torch_losses(temperature):
    """The reference's hard + soft mixing (the oracle of the kernel tests below)
    against an independent float64 oracle built from torch's own losses:
    ``F.cross_entropy`` and ``F.kl_div`` over the kept rows."""
    s = logits((6, 37), torch.float64, 30).requires_grad_(True)
    t = logits((6, 37), torch.float64, 31)
    y = class_labels((6,), 37, 32, ignored=(1, 4))
    got = fastkd.divergence(s, t, backend="reference", temperature=temperature, labels=y,
                            hard_weight=0.3, soft_weight=0.7)
    kept = y != -100
    ce = F.cross_entropy(s[kept], y[kept])
    kd = F.kl_div(F.log_softmax(s[kept] / temperature, -1), F.log_softmax(t[kept] / temperature, -1),
                  log_target=True, reduction="batchmean") * temperature**2
    want = 0.3 * ce + 0.7 * kd
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    (got_grad,) = torch.autograd.grad(got, s)
    (want_grad,) = torch.autograd.grad(want, s)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-14)


# The kernels against the float64 reference (the reference backend itself is
# checked above, against torch's losses).
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ("batchmean", "mean", "sum", "none"))
@pytest.mark.parametrize("divergence", ("kl", "jsd", "reverse_kl"))
def test_mixed_parity(backend, dtype, reduction, divergence):
    shape, vocab = (3, 7), 301
    s, t = logits((*shape, vocab), dtype, 2), logits((*shape, vocab), dtype, 3)
    y = class_labels(shape, vocab, 4, ignored=(1, 8))
    mask = torch.ones(shape, dtype=torch.bool, device=DEVICE)
    mask[2, 3] = False
    upstream = torch.linspace(0.2, 1.9, 21, dtype=torch.float64, device=DEVICE).reshape(shape)
    kwargs = dict(
        divergence=divergence,
        temperature=2.0,
        reduction=reduction,
        labels=y,
        mask=mask,
        hard_weight=0.3,
        soft_weight=0.7,
    )
    got = run(lambda a, b: fastkd.divergence(a, b, backend=backend, **kwargs), s, t, upstream)
    want = run(lambda a, b: reference.mixed_divergence(a, b, **kwargs)[0], s.double(), t.double(), upstream)
    same = run(lambda a, b: reference.mixed_divergence(a, b, **kwargs)[0], s, t, upstream)
    for name, a, b, c in zip(("loss", "student grad", "teacher grad"), got, want, same, strict=True):
        assert_matches(a, b, dtype, f"{backend} mixed {name}", [c])


@pytest.mark.parametrize("backend", backend_params(include_reference=True))
def test_return_parts_and_hand_computed_mixture(backend):
    s, t = logits((9, 40), torch.float32, 5), logits((9, 40), torch.float32, 6)
    y = class_labels((9,), 40, 7, ignored=(4,))
    total, hard, soft = fastkd.kd_loss(
        s, t, labels=y, hard_weight=0.25, soft_weight=0.5, return_parts=True, backend=backend
    )
    kept = y != -100
    s64, t64 = s[kept].double(), t[kept].double()
    ce = F.cross_entropy(s64, y[kept])  # mean over the 8 kept rows
    kd = F.kl_div(F.log_softmax(s64 / 4, -1), F.softmax(t64 / 4, -1), reduction="batchmean") * 16
    assert torch.allclose(hard.double(), 0.25 * ce, rtol=1e-5)
    assert torch.allclose(soft.double(), 0.5 * kd, rtol=1e-5)
    assert torch.allclose(total, hard + soft, rtol=1e-6)


@pytest.mark.parametrize("backend", backend_params(include_reference=True))
def test_defaults_keep_todays_behaviour(backend):
    s, t = logits((6, 50), torch.float32, 8), logits((6, 50), torch.float32, 9)
    y = class_labels((6,), 50, 10, ignored=(2,))
    plain = fastkd.divergence(s, t, labels=y, temperature=2.0, backend=backend)
    for extra in (dict(hard_weight=None), dict(hard_weight=0.0), dict(soft_weight=1.0)):
        assert torch.equal(
            fastkd.divergence(s, t, labels=y, temperature=2.0, backend=backend, **extra), plain
        )
    total, hard, soft = fastkd.divergence(s, t, labels=y, temperature=2.0, backend=backend, return_parts=True)
    assert torch.equal(total, plain) and torch.equal(soft, plain) and hard.item() == 0.0
    # labels alone still only exclude rows: no CE term
    kept_only = fastkd.divergence(s[[0, 1, 3, 4, 5]], t[[0, 1, 3, 4, 5]], temperature=2.0, backend=backend)
    assert torch.allclose(plain, kept_only, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", backend_params(include_reference=True))
def test_no_kept_rows(backend):
    s = logits((3, 8), torch.float32, 11).requires_grad_(True)
    y = torch.full((3,), -100, device=DEVICE)
    loss = fastkd.divergence(s, logits((3, 8), torch.float32, 12), labels=y, hard_weight=1.0, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(s.grad) == 0


@pytest.mark.parametrize(
    "change, match",
    (
        (dict(labels=None), "labels is required"),
        (dict(hard_weight=-0.5), "hard_weight"),
        (dict(soft_weight=float("nan")), "soft_weight"),
        (dict(labels=on_device([0, 8, 1])), r"labels of kept rows must lie in \[0, V\)"),
        (dict(labels=on_device([0, -5, 1])), r"labels of kept rows"),
    ),
)
@pytest.mark.parametrize("backend", backend_params(include_reference=True))
def test_bad_arguments(change, match, backend):
    args = dict(labels=on_device([0, 7, -100]), hard_weight=1.0)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        fastkd.divergence(
            torch.zeros(3, 8, device=DEVICE), torch.zeros(3, 8, device=DEVICE), backend=backend, **args
        )


def _mixture_backends():
    from fastkd.mixture import MIXTURE_KERNELS

    names = ("reference", *MIXTURE_KERNELS)
    return [p for p in backend_params(include_reference=True) if p.id in names]


@pytest.mark.parametrize("backend", _mixture_backends())
@pytest.mark.parametrize("reduction", ("batchmean", "mean", "none"))
def test_several_teachers(backend, reduction):
    # CE of the student + the mixture divergence of K = 3 teachers, against
    # F.cross_entropy and the reference mixture computed separately in float64
    from fastkd.reference import mixture as reference_mt

    s, t = logits((2, 5, 33), torch.float32, 13), logits((3, 2, 5, 33), torch.float32, 14)
    w = on_device([0.5, 0.2, 0.3], torch.float64)
    y = class_labels((2, 5), 33, 15, ignored=(3,))
    upstream = torch.linspace(0.3, 1.7, 10, dtype=torch.float64, device=DEVICE).reshape(2, 5)
    kwargs = dict(divergence="jsd", temperature=3.0, reduction=reduction, labels=y)

    def mixed(a, b):
        total, hard, soft = fastkd.divergence(
            a, b.detach(), teacher_weights=w, hard_weight=0.6, soft_weight=0.4, return_parts=True,
            backend=backend, **kwargs,
        )
        torch.testing.assert_close(total, hard + soft)
        return total

    def composed(a, b):
        kept = y.reshape(-1) != -100
        ce_rows = F.cross_entropy(a.reshape(-1, 33)[kept], y.reshape(-1)[kept], reduction="none")
        if reduction == "none":
            ce = torch.zeros(10, dtype=a.dtype, device=a.device)
            ce = ce.index_put((kept.nonzero().squeeze(1),), ce_rows).reshape(2, 5)
        else:
            ce = ce_rows.mean()
        return 0.6 * ce + 0.4 * reference_mt.mixture_divergence(a, b.detach(), w, **kwargs)

    got = run(mixed, s, t, upstream)
    want = run(composed, s.double(), t.double(), upstream)
    assert_matches(got[0], want[0], torch.float32, f"{backend} several-teacher mixed loss")
    assert_matches(got[1], want[1], torch.float32, f"{backend} several-teacher mixed student grad")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("temperature", (1.0, 0.7))
@pytest.mark.parametrize("divergence", ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"))
def test_every_divergence_with_the_cross_entropy(backend, temperature, divergence):
    # T = 1 is the kernels' shared-normaliser path (the CE's softmax is q);
    # V = 4500 spans more than one Triton block
    s, t = logits((5, 4500), torch.float32, 16), logits((5, 4500), torch.float32, 17)
    y = class_labels((5,), 4500, 18, ignored=(2,))
    kwargs = dict(divergence=divergence, temperature=temperature, labels=y, hard_weight=1.3, soft_weight=0.4)
    upstream = on_device(0.6, torch.float64)
    got = run(lambda a, b: fastkd.divergence(a, b, backend=backend, **kwargs), s, t, upstream)
    want = run(lambda a, b: reference.mixed_divergence(a, b, **kwargs)[0], s.double(), t.double(), upstream)
    same = run(lambda a, b: reference.mixed_divergence(a, b, **kwargs)[0], s, t, upstream)
    for name, a, b, c in zip(("loss", "student grad", "teacher grad"), got, want, same, strict=True):
        assert_matches(a, b, torch.float32, f"{backend} {divergence} T={temperature} {name}", [c])


@pytest.mark.parametrize("backend", backend_params(include_reference=True))
@pytest.mark.parametrize("reduction", ("batchmean", "none"))
def test_parts_used_apart_get_their_own_gradients(backend, reduction):
    # The fused kernel returns one gradient for hard + soft; a loss that
    # weighs the parts differently must still get each part's own gradient.
    s, t = logits((6, 90), torch.float32, 19), logits((6, 90), torch.float32, 20)
    y = class_labels((6,), 90, 21, ignored=(0,))
    kwargs = dict(temperature=2.0, labels=y, hard_weight=0.8, soft_weight=0.5, reduction=reduction)
    row_weights = torch.linspace(0.5, 2.0, 6, dtype=torch.float64, device=DEVICE)

    def combine(total, hard, soft, how):
        reduce = (lambda x: (x * row_weights.to(x.dtype)).sum()) if reduction == "none" else (lambda x: x)
        return {"hard only": reduce(hard), "soft only": reduce(soft),
                "weighted": reduce(3.0 * hard - 0.25 * soft) + reduce(total)}[how]

    for how in ("hard only", "soft only", "weighted"):
        grads = []
        fused = lambda a, b: fastkd.divergence(a, b, return_parts=True, backend=backend, **kwargs)  # noqa: E731
        oracle = lambda a, b: reference.mixed_divergence(a, b, **kwargs)  # noqa: E731
        for fn, dtype in ((fused, torch.float32), (oracle, torch.float64)):
            a = s.detach().to(dtype).clone().requires_grad_(True)
            b = t.detach().to(dtype).clone().requires_grad_(True)
            combine(*fn(a, b), how).backward()
            # the CE alone does not reach the teacher: no gradient or a zero one
            grads.append((a.grad, torch.zeros_like(b) if b.grad is None else b.grad))
        (gs, gt), (ws, wt) = grads
        assert_matches(gs, ws, torch.float32, f"{backend} {how} student grad")
        assert_matches(gt, wt, torch.float32, f"{backend} {how} teacher grad")


def _student_only_inputs():
    """(top-k index (6, 9), top-k values (6, 9), teachers (3, 6, 70)) on DEVICE, for V = 70."""
    g = torch.Generator().manual_seed(22)
    index = torch.stack([torch.randperm(70, generator=g)[:9] for _ in range(6)])
    values = torch.randn(6, 9, generator=g, dtype=torch.float64)
    teachers = torch.randn(3, 6, 70, generator=g, dtype=torch.float64)
    return index.to(DEVICE), values.to(DEVICE), teachers.to(DEVICE)


def _student_only_cases():
    """(name, loss(s, backend, **kwargs) -> (total, hard, soft), backends) for the top-k and mixture ops."""
    from fastkd.mixture import MIXTURE_KERNELS
    from fastkd.topk import TOPK_KERNELS

    index, values, teachers = _student_only_inputs()

    def topk(s, backend, **kwargs):
        return fastkd.topk_divergence(
            s, index, values.to(s.dtype), return_parts=True, backend=backend, **kwargs
        )

    def mixture(s, backend, **kwargs):
        return fastkd.divergence(s, teachers.to(s.dtype), teacher_weights=[0.2, 0.5, 0.3], return_parts=True,
                                 backend=backend, **kwargs)

    return (("top-k", topk, TOPK_KERNELS), ("mixture", mixture, MIXTURE_KERNELS))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", range(2), ids=("top-k", "mixture"))
@pytest.mark.parametrize("reduction", ("batchmean", "none"))
def test_student_only_ops_parts_apart(backend, case, reduction):
    # the top-k and mixture kernels' CE and combined gradient, against the
    # reference backend in float64, with the parts weighed differently
    name, loss, kernels = _student_only_cases()[case]
    if backend not in kernels:
        pytest.skip(f"no {name} kernel on {backend}")
    s = logits((6, 70), torch.float32, 23)
    y = class_labels((6,), 70, 24, ignored=(3,))
    kwargs = dict(
        divergence="jsd", temperature=1.5, labels=y, hard_weight=0.7, soft_weight=0.4, reduction=reduction
    )
    row_weights = torch.linspace(0.5, 2.0, 6, dtype=torch.float64, device=DEVICE)
    for how in ((1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (2.5, -0.5)):
        results = []
        for dtype, chosen in ((torch.float32, backend), (torch.float64, "reference")):
            a = s.detach().to(dtype).clone().requires_grad_(True)
            total, hard, soft = loss(a, chosen, **kwargs)
            torch.testing.assert_close(total, hard + soft)
            weighted = how[0] * hard + how[1] * soft
            if reduction == "none":
                weighted = (weighted * row_weights.to(dtype)).sum()
            weighted.backward()
            results.append((total.detach(), a.grad))
        (got_loss, got_grad), (want_loss, want_grad) = results
        assert_matches(got_loss, want_loss, torch.float32, f"{backend} {name} loss")
        assert_matches(got_grad, want_grad, torch.float32, f"{backend} {name} grad, parts weighed {how}")


def test_inputs_live_on_the_test_device():
    # FASTKD_TEST_DEVICE=cuda runs this file on CUDA tensors: a CPU tensor
    # among the inputs would reach a GPU backend and fail at dispatch.
    made = [logits((2, 3), torch.float32, 0), class_labels((2,), 3, 0, ignored=(1,)), on_device([1.0]),
            *_student_only_inputs()]
    assert [t.device for t in made] == [DEVICE] * len(made)
