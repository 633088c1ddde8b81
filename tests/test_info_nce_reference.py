"""The InfoNCE reference (docs/spec.md §4) against explicit loops, cross-entropy and CLIP."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastkd.reference.info_nce import info_nce
from tests.helpers import DEVICE
from tests.reference_checks import (
    LOSS_DTYPES,
    check_loss_dtype_and_gradient_dtype,
    check_nan_input_gives_nan_loss,
    check_non_contiguous_inputs,
    close,
    dot,
    randn,
)

# ---- loop oracle: one row at a time, in Python floats ------------------------------------


def loop_info_nce(q, k, temperature, labels):
    q, k = q.tolist(), k.tolist()
    total = 0.0
    for i, row in enumerate(q):
        logits = [dot(row, key) / temperature for key in k]
        top = max(logits)
        lse = top + math.log(sum(math.exp(z - top) for z in logits))
        total += lse - logits[labels[i]]
    return total / len(q)


# ---- InfoNCE --------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "m"), ((1, 1), (4, 4), (3, 7)))
@pytest.mark.parametrize("temperature", (0.07, 1.0, 3.5))
def test_info_nce_matches_loops_and_cross_entropy(n, m, temperature):
    q, k = randn(n, 5), randn(m, 5)
    got = info_nce(q, k, temperature=temperature)
    close(got, loop_info_nce(q, k, temperature, list(range(n))))
    close(got, F.cross_entropy(q @ k.T / temperature, torch.arange(n, device=DEVICE)).item())


def test_info_nce_single_pair_is_zero():
    q = randn(1, 3)
    assert info_nce(q, randn(1, 3)).item() == 0.0


def test_info_nce_labels():
    q, k = randn(5, 4), randn(3, 4)  # more queries than keys is fine with labels
    labels = torch.tensor([2, 0, 0, 1, 2], device=DEVICE)
    got = info_nce(q, k, temperature=0.5, labels=labels)
    close(got, loop_info_nce(q, k, 0.5, labels.tolist()))
    close(got, F.cross_entropy(q @ k.T / 0.5, labels).item())
    close(info_nce(q, k, labels=labels.int()), info_nce(q, k, labels=labels).item())


def test_info_nce_normalize():
    q, k = randn(4, 6), randn(6, 6)
    close(info_nce(q, k, normalize=True, temperature=0.2),
          info_nce(F.normalize(q, dim=1), F.normalize(k, dim=1), temperature=0.2).item())


def test_info_nce_symmetric_is_clip():
    """CLIP: logits = s · img txtᵀ with s = 1/τ, (CE(logits, i) + CE(logitsᵀ, i)) / 2."""
    image, text = randn(6, 8), randn(6, 8)
    image_n, text_n = image / image.norm(dim=1, keepdim=True), text / text.norm(dim=1, keepdim=True)
    logits_per_image = image_n @ text_n.T / 0.07
    target = torch.arange(6, device=DEVICE)
    clip = (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_image.T, target)) / 2
    close(info_nce(image, text, symmetric=True, normalize=True), clip.item())
    forward = loop_info_nce(image, text, 1.0, list(range(6)))
    backward = loop_info_nce(text, image, 1.0, list(range(6)))
    close(info_nce(image, text, temperature=1.0, symmetric=True), (forward + backward) / 2)


@pytest.mark.parametrize(
    "kwargs",
    ({}, {"symmetric": True}, {"normalize": True, "temperature": 0.3}, {"labels": [1, 1, 0, 3]}),
    ids=str,
)
def test_info_nce_gradcheck(kwargs):
    kwargs = dict(kwargs)
    if "labels" in kwargs:
        kwargs["labels"] = torch.tensor(kwargs["labels"], device=DEVICE)
    q, k = randn(4, 3, requires_grad=True), randn(4, 3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: info_nce(a, b, **kwargs), (q, k))


# ---- shared contract: dtypes, NaN, layout -------------------------------------------------


CALL = (lambda a, b: info_nce(a, b, normalize=True), (3, 4), (5, 4))


@pytest.mark.parametrize(("dtype", "loss_dtype"), LOSS_DTYPES, ids=str)
def test_loss_dtype_and_gradient_dtype(dtype, loss_dtype):
    check_loss_dtype_and_gradient_dtype(*CALL, dtype, loss_dtype)


def test_nan_input_gives_nan_loss():
    check_nan_input_gives_nan_loss(*CALL)


def test_non_contiguous_inputs():
    check_non_contiguous_inputs(*CALL)


# ---- invalid arguments ------------------------------------------------------------------------


def _bad_cases():
    x, y = randn(4, 3), randn(5, 3)
    lab = torch.tensor([0, 1, 2, 4], device=DEVICE)
    above, below = torch.tensor([0, 1, 2, 5], device=DEVICE), torch.tensor([0, -1, 2, 3], device=DEVICE)
    return [
        (r"^q must be a torch\.Tensor", lambda: info_nce(3.0, x)),
        (r"^q must have dtype in", lambda: info_nce(x.to(torch.int32), y)),
        (r"^k has feature dim 2 but q has 3", lambda: info_nce(x, randn(5, 2))),
        (r"^k must have at least as many rows as q", lambda: info_nce(x, randn(3, 3))),
        (r"^temperature must be > 0", lambda: info_nce(x, y, temperature=0.0)),
        (r"^temperature must be > 0", lambda: info_nce(x, y, temperature=-0.07)),
        (r"^temperature must be finite", lambda: info_nce(x, y, temperature=float("inf"))),
        (r"^labels must lie in \[0, M\)", lambda: info_nce(x, y, labels=above)),
        (r"^labels must lie in \[0, M\)", lambda: info_nce(x, y, labels=below)),
        (r"^labels must be an integer tensor", lambda: info_nce(x, y, labels=lab.double())),
        (r"^labels shape \(3,\) must be \(N,\)", lambda: info_nce(x, y, labels=lab[:3])),
        (r"^labels must be a torch\.Tensor", lambda: info_nce(x, y, labels=[0, 1, 2, 3])),
        (r"^labels must be None when symmetric=True",
         lambda: info_nce(x, randn(4, 3), labels=lab.clamp(max=3), symmetric=True)),
        (r"^symmetric=True needs as many rows in k as in q", lambda: info_nce(x, y, symmetric=True)),
        (r"^normalize must be a bool", lambda: info_nce(x, y, normalize="yes")),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_invalid_arguments_raise_value_error_naming_the_argument(case):
    """Each message starts with the argument's name and says what is wrong."""
    pattern, call = _bad_cases()[case]
    with pytest.raises(ValueError, match=pattern):
        call()
