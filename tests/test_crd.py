"""CRD (docs/spec.md §4, RepDistiller CRDLoss): the reference against a loop transcription
of the formulas, the fused kernels (cpu and triton here; triton and cuda with
FASTKD_TEST_DEVICE=cuda) against the float64 reference (loss and gradients of
the embed heads and inputs), the memory banks and Z (update rule, state_dict),
negative sampling, the ops and launchers themselves and the argument validation."""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch

import fastkd
from fastkd import _ops
from fastkd import crd as fkcrd
from fastkd._backend import kernel_op
from fastkd.reference import crd as refcrd
from tests.common_checks import backend_param
from tests.helpers import DEVICE, assert_matches, relative_error
from tests.no_host_reads import no_host_reads, values_checked_in_kernels

pytestmark = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR))

UPSTREAM = 0.7  # never test only with an upstream gradient of 1


def kernel_params():
    """The backends with a CRD kernel on DEVICE, skipped with the reason when unavailable."""
    return [backend_param(name) for name in fkcrd.CRD_KERNELS]


def op_device_params():
    """The devices whose fastkd::crd_nce_forward op is built here."""
    status = fastkd._dispatch.backend_status("cuda", "cuda")
    reason = f"cuda: {status.reason}" if not status.available else "no CUDA crd_nce_forward op"
    built = status.available and _ops.has_kernel("crd_nce_forward", "CUDA")
    return [pytest.param("cpu", id="cpu"),
            pytest.param("cuda", marks=() if built else (pytest.mark.skip(reason=reason),), id="cuda")]


@pytest.fixture(params=["default_blocks", "split_columns"])
def blocks(request, monkeypatch):
    """Runs a test with the default Triton launch configuration and with one that
    splits each sample's columns over 3 programs of 8-column blocks."""
    if request.param == "split_columns" and importlib.util.find_spec("triton") is not None:
        from fastkd.kernels import crd as triton_crd

        def split(batch, cols, dim):
            return {"BLOCK_K": 8, "BLOCK_D": max(1, 1 << (dim - 1).bit_length()), "SPLITS": 3, "num_warps": 1}

        monkeypatch.setattr(triton_crd, "launch_config", split)
    return request.param


def make_pair(student_dim=11, teacher_dim=6, n_data=23, feat_dim=5, nce_k=7, dtype=torch.float64, seed=0,
              backend="cpu", device="cpu"):
    """(fused module, reference module) with identical parameters and banks."""
    torch.manual_seed(seed)
    fused = fastkd.CRDLoss(student_dim, teacher_dim, n_data, feat_dim, nce_k, backend=backend).to(dtype)
    ref = refcrd.CRDLoss(student_dim, teacher_dim, n_data, feat_dim, nce_k).to(dtype)
    ref.load_state_dict(fused.state_dict())
    return fused.to(device), ref.to(device)


