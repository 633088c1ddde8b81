"""MMD and NST (SPEC §3): the fused cpu backend against the float64 reference,
the ops themselves (opcheck, C++ checks) and the argument validation."""

from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd import _ops, reference
from fastkd import functional as fkf
from tests.helpers import assert_matches

pytestmark = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR))

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
UPSTREAM = 0.7  # never test only with an upstream gradient of 1
SMALL_TILE = 4  # rows per tile when the multi-tile path is forced
KERNELS = ("gaussian", "laplacian", "polynomial")


@pytest.fixture(params=["default_tile", "small_tile"])
def tiles(request, monkeypatch):
    """Runs a test with the default tile size and with tiles of SMALL_TILE rows."""
    if request.param == "small_tile":
        monkeypatch.setattr(fkf, "_mmd_tile_rows", lambda n, m: SMALL_TILE)
    return request.param


def samples(rows, dim, dtype, seed, shift=0.0):
    """Rows of unit scale (‖a − b‖ ~ 1, the scale the default bandwidths suit)."""
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(rows, dim, generator=g, dtype=torch.float64) + shift) / dim**0.5).to(dtype)


def run_with_grads(fn, *inputs, upstream=UPSTREAM):
    inputs = [a.detach().clone().requires_grad_(True) for a in inputs]
    loss = fn(*inputs)
    loss.backward(torch.tensor(upstream, dtype=loss.dtype))
    return (loss.detach(), *(a.grad for a in inputs))


def check_parity(fused, ref, inputs, what):
    dtype = inputs[0].dtype
    got = run_with_grads(fused, *inputs)
    want = run_with_grads(ref, *(a.double() for a in inputs))
    same = run_with_grads(ref, *inputs)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert all(g.dtype == dtype for g in got[1:])
    names = ("loss",) + tuple(f"grad {i}" for i in range(len(inputs)))
    for name, a, b, c in zip(names, got, want, same, strict=True):
        assert_matches(a, b, dtype, f"{what} {name}", [c])


def kernel_kwargs(kernel):
    if kernel == "polynomial":
        return {"kernel": kernel, "degree": 3, "c": 2.0}
    return {"kernel": kernel}


# (N, M, D)
SHAPES = ((1, 1, 3), (1, 6, 3), (13, 9, 3), (19, 19, 130), (9, 21, 130))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("unbiased", (False, True), ids=("biased", "unbiased"))
def test_mmd_parity(tiles, dtype, shape, kernel, unbiased):
    n, m, d = shape
    if unbiased and min(n, m) < 2:
        pytest.skip("unbiased needs 2 rows")
    x = samples(n, d, dtype, 0)
    y = samples(m, d, dtype, 1, shift=0.3)
    kwargs = {**kernel_kwargs(kernel), "unbiased": unbiased}
    check_parity(
        lambda a, b: fastkd.mmd_loss(a, b, backend="cpu", **kwargs),
        lambda a, b: reference.mmd_loss(a, b, **kwargs),
        (x, y),
        f"cpu mmd {kernel}",
    )


@pytest.mark.parametrize("bandwidths", (0.7, (0.1, 1.0, 10.0)))
@pytest.mark.parametrize("kernel", ("gaussian", "laplacian"))
def test_mmd_bandwidths_float64_non_contiguous(tiles, bandwidths, kernel):
    x = samples(11, 20, torch.float64, 2).t().contiguous().t()  # column-major view
    y = samples(30, 20, torch.float64, 3)[::2]  # row stride 40
    assert not x.is_contiguous() and not y.is_contiguous()
    kwargs = {"kernel": kernel, "bandwidths": bandwidths}
    got = run_with_grads(lambda a, b: fastkd.mmd_loss(a, b, backend="cpu", **kwargs), x, y)
    want = run_with_grads(lambda a, b: reference.mmd_loss(a, b, **kwargs), x, y)
    assert got[0].dtype == torch.float64
    for a, b in zip(got, want, strict=True):
        assert_matches(a, b, torch.float64, "float64 mmd")


