"""MMD (docs/spec.md §3): every fused backend (cpu + triton here, triton + cuda under
FASTKD_TEST_DEVICE=cuda) against the float64 reference, the ops themselves
(opcheck, C++ checks) and the argument validation."""

from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd import _dispatch, _ops, reference
from fastkd import mmd as fkmmd
from tests.common_checks import family_backend_params
from tests.helpers import DEVICE, KERNEL_BACKENDS, run_with_grads
from tests.helpers import check_parity_with_grads as check_parity

pytestmark = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR))

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SMALL_TILE = 4  # rows per tile (cpu / cuda ops) when the multi-tile path is forced
SMALL_BLOCK = 16  # rows per Triton tile when the multi-tile path is forced (its minimum)
KERNELS = ("gaussian", "laplacian", "polynomial")
# Under the Triton interpreter every operation costs milliseconds: the
# triton backend runs the full grid on a GPU, and on CPU float32 on every
# shape with the default tiles, the rest on these shapes.
INTERPRETED = DEVICE.type == "cpu"
INTERPRETER_SHAPES = ((13, 9, 3), (9, 21, 130))


def kernel_params():
    """The backends of KERNEL_BACKENDS that have an MMD kernel, skipped with the reason when unavailable."""
    return family_backend_params(fkmmd.MMD_KERNELS, "no MMD kernel")


def native_dtypes(backend):
    """float64 runs on the cpu op only (the GPU backends accumulate in float32)."""
    return (torch.float64,) if backend == "cpu" else (torch.float32,)


@pytest.fixture(params=["default_tile", "small_tile"])
def tiles(request, monkeypatch):
    """Runs a test with the default tiling and with small tiles: SMALL_TILE rows
    per tile of the cpu / cuda ops, and SMALL_BLOCK-row Triton tiles with the
    columns split over two programs (the GPU's SPLITS path)."""
    if request.param == "small_tile":
        monkeypatch.setattr(fkmmd, "_mmd_tile_rows", lambda n, m: SMALL_TILE)
        if fastkd._dispatch.backend_status("triton", DEVICE.type).available:
            from fastkd.kernels import mmd as triton_mmd

            config = triton_mmd.launch_config

            def small_blocks(kernel, dim, backward=False):
                return (SMALL_BLOCK, *config(kernel, dim, backward)[1:])

            monkeypatch.setattr(triton_mmd, "launch_config", small_blocks)
            monkeypatch.setattr(triton_mmd, "splits_for", lambda rb, cb, rows, dim, dev: min(2, cb))
    return request.param