def batch(b, student_dim, teacher_dim, n_data, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    f_s = torch.randn(b, student_dim, generator=g, dtype=torch.float64).to(dtype)
    f_t = torch.randn(b, teacher_dim, generator=g, dtype=torch.float64).to(dtype)
    idx = torch.randperm(n_data, generator=g)[:b]
    return f_s.to(device), f_t.to(device), idx.to(device)


def step(module, f_s, f_t, idx, contrast_idx, upstream=UPSTREAM):
    """Loss and the gradients of (f_s, f_t, every parameter) after backward(upstream)."""
    module.zero_grad(set_to_none=True)
    f_s = f_s.detach().clone().requires_grad_(True)
    f_t = f_t.detach().clone().requires_grad_(True)
    loss = module(f_s, f_t, idx, contrast_idx)
    loss.backward(torch.tensor(upstream, dtype=loss.dtype, device=loss.device))
    grads = {"f_s": f_s.grad, "f_t": f_t.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return loss.detach(), grads


# ---- the reference against the formulas --------------------------------------------


def loop_nce(v, bank, contrast_idx, temperature, z):
    """docs/spec.md §4 for one direction, element by element in float64."""
    b, cols = contrast_idx.shape
    n = bank.shape[0]
    negatives = cols - 1
    out = [[math.exp(float(bank[j] @ v[i]) / temperature) for j in contrast_idx[i]] for i in range(b)]
    if z is None:
        z = sum(sum(row) for row in out) / (b * cols) * n
    c = negatives / n
    total = 0.0
    for i in range(b):
        p0 = out[i][0] / z
        total += math.log(p0 / (p0 + c + 1e-7))
        for j in range(1, cols):
            total += math.log(c / (out[i][j] / z + c + 1e-7))
    return -total / b, z


@pytest.mark.parametrize("backend", ("reference", "cpu"))
@pytest.mark.parametrize("z", (None, 3.5))
def test_crd_nce_matches_the_formula(backend, z):
    g = torch.Generator().manual_seed(1)
    v = torch.nn.functional.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    bank = torch.randn(13, 4, generator=g, dtype=torch.float64) / 2
    contrast_idx = torch.randint(13, (5, 4), generator=g)
    loss, z_used = fastkd.crd_nce(v, bank, contrast_idx, temperature=0.3, z=z, backend=backend)
    want, want_z = loop_nce(v, bank, contrast_idx, 0.3, z)
    assert z_used == pytest.approx(want_z, rel=1e-12)
    assert loss.item() == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("z", (None, 3.5))
def test_crd_nce_float32_kernels_match_the_formula(blocks, backend, z):
    """Z set from the batch (its own gather pass) or given, float32, against the float64 loop."""
    g = torch.Generator().manual_seed(1)
    v = torch.nn.functional.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    bank = torch.randn(13, 4, generator=g, dtype=torch.float64) / 2
    contrast_idx = torch.randint(13, (5, 14), generator=g)
    loss, z_used = fastkd.crd_nce(
        v.float().to(DEVICE), bank.float().to(DEVICE), contrast_idx.to(DEVICE), temperature=0.3, z=z,
        backend=backend,
    )
    want, want_z = loop_nce(v.float().double(), bank.float().double(), contrast_idx, 0.3, z)
    assert loss.dtype == torch.float32
    assert z_used == pytest.approx(want_z, rel=1e-6)
    assert_matches(loss, torch.tensor(want, dtype=torch.float64), torch.float32, f"{backend} loss")


# ---- fused against the reference ---------------------------------------------------

# (B, K, n_data, feat_dim)
SHAPES = ((1, 1, 5, 3), (7, 5, 40, 8), (13, 37, 64, 33), (3, 200, 250, 128))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_module_parity_float64(shape):
    b, k, n_data, feat_dim = shape
    fused, ref = make_pair(n_data=n_data, feat_dim=feat_dim, nce_k=k)
    for call in range(3):  # the first call sets Z; the banks change between calls
        f_s, f_t, idx = batch(b, 11, 6, n_data, torch.float64, seed=10 + call)
        contrast_idx = torch.randint(n_data, (b, k))
        got_loss, got = step(fused, f_s, f_t, idx, contrast_idx)
        want_loss, want = step(ref, f_s, f_t, idx, contrast_idx)
        assert_matches(got_loss, want_loss, torch.float64, f"loss, call {call}")
        assert got.keys() == want.keys()
        for name in got:
            assert_matches(got[name], want[name], torch.float64, f"grad {name}, call {call}")
        # Z: summed in a different order; the banks: the same update of the same embeddings.
        torch.testing.assert_close(fused.z, ref.z, rtol=1e-12, atol=0)
        assert torch.equal(fused.memory_s, ref.memory_s) and torch.equal(fused.memory_t, ref.memory_t)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
def test_module_parity_float32(blocks, backend, shape):
    """float32 modules (fused and reference) against the float64 reference on the same state."""
    b, k, n_data, feat_dim = shape
    fused, ref32 = make_pair(n_data=n_data, feat_dim=feat_dim, nce_k=k, dtype=torch.float32, backend=backend,
                             device=DEVICE)
    ref64 = copy.deepcopy(ref32).double()
    # Z from the float64 reference, so that every module uses the same constant.
    f_s, f_t, idx = batch(b, 11, 6, n_data, torch.float32, seed=3, device=DEVICE)
    contrast_idx = torch.randint(n_data, (b, k)).to(DEVICE)
    ref64.eval()
    ref64(f_s.double(), f_t.double(), idx, contrast_idx)
    fused.z.copy_(ref64.z)
    ref32.z.copy_(ref64.z)
    got_loss, got = step(fused, f_s, f_t, idx, contrast_idx)
    want_loss, want = step(ref64, f_s.double(), f_t.double(), idx, contrast_idx)
    same_loss, same = step(ref32, f_s, f_t, idx, contrast_idx)
    assert got_loss.dtype == torch.float32
    assert_matches(got_loss, want_loss, torch.float32, f"{backend} loss", [same_loss])
    for name in got:
        assert got[name].dtype == torch.float32
        assert_matches(got[name], want[name], torch.float32, f"{backend} grad {name}", [same[name]])
    # the same embeddings reach the banks: the update is shared with the reference
    assert torch.equal(fused.memory_s, ref32.memory_s) and torch.equal(fused.memory_t, ref32.memory_t)


@pytest.mark.parametrize("backend", kernel_params())
def test_float32_at_repdistillers_k(backend):
    """K = 16384 negatives (RepDistiller's nce_k), float32: the log1p form of the
    NCE terms and the float64 loss accumulation keep the loss within 1e-7 of
    the float64 reference (measured: 5e-9 on cpu and triton), where the plain
    log(P + c') − log c of the reference in float32 is off by 6e-7 here."""
    g = torch.Generator().manual_seed(7)
    v = torch.nn.functional.normalize(torch.randn(2, 16, generator=g, dtype=torch.float64), dim=1)
    bank = torch.nn.functional.normalize(torch.randn(20000, 16, generator=g, dtype=torch.float64), dim=1)
    contrast_idx = torch.randint(20000, (2, 16385), generator=g)
    v32, bank32 = v.float().to(DEVICE), bank.float().to(DEVICE)
    vv = v32.clone().requires_grad_(True)
    loss, _ = fastkd.crd_nce(vv, bank32, contrast_idx.to(DEVICE), z=3000.0, backend=backend)
    loss.backward(torch.tensor(UPSTREAM, device=DEVICE))
    v64 = v32.double().cpu().requires_grad_(True)
    want, _ = refcrd.crd_nce(v64, bank32.double().cpu(), contrast_idx, z=3000.0)
    want.backward(torch.tensor(UPSTREAM, dtype=torch.float64))
    v_same = v32.cpu().requires_grad_(True)
    same, _ = refcrd.crd_nce(v_same, bank32.cpu(), contrast_idx, z=3000.0)
    same.backward(torch.tensor(UPSTREAM))
    # the loss within tolerance outright; the gradient sums 16385 rows whose
    # weights have both signs: accumulated in float64 on cpu (in order, one
    # float32 sum took it to 1e-5), in float32 tiles on triton, it stays at the
    # error of the float32 reference (measured: 9e-8 on cpu, 8e-8 on triton
    # and for the reference)
    assert_matches(loss, want, torch.float32, f"{backend} loss at K = 16384")
    assert relative_error(loss, want) < 1e-7
    assert_matches(vv.grad, v64.grad, torch.float32, f"{backend} grad at K = 16384", [v_same.grad])
    assert relative_error(vv.grad, v64.grad) < 1e-6


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("z", (None, 40.0))
def test_cpu_result_does_not_depend_on_the_thread_count(z, dtype):
    """Loss, Z and gradient bit for bit the same with 1, 2 and 4 threads."""
    g = torch.Generator().manual_seed(16)
    v = torch.nn.functional.normalize(torch.randn(37, 24, generator=g, dtype=torch.float64), dim=1)
    bank = torch.nn.functional.normalize(torch.randn(900, 24, generator=g, dtype=torch.float64), dim=1)
    v, bank = v.to(dtype), bank.to(dtype)
    contrast_idx = torch.randint(900, (37, 513), generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 4):
            torch.set_num_threads(count)
            vv = v.clone().requires_grad_(True)
            loss, z_used = fastkd.crd_nce(vv, bank, contrast_idx, z=z, backend="cpu")
            loss.backward(torch.tensor(UPSTREAM, dtype=loss.dtype))
            results.append((loss.detach(), z_used, vv.grad))
    finally:
        torch.set_num_threads(threads)
    for count, (loss, z_used, grad) in zip((2, 4), results[1:], strict=True):
        assert torch.equal(loss, results[0][0]) and z_used == results[0][1], f"loss, Z with {count} threads"
        assert torch.equal(grad, results[0][2]), f"gradient with {count} threads"


@pytest.mark.parametrize("backend", kernel_params())
def test_second_backward_through_a_retained_graph(backend):
    """backward(retain_graph=True) then backward again: twice the gradient (the
    saved gradient is never scaled in place), with a unit upstream gradient too."""
    g = torch.Generator().manual_seed(17)
    v = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1).to(DEVICE)
    bank = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=1).to(DEVICE)
    contrast_idx = torch.randint(30, (5, 9), generator=g).to(DEVICE)
    for upstream in (UPSTREAM, 1.0):
        grad_output = torch.tensor(upstream, device=DEVICE)
        once = v.clone().requires_grad_(True)
        fastkd.crd_nce(once, bank, contrast_idx, z=2.0, backend=backend)[0].backward(grad_output)
        twice = v.clone().requires_grad_(True)
        loss, _ = fastkd.crd_nce(twice, bank, contrast_idx, z=2.0, backend=backend)
        loss.backward(grad_output, retain_graph=True)
        loss.backward(grad_output)
        assert torch.equal(twice.grad, 2 * once.grad)