def test_mmd_of_a_sample_with_itself_is_zero():
    x = samples(8, 5, torch.float32, 4)
    for kernel in KERNELS:
        assert fastkd.mmd_loss(x, x, kernel=kernel, backend="cpu").item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_mmd_laplacian_near_coincident_points(tiles, dtype):
    """y ≈ x (a converged student) and duplicated rows: the laplacian's square
    root amplifies the norm form's rounding at small distances, so those pairs
    are recomputed from their differences."""
    x = samples(12, 40, dtype, 11, shift=3.0)
    x[5] = x[2]  # an exact duplicate within x
    y = x[:9] + 1e-4 * samples(9, 40, dtype, 12)
    check_parity(
        lambda a, b: fastkd.mmd_loss(a, b, kernel="laplacian", backend="cpu"),
        lambda a, b: reference.mmd_loss(a, b, kernel="laplacian"),
        (x, y),
        "cpu mmd near points",
    )


def test_mmd_only_inputs_are_saved_for_backward():
    n, m, d = 48, 64, 4
    x = samples(n, d, torch.float32, 5).requires_grad_(True)
    y = samples(m, d, torch.float32, 6).requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = fastkd.mmd_loss(x, y, backend="cpu")
    assert saved and max(t.numel() for t in saved) <= m * d < n * m
    loss.backward()
    assert x.grad is not None and y.grad is not None


def test_mmd_auto_uses_the_cpu_kernel_and_the_module_matches():
    x, y = samples(6, 8, torch.float32, 7), samples(5, 8, torch.float32, 8)
    auto = fastkd.mmd_loss(x, y, kernel="laplacian", unbiased=True)
    assert torch.equal(auto, fastkd.mmd_loss(x, y, kernel="laplacian", unbiased=True, backend="cpu"))
    module = fastkd.MMDLoss(kernel="laplacian", unbiased=True)
    assert torch.equal(module(x, y), auto)
    assert "laplacian" in repr(module)


def test_mmd_nan_propagates():
    x = samples(5, 3, torch.float32, 9)
    x[2, 1] = float("nan")
    for kernel in KERNELS:
        assert torch.isnan(fastkd.mmd_loss(x, samples(4, 3, torch.float32, 10), kernel=kernel, backend="cpu"))


# ---- the ops ------------------------------------------------------------------


def op_args(dtype, kernel=0, n=7, m=11, d=5, unbiased=False, tile_rows=3):
    x = torch.randn(n, d, dtype=dtype)
    y = torch.randn(m, d, dtype=dtype)
    return x, y, kernel, [0.5, 2.0], 2, 1.5, unbiased, tile_rows


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("kernel", (0, 1, 2))
def test_opcheck(dtype, kernel):
    args = op_args(dtype, kernel, unbiased=kernel == 1)
    torch.library.opcheck(torch.ops.fastkd.mmd_forward.default, args)
    loss = torch.ops.fastkd.mmd_forward(*args)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.shape == () and loss.dtype == acc
    torch.library.opcheck(torch.ops.fastkd.mmd_backward.default, (torch.tensor(0.7, dtype=acc), *args))


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"x": torch.randn(7)}, "x must be 2-D"),
        ({"y": torch.randn(11, 4)}, "same feature dim"),
        ({"y": torch.randn(11, 5, dtype=torch.float64)}, "same dtype"),
        ({"kernel": 3}, "kernel must be"),
        ({"bandwidths": [1.0, -1.0]}, "bandwidths"),
        ({"degree": 0}, "degree"),
        ({"c": 0.0}, "c must be"),
        ({"x": torch.randn(1, 5), "unbiased": True}, "unbiased"),
        ({"tile_rows": 0}, "tile_rows"),
    ],
)
def test_op_checks(change, needle):
    names = ("x", "y", "kernel", "bandwidths", "degree", "c", "unbiased", "tile_rows")
    args = dict(zip(names, op_args(torch.float32), strict=True))
    args.update(change)
    with pytest.raises(RuntimeError, match=needle):
        torch.ops.fastkd.mmd_forward(*args.values())


