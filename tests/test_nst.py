"""NST (docs/spec.md §3): the closed form of the compiled backends (cpu + triton here,
triton + cuda under FASTKD_TEST_DEVICE=cuda) against the float64 reference,
the module and the argument validation."""

from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd import _dispatch, _ops, reference
from fastkd import nst as fknst
from tests.common_checks import family_backend_params
from tests.helpers import DEVICE
from tests.helpers import check_parity_with_grads as check_parity

pytestmark = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR))

DTYPES = (torch.float32, torch.bfloat16, torch.float16)




def nst_params():
    """KERNEL_BACKENDS that run NST's closed form (composite ATen: no kernel of their own)."""
    return family_backend_params(fknst.NST_CLOSED_FORM_BACKENDS, "no NST path")


def feature_maps(n, c, h, w, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(DEVICE, dtype)


# (N, C_s, H_s, C_t, H_t): both the channel form (HW >= C) and the Gram form (HW < C)
NST_SHAPES = ((3, 4, 8, 6, 4), (2, 16, 2, 24, 4), (1, 5, 3, 5, 3), (4, 32, 4, 8, 2))


@pytest.mark.parametrize("backend", nst_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", NST_SHAPES, ids=lambda s: "_".join(map(str, s)))
def test_nst_parity(backend, dtype, shape):
    n, c_s, h_s, c_t, h_t = shape
    s = feature_maps(n, c_s, h_s, h_s, dtype, 0)
    t = feature_maps(n, c_t, h_t, h_t + 1, dtype, 1)
    check_parity(
        lambda a, b: fastkd.nst_loss(a, b, backend=backend),
        reference.nst_loss,
        (s, t),
        f"{backend} nst",
    )


def test_nst_module_and_validation():
    s, t = feature_maps(2, 3, 4, 4, torch.float32, 2), feature_maps(2, 5, 4, 4, torch.float32, 3)
    assert torch.allclose(fastkd.NSTLoss()(s, t), reference.nst_loss(s, t), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="teacher_maps batch size"):
        fastkd.nst_loss(s, t[:1])
    with pytest.raises(ValueError, match="student_maps"):
        fastkd.nst_loss(s[0], t)


def test_explicit_gpu_backend_on_cpu_tensors_raises():
    with pytest.raises(ValueError, match="backend='cuda'"):
        fastkd.nst_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), backend="cuda")


def test_explicit_backend_without_nst_path_raises(monkeypatch):
    monkeypatch.setattr(_dispatch, "resolve", lambda backend, tensor: "triton")
    monkeypatch.setattr(fknst, "NST_CLOSED_FORM_BACKENDS", ("cpu",))
    with pytest.raises(ValueError, match="backend='triton' has no nst kernel yet"):
        fastkd.nst_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), backend="triton")
