"""attention_relation_loss on strided inputs, special values and half-precision inputs.

Every backend on DEVICE (and the reference) against:
  - the same loss on contiguous copies: strided, sliced, transposed and
    expanded states and masks, and a column slice of a NaN-padded buffer, give
    the same losses and gradients (the kernels read through the strides);
  - the reference's NaN / ±inf pattern: NaN, +inf or −inf in a kept position
    of either model give, per row (``reduction="none"``), exactly the
    reference's non-finite rows and its values elsewhere; a key to which the
    teacher gives no mass (a −inf teacher score) adds 0 (0 · log 0 = 0);
    huge and subnormal states give the reference's loss and gradients, also
    where scores ~1e3 give KLs ~1 and the row maxima rise across key tiles;
  - padding: values at positions the mask excludes never reach the loss,
    whatever they are (NaN, ±inf), and their gradient is 0 when they are
    finite (non-finite padding makes gradients NaN on every backend, as in the
    reference: ``X Xᵀ``'s backward multiplies the padding's zero score
    gradients by its values);
  - bfloat16 / float16 inputs: float32 losses and input-dtype gradients within
    docs/spec.md §6's tolerances of the float64 loop oracle;
  - relation heads wider than the kernels' tiles (cpu, cuda), and opcheck of
    the ops on strided inputs (cpu; cuda under FASTKD_TEST_DEVICE=cuda).
"""

from __future__ import annotations

import math

import pytest
import torch

import fastkd
from fastkd.reference import attention_relation as reference
from tests.helpers import DEVICE, assert_matches, backend_params
from tests.test_attention_relation import dtype_for, loop_oracle

BACKENDS = backend_params(include_reference=True)
HEADS = 2


