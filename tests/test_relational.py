"""Relational losses (SPEC §2): the fused cpu RKD ops against the float64
reference, edge cases of the Gram formulation (duplicates, near-duplicates,
offsets), the ops themselves (opcheck, C++ checks), dispatch and validation."""

from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd import _ops, reference
from tests.helpers import assert_matches

pytestmark = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR))

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
UPSTREAM = 0.7  # never test only with an upstream gradient of 1
RKD = {
    "rkd_distance": (fastkd.rkd_distance, reference.rkd_distance),
    "rkd_angle": (fastkd.rkd_angle, reference.rkd_angle),
    "rkd_loss": (fastkd.rkd_loss, reference.rkd_loss),
}


def embeddings(shape, dtype, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) + shift).to(dtype)


def run(fn, student, teacher, upstream=UPSTREAM):
    """(loss, student gradient) of ``fn`` with a non-unit upstream gradient; the teacher needs none."""
    s = student.detach().clone().requires_grad_(True)
    loss = fn(s, teacher)
    loss.backward(torch.tensor(upstream, dtype=loss.dtype))
    return loss.detach(), s.grad


def check_parity(name, student, teacher, what=""):
    fused, ref = RKD[name]
    dtype = student.dtype
    got = run(lambda a, b: fused(a, b, backend="cpu"), student, teacher)
    want = run(ref, student.double(), teacher.double())
    same = run(ref, student, teacher)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[1].dtype == dtype and got[1].shape == student.shape
    for label, a, b, c in zip(("loss", "grad"), got, want, same, strict=True):
        assert_matches(a, b, dtype, f"cpu {name} {what} {label}", [c])


# (N, student feature shape, teacher feature shape): N = 1 and 2, tiny and
# awkward feature sizes, SIMD tails (N not a multiple of 8 / 16), (N, C, H, W).
SHAPES = (
    (1, (3,), (4,)),
    (2, (5,), (3,)),
    (3, (1,), (1,)),
    (13, (17,), (9,)),
    (37, (130,), (65,)),
    (6, (2, 3, 5), (7,)),
)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}_{'x'.join(map(str, s[1]))}")
@pytest.mark.parametrize("name", RKD)
def test_rkd_parity(name, shape, dtype):
    n, fs, ft = shape
    check_parity(name, embeddings((n, *fs), dtype, 0), embeddings((n, *ft), dtype, 1))


@pytest.mark.parametrize("name", RKD)
def test_rkd_float64_and_non_contiguous(name):
    s = embeddings((20, 11), torch.float64, 2).t().contiguous().t()  # column-major
    t = embeddings((40, 9), torch.float64, 3)[::2]  # row stride 18
    assert not s.is_contiguous() and not t.is_contiguous()
    check_parity(name, s, t, "float64")
    check_parity(name, s.float(), t.float(), "float32 non-contiguous")


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("name", RKD)
def test_rkd_duplicates_on_both_sides(name, dtype):
    """Exact duplicates (in student and teacher alike): their distance is the
    1e-6 clamp, their normalised difference 0, exactly as in the reference."""
    s, t = embeddings((12, 20), dtype, 4), embeddings((12, 8), dtype, 5)
    for x in (s, t):
        x[5] = x[2]
        x[9] = x[2]
    check_parity(name, s, t, "duplicates")


@pytest.mark.parametrize("name", ("rkd_distance", "rkd_angle"))
def test_rkd_duplicates_in_the_student_only(name):
    """A collapsed student pair against a distinct teacher pair: the angle's
    gradient is F.normalize's x / eps (~1e12), matched all the same."""
    s, t = embeddings((10, 16), torch.float32, 6), embeddings((10, 16), torch.float32, 7)
    s[7] = s[3]
    check_parity(name, s, t, "student duplicates")


@pytest.mark.parametrize("scale", (1e-2, 1e-4))
@pytest.mark.parametrize("name", RKD)
def test_rkd_nearly_equal_embeddings(name, scale):
    """Rows closer than the Gram form resolves well in float32 (the norms are
    ~10⁴ times the distances at scale 1e-4), far from the origin."""
    s = embeddings((14, 24), torch.float32, 8, shift=3.0)
    t = embeddings((14, 10), torch.float32, 9)
    s[4] = s[1] + scale * embeddings((24,), torch.float32, 10)
    s[11] = s[1] - scale * embeddings((24,), torch.float32, 11)
    t[6] = t[0] + scale * embeddings((10,), torch.float32, 12)
    check_parity(name, s, t, f"near rows {scale}")


