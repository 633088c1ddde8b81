"""A teacher vocabulary padded beyond the student's (same tokenizer, e.g. 152064 vs 151936 rows):
every logit entry point names both sizes and tells how to slice (docs/spec.md §1.4)."""

import pytest
import torch

import fastkd

V_STUDENT, V_TEACHER = 12, 16


def test_divergence_names_both_sizes_and_the_slice():
    s = torch.randn(3, 5, V_STUDENT)
    t = torch.randn(3, 5, V_TEACHER)
    expected = rf"{V_TEACHER}.*{V_STUDENT}.*teacher_logits\[\.\.\., :{V_STUDENT}\]"
    with pytest.raises(ValueError, match=expected):
        fastkd.divergence(s, t)


def test_divergence_after_the_advised_slice_ignores_padding_ids():
    s = torch.randn(4, V_STUDENT, dtype=torch.float64)
    t = torch.randn(4, V_TEACHER, dtype=torch.float64)
    t[:, V_STUDENT:] = float("-inf")  # padding ids: no teacher mass
    padded_student = torch.cat([s, torch.full((4, V_TEACHER - V_STUDENT), float("-inf"), dtype=s.dtype)], -1)
    expected = fastkd.divergence(padded_student, t, backend="reference")
    torch.testing.assert_close(fastkd.divergence(s, t[..., :V_STUDENT]), expected)


def test_student_larger_than_teacher_is_a_plain_shape_error():
    with pytest.raises(ValueError, match="does not match"):
        fastkd.divergence(torch.randn(2, V_TEACHER), torch.randn(2, V_STUDENT))


def test_fused_linear_names_both_sizes_and_the_slice():
    h = torch.randn(6, 8)
    s_w, t_w = torch.randn(V_STUDENT, 8), torch.randn(V_TEACHER, 8)
    with pytest.raises(ValueError, match=rf"{V_TEACHER}.*{V_STUDENT}.*teacher_weight\[:{V_STUDENT}\]"):
        fastkd.fused_linear_divergence(h, s_w, h, t_w)


def test_topk_ids_beyond_the_student_vocabulary_name_the_slice():
    s = torch.randn(4, V_STUDENT)
    index = torch.tensor([[0, 1, V_TEACHER - 1]] * 4)
    values = torch.randn(4, 3)
    with pytest.raises(ValueError, match=rf"outside \[0, {V_STUDENT}\).*padding"):
        fastkd.topk_divergence(s, index, values)