def states(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def loss_and_grads(fn, leaves, *args):
    """``(loss, grads of the leaves)``, upstream a fixed non-uniform weight per row."""
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    out = fn(*leaves, *args)
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    grads = torch.autograd.grad((out * weights).sum(), leaves)
    return out.detach(), grads


# ---- strided inputs ---------------------------------------------------------------

# name → (leaf shape for B = 3, T = 10, D, the view of the leaf as (B, T, D))
LAYOUTS = {
    "transposed": (lambda d: (10, 3, d), lambda x: x.transpose(0, 1)),
    "time_strided": (lambda d: (3, 20, d), lambda x: x[:, ::2]),
    "channel_strided": (lambda d: (3, 10, 2 * d), lambda x: x[:, :, ::2]),
    "channels_first": (lambda d: (3, d, 10), lambda x: x.transpose(1, 2)),
    "expanded": (lambda d: (1, 10, d), lambda x: x.expand(3, -1, -1)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("causal", [False, True])
def test_strided_states_give_the_contiguous_result(backend, layout, causal):
    """Losses and both gradients on a strided view equal those on its contiguous copy."""
    leaf_shape, view = LAYOUTS[layout]
    dtype = dtype_for(backend)
    s_leaf = states(leaf_shape(6), 1).to(DEVICE, dtype)
    t_leaf = states(leaf_shape(8), 2).to(DEVICE, dtype)
    mask = torch.ones(3, 10, dtype=torch.bool, device=DEVICE)
    mask[1, 7:] = False
    mask[2, 0] = False

    def run(s, t, contiguous):
        a, b = view(s), view(t)
        if contiguous:
            a, b = a.contiguous(), b.contiguous()
        assert a.shape == (3, 10, a.shape[2])
        return fastkd.attention_relation_loss(a, b, num_relation_heads=HEADS, mask=mask, causal=causal,
                                              reduction="none", backend=backend)

    got, got_grads = loss_and_grads(run, (s_leaf, t_leaf), False)
    want, want_grads = loss_and_grads(run, (s_leaf, t_leaf), True)
    assert not view(s_leaf).is_contiguous()
    assert_matches(got.cpu(), want.cpu(), dtype, f"{backend} {layout} rows", elementwise=True)
    for name, a, b in zip(("student", "teacher"), got_grads, want_grads, strict=True):
        assert_matches(a.cpu(), b.cpu(), dtype, f"{backend} {layout} {name} gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_mask_and_a_column_slice_of_a_nan_padded_buffer(backend):
    """The states are the middle columns of buffers whose other columns are
    NaN, the mask a strided view: nothing outside the views is read."""
    dtype = dtype_for(backend)
    s, t = states((2, 9, 6), 3), states((2, 9, 4), 4)
    mask_buffer = torch.rand(2, 18, generator=torch.Generator().manual_seed(5)) < 0.7
    mask = mask_buffer[:, ::2]
    assert not mask.is_contiguous()
    s_buf = torch.full((2, 9, 10), math.nan, dtype=torch.float64)
    t_buf = torch.full((2, 9, 7), math.nan, dtype=torch.float64)
    s_buf[:, :, 2:8], t_buf[:, :, 1:5] = s, t
    s_view = s_buf.to(DEVICE, dtype)[:, :, 2:8]
    t_view = t_buf.to(DEVICE, dtype)[:, :, 1:5]
    got = fastkd.attention_relation_loss(s_view, t_view, num_relation_heads=HEADS, mask=mask.to(DEVICE),
                                         reduction="none", backend=backend)
    expected = loop_oracle(s.to(dtype), t.to(dtype), HEADS, mask)
    assert_matches(got.cpu(), expected, dtype, f"{backend} NaN-padded buffer", elementwise=True)


# ---- special values -----------------------------------------------------------------

def special_states(kind: str, side: str, position: int = 3):
    """float32 (B, T, D) states (2, 6, 4) and (2, 6, 6), one entry of ``side``'s
    element 0 at ``position`` replaced by ``kind`` (or all scaled for huge / subnormal)."""
    s, t = states((2, 6, 4), 6), states((2, 6, 6), 7)
    target = s if side == "student" else t
    if kind in ("nan", "inf", "-inf"):
        target[0, position, 1] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[kind]
    elif kind == "huge":
        target *= 30.0  # scores ~1e3: one-hot relations, the KL a difference of large scores
    elif kind == "subnormal":
        target *= 1e-41  # products underflow to 0: uniform relations
    return s.float(), t.float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("kind", ["nan", "inf", "-inf"])
def test_non_finite_states_give_the_references_rows(backend, side, kind):
    """Per row, exactly the reference's NaN / ±inf rows (a ±inf entry makes
    scores ±inf: +inf ones give NaN rows, −inf student ones +inf rows, −inf
    teacher ones a key with no teacher mass) and its finite values elsewhere."""
    s, t = special_states(kind, side)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    got = fastkd.attention_relation_loss(s.to(DEVICE), t.to(DEVICE), num_relation_heads=HEADS,
                                         mask=mask.to(DEVICE), reduction="none", backend=backend)
    expected = reference.attention_relation_loss(s.double(), t.double(), num_relation_heads=HEADS, mask=mask,
                                                 reduction="none")
    assert not torch.isfinite(expected[0]).all(), "the special value reaches some row"
    assert torch.isfinite(expected[1]).all()
    assert_matches(got.cpu(), expected, torch.float32, f"{backend} {kind} {side}", elementwise=True)
    total = fastkd.attention_relation_loss(s.to(DEVICE), t.to(DEVICE), num_relation_heads=HEADS,
                                           mask=mask.to(DEVICE), backend=backend)
    if kind == "nan":
        assert torch.isnan(total)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_score_of_minus_inf_is_a_key_without_mass(backend):
    """Hand-made: T = 2, D = 1, the teacher's second position −inf. Row 0's
    teacher scores are (x0², −inf·x0) = (finite, −inf) for x0 > 0: all the
    teacher's mass on key 0, so the row's KL is −log q_00, finite."""
    s = torch.tensor([[[0.5], [0.25]]])
    t = torch.tensor([[[1.0], [-math.inf]]])
    got = fastkd.attention_relation_loss(s.to(DEVICE), t.to(DEVICE), num_relation_heads=1, reduction="none",
                                         backend=backend).cpu()
    z = torch.tensor([0.25, 0.125], dtype=torch.float64)  # student scores of row 0 (√d = 1)
    assert got[0, 0].item() == pytest.approx(float(-z.log_softmax(0)[0]), rel=1e-6)
    assert torch.isnan(got[0, 1])  # row 1: teacher scores (−inf, +inf)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("kind", ["huge", "subnormal"])
def test_huge_and_subnormal_states(backend, side, kind):
    """The reference's loss and gradients, float32 (the flash-attention rule:
    within twice the float32 reference's own error of the float64 result)."""
    s, t = special_states(kind, side)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 5] = False

    def run(be):
        def fn(a, b):
            return fastkd.attention_relation_loss(a, b, num_relation_heads=HEADS, mask=mask.to(a.device),
                                                  causal=True, reduction="none", backend=be)
        return fn

    got, got_grads = loss_and_grads(run(backend), (s.to(DEVICE), t.to(DEVICE)))
    want, want_grads = loss_and_grads(run("reference"), (s.double(), t.double()))
    base, base_grads = loss_and_grads(run("reference"), (s, t))
    assert torch.isfinite(want).all()
    assert_matches(got.cpu(), want, torch.float32, f"{backend} {kind} loss", (base,), elementwise=True)
    for name, a, b, c in zip(("student", "teacher"), got_grads, want_grads, base_grads, strict=True):
        assert_matches(a.cpu(), b, torch.float32, f"{backend} {kind} {name} gradient", (c,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_scores_near_convergence_across_key_tiles(backend):
    """Scores ~1e3 whose relations nearly agree (the student's states are the
    teacher's plus 3% noise, both ×30): KLs of ~1 against scores of ~1e3.
    Positions sorted by norm make the row maxima rise from key tile to key
    tile, T = 300 crosses every kernel's tiles (the cpu's 256 keys
    included). Loss and gradients within the float32 reference's error of
    the float64 result (one-pass forms lose eps · |z| here: 12 times the
    reference's error in the student gradient, a small row's KL 80% off)."""
    base = states((1, 300, 8), 22)
    order = base[0].norm(dim=-1).argsort()
    t = (base * 30.0)[:, order].float()
    s = ((base + 0.03 * states((1, 300, 8), 23)) * 30.0)[:, order].float()

    def run(be):
        def fn(a, b):
            return fastkd.attention_relation_loss(a, b, num_relation_heads=HEADS, causal=True,
                                                  reduction="none", backend=be)
        return fn

    got, got_grads = loss_and_grads(run(backend), (s.to(DEVICE), t.to(DEVICE)))
    want, want_grads = loss_and_grads(run("reference"), (s.double(), t.double()))
    base_loss, base_grads = loss_and_grads(run("reference"), (s, t))
    assert want.abs().max() < 100, "relations close enough for the KL to be far below the scores"
    assert_matches(got.cpu(), want, torch.float32, f"{backend} near-convergence loss", (base_loss,),
                   elementwise=True)
    for name, a, b, c in zip(("student", "teacher"), got_grads, want_grads, base_grads, strict=True):
        assert_matches(a.cpu(), b, torch.float32, f"{backend} near-convergence {name} gradient", (c,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e30])
def test_padding_never_reaches_the_loss(backend, side, value):
    """Positions the mask excludes may hold anything: the row losses are those
    of the sequence without them."""
    dtype = dtype_for(backend)
    s, t = states((2, 7, 4), 8), states((2, 7, 6), 9)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, 2] = False
    expected = loop_oracle(s, t, HEADS, mask)
    target = s if side == "student" else t
    target[0, 5:] = value
    target[1, 2, 1] = value
    got = fastkd.attention_relation_loss(s.to(DEVICE, dtype), t.to(DEVICE, dtype), num_relation_heads=HEADS,
                                         mask=mask.to(DEVICE), reduction="none", backend=backend)
    assert_matches(got.cpu(), expected, dtype, f"{backend} padding {value}", elementwise=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_finite_padding_gets_a_zero_gradient(backend, causal):
    dtype = dtype_for(backend)
    s, t = states((2, 7, 4), 10, scale=3.0), states((2, 7, 6), 11, scale=3.0)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 0] = False

    def fn(a, b):
        return fastkd.attention_relation_loss(a, b, num_relation_heads=HEADS, mask=mask.to(DEVICE),
                                              causal=causal, reduction="none", backend=backend)

    _, grads = loss_and_grads(fn, (s.to(DEVICE, dtype), t.to(DEVICE, dtype)))
    for grad in grads:
        assert torch.equal(grad[~mask.to(DEVICE)], torch.zeros_like(grad[~mask.to(DEVICE)]))
        assert grad[mask.to(DEVICE)].abs().sum() > 0


# ---- bfloat16 / float16 inputs --------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_losses_and_gradients(backend, dtype, causal):
    """Row losses (float32) and both gradients (in the input dtype) against
    the float64 loop oracle on the same rounded inputs; T = 37 crosses the
    kernels' tiles, D / A differs between the models."""
    s = states((2, 37, 24), 12).to(dtype)
    t = states((2, 37, 40), 13).to(dtype)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 30:] = False

    def fn(a, b):
        return fastkd.attention_relation_loss(a, b, num_relation_heads=4, mask=mask.to(a.device),
                                              causal=causal, reduction="none", backend=backend)

    def oracle(a, b):
        return loop_oracle(a, b, 4, mask, causal)

    got, got_grads = loss_and_grads(fn, (s.to(DEVICE), t.to(DEVICE)))
    want, want_grads = loss_and_grads(oracle, (s.double(), t.double()))
    assert got.dtype == torch.float32
    # the loss is float32 whatever the input: the float32 tolerance applies to it
    assert_matches(got.cpu(), want, torch.float32, f"{backend} {dtype} rows", elementwise=True)
    for name, a, b in zip(("student", "teacher"), got_grads, want_grads, strict=True):
        assert a.dtype == dtype
        assert_matches(a.cpu(), b, dtype, f"{backend} {dtype} {name} gradient")


@pytest.mark.skipif(fastkd._ops.CPU_EXTENSION_ERROR is not None, reason="no cpu extension")
def test_opcheck_on_strided_inputs():
    """The fake kernels' contiguous gradients are the ops' (torch.compile relies on them)."""
    s = states((6, 2, 4), 14).transpose(0, 1)
    t = states((2, 4, 6), 15).transpose(1, 2)
    args = (s, t, 2, None, False, 1.0)
    torch.library.opcheck(torch.ops.fastkd.attention_relation_forward, args)
    _, lse_s, lse_t, kl = torch.ops.fastkd.attention_relation_forward(*args)
    row_grad = states((2, 6), 16)
    torch.library.opcheck(torch.ops.fastkd.attention_relation_backward,
                          (row_grad, *args, lse_s, lse_t, kl, True, True))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id != "triton"])
def test_heads_wider_than_a_tile(backend):
    """D / A = 300 and 70 (the triton kernel's limit is 256; the cuda kernel
    streams a head's channels in chunks of 32): T = 40 crosses the tiles."""
    dtype = dtype_for(backend)
    s, t = states((2, 40, 300), 17), states((2, 40, 70), 18)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, 33:] = False

    def fn(a, b):
        return fastkd.attention_relation_loss(a, b, num_relation_heads=1, mask=mask.to(a.device), causal=True,
                                              reduction="none", backend=backend)

    got, got_grads = loss_and_grads(fn, (s.to(DEVICE, dtype), t.to(DEVICE, dtype)))
    want, want_grads = loss_and_grads(
        lambda a, b: loop_oracle(a, b, 1, mask, causal=True), (s.to(dtype).double(), t.to(dtype).double()))
    assert_matches(got.cpu(), want, dtype, f"{backend} wide heads rows", elementwise=True)
    for name, a, b in zip(("student", "teacher"), got_grads, want_grads, strict=True):
        assert_matches(a.cpu(), b, dtype, f"{backend} wide heads {name} gradient")


@pytest.mark.skipif(DEVICE.type != "cuda" or fastkd._ops.CUDA_EXTENSION_ERROR is not None,
                    reason="the cuda ops need FASTKD_TEST_DEVICE=cuda and fastkd._C_cuda")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_of_the_cuda_ops(dtype):
    s = states((6, 2, 4), 19).to(DEVICE, dtype).transpose(0, 1)
    t = states((2, 6, 6), 20).to(DEVICE, dtype)
    mask = torch.tensor([[True, False, True, True, True, True], [True] * 6], device=DEVICE)
    args = (s, t, 2, mask, True, 1.5)
    torch.library.opcheck(torch.ops.fastkd.attention_relation_forward, args)
    _, lse_s, lse_t, kl = torch.ops.fastkd.attention_relation_forward(*args)
    row_grad = states((2, 6), 21).to(DEVICE, torch.float32)
    torch.library.opcheck(torch.ops.fastkd.attention_relation_backward,
                          (row_grad, *args, lse_s, lse_t, kl, True, True))
