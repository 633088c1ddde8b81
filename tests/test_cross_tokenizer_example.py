"""The pieces of the cross-tokenizer example (examples/cross_tokenizer.py): the
byte spans of BPE tokens, the windows of whole tokens and the rows both models
predict. Its `--smoke` run is in tests/test_examples.py. The tests that train a
BPE need the `tokenizers` library (the `examples` extra): they are marked `examples`."""

from __future__ import annotations

import pytest
import torch

import fastkd
from tests.example_modules import load_example

TEXT = "Return the sum.\n\n    >>> f(x)  # café — 日本 ✓\n\tTabs, CRLF\r\n and  spaces   end"


def test_byte_alphabet_is_one_to_one_on_the_256_bytes():
    example = load_example("cross_tokenizer")
    alphabet = example.byte_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    assert alphabet["a"] == ord("a") and alphabet["Ġ"] == ord(" ") and alphabet["Ċ"] == ord("\n")


@pytest.mark.examples
def test_byte_alphabet_is_the_tokenizers_one():
    from tokenizers import pre_tokenizers

    example = load_example("cross_tokenizer")
    assert set(example.byte_alphabet()) == set(pre_tokenizers.ByteLevel.alphabet())


def test_window_ranges_share_their_boundary_token_and_fit():
    example = load_example("cross_tokenizer")
    lengths = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5])
    ends = lengths.cumsum(0)
    ranges = example.window_ranges(ends, max_bytes=10)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    for first, last in ranges:
        assert last > first and int(ends[last] - starts[first]) <= 10
        # greedy: one more token would not fit
        assert last + 1 == len(ends) or int(ends[last + 1] - starts[first]) > 10
    # a window starts at the previous one's last token, except after the token pairs of more than 10
    # bytes, which start none: (5, 9), (9, 2) (tokens 4, 5, 6) and (6, 5) (tokens 7, 8)
    assert ranges == [(0, 3), (3, 4), (6, 7), (8, 9), (9, 10)]


@pytest.mark.examples
def test_bpe_tokens_spell_the_text_and_their_byte_ends():
    example = load_example("cross_tokenizer")
    texts = [TEXT * 3, "The quick brown fox jumps over the lazy dog. " * 20]
    tokenizer = example.train_bpe(texts, vocab_size=300)
    spelled = example.token_bytes(tokenizer)
    assert len(spelled) == tokenizer.get_vocab_size() > 256 and len(set(spelled)) == len(spelled)
    assert example.token_bytes(example.train_bpe(texts, vocab_size=300)) == spelled  # deterministic
    text = TEXT.encode()
    ids, ends = example.encode(tokenizer, spelled, text)
    assert ids.shape == ends.shape and int(ends[-1]) == len(text)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    pieces = [text[a:b] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]
    assert pieces == [spelled[i] for i in ids]
    # TEXT's multi-byte characters (é, —, 日本, ✓) are spelled byte for byte, however the tokens cut them
    assert (ends > starts).all() and any(len(spelled[i]) > 1 for i in ids)
    shared = example.shared_byte_tokens(spelled)
    assert shared.shape == (256, 2) and sorted(shared[:, 1].tolist()) == list(range(256))
    assert all(spelled[s] == bytes([t]) for s, t in shared.tolist())


@pytest.mark.examples
def test_aligned_groups_pair_each_predicted_token_with_its_bytes():
    """In a batch of windows, align_by_offsets groups each predicted BPE token
    with the teacher's rows of exactly the bytes it spells, and the merged
    rows are the student's log-softmax and the teacher's first-byte row plus
    its later bytes' log-probabilities."""
    example = load_example("cross_tokenizer")
    text = (TEXT * 4).encode()
    tokenizer = example.train_bpe([TEXT * 4], vocab_size=320)
    spelled = example.token_bytes(tokenizer)
    ids, ends = example.encode(tokenizer, spelled, text)
    windows = example.make_windows(ids, ends, text, max_bytes=17)
    assert (windows.n_bytes <= 17).all() and (windows.n_tokens >= 2).all()
    torch.manual_seed(0)
    student = example.TokenLM(len(spelled), dim=8, layers=1, heads=2, context=16)
    teacher = example.tiny_lm.TinyLM(dim=8, layers=1, heads=2, context=16)
    idx = torch.tensor([2, 0, 3])
    p = example.predictions(windows, idx, student, teacher)
    assert p.student_logits.shape[0] == int((windows.n_tokens[idx] - 1).sum())
    assert p.teacher_logits.shape[0] == int((windows.n_bytes[idx] - windows.token_ends[idx, 0]).sum())
    alignment = fastkd.align_by_offsets(p.student_spans, p.teacher_spans)
    assert alignment.num_groups == p.student_logits.shape[0]  # every group is one student token
    for (s0, s1), (t0, t1) in zip(alignment.student_groups.tolist(), alignment.teacher_groups.tolist(),
                                  strict=True):
        assert s1 == s0 + 1 and bytes(p.teacher_ids[t0:t1].tolist()) == spelled[int(p.student_ids[s0])]
    student_rows, teacher_rows = example.aligned_rows(p)
    torch.testing.assert_close(student_rows, p.student_logits.log_softmax(-1))
    log_q = p.teacher_logits.log_softmax(-1)
    t0, t1 = alignment.teacher_groups[-1].tolist()
    later = log_q[torch.arange(t0 + 1, t1), p.teacher_ids[t0 + 1 : t1]].sum()
    torch.testing.assert_close(teacher_rows[-1], log_q[t0] + later)
    loss = example.uld(student_rows, teacher_rows, None)
    loss.backward()
    assert student.head.weight.grad is not None and all(x.grad is None for x in teacher.parameters())
