"""Attention transfer (docs/spec.md §5): the reference against explicit loops, every
fused backend of AT_KERNELS on DEVICE (cpu and triton here, triton and cuda
under FASTKD_TEST_DEVICE=cuda) against the float64 reference (loss and
gradients), the ops themselves (opcheck, C++ and launcher checks), and
validation."""

from __future__ import annotations

import math

import pytest
import torch

import fastkd
from fastkd import _dispatch, _ops
from fastkd import attention_transfer as fkat
from fastkd.reference import attention_transfer as ref
from tests.common_checks import backend_param, check_compiled_matches_eager
from tests.helpers import DEVICE, assert_matches, check_parity_with_grads, run_with_grads

needs_cpu_ext = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR))

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def maps(n, c, h, w, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype)


# ---- the reference against explicit loops (Python floats) ---------------------------


def loop_pool(f, h, w):
    """Adaptive average pooling of one (C, H, W) nested list to (C, h, w): bins
    [floor(i·H/h), ceil((i+1)·H/h))."""
    c_count, big_h, big_w = len(f), len(f[0]), len(f[0][0])
    out = []
    for c in range(c_count):
        rows = []
        for i in range(h):
            r0, r1 = (i * big_h) // h, math.ceil((i + 1) * big_h / h)
            row = []
            for j in range(w):
                c0, c1 = (j * big_w) // w, math.ceil((j + 1) * big_w / w)
                vals = [f[c][r][q] for r in range(r0, r1) for q in range(c0, c1)]
                row.append(sum(vals) / len(vals))
            rows.append(row)
        out.append(rows)
    return out


def loop_attention(f, p):
    """(C, h, w) nested list → normalised attention list over the h·w positions."""
    c_count, h, w = len(f), len(f[0]), len(f[0][0])
    v = [sum(f[c][i][j] ** p for c in range(c_count)) / c_count for i in range(h) for j in range(w)]
    norm = math.sqrt(sum(x * x for x in v))
    return [x / max(norm, 1e-12) for x in v]


def loop_at(fs, ft, p=2):
    n = fs.shape[0]
    h, w = min(fs.shape[2], ft.shape[2]), min(fs.shape[3], ft.shape[3])
    total, count = 0.0, 0
    for i in range(n):
        a_s = loop_attention(loop_pool(fs[i].tolist(), h, w), p)
        a_t = loop_attention(loop_pool(ft[i].tolist(), h, w), p)
        total += sum((x - y) ** 2 for x, y in zip(a_s, a_t, strict=True))
        count += len(a_s)
    return total / count


# (N, C_s, H_s, W_s, C_t, H_t, W_t): equal sizes, pooling either map (also
# non-dividing sizes), C = 1, H·W = 1, non-square.
AT_SHAPES = (
    (2, 3, 5, 7, 4, 5, 7),
    (1, 1, 1, 1, 1, 1, 1),
    (3, 1, 6, 6, 16, 3, 3),
    (2, 8, 4, 4, 2, 8, 8),
    (2, 5, 7, 5, 3, 4, 3),
    (5, 17, 9, 3, 33, 9, 3),
)
shape_id = "x".join


@pytest.mark.parametrize("shape", AT_SHAPES, ids=lambda s: "_".join(map(str, s)))
@pytest.mark.parametrize("p", (1, 2, 3))
def test_reference_equals_loops(shape, p):
    n, cs, hs, ws, ct, ht, wt = shape
    fs, ft = maps(n, cs, hs, ws, seed=1), maps(n, ct, ht, wt, seed=2)
    assert ref.at_loss(fs, ft, p=p).item() == pytest.approx(loop_at(fs, ft, p), rel=1e-12, abs=1e-15)


def test_reference_gradcheck():
    fs = maps(2, 3, 4, 5, seed=3).requires_grad_(True)
    ft = maps(2, 2, 2, 3, seed=4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ref.at_loss(a, b), (fs, ft))


# ---- fused backends against the float64 reference ------------------------------------