def test_cpu_gradcheck_float64():
    """gradcheck (which also runs each backward twice) on one direction and on a
    multiple of it (a non-unit upstream gradient); Z given, so that it is a constant."""
    g = torch.Generator().manual_seed(18)
    v = torch.nn.functional.normalize(torch.randn(4, 5, generator=g, dtype=torch.float64), dim=1)
    bank = torch.randn(20, 5, generator=g, dtype=torch.float64) / 2
    contrast_idx = torch.randint(20, (4, 6), generator=g)
    v.requires_grad_(True)

    def loss(a):
        return fastkd.crd_nce(a, bank, contrast_idx, z=2.0, backend="cpu")[0]

    assert torch.autograd.gradcheck(loss, (v,))
    assert torch.autograd.gradcheck(lambda a: UPSTREAM * loss(a), (v,))


@pytest.mark.parametrize("backend", kernel_params())
def test_module_first_call_sets_z(backend):
    """The first call's Z (the kernels' own pass) against the float64 reference's."""
    fused, ref32 = make_pair(n_data=64, feat_dim=33, nce_k=37, dtype=torch.float32, backend=backend,
                             device=DEVICE)
    ref64 = copy.deepcopy(ref32).double()
    f_s, f_t, idx = batch(13, 11, 6, 64, torch.float32, seed=4, device=DEVICE)
    contrast_idx = torch.randint(64, (13, 37)).to(DEVICE)
    got_loss, _ = step(fused, f_s, f_t, idx, contrast_idx)
    want_loss, _ = step(ref64, f_s.double(), f_t.double(), idx, contrast_idx)
    torch.testing.assert_close(fused.z.double(), ref64.z, rtol=1e-5, atol=0)  # docs/spec.md §6 float32
    assert_matches(got_loss, want_loss, torch.float32, f"{backend} first-call loss")


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("layout", ("row_stride", "column_stride"))
def test_functional_parity_low_precision_v_and_non_contiguous(blocks, backend, dtype, layout):
    g = torch.Generator().manual_seed(2)
    v64 = torch.nn.functional.normalize(torch.randn(9, 16, generator=g, dtype=torch.float64), dim=1)
    bank64 = torch.nn.functional.normalize(torch.randn(50, 32, generator=g, dtype=torch.float64), dim=1)
    # rows 32 apart with unit stride along feat_dim (used in place), or stride 2 along it (copied)
    bank64 = (bank64[:, :16] if layout == "row_stride" else bank64[:, ::2]).to(DEVICE)
    assert not bank64.is_contiguous()
    contrast_idx = torch.randint(50, (9, 2 * 11), generator=g)[:, ::2].to(DEVICE)  # non-contiguous, K = 10
    v = v64.to(device=DEVICE, dtype=dtype)

    def run(fn, vv, bank):
        vv = vv.detach().clone().requires_grad_(True)
        loss, z = fn(vv, bank)
        loss.backward(torch.tensor(UPSTREAM, dtype=loss.dtype, device=loss.device))
        return loss.detach(), vv.grad, z

    got = run(lambda a, bk: fastkd.crd_nce(a, bk, contrast_idx, z=4.0, backend=backend), v, bank64.float())
    want = run(lambda a, bk: refcrd.crd_nce(a, bk, contrast_idx, z=4.0), v.double(), bank64)
    same = run(lambda a, bk: refcrd.crd_nce(a, bk, contrast_idx, z=4.0), v, bank64.float())
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    assert_matches(got[0], want[0], dtype, f"{backend} loss", [same[0]])
    assert_matches(got[1], want[1], dtype, f"{backend} grad v", [same[1]])


