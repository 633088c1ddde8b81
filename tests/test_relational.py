"""Relational losses (SPEC §2): the fused RKD, PKT, SP and CC kernels of every
backend against the float64 reference, edge cases of the Gram formulation (duplicates,
near-duplicates, offsets), the ops themselves (opcheck, C++ checks), dispatch
and validation.

The parity tests run on DEVICE over the family's kernel backends: ``cpu`` and
``triton`` (in the interpreter) here, ``triton`` and ``cuda`` under
``FASTKD_TEST_DEVICE=cuda``. The interpreter is slow, so interpreted triton
takes N ≤ 24 and the reduced-precision dtypes on one shape only.
"""

from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd import _dispatch, _ops, reference
from fastkd.relational import CC_KERNELS, PKT_KERNELS, RKD_KERNELS, SP_KERNELS
from tests.helpers import DEVICE, KERNEL_BACKENDS, assert_matches, backend_params

pytestmark = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR))

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
UPSTREAM = 0.7  # never test only with an upstream gradient of 1
RKD = {
    "rkd_distance": (fastkd.rkd_distance, reference.rkd_distance),
    "rkd_angle": (fastkd.rkd_angle, reference.rkd_angle),
    "rkd_loss": (fastkd.rkd_loss, reference.rkd_loss),
}
INTERPRETED_MAX_N = 24


def kernel_params():
    """The family's kernel backends on DEVICE (skipped with the reason where unavailable)."""
    return [p for p in backend_params() if p.id in RKD_KERNELS]


def interpreted(backend) -> bool:
    return backend == "triton" and DEVICE.type == "cpu"


def embeddings(shape, dtype, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) + shift).to(device=DEVICE, dtype=dtype)


def run(fn, student, teacher, upstream=UPSTREAM):
    """(loss, student gradient) of ``fn`` with a non-unit upstream gradient; the teacher needs none."""
    s = student.detach().clone().requires_grad_(True)
    loss = fn(s, teacher)
    loss.backward(torch.tensor(upstream, dtype=loss.dtype, device=loss.device))
    return loss.detach(), s.grad


def check_parity(backend, name, student, teacher, what=""):
    fused, ref = RKD[name]
    dtype = student.dtype
    if dtype not in _dispatch.KERNEL_DTYPES[backend]:
        pytest.skip(f"{backend} does not take {dtype}")
    if interpreted(backend) and student.shape[0] > INTERPRETED_MAX_N:
        pytest.skip(f"interpreted triton: N <= {INTERPRETED_MAX_N}")
    got = run(lambda a, b: fused(a, b, backend=backend), student, teacher)
    want = run(ref, student.double(), teacher.double())
    same = run(ref, student, teacher)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[1].dtype == dtype and got[1].shape == student.shape
    assert got[0].device == student.device and got[1].device == student.device
    for label, a, b, c in zip(("loss", "grad"), got, want, same, strict=True):
        assert_matches(a, b, dtype, f"{backend} {name} {what} {label}", [c])