def kernel_params():
    """The backends with an attention-transfer kernel on DEVICE (cpu and triton
    here, triton and cuda under FASTKD_TEST_DEVICE=cuda), skipped with the
    reason when unavailable."""
    params = [backend_param(name) for name in fkat.AT_KERNELS]
    reason = f"no attention-transfer kernel on {DEVICE.type}"
    none = pytest.param("none", marks=pytest.mark.skip(reason=reason))
    return params or [none]


def float_dtype(backend):
    """The widest dtype ``backend`` takes: float64 on cpu, float32 on the GPU backends."""
    return torch.float64 if backend == "cpu" else torch.float32


def check_parity(backend, inputs, what, p=2, prepare=lambda x: x):
    """``backend``'s kernel (inputs moved to DEVICE and passed through ``prepare``,
    e.g. to channels_last) vs the float64 reference, loss and both gradients."""
    check_parity_with_grads(
        lambda a, b: fastkd.at_loss(prepare(a), prepare(b), p=p, backend=backend),
        lambda a, b: ref.at_loss(a, b, p=p),
        [x.to(DEVICE) for x in inputs], f"{backend} {what}", ("loss", "grad student", "grad teacher"),
    )


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64), ids=str)
@pytest.mark.parametrize("shape", AT_SHAPES, ids=lambda s: "_".join(map(str, s)))
def test_at_parity(backend, dtype, shape):
    if dtype == torch.float64 and backend != "cpu":
        pytest.skip(f"{backend} takes float32 / bfloat16 / float16 (float64 runs on the reference)")
    n, cs, hs, ws, ct, ht, wt = shape
    check_parity(backend, (maps(n, cs, hs, ws, dtype, 5), maps(n, ct, ht, wt, dtype, 6)), f"at {dtype}")


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("p", (1, 3, 4))
def test_at_other_powers(backend, p):
    dtype = float_dtype(backend)
    check_parity(backend, (maps(3, 5, 6, 4, dtype, 7), maps(3, 7, 6, 4, dtype, 8)), f"at p={p}", p=p)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("shape", ((2, 300, 8, 8, 20), (1, 3, 70, 70, 2)), ids=("many_channels", "large_map"))
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
def test_at_parity_beyond_one_tile(backend, shape, channels_last):
    """More channels than one tile holds (several chunks along C), and more
    positions than one chunk of the per-sample passes (HW = 4900)."""
    n, cs, h, w, ct = shape
    fs, ft = maps(n, cs, h, w, torch.float32, 14), maps(n, ct, h, w, torch.float32, 15)

    def prepare(x):
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    check_parity(backend, (fs, ft), f"at {shape}", prepare=prepare)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("layout", ("channels_last", "channels_last_pooled", "sliced", "permuted"), ids=str)
def test_at_non_contiguous(backend, layout):
    dtype = float_dtype(backend)
    fs, ft = maps(4, 6, 5, 7, dtype, 9), maps(4, 3, 5, 7, dtype, 10)

    def prepare(x):
        if layout.startswith("channels_last"):
            out = x.contiguous(memory_format=torch.channels_last)
            assert not out.is_contiguous()
            return out
        if layout == "sliced":
            out = x.repeat_interleave(2, dim=1)[:, ::2]  # the same values, channel stride 2·H·W
            assert torch.equal(out, x) and not out.is_contiguous()
            return out
        out = x.transpose(2, 3).contiguous().transpose(2, 3)  # W-major
        assert not out.is_contiguous()
        return out

    if layout == "channels_last_pooled":
        ft = maps(4, 3, 10, 14, dtype, 10)
    check_parity(backend, (fs, ft), f"at {layout}", prepare=prepare)


@pytest.mark.parametrize("backend", kernel_params())
def test_at_channels_last_gradient_keeps_layout(backend):
    fs = maps(2, 4, 3, 5, torch.float32).to(DEVICE).contiguous(memory_format=torch.channels_last)
    fs.requires_grad_(True)
    ft = maps(2, 4, 3, 5, torch.float32, 1).to(DEVICE)
    fastkd.at_loss(fs, ft, backend=backend).backward()
    assert fs.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("which", ("student", "both"))