@pytest.mark.parametrize("backend", kernel_params())
def test_fused_saves_only_the_gradient_rows(backend):
    fused, _ = make_pair(dtype=torch.float32, n_data=64, nce_k=40, backend=backend, device=DEVICE)
    f_s, f_t, idx = batch(6, 11, 6, 64, torch.float32, 0, device=DEVICE)
    contrast_idx = torch.randint(64, (6, 41)).to(DEVICE)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        v = fused.embed_s(f_s)
        n_before = len(saved)
        loss, _ = fastkd.crd_nce(v, fused.memory_t, contrast_idx, z=2.0, backend=backend)
    assert [tuple(t.shape) for t in saved[n_before:]] == [(6, 5)]  # grad of v, (B, feat_dim)
    loss.backward()


def test_auto_uses_the_first_kernel():
    g = torch.Generator().manual_seed(4)
    v, bank = torch.randn(3, 4, generator=g).to(DEVICE), torch.randn(9, 4, generator=g).to(DEVICE)
    contrast_idx = torch.randint(9, (3, 5), generator=g).to(DEVICE)
    first = "cpu" if DEVICE.type == "cpu" else "triton"
    auto = fastkd.crd_nce(v, bank, contrast_idx)
    kernel = fastkd.crd_nce(v, bank, contrast_idx, backend=first)
    assert torch.equal(auto[0], kernel[0]) and auto[1] == kernel[1]


@pytest.mark.parametrize("backend", kernel_params())
def test_nan_propagates(backend):
    v, bank = torch.randn(3, 4, device=DEVICE), torch.randn(9, 4, device=DEVICE)
    v[1, 2] = float("nan")
    loss, _ = fastkd.crd_nce(v, bank, torch.randint(9, (3, 5)).to(DEVICE), z=1.0, backend=backend)
    assert torch.isnan(loss)


@pytest.mark.parametrize("backend", kernel_params())
def test_deterministic(blocks, backend):
    """Two runs give bit-identical losses and gradients (partials summed in a fixed order)."""
    g = torch.Generator().manual_seed(6)
    v = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1).to(DEVICE)
    bank = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=1).to(DEVICE)
    contrast_idx = torch.randint(30, (4, 25), generator=g).to(DEVICE)
    runs = []
    for _ in range(2):  # Z from the batch, then the loss and gradient
        vv = v.clone().requires_grad_(True)
        loss, z = fastkd.crd_nce(vv, bank, contrast_idx, backend=backend)
        loss.backward()
        runs.append((loss.detach(), vv.grad, z))
    assert torch.isfinite(runs[0][0])
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][2] == runs[1][2]


# ---- banks and Z ------------------------------------------------------------------


@pytest.mark.parametrize("cls", (fastkd.CRDLoss, refcrd.CRDLoss), ids=("fused", "reference"))
def test_bank_update_rule_and_z_fixed_after_first_batch(cls):
    torch.manual_seed(5)
    module = cls(4, 3, 10, feat_dim=3, nce_k=4, nce_m=0.3).double()
    assert module.z.tolist() == [-1.0, -1.0]
    f_s, f_t, idx = batch(3, 4, 3, 10, torch.float64, 6)
    contrast_idx = torch.randint(10, (3, 5))
    old_s, old_t = module.memory_s.clone(), module.memory_t.clone()
    v_s, v_t = module.embed_s(f_s).detach(), module.embed_t(f_t).detach()
    module(f_s, f_t, idx, contrast_idx)

    # Z_s: the student embedding against the teacher bank; Z_t the other way round.
    for z, v, bank in ((module.z[0], v_s, old_t), (module.z[1], v_t, old_s)):
        scores = [math.exp(float(bank[j] @ v[i]) / 0.07) for i in range(3) for j in contrast_idx[i].tolist()]
        assert z.item() == pytest.approx(sum(scores) / len(scores) * 10, rel=1e-12)
    # new = normalize(m · old + (1 − m) · v), by hand; other rows untouched
    for new_bank, old_bank, v in ((module.memory_s, old_s, v_s), (module.memory_t, old_t, v_t)):
        for row in range(10):
            if row in idx.tolist():
                i = idx.tolist().index(row)
                mixed = [0.3 * float(old_bank[row, d]) + 0.7 * float(v[i, d]) for d in range(3)]
                norm = math.sqrt(sum(x * x for x in mixed))
                assert new_bank[row].tolist() == pytest.approx([x / norm for x in mixed], rel=1e-12)
            else:
                assert torch.equal(new_bank[row], old_bank[row])

    z_after_first = module.z.clone()
    f_s2, f_t2, idx2 = batch(3, 4, 3, 10, torch.float64, 7)
    module(f_s2 * 3, f_t2, idx2, torch.randint(10, (3, 5)))
    assert torch.equal(module.z, z_after_first)


@pytest.mark.parametrize("cls", (fastkd.CRDLoss, refcrd.CRDLoss), ids=("fused", "reference"))
def test_eval_mode_leaves_the_banks(cls):
    torch.manual_seed(8)
    module = cls(4, 3, 10, feat_dim=3, nce_k=4).eval()
    banks = (module.memory_s.clone(), module.memory_t.clone())
    f_s, f_t, idx = batch(3, 4, 3, 10, torch.float32, 9)
    module(f_s, f_t, idx)
    assert torch.equal(module.memory_s, banks[0]) and torch.equal(module.memory_t, banks[1])
    assert (module.z > 0).all()


