"""FitNets hints (docs/spec.md §5): HintLoss's adapters, value, pooling, gradients and argument checks."""

from __future__ import annotations

import pytest
import torch

import fastkd


@pytest.mark.parametrize(
    "adapter,weight_shape",
    [("conv1x1", (12, 5, 1, 1)), ("conv3x3", (12, 5, 3, 3)), ("linear", (12, 5))],
)
def test_hint_adapter_shapes(adapter, weight_shape):
    hint = fastkd.HintLoss(5, 12, adapter=adapter)
    params = dict(hint.named_parameters())
    weight = next(v for k, v in params.items() if k.endswith("weight") and v.dim() >= 2)
    assert tuple(weight.shape) == weight_shape
    if adapter == "linear":
        assert isinstance(hint.adapter, torch.nn.Linear)
    else:
        conv, bn = hint.adapter
        assert isinstance(bn, torch.nn.BatchNorm2d) and bn.num_features == 12 and conv.bias is None
    assert adapter in repr(hint)


@pytest.mark.parametrize(
    "s_shape,t_shape",
    [((4, 5, 6, 6), (4, 12, 6, 6)), ((4, 5, 8, 8), (4, 12, 4, 4)), ((4, 5, 3, 5), (4, 12, 6, 10))],
)
def test_hint_value_pooling_and_gradients(s_shape, t_shape):
    torch.manual_seed(1)
    hint = fastkd.HintLoss(5, 12)
    s = torch.randn(*s_shape, requires_grad=True)
    t = torch.randn(*t_shape, requires_grad=True)
    loss = hint(s, t)
    adapted = hint.adapter(s)
    size = (min(s_shape[2], t_shape[2]), min(s_shape[3], t_shape[3]))
    want = (
        (
            torch.nn.functional.adaptive_avg_pool2d(adapted, size)
            - torch.nn.functional.adaptive_avg_pool2d(t, size)
        )
        ** 2
    ).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hint.parameters())
    assert t.grad is None  # the hint is a target


def test_hint_linear_vectors():
    torch.manual_seed(2)
    hint = fastkd.HintLoss(7, 3, adapter="linear")
    s, t = torch.randn(9, 7, requires_grad=True), torch.randn(9, 3)
    loss = hint(s, t)
    assert loss.item() == pytest.approx(((hint.adapter(s) - t) ** 2).mean().item(), rel=1e-6)
    loss.backward()
    assert hint.adapter.weight.grad is not None and s.grad is not None


@pytest.mark.parametrize(
    "adapter,s,t,needle",
    [
        (
            "conv1x1",
            torch.randn(4, 5),
            torch.randn(4, 12),
            "student_features has shape .* use adapter='linear'",
        ),
        ("linear", torch.randn(4, 5, 2, 2), torch.randn(4, 12), "student_features has shape .* conv adapter"),
        ("linear", torch.randn(4, 5), torch.randn(4, 12, 2, 2), "teacher_features has shape"),
        ("conv1x1", torch.randn(4, 6, 3, 3), torch.randn(4, 12, 3, 3), "student_features has 6 channels"),
        ("conv1x1", torch.randn(4, 5, 3, 3), torch.randn(4, 11, 3, 3), "teacher_features has 11 channels"),
        ("conv1x1", torch.randn(4, 5, 3, 3), torch.randn(3, 12, 3, 3), "teacher_features batch size"),
        ("conv1x1", torch.randn(4, 5, 3, 3), "maps", "teacher_features must be a torch.Tensor"),
    ],
)
def test_hint_unbridgeable_inputs_raise(adapter, s, t, needle):
    with pytest.raises(ValueError, match=needle):
        fastkd.HintLoss(5, 12, adapter=adapter)(s, t)


@pytest.mark.parametrize(
    "args,kwargs,needle",
    [
        ((0, 4), {}, "student_channels"),
        ((4, 2.5), {}, "teacher_channels"),
        ((4, 4), {"adapter": "mlp"}, "adapter"),
    ],
)
def test_hint_bad_construction(args, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        fastkd.HintLoss(*args, **kwargs)