def test_at_zero_maps(backend, which):
    """Zero maps have a zero attention vector (F.normalize's eps): finite loss,
    the reference's gradients (zero for the zero map)."""
    dtype = float_dtype(backend)
    fs = torch.zeros(3, 4, 5, 5, dtype=dtype, device=DEVICE)
    ft = torch.zeros_like(fs) if which == "both" else maps(3, 2, 5, 5, dtype, seed=11).to(DEVICE)
    got = run_with_grads(lambda a, b: fastkd.at_loss(a, b, backend=backend), fs, ft)
    want = run_with_grads(ref.at_loss, fs.double(), ft.double())
    assert all(torch.isfinite(g).all() for g in got)
    assert torch.equal(got[1], torch.zeros_like(fs))
    for a, b in zip(got, want, strict=True):
        assert_matches(a, b, dtype, f"{backend} zero maps")
    if which == "student":
        assert got[0].item() == pytest.approx(1.0 / 25, rel=1e-6)  # ‖a_t‖ = 1 over 25 positions


@pytest.mark.parametrize("backend", kernel_params())
def test_at_map_norm_below_eps(backend):
    """‖v‖ below eps but not 0: a = v / eps, and the norm passes no gradient
    (clamp_min's), so only the direct term ga / eps remains."""
    dtype = float_dtype(backend)
    fs = maps(3, 4, 5, 5, dtype, 16) * 2e-7  # v ~ 4e-14 per position, ‖v‖ ~ 3e-13 < 1e-12
    ft = maps(3, 2, 5, 5, dtype, 17) * 1e-6  # ‖v‖ ~ 1e-11 > 1e-12: the normalised branch
    check_parity(backend, (fs, ft), "norm below eps")


@pytest.mark.parametrize("backend", kernel_params())
def test_at_one_zero_sample_in_batch(backend):
    fs, ft = maps(3, 4, 4, 4, torch.float32, 12), maps(3, 4, 4, 4, torch.float32, 13)
    fs[1] = 0
    check_parity(backend, (fs, ft), "zero sample")


@pytest.mark.parametrize("backend", kernel_params())
def test_at_nan_propagates(backend):
    fs, ft = maps(2, 3, 4, 4, torch.float32).to(DEVICE), maps(2, 3, 4, 4, torch.float32, 1).to(DEVICE)
    fs[1, 2, 3, 0] = float("nan")
    assert torch.isnan(fastkd.at_loss(fs, ft, backend=backend))


@pytest.mark.parametrize("backend", kernel_params())
def test_at_teacher_without_grad_and_only_norms_saved(backend):
    fs = maps(4, 8, 6, 6, torch.float32).to(DEVICE).requires_grad_(True)
    ft = maps(4, 16, 6, 6, torch.float32, 1).to(DEVICE)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = fastkd.at_loss(fs, ft, backend=backend)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == [(4,), (4,), tuple(fs.shape), tuple(ft.shape)]
    loss.backward()
    assert fs.grad is not None and ft.grad is None


def test_at_auto_uses_the_first_kernel_and_atloss_sums_pairs():
    """backend="auto" picks DEVICE's first attention-transfer kernel (cpu; triton on CUDA)."""
    expected = "cpu" if DEVICE.type == "cpu" else "triton"
    if not fastkd._dispatch.backend_status(expected, DEVICE.type).available:
        pytest.skip(f"{expected} unavailable on {DEVICE.type}")
    pairs = [
        (maps(2, 3, 8, 8, torch.float32, i).to(DEVICE), maps(2, 5, 4, 4, torch.float32, 10 + i).to(DEVICE))
        for i in range(3)
    ]
    auto = fastkd.at_loss(*pairs[0])
    assert torch.equal(auto, fastkd.at_loss(*pairs[0], backend=expected))
    assert not torch.equal(auto, ref.at_loss(*pairs[0]))  # a different summation: not the reference path
    module = fastkd.ATLoss()
    total = module([s for s, _ in pairs], [t for _, t in pairs])
    want = sum(ref.at_loss(s, t).item() for s, t in pairs)
    assert total.item() == pytest.approx(want, rel=1e-5)
    assert torch.equal(module(*pairs[1]), fastkd.at_loss(*pairs[1]))
    assert "p=2" in repr(module)
    with pytest.raises(ValueError, match="teacher_maps has 2 maps but student_maps has 3"):
        module([s for s, _ in pairs], [t for _, t in pairs[:2]])
    with pytest.raises(ValueError, match="student_maps"):
        module([], [])


