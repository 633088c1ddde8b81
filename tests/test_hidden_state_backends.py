"""hidden_state_loss on every backend: the fused kernels (cpu, triton, cuda) against the
float64 reference.

The kernels take the projected ``(N, D)`` rows and return the row losses and both
gradients from one pass; these tests fix their contract: parity with the
reference (losses, student and teacher gradients, a non-unit upstream gradient) for
both kinds and every reduction, awkward shapes (D = 1, D not a multiple of the
block, D wider than a register-held row, N = 0, 3-D states), strided views,
masks (all excluded, non-finite padding), non-finite kept rows, reduced
precision, the argument checks of the public function, the ops and the Triton
launcher, opcheck and torch.compile.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastkd
from fastkd import _ops
from fastkd.reference import hidden_state as reference
from tests.common_checks import check_aot_eager_equals_eager, check_compiled_matches_eager
from tests.helpers import DEVICE, TOLERANCES, assert_matches, backend_params

BACKENDS = backend_params(include_reference=True)
KERNELS = backend_params()
KINDS = ("mse", "cosine")
needs_cpu_op = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason="no cpu extension")


def dtype_for(backend: str) -> torch.dtype:
    """float64 where the backend takes it; the GPU kernels' widest input, float32, otherwise."""
    return torch.float32 if backend in ("triton", "cuda") else torch.float64


