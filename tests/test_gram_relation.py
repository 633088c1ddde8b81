"""PKT, SP and CC (docs/spec.md §2): every fused backend against the float64 reference, their
hyper-parameters through functions, modules and ops, dispatch and CC's order bound."""

from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd import _dispatch, _ops, reference
from fastkd.gram_relation import CC_KERNELS, PKT_KERNELS, SP_KERNELS
from tests.helpers import KERNEL_BACKENDS, assert_matches, assert_matches_at_scale, backend_params
from tests.no_host_reads import no_host_reads
from tests.pairwise_helpers import INTERPRETED_MAX_N, OPS_ON_DEVICE, SHAPES, embeddings, interpreted, run


def kernel_params():
    """The backends on DEVICE with a kernel for every loss of the family (skipped with the reason)."""
    return [p for p in backend_params() if p.id in PKT_KERNELS and p.id in SP_KERNELS and p.id in CC_KERNELS]


pytestmark = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR))


OTHERS = {
    "pkt_loss": (fastkd.pkt_loss, reference.pkt_loss, fastkd.PKTLoss),
    "sp_loss": (fastkd.sp_loss, reference.sp_loss, fastkd.SPLoss),
    "cc_loss": (fastkd.cc_loss, reference.cc_loss, fastkd.CCLoss),
}


KERNELS_OF = {"pkt_loss": PKT_KERNELS, "sp_loss": SP_KERNELS, "cc_loss": CC_KERNELS}


# (name, hyper-parameters) of the Gram-relation kernels
GRAM_CASES = (
    ("pkt_loss", {}),
    ("pkt_loss", {"eps": 1e-3}),
    ("sp_loss", {}),
    ("cc_loss", {}),
    ("cc_loss", {"gamma": 0.15, "order": 3}),
    ("cc_loss", {"gamma": 1.0, "order": 1}),
)


def gram_params():
    """(name, kwargs, backend) for every SP / CC / PKT case on each of its kernel backends."""
    return [
        pytest.param(name, kwargs, p.values[0], marks=p.marks, id=f"{name}-{kwargs}-{p.id}")
        for name, kwargs in GRAM_CASES
        for p in backend_params()
        if p.id in KERNELS_OF[name]
    ]


def check_gram_parity(name, kwargs, backend, student, teacher, what=""):
    fn, ref, _ = OTHERS[name]
    dtype = student.dtype
    if dtype not in _dispatch.KERNEL_DTYPES[backend]:
        pytest.skip(f"{backend} does not take {dtype}")
    got = run(lambda a, b: fn(a, b, backend=backend, **kwargs), student, teacher)
    want = run(lambda a, b: ref(a, b, **kwargs), student.double(), teacher.double())
    same = run(lambda a, b: ref(a, b, **kwargs), student, teacher)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got[0].shape == ()
    assert got[1].dtype == dtype and got[1].shape == student.shape
    assert got[0].device == student.device and got[1].device == student.device
    for label, a, b, c in zip(("loss", "grad"), got, want, same, strict=True):
        assert_matches_at_scale(a, b, dtype, f"{backend} {name} {kwargs} {what} {label}", [c])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}_{'x'.join(map(str, s[1]))}")
@pytest.mark.parametrize("name,kwargs,backend", gram_params())
def test_sp_cc_pkt_parity(name, kwargs, backend, shape):
    n, fs, ft = shape
    if interpreted(backend) and n > INTERPRETED_MAX_N:
        pytest.skip(f"interpreted triton: N <= {INTERPRETED_MAX_N}")
    s, t = embeddings((n, *fs), torch.float32, 46), embeddings((n, *ft), torch.float32, 47)
    check_gram_parity(name, kwargs, backend, s, t)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("name,kwargs,backend", gram_params())
def test_sp_cc_pkt_parity_across_tiles(name, kwargs, backend, dtype):
    """N = 203: several of the cpu backward's 64 × 64 tiles that form dG + dGᵀ
    in place (a partial one last, pairs across the diagonal) and several row
    blocks of the product with X."""
    if interpreted(backend):
        pytest.skip(f"interpreted triton: N <= {INTERPRETED_MAX_N}")
    s, t = embeddings((203, 24), dtype, 50), embeddings((203, 16), dtype, 51)
    check_gram_parity(name, kwargs, backend, s, t, "203 rows")


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("name,kwargs,backend", gram_params())
def test_sp_cc_pkt_reduced_precision(name, kwargs, backend, dtype):
    s, t = embeddings((13, 17), dtype, 48), embeddings((13, 9), dtype, 49)
    check_gram_parity(name, kwargs, backend, s, t, str(dtype))


