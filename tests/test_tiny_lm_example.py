"""The tiny language-model example (examples/tiny_lm.py) in its `--smoke` mode, and its pieces."""

from __future__ import annotations

import math

import torch

from tests.example_modules import load_example, run_smoke


def test_corpus_is_deterministic_and_split():
    tiny_lm = load_example("tiny_lm")
    docs = tiny_lm.docstrings()
    assert docs == tiny_lm.docstrings()
    assert len(docs) > 500 and len(set(docs)) == len(docs)
    corpus = tiny_lm.load_corpus(context=16, max_bytes=4000)
    assert corpus.train.shape[1] == 17 and corpus.train.dtype == torch.uint8
    # Consecutive windows share their boundary byte (target of one = first input of the next).
    assert torch.equal(corpus.train[:-1, -1], corpus.train[1:, 0])
    train_text = bytes(corpus.train[:, :-1].flatten().tolist())
    held_text = bytes(corpus.held_out[:, :-1].flatten().tolist())
    assert train_text.startswith(docs[0][:100].encode())
    assert held_text.startswith(docs[9][:100].encode())  # every tenth document is held out


def test_topk_store_matches_teacher_logits():
    tiny_lm = load_example("tiny_lm")
    torch.manual_seed(0)
    teacher = tiny_lm.TinyLM(dim=16, layers=1, heads=2, context=8)
    windows = torch.randint(0, 256, (5, 9), dtype=torch.uint8)
    store = tiny_lm.teacher_topk(teacher, windows, k=4, chunk=2)
    logits = teacher(windows[:, :-1].long())
    assert store.index.dtype == torch.uint8 and store.index.shape == (5, 8, 4)
    torch.testing.assert_close(store.values, logits.topk(4, dim=-1).values)
    torch.testing.assert_close(logits.gather(-1, store.index.long()), store.values)


def test_tiny_lm_smoke(tmp_path, capsys):
    tiny_lm, rows = run_smoke("tiny_lm", tmp_path, capsys, ("teacher",), ("CE alone", "teacher"))
    for r in rows:
        assert len(r["ppls"]) == 1 and 1.0 < r["ppl_mean"] < 2 * tiny_lm.VOCAB
        assert math.isfinite(r["ppl_mean"]) and 0.0 <= r["agree_mean"] <= 1.0


def test_distillation_losses_match_unfused_formulas():
    """The example's fused and top-k losses are 0.5·CE + 0.5·KL written out by hand."""
    tiny_lm = load_example("tiny_lm")
    torch.manual_seed(0)
    student = tiny_lm.TinyLM(dim=8, layers=1, heads=2, context=8)
    teacher = tiny_lm.TinyLM(dim=16, layers=1, heads=2, context=8)
    windows = torch.randint(0, 256, (6, 9), dtype=torch.uint8)
    idx = torch.tensor([4, 1, 3])
    tokens = windows[idx].long()
    s_logits = student(tokens[:, :-1]).flatten(0, 1).double()
    t_logits = teacher(tokens[:, :-1]).flatten(0, 1).double().detach()
    ce = torch.nn.functional.cross_entropy(s_logits, tokens[:, 1:].flatten())
    log_q = s_logits.log_softmax(-1)
    kd = tiny_lm.KDSettings()

    fused = tiny_lm.loss_for(tiny_lm.METHODS[1], student, teacher, None, windows, idx, kd)
    p = t_logits.softmax(-1)
    kl = (p * (p.log() - log_q)).sum(-1).mean()
    torch.testing.assert_close(fused.double(), 0.5 * ce + 0.5 * kl, rtol=1e-4, atol=1e-5)

    store = tiny_lm.teacher_topk(teacher, windows, k=4)
    topk = tiny_lm.loss_for(tiny_lm.METHODS[2], student, None, store, windows, idx, kd)
    top = t_logits.topk(4, dim=-1)
    p_k = top.values.softmax(-1)
    kl_k = (p_k * (p_k.log() - log_q.gather(-1, top.indices))).sum(-1).mean()
    torch.testing.assert_close(topk.double(), 0.5 * ce + 0.5 * kl_k, rtol=1e-4, atol=1e-5)
