"""torch.autograd.gradcheck (float64, finite differences) of the cpu kernels'
backward for every public function and module of the embedding and
feature-map families: attention transfer, FitNets hint (composite ATen, no
kernel), InfoNCE, CRD, MMD, NST, RKD, PKT, SP and CC. None of these families
has a ``reduction`` argument: each returns a ``()`` loss.

Small shapes, away from the losses' kinks (smooth-L1 at |Δ| = 1, the CC
Frobenius norm at zero, RKD's distance clamp), so that central differences
are accurate.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import fastkd
from fastkd import _ops

pytestmark = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR))

BACKEND = "cpu"


def f64(*shape, seed: int, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_(grad)


def check(fn, *inputs) -> None:
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=False)


def finite_difference_check(fn, *inputs, eps: float = 1e-6) -> None:
    """One backward through a fresh (not retained) graph against float64
    central differences, with gradcheck's tolerances."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    grads = torch.autograd.grad(fn(*leaves), leaves)
    for i, (x, g) in enumerate(zip(inputs, grads, strict=True)):
        numerical = torch.zeros_like(x)
        base = [y.detach().clone() for y in inputs]
        flat = base[i].view(-1)
        for j in range(flat.numel()):
            orig = flat[j].item()
            flat[j] = orig + eps
            up = fn(*base).item()
            flat[j] = orig - eps
            down = fn(*base).item()
            flat[j] = orig
            numerical.view(-1)[j] = (up - down) / (2 * eps)
        torch.testing.assert_close(g, numerical, atol=1e-6, rtol=1e-4)


# ---- relational (student gradient only: the teacher gets none) ----------------

@pytest.mark.parametrize("n, d", ((1, 3), (2, 1), (5, 4), (9, 3)))
@pytest.mark.parametrize("name, kwargs", (
    ("rkd_distance", {}),
    ("rkd_angle", {}),
    ("rkd_loss", {}),
    ("rkd_loss", {"distance_weight": 1.5, "angle_weight": 0.5}),
    ("pkt_loss", {}),
    ("pkt_loss", {"eps": 0.1}),
    ("sp_loss", {}),
    ("cc_loss", {}),
    ("cc_loss", {"gamma": 0.1, "order": 3}),
))
def test_relational(name, kwargs, n, d):
    if name == "pkt_loss" and d == 1:
        # one feature: the normalised rows are ±1 up to eps, P_s ~ 0, and central
        # differences of log(P_s + 1e-7) lose all accuracy (the reference's too)
        kwargs = {"eps": 0.1}
    fn = getattr(fastkd, name)
    teacher = f64(n, d + 2, seed=1, grad=False)
    check(lambda s: fn(s, teacher, backend=BACKEND, **kwargs), f64(n, d, seed=0))


@pytest.mark.parametrize("module, fn", (
    (fastkd.RKDLoss, fastkd.rkd_loss),
    (fastkd.PKTLoss, fastkd.pkt_loss),
    (fastkd.SPLoss, fastkd.sp_loss),
    (fastkd.CCLoss, fastkd.cc_loss),
))
def test_relational_modules(module, fn):
    m = module(backend=BACKEND)
    teacher = f64(6, 5, seed=1, grad=False)
    check(lambda s: m(s, teacher), f64(6, 4, seed=0))


def test_teacher_gets_no_gradient():
    s, t = f64(5, 3, seed=0), f64(5, 4, seed=1)
    for fn in (fastkd.rkd_loss, fastkd.pkt_loss, fastkd.sp_loss, fastkd.cc_loss):
        t.grad = None
        fn(s, t, backend=BACKEND).backward()
        assert t.grad is None or not t.grad.any()


# ---- MMD and NST (both inputs get gradients) ---------------------------------