@pytest.mark.parametrize("name,kwargs,backend", gram_params())
def test_sp_cc_pkt_float64_and_non_contiguous(name, kwargs, backend):
    """float64 (cpu: computed in float64, checked at float64 tolerances; the
    GPU backends refuse it) and non-contiguous (N, C, H, W) views."""
    s = embeddings((8, 3, 4, 2), torch.float32, 58).transpose(1, 3)
    t = embeddings((5, 8), torch.float32, 59).t()
    assert not s.is_contiguous() and not t.is_contiguous()
    check_gram_parity(name, kwargs, backend, s, t, "non-contiguous")
    s, t = embeddings((10, 6), torch.float64, 56), embeddings((10, 4), torch.float64, 57)
    check_gram_parity(name, kwargs, backend, s, t, "float64")  # skips where float64 is not taken


@pytest.mark.parametrize("name,kwargs,backend", gram_params())
def test_sp_cc_pkt_small_n_and_duplicates(name, kwargs, backend):
    """N = 1 and N = 2 (losses 0 and non-trivial), and a batch of identical rows."""
    for n in (1, 2):
        s, t = embeddings((n, 5), torch.float32, 60 + n), embeddings((n, 3), torch.float32, 62 + n)
        check_gram_parity(name, kwargs, backend, s, t, f"N = {n}")
    s = embeddings((1, 6), torch.float32, 65).expand(7, 6).clone()
    t = embeddings((7, 4), torch.float32, 66)
    check_gram_parity(name, kwargs, backend, s, t, "identical student rows")


@pytest.mark.parametrize("name,kwargs,backend", gram_params())
def test_sp_cc_pkt_edge_cases(name, kwargs, backend):
    """A zero embedding (SP: a Gram row below F.normalize's eps, whose gradient
    is 1/eps; PKT: x / eps), duplicates, and a student equal to the teacher
    (loss 0; CC: the norm's zero gradient there)."""
    s, t = embeddings((11, 8), torch.float32, 50), embeddings((11, 5), torch.float32, 51)
    s[4] = 0.0
    s[7] = s[2]
    t[3] = t[9]
    check_gram_parity(name, kwargs, backend, s, t, "zero row and duplicates")
    check_gram_parity(name, kwargs, backend, t, t, "student = teacher")
    loss, grad = run(lambda a, b: OTHERS[name][0](a, b, backend=backend, **kwargs), t, t)
    assert loss.item() == 0.0
    if name != "pkt_loss":  # PKT's gradient there is O(eps), not 0
        assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.id in PKT_KERNELS])
def test_pkt_infinite_entry(backend):
    """An infinite entry: x̂'s inf / inf is zeroed, as in the reference (loss and gradient)."""
    s, t = embeddings((6, 4), torch.float32, 54), embeddings((6, 3), torch.float32, 55)
    s[1, 2] = float("inf")
    check_gram_parity("pkt_loss", {}, backend, s, t, "inf entry")
    assert torch.isfinite(fastkd.pkt_loss(s, t, backend=backend))


@pytest.mark.parametrize("name,kwargs,backend", gram_params())
def test_sp_cc_pkt_nan_and_no_gradient(name, kwargs, backend):
    fn = OTHERS[name][0]
    s, t = embeddings((9, 7), torch.float32, 52), embeddings((9, 5), torch.float32, 53)
    with_grad = fn(s.clone().requires_grad_(True), t, backend=backend, **kwargs)
    with torch.no_grad():
        without = fn(s, t, backend=backend, **kwargs)
    assert torch.allclose(with_grad.detach(), without, rtol=1e-6, atol=0)
    s[2, 3] = float("nan")
    assert torch.isnan(fn(s, t, backend=backend, **kwargs))
    assert torch.isnan(fn(t, s, backend=backend, **kwargs))