@pytest.mark.parametrize("name", RKD)
def test_rkd_converged_student(name):
    """Student ≈ teacher (the loss is tiny): relative accuracy of a small loss."""
    t = embeddings((16, 32), torch.float32, 13, shift=1.0)
    s = t + 1e-3 * embeddings((16, 32), torch.float32, 14)
    check_parity(name, s, t, "converged")


@pytest.mark.parametrize("name", RKD)
def test_rkd_large_offset(name):
    """A common offset 10³ times the spread: centring keeps the Gram form accurate."""
    s = embeddings((15, 12), torch.float32, 15) + 1000.0
    t = embeddings((15, 6), torch.float32, 16) - 500.0
    check_parity(name, s, t, "offset")


@pytest.mark.parametrize("name", ("rkd_distance", "rkd_angle"))
def test_rkd_small_n_values(name):
    fused = RKD[name][0]
    for n in (1, 2):
        s, t = embeddings((n, 4), torch.float32, 17), embeddings((n, 3), torch.float32, 18)
        loss, grad = run(lambda a, b: fused(a, b, backend="cpu"), s, t)
        if n == 1 or name == "rkd_angle":
            # N = 1: no pair; N = 2: the only non-zero angles are a_ijj = 1 on both sides
            assert loss.item() == pytest.approx(0.0, abs=1e-6)
            assert grad.abs().max().item() == pytest.approx(0.0, abs=1e-6)
        else:
            # N = 2: both normalised distances are 1
            assert loss.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", RKD)
