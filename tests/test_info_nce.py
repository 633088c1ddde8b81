"""InfoNCE (docs/spec.md §4): the fused kernels (cpu and triton here; triton and cuda
with FASTKD_TEST_DEVICE=cuda) against the float64 reference, in both modes
(keeping the softmax and recomputing it), the ops themselves (opcheck, C++ and
launcher checks) and the argument validation."""

from __future__ import annotations

import importlib
import importlib.util
import math

import pytest
import torch

import fastkd
from fastkd import _dispatch, _ops, reference
from tests.helpers import DEVICE, assert_matches, check_parity_with_grads, run_with_grads

# the module (fastkd.info_nce, the attribute, is the function)
fkinfo = importlib.import_module("fastkd.info_nce")

pytestmark = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR))

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SMALL_TILE = 4  # rows per tile of the cpu / cuda ops when the multi-tile path is forced
# Triton blocks when the multi-block path is forced (tl.dot needs >= 16).
SMALL_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 128, "BLOCK_DV": 128, "num_warps": 1}


def kernel_params():
    """The backends with an InfoNCE kernel on DEVICE, skipped with the reason when unavailable."""
    params = []
    for name in fkinfo.INFO_NCE_KERNELS:
        status = fastkd._dispatch.backend_status(name, DEVICE.type)
        marks = () if status.available else (pytest.mark.skip(reason=f"{name}: {status.reason}"),)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def op_device_params():
    """The devices whose fastkd::info_nce_* ops are built here."""
    params = [pytest.param("cpu", id="cpu")]
    status = fastkd._dispatch.backend_status("cuda", "cuda")
    marks = () if status.available and _ops.has_kernel("info_nce_forward", "CUDA") else (
        pytest.mark.skip(reason=f"cuda: {status.reason}" if not status.available else "no CUDA info_nce op"),
    )
    params.append(pytest.param("cuda", marks=marks, id="cuda"))
    return params


# logits_memory_budget that forces each mode
KEEP_EVERYTHING = 2**62
RECOMPUTE = 0


@pytest.fixture(params=["keep", "recompute", "recompute_small_tile"])
def budget(request, monkeypatch):
    """``logits_memory_budget`` of a test: keep the softmax, or recompute with the
    default tiles and with small ones (several tiles / blocks per dim). The
    triton kernels always recompute, so their keep case is skipped (it repeats
    the recompute one)."""
    if request.param == "keep":
        if "triton" in request.node.callspec.params.values():
            pytest.skip("triton always recomputes")
        return KEEP_EVERYTHING
    if request.param == "recompute_small_tile":
        monkeypatch.setattr(fkinfo, "_info_nce_tile_rows", lambda m: SMALL_TILE)
        if importlib.util.find_spec("triton") is not None:
            from fastkd.kernels import info_nce as triton_info_nce

            def small_blocks(rows, keys, dim):
                return dict(SMALL_BLOCKS)

            monkeypatch.setattr(triton_info_nce, "launch_config", small_blocks)
    return RECOMPUTE


