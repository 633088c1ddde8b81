"""The contract every pairwise-relation reference keeps (RKD, PKT, SP, CC; docs/spec.md §2): flattened
samples, dtypes, gradients (the teacher gets none), edge cases and the argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from fastkd.reference import gram_relation, rkd
from tests.pairwise_helpers import reference_embeddings

LOSSES = {
    "rkd_distance": rkd.rkd_distance,
    "rkd_angle": rkd.rkd_angle,
    "rkd_loss": rkd.rkd_loss,
    "pkt_loss": gram_relation.pkt_loss,
    "sp_loss": gram_relation.sp_loss,
    "cc_loss": gram_relation.cc_loss,
}


@pytest.mark.parametrize("name", LOSSES)
def test_samples_are_flattened(name):
    s, t = reference_embeddings(5, 12), reference_embeddings(5, 8)
    flat = LOSSES[name](s, t)
    assert torch.equal(LOSSES[name](s.reshape(5, 3, 2, 2), t.reshape(5, 2, 4)), flat)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16, torch.float16), ids=str)
def test_loss_and_gradient_dtypes(name, dtype):
    s = reference_embeddings(6, 4, dtype).requires_grad_(True)
    loss = LOSSES[name](s, reference_embeddings(6, 3, dtype))
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    loss.backward()
    assert s.grad.dtype == dtype


@pytest.mark.parametrize("name", LOSSES)
def test_gradcheck_student(name):
    s = reference_embeddings(5, 3).requires_grad_(True)
    t = reference_embeddings(5, 4)
    assert torch.autograd.gradcheck(lambda x: LOSSES[name](x, t), (s,))


@pytest.mark.parametrize("name", LOSSES)
def test_teacher_gets_no_gradient(name):
    s = reference_embeddings(5, 3).requires_grad_(True)
    t = reference_embeddings(5, 3).requires_grad_(True)
    LOSSES[name](s, t).backward()
    assert t.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", LOSSES)
def test_identical_student_and_teacher_give_zero(name):
    s = reference_embeddings(5, 3)
    loss = LOSSES[name](s, s.clone())
    assert abs(loss.item()) < 1e-12


@pytest.mark.parametrize("n", (1, 2))
@pytest.mark.parametrize("name", LOSSES)
def test_one_or_two_samples_are_finite(name, n):
    s = reference_embeddings(n, 3).requires_grad_(True)
    loss = LOSSES[name](s, reference_embeddings(n, 4))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("where", ("student", "teacher", "both"))
def test_duplicate_embeddings_are_finite(name, where):
    s, t = reference_embeddings(5, 3), reference_embeddings(5, 3)
    if where in ("student", "both"):
        s[3] = s[1]
    if where in ("teacher", "both"):
        t[4] = t[0]
    s.requires_grad_(True)
    loss = LOSSES[name](s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", LOSSES)
def test_all_samples_identical_is_finite(name):
    s = reference_embeddings(1, 3).expand(4, 3).clone().requires_grad_(True)
    loss = LOSSES[name](s, reference_embeddings(1, 2).expand(4, 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("n", (1, 3))
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("which", ("student", "teacher"))
def test_nan_input_gives_nan_loss(name, which, n):
    s, t = reference_embeddings(n, 3), reference_embeddings(n, 3)
    (s if which == "student" else t)[n - 1, 1] = math.nan
    assert torch.isnan(LOSSES[name](s, t))


def _bad_calls():
    s, t = torch.randn(4, 3), torch.randn(4, 5)
    return [
        ("teacher shape", lambda f: f(s, torch.randn(3, 5))),
        ("student must have dtype", lambda f: f(s.long(), t.long())),
        ("teacher must have dtype", lambda f: f(s, t.int())),
        ("teacher dtype", lambda f: f(s, t.double())),
        ("teacher is on meta", lambda f: f(s, torch.randn(4, 5, device="meta"))),
        ("student must be a torch.Tensor", lambda f: f([[1.0, 2.0]], t)),
        ("teacher must be a torch.Tensor", lambda f: f(s, None)),
        ("student must have at least 2 dim", lambda f: f(torch.randn(4), t)),
        ("student must hold at least one sample", lambda f: f(torch.randn(0, 3), torch.randn(0, 5))),
        ("teacher must have a non-empty feature size", lambda f: f(s, torch.randn(4, 0))),
    ]


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("needle,call", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_input_raises_value_error_naming_the_argument(name, needle, call):
    with pytest.raises(ValueError, match=needle):
        call(LOSSES[name])