# (N, student feature shape, teacher feature shape): N = 1 and 2, tiny and
# awkward feature sizes, SIMD tails (N not a multiple of 8 / 16), (N, C, H, W);
# N = 37 beyond one 32-wide block (compiled backends), N = 21 for the interpreter.
SHAPES = (
    (1, (3,), (4,)),
    (2, (5,), (3,)),
    (3, (1,), (1,)),
    (13, (17,), (9,)),
    (21, (130,), (65,)),
    (37, (130,), (65,)),
    (6, (2, 3, 5), (7,)),
)
# The one shape interpreted triton runs in bfloat16 / float16.
LOW_PRECISION_SHAPE = (13, (17,), (9,))


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}_{'x'.join(map(str, s[1]))}")
@pytest.mark.parametrize("name", RKD)
def test_rkd_parity(name, shape, dtype, backend):
    if interpreted(backend) and dtype != torch.float32 and shape != LOW_PRECISION_SHAPE:
        pytest.skip(f"interpreted triton: {dtype} on shape {LOW_PRECISION_SHAPE} only")
    n, fs, ft = shape
    check_parity(backend, name, embeddings((n, *fs), dtype, 0), embeddings((n, *ft), dtype, 1))


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("name", RKD)
def test_rkd_float64_and_non_contiguous(name, backend):
    s = embeddings((20, 11), torch.float64, 2).t().contiguous().t()  # column-major
    t = embeddings((40, 9), torch.float64, 3)[::2]  # row stride 18
    assert not s.is_contiguous() and not t.is_contiguous()
    if torch.float64 in _dispatch.KERNEL_DTYPES[backend]:
        check_parity(backend, name, s, t, "float64")
    else:
        with pytest.raises(ValueError, match=f"backend='{backend}' does not take torch.float64"):
            RKD[name][0](s, t, backend=backend)
    check_parity(backend, name, s.float(), t.float(), "float32 non-contiguous")


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("name", RKD)
def test_rkd_duplicates_on_both_sides(name, dtype, backend):
    """Exact duplicates (in student and teacher alike): their distance is the
    1e-6 clamp, their normalised difference 0, exactly as in the reference."""
    s, t = embeddings((12, 20), dtype, 4), embeddings((12, 8), dtype, 5)
    for x in (s, t):
        x[5] = x[2]
        x[9] = x[2]
    check_parity(backend, name, s, t, "duplicates")


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("name", ("rkd_distance", "rkd_angle"))
def test_rkd_duplicates_in_the_student_only(name, backend):
    """A collapsed student pair against a distinct teacher pair: the angle's
    gradient is F.normalize's x / eps (~1e12), matched all the same."""
    s, t = embeddings((10, 16), torch.float32, 6), embeddings((10, 16), torch.float32, 7)
    s[7] = s[3]
    check_parity(backend, name, s, t, "student duplicates")


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("scale", (1e-2, 1e-4))
@pytest.mark.parametrize("name", ("rkd_distance", "rkd_angle"))
def test_rkd_nearly_equal_embeddings(name, scale, backend):
    """Rows closer than the Gram form resolves well in float32 (the norms are
    ~10⁴ times the distances at scale 1e-4), far from the origin."""
    s = embeddings((14, 24), torch.float32, 8, shift=3.0)
    t = embeddings((14, 10), torch.float32, 9)
    s[4] = s[1] + scale * embeddings((24,), torch.float32, 10)
    s[11] = s[1] - scale * embeddings((24,), torch.float32, 11)
    t[6] = t[0] + scale * embeddings((10,), torch.float32, 12)
    check_parity(backend, name, s, t, f"near rows {scale}")


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("name", ("rkd_distance", "rkd_angle"))
def test_rkd_converged_student(name, backend):
    """Student ≈ teacher (the loss is tiny): relative accuracy of a small loss."""
    t = embeddings((16, 32), torch.float32, 13, shift=1.0)
    s = t + 1e-3 * embeddings((16, 32), torch.float32, 14)
    check_parity(backend, name, s, t, "converged")


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("name", ("rkd_distance", "rkd_angle"))
def test_rkd_large_offset(name, backend):
    """A common offset 10³ times the spread: centring keeps the Gram form accurate."""
    s = embeddings((15, 12), torch.float32, 15) + 1000.0
    t = embeddings((15, 6), torch.float32, 16) - 500.0
    check_parity(backend, name, s, t, "offset")


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("name", ("rkd_distance", "rkd_angle"))
def test_rkd_small_n_values(name, backend):
    fused = RKD[name][0]
    for n in (1, 2):
        s, t = embeddings((n, 4), torch.float32, 17), embeddings((n, 3), torch.float32, 18)
        loss, grad = run(lambda a, b: fused(a, b, backend=backend), s, t)
        # N = 1: no pair; N = 2: both normalised distances are 1, and the only
        # non-zero angles are a_ijj = 1 on both sides
        assert loss.item() == pytest.approx(0.0, abs=1e-6)
        assert grad.abs().max().item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("name", ("rkd_distance", "rkd_angle"))