def states(shape, seed, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def loss_and_grads(fn, student, teacher, upstream, *, teacher_grad=True):
    """``(loss, grad student, grad teacher or None)`` of ``fn(student, teacher)`` on fresh
    leaves; ``upstream`` (a scalar, or one value per element of the result) weights it."""
    s = student.detach().clone().requires_grad_()
    t = teacher.detach().clone().requires_grad_(teacher_grad)
    out = fn(s, t)
    weights = torch.as_tensor(upstream, dtype=out.dtype, device=out.device).expand(out.shape)
    leaves = (s, t) if teacher_grad else (s,)
    grads = torch.autograd.grad((out * weights).sum(), leaves)
    return out.detach(), grads[0], grads[1] if teacher_grad else None


def check_parity(backend, student, teacher, *, kind, reduction="mean", mask=None, upstream=0.7,
                 teacher_grad=True, elementwise=False):
    """``backend`` on ``student`` / ``teacher`` (their dtype) against the float64
    reference on the same values: loss, student and teacher gradients."""
    dtype = student.dtype

    def fused(s, t):
        return fastkd.hidden_state_loss(s, t, kind=kind, mask=mask, reduction=reduction, backend=backend)

    def ref(s, t):
        m = None if mask is None else mask.cpu()
        return reference.hidden_state_loss(s, t, kind=kind, mask=m, reduction=reduction)

    if reduction == "none" and not isinstance(upstream, float):
        upstream_cpu = upstream.cpu()
    else:
        upstream_cpu = upstream
    got = loss_and_grads(fused, student, teacher, upstream, teacher_grad=teacher_grad)
    want = loss_and_grads(ref, student.detach().cpu().double(), teacher.detach().cpu().double(), upstream_cpu,
                          teacher_grad=teacher_grad)
    baseline = loss_and_grads(ref, student.detach().cpu(), teacher.detach().cpu(), upstream_cpu,
                              teacher_grad=teacher_grad) if dtype != torch.float64 else None
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert got[0].dtype == loss_dtype
    what = f"{backend} {kind} {reduction} {dtype}"
    for i, name in enumerate(("loss", "student grad", "teacher grad")):
        if got[i] is None:
            assert want[i] is None
            continue
        if i > 0:
            assert got[i].dtype == dtype and got[i].shape == student.shape, (name, got[i].dtype)
        assert_matches(got[i].cpu(), want[i], dtype, f"{what} {name}",
                       () if baseline is None else (baseline[i],), elementwise=elementwise)


# ---- parity with the reference ------------------------------------------------

# D: 1, odd, a block plus one, and (2·4096 + 3) wider than the kernels' register-held rows
SHAPES = [(5, 1), (6, 7), (4, 33), (3, 257), (2, 3, 17), (2, 4099), (1, 8195)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_the_reference_in_float64(backend, kind, shape):
    dtype = dtype_for(backend)
    s = states(shape, 1, dtype=dtype).to(DEVICE)
    t = states(shape, 2, dtype=dtype).to(DEVICE)
    mask = (states(shape[:-1], 3) > -0.5).to(DEVICE)
    check_parity(backend, s, t, kind=kind, mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True])
def test_every_reduction_with_a_non_unit_upstream(backend, kind, reduction, masked):
    """``"none"`` with one upstream value per token (signs and sizes mixed)."""
    dtype = dtype_for(backend)
    s = states((3, 5, 40), 4, dtype=dtype).to(DEVICE)
    t = states((3, 5, 40), 5, dtype=dtype).to(DEVICE)
    mask = (states((3, 5), 6) > 0).to(DEVICE) if masked else None
    upstream = states((3, 5), 7, dtype=dtype).to(DEVICE) * 2 if reduction == "none" else -1.3
    check_parity(backend, s, t, kind=kind, reduction=reduction, mask=mask, upstream=upstream,
                 elementwise=reduction == "none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_teacher_without_grad(backend, kind):
    dtype = dtype_for(backend)
    s, t = states((4, 9), 8, dtype=dtype).to(DEVICE), states((4, 9), 9, dtype=dtype).to(DEVICE)
    check_parity(backend, s, t, kind=kind, teacher_grad=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(backend, kind, reduction):
    """N = 0 tokens: 0 (or an empty result) and empty gradients."""
    dtype = dtype_for(backend)
    s = torch.zeros(0, 4, 6, dtype=dtype, device=DEVICE, requires_grad=True)
    t = torch.zeros(0, 4, 6, dtype=dtype, device=DEVICE, requires_grad=True)
    out = fastkd.hidden_state_loss(s, t, kind=kind, reduction=reduction, backend=backend)
    assert out.shape == ((0, 4) if reduction == "none" else ())
    out.sum().backward()
    assert s.grad.shape == s.shape and t.grad.shape == t.shape
    if reduction != "none":
        assert out.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_strided_along_the_features(backend):
    """N = 0 rows of a view strided along D: ``contiguous()`` keeps an empty view's
    strides, and the kernels take it (there is nothing to read)."""
    dtype = dtype_for(backend)
    s = torch.zeros(0, 8, dtype=dtype, device=DEVICE, requires_grad=True)
    t = torch.zeros(0, 8, dtype=dtype, device=DEVICE)
    out = fastkd.hidden_state_loss(s[:, ::2], t[:, ::2], backend=backend)
    out.backward()
    assert out.item() == 0.0 and s.grad.shape == s.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_no_feature_runs_on_the_reference(backend, kind):
    """``D = 0`` has no kernel: the reference's value (MSE's mean over no channel is NaN)."""
    dtype = dtype_for(backend)
    s, t = torch.zeros(3, 0, dtype=dtype, device=DEVICE), torch.zeros(3, 0, dtype=dtype, device=DEVICE)
    got = fastkd.hidden_state_loss(s, t, kind=kind, reduction="none", backend=backend)
    want = reference.hidden_state_loss(s.cpu(), t.cpu(), kind=kind, reduction="none")
    torch.testing.assert_close(got.cpu(), want, equal_nan=True)


# ---- layouts --------------------------------------------------------------------

# name → (leaf shape for (B, T, D) = (3, 6, 20), the (B, T, D) view of the leaf)
LAYOUTS = {
    "transposed": ((6, 3, 20), lambda x: x.transpose(0, 1)),
    "token_strided": ((3, 12, 20), lambda x: x[:, ::2]),
    "channel_strided": ((3, 6, 40), lambda x: x[..., ::2]),
    "channels_first": ((3, 20, 6), lambda x: x.transpose(1, 2)),
    "column_slice": ((3, 6, 27), lambda x: x[..., 5:25]),
    "expanded": ((1, 6, 20), lambda x: x.expand(3, -1, -1)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_strided_views_match_contiguous_copies(backend, kind, layout):
    """The same losses and leaf gradients as on contiguous copies (the kernels read rows
    through their stride, or the view is copied first)."""
    leaf_shape, view = LAYOUTS[layout]
    dtype = dtype_for(backend)
    s_leaf = states(leaf_shape, 10, dtype=dtype).to(DEVICE).requires_grad_()
    t_leaf = states(leaf_shape, 11, dtype=dtype).to(DEVICE).requires_grad_()
    mask = (states((3, 6), 12) > -0.3).to(DEVICE)
    upstream = states((3, 6), 13, dtype=dtype).to(DEVICE)
    s_view, t_view = view(s_leaf), view(t_leaf)
    got = fastkd.hidden_state_loss(s_view, t_view, kind=kind, mask=mask, reduction="none", backend=backend)
    got_grads = torch.autograd.grad((got * upstream).sum(), (s_leaf, t_leaf))
    s_copy = s_view.detach().contiguous().requires_grad_()
    t_copy = t_view.detach().contiguous().requires_grad_()
    want = fastkd.hidden_state_loss(s_copy, t_copy, kind=kind, mask=mask, reduction="none", backend=backend)
    copy_grads = torch.autograd.grad((want * upstream).sum(), (s_copy, t_copy))
    # the copies' gradients taken back through the view to the leaves
    pulled_back = (view(s_leaf) * copy_grads[0]).sum() + (view(t_leaf) * copy_grads[1]).sum()
    want_grads = torch.autograd.grad(pulled_back, (s_leaf, t_leaf))
    torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-12)


# ---- masks and special values -----------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_tokens_excluded(backend, kind, reduction):
    dtype = dtype_for(backend)
    s = states((2, 3, 5), 14, dtype=dtype).to(DEVICE).requires_grad_()
    t = states((2, 3, 5), 15, dtype=dtype).to(DEVICE).requires_grad_()
    mask = torch.zeros(2, 3, dtype=torch.bool, device=DEVICE)
    out = fastkd.hidden_state_loss(s, t, kind=kind, mask=mask, reduction=reduction, backend=backend)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(s.grad, torch.zeros_like(s)) and torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_padding_never_reaches_the_loss_or_the_gradients(backend, kind, value):
    """Excluded rows are not read by the kernels: loss 0 and a zero gradient whatever
    they hold (the reference's gradient there is NaN: 0 · ∞ in autograd)."""
    dtype = dtype_for(backend)
    s = states((4, 6), 16, dtype=dtype)
    t = states((4, 6), 17, dtype=dtype)
    s[1, 2], t[3] = value, value
    mask = torch.tensor([True, False, True, False], device=DEVICE)
    s, t = s.to(DEVICE).requires_grad_(), t.to(DEVICE).requires_grad_()
    out = fastkd.hidden_state_loss(s, t, kind=kind, mask=mask, reduction="none", backend=backend)
    out.sum().backward()
    clean_s, clean_t = s.detach().clone(), t.detach().clone()
    clean_s[1], clean_t[3] = 0.0, 0.0
    want = reference.hidden_state_loss(clean_s.cpu(), clean_t.cpu(), kind=kind, mask=mask.cpu(),
                                       reduction="none")
    assert_matches(out.cpu(), want.double(), dtype, "rows")
    assert torch.equal(s.grad[~mask], torch.zeros_like(s.grad[~mask]))
    assert torch.equal(t.grad[~mask], torch.zeros_like(t.grad[~mask]))
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_non_finite_kept_rows_match_the_reference(backend, kind, value, where):
    """A kept row holding NaN or ±inf gives the reference's non-finite row loss; the
    other rows and their gradients are untouched."""
    dtype = dtype_for(backend)
    s, t = states((3, 8), 18, dtype=dtype), states((3, 8), 19, dtype=dtype)
    (s if where == "student" else t)[1, 3] = value
    s, t = s.to(DEVICE).requires_grad_(), t.to(DEVICE).requires_grad_()
    out = fastkd.hidden_state_loss(s, t, kind=kind, reduction="none", backend=backend)
    out.sum().backward()
    want = reference.hidden_state_loss(s.detach().cpu().double(), t.detach().cpu().double(), kind=kind,
                                       reduction="none")
    assert_matches(out.detach().cpu(), want, dtype, "rows")
    for grad in (s.grad, t.grad):
        assert torch.isfinite(grad[[0, 2]]).all()
        assert not torch.isfinite(grad[1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows_take_the_cosine_guard(backend):
    """A zero student row has cos = 0 under the ε guard (loss 1, finite gradient
    −g / √(ε (g·g + ε))); both rows zero give loss 1 and a zero gradient."""
    dtype = dtype_for(backend)
    s = torch.zeros(2, 4, dtype=dtype)
    t = torch.stack([torch.ones(4, dtype=dtype), torch.zeros(4, dtype=dtype)])
    s, t = s.to(DEVICE).requires_grad_(), t.to(DEVICE)
    out = fastkd.hidden_state_loss(s, t, kind="cosine", reduction="none", backend=backend)
    out.sum().backward()
    assert out.tolist() == [1.0, 1.0]
    expected = -t[0] / math.sqrt(reference.COSINE_EPS * (4 + reference.COSINE_EPS))
    torch.testing.assert_close(s.grad[0], expected, rtol=1e-6, atol=0)
    assert torch.equal(s.grad[1], torch.zeros_like(s.grad[1]))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reduced_precision_against_float64(backend, kind, dtype):
    """float32 losses, gradients in the input dtype, within docs/spec.md §6's tolerances
    (or twice the reference's own error in that dtype)."""
    s = states((4, 7, 96), 20, dtype=dtype).to(DEVICE)
    t = states((4, 7, 96), 21, dtype=dtype).to(DEVICE)
    mask = (states((4, 7), 22) > -0.7).to(DEVICE)
    check_parity(backend, s, t, kind=kind, mask=mask, upstream=1.9)


def test_tolerances_cover_the_dtypes():
    assert set(TOLERANCES) >= {torch.float32, torch.bfloat16, torch.float16, torch.float64}


# ---- autograd -----------------------------------------------------------------

@pytest.mark.parametrize("backend", KERNELS)
def test_a_second_backward_of_a_kept_graph_gives_the_same_gradients(backend):
    dtype = dtype_for(backend)
    s = states((5, 12), 23, dtype=dtype).to(DEVICE).requires_grad_()
    t = states((5, 12), 24, dtype=dtype).to(DEVICE)
    loss = fastkd.hidden_state_loss(s, t, kind="cosine", backend=backend)
    (first,) = torch.autograd.grad(loss * 2.0, s, retain_graph=True)
    (second,) = torch.autograd.grad(loss * 2.0, s)
    assert torch.equal(first, second)


@needs_cpu_op
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_of_the_cpu_kernel(kind):
    g = torch.Generator().manual_seed(25)
    s = torch.randn(2, 3, 10, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 10, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    weights = torch.randn(2, 3, generator=g, dtype=torch.float64)
    for reduction in ("mean", "none"):
        def loss(a, b, reduction=reduction):
            out = fastkd.hidden_state_loss(a, b, kind=kind, mask=mask, reduction=reduction, backend="cpu")
            return out * weights if reduction == "none" else out
        assert torch.autograd.gradcheck(loss, (s, t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_form_takes_the_backend(backend):
    module = fastkd.HiddenStateLoss("cosine", student_dim=5, teacher_dim=7, backend=backend).to(DEVICE)
    dtype = dtype_for(backend)
    module = module.to(dtype)
    h = states((2, 3, 5), 26, dtype=dtype).to(DEVICE)
    t = states((2, 3, 7), 27, dtype=dtype).to(DEVICE)
    got = module(h, t)
    got.backward()
    assert module.projection.weight.grad is not None
    want = fastkd.hidden_state_loss(h, t, kind="cosine", projection=module.projection, backend="reference")
    assert_matches(got.detach().cpu(), want.detach().cpu().double(), dtype, "module")
    assert f"backend={backend!r}" in repr(module)


# ---- argument checks ------------------------------------------------------------

def test_backend_errors_name_the_argument():
    s, t = torch.randn(2, 4), torch.randn(2, 4)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        fastkd.hidden_state_loss(s, t, backend="gpu")
    with pytest.raises(ValueError, match=r"backend='triton' (does not take torch.float64|is unavailable)"):
        fastkd.hidden_state_loss(s.double(), t.double(), backend="triton")
    with pytest.raises(ValueError, match=r"backend='cuda'"):
        fastkd.hidden_state_loss(s, t, backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_raise_before_any_kernel(backend, monkeypatch):
    """The public checks run before the op: a kernel that would be called fails the test."""
    from fastkd import hidden_state as family

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran on bad input")

    monkeypatch.setattr(family, "kernel_op", lambda *args: no_kernel)
    dtype = dtype_for(backend)
    s = torch.randn(2, 3, 4, dtype=dtype, device=DEVICE)
    bad = [
        (dict(kind="l2"), "kind must be one of"),
        (dict(reduction="batchmean"), "reduction must be one of"),
        (dict(teacher_hidden=torch.randn(2, 3, 5, dtype=dtype, device=DEVICE)), "student_hidden"),
        (dict(mask=torch.ones(2, 3, device=DEVICE)), "mask must be a bool tensor"),
        (dict(mask=torch.ones(3, 2, dtype=torch.bool, device=DEVICE)), "mask shape"),
        (dict(student_hidden=torch.randn(2, 3, 4, dtype=torch.float16, device=DEVICE)),
         "teacher_hidden dtype"),
    ]
    for change, message in bad:
        kwargs = dict(student_hidden=s, teacher_hidden=s.clone(), backend=backend)
        kwargs.update(change)
        with pytest.raises(ValueError, match=message):
            fastkd.hidden_state_loss(**kwargs)


def op_bad_arguments():
    """(keyword changes of a good op call, the argument the error must name)."""
    s = torch.randn(3, 4, device=DEVICE)
    return [
        (dict(student=s[:, :2]), "student"),
        (dict(teacher=s.double()), "dtype|float64"),
        (dict(student=s.reshape(12)), "student"),
        (dict(student=torch.randn(3, 0, device=DEVICE), teacher=torch.randn(3, 0, device=DEVICE)), "feature"),
        (dict(student=torch.randn(4, 3, device=DEVICE).t(), teacher=torch.randn(4, 3, device=DEVICE).t()),
         "unit stride"),
        (dict(row_mask=torch.ones(3, device=DEVICE)), "row_mask"),
        (dict(row_mask=torch.ones(2, dtype=torch.bool, device=DEVICE)), "row_mask"),
        (dict(kind=2), "kind"),
        (dict(grad_scale=math.inf), "grad_scale"),
    ]


def _op_call(op, change):
    s = torch.randn(3, 4, device=DEVICE)
    kwargs = dict(student=s, teacher=s.clone(), row_mask=None, kind=0, grad_scale=1.0, student_grad=True,
                  teacher_grad=True)
    kwargs.update(change)
    return op(*kwargs.values())


@needs_cpu_op
@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU op takes CPU tensors")
@pytest.mark.parametrize(("change", "name"), op_bad_arguments(), ids=lambda v: str(v)[:20])
def test_cpu_op_checks_its_arguments(change, name):
    with pytest.raises(RuntimeError, match=name):
        _op_call(torch.ops.fastkd.hidden_state_forward, change)


@pytest.mark.parametrize("backend", [p for p in KERNELS if p.id == "triton"])
@pytest.mark.parametrize(("change", "name"), op_bad_arguments(), ids=lambda v: str(v)[:20])
def test_triton_launcher_checks_its_arguments(backend, change, name):
    from fastkd.kernels import hidden_state as triton_hidden_state

    with pytest.raises(ValueError, match=name):
        _op_call(triton_hidden_state.hidden_state_forward, change)


# ---- torch.library and torch.compile ---------------------------------------------

@needs_cpu_op
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", [0, 1])
def test_opcheck_of_the_cpu_op(dtype, kind):
    g = torch.Generator().manual_seed(28)
    buffer = torch.randn(5, 13, generator=g).to(dtype)
    s, t = buffer[:, 1:10], torch.randn(5, 9, generator=g).to(dtype)  # a row stride of 13
    mask = torch.tensor([True, False, True, True, False])
    for row_mask, grads in ((None, (True, False)), (mask, (True, True)), (mask, (False, False))):
        torch.library.opcheck(torch.ops.fastkd.hidden_state_forward, (s, t, row_mask, kind, 0.25, *grads))


@needs_cpu_op
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("masked", [False, True])
def test_compiles_with_fullgraph(kind, masked):
    """aot_eager: bit for bit without a mask. With one, the traced mean divides by the
    kept-token count as a tensor (no host read while tracing), applied to the loss
    and, in the backward, to the gradient, where eager passes it to the kernel:
    equal to float32 rounding."""
    g = torch.Generator().manual_seed(29)
    s = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    t = torch.randn(2, 9, 16, generator=g)
    mask = torch.rand(2, 9, generator=g) < 0.6 if masked else None

    def loss(a, b):
        return fastkd.hidden_state_loss(a, b, kind=kind, mask=mask, backend="cpu")

    if not masked:
        check_aot_eager_equals_eager(loss, s, t)
        return
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(s, t)
    (got_grad,) = torch.autograd.grad(got * 0.7, s)
    expected = loss(s, t)
    (expected_grad,) = torch.autograd.grad(expected * 0.7, s)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-6, atol=1e-9)


@needs_cpu_op
def test_compiles_with_inductor():
    g = torch.Generator().manual_seed(30)
    s = torch.randn(3, 5, 24, generator=g, requires_grad=True)
    t = torch.randn(3, 5, 24, generator=g)
    mask = torch.rand(3, 5, generator=g) < 0.7

    def step(a, b):
        return fastkd.hidden_state_loss(a, b, kind="cosine", mask=mask, backend="cpu")

    check_compiled_matches_eager(step, s, t)