@pytest.mark.parametrize("target", (fastkd.CRDLoss, refcrd.CRDLoss), ids=("to_fused", "to_reference"))
def test_state_dict_round_trip_reproduces_the_next_loss(target):
    torch.manual_seed(10)
    module = fastkd.CRDLoss(8, 5, 30, feat_dim=6, nce_k=9)
    for seed in (11, 12):
        f_s, f_t, idx = batch(4, 8, 5, 30, torch.float32, seed)
        module(f_s, f_t, idx, generator=torch.Generator().manual_seed(seed)).backward()
    state = copy.deepcopy(module.state_dict())
    assert set(state) >= {"memory_s", "memory_t", "z"}
    torch.manual_seed(99)
    restored = target(8, 5, 30, feat_dim=6, nce_k=9)
    assert not torch.equal(restored.memory_s, module.memory_s)
    restored.load_state_dict(state)
    f_s, f_t, idx = batch(4, 8, 5, 30, torch.float32, 13)
    contrast_idx = torch.randint(30, (4, 10))
    want = module(f_s, f_t, idx, contrast_idx)
    got = restored(f_s, f_t, idx, contrast_idx)
    if target is fastkd.CRDLoss:
        assert torch.equal(got, want)
        assert torch.equal(restored.memory_s, module.memory_s)
        assert torch.equal(restored.memory_t, module.memory_t)
    else:
        assert_matches(got, want.double(), torch.float32, "reference after load")


# ---- negatives ---------------------------------------------------------------------