def test_rkd_nan_propagates(name, backend):
    fused = RKD[name][0]
    for n in (1, 5):
        s, t = embeddings((n, 3), torch.float32, 19), embeddings((n, 3), torch.float32, 20)
        s[n // 2, 1] = float("nan")
        assert torch.isnan(fused(s, t, backend=backend))
        assert torch.isnan(fused(t, s, backend=backend))


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("name", ("rkd_distance", "rkd_angle"))
def test_rkd_without_gradient_gives_the_same_loss(name, backend):
    fused = RKD[name][0]
    s, t = embeddings((9, 7), torch.float32, 21), embeddings((9, 5), torch.float32, 22)
    with_grad = fused(s.clone().requires_grad_(True), t, backend=backend)
    with torch.no_grad():
        without = fused(s, t, backend=backend)
    assert torch.allclose(with_grad.detach(), without, rtol=1e-6, atol=0)
    assert fused(s, t.requires_grad_(True), backend=backend).requires_grad is False


@pytest.mark.parametrize("backend", kernel_params())
def test_teacher_gets_no_gradient(backend):
    s = embeddings((8, 6), torch.float32, 23).requires_grad_(True)
    t = embeddings((8, 4), torch.float32, 24).requires_grad_(True)
    fastkd.rkd_loss(s, t, backend=backend).backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("backend", kernel_params())
def test_only_the_gradient_is_saved_for_backward(backend):
    n, d = 24, 5
    s = embeddings((n, d), torch.float32, 25).requires_grad_(True)
    t = embeddings((n, d), torch.float32, 26)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = fastkd.rkd_loss(s, t, backend=backend)
    assert saved and max(x.numel() for x in saved) <= n * d < n * n
    loss.backward()


@pytest.mark.parametrize("weights", ((25.0, 50.0), (0.0, 2.0), (3.0, 0.0), (0.0, 0.0)))
def test_rkd_loss_weights_and_module(weights):
    w_d, w_a = weights
    s, t = embeddings((10, 6), torch.float32, 27), embeddings((10, 3), torch.float32, 28)
    kwargs = {"distance_weight": w_d, "angle_weight": w_a}
    backend = KERNEL_BACKENDS[0]
    got = fastkd.rkd_loss(s, t, backend=backend, **kwargs)
    assert_matches(got, reference.rkd_loss(s.double(), t.double(), **kwargs), torch.float32, "rkd_loss")
    module = fastkd.RKDLoss(**kwargs)
    assert torch.equal(module(s, t), fastkd.rkd_loss(s, t, **kwargs))
    assert "angle_weight" in repr(module)


def test_auto_uses_the_first_kernel_backend():
    """backend="auto": cpu for CPU tensors, triton for CUDA tensors."""
    s, t = embeddings((9, 4), torch.float32, 29), embeddings((9, 4), torch.float32, 30)
    backend = KERNEL_BACKENDS[0]
    for name in ("rkd_distance", "rkd_angle"):
        fused = RKD[name][0]
        assert torch.equal(fused(s, t), fused(s, t, backend=backend))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpu backend's SIMD variants")
@pytest.mark.parametrize("capability", ("default", "avx2", "avx512"))
def test_every_simd_variant_matches_the_reference(capability, monkeypatch):
    order = ["default", "avx2", "avx512"]
    if order.index(capability) > order.index(_ops._C.supported_cpu_capability()):
        pytest.skip(f"this CPU does not run {capability}")
    monkeypatch.setenv("FASTKD_CPU_CAPABILITY", capability)
    assert _ops._C.cpu_capability() == capability
    for dtype in (torch.float32, torch.float64):
        s, t = embeddings((19, 7), dtype, 31), embeddings((19, 5), dtype, 32)  # 19: a SIMD tail
        s[3] = s[8]
        check_parity("cpu", "rkd_angle", s, t, capability)
        check_parity("cpu", "rkd_distance", s, t, capability)
        # a zero centred row on the diagonal of each lane position of a vector
        for position in (0, 5, 18):
            s = torch.full((19, 7), 1.5, dtype=dtype)
            s[position] += 1e-3 * torch.arange(7, dtype=dtype)
            s[position + 1 if position < 18 else 0] -= 1e-3 * torch.arange(7, dtype=dtype)
            check_parity("cpu", "rkd_distance", s, t, f"{capability} row {position} at the mean")
        check_parity("cpu", "rkd_distance", torch.ones(19, 7, dtype=dtype), t, f"{capability} collapsed")


# ---- the Triton launchers ------------------------------------------------------------

TRITON = [p for p in kernel_params() if p.id == "triton"]


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("name", ("rkd_distance", "rkd_angle"))
def test_triton_small_blocks(name, backend, monkeypatch):
    """Tiles much smaller than N (several row, j and k blocks, ragged tails,
    three anchor chunks), with duplicates and near pairs on both sides."""
    from fastkd.kernels import relational as kernels

    monkeypatch.setattr(kernels, "pair_config", lambda n, d: (4, 8, 4, 4))
    monkeypatch.setattr(kernels, "row_config", lambda n: (4, 8, 4))
    monkeypatch.setattr(kernels, "near_grad_config", lambda n, d: (8, 4, 4))
    monkeypatch.setattr(kernels, "angle_config", lambda n: (8, 4, 4))
    monkeypatch.setattr(kernels, "anchor_chunks", lambda n, j_blocks: 3)
    s = embeddings((19, 11), torch.float32, 43, shift=2.0)
    t = embeddings((19, 6), torch.float32, 44)
    s[5] = s[2]
    s[13] = s[2] + 1e-3 * embeddings((11,), torch.float32, 45)
    t[7] = t[1]
    check_parity(backend, name, s, t, "small blocks")


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize(
    "student,teacher,grad,needle",
    [
        (torch.randn(7), torch.randn(7, 3), True, "student must be 2-D"),
        (torch.randn(7, 3), torch.randn(6, 3), True, "same number of samples"),
        (torch.randn(7, 3), torch.randn(7, 3).half(), True, "same dtype"),
        (torch.randn(7, 3).double(), torch.randn(7, 3).double(), True, "student must be float32"),
        (torch.randn(0, 3), torch.randn(0, 3), True, "at least one sample"),
        (torch.randn(7, 0), torch.randn(7, 3), True, "student must have at least one feature"),
        (torch.randn(7, 3), torch.randn(7, 3), 1, "student_grad must be a bool"),
        ([[1.0]], torch.randn(1, 3), True, "student must be a torch.Tensor"),
    ],
)
@pytest.mark.parametrize("name", ("rkd_distance", "rkd_angle"))
def test_triton_launcher_checks(name, student, teacher, grad, needle, backend):
    from fastkd.kernels import relational as kernels

    move = (lambda x: x.to(DEVICE)) if DEVICE.type == "cuda" else (lambda x: x)
    student = move(student) if isinstance(student, torch.Tensor) else student
    with pytest.raises(ValueError, match=needle):
        getattr(kernels, f"{name}_forward")(student, move(teacher), grad)


# ---- SP, CC, PKT (kernels on cpu, triton, cuda) ----------------------------------------

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
        assert_matches(a, b, dtype, f"{backend} {name} {kwargs} {what} {label}", [c])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}_{'x'.join(map(str, s[1]))}")
