"""InfoNCE's labels on a GPU (docs/spec.md §6): where
``fastkd._validate.values_checked_on_host`` is False, nothing reads a label on
the host; a query whose label lies outside ``[0, M)`` gets a NaN row loss and
a NaN gradient row (so the keys' gradient, a sum over every query, is NaN
too), the other rows are those of the float64 reference, and no label
indexes memory.

Here the checks are switched off for CPU tensors (monkeypatching the policy)
and the Triton kernels run in the interpreter; under
``FASTKD_TEST_DEVICE=cuda`` the same tests run the Triton and CUDA kernels on
the GPU (the CUDA ones in both the keep and the recompute mode), where the
policy is off by itself.
"""

from __future__ import annotations

import importlib
import types

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import _ops, _validate, reference
from tests.common_checks import backend_param
from tests.helpers import DEVICE, assert_matches
from tests.no_host_reads import no_host_reads, values_checked_in_kernels

fkinfo = importlib.import_module("fastkd.info_nce")

pytestmark = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR))

N, M, D = 6, 9, 5
# Rows 1, 3 and 4 get labels M, −1 and 10¹²; rows 0, 2 and 5 keep theirs.
BAD_ROWS = [1, 3, 4]
GOOD_ROWS = [0, 2, 5]
# Triton blocks that split the rows and keys over several programs (tl.dot needs >= 16).
SMALL_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16, "BLOCK_DV": 16, "num_warps": 1}


def gpu_backends():
    """The InfoNCE kernel backends of a GPU (triton, cuda)."""
    return [backend_param(name) for name in fkinfo.INFO_NCE_KERNELS if name != "cpu"]


def inputs(seed, rows=N, keys=M):
    """q (rows, D), k (keys, D) float32 on DEVICE, good labels, and the labels of BAD_ROWS made bad."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(rows, D, generator=g), dim=1).to(DEVICE)
    k = F.normalize(torch.randn(keys, D, generator=g), dim=1).to(DEVICE)
    labels = torch.randint(keys, (rows,), generator=g).to(DEVICE)
    bad = labels.clone()
    bad[BAD_ROWS] = torch.tensor([keys, -1, 10**12], device=DEVICE)
    return q, k, labels, bad


def reference_rows(q, k, labels, temperature, grad_rows):
    """Float64 row losses (n,) and the gradients of Σ_i grad_rows_i · loss_i: (dq (n, D), dk (M, D))."""
    q64 = q.double().requires_grad_(True)
    k64 = k.double().requires_grad_(True)
    rows = F.cross_entropy(q64 @ k64.T / temperature, labels, reduction="none")
    rows.backward(grad_rows.double())
    return rows.detach(), q64.grad, k64.grad


def ops(backend, mode):
    """(forward, backward) of ``backend``'s op in ``mode``, with the Triton launchers' signatures."""
    if mode == "keep":
        return torch.ops.fastkd.info_nce_softmax_forward, torch.ops.fastkd.info_nce_softmax_backward
    forward, backward = fkinfo._info_nce_ops(backend)
    return (lambda q, k, y, inv_t: forward(q, k, y, inv_t, 4),
            lambda g, q, k, y, state, inv_t: backward(g, q, k, y, state, inv_t, 4))


MODES = ("keep", "recompute", "recompute_small_blocks")


@pytest.fixture(params=MODES)
def mode(request, monkeypatch):
    """The op mode of a test: keep the softmax (cuda only), recompute with the
    default blocks, recompute with several Triton blocks per dim."""
    backend = request.node.callspec.params["backend"]
    if request.param == "keep" and backend not in fkinfo.KEEPING_KERNELS:
        pytest.skip(f"{backend} always recomputes")
    if request.param == "recompute_small_blocks":
        if backend != "triton":
            pytest.skip("the Triton blocks only")
        from fastkd.kernels import info_nce as triton_info_nce

        monkeypatch.setattr(triton_info_nce, "launch_config", lambda rows, keys, dim: dict(SMALL_BLOCKS))
    return request.param


@pytest.mark.parametrize("backend", gpu_backends())
def test_ops_give_nan_rows_for_out_of_range_labels(backend, mode, monkeypatch):
    """The ops themselves: NaN row loss and dq row exactly where the label is bad,
    the float64 reference elsewhere; dk, a sum over every query, is NaN."""
    values_checked_in_kernels(monkeypatch)
    q, k, labels, bad = inputs(70, rows=20, keys=37)
    forward, backward = ops(backend, mode)
    temperature = 0.5
    row_loss, state = forward(q, k, bad, 1 / temperature)
    is_bad = torch.zeros(20, dtype=torch.bool, device=DEVICE)
    is_bad[BAD_ROWS] = True
    assert torch.equal(torch.isnan(row_loss), is_bad)
    grad_rows = torch.linspace(0.5, 1.5, 20, device=DEVICE, dtype=state.dtype)
    want_rows, want_dq, _ = reference_rows(q[~is_bad], k, labels[~is_bad], temperature, grad_rows[~is_bad])
    assert_matches(row_loss[~is_bad], want_rows, torch.float32, f"{backend} {mode} good rows",
                   elementwise=True)
    dq, dk = backward(grad_rows, q, k, bad, state, 1 / temperature)
    assert torch.equal(torch.isnan(dq).any(1), is_bad) and torch.isnan(dq[is_bad]).all()
    assert_matches(dq[~is_bad], want_dq, torch.float32, f"{backend} {mode} good rows' dq")
    assert torch.isnan(dk).all()


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("budget", ("keep", "recompute"))
def test_out_of_range_labels_give_a_nan_loss_and_nan_gradient_rows(backend, budget, monkeypatch):
    """Through fastkd.info_nce: the loss is NaN, q's gradient is NaN in exactly the
    bad rows and the reference's elsewhere."""
    if budget == "keep" and backend not in fkinfo.KEEPING_KERNELS:
        pytest.skip(f"{backend} always recomputes")
    values_checked_in_kernels(monkeypatch)
    q, k, labels, bad = inputs(71)
    q_bad, k_bad = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    loss = fastkd.info_nce(q_bad, k_bad, labels=bad, temperature=0.3, backend=backend,
                           logits_memory_budget=2**62 if budget == "keep" else 0)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.isnan(q_bad.grad[BAD_ROWS]).all() and not torch.isnan(q_bad.grad[GOOD_ROWS]).any()
    assert torch.isnan(k_bad.grad).all()
    # the good rows' gradient: that of their share of the mean over all N rows
    grad_rows = torch.full((len(GOOD_ROWS),), 1 / N, dtype=torch.float64, device=DEVICE)
    _, want_dq, _ = reference_rows(q[GOOD_ROWS], k, labels[GOOD_ROWS], 0.3, grad_rows)
    assert_matches(q_bad.grad[GOOD_ROWS], want_dq, torch.float32, f"{backend} good rows' gradient")


