"""RKD distance and angle (docs/spec.md §2): every fused backend (cpu + triton here, triton + cuda under
FASTKD_TEST_DEVICE=cuda) against the float64 reference, degenerate batches, the SIMD variants,
the Triton launchers and rkd_loss / RKDLoss."""

from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd import _dispatch, _ops, reference
from fastkd.reference._common import NORMALIZE_EPS
from fastkd.rkd import RKD_KERNELS
from tests.helpers import DEVICE, KERNEL_BACKENDS, assert_matches, assert_matches_at_scale, backend_params
from tests.no_host_reads import no_host_reads
from tests.pairwise_helpers import INTERPRETED_MAX_N, SHAPES, embeddings, interpreted, run

pytestmark = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR))


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


RKD = {
    "rkd_distance": (fastkd.rkd_distance, reference.rkd_distance),
    "rkd_angle": (fastkd.rkd_angle, reference.rkd_angle),
    "rkd_loss": (fastkd.rkd_loss, reference.rkd_loss),
}


def kernel_params():
    """The family's kernel backends on DEVICE (skipped with the reason where unavailable)."""
    return [p for p in backend_params() if p.id in RKD_KERNELS]


def over_terms_and_backends(test):
    """``test(name, backend)`` parametrised over the two RKD terms and the kernel backends."""
    test = pytest.mark.parametrize("name", ("rkd_distance", "rkd_angle"))(test)
    return pytest.mark.parametrize("backend", kernel_params())(test)


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
        assert_matches_at_scale(a, b, dtype, f"{backend} {name} {what} {label}", [c])


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


@over_terms_and_backends
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


@over_terms_and_backends
def test_rkd_converged_student(name, backend):
    """Student ≈ teacher (the loss is tiny): relative accuracy of a small loss."""
    t = embeddings((16, 32), torch.float32, 13, shift=1.0)
    s = t + 1e-3 * embeddings((16, 32), torch.float32, 14)
    check_parity(backend, name, s, t, "converged")


@over_terms_and_backends
def test_rkd_large_offset(name, backend):
    """A common offset 10³ times the spread: centring keeps the Gram form accurate."""
    s = embeddings((15, 12), torch.float32, 15) + 1000.0
    t = embeddings((15, 6), torch.float32, 16) - 500.0
    check_parity(backend, name, s, t, "offset")


@over_terms_and_backends
def test_rkd_small_n_values(name, backend):
    fused = RKD[name][0]
    for n in (1, 2):
        s, t = embeddings((n, 4), torch.float32, 17), embeddings((n, 3), torch.float32, 18)
        loss, grad = run(lambda a, b: fused(a, b, backend=backend), s, t)
        # N = 1: no pair; N = 2: both normalised distances are 1, and the only
        # non-zero angles are a_ijj = 1 on both sides
        assert loss.item() == pytest.approx(0.0, abs=1e-6)
        assert grad.abs().max().item() == pytest.approx(0.0, abs=1e-6)


