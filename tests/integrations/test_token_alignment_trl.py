"""fastkd's cross-tokenizer alignment against TRL's GOLD trainer (docs/spec.md §1.15).

Two byte-level BPE tokenizers with different vocabularies, trained here on a
small inline corpus with the ``tokenizers`` library (no downloads), cut the
same completions; TRL's own byte offsets (``encode_with_byte_offsets``) feed
both TRL's ``ULDLoss`` and fastkd. Checked: the groups of
``fastkd.align_by_offsets`` against ``ULDLoss._align_by_byte_offsets``, the
rows of ``fastkd.merge_aligned`` against ``_merge_probabilities_with_alignment_groups``
(both strategies), and TRL's non-hybrid distillation loss against
``fastkd.uld_loss`` on those rows taken as log-probabilities
(``student_is_logprob=True, teacher_is_logprob=True``: the merged rows are not
normalised, and TRL compares them as they are), to float64 rounding.

Skipped unless ``trl`` (with its ``experimental.gold`` module) and
``tokenizers`` import.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import fastkd

pytestmark = pytest.mark.integrations

gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
trl_utils = pytest.importorskip("trl.experimental.utils")
tokenizers = pytest.importorskip("tokenizers")

CORPUS = [
    "The cat sat on the mat, and the dog sat on the log.",
    "Distillation moves knowledge from a large teacher into a small student.",
    "Tokenizers split words into pieces; different tokenizers split them differently.",
    "A café in Zürich serves crème brûlée to naïve coöperators.",
    "Numbers like 3.14159 and 2718 are split into digits or chunks.",
    "Emoji 🙂 and symbols ∑ ∫ √ take several bytes each in UTF-8.",
] * 4
# Each tokenizer learns its merges from its own half of the corpus, so that
# each splits some words the other keeps whole (multi-token groups on both sides).
STUDENT_CORPUS, TEACHER_CORPUS = CORPUS[0::2] + CORPUS[1:6:2], CORPUS[1::2] + CORPUS[0:6:2]

COMPLETIONS = [
    "The student sat on the mat.",
    "Knowledge distillation across tokenizers works on text spans.",
    "crème brûlée in Zürich 🙂",
    "3.14159 ∑ √ 2718",
    "a",
]

# fastkd's strategy -> TRL GOLD's uld_token_merge_strategy
STRATEGIES = {"first": "observed", "last": "bayesian"}


def byte_level_bpe(vocab_size: int, corpus: list[str]) -> tokenizers.Tokenizer:
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


@pytest.fixture(scope="module")
def encoded():
    """Per completion: (student ids, student byte offsets, teacher ids, teacher byte offsets)."""
    student, teacher = byte_level_bpe(300, STUDENT_CORPUS), byte_level_bpe(420, TEACHER_CORPUS)
    assert student.get_vocab_size() != teacher.get_vocab_size()
    pairs = zip(trl_utils.encode_with_byte_offsets(student, COMPLETIONS),
                trl_utils.encode_with_byte_offsets(teacher, COMPLETIONS), strict=True)
    cases = [(s_ids, s_off, t_ids, t_off) for (s_ids, s_off), (t_ids, t_off) in pairs]
    # each side has groups of several tokens somewhere, or the test would show little
    groups = [pair for _, s_off, _, t_off in cases for pair in trl_groups(s_off, t_off)]
    assert any(len(s) > 1 for s, _ in groups) and any(len(t) > 1 for _, t in groups)
    return cases, student.get_vocab_size(), teacher.get_vocab_size()


def uld(strategy: str, student_temperature: float = 1.0, teacher_temperature: float = 1.0):
    config = SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=student_temperature,
        uld_teacher_temperature=teacher_temperature, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
        use_extended_uld=True, uld_token_merge_strategy=STRATEGIES[strategy], uld_use_hybrid_loss=False,
    )
    return gold.ULDLoss(config)


def trl_groups(student_offsets, teacher_offsets):
    """TRL's groups without the ones that have no token on one side (TRL drops those too)."""
    student_groups, teacher_groups = gold.ULDLoss._align_by_byte_offsets(student_offsets, teacher_offsets)
    return [(s, t) for s, t in zip(student_groups, teacher_groups, strict=False) if s and t]


def as_ranges(groups):
    return [[g[0], g[-1] + 1] for g in groups]


@pytest.mark.parametrize("eos", ["none", "teacher", "both"])
def test_groups_match_trl(encoded, eos):
    cases, _, _ = encoded
    for _, s_off, _, t_off in cases:
        end = s_off[-1][1]
        # TRL gives an appended EOS the span (content_len, content_len)
        s_off = s_off + [(end, end)] * (eos == "both")
        t_off = t_off + [(end, end)] * (eos in ("teacher", "both"))
        expected = trl_groups(s_off, t_off)
        alignment = fastkd.align_by_offsets(s_off, t_off)
        assert alignment.student_groups.tolist() == as_ranges([s for s, _ in expected])
        assert alignment.teacher_groups.tolist() == as_ranges([t for _, t in expected])


