"""DKD (docs/spec.md §1): the reference against an explicit per-row loop, every fused
backend of DKD_KERNELS on DEVICE (cpu and triton here, triton and cuda under
FASTKD_TEST_DEVICE=cuda) against the float64 reference (loss and gradient),
the ops themselves and the argument checks."""

from __future__ import annotations

import math

import pytest
import torch

import fastkd
from fastkd import _ops, reference
from fastkd.dkd import DKD_KERNELS
from tests.common_checks import backend_param
from tests.helpers import DEVICE, assert_matches
from tests.no_host_reads import no_host_reads, values_checked_in_kernels

needs_cpu = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR))

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
UPSTREAM = 0.7


def kernel_params(backends=DKD_KERNELS):
    """The backends with a DKD kernel on DEVICE, skipped with the reason when unavailable."""
    params = [backend_param(name) for name in backends]
    none = pytest.param("none", marks=pytest.mark.skip(reason=f"no DKD kernel on {DEVICE.type}"))
    return params or [none]


def logits(rows, classes, dtype, seed, spread=3.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = spread * torch.randn(rows, classes, generator=g, dtype=torch.float64)
    return x.to(device=device, dtype=dtype)


def targets(rows, classes, seed, device="cpu"):
    return torch.randint(0, classes, (rows,), generator=torch.Generator().manual_seed(seed)).to(device)


def inputs(rows, classes, dtype, seed):
    """Student and teacher logits and labels on DEVICE."""
    return (
        logits(rows, classes, dtype, seed, device=DEVICE),
        logits(rows, classes, dtype, seed + 1, device=DEVICE),
        targets(rows, classes, seed + 2, DEVICE),
    )


def dkd_loop(s, t, y, alpha, beta, temperature):
    """mdistiller's dkd_loss written out element by element (float64, math module):
    b = [p_y, Σ_{j≠y} p_j]; TCKD = Σ b_t log(b_t / b_s); NCKD = KL of the softmaxes
    of z/T − 1000·onehot(y); (α TCKD + β NCKD) T², mean over rows."""
    total = 0.0
    n, c = s.shape
    for i in range(n):
        a_s = [float(s[i, j]) / temperature for j in range(c)]
        a_t = [float(t[i, j]) / temperature for j in range(c)]

        def softmax(a):
            m = max(a)
            e = [math.exp(v - m) for v in a]
            z = sum(e)
            return [v / z for v in e]

        q, p = softmax(a_s), softmax(a_t)
        b_s = [q[y[i]], sum(q[j] for j in range(c) if j != y[i])]
        b_t = [p[y[i]], sum(p[j] for j in range(c) if j != y[i])]
        tckd = sum(bt * math.log(bt / bs) for bt, bs in zip(b_t, b_s, strict=True) if bt > 0)
        off = [1000.0 if j == y[i] else 0.0 for j in range(c)]
        q2 = softmax([v - o for v, o in zip(a_s, off, strict=True)])
        p2 = softmax([v - o for v, o in zip(a_t, off, strict=True)])
        nckd = sum(pj * math.log(pj / qj) for pj, qj in zip(p2, q2, strict=True) if pj > 0)
        total += (alpha * tckd + beta * nckd) * temperature**2
    return total / n


@pytest.mark.parametrize("shape", ((1, 2), (5, 3), (9, 17)))
@pytest.mark.parametrize("params", ((1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 0.0, 0.7)))
def test_reference_matches_explicit_loop(shape, params):
    alpha, beta, temperature = params
    s, t = logits(*shape, torch.float64, 0), logits(*shape, torch.float64, 1)
    y = targets(shape[0], shape[1], 2)
    got = reference.dkd_loss(s, t, y, alpha=alpha, beta=beta, temperature=temperature)
    want = dkd_loop(s, t, y.tolist(), alpha, beta, temperature)
    assert got.dtype == torch.float64
    assert abs(got.item() - want) <= 1e-12 + 1e-10 * abs(want)


def test_reference_log_space_where_probability_space_fails():
    """p_y rounds to 1 in float32: mdistiller's log(1 − p_y) would be log 0; the
    log-space reference stays finite and matches float64."""
    s = torch.tensor([[80.0, 0.0, 1.0]])
    t = torch.tensor([[2.0, 0.0, 1.0]])
    y = torch.tensor([0])
    got = reference.dkd_loss(s, t, y, temperature=1.0)
    want = reference.dkd_loss(s.double(), t.double(), y, temperature=1.0)
    assert torch.isfinite(got)
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())