# ---- the ops ------------------------------------------------------------------------


def op_inputs(dtype, channels_last=False, device="cpu"):
    s, t = maps(3, 5, 4, 6, dtype, 0).to(device), maps(3, 2, 4, 6, dtype, 1).to(device)
    if channels_last:
        s = s.contiguous(memory_format=torch.channels_last)
    return s, t


def registered_op_params():
    """The fastkd:: ops on DEVICE: the cpu op here, the cuda op under FASTKD_TEST_DEVICE=cuda."""
    name = "cpu" if DEVICE.type == "cpu" else "cuda"
    status = fastkd._dispatch.backend_status(name, DEVICE.type)
    if name not in fkat.AT_KERNELS:
        return [pytest.param(name, marks=pytest.mark.skip(reason=f"no {name} attention-transfer kernel"))]
    marks = () if status.available else (pytest.mark.skip(reason=f"{name}: {status.reason}"),)
    return [pytest.param(name, marks=marks, id=name)]


@pytest.mark.parametrize("op_backend", registered_op_params())
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
def test_opcheck(op_backend, dtype, channels_last):
    if dtype == torch.float64 and op_backend == "cuda":
        pytest.skip("the cuda op takes float32 / bfloat16 / float16")
    s, t = op_inputs(dtype, channels_last, DEVICE)
    torch.library.opcheck(torch.ops.fastkd.attention_transfer_forward.default, (s, t, 2, 1e-12))
    loss, s_norm, t_norm = torch.ops.fastkd.attention_transfer_forward(s, t, 2, 1e-12)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.shape == () and loss.dtype == acc and s_norm.shape == (3,) and t_norm.dtype == acc
    for want in ((True, True), (True, False), (False, True)):
        args = (torch.tensor(0.7, dtype=acc, device=DEVICE), s, t, s_norm, t_norm, 2, 1e-12, *want)
        torch.library.opcheck(torch.ops.fastkd.attention_transfer_backward.default, args)


OP_CHECKS = [
    ({"student": torch.randn(3, 5, 4)}, "student must be 4-D"),
    ({"teacher": torch.randn(3, 2, 4, 5)}, "same spatial size"),
    ({"teacher": torch.randn(2, 2, 4, 6)}, "same batch size"),
    ({"teacher": torch.randn(3, 2, 4, 6, dtype=torch.float16)}, "same dtype"),
    ({"student": torch.zeros(3, 5, 4, 6, dtype=torch.int64)}, "floating-point"),
    ({"p": 0}, "p must be"),
    ({"eps": 0.0}, "eps must be"),
]


@pytest.mark.parametrize("op_backend", registered_op_params())
@pytest.mark.parametrize("change,needle", OP_CHECKS)
def test_op_checks(op_backend, change, needle):
    args = {"student": torch.randn(3, 5, 4, 6), "teacher": torch.randn(3, 2, 4, 6), "p": 2, "eps": 1e-12}
    args.update(change)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(RuntimeError, match=needle):
        torch.ops.fastkd.attention_transfer_forward(*args.values())


@pytest.mark.parametrize("op_backend", registered_op_params())
def test_backward_op_checks_norms(op_backend):
    s, t = op_inputs(torch.float32, device=DEVICE)
    norm = torch.ones(3, device=DEVICE)
    one = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"norms must have shape \[N\]"):
        torch.ops.fastkd.attention_transfer_backward(one, s, t, norm[:2], norm, 2, 1e-12, True, True)
    with pytest.raises(RuntimeError, match="norms must have dtype"):
        torch.ops.fastkd.attention_transfer_backward(one, s, t, norm.double(), norm, 2, 1e-12, True, True)