def samples(rows, dim, dtype, seed, shift=0.0):
    """Rows of unit scale (‖a − b‖ ~ 1, the scale the default bandwidths suit), on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(rows, dim, generator=g, dtype=torch.float64) + shift) / dim**0.5).to(DEVICE, dtype)




def check_mmd_parity(backend, x, y, what, **kwargs):
    """check_parity of fastkd.mmd_loss(x, y, **kwargs) on ``backend`` against the reference."""
    check_parity(
        lambda a, b: fastkd.mmd_loss(a, b, backend=backend, **kwargs),
        lambda a, b: reference.mmd_loss(a, b, **kwargs),
        (x, y),
        what,
    )


def kernel_kwargs(kernel):
    if kernel == "polynomial":
        return {"kernel": kernel, "degree": 3, "c": 2.0}
    return {"kernel": kernel}


# (N, M, D)
SHAPES = ((1, 1, 3), (1, 6, 3), (13, 9, 3), (19, 19, 130), (9, 21, 130))


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("unbiased", (False, True), ids=("biased", "unbiased"))
def test_mmd_parity(tiles, backend, dtype, shape, kernel, unbiased):
    n, m, d = shape
    if unbiased and min(n, m) < 2:
        pytest.skip("unbiased needs 2 rows")
    if backend == "triton" and INTERPRETED:
        if tiles == "small_tile" and (dtype != torch.float32 or shape not in INTERPRETER_SHAPES):
            pytest.skip("interpreter: small tiles in float32 on INTERPRETER_SHAPES only")
        if dtype != torch.float32 and shape not in INTERPRETER_SHAPES:
            pytest.skip("interpreter: bfloat16 / float16 on INTERPRETER_SHAPES only")
    x = samples(n, d, dtype, 0)
    y = samples(m, d, dtype, 1, shift=0.3)
    kwargs = {**kernel_kwargs(kernel), "unbiased": unbiased}
    check_mmd_parity(backend, x, y, f"{backend} mmd {kernel}", **kwargs)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("bandwidths", (0.7, (0.1, 1.0, 10.0)))
@pytest.mark.parametrize("kernel", ("gaussian", "laplacian"))
def test_mmd_bandwidths_non_contiguous(tiles, backend, bandwidths, kernel):
    """Column-major x, row-strided y; float64 where the backend takes it."""
    (dtype,) = native_dtypes(backend)
    x = samples(11, 20, dtype, 2).t().contiguous().t()  # column-major view
    y = samples(30, 20, dtype, 3)[::2]  # row stride 40
    assert not x.is_contiguous() and not y.is_contiguous()
    kwargs = {"kernel": kernel, "bandwidths": bandwidths}
    check_mmd_parity(backend, x, y, f"{backend} {dtype} mmd", **kwargs)


@pytest.mark.parametrize("backend", kernel_params())
def test_mmd_of_a_sample_with_itself_is_zero(backend):
    x = samples(8, 5, torch.float32, 4)
    for kernel in KERNELS:
        assert fastkd.mmd_loss(x, x, kernel=kernel, backend=backend).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_mmd_laplacian_near_coincident_points(tiles, backend, dtype):
    """y ≈ x (a converged student) and duplicated rows: the laplacian's square
    root amplifies the norm form's rounding at small distances, so those pairs
    are recomputed from their differences (in the Triton kernels: the tiles
    that hold such pairs take the difference path). Without it the float32
    gradient is off by O(1) (the direction (a − b)/d of a rounding residue)."""
    if dtype not in native_dtypes(backend) + (torch.float32,):
        pytest.skip(f"{backend} takes no {dtype}")
    x = samples(12, 40, dtype, 11, shift=3.0)
    x[5] = x[2]  # an exact duplicate within x
    y = x[:9] + 1e-4 * samples(9, 40, dtype, 12)
    check_parity(
        lambda a, b: fastkd.mmd_loss(a, b, kernel="laplacian", backend=backend),
        lambda a, b: reference.mmd_loss(a, b, kernel="laplacian"),
        (x, y),
        f"{backend} mmd near points",
    )


@pytest.mark.parametrize("backend", kernel_params())
def test_mmd_only_inputs_are_saved_for_backward(backend):
    n, m, d = 48, 64, 4
    x = samples(n, d, torch.float32, 5).requires_grad_(True)
    y = samples(m, d, torch.float32, 6).requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = fastkd.mmd_loss(x, y, backend=backend)
    assert saved and max(t.numel() for t in saved) <= m * d < n * m
    loss.backward()
    assert x.grad is not None and y.grad is not None


def test_mmd_auto_uses_the_first_kernel_backend_and_the_module_matches():
    """backend="auto": the cpu op on CPU tensors, triton on CUDA tensors (docs/design.md §2)."""
    first = KERNEL_BACKENDS[0]
    if not fastkd._dispatch.backend_status(first, DEVICE.type).available:
        pytest.skip(f"{first} is unavailable")
    x, y = samples(6, 8, torch.float32, 7), samples(5, 8, torch.float32, 8)
    auto = fastkd.mmd_loss(x, y, kernel="laplacian", unbiased=True)
    assert torch.equal(auto, fastkd.mmd_loss(x, y, kernel="laplacian", unbiased=True, backend=first))
    module = fastkd.MMDLoss(kernel="laplacian", unbiased=True)
    assert torch.equal(module(x, y), auto)
    assert "laplacian" in repr(module)


@pytest.mark.parametrize("backend", kernel_params())
def test_mmd_nan_propagates(backend):
    x = samples(5, 3, torch.float32, 9)
    x[2, 1] = float("nan")
    y = samples(4, 3, torch.float32, 10)
    for kernel in KERNELS:
        xg = x.clone().requires_grad_(True)
        loss = fastkd.mmd_loss(xg, y, kernel=kernel, backend=backend)
        assert torch.isnan(loss)
        loss.backward()
        assert torch.isnan(xg.grad[2]).all()


# ---- translation invariance, bandwidth range, thread count -------------------------

# (offset, spread): samples of scale `spread` around `offset` in every coordinate,
# with the bandwidths scaled by `spread`. At offset 1e19 with spread 1 the float32
# inputs collapse onto a few points (their spacing there is ~1e12): the loss and
# gradients are then exactly those of coincident points.
OFFSETS = ((0.0, 1.0), (1e3, 1.0), (1e4, 1.0), (1e19, 1.0), (1e19, 1e16))


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("kernel", ("gaussian", "laplacian"))
@pytest.mark.parametrize("offset,spread", OFFSETS, ids=lambda v: f"{v:g}")
def test_mmd_distance_kernels_are_translation_invariant(backend, kernel, offset, spread):
    """Distances do not depend on a common offset, so neither does their
    accuracy: the fused backends centre the samples before forming
    ‖a‖² + ‖b‖² − 2a·b, whose rounding would otherwise scale with ‖a‖²."""
    g = torch.Generator().manual_seed(30)
    x = (torch.randn(13, 3, generator=g, dtype=torch.float64) * spread + offset).float().to(DEVICE)
    y = (torch.randn(9, 3, generator=g, dtype=torch.float64) + 0.3) * spread + offset
    y = y.float().to(DEVICE)
    kwargs = {"kernel": kernel, "bandwidths": tuple(s * spread for s in (0.5, 1.0, 2.0, 4.0, 8.0))}
    check_mmd_parity(backend, x, y, f"{backend} mmd {kernel} offset {offset:g}", **kwargs)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("kernel", ("gaussian", "laplacian"))
@pytest.mark.parametrize("bandwidths", (1e-20, (1e-20, 1.0), (1e-100, 2.0)), ids=str)
def test_mmd_tiny_bandwidths(backend, kernel, bandwidths):
    """A bandwidth far below every distance contributes k = 0 off the diagonal
    and a zero gradient, although 1/(2σ²) overflows float32."""
    x = samples(13, 3, torch.float32, 31)
    y = samples(9, 3, torch.float32, 32, shift=0.3)
    kwargs = {"kernel": kernel, "bandwidths": bandwidths}
    got = run_with_grads(lambda a, b: fastkd.mmd_loss(a, b, backend=backend, **kwargs), x, y)
    assert all(torch.isfinite(t).all() for t in got)
    check_mmd_parity(backend, x, y, f"{backend} mmd {kernel} bandwidths {bandwidths}", **kwargs)


@pytest.mark.parametrize("backend", ["reference", *kernel_params()])
@pytest.mark.parametrize("bandwidths", (1e-200, (1.0, 1e-151)), ids=str)
def test_mmd_unrepresentable_bandwidths_raise(backend, bandwidths):
    """1/(2σ²) is not a finite float64 below σ ~ 1e-154: rejected on every backend alike."""
    x, y = samples(4, 3, torch.float32, 33), samples(3, 3, torch.float32, 34)
    for kernel in ("gaussian", "laplacian"):
        with pytest.raises(ValueError, match=r"bandwidths must be >= 1e-150"):
            fastkd.mmd_loss(x, y, kernel=kernel, bandwidths=bandwidths, backend=backend)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpu op's thread pool")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rows_y", (257, 1), ids=("257_rows", "one_row"))
def test_mmd_cpu_result_does_not_depend_on_the_thread_count(dtype, kernel, rows_y):
    """Every reduction of the cpu op runs over chunks fixed by the shapes, not
    by the number of threads, and combines them in a fixed order. One row of
    ``y`` makes the cross term's gradient a one-row product ``Cᵀ x`` with a
    long inner dimension, which a BLAS may split across threads."""
    x = samples(300, 40, dtype, 35)
    y = samples(rows_y, 40, dtype, 36, shift=0.3)
    kwargs = kernel_kwargs(kernel)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 4):
            torch.set_num_threads(count)
            results.append(run_with_grads(lambda a, b: fastkd.mmd_loss(a, b, backend="cpu", **kwargs), x, y))
    finally:
        torch.set_num_threads(threads)
    for count, result in zip((2, 4), results[1:], strict=True):
        for name, a, b in zip(("loss", "grad x", "grad y"), results[0], result, strict=True):
            assert torch.equal(a, b), f"{kernel} {name}: 1 and {count} threads differ"


# ---- the ops ------------------------------------------------------------------

OP_DISPATCH_KEY = "CUDA" if DEVICE.type == "cuda" else "CPU"
needs_op = pytest.mark.skipif(
    not _ops.has_kernel("mmd_forward", OP_DISPATCH_KEY),
    reason=f"no fastkd::mmd_forward {OP_DISPATCH_KEY} kernel",
)


def op_args(dtype, kernel=0, n=7, m=11, d=5, unbiased=False, tile_rows=3):
    x = torch.randn(n, d, dtype=dtype, device=DEVICE)
    y = torch.randn(m, d, dtype=dtype, device=DEVICE)
    return x, y, kernel, [0.5, 2.0], 2, 1.5, unbiased, tile_rows


@needs_op
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("kernel", (0, 1, 2))
def test_opcheck(dtype, kernel):
    args = op_args(dtype, kernel, unbiased=kernel == 1)
    torch.library.opcheck(torch.ops.fastkd.mmd_forward.default, args)
    loss = torch.ops.fastkd.mmd_forward(*args)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.shape == () and loss.dtype == acc
    grad = torch.tensor(0.7, dtype=acc, device=DEVICE)
    torch.library.opcheck(torch.ops.fastkd.mmd_backward.default, (grad, *args))


@needs_op
@pytest.mark.parametrize("kernel", (0, 1, 2))
@pytest.mark.parametrize("unbiased", (False, True), ids=("biased", "unbiased"))
def test_op_tile_rows_do_not_change_the_result(kernel, unbiased):
    """The ops' tiling (tile_rows) against one tile holding every row, float64."""
    x, y, *rest = op_args(torch.float64, kernel, n=9, m=13, d=6, unbiased=unbiased)
    params = rest[:-1]
    whole = torch.ops.fastkd.mmd_forward(x, y, *params, 64)
    grad = torch.tensor(0.7, dtype=torch.float64, device=DEVICE)
    whole_grads = torch.ops.fastkd.mmd_backward(grad, x, y, *params, 64)
    for tile_rows in (1, 4):
        torch.testing.assert_close(torch.ops.fastkd.mmd_forward(x, y, *params, tile_rows), whole)
        grads = torch.ops.fastkd.mmd_backward(grad, x, y, *params, tile_rows)
        for got, want in zip(grads, whole_grads, strict=True):
            torch.testing.assert_close(got, want)