def neg_inf_teacher():
    """Student logits (finite) and teacher logits with −inf entries (no mass, docs/spec.md §1): at a
    non-target class (row 0), at the target (row 1), at all non-targets but one (row 2), none (row 3)."""
    s = logits(4, 6, torch.float64, 40)
    t = logits(4, 6, torch.float64, 41)
    y = torch.tensor([1, 2, 0, 5])
    t[0, 3] = t[0, 4] = -math.inf
    t[1, 2] = -math.inf
    t[2, 1:5] = -math.inf
    return s, t, y


def dkd_xlogy(s, t, y, alpha, beta, temperature):
    """DKD rows in float64, mdistiller's probability-space form with xlogy (0 · log 0 = 0)
    on the teacher side: the gradient oracle for finite student logits."""
    a_s, a_t = s / temperature, t / temperature
    target = torch.nn.functional.one_hot(y, s.shape[1]).bool()

    def kl(p, log_q):
        return (torch.xlogy(p, p) - p * log_q).sum(1)

    def binary(a):
        prob = torch.softmax(a, 1)
        return torch.stack((prob[target], prob.masked_fill(target, 0.0).sum(1)), 1)

    def non_target(a):
        return torch.where(target, a - 1000.0, a)

    tckd = kl(binary(a_t), binary(a_s).log())
    nckd = kl(torch.softmax(non_target(a_t), 1), torch.log_softmax(non_target(a_s), 1))
    return (alpha * tckd + beta * nckd) * temperature**2


@pytest.mark.parametrize("params", ((1.0, 8.0, 4.0), (0.5, 2.0, 1.0)))
def test_reference_neg_inf_teacher_logits(params):
    """−inf teacher logits carry no mass: the reference is finite and equals the
    float64 loop and the xlogy oracle, loss and gradient."""
    alpha, beta, temperature = params
    s, t, y = neg_inf_teacher()
    got = reference.dkd_loss(s, t, y, alpha=alpha, beta=beta, temperature=temperature)
    want = dkd_loop(s, t, y.tolist(), alpha, beta, temperature)
    assert math.isfinite(got.item()) and math.isfinite(want)
    assert abs(got.item() - want) <= 1e-12 + 1e-10 * abs(want)
    upstream = torch.linspace(0.3, 1.7, 4, dtype=torch.float64)
    got_rows, got_grad = run_with_grad(
        lambda a, b, c: reference.dkd_loss(a, b, c, alpha=alpha, beta=beta, temperature=temperature,
                                           reduction="none"), s, t, y, upstream,
    )
    want_rows, want_grad = run_with_grad(
        lambda a, b, c: dkd_xlogy(a, b, c, alpha, beta, temperature), s, t, y, upstream
    )
    assert_matches(got_rows, want_rows, torch.float64, "reference dkd rows, -inf teacher")
    assert_matches(got_grad, want_grad, torch.float64, "reference dkd grad, -inf teacher")


def test_reference_row_entirely_neg_inf_raises():
    s, t, y = neg_inf_teacher()
    t[3] = -math.inf
    with pytest.raises(ValueError, match="row of student_logits or teacher_logits is entirely -inf"):
        reference.dkd_loss(s, t, y)



# ---- fused backends against the float64 reference ------------------------------------


def run_with_grad(fn, s, t, y, upstream):
    """Loss of ``fn(s, t, y)`` and the gradient of ``Σ upstream · loss`` w.r.t. ``s``
    (``upstream`` per row for ``"none"``, else UPSTREAM)."""
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s, t, y)
    if loss.dim():
        weight = upstream.to(device=loss.device, dtype=loss.dtype)
    else:
        weight = torch.tensor(UPSTREAM, dtype=loss.dtype, device=loss.device)
    loss.backward(weight)
    return loss.detach(), s.grad


def reference_in_input_dtype(s, t, y, upstream, samples=3, **kwargs):
    """The reference from the same-dtype inputs in ``samples`` summation orders
    (classes permuted, labels renamed to match; gradients mapped back): the
    baselines of assert_matches' "at most twice the reference's error" rule."""
    results = []
    for k in range(samples):
        perm = torch.arange(s.shape[1])
        if k:
            perm = torch.randperm(s.shape[1], generator=torch.Generator().manual_seed(k))
        perm = perm.to(s.device)
        inverse = torch.argsort(perm)  # class j sits at column inverse[j]
        loss, grad = run_with_grad(
            lambda a, b, c: reference.dkd_loss(a, b, c, **kwargs),
            s[:, perm], t[:, perm], inverse[y], upstream,
        )
        results.append((loss, grad[:, inverse]))
    return results