def triton_at():
    available = fastkd._dispatch.backend_status("triton", DEVICE.type).available
    if "triton" not in fkat.AT_KERNELS or not available:
        pytest.skip("no triton attention-transfer kernel on this device")
    from fastkd.kernels import attention_transfer

    return attention_transfer


@pytest.mark.parametrize(
    "change,needle",
    [
        *OP_CHECKS[:3],
        ({"teacher": torch.randn(3, 2, 4, 6, dtype=torch.float16)}, "must have the same dtype"),
        ({"student": torch.zeros(3, 5, 4, 6, dtype=torch.float64)}, "float32, bfloat16 or float16"),
        ({"p": 0}, "p must be"),
        ({"p": 2.0}, "p must be"),
        ({"eps": float("nan")}, "eps must be"),
    ],
)
def test_triton_launchers_check_arguments(change, needle):
    at = triton_at()
    args = {"student": torch.randn(3, 5, 4, 6), "teacher": torch.randn(3, 2, 4, 6), "p": 2, "eps": 1e-12}
    args.update(change)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(ValueError, match=needle):
        at.attention_transfer_forward(*args.values())
    s, t = op_inputs(torch.float32, device=DEVICE)
    _, s_norm, t_norm = at.attention_transfer_forward(s, t, 2, 1e-12)
    one = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(ValueError, match="s_norm must be a float32 tensor of shape"):
        at.attention_transfer_backward(one, s, t, s_norm[:2], t_norm, 2, 1e-12, True, True)
    with pytest.raises(ValueError, match="t_norm must be a float32 tensor of shape"):
        at.attention_transfer_backward(one, s, t, s_norm, t_norm.double(), 2, 1e-12, True, True)
    with pytest.raises(ValueError, match="grad must be a one-element tensor"):
        at.attention_transfer_backward(one.expand(2), s, t, s_norm, t_norm, 2, 1e-12, True, True)


# ---- validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"student_maps": torch.randn(2, 3, 4)}, "student_maps must have"),
        ({"teacher_maps": torch.randn(2, 3)}, "teacher_maps must have"),
        ({"teacher_maps": torch.randn(3, 3, 4, 4)}, "teacher_maps batch size"),
        ({"teacher_maps": torch.randn(2, 3, 4, 4, dtype=torch.float64)}, "teacher_maps dtype"),
        ({"student_maps": torch.randn(2, 0, 4, 4)}, "student_maps"),
        ({"student_maps": [torch.randn(2, 3, 4, 4)]}, "student_maps must be a torch.Tensor"),
        ({"p": 0}, "p must be"),
        ({"p": 2.0}, "p must be"),
        ({"p": True}, "p must be"),
        ({"backend": "fast"}, "backend"),
    ],
)
@pytest.mark.parametrize("backend", ("cpu", "reference"))
def test_at_bad_arguments_raise_value_error(kwargs, needle, backend):
    if backend == "cpu" and _ops.CPU_EXTENSION_ERROR is not None:
        pytest.skip("no cpu extension")
    args = {
        "student_maps": torch.randn(2, 3, 4, 4),
        "teacher_maps": torch.randn(2, 5, 2, 2),
        "backend": backend,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle):
        fastkd.at_loss(args.pop("student_maps"), args.pop("teacher_maps"), **args)


def test_explicit_backend_without_at_kernel_raises(monkeypatch):
    """A backend missing from AT_KERNELS: an explicit request raises, "auto" uses the reference."""
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    monkeypatch.setattr(fkat, "AT_KERNELS", ())
    monkeypatch.setattr(_dispatch, "resolve", lambda backend, tensor: "triton")
    with pytest.raises(ValueError, match="backend='triton' has no at kernel yet"):
        fastkd.at_loss(s, t, backend="triton")
    assert torch.equal(fastkd.at_loss(s, t), ref.at_loss(s, t))


@needs_cpu_ext
def test_torch_compile_fullgraph_without_graph_breaks(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()

    def step(s, t):
        return fastkd.at_loss(s, t, backend="cpu") * 3.0

    check_compiled_matches_eager(
        step, maps(2, 3, 4, 5, torch.float32).requires_grad_(True), maps(2, 6, 4, 5, torch.float32, 1)
    )
