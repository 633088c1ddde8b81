"""The digits and attention-relations examples' end-to-end runs (a few steps per method, `--smoke`).

Needs the `examples` extra (scikit-learn): `make examples-smoke` installs it
and runs the tests marked `examples`; `make test` deselects them.
"""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import fastkd

pytestmark = pytest.mark.examples

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits.py"


def load_example():
    spec = importlib.util.spec_from_file_location("fastkd_example_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_digits_smoke(tmp_path, capsys):
    digits = load_example()
    rows = digits.main(["--smoke", "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == [m.name for m in digits.METHODS]
    assert all(0.0 <= r["mean"] <= 1.0 and len(r["accuracies"]) == 1 for r in rows)
    with open(tmp_path / "digits.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == [m.name for m in digits.METHODS]
    printed = capsys.readouterr().out
    assert "| student alone |" in printed and "| teacher |" in printed
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "digits.png").stat().st_size > 0


ATTENTION_RELATIONS = EXAMPLE.with_name("attention_relations.py")


def load_attention_relations():
    spec = importlib.util.spec_from_file_location("fastkd_example_attention_relations", ATTENTION_RELATIONS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_attention_relations_smoke(tmp_path, capsys):
    example = load_attention_relations()
    rows = example.main(["--smoke", "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == [m.name for m in example.METHODS]
    for r in rows:
        assert len(r["ppls"]) == 1 and 1.0 < r["ppl_mean"] < 2 * example.VOCAB
        assert 0.0 <= r["agree_mean"] <= 1.0 and 0.0 <= r["rel_mean"] < float("inf")
    with open(tmp_path / "attention_relations.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == [m.name for m in example.METHODS] + ["teacher"]
    printed = capsys.readouterr().out
    assert "| CE alone |" in printed and "| teacher |" in printed
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "attention_relations.png").stat().st_size > 0


def test_attention_relations_loss_is_the_minilm_v2_sum():
    """The example's relation term: the Q-Q, K-K and V-V relation losses of
    the last blocks, each the reference's, summed."""
    example = load_attention_relations()
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
