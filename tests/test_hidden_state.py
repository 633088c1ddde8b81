"""hidden_state_loss: TinyBERT's MSE and DistilBERT's cosine loss against torch.nn's own losses."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fastkd


def torch_nn_loss(h, g, kind, mask):
    """The published formulations on the kept tokens, float64: nn.MSELoss / nn.CosineEmbeddingLoss."""
    h, g = h.double(), g.double()
    if mask is not None:
        h, g = h[mask], g[mask]
    h, g = h.reshape(-1, h.shape[-1]), g.reshape(-1, g.shape[-1])
    if h.shape[0] == 0:
        return torch.zeros((), dtype=torch.float64)
    if kind == "mse":
        return nn.MSELoss()(h, g)
    return nn.CosineEmbeddingLoss()(h, g, torch.ones(h.shape[0], dtype=torch.float64))


@given(
    lead=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    width=st.integers(1, 9),
    kind=st.sampled_from(["mse", "cosine"]),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_mean_matches_torch_nn_in_float64(lead, width, kind, masked, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, width, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(*lead, width, generator=g, dtype=torch.float64)
    mask = (torch.rand(*lead, generator=g) < 0.6) if masked else None
    got = fastkd.hidden_state_loss(h, t, kind=kind, mask=mask)
    expected = torch_nn_loss(h, t, kind, mask)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-14)
    (grad,) = torch.autograd.grad(got, h)
    if expected.requires_grad:
        (expected_grad,) = torch.autograd.grad(expected, h)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)
    else:
        assert torch.equal(grad, torch.zeros_like(grad))


def test_reductions_and_projection():
    g = torch.Generator().manual_seed(1)
    h, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 7, generator=g)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    proj = nn.Linear(5, 7)
    rows = fastkd.hidden_state_loss(h, t, projection=proj, mask=mask, reduction="none")
    assert rows.shape == (2, 3) and (rows[~mask] == 0).all()
    total = fastkd.hidden_state_loss(h, t, projection=proj, mask=mask, reduction="sum")
    mean = fastkd.hidden_state_loss(h, t, projection=proj, mask=mask)
    torch.testing.assert_close(total, rows.sum())
    torch.testing.assert_close(mean, rows.sum() / 4)
    torch.testing.assert_close(mean.double(), torch_nn_loss(proj(h), t, "mse", mask), rtol=1e-6, atol=0)


def test_module_holds_the_projection():
    module = fastkd.HiddenStateLoss("cosine", student_dim=4, teacher_dim=6)
    assert isinstance(module.projection, nn.Linear)
    h, t = torch.randn(3, 4), torch.randn(3, 6)
    module(h, t).backward()
    assert module.projection.weight.grad is not None
    with pytest.raises(ValueError, match="student_dim and teacher_dim must be given together"):
        fastkd.HiddenStateLoss(student_dim=4)
    with pytest.raises(ValueError, match="kind must be one of"):
        fastkd.HiddenStateLoss("l1")


def test_no_kept_token_gives_zero():
    h = torch.randn(2, 3, requires_grad=True)
    loss = fastkd.hidden_state_loss(h, torch.randn(2, 3), mask=torch.zeros(2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(h.grad, torch.zeros_like(h))


BAD = [
    (dict(kind="l2"), "kind must be one of"),
    (dict(reduction="batchmean"), "reduction must be one of"),
    (dict(teacher_hidden=torch.randn(2, 3, 5)), r"student_hidden \(after projection\) shape \(2, 3, 4\)"),
    (dict(teacher_hidden=torch.randn(2, 3, 4, dtype=torch.float64)), "teacher_hidden dtype torch.float64"),
    (dict(mask=torch.ones(2, 3)), "mask must be a bool tensor"),
    (dict(mask=torch.ones(3, 2, dtype=torch.bool)),
     r"mask shape \(3, 2\) must be the hidden states' leading"),
    (dict(projection=3), "projection must be None or a callable"),
    (dict(student_hidden=[1.0]), "student_hidden must be a torch.Tensor"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[m[:30] for _, m in BAD])
def test_bad_arguments_raise_value_error_naming_them(change, message):
    kwargs = dict(student_hidden=torch.randn(2, 3, 4), teacher_hidden=torch.randn(2, 3, 4))
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        fastkd.hidden_state_loss(**kwargs)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_both_inputs(kind, reduction):
    g = torch.Generator().manual_seed(7)
    h = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    weights = torch.randn(2, 3, generator=g, dtype=torch.float64)

    def loss(a, b):
        out = fastkd.hidden_state_loss(a, b, kind=kind, mask=mask, reduction=reduction)
        return out * weights if reduction == "none" else out

    assert torch.autograd.gradcheck(loss, (h, t))