def test_generator_reproducibility_and_sampled_indices():
    fused, _ = make_pair(dtype=torch.float32, n_data=40, nce_k=6)
    f_s, f_t, idx = batch(5, 11, 6, 40, torch.float32, 14)
    fused.eval()
    first = fused(f_s, f_t, idx, generator=torch.Generator().manual_seed(3))
    again = fused(f_s, f_t, idx, generator=torch.Generator().manual_seed(3))
    other = fused(f_s, f_t, idx, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # what is drawn: the positive idx in column 0, then K uniform indices from the generator
    _, drawn = fused.contrast_indices(idx, None, torch.Generator().manual_seed(3), f_s)
    expected = torch.randint(40, (5, 7), generator=torch.Generator().manual_seed(3))
    expected[:, 0] = idx
    assert torch.equal(drawn, expected)
    assert torch.equal(first, fused(f_s, f_t, idx, expected))


def test_negatives_only_contrast_idx_takes_idx_as_positive():
    fused, _ = make_pair(dtype=torch.float32, n_data=40, nce_k=6)
    fused.eval()
    f_s, f_t, idx = batch(5, 11, 6, 40, torch.float32, 15)
    negatives = torch.randint(40, (5, 6))
    full = torch.cat([idx[:, None], negatives], dim=1)
    assert torch.equal(fused(f_s, f_t, idx, negatives), fused(f_s, f_t, idx, full))


def test_feature_maps_are_flattened():
    fused = fastkd.CRDLoss(2 * 3 * 3, 4, 20, feat_dim=5, nce_k=3).eval()
    f_s = torch.randn(4, 2, 3, 3)
    f_t = torch.randn(4, 4)
    idx = torch.arange(4)
    negatives = torch.randint(20, (4, 3))
    assert torch.equal(fused(f_s, f_t, idx, negatives), fused(f_s.flatten(1), f_t, idx, negatives))


# ---- the op --------------------------------------------------------------------------


@pytest.mark.parametrize("device", op_device_params())
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("student_grad", (True, False))
@pytest.mark.parametrize("z", (-1.0, 2.5))
def test_opcheck(device, dtype, student_grad, z):
    v = torch.randn(5, 7, dtype=dtype, device=device)
    bank = torch.randn(12, 7, dtype=dtype, device=device)
    contrast_idx = torch.randint(12, (5, 4), device=device)
    args = (v, bank, contrast_idx, torch.tensor(z, dtype=dtype, device=device), 1 / 0.07, student_grad)
    torch.library.opcheck(torch.ops.fastkd.crd_nce_forward.default, args)
    row_loss, grad, z_used = torch.ops.fastkd.crd_nce_forward(*args)
    assert row_loss.shape == (5,) and row_loss.dtype == dtype
    assert grad.shape == ((5, 7) if student_grad else (0, 0))
    assert z_used.shape == () and z_used.dtype == dtype and (z < 0 or z_used.item() == z)
    assert z < 0 or z_used.item() > 0


OP_CHECK_CASES = [
    ({"contrast_idx": torch.full((5, 4), 12)}, "contrast_idx must lie in"),
    ({"contrast_idx": torch.full((5, 4), -1)}, "contrast_idx must lie in"),
    ({"contrast_idx": torch.zeros(4, 4, dtype=torch.long)}, "one row per row of v"),
    ({"contrast_idx": torch.zeros(5, 4, dtype=torch.int32)}, "int64"),
    ({"bank": torch.randn(12, 6)}, "same feature dim"),
    ({"bank": torch.randn(12, 7, dtype=torch.float64)}, "same dtype"),
    (
        {"v": torch.randn(5, 7, dtype=torch.bfloat16), "bank": torch.randn(12, 7, dtype=torch.bfloat16)},
        "float32 or float64",
    ),
    ({"v": torch.randn(5)}, "v must be 2-D"),
    ({"bank": torch.randn(7, 12).t()}, "unit stride"),
    ({"inv_temperature": 0.0}, "inv_temperature"),
    ({"z": torch.tensor(float("inf"))}, "z must be finite"),
    ({"z": torch.ones(1)}, "z must be a 0-dim"),
    ({"z": torch.tensor(1)}, "z must be a 0-dim floating-point"),
]


def crd_op_args(device):
    return {
        "v": torch.randn(5, 7, device=device),
        "bank": torch.randn(12, 7, device=device),
        "contrast_idx": torch.randint(12, (5, 4), device=device),
        "z": torch.tensor(1.0, device=device),
        "inv_temperature": 2.0,
        "student_grad": True,
    }


@pytest.mark.parametrize("device", op_device_params())
@pytest.mark.parametrize("change,needle", OP_CHECK_CASES)
def test_op_checks(device, change, needle):
    args = crd_op_args(device)
    args.update({name: v.to(device) if isinstance(v, torch.Tensor) else v for name, v in change.items()})
    if device == "cuda" and needle == "contrast_idx must lie in":
        # on a GPU the kernels check the range (no device → host sync): NaN samples
        row_loss, grad, _ = torch.ops.fastkd.crd_nce_forward(*args.values())
        assert torch.isnan(row_loss).all() and torch.isnan(grad).all()
        return
    if device == "cuda" and needle == "z must be finite":
        # on a GPU Z's value is not read on the host: an infinite Z gives P = 0
        row_loss, _, _ = torch.ops.fastkd.crd_nce_forward(*args.values())
        assert torch.isinf(row_loss).all()
        return
    with pytest.raises(RuntimeError, match=needle):
        torch.ops.fastkd.crd_nce_forward(*args.values())


@pytest.mark.parametrize(
    "change,needle",
    [case for case in OP_CHECK_CASES if case[1] not in ("unit stride", "same dtype", "float32 or float64")]
    + [
        (
            {"v": torch.randn(5, 7, dtype=torch.bfloat16), "bank": torch.randn(12, 7, dtype=torch.bfloat16)},
            "must be float32 for triton",
        ),
        ({"v": torch.randn(5, 7, dtype=torch.float64), "bank": torch.randn(12, 7, dtype=torch.float64)},
         "must be float32 for triton"),
        ({"contrast_idx": [[0] * 4] * 5}, "contrast_idx must be a torch.Tensor"),
        ({"contrast_idx": torch.zeros(5, 0, dtype=torch.long)}, "at least one column"),
        ({"student_grad": 1}, "student_grad must be a bool"),
        ({"z": 1.0}, "z must be a 0-dim floating-point tensor"),
    ],
)
def test_triton_launcher_checks(change, needle, monkeypatch):
    """The Triton launcher raises ValueError naming the argument before any gather
    (the index range: on a GPU when FASTKD_CHECK_DEVICE_VALUES=1 asks for it)."""
    monkeypatch.setenv("FASTKD_CHECK_DEVICE_VALUES", "1")
    triton_crd = pytest.importorskip("fastkd.kernels.crd")
    device = triton_crd.DEVICE_TYPE
    args = crd_op_args(device)
    args.update({name: v.to(device) if isinstance(v, torch.Tensor) else v for name, v in change.items()})
    with pytest.raises(ValueError, match=needle):
        triton_crd.crd_nce_forward(*args.values())


def test_triton_feat_dim_limit(monkeypatch):
    """An explicit triton backend refuses a feat_dim beyond its kernel; "auto" moves on."""
    triton_crd = pytest.importorskip("fastkd.kernels.crd")
    monkeypatch.setattr(triton_crd, "MAX_FEAT_DIM", 3)
    v, bank, contrast_idx = torch.randn(3, 4), torch.randn(9, 4), torch.randint(9, (3, 5))
    if triton_crd.DEVICE_TYPE == "cpu":
        with pytest.raises(ValueError, match="feat_dim <= 3"):
            fastkd.crd_nce(v, bank, contrast_idx, z=2.0, backend="triton")
    monkeypatch.setattr(fkcrd, "backend_for", lambda *args: "triton")
    cuda = "cuda" in fkcrd.CRD_KERNELS and fastkd._dispatch.backend_status("cuda", DEVICE.type).available
    assert fkcrd._crd_backend("auto", v.to(DEVICE), bank.to(DEVICE)) == ("cuda" if cuda else "reference")


# ---- validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"idx": torch.tensor([0, 1, 30])}, "idx must lie in"),
        ({"idx": torch.tensor([0, 1, -1])}, "idx must lie in"),
        ({"idx": torch.tensor([0, 1, 1])}, "idx must hold distinct"),
        ({"idx": torch.tensor([0.0, 1.0, 2.0])}, "idx must be an integer"),
        ({"idx": torch.tensor([0, 1])}, r"idx must have shape \(3,\)"),
        ({"f_s": torch.randn(3, 7)}, "f_s must have shape"),
        ({"f_t": torch.randn(2, 5)}, "f_t batch size"),
        ({"f_t": torch.randn(3, 4)}, "f_t must have shape"),
        ({"f_s": torch.randn(3, 8).long()}, "f_s must have dtype"),
        ({"contrast_idx": torch.randint(30, (3, 5))}, r"contrast_idx must have shape \(3, 10\)"),
        ({"contrast_idx": torch.full((3, 10), 30)}, "contrast_idx must lie in"),
        ({"contrast_idx": torch.zeros(3, 9, dtype=torch.long) - 1}, "contrast_idx must lie in"),
        ({"contrast_idx": [[0] * 10] * 3}, "contrast_idx must be a torch.Tensor"),
        ({"generator": 3}, "generator must be a torch.Generator"),
    ],
)
@pytest.mark.parametrize("cls", (fastkd.CRDLoss, refcrd.CRDLoss), ids=("fused", "reference"))
def test_module_bad_arguments_raise_value_error(cls, kwargs, needle):
    module = cls(8, 5, 30, feat_dim=6, nce_k=9)
    args = {
        "f_s": torch.randn(3, 8),
        "f_t": torch.randn(3, 5),
        "idx": torch.tensor([0, 4, 29]),
        "contrast_idx": None,
        "generator": None,
    }
    args.update(kwargs)
    banks = (module.memory_s.clone(), module.memory_t.clone())
    with pytest.raises(ValueError, match=needle):
        module(**args)
    assert torch.equal(module.memory_s, banks[0]) and torch.equal(module.memory_t, banks[1])
    assert module.z.tolist() == [-1.0, -1.0]


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"student_dim": 0}, "student_dim"),
        ({"n_data": 2.5}, "n_data"),
        ({"nce_k": 0}, "nce_k"),
        ({"nce_t": 0.0}, "nce_t"),
        ({"nce_m": 1.5}, "nce_m"),
    ],
)
def test_constructor_bad_arguments(kwargs, needle):
    args = {"student_dim": 8, "teacher_dim": 5, "n_data": 30, **kwargs}
    with pytest.raises(ValueError, match=needle):
        fastkd.CRDLoss(**args)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"v": torch.randn(3, 5)}, r"v must have shape \(B, feat_dim\)"),
        ({"bank": torch.randn(9, 4).long()}, "bank must have dtype"),
        ({"bank": torch.randn(9, 4).half()}, "bank must have dtype"),
        ({"contrast_idx": torch.randint(9, (2, 5))}, r"contrast_idx must have shape \(3, 5\)"),
        ({"contrast_idx": torch.randint(9, (3,))}, r"contrast_idx must be a \(B, K\+1\)"),
        ({"contrast_idx": torch.full((3, 5), 9)}, "contrast_idx must lie in"),
        ({"temperature": 0.0}, "temperature"),
        ({"z": -2.0}, "z must be"),
        ({"backend": "fast"}, "backend"),
    ],
)
def test_functional_bad_arguments_raise_value_error(kwargs, needle):
    args = {
        "v": torch.randn(3, 4),
        "bank": torch.randn(9, 4),
        "contrast_idx": torch.randint(9, (3, 5)),
        "backend": "cpu",
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle):
        fastkd.crd_nce(args.pop("v"), args.pop("bank"), args.pop("contrast_idx"), **args)