OP_CHECK_CASES = [
    ({"x": torch.randn(7)}, "x must be 2-D"),
    ({"y": torch.randn(11, 4)}, "same feature dim"),
    ({"y": torch.randn(11, 5, dtype=torch.float64)}, "same dtype"),
    ({"kernel": 3}, "kernel must be"),
    ({"bandwidths": [1.0, -1.0]}, "bandwidths"),
    ({"degree": 0}, "degree"),
    ({"c": 0.0}, "c must be"),
    ({"x": torch.randn(1, 5), "unbiased": True}, "unbiased"),
    ({"tile_rows": 0}, "tile_rows"),
    ({"bandwidths": [1.0, 1e-200]}, "bandwidths must be >= 1e-150"),
]


@needs_op
@pytest.mark.parametrize("change,needle", OP_CHECK_CASES)
def test_op_checks(change, needle):
    names = ("x", "y", "kernel", "bandwidths", "degree", "c", "unbiased", "tile_rows")
    args = dict(zip(names, op_args(torch.float32), strict=True))
    args.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    with pytest.raises(RuntimeError, match=needle):
        torch.ops.fastkd.mmd_forward(*args.values())
    with pytest.raises(RuntimeError, match=needle):
        grad = torch.tensor(1.0, device=DEVICE)
        torch.ops.fastkd.mmd_backward(grad, *args.values())


