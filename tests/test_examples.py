"""The digits, attention-relations and cross-tokenizer examples' end-to-end runs (a few steps per
method, `--smoke`).

Needs the `examples` extra (scikit-learn; `tokenizers` through sentence-transformers): `make
examples-smoke` installs it and runs the tests marked `examples`; `make test` deselects them.
"""

from __future__ import annotations

import pytest
import torch

import fastkd
from tests.example_modules import load_example, run_smoke

pytestmark = pytest.mark.examples


def test_digits_smoke(tmp_path, capsys):
    _, rows = run_smoke("digits", tmp_path, capsys, (), ("student alone", "teacher"))
    assert all(0.0 <= r["mean"] <= 1.0 and len(r["accuracies"]) == 1 for r in rows)


def test_attention_relations_smoke(tmp_path, capsys):
    example, rows = run_smoke("attention_relations", tmp_path, capsys, ("teacher",), ("CE alone", "teacher"))
    for r in rows:
        assert len(r["ppls"]) == 1 and 1.0 < r["ppl_mean"] < 2 * example.VOCAB
        assert 0.0 <= r["agree_mean"] <= 1.0 and 0.0 <= r["rel_mean"] < float("inf")


def test_cross_tokenizer_smoke(tmp_path, capsys):
    printed = ("CE alone", "CE + ULD", "teacher")
    _, rows = run_smoke("cross_tokenizer", tmp_path, capsys, ("teacher",), printed)
    for r in rows:
        # three steps from a random start: a few bits per byte (a uniform student: 10 bits per token)
        assert len(r["bpbs"]) == 1 and 0.0 < r["bpb_mean"] < 10.0
        assert 0.0 <= r["uld_mean"] <= 2.0


def test_attention_relations_loss_is_the_minilm_v2_sum():
    """The example's relation term: the Q-Q, K-K and V-V relation losses of
    the last blocks, each the reference's, summed."""
    example = load_example("attention_relations")
    torch.manual_seed(0)
    student = example.RelationLM(dim=8, layers=1, heads=2, context=6)
    teacher = example.RelationLM(dim=16, layers=2, heads=4, context=6)
    tokens = torch.randint(0, 256, (3, 6))
    _, s_qkv = student.hidden_and_relations(tokens)
    _, t_qkv = teacher.hidden_and_relations(tokens)
    assert [x.shape for x in s_qkv] == [(3, 6, 8)] * 3 and [x.shape for x in t_qkv] == [(3, 6, 16)] * 3
    want = sum(fastkd.attention_relation_loss(s, t, num_relation_heads=example.RELATION_HEADS, causal=True,
                                              backend="reference") for s, t in zip(s_qkv, t_qkv, strict=True))
    torch.testing.assert_close(example.relation_loss(s_qkv, t_qkv), want, rtol=1e-5, atol=1e-6)