def test_reference_backend_checks_labels_without_the_host_check(monkeypatch):
    """The reference gathers with the labels, unguarded: it refuses bad ones on every device."""
    values_checked_in_kernels(monkeypatch)
    q, k, _, bad = inputs(72)
    with pytest.raises(ValueError, match="labels must lie in"):
        fastkd.info_nce(q, k, labels=bad, backend="reference")


@pytest.mark.parametrize("backend", gpu_backends())
def test_device_value_checks_on_request(backend, monkeypatch):
    """FASTKD_CHECK_DEVICE_VALUES=1: the label range raises ValueError with the
    policy answering as for a GPU tensor."""
    real = _validate.values_checked_on_host
    gpu = types.SimpleNamespace(device=torch.device("cuda"))
    monkeypatch.setattr(_validate, "values_checked_on_host", lambda value: real(gpu))
    monkeypatch.setenv("FASTKD_CHECK_DEVICE_VALUES", "1")
    q, k, _, bad = inputs(73)
    with pytest.raises(ValueError, match="labels must lie in"):
        fastkd.info_nce(q, k, labels=bad, backend=backend)
    if backend == "triton":
        from fastkd.kernels import info_nce as triton_info_nce

        with pytest.raises(ValueError, match="labels must lie in"):
            triton_info_nce.info_nce_forward(q, k, bad, 2.0)


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("case", ("diagonal", "labels", "symmetric"))
def test_no_host_reads(backend, case, monkeypatch):
    """A GPU path never reads a value on the host (a device → host sync): the
    forward and backward of info_nce with every host read refused."""
    values_checked_in_kernels(monkeypatch)
    q, k, labels, _ = inputs(74, keys=N if case == "symmetric" else M)
    kwargs = {"labels": labels} if case == "labels" else {"symmetric": case == "symmetric"}
    q_grad, k_grad = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    with no_host_reads():
        loss = fastkd.info_nce(q_grad, k_grad, temperature=0.2, backend=backend, **kwargs)
        loss.backward()
    q64, k64 = q.double().requires_grad_(True), k.double().requires_grad_(True)
    want = reference.info_nce(q64, k64, temperature=0.2, **kwargs)
    want.backward()
    assert_matches(loss.detach(), want, torch.float32, f"{backend} {case} loss")
    assert_matches(q_grad.grad, q64.grad, torch.float32, f"{backend} {case} q grad")
    assert_matches(k_grad.grad, k64.grad, torch.float32, f"{backend} {case} k grad")


def test_gather_keeps_a_label_outside_its_rank_out_of_range(monkeypatch):
    """gather=True offsets each rank's labels by its first key: a label outside the
    rank's own keys must not land on another rank's key. This process plays
    rank 1 of 2 (rank 0 holds the same q, k and good labels); its label −1
    would become rank 0's last key, and must give a NaN loss instead."""
    values_checked_in_kernels(monkeypatch)
    q, k, labels, _ = inputs(75)
    bad = labels.clone()
    bad[3] = -1
    monkeypatch.setattr(fkinfo._distributed, "gather_with_grad", lambda name, x, group: torch.cat([x, x]))
    monkeypatch.setattr(fkinfo._distributed, "gather_labels",
                        lambda y, keys_per_rank, group: torch.cat([labels, y + keys_per_rank]))
    assert torch.isnan(fastkd.info_nce(q, k, labels=bad, gather=True, backend="triton"))
    assert torch.isfinite(fastkd.info_nce(q, k, labels=labels, gather=True, backend="triton"))
