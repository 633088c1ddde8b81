"""Cross-tokenizer alignment (docs/spec.md §1.15): align_by_offsets and merge_aligned.

Hand-worked groups and merged rows, property tests over random segmentations
of one text, a loop oracle for both functions, float64 gradcheck of the merge,
empty sequences, and a ValueError naming the argument for every bad input.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkd
from tests.helpers import DEVICE


def groups_of(alignment):
    return alignment.student_groups.tolist(), alignment.teacher_groups.tolist()


# ---------------------------------------------------------------------------
# align_by_offsets: hand-worked groups


@pytest.mark.parametrize(
    "student,teacher,expected_student,expected_teacher",
    [
        # "the cat": "the" | " c" "at"  vs  "the" | " cat"
        ([(0, 3), (3, 5), (5, 8)], [(0, 3), (3, 8)], [[0, 1], [1, 3]], [[0, 1], [1, 2]]),
        # the same tokenization: one group per token
        ([(0, 2), (2, 4)], [(0, 2), (2, 4)], [[0, 1], [1, 2]], [[0, 1], [1, 2]]),
        # boundaries that never meet before the end: one group of everything
        ([(0, 2), (2, 5), (5, 6)], [(0, 3), (3, 6)], [[0, 3]], [[0, 2]]),
        # three-way split against two-way: ends {1, 4, 6} and {4, 6} meet at 4 and 6
        ([(0, 1), (1, 4), (4, 6)], [(0, 4), (4, 6)], [[0, 2], [2, 3]], [[0, 1], [1, 2]]),
        # a gap (the student's tokenizer leaves the space at 5 out of every token)
        ([(0, 5), (6, 11)], [(0, 5), (5, 11)], [[0, 1], [1, 2]], [[0, 1], [1, 2]]),
        # one token each
        ([(2, 9)], [(2, 9)], [[0, 1]], [[0, 1]]),
    ],
)
def test_hand_worked_groups(student, teacher, expected_student, expected_teacher):
    alignment = fastkd.align_by_offsets(student, teacher)
    assert isinstance(alignment, fastkd.TokenAlignment)
    assert groups_of(alignment) == (expected_student, expected_teacher)
    assert alignment.num_groups == len(expected_student)
    assert alignment.student_groups.dtype == torch.int64
    # symmetric: swapping the sides swaps the groups
    swapped = fastkd.align_by_offsets(teacher, student)
    assert groups_of(swapped) == (expected_teacher, expected_student)


@pytest.mark.parametrize(
    "student,teacher,expected_student,expected_teacher",
    [
        # a BOS (0, 0) only the student has joins the first group
        ([(0, 0), (0, 3), (3, 5)], [(0, 3), (3, 5)], [[0, 2], [2, 3]], [[0, 1], [1, 2]]),
        # a BOS on both sides pairs up in a group of its own
        ([(0, 0), (0, 5)], [(0, 0), (0, 2), (2, 5)], [[0, 1], [1, 2]], [[0, 1], [1, 3]]),
        # an EOS (n, n) on both sides: a group of its own
        ([(0, 2), (2, 4), (4, 4)], [(0, 4), (4, 4)], [[0, 2], [2, 3]], [[0, 1], [1, 2]]),
        # an EOS only the teacher has, at the end of the text: in no group
        ([(0, 2), (2, 4)], [(0, 4), (4, 4)], [[0, 2]], [[0, 1]]),
        # two EOS against one: the second is in no group
        ([(0, 4), (4, 4), (4, 4)], [(0, 4), (4, 4)], [[0, 1], [1, 2]], [[0, 1], [1, 2]]),
        # a zero-width token inside the text that only the student has joins the group after it
        ([(0, 3), (3, 3), (3, 5)], [(0, 3), (3, 5)], [[0, 1], [1, 3]], [[0, 1], [1, 2]]),
        # ... also where its offset is no common boundary (inside the teacher's token)
        ([(0, 2), (2, 2), (2, 5)], [(0, 5)], [[0, 3]], [[0, 1]]),
        # zero-width tokens at the same inner boundary on both sides pair up
        ([(0, 3), (3, 3), (3, 5)], [(0, 3), (3, 3), (3, 5)], [[0, 1], [1, 2], [2, 3]],
         [[0, 1], [1, 2], [2, 3]]),
        # only zero-width tokens, no text
        ([(0, 0)], [(0, 0), (0, 0)], [[0, 1]], [[0, 1]]),
    ],
)
def test_zero_width_tokens(student, teacher, expected_student, expected_teacher):
    assert groups_of(fastkd.align_by_offsets(student, teacher)) == (expected_student, expected_teacher)


def test_tensor_inputs_of_any_integer_dtype():
    student = torch.tensor([[0, 3], [3, 5], [5, 8]], dtype=torch.int32)
    teacher = torch.tensor([[0, 3], [3, 8]], dtype=torch.uint8)
    alignment = fastkd.align_by_offsets(student, teacher)
    assert groups_of(alignment) == ([[0, 1], [1, 3]], [[0, 1], [1, 2]])
    assert alignment.student_groups.device == student.device


@pytest.mark.parametrize("empty", [[], torch.empty(0, 2, dtype=torch.int64), ()])
def test_empty_sequences_give_no_groups(empty):
    alignment = fastkd.align_by_offsets(empty, empty)
    assert alignment.num_groups == 0
    assert alignment.student_groups.shape == (0, 2) and alignment.teacher_groups.shape == (0, 2)


# ---------------------------------------------------------------------------
# align_by_offsets: properties over random segmentations of one text


def walk_oracle(student, teacher):
    """Two pointers over the end offsets: advance the side whose token ends first; a
    group closes when both current tokens end at the same offset. Tokens left
    after the last group belong to none."""
    student_groups, teacher_groups = [], []
    i = j = i0 = j0 = 0
    while i < len(student) and j < len(teacher):
        if student[i][1] < teacher[j][1]:
            i += 1
        elif student[i][1] > teacher[j][1]:
            j += 1
        else:
            i, j = i + 1, j + 1
            student_groups.append([i0, i])
            teacher_groups.append([j0, j])
            i0, j0 = i, j
    return student_groups, teacher_groups


def spans(cuts, length):
    points = [0, *sorted(cuts), length]
    return list(zip(points, points[1:], strict=False))


@st.composite
def segmentations(draw, zero_width=False, gaps=False):
    """Two segmentations of a text of ``length`` characters; optionally with
    gaps (a token's start moved right, text in no token) and with zero-width
    tokens inserted at either end of any gap or token boundary (both ends of
    the text included)."""
    length = draw(st.integers(1, 30))
    inner = st.sets(st.integers(1, length - 1), max_size=length - 1) if length > 1 else st.just(set())
    sides = []
    for _ in range(2):
        tokens = spans(draw(inner), length)
        if gaps:
            tokens = [tokens[0]] + [(draw(st.integers(start, end - 1)), end) for start, end in tokens[1:]]
        if zero_width:
            for _ in range(draw(st.integers(0, 4))):
                at = draw(st.integers(0, len(tokens)))
                candidates = {tokens[at - 1][1] if at > 0 else 0}
                if 0 < at < len(tokens):
                    candidates.add(tokens[at][0])
                offset = draw(st.sampled_from(sorted(candidates)))
                tokens.insert(at, (offset, offset))
        sides.append(tokens)
    return sides


@settings(max_examples=150)
@given(segmentations())
def test_groups_partition_both_sequences_into_equal_spans(sides):
    student, teacher = sides
    s_groups, t_groups = groups_of(fastkd.align_by_offsets(student, teacher))
    for groups, tokens in ((s_groups, student), (t_groups, teacher)):
        # consecutive, non-empty, covering every token
        assert groups[0][0] == 0 and groups[-1][1] == len(tokens)
        assert all(a < b for a, b in groups)
        assert all(groups[g][1] == groups[g + 1][0] for g in range(len(groups) - 1))
    for (sa, sb), (ta, tb) in zip(s_groups, t_groups, strict=True):
        assert (student[sa][0], student[sb - 1][1]) == (teacher[ta][0], teacher[tb - 1][1])
    # minimal: the group ends are exactly the offsets where both sides have a token boundary
    group_ends = {student[sb - 1][1] for _, sb in s_groups}
    assert group_ends == {end for _, end in student} & {end for _, end in teacher}


@settings(max_examples=200)
@given(segmentations(zero_width=True, gaps=True))
def test_zero_width_tokens_and_gaps_follow_the_walk(sides):
    student, teacher = sides
    assert groups_of(fastkd.align_by_offsets(student, teacher)) == walk_oracle(student, teacher)


@settings(max_examples=100)
@given(segmentations(), st.data())
def test_gaps_keep_the_groups(sides, data):
    """Leaving text out of tokens (shrinking a span from the left, as tokenizers
    that drop spaces do) moves no group boundary."""
    student, teacher = sides
    expected = groups_of(fastkd.align_by_offsets(student, teacher))
    shrunk = [(start + data.draw(st.integers(0, end - start - 1)) if i > 0 else start, end)
              for i, (start, end) in enumerate(student)]
    assert groups_of(fastkd.align_by_offsets(shrunk, teacher)) == expected


# ---------------------------------------------------------------------------
# align_by_offsets: bad input


@pytest.mark.parametrize(
    "student,teacher,needle",
    [
        ([(0.0, 3.0)], [(0, 3)], "student_offsets must hold integers"),
        ([(0, 3)], torch.tensor([[0.0, 3.0]]), "teacher_offsets must hold integers"),
        ([(0, 3)], torch.tensor([[True, True]]), "teacher_offsets must hold integers"),
        ([(0, 3, 4)], [(0, 3)], r"student_offsets must have shape \(T, 2\)"),
        ([0, 3], [(0, 3)], r"student_offsets must have shape \(T, 2\)"),
        ([(0, 3)], torch.zeros(1, 1, 2, dtype=torch.long), r"teacher_offsets must have shape \(T, 2\)"),
        ("abc", [(0, 3)], "student_offsets must be a"),
        ([(0, 3), (3,)], [(0, 3)], "student_offsets must be a"),
        ([(-1, 3)], [(-1, 3)], r"student_offsets\[0\] = \(-1, 3\): offsets must be >= 0"),
        ([(0, 3), (4, 2)], [(0, 3)], r"student_offsets\[1\] = \(4, 2\): its end is before its start"),
        ([(0, 3)], [(0, 2), (1, 3)], r"teacher_offsets\[1\] = \(1, 3\) starts before the end of token 0"),
        # HF tokenizers' (0, 0) span of a special token after the text: out of order
        ([(0, 3), (0, 0)], [(0, 3)], r"student_offsets\[1\] = \(0, 0\) starts before the end"),
        ([(0, 3), (3, 5)], [(0, 3), (3, 6)],
         r"teacher_offsets covers \[0, 6\) but student_offsets covers \[0, 5\)"),
        ([(1, 3)], [(0, 3)], r"teacher_offsets covers \[0, 3\) but student_offsets covers \[1, 3\)"),
        ([], [(0, 3)], "student_offsets has 0 tokens and teacher_offsets 1"),
        ([(0, 0)], [], "student_offsets has 1 tokens and teacher_offsets 0"),
        ([(0, 2**62)], [(0, 2**62)], "too large"),
    ],
)
def test_bad_offsets_raise_naming_the_argument(student, teacher, needle):
    with pytest.raises(ValueError, match=needle):
        fastkd.align_by_offsets(student, teacher)


# ---------------------------------------------------------------------------
# merge_aligned: hand-worked rows

# Rows of probabilities, passed as their logarithms (log-probabilities are
# logits whose softmax is themselves).
PROBS = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.5, 0.25, 0.25]], dtype=torch.float64)
IDS = torch.tensor([0, 1, 2])


def test_first_keeps_the_first_distribution_times_the_later_tokens():
    merged = fastkd.merge_aligned(PROBS.log(), IDS, torch.tensor([[0, 3]]), strategy="first")
    # p_0 · p_1[1] · p_2[2] = [0.6, 0.3, 0.1] · 0.5 · 0.25
    expected = torch.tensor([[0.075, 0.0375, 0.0125]], dtype=torch.float64)
    torch.testing.assert_close(merged.exp(), expected)
    assert merged.dtype == torch.float64


def test_last_keeps_the_last_distribution_times_the_earlier_tokens():
    merged = fastkd.merge_aligned(PROBS.log(), IDS, torch.tensor([[0, 3]]), strategy="last")
    # p_2 · p_0[0] · p_1[1] = [0.5, 0.25, 0.25] · 0.6 · 0.5
    expected = torch.tensor([[0.15, 0.075, 0.075]], dtype=torch.float64)
    torch.testing.assert_close(merged.exp(), expected)


def test_several_groups_one_token_groups_and_rows_left_out():
    groups = torch.tensor([[0, 1], [1, 3], [2, 3]])
    merged = fastkd.merge_aligned(PROBS.log(), IDS, groups).exp()
    expected = torch.stack([PROBS[0], PROBS[1] * 0.25, PROBS[2]])  # p_1 · p_2[2] for [1, 3)
    torch.testing.assert_close(merged, expected)
    merged = fastkd.merge_aligned(PROBS.log(), IDS, torch.tensor([[1, 2]]), strategy="last").exp()
    torch.testing.assert_close(merged, PROBS[1:2])


def test_temperature_applies_before_the_merge():
    # at T = 2: softmax(log p / 2) ∝ sqrt(p): [0.64, 0.36] → [0.8, 0.6] / 1.4,
    # and p_1[1] = 0.8 / 1.4 for [0.36, 0.64]
    probs = torch.tensor([[0.64, 0.36], [0.36, 0.64]], dtype=torch.float64)
    merged = fastkd.merge_aligned(probs.log(), torch.tensor([0, 1]), torch.tensor([[0, 2]]), temperature=2.0)
    expected = torch.tensor([[4 / 7, 3 / 7]], dtype=torch.float64) * (4 / 7)
    torch.testing.assert_close(merged.exp(), expected)
    # logits and log-probabilities give the same rows
    shifted = fastkd.merge_aligned(probs.log() + 5.0, torch.tensor([0, 1]), torch.tensor([[0, 2]]),
                                   temperature=2.0)
    torch.testing.assert_close(shifted, merged)


def test_scalar_probabilities_are_floored():
    probs = torch.tensor([[0.5, 0.5], [1 - 1e-12, 1e-12]], dtype=torch.float64)
    ids, group = torch.tensor([0, 1]), torch.tensor([[0, 2]])
    merged = fastkd.merge_aligned(probs.log(), ids, group)
    torch.testing.assert_close(merged, (probs[0] * 1e-8).log().unsqueeze(0))
    exact = fastkd.merge_aligned(probs.log(), ids, group, min_token_probability=0.0)
    torch.testing.assert_close(exact, (probs[0] * 1e-12).log().unsqueeze(0))
    # a floored probability passes no gradient to its row
    logits = probs.log().requires_grad_(True)
    fastkd.merge_aligned(logits, ids, group).sum().backward()
    assert torch.count_nonzero(logits.grad[1]) == 0
    # a -inf logit at an actual token: the floor keeps the row finite, no floor gives -inf
    logits = torch.tensor([[0.0, 0.0], [0.0, -math.inf]], dtype=torch.float64)
    assert torch.isfinite(fastkd.merge_aligned(logits, ids, group)).all()
    assert torch.isneginf(fastkd.merge_aligned(logits, ids, group, min_token_probability=0.0)).all()


def test_renormalising_a_row_returns_the_base_distribution():
    logits = torch.randn(5, 7, dtype=torch.float64)
    ids = torch.randint(0, 7, (5,))
    groups = torch.tensor([[0, 2], [2, 5]])
    for strategy, base in (("first", [0, 2]), ("last", [1, 4])):
        merged = fastkd.merge_aligned(logits, ids, groups, strategy=strategy)
        torch.testing.assert_close(merged.softmax(-1), logits[base].softmax(-1))


# ---------------------------------------------------------------------------
# merge_aligned: against a loop over groups, gradients, dtypes, empty input


def merge_oracle(logits, ids, groups, strategy, temperature, floor):
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    rows = []
    for a, b in groups.tolist():
        base, others = (a, range(a + 1, b)) if strategy == "first" else (b - 1, range(a, b - 1))
        row = probs[base]
        for i in others:
            row = row * probs[i, ids[i]].clamp_min(floor)
        rows.append(row)
    return torch.stack(rows) if rows else probs[:0]


@settings(max_examples=60)
@given(
    st.integers(1, 9), st.integers(1, 6), st.sampled_from(["first", "last"]),
    st.sampled_from([1.0, 0.5, 3.0]), st.sampled_from([1e-8, 0.0, 0.05]), st.data(),
)
def test_merge_matches_a_loop_over_groups(num_tokens, vocab, strategy, temperature, floor, data):
    seed = data.draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, vocab, generator=generator, dtype=torch.float64) * 3
    ids = torch.randint(0, vocab, (num_tokens,), generator=generator)
    bounds = st.tuples(st.integers(0, num_tokens - 1), st.integers(1, num_tokens))
    pairs = data.draw(st.lists(bounds, max_size=6))
    groups = torch.tensor([[min(a, b - 1), max(a + 1, b)] for a, b in pairs], dtype=torch.long).reshape(-1, 2)
    merged = fastkd.merge_aligned(logits, ids, groups, strategy=strategy, temperature=temperature,
                                  min_token_probability=floor)
    expected = merge_oracle(logits, ids, groups, strategy, temperature, floor)
    torch.testing.assert_close(merged.exp(), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("strategy", ["first", "last"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_gradcheck_float64(strategy, temperature):
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([1, 4, 0, 2, 3, 1])
    groups = torch.tensor([[0, 1], [1, 4], [4, 6], [2, 5]])  # one-token, three-token, two-token, overlapping
    assert torch.autograd.gradcheck(
        lambda z: fastkd.merge_aligned(z, ids, groups, strategy=strategy, temperature=temperature), (logits,))
    assert torch.autograd.gradgradcheck(
        lambda z: fastkd.merge_aligned(z, ids, groups, strategy=strategy, temperature=temperature), (logits,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_logits_merge_in_float32(dtype):
    logits = torch.randn(4, 6).to(dtype).requires_grad_(True)
    ids, groups = torch.tensor([0, 1, 2, 3]), torch.tensor([[0, 2], [2, 4]])
    merged = fastkd.merge_aligned(logits, ids, groups)
    assert merged.dtype == torch.float32
    expected = fastkd.merge_aligned(logits.detach().double(), ids, groups)
    torch.testing.assert_close(merged.double(), expected, rtol=1e-5, atol=1e-5)
    merged.sum().backward()
    assert logits.grad.dtype == dtype and logits.grad.shape == logits.shape


def test_no_groups_give_an_empty_differentiable_result():
    for num_tokens in (0, 3):
        logits = torch.randn(num_tokens, 5, requires_grad=True)
        merged = fastkd.merge_aligned(logits, torch.zeros(num_tokens, dtype=torch.long),
                                      torch.empty(0, 2, dtype=torch.long))
        assert merged.shape == (0, 5)
        merged.sum().backward()
        assert logits.grad.shape == logits.shape and torch.count_nonzero(logits.grad) == 0


def test_logits_to_aligned_rows():
    """The documented path: align the two tokenizations, merge each side."""
    student_offsets = [(0, 3), (3, 5), (5, 8), (8, 9)]  # "the" " c" "at" "!"
    teacher_offsets = [(0, 3), (3, 8), (8, 9), (9, 9)]  # "the" " cat" "!" EOS
    student_logits = torch.randn(4, 11, dtype=torch.float64, requires_grad=True)
    teacher_logits = torch.randn(4, 7, dtype=torch.float64)
    student_ids, teacher_ids = torch.tensor([3, 1, 4, 1]), torch.tensor([5, 2, 6, 0])
    alignment = fastkd.align_by_offsets(student_offsets, teacher_offsets)
    student_rows = fastkd.merge_aligned(student_logits, student_ids, alignment.student_groups)
    teacher_rows = fastkd.merge_aligned(teacher_logits, teacher_ids, alignment.teacher_groups)
    assert student_rows.shape == (3, 11) and teacher_rows.shape == (3, 7)  # the teacher's EOS is in no group
    p = student_logits.detach().softmax(-1)
    torch.testing.assert_close(student_rows[1].exp(), p[1] * p[2, 4])  # " c" "at" ↔ " cat"
    student_rows.exp().sum().backward()
    assert student_logits.grad is not None


# ---------------------------------------------------------------------------
# merge_aligned: bad input

LOGITS = torch.randn(3, 4)
TOKENS = torch.tensor([0, 1, 2])
GROUPS = torch.tensor([[0, 2], [2, 3]])


@pytest.mark.parametrize(
    "args,kwargs,needle",
    [
        ((LOGITS.long(), TOKENS, GROUPS), {}, "logits must have dtype"),
        ((LOGITS[0], TOKENS, GROUPS), {}, "logits must have at least 2"),
        ((LOGITS.unsqueeze(0), TOKENS, GROUPS), {}, r"logits must have shape \(T, V\)"),
        ((LOGITS[:, :0], TOKENS, GROUPS), {}, r"logits must have shape \(T, V\) with V >= 1"),
        ((LOGITS, [0, 1, 2], GROUPS), {}, "token_ids must be a torch.Tensor"),
        ((LOGITS, TOKENS.double(), GROUPS), {}, "token_ids must be an integer tensor"),
        ((LOGITS, TOKENS[:2], GROUPS), {}, r"token_ids must have shape \(3,\)"),
        ((LOGITS, torch.tensor([0, 4, 1]), GROUPS), {}, r"token_ids\[1\] = 4 is outside \[0, 4\)"),
        ((LOGITS, torch.tensor([0, -100, 1]), GROUPS), {}, r"token_ids\[1\] = -100"),
        ((LOGITS, TOKENS, [[0, 3]]), {}, "groups must be a"),
        ((LOGITS, TOKENS, GROUPS.double()), {}, "groups must hold integers"),
        ((LOGITS, TOKENS, GROUPS[0]), {}, r"groups must have shape \(G, 2\)"),
        ((LOGITS, TOKENS, torch.tensor([[0, 2], [2, 2]])), {}, r"groups\[1\] = \(2, 2\) is not a non-empty"),
        ((LOGITS, TOKENS, torch.tensor([[3, 1]])), {}, r"groups\[0\] = \(3, 1\)"),
        ((LOGITS, TOKENS, torch.tensor([[1, 4]])), {}, r"groups\[0\] = \(1, 4\) .* within the 3 rows"),
        ((LOGITS, TOKENS, torch.tensor([[-1, 1]])), {}, r"groups\[0\] = \(-1, 1\)"),
        ((LOGITS, TOKENS, GROUPS), {"strategy": "bayesian"}, "strategy must be one of"),
        ((LOGITS, TOKENS, GROUPS), {"temperature": 0.0}, "temperature must be > 0"),
        ((LOGITS, TOKENS, GROUPS), {"temperature": math.nan}, "temperature must be finite"),
        ((LOGITS, TOKENS, GROUPS), {"temperature": True}, "temperature must be a real number"),
        ((LOGITS, TOKENS, GROUPS), {"min_token_probability": -0.1}, "min_token_probability must be >= 0"),
        ((LOGITS, TOKENS, GROUPS), {"min_token_probability": 1.0}, "min_token_probability must be < 1"),
    ],
)
def test_bad_merge_arguments_raise_naming_the_argument(args, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        fastkd.merge_aligned(*args, **kwargs)


# ---------------------------------------------------------------------------
# devices and layouts


def test_device_tensors_match_the_cpu_result():
    student = torch.tensor([[0, 0], [0, 3], [3, 5], [5, 8], [8, 8]], device=DEVICE)
    teacher = [(0, 3), (3, 8), (8, 8)]  # a sequence of pairs goes to the other side's device
    alignment = fastkd.align_by_offsets(student, teacher)
    assert alignment.student_groups.device == DEVICE and alignment.teacher_groups.device == DEVICE
    expected = fastkd.align_by_offsets(student.cpu(), teacher)
    assert groups_of(alignment) == groups_of(expected)
    logits = torch.randn(5, 9, dtype=torch.float64, device=DEVICE, requires_grad=True)
    ids = torch.tensor([2, 0, 5, 8, 1], device=DEVICE)
    for strategy in ("first", "last"):
        merged = fastkd.merge_aligned(logits, ids, alignment.student_groups, strategy=strategy)
        reference = fastkd.merge_aligned(logits.detach().cpu(), ids.cpu(), expected.student_groups,
                                         strategy=strategy)
        torch.testing.assert_close(merged.detach().cpu(), reference)
        merged.sum().backward()


def test_non_contiguous_logits():
    logits = torch.randn(6, 4, dtype=torch.float64).t()  # (4, 6), transposed
    ids, groups = torch.tensor([5, 0, 3, 2]), torch.tensor([[0, 3], [3, 4]])
    merged = fastkd.merge_aligned(logits, ids, groups, strategy="last", temperature=0.7)
    torch.testing.assert_close(merged, fastkd.merge_aligned(logits.contiguous(), ids, groups, strategy="last",
                                                            temperature=0.7))