def test_explicit_gpu_backends_raise():
    v, bank, contrast_idx = torch.randn(3, 4), torch.randn(9, 4), torch.randint(9, (3, 5))
    with pytest.raises(ValueError, match="backend='cuda'"):
        fastkd.crd_nce(v, bank, contrast_idx, backend="cuda")


def test_explicit_backend_without_crd_kernel_raises(monkeypatch):
    monkeypatch.setattr(fkcrd, "CRD_KERNELS", ("cpu",))
    monkeypatch.setattr(fkcrd._dispatch, "resolve", lambda backend, tensor: "triton")
    v, bank, contrast_idx = torch.randn(3, 4), torch.randn(9, 4), torch.randint(9, (3, 5))
    with pytest.raises(ValueError, match="backend='triton' has no crd kernel yet"):
        fastkd.crd_nce(v, bank, contrast_idx, backend="triton")
    # backend="auto" falls back to the reference instead
    got = fastkd.crd_nce(v, bank, contrast_idx, z=2.0)
    want = refcrd.crd_nce(v, bank, contrast_idx, z=2.0)
    assert torch.equal(got[0], want[0])


# ---- the GPU policy: indices checked in the kernels, no host reads (docs/spec.md §6) ----


def gpu_kernel_params():
    """The CRD kernel backends of a GPU (triton, cuda) that run on DEVICE."""
    return [param for param in kernel_params() if param.values[0] != "cpu"]