@pytest.mark.skipif(not fastkd._dispatch.backend_status("triton", DEVICE.type).available, reason="no triton")
@pytest.mark.parametrize(
    "change,needle",
    [case for case in OP_CHECK_CASES if "tile_rows" not in case[0] and case[1] != "same dtype"]
    + [
        ({"y": torch.randn(11, 5, dtype=torch.float16)}, "same dtype"),
        ({"x": torch.randn(7, 5, dtype=torch.float64), "y": torch.randn(11, 5, dtype=torch.float64)},
         "x must be"),
        ({"unbiased": 1}, "unbiased must be a bool"),
        ({"degree": 2.0}, "degree"),
    ],
)
def test_triton_launcher_checks(change, needle):
    """kernels/mmd.py rejects what the C++ ops reject, with ValueError, before any launch."""
    from fastkd.kernels import mmd as triton_mmd

    names = ("x", "y", "kernel", "bandwidths", "degree", "c", "unbiased")
    args = dict(zip(names, op_args(torch.float32)[:-1], strict=True))
    args.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    with pytest.raises(ValueError, match=needle):
        triton_mmd.mmd_forward(*args.values())
    with pytest.raises(ValueError, match=needle):
        triton_mmd.mmd_backward(torch.tensor(1.0, device=DEVICE), *args.values())


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
@pytest.mark.parametrize("backend", kernel_params())
def test_mmd_bad_arguments_raise_value_error(kwargs, needle, backend):
    args = {"x": torch.randn(4, 5), "y": torch.randn(3, 5), "backend": backend}
    args.update(kwargs)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(ValueError, match=needle):
        fastkd.mmd_loss(args.pop("x"), args.pop("y"), **args)


def test_explicit_gpu_backend_on_cpu_tensors_raises():
    with pytest.raises(ValueError, match="backend='cuda'"):
        fastkd.mmd_loss(torch.randn(4, 5), torch.randn(4, 5), backend="cuda")


def test_explicit_backend_without_mmd_kernel_raises(monkeypatch):
    monkeypatch.setattr(_dispatch, "resolve", lambda backend, tensor: "triton")
    monkeypatch.setattr(fkmmd, "MMD_KERNELS", ("cpu",))
    with pytest.raises(ValueError, match="backend='triton' has no mmd kernel yet"):
        fastkd.mmd_loss(torch.randn(4, 5), torch.randn(4, 5), backend="triton")
    # backend="auto" falls back to the reference instead
    x, y = torch.randn(4, 5), torch.randn(4, 5)
    assert torch.equal(fastkd.mmd_loss(x, y), reference.mmd_loss(x, y))
