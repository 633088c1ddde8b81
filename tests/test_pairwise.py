"""What every pairwise-relation loss (RKD, PKT, SP, CC) shares: the argument checks, the ops'
contract (opcheck, C++ checks), torch.compile, thread-count independence, a retained graph
and gradcheck."""

from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd import _ops
from fastkd.rkd import RKD_KERNELS
from tests.helpers import DEVICE, assert_matches, backend_params
from tests.pairwise_helpers import (
    OPS_ON_DEVICE,
    UPSTREAM,
    embeddings,
    run,
)

pytestmark = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR))


# Every pairwise-relation loss, as f(student, teacher, backend=...).
ALL_LOSSES = {
    "rkd_distance": fastkd.rkd_distance,
    "rkd_angle": fastkd.rkd_angle,
    "rkd_loss": fastkd.rkd_loss,
    "pkt_loss": fastkd.pkt_loss,
    "sp_loss": fastkd.sp_loss,
    "cc_loss": fastkd.cc_loss,
}


def kernel_params():
    """The backends on DEVICE with kernels for these losses (skipped with the reason where unavailable)."""
    return [p for p in backend_params() if p.id in RKD_KERNELS]


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_explicit_gpu_backend_on_cpu_tensors_raises(name):
    fn = getattr(fastkd, name)
    with pytest.raises(ValueError, match="backend='cuda'"):
        fn(torch.randn(4, 5), torch.randn(4, 5), backend="cuda")


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


@pytest.mark.parametrize("name", ALL_LOSSES)
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


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpu op's cache of freed buffers")
@pytest.mark.parametrize("name", ("rkd_distance", "pkt_loss", "sp_loss", "cc_loss"))
def test_cpu_scratch_matrices_are_cached_and_never_read_stale(name):
    """The n × n matrices (N = 600: 1.4 MB each, above the cache's 1 MiB
    minimum) go back to the cache of freed buffers when the op returns; the
    next call on other inputs reuses them and gives what it gives from an
    empty cache."""
    fn = ALL_LOSSES[name]
    first = (embeddings((600, 24), torch.float32, 80).cpu(), embeddings((600, 16), torch.float32, 81).cpu())
    second = (embeddings((600, 24), torch.float32, 82).cpu(), embeddings((600, 16), torch.float32, 83).cpu())
    fastkd.empty_cache()
    fresh = run(lambda a, b: fn(a, b, backend="cpu"), *second)
    fastkd.empty_cache()
    run(lambda a, b: fn(a, b, backend="cpu"), *first)
    assert _ops._C.cached_bytes() >= 2 * 600 * 600 * 4
    reused = run(lambda a, b: fn(a, b, backend="cpu"), *second)
    for what, a, b in zip(("loss", "gradient"), reused, fresh, strict=True):
        assert torch.equal(a, b), f"{name} {what} after the cache was filled by another call"
    fastkd.empty_cache()