def bad_index_inputs(seed=60):
    """(v (6, 5), bank (11, 5), contrast_idx (6, 8), contrast_idx with samples 1 and 4
    pointing outside the bank) float32 on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    v = torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=1).to(DEVICE)
    bank = torch.nn.functional.normalize(torch.randn(11, 5, generator=g), dim=1).to(DEVICE)
    contrast_idx = torch.randint(11, (6, 8), generator=g).to(DEVICE)
    bad = contrast_idx.clone()
    bad[1, 3] = 11
    bad[4, 0] = -1
    return v, bank, contrast_idx, bad


@pytest.mark.parametrize("backend", gpu_kernel_params())
def test_out_of_range_indices_give_nan_samples_without_the_host_check(blocks, backend, monkeypatch):
    """A sample with an index outside [0, n_data) gets a NaN loss and gradient; the
    others are exact (Z given); nothing is read outside the bank."""
    values_checked_in_kernels(monkeypatch)
    v, bank, contrast_idx, bad = bad_index_inputs()
    v_bad = v.clone().requires_grad_(True)
    loss, _ = fastkd.crd_nce(v_bad, bank, bad, temperature=0.2, z=3.0, backend=backend)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.isnan(v_bad.grad[[1, 4]]).all()
    good = [0, 2, 3, 5]
    v_ref = v[good].double().requires_grad_(True)
    want, _ = refcrd.crd_nce(v_ref, bank.double(), contrast_idx[good], temperature=0.2, z=3.0)
    # the mean over 6 samples: each good sample's gradient is 4/6 of the 4-sample mean's
    (want * len(good) / 6).backward()
    assert_matches(v_bad.grad[good], v_ref.grad, torch.float32, f"{backend} good samples' gradient")


def test_out_of_range_indices_rows_and_z_of_the_triton_launcher(blocks, monkeypatch):
    """The launcher's row losses: NaN for the bad samples only with Z given; with Z
    set from the batch, Z (and so every row) is NaN."""
    triton_crd = pytest.importorskip("fastkd.kernels.crd")
    if triton_crd.DEVICE_TYPE != DEVICE.type:
        pytest.skip(f"triton runs on {triton_crd.DEVICE_TYPE} tensors")
    values_checked_in_kernels(monkeypatch)
    v, bank, contrast_idx, bad = bad_index_inputs(61)
    z = torch.tensor(3.0, device=DEVICE)
    rows, grad, _ = triton_crd.crd_nce_forward(v, bank, bad, z, 5.0, True)
    want_rows, want_grad, _ = triton_crd.crd_nce_forward(v, bank, contrast_idx, z, 5.0, True)
    good = [0, 2, 3, 5]
    assert torch.isnan(rows[[1, 4]]).all() and torch.isnan(grad[[1, 4]]).all()
    assert torch.equal(rows[good], want_rows[good]) and torch.equal(grad[good], want_grad[good])
    rows, grad, z_used = triton_crd.crd_nce_forward(v, bank, bad, -z, 5.0, True)
    assert torch.isnan(z_used) and torch.isnan(rows).all()


def test_reference_backend_checks_indices_without_the_host_check(monkeypatch):
    """The reference gathers with the indices, unguarded: it refuses bad ones on every device."""
    values_checked_in_kernels(monkeypatch)
    v, bank, _, bad = bad_index_inputs(62)
    with pytest.raises(ValueError, match="contrast_idx must lie in"):
        fastkd.crd_nce(v, bank, bad, z=3.0, backend="reference")
    module = refcrd.CRDLoss(4, 3, 11, feat_dim=5, nce_k=7).to(DEVICE)
    f_s, f_t, idx = batch(6, 4, 3, 11, torch.float32, 63, DEVICE)
    with pytest.raises(ValueError, match="contrast_idx must lie in"):
        module(f_s, f_t, idx, bad)


def test_device_value_checks_on_request(monkeypatch):
    """FASTKD_CHECK_DEVICE_VALUES=1: the index range raises ValueError on every device."""
    monkeypatch.setenv("FASTKD_CHECK_DEVICE_VALUES", "1")
    v, bank, _, bad = bad_index_inputs(64)
    with pytest.raises(ValueError, match="contrast_idx must lie in"):
        fastkd.crd_nce(v, bank, bad, z=3.0)


@pytest.mark.parametrize("backend", gpu_kernel_params())
@pytest.mark.parametrize("z", (3.0, -1.0), ids=("z_given", "z_from_batch"))
def test_no_host_reads(backend, z, monkeypatch):
    """A GPU path never reads a value on the host (a device → host sync): the op
    contract, and crd_nce with Z given as a float, as a tensor, or set from
    the batch (Z comes back as a device tensor). The backward only scales the
    forward's gradient (on CPU tensors it reads the upstream factor on the
    host, which costs nothing there; on CUDA tensors it compares it on the
    device), so it runs outside the check."""
    values_checked_in_kernels(monkeypatch)
    v, bank, contrast_idx, _ = bad_index_inputs(65)
    op = kernel_op(backend, "crd", "crd_nce_forward")
    z_tensor = torch.tensor(z, device=DEVICE)
    with no_host_reads():
        rows, grad, z_used = op(v, bank, contrast_idx, z_tensor, 5.0, True)
    want, want_z = refcrd.crd_nce(v.double(), bank.double(), contrast_idx, temperature=0.2,
                                  z=None if z < 0 else z)
    assert z_used.item() == pytest.approx(want_z.item(), rel=1e-5)
    assert_matches(rows.mean(), want, torch.float32, f"{backend} op")
    for given in (None if z < 0 else z, z_tensor):
        v_grad = v.clone().requires_grad_(True)
        with no_host_reads():
            loss, z_used = fastkd.crd_nce(v_grad, bank, contrast_idx, temperature=0.2, z=given,
                                          backend=backend)
        loss.backward()
        assert_matches(loss.detach(), want, torch.float32, f"{backend} crd_nce")
        assert z_used.item() == pytest.approx(want_z.item(), rel=1e-5)
        assert torch.isfinite(v_grad.grad).all()


@pytest.mark.parametrize("backend", gpu_kernel_params())
def test_module_no_host_reads(backend, monkeypatch):
    """CRDLoss on a GPU path: the forward of a training step (Z set from the
    first batch, kept by the second, the banks updated) with every host read
    refused (the backward as in test_no_host_reads); the same losses, Z and
    banks as the reference module."""
    values_checked_in_kernels(monkeypatch)
    fused, ref = make_pair(n_data=40, feat_dim=8, nce_k=5, dtype=torch.float32, backend=backend,
                           device=DEVICE)
    for call in range(2):
        f_s, f_t, idx = batch(7, 11, 6, 40, torch.float32, seed=80 + call, device=DEVICE)
        contrast_idx = torch.randint(40, (7, 5)).to(DEVICE)
        with no_host_reads():
            loss = fused(f_s, f_t, idx, contrast_idx)
        loss.backward()
        want = ref(f_s, f_t, idx, contrast_idx)
        assert_matches(loss.detach(), want.detach().double(), torch.float32, f"{backend} loss, call {call}")
        torch.testing.assert_close(fused.z, ref.z, rtol=1e-5, atol=0)
        torch.testing.assert_close(fused.memory_s, ref.memory_s, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused.memory_t, ref.memory_t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", gpu_kernel_params())
@pytest.mark.parametrize("bad", ("above", "below", "repeated"))
def test_module_bad_idx_gives_a_nan_loss_and_leaves_the_banks(backend, bad, monkeypatch):
    """idx not checked on the host (the GPU policy): an index outside [0, n_data)
    or a repeated one makes the loss NaN and leaves both banks as they were."""
    values_checked_in_kernels(monkeypatch)
    fused, _ = make_pair(n_data=40, feat_dim=8, nce_k=5, dtype=torch.float32, backend=backend, device=DEVICE)
    f_s, f_t, idx = batch(7, 11, 6, 40, torch.float32, seed=90, device=DEVICE)
    idx = idx.clone()
    idx[3] = {"above": 40, "below": -1, "repeated": int(idx[5])}[bad]
    banks = (fused.memory_s.clone(), fused.memory_t.clone())
    with no_host_reads():
        loss = fused(f_s, f_t, idx, torch.randint(40, (7, 6)).to(DEVICE))
    assert torch.isnan(loss)
    assert torch.equal(fused.memory_s, banks[0]) and torch.equal(fused.memory_t, banks[1])