@pytest.mark.parametrize("unbiased", (False, True))
@pytest.mark.parametrize("kwargs", (
    {"kernel": "gaussian"},
    {"kernel": "gaussian", "bandwidths": 0.7},
    {"kernel": "laplacian", "bandwidths": (0.5, 2.0)},
    {"kernel": "polynomial", "degree": 3, "c": 2.0},
    {"kernel": "polynomial", "degree": 1},
))
def test_mmd(kwargs, unbiased):
    check(lambda x, y: fastkd.mmd_loss(x, y, unbiased=unbiased, backend=BACKEND, **kwargs),
          f64(4, 3, seed=0), f64(5, 3, seed=1, scale=0.8))


def test_mmd_module_and_d1():
    m = fastkd.MMDLoss(kernel="laplacian", backend=BACKEND)
    check(lambda x, y: m(x, y), f64(3, 1, seed=0), f64(4, 1, seed=1))


@pytest.mark.parametrize("shapes", (((2, 3, 4, 4), (2, 3, 4, 4)), ((1, 2, 4, 6), (1, 2, 2, 3)),
                                    ((3, 1, 1, 1), (3, 1, 1, 1))))
def test_nst(shapes):
    s_shape, t_shape = shapes
    check(lambda s, t: fastkd.nst_loss(s, t, backend=BACKEND), f64(*s_shape, seed=0), f64(*t_shape, seed=1))
    m = fastkd.NSTLoss(backend=BACKEND)
    check(lambda s, t: m(s, t), f64(*s_shape, seed=2), f64(*t_shape, seed=3))


# ---- attention transfer and hint ------------------------------------------------

@pytest.mark.parametrize("p", (1, 2, 3))
@pytest.mark.parametrize("shapes", (((2, 2, 3, 3), (2, 3, 3, 3)), ((1, 2, 4, 6), (1, 3, 2, 3)),
                                    ((3, 1, 1, 1), (3, 2, 1, 1))))
def test_at_loss(shapes, p):
    s_shape, t_shape = shapes
    # p = 1 and 3 take |f|^p: keep the maps away from 0
    shift = 0.0 if p == 2 else 1.5
    s = (f64(*s_shape, seed=0, grad=False) + shift).requires_grad_(True)
    t = (f64(*t_shape, seed=1, grad=False) + shift).requires_grad_(True)
    check(lambda a, b: fastkd.at_loss(a, b, p=p, backend=BACKEND), s, t)


def test_at_module_over_layer_pairs():
    m = fastkd.ATLoss(backend=BACKEND)
    check(lambda s1, t1, s2, t2: m([s1, s2], [t1, t2]),
          f64(2, 2, 2, 2, seed=0), f64(2, 2, 2, 2, seed=1), f64(1, 1, 3, 3, seed=2), f64(1, 2, 1, 1, seed=3))


@pytest.mark.parametrize("adapter, s_shape, t_shape", (
    ("conv1x1", (2, 3, 4, 4), (2, 5, 2, 2)),
    ("conv3x3", (2, 2, 3, 3), (2, 3, 3, 3)),
    ("linear", (3, 4), (3, 2)),
))
def test_hint_loss(adapter, s_shape, t_shape):
    """HintLoss is composite ATen (adapter + pooling + MSE): the student and
    the adapter's parameters get gradients, the teacher none."""
    torch.manual_seed(0)
    m = fastkd.HintLoss(s_shape[1], t_shape[1], adapter=adapter).double()
    teacher = f64(*t_shape, seed=1, grad=False)
    check(lambda s: m(s, teacher), f64(*s_shape, seed=0))
    names = [name for name, _ in m.named_parameters()]
    student = f64(*s_shape, seed=0, grad=False)

    def through_parameters(*values):
        return torch.func.functional_call(m, dict(zip(names, values, strict=True)), (student, teacher))

    check(through_parameters, *[p.detach().clone().requires_grad_(True) for p in m.parameters()])


# ---- InfoNCE and CRD -------------------------------------------------------------