# ---- validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"x": torch.randn(4)}, "x"),
        ({"y": torch.randn(4, 3)}, "y has feature dim"),
        ({"y": torch.randn(4, 5, dtype=torch.float64)}, "y dtype"),
        ({"kernel": "rbf"}, "kernel"),
        ({"bandwidths": ()}, "bandwidths"),
        ({"bandwidths": (1.0, 0.0)}, "bandwidths"),
        ({"degree": 0}, "degree"),
        ({"degree": 2.5}, "degree"),
        ({"c": -1.0}, "c"),
        ({"unbiased": 1}, "unbiased"),
        ({"x": torch.randn(1, 5), "unbiased": True}, "x"),
        ({"backend": "fast"}, "backend"),
    ],
)
def test_mmd_bad_arguments_raise_value_error(kwargs, needle):
    args = {"x": torch.randn(4, 5), "y": torch.randn(3, 5), "backend": "cpu"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle):
        fastkd.mmd_loss(args.pop("x"), args.pop("y"), **args)


@pytest.mark.parametrize("fn", ("mmd", "nst"))
def test_explicit_gpu_backend_on_cpu_tensors_raises(fn):
    with pytest.raises(ValueError, match="backend='cuda'"):
        if fn == "mmd":
            fastkd.mmd_loss(torch.randn(4, 5), torch.randn(4, 5), backend="cuda")
        else:
            fastkd.nst_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), backend="cuda")


def test_explicit_backend_without_mmd_kernel_raises(monkeypatch):
    monkeypatch.setattr(fkf._dispatch, "resolve", lambda backend, tensor: "triton")
    with pytest.raises(ValueError, match="backend='triton' has no mmd kernel yet"):
        fastkd.mmd_loss(torch.randn(4, 5), torch.randn(4, 5), backend="triton")
    with pytest.raises(ValueError, match="backend='triton' has no nst kernel yet"):
        fastkd.nst_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), backend="triton")
    # backend="auto" falls back to the reference instead
    x, y = torch.randn(4, 5), torch.randn(4, 5)
    assert torch.equal(fastkd.mmd_loss(x, y), reference.mmd_loss(x, y))


# ---- NST --------------------------------------------------------------------------


def feature_maps(n, c, h, w, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype)


# (N, C_s, H_s, C_t, H_t): both the channel form (HW >= C) and the Gram form (HW < C)
NST_SHAPES = ((3, 4, 8, 6, 4), (2, 16, 2, 24, 4), (1, 5, 3, 5, 3), (4, 32, 4, 8, 2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", NST_SHAPES, ids=lambda s: "_".join(map(str, s)))
def test_nst_parity(dtype, shape):
    n, c_s, h_s, c_t, h_t = shape
    s = feature_maps(n, c_s, h_s, h_s, dtype, 0)
    t = feature_maps(n, c_t, h_t, h_t + 1, dtype, 1)
    check_parity(
        lambda a, b: fastkd.nst_loss(a, b, backend="cpu"),
        reference.nst_loss,
        (s, t),
        "cpu nst",
    )


def test_nst_module_and_validation():
    s, t = feature_maps(2, 3, 4, 4, torch.float32, 2), feature_maps(2, 5, 4, 4, torch.float32, 3)
    assert torch.allclose(fastkd.NSTLoss()(s, t), reference.nst_loss(s, t), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="teacher_maps batch size"):
        fastkd.nst_loss(s, t[:1], backend="cpu")
    with pytest.raises(ValueError, match="student_maps"):
        fastkd.nst_loss(s[0], t, backend="cpu")