@pytest.mark.parametrize("name,kwargs,backend", gram_params())
def test_sp_cc_pkt_parity(name, kwargs, backend, shape):
    n, fs, ft = shape
    if interpreted(backend) and n > INTERPRETED_MAX_N:
        pytest.skip(f"interpreted triton: N <= {INTERPRETED_MAX_N}")
    s, t = embeddings((n, *fs), torch.float32, 46), embeddings((n, *ft), torch.float32, 47)
    check_gram_parity(name, kwargs, backend, s, t)


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


# ---- dispatch ----------------------------------------------------------------------


@pytest.mark.parametrize("name", (*RKD, *OTHERS))
def test_explicit_gpu_backend_on_cpu_tensors_raises(name):
    fn = getattr(fastkd, name)
    with pytest.raises(ValueError, match="backend='cuda'"):
        fn(torch.randn(4, 5), torch.randn(4, 5), backend="cuda")


@pytest.mark.parametrize("name", OTHERS)
def test_backend_without_a_kernel(name, monkeypatch):
    """A backend missing from the loss's *_KERNELS tuple: explicit raises, auto runs the reference."""
    tuple_name = {"pkt_loss": "PKT_KERNELS", "sp_loss": "SP_KERNELS", "cc_loss": "CC_KERNELS"}[name]
    monkeypatch.setattr(fastkd.relational, tuple_name, ("triton",))
    monkeypatch.setattr(fastkd._dispatch, "resolve", lambda backend, tensor: "cpu")
    fn = getattr(fastkd, name)
    s, t = torch.randn(4, 5), torch.randn(4, 3)
    with pytest.raises(ValueError, match=f"backend='cpu' has no {name} kernel yet"):
        fn(s, t, backend="cpu")
    assert torch.equal(fn(s, t), getattr(reference, name)(s, t))


# ---- the ops --------------------------------------------------------------------


# The ops on DEVICE: the cpu implementation here, the cuda one under FASTKD_TEST_DEVICE=cuda.
OPS_ON_DEVICE = pytest.mark.skipif(
    DEVICE.type == "cuda" and _ops.CUDA_EXTENSION_ERROR is not None, reason=str(_ops.CUDA_EXTENSION_ERROR)
)


# The ops' hyper-parameters after (student, teacher, student_grad).
OP_EXTRA = {
    "rkd_distance_forward": (),
    "rkd_angle_forward": (),
    "pkt_forward": (1e-7,),
    "sp_forward": (),
    "cc_forward": (0.4, 2),
}