@pytest.mark.parametrize("kwargs, m", (
    ({}, 4),
    ({}, 6),
    ({"temperature": 0.5, "normalize": True}, 4),
    ({"temperature": 2.0, "symmetric": True}, 4),
    ({"symmetric": True, "normalize": True}, 4),
    ({"labels": torch.tensor([2, 0, 0, 5])}, 6),
    # the default budget keeps the softmax at these sizes; 0 recomputes it
    ({"logits_memory_budget": 0}, 6),
    ({"symmetric": True, "logits_memory_budget": 0}, 4),
    ({"labels": torch.tensor([2, 0, 0, 5]), "logits_memory_budget": 0}, 6),
))
def test_info_nce(kwargs, m):
    q, k = f64(4, 3, seed=0, scale=0.5), f64(m, 3, seed=1, scale=0.5)
    check(lambda a, b: fastkd.info_nce(a, b, backend=BACKEND, **kwargs), q, k)
    module_kwargs = {key: v for key, v in kwargs.items() if key != "labels"}
    module = fastkd.InfoNCELoss(backend=BACKEND, **module_kwargs)
    labels = kwargs.get("labels")
    check(lambda a, b: module(a, b) if labels is None else module(a, b, labels=labels), q, k)


def test_info_nce_single_row():
    check(lambda a, b: fastkd.info_nce(a, b, backend=BACKEND), f64(1, 2, seed=0), f64(1, 2, seed=1))


CRD_CASES = ((1, 1, 1, 2.0), (3, 4, 5, 0.7), (4, 17, 9, 30.0))


def _crd_case(b, feat, k, z):
    bank = torch.nn.functional.normalize(f64(10, feat, seed=1, grad=False), dim=1)
    idx = torch.randint(0, 10, (b, k + 1), generator=torch.Generator().manual_seed(2))
    v = torch.nn.functional.normalize(f64(b, feat, seed=0, grad=False), dim=1).requires_grad_(True)
    return (lambda x: fastkd.crd_nce(x, bank, idx, temperature=0.5, z=z, backend=BACKEND)[0]), v


@pytest.mark.parametrize("b, feat, k, z", CRD_CASES)
def test_crd_nce(b, feat, k, z):
    """The student-side embedding ``v`` gets the gradient; the bank none."""
    check(*_crd_case(b, feat, k, z))


@pytest.mark.parametrize("b, feat, k, z", CRD_CASES)
def test_crd_nce_finite_differences(b, feat, k, z):
    finite_difference_check(*_crd_case(b, feat, k, z))


@pytest.mark.parametrize("kwargs", ({}, {"distance_weight": 1.5, "angle_weight": 0.5}))
@pytest.mark.parametrize("n, d", ((1, 3), (2, 1), (5, 4)))
def test_rkd_loss_finite_differences(kwargs, n, d):
    teacher = f64(n, d + 2, seed=1, grad=False)
    finite_difference_check(lambda s: fastkd.rkd_loss(s, teacher, backend=BACKEND, **kwargs),
                            f64(n, d, seed=0))


def crd_module_loss_of_student():
    """f_s ↦ CRDLoss(f_s, f_t, idx, contrast) in float64, its Z fixed by a first
    call and its banks frozen (momentum 1)."""
    torch.manual_seed(0)
    module = fastkd.CRDLoss(student_dim=5, teacher_dim=4, n_data=12, feat_dim=3, nce_k=4, nce_m=1.0,
                            backend=BACKEND).double()
    idx = torch.tensor([0, 3, 7])
    contrast = torch.randint(0, 12, (3, 5), generator=torch.Generator().manual_seed(1))
    f_t = f64(3, 4, seed=1, grad=False)
    module(f64(3, 5, seed=2, grad=False), f_t, idx, contrast)  # fixes Z
    return lambda f_s: module(f_s, f_t, idx, contrast)


def test_crd_module():
    """CRDLoss (embeddings, the NCE of both directions) through its linear
    heads, with the banks frozen (momentum 1 leaves them as they are)."""
    check(crd_module_loss_of_student(), f64(3, 5, seed=0))


def test_crd_module_finite_differences():
    finite_difference_check(crd_module_loss_of_student(), f64(3, 5, seed=0))