@pytest.mark.parametrize("name", OTHERS)
def test_pkt_sp_cc_dispatch(name):
    """"auto" (function and module) runs the device's first kernel backend,
    which every loss of the family has, and its gradient reaches the student."""
    fn, ref, module = OTHERS[name]
    first = KERNEL_BACKENDS[0]
    assert first in KERNELS_OF[name]
    s = embeddings((7, 2, 3), torch.float32, 33).requires_grad_(True)
    t = embeddings((7, 5), torch.float32, 34)
    explicit = fn(s, t, backend=first)
    assert torch.equal(fn(s, t), explicit)
    assert torch.equal(module()(s, t), explicit)
    assert_matches(explicit.detach(), ref(s.double(), t.double()), torch.float32, f"auto {name}")
    fn(s, t).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_pkt_nan_input_gives_nan_but_infinite_entries_are_zeroed():
    s, t = embeddings((5, 4), torch.float32, 35), embeddings((5, 4), torch.float32, 36)
    s_nan = s.clone()
    s_nan[1, 2] = float("nan")
    assert torch.isnan(fastkd.pkt_loss(s_nan, t))
    s_inf = s.clone()
    s_inf[1, 2] = float("inf")
    assert torch.isfinite(fastkd.pkt_loss(s_inf, t))


def test_hyper_parameters_reach_the_reference():
    s, t = embeddings((6, 4), torch.float32, 37).cpu(), embeddings((6, 4), torch.float32, 38).cpu()
    want_cc = reference.cc_loss(s, t, gamma=0.2, order=3)
    assert torch.equal(fastkd.cc_loss(s, t, gamma=0.2, order=3, backend="reference"), want_cc)
    assert torch.equal(fastkd.CCLoss(gamma=0.2, order=3, backend="reference")(s, t), want_cc)
    want_pkt = reference.pkt_loss(s, t, eps=1e-3)
    assert torch.equal(fastkd.pkt_loss(s, t, eps=1e-3, backend="reference"), want_pkt)
    assert torch.equal(fastkd.PKTLoss(eps=1e-3, backend="reference")(s, t), want_pkt)


@pytest.mark.parametrize("backend", kernel_params())
def test_hyper_parameters_reach_the_kernels(backend):
    """Through the functions and the modules: each setting matches the
    reference at that setting, and the settings give different losses."""
    s, t = embeddings((6, 4), torch.float32, 37), embeddings((6, 4), torch.float32, 38)
    ccs = []
    for gamma, order in ((0.2, 3), (0.9, 1)):
        want = reference.cc_loss(s.double(), t.double(), gamma=gamma, order=order)
        got = fastkd.cc_loss(s, t, gamma=gamma, order=order, backend=backend)
        assert_matches(got, want, torch.float32, f"cc gamma={gamma} order={order}")
        assert torch.equal(fastkd.CCLoss(gamma=gamma, order=order, backend=backend)(s, t), got)
        ccs.append(got)
    pkts = []
    for eps in (1e-3, 0.5):
        want = reference.pkt_loss(s.double(), t.double(), eps=eps)
        got = fastkd.pkt_loss(s, t, eps=eps, backend=backend)
        assert_matches(got, want, torch.float32, f"pkt eps={eps}")
        assert torch.equal(fastkd.PKTLoss(eps=eps, backend=backend)(s, t), got)
        pkts.append(got)
    assert not torch.allclose(*ccs) and not torch.allclose(*pkts)


@pytest.mark.parametrize("name", OTHERS)
def test_backend_without_a_kernel(name, monkeypatch):
    """A backend missing from the loss's *_KERNELS tuple: explicit raises, auto runs the reference."""
    tuple_name = {"pkt_loss": "PKT_KERNELS", "sp_loss": "SP_KERNELS", "cc_loss": "CC_KERNELS"}[name]
    monkeypatch.setattr(fastkd.gram_relation, tuple_name, ("triton",))
    monkeypatch.setattr(fastkd._dispatch, "resolve", lambda backend, tensor: "cpu")
    fn = getattr(fastkd, name)
    s, t = torch.randn(4, 5), torch.randn(4, 3)
    with pytest.raises(ValueError, match=f"backend='cpu' has no {name} kernel yet"):
        fn(s, t, backend="cpu")
    assert torch.equal(fn(s, t), getattr(reference, name)(s, t))