@OPS_ON_DEVICE
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16, torch.float64), ids=str)
@pytest.mark.parametrize("op", OP_EXTRA)
def test_opcheck(op, dtype):
    fn = getattr(torch.ops.fastkd, op)
    extra = OP_EXTRA[op]
    s, t = embeddings((9, 6), dtype, 39), embeddings((9, 4), dtype, 40)
    if DEVICE.type == "cuda" and dtype == torch.float64:
        with pytest.raises(RuntimeError, match="float64"):
            fn(s, t, True, *extra)
        return
    for student_grad in (True, False):
        torch.library.opcheck(fn.default, (s, t, student_grad, *extra))
    loss, grad = fn(s, t, True, *extra)
    assert loss.shape == () and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.shape == s.shape and grad.dtype == dtype and grad.device == s.device
    assert fn(s, t, False, *extra)[1].shape == (0, 0)
    assert torch.equal(fn(s, t, False, *extra)[0], loss)


@pytest.mark.parametrize(
    "student,teacher,needle",
    [
        (torch.randn(7), torch.randn(7, 3), "student must be 2-D"),
        (torch.randn(7, 3), torch.randn(6, 3), "same number of samples"),
        (torch.randn(7, 3), torch.randn(7, 3, dtype=torch.float64), "same dtype"),
        (torch.ones(7, 3, dtype=torch.int32), torch.ones(7, 3, dtype=torch.int32), "floating-point"),
        (torch.randn(0, 3), torch.randn(0, 3), "at least one sample"),
        (torch.randn(7, 0), torch.randn(7, 3), "at least one feature"),
    ],
)
@pytest.mark.parametrize("op", OP_EXTRA)
@OPS_ON_DEVICE
def test_op_checks(op, student, teacher, needle):
    with pytest.raises(RuntimeError, match=needle):
        getattr(torch.ops.fastkd, op)(student.to(DEVICE), teacher.to(DEVICE), True, *OP_EXTRA[op])


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



# ---- validation -------------------------------------------------------------------


@pytest.mark.parametrize("name", (*RKD, *OTHERS))
@pytest.mark.parametrize(
    "student,teacher,needle",
    [
        (torch.randn(6), torch.randn(6, 3), "student must have at least 2 dim"),
        (torch.randn(6, 3), torch.randn(6), "teacher must have at least 2 dim"),
        (torch.randn(6, 3), torch.randn(5, 3), "teacher shape .* dim 0"),
        (torch.ones(6, 3, dtype=torch.int64), torch.randn(6, 3), "student must have dtype"),
        (torch.randn(6, 3), torch.ones(6, 3, dtype=torch.int64), "teacher must have dtype"),
        (torch.randn(6, 3), torch.randn(6, 3, dtype=torch.float64), "teacher dtype"),
        (torch.randn(6, 3), torch.randn(6, 3, device="meta"), "teacher is on meta"),
        (torch.randn(0, 3), torch.randn(0, 3), "student must hold at least one sample"),
        (torch.randn(6, 0), torch.randn(6, 3), "student must have a non-empty feature size"),
        ([[1.0]], torch.randn(1, 1), "student must be a torch.Tensor"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(name, student, teacher, needle):
    with pytest.raises(ValueError, match=needle):
        getattr(fastkd, name)(student, teacher, backend="auto")


@pytest.mark.parametrize(
    "call,needle",
    [
        (lambda s, t: fastkd.rkd_loss(s, t, distance_weight=-1.0), "distance_weight"),
        (lambda s, t: fastkd.rkd_loss(s, t, angle_weight=float("nan")), "angle_weight"),
        (lambda s, t: fastkd.pkt_loss(s, t, eps=0.0), "eps"),
        (lambda s, t: fastkd.cc_loss(s, t, gamma=-0.1), "gamma"),
        (lambda s, t: fastkd.cc_loss(s, t, order=1.5), "order"),
        (lambda s, t: fastkd.rkd_angle(s, t, backend="fast"), "backend"),
    ],
)
def test_bad_hyper_parameters_raise_value_error(call, needle):
    with pytest.raises(ValueError, match=needle):
        call(torch.randn(5, 3), torch.randn(5, 3))


@OPS_ON_DEVICE
@pytest.mark.parametrize(
    "name,kwargs",
    [("rkd_loss", {}), ("pkt_loss", {"eps": 1e-3}), ("sp_loss", {}), ("cc_loss", {"gamma": 0.3, "order": 3})],
)
def test_torch_compile_fullgraph(name, kwargs):
    """The op-based backend of DEVICE (cpu, or cuda) under torch.compile, hyper-parameters included."""
    backend = DEVICE.type
    fn = getattr(fastkd, name)
    s = embeddings((9, 6), torch.float32, 41)
    t = embeddings((9, 4), torch.float32, 42)
    compiled = torch.compile(lambda a, b: fn(a, b, backend=backend, **kwargs), fullgraph=True)
    got = run(compiled, s, t)
    want = run(lambda a, b: fn(a, b, backend=backend, **kwargs), s, t)
    for a, b in zip(got, want, strict=True):
        assert_matches(a, b.double(), torch.float32, f"compiled {name}")


# ---- degenerate batches, hyper-parameter bounds, threads, autograd ---------------------


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("n", (2, 5))
@pytest.mark.parametrize("name", ("rkd_distance", "rkd_loss"))
def test_rkd_collapsed_student(name, n, backend):
    """Every student row equal (all pairwise distances at the 1e-6 clamp, so each
    normalised distance is 1): only the off-diagonal distances enter the mean."""
    t = embeddings((n, 3), torch.float32, 70)
    for s in (torch.ones(n, 4), torch.full((n, 4), -2.5)):
        check_parity(backend, name, s.to(DEVICE), t, "collapsed student")


@pytest.mark.parametrize("backend", kernel_params())
def test_rkd_distance_row_at_the_mean(backend):
    """A row equal to the batch mean (a zero row once centred) among distinct rows."""
    s = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]], device=DEVICE) * 1e-3
    t = embeddings((3, 2), torch.float32, 71)
    check_parity(backend, "rkd_distance", s, t, "row at the mean")


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
    from fastkd.kernels import relational as kernels

    s, t = embeddings((5, 3), torch.float32, 76), embeddings((5, 2), torch.float32, 77)
    with pytest.raises(ValueError, match=rf"order must be <= {CC_MAX_ORDER} \(p! overflows float64"):
        kernels.cc_forward(s, t, True, gamma=0.4, order=2**40)


