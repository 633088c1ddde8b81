"""The gaussian MMD block kernel (csrc/cpu/mmd_kernel.cpp) in every SIMD variant
this CPU supports, against the float64 reference: SIMD tails, diagonal
segments inside a vector, several tiles, biased and unbiased; and the GPU
backends at sizes with many tiles (run under FASTKD_TEST_DEVICE=cuda)."""

from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd import _ops, reference
from fastkd import mmd as fkmmd
from tests.helpers import assert_matches
from tests.test_mmd import INTERPRETED, KERNELS, check_parity, kernel_kwargs, kernel_params, samples

pytestmark = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR))


def _supported_capabilities():
    order = ["default", "avx2", "avx512"]
    best = _ops._C.supported_cpu_capability() if _ops._C else "default"
    return order[: order.index(best) + 1]


@pytest.mark.parametrize("capability", _supported_capabilities())
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("unbiased", (False, True), ids=("biased", "unbiased"))
@pytest.mark.parametrize("tile", (5, 64))
def test_gaussian_every_simd_variant(capability, dtype, unbiased, tile, monkeypatch):
    monkeypatch.setenv("FASTKD_CPU_CAPABILITY", capability)
    monkeypatch.setattr(fkmmd, "_mmd_tile_rows", lambda n, m: tile)
    assert _ops._C.cpu_capability() == capability
    # 37 and 53 columns: a SIMD tail in every width, diagonals at every lane offset
    x, y = samples(37, 19, dtype, 20).cpu(), samples(53, 19, dtype, 21, shift=0.2).cpu()
    kwargs = {"kernel": "gaussian", "bandwidths": (0.3, 1.0, 3.0), "unbiased": unbiased}
    check_parity(
        lambda a, b: fastkd.mmd_loss(a, b, backend="cpu", **kwargs),
        lambda a, b: reference.mmd_loss(a, b, **kwargs),
        (x, y),
        f"gaussian mmd {capability}",
    )


@pytest.mark.parametrize("capability", _supported_capabilities())
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_gaussian_every_simd_variant_at_an_offset_with_a_tiny_bandwidth(capability, dtype, monkeypatch):
    """Samples at a common offset of 1e4 (centred exactly before the norm form)
    and a bandwidth whose 1/(2σ²) overflows float32 (exponent held finite), in
    every SIMD variant, against the float64 reference."""
    monkeypatch.setenv("FASTKD_CPU_CAPABILITY", capability)
    monkeypatch.setattr(fkmmd, "_mmd_tile_rows", lambda n, m: 5)
    assert _ops._C.cpu_capability() == capability
    x = (samples(37, 19, torch.float64, 27).cpu() + 1e4).to(dtype)
    y = (samples(53, 19, torch.float64, 28, shift=0.2).cpu() + 1e4).to(dtype)
    kwargs = {"kernel": "gaussian", "bandwidths": (1e-20, 0.3, 1.0, 3.0)}
    check_parity(
        lambda a, b: fastkd.mmd_loss(a, b, backend="cpu", **kwargs),
        lambda a, b: reference.mmd_loss(a, b, **kwargs),
        (x, y),
        f"gaussian mmd {capability} offset 1e4",
    )


def test_gaussian_large_n_loss_is_accurate_in_float32():
    """The loss is a small difference of three block means of size ~Σ_σ 1: the
    block sums are accumulated in double, so float32 stays within tolerance."""
    x, y = samples(700, 64, torch.float32, 22).cpu(), samples(650, 64, torch.float32, 23, shift=0.05).cpu()
    got = fastkd.mmd_loss(x, y, backend="cpu")
    want = reference.mmd_loss(x.double(), y.double())
    assert_matches(got, want, torch.float32, "large-N gaussian mmd", [reference.mmd_loss(x, y)])


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("kernel", KERNELS)
def test_gpu_backends_at_many_tiles(backend, kernel):
    """The GPU backends at their own launch configuration: many row and column
    blocks (and, for triton, the column range split over programs) at
    N, M = 700, 650; for the laplacian, y holds near copies of x spread over
    the tiles so that many tiles take the near-pair path."""
    if backend == "cpu":
        pytest.skip("the cpu op: test_gaussian_every_simd_variant and the large-N test above")
    if backend == "triton" and INTERPRETED:
        pytest.skip("interpreter: hundreds of tiles take minutes")
    x = samples(700, 64, torch.float32, 24)
    y = samples(650, 64, torch.float32, 25, shift=0.05)
    if kernel == "laplacian":
        y[::7] = x[: len(y[::7])] + 1e-4 * samples(len(y[::7]), 64, torch.float32, 26)
    kwargs = kernel_kwargs(kernel)
    check_parity(
        lambda a, b: fastkd.mmd_loss(a, b, backend=backend, **kwargs),
        lambda a, b: reference.mmd_loss(a, b, **kwargs),
        (x, y),
        f"{backend} mmd {kernel} 700x650",
    )