@pytest.mark.parametrize(
    "op,extra,needle",
    [
        ("pkt_forward", (0.0,), "eps must be finite and > 0"),
        ("pkt_forward", (float("nan"),), "eps must be finite and > 0"),
        ("cc_forward", (-0.5, 2), "gamma must be finite and > 0"),
        ("cc_forward", (0.4, 0), "order must be >= 1"),
    ],
)
@OPS_ON_DEVICE
def test_op_hyper_parameter_checks(op, extra, needle):
    s, t = embeddings((5, 3), torch.float32, 67), embeddings((5, 2), torch.float32, 68)
    with pytest.raises(RuntimeError, match=needle):
        getattr(torch.ops.fastkd, op)(s, t, True, *extra)


# The largest Taylor order: the reference's coefficient (2γ)^p / p! needs p! as
# a float64, which overflows beyond 170!.
CC_MAX_ORDER = 170


@pytest.mark.parametrize("backend", ["reference", *(p for p in backend_params() if p.id in CC_KERNELS)])
def test_cc_order_is_bounded(backend):
    s, t = embeddings((5, 3), torch.float32, 72), embeddings((5, 2), torch.float32, 73)
    for order in (CC_MAX_ORDER + 1, 2**40):
        with pytest.raises(ValueError, match=rf"order must be <= {CC_MAX_ORDER} \(p! overflows float64"):
            fastkd.cc_loss(s, t, order=order, backend=backend)
        with pytest.raises(ValueError, match=rf"order must be <= {CC_MAX_ORDER} \(p! overflows float64"):
            fastkd.CCLoss(order=order, backend=backend)(s, t)
    # the largest order runs (the float32 reference's (x_i·x_j)^p overflows at
    # such orders, so the reference backend runs it in float64)
    dtype = torch.float64 if backend == "reference" else torch.float32
    got = fastkd.cc_loss(s.to(dtype), t.to(dtype), gamma=0.3, order=CC_MAX_ORDER, backend=backend)
    want = reference.cc_loss(s.double(), t.double(), gamma=0.3, order=CC_MAX_ORDER)
    assert_matches(got, want, dtype, f"{backend} cc order {CC_MAX_ORDER}")


@OPS_ON_DEVICE
def test_cc_op_order_is_bounded():
    s, t = embeddings((5, 3), torch.float32, 74), embeddings((5, 2), torch.float32, 75)
    with pytest.raises(RuntimeError, match=rf"order must be <= {CC_MAX_ORDER} \(p! overflows float64"):
        torch.ops.fastkd.cc_forward(s, t, True, 0.4, 2**40)


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.id == "triton"])
def test_cc_triton_launcher_order_is_bounded(backend):
    from fastkd.kernels import gram_relation as kernels

    s, t = embeddings((5, 3), torch.float32, 76), embeddings((5, 2), torch.float32, 77)
    with pytest.raises(ValueError, match=rf"order must be <= {CC_MAX_ORDER} \(p! overflows float64"):
        kernels.cc_forward(s, t, True, gamma=0.4, order=2**40)


@pytest.mark.parametrize(
    "name, kwargs, backend", [p for p in gram_params() if p.values[2] != "cpu"]
)
@pytest.mark.parametrize("with_grad", (True, False), ids=("grad", "no_grad"))
def test_no_host_reads(name, kwargs, backend, with_grad):
    """A GPU path never reads a value on the host (a device → host sync that
    stalls the stream and breaks CUDA-graph capture; CC's norm stays on the
    device): the forward, which computes the gradient too, with every host
    read refused."""
    fn, ref, _ = OTHERS[name]
    student = embeddings((10, 6), torch.float32, 72)
    teacher = embeddings((10, 5), torch.float32, 73)
    s = student.clone().requires_grad_(with_grad)
    with no_host_reads():
        loss = fn(s, teacher, backend=backend, **kwargs)
    if not with_grad:
        want = ref(student.double(), teacher.double(), **kwargs)
        assert_matches(loss, want, torch.float32, f"{backend} {name} loss")
        return
    loss.backward(torch.tensor(0.7, device=loss.device))
    s_ref = student.double().requires_grad_(True)
    want = ref(s_ref, teacher.double(), **kwargs)
    want.backward(torch.tensor(0.7, dtype=torch.float64, device=want.device))
    assert_matches(loss.detach(), want.detach(), torch.float32, f"{backend} {name} loss")
    assert_matches(s.grad, s_ref.grad, torch.float32, f"{backend} {name} gradient")