@pytest.mark.parametrize("strategy", ["first", "last"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_merged_rows_match_trl(encoded, strategy, temperature):
    cases, v_student, v_teacher = encoded
    loss = uld(strategy)
    generator = torch.Generator().manual_seed(1)
    for s_ids, s_off, t_ids, t_off in cases:
        pairs = trl_groups(s_off, t_off)
        for side, ids, vocab in ((0, s_ids, v_student), (1, t_ids, v_teacher)):
            groups = [pair[side] for pair in pairs]
            logits = torch.randn(len(ids), vocab, generator=generator, dtype=torch.float64) * 4
            probs = F.softmax(logits / temperature, dim=-1)
            expected = loss._merge_probabilities_with_alignment_groups(probs, groups, ids)
            merged = fastkd.merge_aligned(logits, torch.tensor(ids), torch.tensor(as_ranges(groups)),
                                          strategy=strategy, temperature=temperature)
            torch.testing.assert_close(merged.exp(), expected, rtol=1e-12, atol=1e-300)


def float64_backends():
    """The uld_loss backends that compute in float64 here: the reference, and the cpu op where it is built."""
    params = [pytest.param("reference", id="reference")]
    status = fastkd._dispatch.backend_status("cpu", "cpu")
    available = status.available and "cpu" in fastkd.uld.KERNEL_BACKENDS
    marks = () if available else (pytest.mark.skip(reason=f"cpu: {status.reason or 'no uld op'}"),)
    return params + [pytest.param("cpu", marks=marks, id="cpu")]


@pytest.mark.parametrize("backend", float64_backends())
@pytest.mark.parametrize("strategy", ["first", "last"])
def test_distillation_loss_matches_trl(encoded, strategy, backend):
    """TRL's non-hybrid ULD distillation term on a padded batch with prompts, and
    the same in two fastkd calls per sequence, ``merge_aligned`` then
    ``uld_loss(..., student_is_logprob=True, teacher_is_logprob=True)`` (its
    batchmean is the sum over the aligned rows over their number), then the
    batch mean."""
    cases, v_student, v_teacher = encoded
    t_student, t_teacher = 1.0, 2.0
    generator = torch.Generator().manual_seed(2)
    prompt_s, prompt_t = 3, 2  # prompt tokens before each completion
    length_s = prompt_s + max(len(c[0]) for c in cases) + 1
    length_t = prompt_t + max(len(c[2]) for c in cases) + 1

    def batch(prompt, length, ids_of, offsets_of, vocab):
        ids = torch.zeros(len(cases), length, dtype=torch.long)
        labels = torch.full((len(cases), length), -100)
        offsets = torch.zeros(len(cases), length, 2, dtype=torch.long)
        for row, case in enumerate(cases):
            n = len(case[ids_of])
            ids[row, :prompt] = torch.randint(0, vocab, (prompt,), generator=generator)
            ids[row, prompt:prompt + n] = torch.tensor(case[ids_of])
            labels[row, prompt:prompt + n] = ids[row, prompt:prompt + n]
            offsets[row, prompt:prompt + n] = torch.tensor(case[offsets_of])
        logits = torch.randn(len(cases), length, vocab, generator=generator, dtype=torch.float64) * 3
        return ids, labels, offsets, logits

    s_ids, s_labels, s_offsets, s_logits = batch(prompt_s, length_s, 0, 1, v_student)
    t_ids, t_labels, t_offsets, t_logits = batch(prompt_t, length_t, 2, 3, v_teacher)
    expected = uld(strategy, t_student, t_teacher)._compute_distillation_loss(
        s_logits, t_logits, s_labels, t_labels, s_ids, t_ids,
        student_byte_offsets=s_offsets, teacher_byte_offsets=t_offsets,
    )

    # TRL's "bayesian" pairs token i with the output at i − 1 (the one that predicts it).
    shift = 1 if strategy == "last" else 0
    per_sequence = []
    for row, (s_tokens, _, t_tokens, _) in enumerate(cases):
        s_span = slice(prompt_s, prompt_s + len(s_tokens))
        t_span = slice(prompt_t, prompt_t + len(t_tokens))
        alignment = fastkd.align_by_offsets(s_offsets[row, s_span], t_offsets[row, t_span])
        student_rows = fastkd.merge_aligned(
            s_logits[row, s_span.start - shift:s_span.stop - shift], s_ids[row, s_span],
            alignment.student_groups, strategy=strategy, temperature=t_student)
        teacher_rows = fastkd.merge_aligned(
            t_logits[row, t_span.start - shift:t_span.stop - shift], t_ids[row, t_span],
            alignment.teacher_groups, strategy=strategy, temperature=t_teacher)
        per_sequence.append(fastkd.uld_loss(student_rows, teacher_rows, student_is_logprob=True,
                                            teacher_is_logprob=True, backend=backend))
    torch.testing.assert_close(torch.stack(per_sequence).mean(), expected.reshape(()), rtol=1e-12, atol=1e-15)