# Every relational loss with a cpu kernel, as f(student, teacher, backend=...).
ALL_LOSSES = {
    "rkd_distance": fastkd.rkd_distance,
    "rkd_angle": fastkd.rkd_angle,
    "rkd_loss": fastkd.rkd_loss,
    "pkt_loss": fastkd.pkt_loss,
    "sp_loss": fastkd.sp_loss,
    "cc_loss": fastkd.cc_loss,
}


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_cpu_result_does_not_depend_on_the_thread_count(name, dtype):
    """Loss and gradient bit for bit the same with 1, 2 and 4 threads (N large
    enough for several row and anchor chunks, a near pair included)."""
    fn = ALL_LOSSES[name]
    s, t = embeddings((203, 24), dtype, 78).cpu(), embeddings((203, 16), dtype, 79).cpu()
    s[7] = s[150] + 1e-4
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 4):
            torch.set_num_threads(count)
            results.append(run(lambda a, b: fn(a, b, backend="cpu"), s, t))
    finally:
        torch.set_num_threads(threads)
    for count, (loss, grad) in zip((2, 4), results[1:], strict=True):
        assert torch.equal(loss, results[0][0]), f"{name} loss with {count} threads"
        assert torch.equal(grad, results[0][1]), f"{name} gradient with {count} threads"


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_second_backward_through_a_retained_graph(name, backend):
    """backward(retain_graph=True) then backward again: twice the gradient, the
    saved gradient untouched (with a unit upstream gradient too)."""
    fn = ALL_LOSSES[name]
    s, t = embeddings((7, 5), torch.float32, 80), embeddings((7, 3), torch.float32, 81)
    for upstream in (UPSTREAM, 1.0):
        once = run(lambda a, b: fn(a, b, backend=backend), s, t, upstream)[1]
        x = s.detach().clone().requires_grad_(True)
        loss = fn(x, t, backend=backend)
        grad_output = torch.tensor(upstream, dtype=loss.dtype, device=loss.device)
        loss.backward(grad_output, retain_graph=True)
        loss.backward(grad_output)
        assert torch.equal(x.grad, 2 * once)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_cpu_gradcheck_float64(name):
    """gradcheck (which also runs each backward twice) on the loss and on a
    multiple of it (a non-unit upstream gradient)."""
    fn = ALL_LOSSES[name]
    s, t = embeddings((6, 4), torch.float64, 82).cpu(), embeddings((6, 3), torch.float64, 83).cpu()
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: fn(a, t, backend="cpu"), (s,))
    assert torch.autograd.gradcheck(lambda a: UPSTREAM * fn(a, t, backend="cpu"), (s,))