def embeddings(rows, dim, dtype, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def check_parity(backend, q, k, budget=KEEP_EVERYTHING, **kwargs):
    check_parity_with_grads(
        lambda a, b: fastkd.info_nce(a, b, backend=backend, logits_memory_budget=budget, **kwargs),
        lambda a, b: reference.info_nce(a, b, **kwargs),
        [q, k], f"{backend} info_nce (budget {budget})", ("loss", "q grad", "k grad"),
    )


# (N, M, D, with labels); M = 37, 53 leave a tail after the SIMD vectors
SHAPES = ((1, 1, 5, False), (37, 37, 130, False), (17, 53, 5, True), (17, 53, 130, False))


# (dtype, τ): both temperatures in float32, one per reduced precision (the
# interpreter's time goes into each of these combinations)
DTYPE_TEMPERATURES = (
    (torch.float32, 0.07), (torch.float32, 1.0), (torch.bfloat16, 0.07), (torch.float16, 1.0),
)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("dtype,temperature", DTYPE_TEMPERATURES, ids=lambda x: str(x))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:3])) + ("_labels" * s[3]))
def test_parity(budget, backend, dtype, shape, temperature):
    n, m, d, with_labels = shape
    q = embeddings(n, d, dtype, 0)
    k = embeddings(m, d, dtype, 1)
    # unnormalised inputs at τ = 0.07 give huge logits; keep them O(1/τ)
    q, k = q / d**0.5, k / d**0.5
    labels = None
    if with_labels:
        labels = torch.randint(0, m, (n,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    check_parity(backend, q, k, budget, temperature=temperature, labels=labels)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("symmetric", (False, True))
@pytest.mark.parametrize("normalize", (False, True))
def test_parity_symmetric_normalize(budget, backend, dtype, symmetric, normalize):
    n, d = 23, 33
    q = embeddings(n, d, dtype, 3) * (1.0 if normalize else d**-0.5)
    k = embeddings(n, d, dtype, 4) * (1.0 if normalize else d**-0.5)
    check_parity(backend, q, k, budget, temperature=0.07, symmetric=symmetric, normalize=normalize)


def test_float64_and_non_contiguous(budget):
    q = embeddings(9, 20, torch.float64, 5, "cpu").t().contiguous().t()  # column-major view
    k = embeddings(40, 20, torch.float64, 6, "cpu")[::2]  # row stride 40
    assert not q.is_contiguous() and not k.is_contiguous()
    got = run_with_grads(
        lambda a, b: fastkd.info_nce(a, b, temperature=0.3, backend="cpu", logits_memory_budget=budget), q, k
    )
    want = run_with_grads(lambda a, b: reference.info_nce(a, b, temperature=0.3), q, k)
    assert got[0].dtype == torch.float64
    for a, b in zip(got, want, strict=True):
        assert_matches(a, b, torch.float64, "float64 info_nce")


@pytest.mark.parametrize("backend", kernel_params())
def test_non_contiguous_and_large_logits(budget, backend):
    """Column-major q, row-strided k, |logits| in the hundreds (τ = 0.05, unnormalised)."""
    q = embeddings(19, 20, torch.float32, 5).t().contiguous().t()
    k = embeddings(66, 20, torch.float32, 6)[::2]
    assert not q.is_contiguous() and not k.is_contiguous()
    check_parity(backend, q, k, budget, temperature=0.05)


def test_auto_uses_the_first_kernel_and_the_module_matches():
    q, k = embeddings(6, 8, torch.float32, 7), embeddings(6, 8, torch.float32, 8)
    auto = fastkd.info_nce(q, k, symmetric=True)
    first = "cpu" if DEVICE.type == "cpu" else "triton"
    assert torch.equal(auto, fastkd.info_nce(q, k, symmetric=True, backend=first))
    module = fastkd.InfoNCELoss(symmetric=True)
    assert torch.equal(module(q, k), auto)
    assert "symmetric=True" in repr(module)


def test_reference_backend_through_the_public_function_symmetric():
    """backend="reference" through fastkd.info_nce (not only fastkd.reference directly)."""
    q, k = embeddings(6, 8, torch.float64, 9, "cpu"), embeddings(6, 8, torch.float64, 10, "cpu")
    got = fastkd.info_nce(q, k, symmetric=True, backend="reference")
    torch.testing.assert_close(got, reference.info_nce(q, k, symmetric=True))
    torch.testing.assert_close(got, fastkd.info_nce(q, k, symmetric=True, backend="cpu"))


def saved_for_backward(fn, *inputs):
    """The tensors ``fn(*inputs)`` saves for backward, and the loss."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = fn(*inputs)
    return saved, loss


@pytest.mark.parametrize("backend", kernel_params())
def test_only_row_state_is_saved_for_backward(backend):
    """Recomputing, between forward and backward: q, k (the inputs themselves),
    labels and the row log-sum-exp; nothing of size N × M."""
    n, m, d = 48, 64, 4
    q = embeddings(n, d, torch.float32, 9).requires_grad_(True)
    k = embeddings(m, d, torch.float32, 10).requires_grad_(True)
    saved, loss = saved_for_backward(
        lambda a, b: fastkd.info_nce(a, b, backend=backend, logits_memory_budget=0), q, k
    )
    assert saved and max(t.numel() for t in saved) <= m * d < n * m
    loss.backward()
    assert q.grad is not None and k.grad is not None


def kept_directions(saved, n, m):
    """How many (N, M) / (M, N) probability matrices are among the saved tensors."""
    return sum(1 for t in saved if t.dim() == 2 and tuple(t.shape) in ((n, m), (m, n)))


@pytest.mark.parametrize(
    "dtype,element", ((torch.float32, 4), (torch.bfloat16, 4), (torch.float64, 8)), ids=str
)
def test_the_budget_decides_what_is_kept(dtype, element):
    """A direction keeps its softmax exactly when its N·M·element bytes fit; with
    symmetric=True the second direction keeps only if both fit. The triton
    kernels never keep."""
    n, m, d = 6, 10, 4
    q = embeddings(n, d, dtype, 9, "cpu").requires_grad_(True)
    k = embeddings(m, d, dtype, 10, "cpu").requires_grad_(True)
    one = n * m * element

    def kept(budget, **kwargs):
        saved, _ = saved_for_backward(
            lambda a, b: fastkd.info_nce(a, b, backend="cpu", logits_memory_budget=budget, **kwargs), q, k
        )
        return kept_directions(saved, n, m)

    assert kept(one) == 1 and kept(one - 1) == 0 and kept(0) == 0
    assert kept(fkinfo.DEFAULT_LOGITS_MEMORY_BUDGET) == 1
    qs, ks = q[:6], k[:6]
    square = 6 * 6 * element

    def kept_symmetric(budget):
        saved, _ = saved_for_backward(
            lambda a, b: fastkd.info_nce(a, b, backend="cpu", symmetric=True, logits_memory_budget=budget),
            qs, ks,
        )
        return kept_directions(saved, 6, 6)

    assert kept_symmetric(2 * square) == 2 and kept_symmetric(2 * square - 1) == 1
    assert kept_symmetric(square - 1) == 0


def test_triton_never_keeps():
    pytest.importorskip("fastkd.kernels.info_nce")
    if not fastkd._dispatch.backend_status("triton", DEVICE.type).available:
        pytest.skip("no triton backend here")
    n, m, d = 16, 32, 8
    q = embeddings(n, d, torch.float32, 9).requires_grad_(True)
    k = embeddings(m, d, torch.float32, 10).requires_grad_(True)
    saved, _ = saved_for_backward(
        lambda a, b: fastkd.info_nce(a, b, backend="triton", logits_memory_budget=KEEP_EVERYTHING), q, k
    )
    assert kept_directions(saved, n, m) == 0


def test_kept_probabilities_survive_a_second_backward():
    """The keep backward reads the softmax without changing it: backward twice
    through the same graph (retain_graph) gives the same gradients twice."""
    q = embeddings(9, 12, torch.float32, 15, "cpu").requires_grad_(True)
    k = embeddings(13, 12, torch.float32, 16, "cpu").requires_grad_(True)
    loss = fastkd.info_nce(q, k, backend="cpu", logits_memory_budget=KEEP_EVERYTHING)
    first = torch.autograd.grad(loss, (q, k), retain_graph=True)
    second = torch.autograd.grad(loss, (q, k))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_keep_and_recompute_agree_with_repeated_labels():
    """Several queries sharing a positive key (the scatter-add of the keep
    backward's dk) and a non-unit upstream gradient: both modes match the
    float64 reference and each other to float32 rounding."""
    q = embeddings(40, 16, torch.float32, 17, "cpu") / 4
    k = embeddings(25, 16, torch.float32, 18, "cpu") / 4
    labels = torch.tensor([3, 3, 3, 0, 24] * 8)
    results = {}
    for budget in (KEEP_EVERYTHING, RECOMPUTE):
        check_parity("cpu", q, k, budget, temperature=0.1, labels=labels)
        results[budget] = run_with_grads(
            lambda a, b, budget=budget: fastkd.info_nce(
                a, b, temperature=0.1, labels=labels, logits_memory_budget=budget
            ),
            q, k, upstream=1.7,
        )
    for a, b in zip(results[KEEP_EVERYTHING], results[RECOMPUTE], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("budget", (KEEP_EVERYTHING, RECOMPUTE), ids=("keep", "recompute"))
def test_compiles_with_fullgraph(budget):
    q = embeddings(12, 8, torch.float32, 19, "cpu").requires_grad_(True)
    k = embeddings(12, 8, torch.float32, 20, "cpu").requires_grad_(True)

    def loss(a, b):
        return fastkd.info_nce(a, b, symmetric=True, backend="cpu", logits_memory_budget=budget)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(q, k)
    got_grads = torch.autograd.grad(got, (q, k))
    expected = loss(q, k)
    expected_grads = torch.autograd.grad(expected, (q, k))
    assert torch.equal(got, expected)
    for a, b in zip(got_grads, expected_grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", kernel_params())
def test_nan_propagates(backend):
    q = embeddings(5, 3, torch.float32, 11)
    q[2, 1] = float("nan")
    assert torch.isnan(fastkd.info_nce(q, embeddings(5, 3, torch.float32, 12), backend=backend))


@pytest.mark.parametrize("budget", (KEEP_EVERYTHING, RECOMPUTE), ids=("keep", "recompute"))
@pytest.mark.parametrize("labels,expected", (([0, 1], math.inf), ([1, 0], math.nan)), ids=("inf", "nan"))
def test_infinite_logits_follow_the_reference(budget, labels, expected):
    """A row with logits −inf and +inf: its log-sum-exp is +inf, so the loss is
    +inf with the −inf positive and NaN (inf − inf) with the +inf one."""
    q = torch.tensor([[math.inf, 0.0], [0.0, 1.0]])
    k = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor(labels)
    want = reference.info_nce(q.double(), k.double(), temperature=1.0, labels=labels)
    got = fastkd.info_nce(q, k, temperature=1.0, labels=labels, backend="cpu", logits_memory_budget=budget)
    assert want.isnan() if math.isnan(expected) else want == expected
    assert got.isnan() if math.isnan(expected) else got == expected


@pytest.mark.parametrize("budget", (KEEP_EVERYTHING, RECOMPUTE), ids=("keep", "recompute"))
@pytest.mark.parametrize("backend", kernel_params())
def test_deterministic(backend, budget):
    """Two runs give bit-identical losses and gradients (no atomics in any kernel)."""
    q, k = embeddings(21, 24, torch.float32, 13), embeddings(35, 24, torch.float32, 14)
    labels = torch.tensor([0, 5, 5, 34, 5, 7, 0] * 3, device=DEVICE)  # shared positives: the keep scatter-add
    fn = lambda a, b: fastkd.info_nce(a, b, labels=labels, backend=backend, logits_memory_budget=budget)  # noqa: E731
    first = run_with_grads(fn, q, k)
    again = run_with_grads(fn, q, k)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


# ---- the ops ------------------------------------------------------------------


def op_args(dtype, n=7, m=11, d=5, tile_rows=3, device="cpu"):
    q = torch.randn(n, d, dtype=dtype, device=device)
    k = torch.randn(m, d, dtype=dtype, device=device)
    labels = torch.randint(0, m, (n,), device=device)
    return q, k, labels, 2.0, tile_rows


@pytest.mark.parametrize("device", op_device_params())
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
def test_opcheck(device, dtype):
    args = op_args(dtype, device=device)
    torch.library.opcheck(torch.ops.fastkd.info_nce_forward.default, args)
    row_loss, row_lse = torch.ops.fastkd.info_nce_forward(*args)
    q, k, labels, inv_t, tile_rows = args
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert row_loss.shape == (7,) and row_loss.dtype == acc and row_lse.dtype == acc
    grad_rows = torch.linspace(0.5, 1.5, 7, dtype=row_lse.dtype, device=device)
    torch.library.opcheck(torch.ops.fastkd.info_nce_backward.default,
                          (grad_rows, q, k, labels, row_lse, inv_t, tile_rows))
    grad_q, grad_k = torch.ops.fastkd.info_nce_backward(grad_rows, q, k, labels, row_lse, inv_t, tile_rows)
    assert grad_q.dtype == dtype and grad_k.dtype == dtype

    # the keep ops: same row losses, probabilities summing to 1, same gradients
    torch.library.opcheck(torch.ops.fastkd.info_nce_softmax_forward.default, (q, k, labels, inv_t))
    kept_loss, probabilities = torch.ops.fastkd.info_nce_softmax_forward(q, k, labels, inv_t)
    assert probabilities.shape == (7, 11) and probabilities.dtype == acc and kept_loss.dtype == acc
    close = {"rtol": 1e-5, "atol": 1e-6} if acc == torch.float32 else {}
    torch.testing.assert_close(kept_loss, row_loss, **close)
    torch.testing.assert_close(probabilities.sum(1), torch.ones_like(row_lse), **close)
    args = (grad_rows, q, k, labels, probabilities, inv_t)
    torch.library.opcheck(torch.ops.fastkd.info_nce_softmax_backward.default, args)
    before = probabilities.clone()
    kept_q, kept_k = torch.ops.fastkd.info_nce_softmax_backward(*args)
    assert torch.equal(probabilities, before)
    assert kept_q.dtype == dtype and kept_k.dtype == dtype
    close = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else close
    torch.testing.assert_close(kept_q, grad_q, **close)
    torch.testing.assert_close(kept_k, grad_k, **close)


OP_CHECK_CASES = [
    ({"q": torch.randn(7)}, "q must be 2-D"),
    ({"k": torch.randn(11, 4)}, "same feature dim"),
    ({"k": torch.randn(11, 5, dtype=torch.float64)}, "same dtype"),
    ({"labels": torch.zeros(7, dtype=torch.int32)}, "labels must be int64"),
    ({"labels": torch.zeros(6, dtype=torch.long)}, "one entry per row"),
    ({"labels": torch.full((7,), 11)}, "labels must lie in"),
    ({"labels": torch.full((7,), -1)}, "labels must lie in"),
    ({"inv_temperature": 0.0}, "inv_temperature"),
    ({"tile_rows": 0}, "tile_rows"),
]


def skip_range_check_on_a_gpu(device, needle):
    """The CUDA ops do not read the labels on the host (a device → host sync):
    their kernels give such rows NaN (tests/test_info_nce_device_labels.py)."""
    if device == "cuda" and needle == "labels must lie in":
        pytest.skip("the CUDA ops guard the labels' range in their kernels")


@pytest.mark.parametrize("device", op_device_params())
@pytest.mark.parametrize("change,needle", OP_CHECK_CASES)
def test_op_checks(device, change, needle):
    skip_range_check_on_a_gpu(device, needle)
    names = ("q", "k", "labels", "inv_temperature", "tile_rows")
    args = dict(zip(names, op_args(torch.float32, device=device), strict=True))
    args.update({name: v.to(device) if isinstance(v, torch.Tensor) else v for name, v in change.items()})
    with pytest.raises(RuntimeError, match=needle):
        torch.ops.fastkd.info_nce_forward(*args.values())


@pytest.mark.parametrize("device", op_device_params())
@pytest.mark.parametrize("change,needle", OP_CHECK_CASES[:-1])  # the keep ops take no tile_rows
def test_softmax_op_checks(device, change, needle):
    skip_range_check_on_a_gpu(device, needle)
    names = ("q", "k", "labels", "inv_temperature")
    args = dict(zip(names, op_args(torch.float32, device=device)[:4], strict=True))
    args.update({name: v.to(device) if isinstance(v, torch.Tensor) else v for name, v in change.items()})
    with pytest.raises(RuntimeError, match=needle):
        torch.ops.fastkd.info_nce_softmax_forward(*args.values())


@pytest.mark.parametrize("device", op_device_params())
@pytest.mark.parametrize(
    "change,needle",
    [
        ({"probabilities": torch.rand(7, 10)}, r"probabilities must be \(N, M\) = \(7, 11\)"),
        ({"probabilities": torch.rand(77)}, "probabilities must be 2-D"),
        ({"probabilities": torch.rand(7, 11, dtype=torch.float64)}, "probabilities must be Float"),
        ({"grad_row_loss": torch.ones(6)}, "grad_row_loss must have one entry per row"),
        ({"grad_row_loss": torch.ones(7, dtype=torch.long)}, "grad_row_loss must be a floating-point"),
        ({"labels": torch.full((7,), 11)}, "labels must lie in"),
    ],
)
def test_softmax_backward_op_checks(device, change, needle):
    skip_range_check_on_a_gpu(device, needle)
    q, k, labels, inv_t, _ = op_args(torch.float32, device=device)
    args = {"grad_row_loss": torch.ones(7), "q": q, "k": k, "labels": labels,
            "probabilities": torch.rand(7, 11), "inv_temperature": inv_t}
    args.update(change)
    args = {name: v.to(device) if isinstance(v, torch.Tensor) else v for name, v in args.items()}
    with pytest.raises(RuntimeError, match=needle):
        torch.ops.fastkd.info_nce_softmax_backward(*args.values())


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"q": torch.randn(7)}, "q must be 2-D"),
        ({"k": torch.randn(11, 4)}, "same feature dim"),
        ({"k": torch.randn(11, 5, dtype=torch.float16)}, "same dtype"),
        ({"q": torch.randn(7, 5, dtype=torch.float64), "k": torch.randn(11, 5, dtype=torch.float64)},
         "q must be float32, bfloat16 or float16"),
        ({"labels": torch.zeros(7, dtype=torch.int32)}, "labels must be torch.int64"),
        ({"labels": torch.zeros(6, dtype=torch.long)}, r"labels must be a \(7,\) tensor"),
        ({"labels": [0] * 7}, r"labels must be a \(7,\) tensor"),
        ({"labels": torch.full((7,), 11)}, "labels must lie in"),
        ({"labels": torch.full((7,), -1)}, "labels must lie in"),
        ({"inv_temperature": 0.0}, "inv_temperature"),
        ({"inv_temperature": float("inf")}, "inv_temperature"),
    ],
)
def test_triton_launcher_checks(change, needle, monkeypatch):
    """The Triton launchers raise ValueError naming the argument before any kernel
    runs (the labels' range on a GPU too: FASTKD_CHECK_DEVICE_VALUES=1)."""
    monkeypatch.setenv("FASTKD_CHECK_DEVICE_VALUES", "1")
    triton_info_nce = pytest.importorskip("fastkd.kernels.info_nce")
    device = triton_info_nce.DEVICE_TYPE
    names = ("q", "k", "labels", "inv_temperature")
    args = dict(zip(names, op_args(torch.float32, device=device)[:4], strict=True))
    args.update({name: v.to(device) if isinstance(v, torch.Tensor) else v for name, v in change.items()})
    q, k, labels, inv_t = args.values()
    with pytest.raises(ValueError, match=needle):
        triton_info_nce.info_nce_forward(q, k, labels, inv_t)
    grad_rows, row_lse = torch.ones(7, device=device), torch.zeros(7, device=device)
    with pytest.raises(ValueError, match=needle):
        triton_info_nce.info_nce_backward(grad_rows, q, k, labels, row_lse, inv_t)


def test_triton_launcher_checks_row_vectors():
    triton_info_nce = pytest.importorskip("fastkd.kernels.info_nce")
    device = triton_info_nce.DEVICE_TYPE
    q, k, labels, inv_t, _ = op_args(torch.float32, device=device)
    ones, zeros = torch.ones(7, device=device), torch.zeros(7, device=device)
    with pytest.raises(ValueError, match="grad_row_loss"):
        triton_info_nce.info_nce_backward(ones[:6], q, k, labels, zeros, inv_t)
    with pytest.raises(ValueError, match="row_lse must be a floating-point"):
        triton_info_nce.info_nce_backward(ones, q, k, labels, zeros.long(), inv_t)


# ---- validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"q": torch.randn(4)}, "q"),
        ({"k": torch.randn(4, 3)}, "k has feature dim"),
        ({"k": torch.randn(4, 5, dtype=torch.float64)}, "k dtype"),
        ({"k": torch.randn(3, 5)}, "k must have at least"),
        ({"temperature": 0.0}, "temperature"),
        ({"labels": torch.tensor([0, 1, 2, 9])}, "labels"),
        ({"labels": torch.zeros(4)}, "labels"),
        ({"labels": torch.zeros(4, dtype=torch.long), "symmetric": True}, "labels"),
        ({"symmetric": 1}, "symmetric"),
        ({"normalize": "yes"}, "normalize"),
        ({"backend": "fast"}, "backend"),
        ({"logits_memory_budget": -1}, "logits_memory_budget"),
        ({"logits_memory_budget": 1.5e9}, "logits_memory_budget"),
        ({"logits_memory_budget": True}, "logits_memory_budget"),
        ({"logits_memory_budget": None}, "logits_memory_budget"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, needle):
    args = {"q": torch.randn(4, 5), "k": torch.randn(4, 5)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle):
        fastkd.info_nce(args.pop("q"), args.pop("k"), **args)


def test_explicit_gpu_backend_on_cpu_tensors_raises():
    with pytest.raises(ValueError, match="backend='cuda'"):
        fastkd.info_nce(torch.randn(4, 5), torch.randn(4, 5), backend="cuda")


def test_explicit_backend_without_info_nce_kernel_raises(monkeypatch):
    monkeypatch.setattr(fkinfo, "INFO_NCE_KERNELS", ("cpu",))
    monkeypatch.setattr(_dispatch, "resolve", lambda backend, tensor: "triton")
    with pytest.raises(ValueError, match="backend='triton' has no info_nce kernel yet"):
        fastkd.info_nce(torch.randn(4, 5), torch.randn(4, 5), backend="triton")
    # backend="auto" falls back to the reference instead
    q, k = torch.randn(4, 5), torch.randn(4, 5)
    assert torch.equal(fastkd.info_nce(q, k), reference.info_nce(q, k))


@pytest.mark.parametrize("budget", (-1, 2.0, None, "1GiB"))
def test_module_bad_budget_raises_value_error(budget):
    with pytest.raises(ValueError, match="logits_memory_budget"):
        fastkd.InfoNCELoss(logits_memory_budget=budget)


def test_module_forwards_the_budget():
    module = fastkd.InfoNCELoss(logits_memory_budget=0)
    assert module.logits_memory_budget == 0 and "logits_memory_budget=0" in repr(module)
    assert fastkd.InfoNCELoss().logits_memory_budget == fkinfo.DEFAULT_LOGITS_MEMORY_BUDGET
    q = embeddings(6, 4, torch.float32, 21, "cpu").requires_grad_(True)
    k = embeddings(6, 4, torch.float32, 22, "cpu").requires_grad_(True)
    saved, _ = saved_for_backward(module, q, k)
    assert kept_directions(saved, 6, 6) == 0