@over_terms_and_backends
def test_rkd_nan_propagates(name, backend):
    fused = RKD[name][0]
    for n in (1, 5):
        s, t = embeddings((n, 3), torch.float32, 19), embeddings((n, 3), torch.float32, 20)
        s[n // 2, 1] = float("nan")
        assert torch.isnan(fused(s, t, backend=backend))
        assert torch.isnan(fused(t, s, backend=backend))


@over_terms_and_backends
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


TRITON = [p for p in kernel_params() if p.id == "triton"]


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("name", ("rkd_distance", "rkd_angle"))
def test_triton_small_blocks(name, backend, monkeypatch):
    """Tiles much smaller than N (several row, j and k blocks, ragged tails,
    three anchor chunks), with duplicates and near pairs on both sides."""
    from fastkd.kernels import rkd as kernels

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
    from fastkd.kernels import rkd as kernels

    move = (lambda x: x.to(DEVICE)) if DEVICE.type == "cuda" else (lambda x: x)
    student = move(student) if isinstance(student, torch.Tensor) else student
    with pytest.raises(ValueError, match=needle):
        getattr(kernels, f"{name}_forward")(student, move(teacher), grad)


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


@pytest.mark.parametrize("backend", [p for p in kernel_params() if p.id != "cpu"])
@pytest.mark.parametrize("with_grad", (True, False), ids=("grad", "no_grad"))
@pytest.mark.parametrize("name", ("rkd_distance", "rkd_angle"))
def test_no_host_reads(backend, name, with_grad):
    """A GPU path never reads a value on the host (a device → host sync that
    stalls the stream and breaks CUDA-graph capture): the forward, which
    computes the gradient too, with every host read refused. Coinciding rows
    take the near-pair paths."""
    fused, ref = RKD[name]
    student = embeddings((11, 6), torch.float32, 70)
    student[7] = student[2]
    teacher = embeddings((11, 4), torch.float32, 71)
    s = student.clone().requires_grad_(with_grad)
    with no_host_reads():
        loss = fused(s, teacher, backend=backend)
    if not with_grad:
        assert_matches(loss, ref(student.double(), teacher.double()), torch.float32, f"{backend} {name} loss")
        return
    loss.backward(torch.tensor(0.7, device=loss.device))
    s_ref = student.double().requires_grad_(True)
    want = ref(s_ref, teacher.double())
    want.backward(torch.tensor(0.7, dtype=torch.float64, device=want.device))
    assert_matches(loss.detach(), want.detach(), torch.float32, f"{backend} {name} loss")
    assert_matches(s.grad, s_ref.grad, torch.float32, f"{backend} {name} gradient")


def anchorwise_angle(student, teacher, upstream=0.7):
    """float64 RKD angle loss and student gradient, one anchor at a time: the
    reference's formula with ``(N, N)`` memory per step instead of ``(N, N, N)``."""
    s = student.detach().double().requires_grad_(True)
    t = teacher.detach().double()
    n = s.shape[0]

    def angles(x, i):
        e = torch.nn.functional.normalize(x - x[i], p=2, dim=1, eps=NORMALIZE_EPS)
        return e @ e.T

    total = torch.zeros((), dtype=torch.float64, device=s.device)
    for i in range(n):
        term = torch.nn.functional.smooth_l1_loss(angles(s, i), angles(t, i), beta=1.0, reduction="sum")
        term = term * (upstream / n**3)
        term.backward()
        total += term.detach()
    return total / upstream, s.grad


def test_anchorwise_angle_equals_the_reference():
    s, t = embeddings((21, 5), torch.float64, 80), embeddings((21, 3), torch.float64, 81)
    s[4] = s[9]
    loss, grad = anchorwise_angle(s, t)
    want = run(reference.rkd_angle, s, t)
    torch.testing.assert_close(loss, want[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, want[1], rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize(
    "dtype, n", [(torch.float32, 600), (torch.float64, 300), (torch.float64, 521)],
    ids=("float32", "float64", "float64-row-blocks"),
)
def test_rkd_angle_at_a_larger_n(dtype, n, backend):
    """An N of a few hundred, against the anchorwise float64 formula: full
    anchor blocks, 32 chunks of anchors in several waves of partial
    gradients, and rows of many SIMD vectors on the CPU (from N = 512 the
    far anchors' rows four at a time, with a last block of one row at
    N = 521); many blocks per program on a GPU. The shared parity shapes stop at N = 37 (the reference
    holds N³ angles). Every seventh student row is a near copy of
    the one before it, so some anchors take the exact path and share blocks
    with anchors that do not."""
    if interpreted(backend):
        pytest.skip(f"interpreted triton: N <= {INTERPRETED_MAX_N}")
    if dtype not in _dispatch.KERNEL_DTYPES[backend]:
        pytest.skip(f"{backend} does not take {dtype}")
    s = embeddings((n, 6), torch.float64, 82)
    s[7::7] = s[6:-1:7] + 1e-3 * embeddings((len(range(7, n, 7)), 6), torch.float64, 83)
    s, t = s.to(dtype), embeddings((n, 4), dtype, 84)
    got = run(lambda a, b: fastkd.rkd_angle(a, b, backend=backend), s, t)
    want = anchorwise_angle(s, t)
    for label, a, b in zip(("loss", "grad"), got, want, strict=True):
        assert_matches_at_scale(a, b, dtype, f"{backend} rkd_angle N={n} {label}")