def test_rkd_nan_propagates(name):
    fused = RKD[name][0]
    for n in (1, 5):
        s, t = embeddings((n, 3), torch.float32, 19), embeddings((n, 3), torch.float32, 20)
        s[n // 2, 1] = float("nan")
        assert torch.isnan(fused(s, t, backend="cpu"))
        assert torch.isnan(fused(t, s, backend="cpu"))


@pytest.mark.parametrize("name", RKD)
def test_rkd_without_gradient_gives_the_same_loss(name):
    fused = RKD[name][0]
    s, t = embeddings((9, 7), torch.float32, 21), embeddings((9, 5), torch.float32, 22)
    with_grad = fused(s.clone().requires_grad_(True), t, backend="cpu")
    with torch.no_grad():
        without = fused(s, t, backend="cpu")
    assert torch.allclose(with_grad.detach(), without, rtol=1e-6, atol=0)
    assert fused(s, t.requires_grad_(True), backend="cpu").requires_grad is False


def test_teacher_gets_no_gradient():
    s = embeddings((8, 6), torch.float32, 23).requires_grad_(True)
    t = embeddings((8, 4), torch.float32, 24).requires_grad_(True)
    fastkd.rkd_loss(s, t, backend="cpu").backward()
    assert s.grad is not None and t.grad is None


def test_only_the_gradient_is_saved_for_backward():
    n, d = 64, 5
    s = embeddings((n, d), torch.float32, 25).requires_grad_(True)
    t = embeddings((n, d), torch.float32, 26)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = fastkd.rkd_loss(s, t, backend="cpu")
    assert saved and max(x.numel() for x in saved) <= n * d < n * n
    loss.backward()


@pytest.mark.parametrize("weights", ((25.0, 50.0), (0.0, 2.0), (3.0, 0.0), (0.0, 0.0)))
def test_rkd_loss_weights_and_module(weights):
    w_d, w_a = weights
    s, t = embeddings((10, 6), torch.float32, 27), embeddings((10, 3), torch.float32, 28)
    kwargs = {"distance_weight": w_d, "angle_weight": w_a}
    got = fastkd.rkd_loss(s, t, backend="cpu", **kwargs)
    assert_matches(got, reference.rkd_loss(s.double(), t.double(), **kwargs), torch.float32, "rkd_loss")
    module = fastkd.RKDLoss(**kwargs)
    assert torch.equal(module(s, t), fastkd.rkd_loss(s, t, **kwargs))
    assert "angle_weight" in repr(module)


def test_auto_uses_the_cpu_kernel():
    s, t = embeddings((9, 4), torch.float32, 29), embeddings((9, 4), torch.float32, 30)
    for name in ("rkd_distance", "rkd_angle"):
        fused = RKD[name][0]
        assert torch.equal(fused(s, t), fused(s, t, backend="cpu"))


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
        check_parity("rkd_angle", s, t, capability)


# ---- PKT, SP, CC: no fused kernel yet -------------------------------------------

OTHERS = {
    "pkt_loss": (fastkd.pkt_loss, reference.pkt_loss, fastkd.PKTLoss),
    "sp_loss": (fastkd.sp_loss, reference.sp_loss, fastkd.SPLoss),
    "cc_loss": (fastkd.cc_loss, reference.cc_loss, fastkd.CCLoss),
}


@pytest.mark.parametrize("name", OTHERS)
def test_reference_only_losses(name):
    fn, ref, module = OTHERS[name]
    s = embeddings((7, 2, 3), torch.float32, 33).requires_grad_(True)
    t = embeddings((7, 5), torch.float32, 34)
    assert torch.equal(fn(s, t), ref(s, t))
    assert torch.equal(module()(s, t), ref(s, t))
    with pytest.raises(ValueError, match=f"backend='cpu' has no {name} kernel yet"):
        fn(s, t, backend="cpu")
    fn(s, t).backward()
    assert s.grad is not None


def test_pkt_nan_input_gives_nan_but_infinite_entries_are_zeroed():
    s, t = embeddings((5, 4), torch.float32, 35), embeddings((5, 4), torch.float32, 36)
    s_nan = s.clone()
    s_nan[1, 2] = float("nan")
    assert torch.isnan(fastkd.pkt_loss(s_nan, t))
    s_inf = s.clone()
    s_inf[1, 2] = float("inf")
    assert torch.isfinite(fastkd.pkt_loss(s_inf, t))


def test_hyper_parameters_reach_the_reference():
    s, t = embeddings((6, 4), torch.float32, 37), embeddings((6, 4), torch.float32, 38)
    assert torch.equal(fastkd.cc_loss(s, t, gamma=0.2, order=3), reference.cc_loss(s, t, gamma=0.2, order=3))
    assert torch.equal(fastkd.CCLoss(gamma=0.2, order=3)(s, t), reference.cc_loss(s, t, gamma=0.2, order=3))
    assert torch.equal(fastkd.pkt_loss(s, t, eps=1e-3), reference.pkt_loss(s, t, eps=1e-3))
    assert torch.equal(fastkd.PKTLoss(eps=1e-3)(s, t), reference.pkt_loss(s, t, eps=1e-3))


# ---- dispatch ----------------------------------------------------------------------


@pytest.mark.parametrize("name", (*RKD, *OTHERS))
def test_explicit_gpu_backend_on_cpu_tensors_raises(name):
    fn = getattr(fastkd, name)
    with pytest.raises(ValueError, match="backend='cuda'"):
        fn(torch.randn(4, 5), torch.randn(4, 5), backend="cuda")


@pytest.mark.parametrize("name", ("rkd_distance", "rkd_angle"))
def test_backend_without_a_kernel(name, monkeypatch):
    """As on CUDA tensors today: explicit triton raises, auto runs the reference."""
    monkeypatch.setattr(fastkd._dispatch, "resolve", lambda backend, tensor: "triton")
    fn = getattr(fastkd, name)
    s, t = torch.randn(4, 5), torch.randn(4, 3)
    with pytest.raises(ValueError, match=f"backend='triton' has no {name} kernel yet"):
        fn(s, t, backend="triton")
    assert torch.equal(fn(s, t), getattr(reference, name)(s, t))


# ---- the ops --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("op", ("rkd_distance_forward", "rkd_angle_forward"))
def test_opcheck(op, dtype):
    fn = getattr(torch.ops.fastkd, op)
    s, t = embeddings((9, 6), dtype, 39), embeddings((9, 4), dtype, 40)
    for student_grad in (True, False):
        torch.library.opcheck(fn.default, (s, t, student_grad))
    loss, grad = fn(s, t, True)
    assert loss.shape == () and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.shape == s.shape and grad.dtype == dtype
    assert fn(s, t, False)[1].shape == (0, 0)


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
@pytest.mark.parametrize("op", ("rkd_distance_forward", "rkd_angle_forward"))
def test_op_checks(op, student, teacher, needle):
    with pytest.raises(RuntimeError, match=needle):
        getattr(torch.ops.fastkd, op)(student, teacher, True)


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


def test_torch_compile_fullgraph():
    s = embeddings((9, 6), torch.float32, 41)
    t = embeddings((9, 4), torch.float32, 42)
    compiled = torch.compile(lambda a, b: fastkd.rkd_loss(a, b, backend="cpu"), fullgraph=True)
    got = run(compiled, s, t)
    want = run(lambda a, b: fastkd.rkd_loss(a, b, backend="cpu"), s, t)
    for a, b in zip(got, want, strict=True):
        assert_matches(a, b.double(), torch.float32, "compiled rkd_loss")