def check_parity(backend, s, t, y, what, **kwargs):
    """fastkd.dkd_loss on ``backend`` vs the float64 reference, loss and student gradient."""
    dtype = s.dtype
    upstream = torch.linspace(0.3, 1.7, s.shape[0], dtype=torch.float64)
    got = run_with_grad(
        lambda a, b, c: fastkd.dkd_loss(a, b, c, backend=backend, **kwargs), s, t, y, upstream
    )
    want = run_with_grad(
        lambda a, b, c: reference.dkd_loss(a, b, c, **kwargs), s.double(), t.double(), y, upstream
    )
    same = reference_in_input_dtype(s, t, y, upstream, **kwargs)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[1].dtype == dtype and got[1].device == s.device
    for i, name in enumerate(("loss", "grad")):
        assert_matches(got[i], want[i], dtype, f"{backend} dkd {what} {name}", [r[i] for r in same])


def skip_float64_on_gpu_backends(backend, dtype):
    if dtype == torch.float64 and backend != "cpu":
        pytest.skip(f"{backend} takes float32 / bfloat16 / float16 (float64 runs on the reference)")


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ((1, 2), (7, 10), (13, 101)))
@pytest.mark.parametrize("temperature", (4.0, 1.0))
def test_parity(backend, dtype, shape, temperature):
    skip_float64_on_gpu_backends(backend, dtype)
    s, t, y = inputs(*shape, dtype, 3)
    check_parity(backend, s, t, y, f"{shape} T={temperature}", temperature=temperature, reduction="none")


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("reduction", ("batchmean", "sum"))
@pytest.mark.parametrize("params", ((1.0, 8.0), (0.5, 0.0), (0.0, 2.0)), ids=str)
def test_parity_reductions_and_weights(backend, reduction, params):
    alpha, beta = params
    s, t, y = inputs(9, 23, torch.float32, 40)
    check_parity(backend, s, t, y, reduction, alpha=alpha, beta=beta, reduction=reduction)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("classes", (4096, 4097, 9000))
