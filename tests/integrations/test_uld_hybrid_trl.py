"""fastkd's hybrid ULD (``uld_loss(..., hybrid=table)``, docs/spec.md §1.14) against TRL GOLD's
``ULDLoss`` with ``uld_use_hybrid_loss=True``.

Two byte-level BPE tokenizers with different vocabularies are trained here
(the ones of test_token_alignment_trl, no downloads); the hybrid table is the
pairs of ids whose token strings both vocabularies hold, which is how TRL
builds its mapping. Checked, to float64 rounding, values and gradients:
TRL's hybrid loss on probability rows (β, fixed and TRL's default weights,
temperatures), and its whole distillation term (byte-offset alignment, both
merge strategies, hybrid) against ``align_by_offsets`` + ``merge_aligned`` +
``uld_loss(..., hybrid=...)``.

TRL takes the logarithm of ``clamp_min(p, 1e-8)`` in the matched JSD; fastkd
does not clamp. The data keep every matched probability above ``1e-8`` (the
actual next tokens are likely, as under a trained model), which each test
asserts, so that the two compute the same function there.

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

from tests.integrations.test_token_alignment_trl import (  # noqa: E402  (after the skips)
    COMPLETIONS,
    STRATEGIES,
    STUDENT_CORPUS,
    TEACHER_CORPUS,
    byte_level_bpe,
    float64_backends,
)

# TRL clamps the matched probabilities at this value before its logarithm
TRL_CLAMP = 1e-8


@pytest.fixture(scope="module")
def tokenizer_pair():
    student, teacher = byte_level_bpe(300, STUDENT_CORPUS), byte_level_bpe(420, TEACHER_CORPUS)
    assert student.get_vocab_size() != teacher.get_vocab_size()
    return student, teacher


def shared_token_table(student, teacher) -> torch.Tensor:
    """``(M, 2)`` int64 ``(student id, teacher id)`` of the token strings both vocabularies hold."""
    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    pairs = sorted((student_vocab[token], teacher_id) for token, teacher_id in teacher_vocab.items()
                   if token in student_vocab)
    return torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)


def trl_hybrid(student, teacher, *, beta, weights, strategy="first", student_temperature=1.0,
               teacher_temperature=1.0):
    config = SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=student_temperature,
        uld_teacher_temperature=teacher_temperature, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
        use_extended_uld=True, uld_token_merge_strategy=STRATEGIES[strategy], uld_use_hybrid_loss=True,
        uld_hybrid_matched_weight=None if weights is None else weights[0],
        uld_hybrid_unmatched_weight=None if weights is None else weights[1], beta=beta,
    )
    return gold.ULDLoss(config, student_tokenizer=student, teacher_tokenizer=teacher)


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-14)


def test_table_matches_trl_mapping(tokenizer_pair):
    student, teacher = tokenizer_pair
    table = shared_token_table(student, teacher)
    trl = trl_hybrid(student, teacher, beta=0.5, weights=None)
    assert {b: a for a, b in table.tolist()} == trl._vocab_mapping
    # a real partial overlap: the byte alphabet and some merges, not everything
    assert 256 <= table.shape[0] < min(student.get_vocab_size(), teacher.get_vocab_size())
    fastkd.uld_loss(torch.zeros(1, student.get_vocab_size()), torch.zeros(1, teacher.get_vocab_size()),
                    hybrid=table)


@pytest.mark.parametrize("backend", float64_backends())
@pytest.mark.parametrize("beta", [0.5, 0.2, 0.0, 1.0])
@pytest.mark.parametrize("weights", [None, (0.7, 0.4)])
def test_hybrid_rows_match_trl(tokenizer_pair, backend, beta, weights):
    """TRL's hybrid loss of aligned probability rows and ``uld_loss(..., hybrid=table)``
    of the logits they come from (its batchmean is TRL's sum over rows / rows), with
    the gradients with respect to both logits."""
    student, teacher = tokenizer_pair
    table = shared_token_table(student, teacher)
    t_student, t_teacher = 1.5, 0.8
    generator = torch.Generator().manual_seed(3)
    s = torch.randn(7, student.get_vocab_size(), generator=generator, dtype=torch.float64).requires_grad_()
    t = torch.randn(7, teacher.get_vocab_size(), generator=generator, dtype=torch.float64).requires_grad_()
    p, q = F.softmax(s / t_student, -1), F.softmax(t / t_teacher, -1)
    assert p.min() > 10 * TRL_CLAMP and q.min() > 10 * TRL_CLAMP
    trl = trl_hybrid(student, teacher, beta=beta, weights=weights)
    expected = trl._compute_hybrid_uld_loss(p, q)
    expected_grads = torch.autograd.grad(expected, (s, t))
    got = fastkd.uld_loss(s, t, hybrid=table, hybrid_beta=beta, hybrid_weights=weights,
                          student_temperature=t_student, teacher_temperature=t_teacher, backend=backend)
    grads = torch.autograd.grad(got, (s, t))
    assert_close(got, expected.reshape(()))
    assert_close(grads[0], expected_grads[0])
    assert_close(grads[1], expected_grads[1])


@pytest.mark.parametrize("backend", float64_backends())
@pytest.mark.parametrize("strategy", ["first", "last"])
@pytest.mark.parametrize("beta", [0.5, 0.0])
def test_hybrid_distillation_loss_matches_trl(tokenizer_pair, backend, strategy, beta):
    """TRL's hybrid distillation term on a padded batch with prompts (byte-offset
    alignment, merged groups), and per sequence ``align_by_offsets``, ``merge_aligned``
    and ``uld_loss(..., hybrid=table, student_is_logprob=True, teacher_is_logprob=True)``,
    then the batch mean; values and gradients."""
    student, teacher = tokenizer_pair
    table = shared_token_table(student, teacher)
    v_student, v_teacher = student.get_vocab_size(), teacher.get_vocab_size()
    cases = [(s_ids, s_off, t_ids, t_off) for (s_ids, s_off), (t_ids, t_off) in zip(
        trl_utils.encode_with_byte_offsets(student, COMPLETIONS),
        trl_utils.encode_with_byte_offsets(teacher, COMPLETIONS), strict=True)]
    t_student, t_teacher = 1.0, 2.0
    generator = torch.Generator().manual_seed(4)
    prompt_s, prompt_t = 3, 2
    # TRL's "bayesian" pairs token i with the output at i − 1 (the one that predicts it)
    shift = 1 if strategy == "last" else 0

    def batch(prompt, ids_of, offsets_of, vocab):
        length = prompt + max(len(case[ids_of]) for case in cases) + 1
        ids = torch.zeros(len(cases), length, dtype=torch.long)
        labels = torch.full((len(cases), length), -100)
        offsets = torch.zeros(len(cases), length, 2, dtype=torch.long)
        logits = torch.randn(len(cases), length, vocab, generator=generator, dtype=torch.float64) * 0.5
        for row, case in enumerate(cases):
            n = len(case[ids_of])
            ids[row, :prompt] = torch.randint(0, vocab, (prompt,), generator=generator)
            ids[row, prompt:prompt + n] = torch.tensor(case[ids_of])
            labels[row, prompt:prompt + n] = ids[row, prompt:prompt + n]
            offsets[row, prompt:prompt + n] = torch.tensor(case[offsets_of])
            # the actual tokens are likely at the output the strategy reads their
            # probability from, as under a trained model: merged rows stay far above TRL's clamp
            positions = torch.arange(prompt, prompt + n)
            logits[row, positions - shift, ids[row, positions]] += 8.0
        return ids, labels, offsets, logits.requires_grad_()

    s_ids, s_labels, s_offsets, s_logits = batch(prompt_s, 0, 1, v_student)
    t_ids, t_labels, t_offsets, t_logits = batch(prompt_t, 2, 3, v_teacher)
    trl = trl_hybrid(student, teacher, beta=beta, weights=None, strategy=strategy,
                     student_temperature=t_student, teacher_temperature=t_teacher)
    expected = trl._compute_distillation_loss(
        s_logits, t_logits, s_labels, t_labels, s_ids, t_ids,
        student_byte_offsets=s_offsets, teacher_byte_offsets=t_offsets,
    ).reshape(())
    expected_grads = torch.autograd.grad(expected, (s_logits, t_logits))

    per_sequence, smallest = [], 1.0
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
        smallest = min(smallest, float(student_rows.detach()[:, table[:, 0]].exp().min()),
                       float(teacher_rows.detach()[:, table[:, 1]].exp().min()))
        per_sequence.append(fastkd.uld_loss(student_rows, teacher_rows, student_is_logprob=True,
                                            teacher_is_logprob=True, hybrid=table, hybrid_beta=beta,
                                            backend=backend))
    assert smallest > 10 * TRL_CLAMP
    # multi-token groups on both sides, or the merge would not be exercised
    groups = [fastkd.align_by_offsets(c[1], c[3]) for c in cases]
    assert any((a.student_groups[:, 1] - a.student_groups[:, 0] > 1).any() for a in groups)
    assert any((a.teacher_groups[:, 1] - a.teacher_groups[:, 0] > 1).any() for a in groups)
    got = torch.stack(per_sequence).mean()
    grads = torch.autograd.grad(got, (s_logits, t_logits))
    assert_close(got, expected)
    assert_close(grads[0], expected_grads[0])
    assert_close(grads[1], expected_grads[1])
