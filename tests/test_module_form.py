"""Module forms built on fastkd._module_form.LossModule: same defaults, same results as their functions."""

from __future__ import annotations

import inspect

import pytest
import torch

import fastkd
from fastkd._module_form import LossModule

MODULES = sorted(
    (obj for obj in vars(fastkd).values() if isinstance(obj, type) and issubclass(obj, LossModule)),
    key=lambda cls: cls.__name__,
)


def test_the_module_forms_are_found():
    names = {cls.__name__ for cls in MODULES}
    assert {"PKTLoss", "SPLoss", "CCLoss", "RKDLoss", "MMDLoss", "InfoNCELoss", "DKDLoss", "NSTLoss"} <= names


@pytest.mark.parametrize("module_class", MODULES, ids=lambda cls: cls.__name__)
def test_defaults_are_the_functions_defaults(module_class):
    """An option left out gives the function's own default, so module and function cannot drift apart."""
    init = inspect.signature(module_class.__init__).parameters
    function = inspect.signature(module_class.loss_function).parameters
    options = [name for name in init if name != "self"]
    assert options, module_class
    for name in options:
        assert name in function, f"{module_class.__name__} takes {name!r}, which its function does not"
        assert init[name].default == function[name].default, name
    assert module_class().options() == {name: init[name].default for name in options}


def test_options_are_attributes_read_at_call_time():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    module = fastkd.RKDLoss(backend="reference")
    module.angle_weight = 0.0
    expected = fastkd.rkd_loss(s, t, angle_weight=0.0, backend="reference")
    torch.testing.assert_close(module(s, t), expected, rtol=0, atol=0)
    assert "angle_weight=0.0" in repr(module)


def test_per_call_arguments_reach_the_function():
    torch.manual_seed(1)
    q, k = torch.randn(5, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    labels = torch.tensor([6, 0, 3, 3, 1])
    module = fastkd.InfoNCELoss(temperature=0.5, backend="reference")
    expected = fastkd.info_nce(q, k, temperature=0.5, labels=labels, backend="reference")
    torch.testing.assert_close(module(q, k, labels), expected, rtol=0, atol=0)
    assert not torch.equal(module(q, k), expected)  # the default labels (the diagonal) differ from these


def test_process_group_is_not_printed():
    assert "process_group" not in repr(fastkd.MMDLoss())
    assert "gather=False" in repr(fastkd.MMDLoss())