def test_parity_rows_wider_than_one_chunk(backend, dtype, classes):
    """C around and beyond the Triton launcher's 4096-wide chunk (and many CUDA
    block strides); the target in the first, a middle and the last chunk."""
    s, t = logits(3, classes, dtype, 21, device=DEVICE), logits(3, classes, dtype, 22, device=DEVICE)
    y = torch.tensor([0, classes // 2, classes - 1], device=DEVICE)
    check_parity(backend, s, t, y, f"C={classes}", alpha=0.7, beta=3.0, temperature=2.0, reduction="none")


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("temperature", (0.05, 100.0))
def test_parity_extreme_temperatures(backend, temperature):
    s, t, y = inputs(5, 37, torch.float32, 23)
    check_parity(backend, s, t, y, f"T={temperature}", temperature=temperature)


@pytest.mark.parametrize("backend", kernel_params())
def test_non_contiguous_and_large_logits(backend):
    s = logits(12, 40, torch.float32, 6, spread=300.0, device=DEVICE).t().contiguous().t()
    t = logits(24, 40, torch.float32, 7, spread=300.0, device=DEVICE)[::2]
    assert not s.is_contiguous() and not t.is_contiguous()
    y = targets(12, 40, 8, DEVICE)
    check_parity(backend, s, t, y, "non-contiguous")


@pytest.mark.parametrize("backend", kernel_params())
def test_logits_of_magnitude_1e4(backend):
    """|x| up to 1e4 at T = 1 (docs/spec.md §6): the binary split and the non-target
    softmax stay finite and accurate (log space, shifted by the row max)."""
    s = logits(6, 50, torch.float32, 26, spread=4000.0, device=DEVICE).clamp(-1e4, 1e4)
    t = logits(6, 50, torch.float32, 27, spread=4000.0, device=DEVICE).clamp(-1e4, 1e4)
    y = targets(6, 50, 28, DEVICE)
    check_parity(backend, s, t, y, "|x| ~ 1e4", temperature=1.0, reduction="none")


@pytest.mark.parametrize("backend", kernel_params())
def test_target_probability_rounding_to_one(backend):
    """p_y and q_y round to 1 in float32: the kernels' log-space 1 − p_y keeps
    TCKD finite and accurate (mdistiller's probability-space form gives log 0).
    Targets about 1000·T above the rest make mdistiller's offset matter in
    NCKD: saturated (row 3) and where q'_y, p'_y are interior (row 4)."""
    s = [[80.0, 0.0, 1.0, -2.0], [0.5, 3.0, 1.0, 1.0], [2500.0, 0.0, 1.0, 3.0], [1003.0, 0.0, 1.0, 2.0]]
    t = [[60.0, 0.0, 2.0, 1.0], [0.0, 2.0, 1.0, 4.0], [2400.0, 0.5, 1.0, 2.0], [998.0, 0.5, 1.0, 2.0]]
    s, t = torch.tensor(s, device=DEVICE), torch.tensor(t, device=DEVICE)
    y = torch.tensor([0, 1, 0, 0], device=DEVICE)
    rows = fastkd.dkd_loss(s, t, y, temperature=1.0, reduction="none", backend=backend)
    assert torch.isfinite(rows).all()
    check_parity(backend, s, t, y, "p_y → 1", temperature=1.0, reduction="none")


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_parity_neg_inf_teacher_logits(backend, dtype):
    s, t, y = neg_inf_teacher()
    s, t, y = s.to(DEVICE, dtype), t.to(DEVICE, dtype), y.to(DEVICE)
    check_parity(backend, s, t, y, "-inf teacher", reduction="none")


@pytest.mark.parametrize("backend", kernel_params())
def test_teacher_gets_no_gradient(backend):
    s = logits(6, 5, torch.float32, 9, device=DEVICE).requires_grad_(True)
    t = logits(6, 5, torch.float32, 10, device=DEVICE).requires_grad_(True)
    y = targets(6, 5, 11, DEVICE)
    fastkd.dkd_loss(s, t, y, backend=backend).backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("backend", kernel_params())
def test_forward_only_under_no_grad(backend):
    s, t, y = inputs(4, 9, torch.float32, 29)
    with torch.no_grad():
        got = fastkd.dkd_loss(s, t, y, backend=backend)
    assert_matches(got, reference.dkd_loss(s.double(), t.double(), y), torch.float32, f"{backend} no_grad")


@pytest.mark.parametrize("backend", kernel_params())
def test_nan_propagates(backend):
    s, t, y = inputs(4, 6, torch.float32, 12)
    s[1, 3] = float("nan")
    t[2, y[2]] = float("nan")
    rows = fastkd.dkd_loss(s, t, y, reduction="none", backend=backend)
    assert torch.isnan(rows[1]) and torch.isnan(rows[2]) and torch.isfinite(rows[[0, 3]]).all()


def test_auto_and_module():
    """backend="auto" picks the first DKD kernel of DEVICE's order (cpu; triton on CUDA)."""
    s, t, y = inputs(6, 5, torch.float32, 9)
    expected = "cpu" if DEVICE.type == "cpu" else "triton"
    if not fastkd._dispatch.backend_status(expected, DEVICE.type).available:
        pytest.skip(f"{expected} unavailable on {DEVICE.type}")
    assert torch.equal(fastkd.dkd_loss(s, t, y), fastkd.dkd_loss(s, t, y, backend=expected))
    module = fastkd.DKDLoss(alpha=0.5, beta=2.0, temperature=2.0)
    assert torch.equal(
        module(s, t, y), fastkd.dkd_loss(s, t, y, alpha=0.5, beta=2.0, temperature=2.0, backend=expected)
    )
    assert "beta=2.0" in repr(module)


# ---- the ops ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_opcheck(dtype):
    """The registered op of DEVICE (cpu here, cuda under FASTKD_TEST_DEVICE=cuda)."""
    name = "cpu" if DEVICE.type == "cpu" else "cuda"
    status = fastkd._dispatch.backend_status(name, DEVICE.type)
    if not status.available or not _ops.has_kernel("dkd_forward", name.upper()):
        pytest.skip(f"no {name} dkd_forward kernel: {status.reason}")
    s, t, y = inputs(5, 7, dtype, 15)
    for student_grad in (True, False):
        torch.library.opcheck(
            torch.ops.fastkd.dkd_forward.default,
            (s, t, y, 1.0, 8.0, 0.25, 0.5, student_grad),
            test_utils=("test_schema", "test_faketensor"),
        )


@needs_cpu
def test_op_checks_arguments():
    s, t, y = logits(3, 4, torch.float32, 18), logits(3, 4, torch.float32, 19), targets(3, 4, 20)
    with pytest.raises(RuntimeError, match="labels must lie"):
        torch.ops.fastkd.dkd_forward(s, t, torch.tensor([0, 4, 1]), 1.0, 8.0, 0.25, 1.0, True)
    with pytest.raises(RuntimeError, match="at least 2 classes"):
        torch.ops.fastkd.dkd_forward(s[:, :1], t[:, :1], y * 0, 1.0, 8.0, 0.25, 1.0, True)
    with pytest.raises(RuntimeError, match="inv_temperature"):
        torch.ops.fastkd.dkd_forward(s, t, y, 1.0, 8.0, 0.0, 1.0, True)


def triton_dkd():
    if not fastkd._dispatch.backend_status("triton", DEVICE.type).available:
        pytest.skip("triton unavailable")
    from fastkd.kernels import dkd

    return dkd


@pytest.mark.parametrize(
    "change, match",
    (
        (dict(labels=torch.tensor([0, 4, 1])), "labels must lie"),
        (dict(labels=torch.tensor([0, -1, 1])), "labels must lie"),
        (dict(labels=torch.tensor([0, 1, 1], dtype=torch.int32)), "labels must be an int64"),
        (dict(labels=torch.tensor([0, 1])), "labels must have shape"),
        (dict(student=torch.zeros(3, 1), teacher=torch.zeros(3, 1)), "at least 2 classes"),
        (dict(student=torch.zeros(3, 4, dtype=torch.float64), teacher=torch.zeros(3, 4, dtype=torch.float64)),
         "float32, bfloat16 or float16"),
        (dict(teacher=torch.zeros(3, 5)), "differ in shape"),
        (dict(inv_temperature=0.0), "inv_temperature"),
        (dict(alpha=-1.0), "alpha"),
        (dict(beta=float("nan")), "beta"),
    ),
)
def test_triton_launcher_checks_arguments(change, match, monkeypatch):
    # the label range is checked on the host for CPU tensors, on a GPU only when asked for
    monkeypatch.setenv("FASTKD_CHECK_DEVICE_VALUES", "1")
    dkd = triton_dkd()
    args = dict(
        student=torch.zeros(3, 4), teacher=torch.zeros(3, 4), labels=torch.tensor([0, 1, 3]), alpha=1.0,
        beta=8.0, inv_temperature=0.25, grad_scale=1.0, student_grad=True,
    )
    args.update(change)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(ValueError, match=match):
        dkd.dkd_forward(**args)


def test_triton_kernel_guards_out_of_range_labels():
    """Past the launcher's check, the kernel itself never indexes with a bad
    label: such a row comes out NaN (loss and gradient), the others intact."""
    dkd = triton_dkd()
    s, t = logits(3, 6, torch.float32, 32, device=DEVICE), logits(3, 6, torch.float32, 33, device=DEVICE)
    y = torch.tensor([2, 1 << 40, -7], device=DEVICE)
    loss = torch.empty(3, device=DEVICE)
    grad = torch.empty(3, 6, device=DEVICE)
    block, num_warps = dkd.launch_config(6)
    dkd._dkd_fwd_kernel[(3,)](
        s, t, y, loss, grad, 6, 6, 6, 1.0, 8.0, 0.25, 0.25,
        STUDENT_GRAD=True, BLOCK=block, num_warps=num_warps,
    )
    want, want_grad = dkd.dkd_forward(s[:1], t[:1], y[:1], 1.0, 8.0, 0.25, 1.0, True)
    assert torch.equal(loss[:1], want) and torch.equal(grad[:1], want_grad)
    assert torch.isnan(loss[1:]).all() and torch.isnan(grad[1:]).all()


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the cuda op runs on CUDA tensors")
def test_cuda_op_checks_arguments():
    if not fastkd._dispatch.backend_status("cuda", "cuda").available or "cuda" not in DKD_KERNELS:
        pytest.skip("no cuda DKD kernel")
    s, t, y = inputs(3, 4, torch.float32, 18)
    # the label range is checked in the kernel (no device → host sync): NaN rows
    for bad in ([0, 4, 1], [0, -1, 1]):
        labels = torch.tensor(bad, device=DEVICE)
        loss, grad = torch.ops.fastkd.dkd_forward(s, t, labels, 1.0, 8.0, 0.25, 1.0, True)
        assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all()
        assert torch.isfinite(loss[[0, 2]]).all() and torch.isfinite(grad[[0, 2]]).all()
    with pytest.raises(RuntimeError, match="at least 2 classes"):
        torch.ops.fastkd.dkd_forward(s[:, :1], t[:, :1], y * 0, 1.0, 8.0, 0.25, 1.0, True)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        torch.ops.fastkd.dkd_forward(s.double(), t.double(), y, 1.0, 8.0, 0.25, 1.0, True)


@pytest.mark.parametrize(
    "change, match",
    (
        (dict(teacher_logits=torch.zeros(3, 5)), "teacher_logits shape"),
        (dict(student_logits=torch.zeros(3, 1), teacher_logits=torch.zeros(3, 1)), "at least 2 classes"),
        (dict(student_logits=torch.zeros(3)), "student_logits"),
        (dict(labels=torch.tensor([0, 1, 4])), "labels must lie"),
        (dict(labels=torch.tensor([0, -1, 2])), "labels must lie"),
        (dict(labels=torch.zeros(2, dtype=torch.long)), "labels shape"),
        (dict(labels=torch.zeros(3)), "labels must be an integer"),
        (dict(alpha=-1.0), "alpha"),
        (dict(beta=float("inf")), "beta"),
        (dict(temperature=0.0), "temperature"),
        (dict(reduction="mean"), "reduction"),
        (dict(backend="fast"), "backend"),
    ),
)
def test_bad_arguments(change, match):
    args = dict(
        student_logits=torch.zeros(3, 4), teacher_logits=torch.zeros(3, 4), labels=torch.tensor([0, 1, 3])
    )
    args.update(change)
    with pytest.raises(ValueError, match=match):
        fastkd.dkd_loss(**args)


def gpu_backends():
    """The DKD kernel backends of a GPU (triton, cuda) that run on DEVICE."""
    return kernel_params(tuple(name for name in DKD_KERNELS if name != "cpu"))


@pytest.mark.parametrize("backend", gpu_backends())
def test_out_of_range_labels_give_nan_rows_without_the_host_check(backend, monkeypatch):
    """The GPU policy (docs/spec.md §6): labels are not read on the host; a row
    whose label lies outside [0, C) gets a NaN loss and gradient, the other
    rows are exact."""
    values_checked_in_kernels(monkeypatch)
    s, t, y = inputs(5, 7, torch.float32, 50)
    bad = y.clone()
    bad[1], bad[3] = 7, -1
    s_bad = s.clone().requires_grad_(True)
    rows = fastkd.dkd_loss(s_bad, t, bad, reduction="none", backend=backend)
    rows.backward(torch.ones_like(rows))
    good = [0, 2, 4]
    assert torch.isnan(rows[[1, 3]]).all() and torch.isnan(s_bad.grad[[1, 3]]).all()
    s_ref = s[good].double().requires_grad_(True)
    want = reference.dkd_loss(s_ref, t[good].double(), y[good], reduction="none")
    want.backward(torch.ones_like(want))
    assert_matches(rows[good], want, torch.float32, f"{backend} good rows")
    assert_matches(s_bad.grad[good], s_ref.grad, torch.float32, f"{backend} good rows' gradient")


def test_reference_backend_checks_labels_without_the_host_check(monkeypatch):
    """The reference has no in-kernel guard: it refuses bad labels on every device."""
    values_checked_in_kernels(monkeypatch)
    s, t, y = inputs(3, 4, torch.float32, 51)
    with pytest.raises(ValueError, match="labels must lie"):
        fastkd.dkd_loss(s, t, torch.tensor([0, 4, 1], device=DEVICE), backend="reference")


def test_device_value_checks_on_request(monkeypatch):
    """FASTKD_CHECK_DEVICE_VALUES=1: the label range raises ValueError on every device."""
    monkeypatch.setenv("FASTKD_CHECK_DEVICE_VALUES", "1")
    s, t, _ = inputs(3, 4, torch.float32, 52)
    with pytest.raises(ValueError, match="labels must lie"):
        fastkd.dkd_loss(s, t, torch.tensor([0, 4, 1], device=DEVICE))


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("with_grad", (True, False), ids=("grad", "no_grad"))
def test_no_host_reads(backend, with_grad, monkeypatch):
    """A GPU path never reads a value on the host (a device → host sync): the
    forward (which computes the gradient too) with every host read refused."""
    values_checked_in_kernels(monkeypatch)
    s, t, y = inputs(6, 9, torch.float32, 53)
    s.requires_grad_(with_grad)
    with no_host_reads():
        loss = fastkd.dkd_loss(s, t, y, backend=backend)
    want = reference.dkd_loss(s.detach().double(), t.double(), y)
    assert_matches(loss.detach(), want, torch.float32, backend)
