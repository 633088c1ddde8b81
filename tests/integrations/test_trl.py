"""fastkd.integrations.trl against TRL itself: its loss functions in float64, and three optimiser
steps of its trainers with one method replaced. Tiny Llama models from configs (random weights,
nothing downloaded). Needs the `integrations` extra: `make integrations`."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

if importlib.util.find_spec("trl") is None:
    pytest.skip("needs the integrations extra (make integrations)", allow_module_level=True)
# nothing is fetched from the Hugging Face Hub: the models and the tokenizer are built here
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from fastkd.integrations import trl as fastkd_trl  # noqa: E402

pytestmark = pytest.mark.integrations

VOCAB = 32
PAD, EOS, BOS = 1, 2, 3
BETAS = (0.0, 0.5, 1.0)
TEMPERATURES = (1.0, 2.0)


def gkd_trainer_class():
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer


def logits_case(seed=0, batch=3, length=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, length, VOCAB, generator=g, dtype=torch.float64).mul(3).to(dtype)
    t = torch.randn(batch, length, VOCAB, generator=g, dtype=torch.float64).mul(3).to(dtype)
    labels = torch.randint(0, VOCAB, (batch, length), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[1, -2:] = -100  # padding
    return s, t, labels


def loss_and_grads(fn, s, t):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    loss = fn(s, t)
    loss.backward()
    return loss.detach(), s.grad, t.grad


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "no-labels"])
def test_generalized_jsd_loss_equals_trls_in_float64(beta, temperature, reduction, with_labels):
    s, t, labels = logits_case()
    labels = labels if with_labels else None
    kwargs = dict(labels=labels, beta=beta, temperature=temperature, reduction=reduction)
    want = loss_and_grads(lambda a, b: gkd_trainer_class().generalized_jsd_loss(a, b, **kwargs), s, t)
    got = loss_and_grads(lambda a, b: fastkd_trl.generalized_jsd_loss(a, b, **kwargs), s, t)
    assert got[0].dtype == torch.float64
    for g, w, what in zip(got, want, ("loss", "student grad", "teacher grad"), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-15, msg=what)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("count", [7, torch.tensor(19.0)], ids=["int", "tensor"])
def test_generalized_jsd_loss_with_num_items_in_batch_equals_trls(beta, temperature, count):
    s, t, labels = logits_case(seed=1)
    kwargs = dict(labels=labels, beta=beta, temperature=temperature, num_items_in_batch=count)
    want = loss_and_grads(lambda a, b: gkd_trainer_class().generalized_jsd_loss(a, b, **kwargs), s, t)
    got = loss_and_grads(lambda a, b: fastkd_trl.generalized_jsd_loss(a, b, **kwargs), s, t)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-15)


def test_generalized_jsd_loss_rejects_per_element_reduction():
    s, t, labels = logits_case()
    with pytest.raises(ValueError, match="per-element"):
        fastkd_trl.generalized_jsd_loss(s, t, labels, reduction="none")


def heads_case(seed=0, dtype=torch.float64, batch=3, length=5, hidden=8):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, spread=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64).mul(spread).to(dtype)

    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    return dict(
        student_hidden_states=rand(batch, length, hidden),
        teacher_hidden_states=rand(batch, length, hidden + 4),
        student_lm_head_weight=rand(VOCAB, hidden, spread=0.7),
        teacher_lm_head_weight=rand(VOCAB, hidden + 4, spread=0.7),
        completion_mask=mask,
        student_lm_head_bias=rand(VOCAB),
        teacher_lm_head_bias=rand(VOCAB),
    )


def fused_head_with_grads(fn, case, **kwargs):
    case = dict(case)
    leaves = [case[k].detach().clone().requires_grad_(True) for k in
              ("student_hidden_states", "student_lm_head_weight", "student_lm_head_bias")]
    case.update(zip(("student_hidden_states", "student_lm_head_weight", "student_lm_head_bias"), leaves,
                    strict=True))
    loss, entropy_sum, n_valid = fn(**case, **kwargs)
    loss.backward()
    return (loss.detach(), entropy_sum, n_valid, *(leaf.grad for leaf in leaves))


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("count", [None, torch.tensor(11.0)], ids=["valid-tokens", "num-items"])
def test_fused_head_equals_trls_generalized_jsd_in_float64(beta, temperature, count):
    """The fused head against TRL's definition on the materialised logits, in float64 (TRL's own
    chunked loss computes in float32: see the next test)."""
    case = heads_case()
    scales = dict(student_logit_scale=0.5, teacher_logit_scale=1.5)
    got = fused_head_with_grads(fastkd_trl.chunked_divergence_loss, case, beta=beta, temperature=temperature,
                                num_items_in_batch=count, **scales)

    def materialised(student_hidden_states, teacher_hidden_states, student_lm_head_weight,
                     teacher_lm_head_weight, completion_mask, student_lm_head_bias, teacher_lm_head_bias):
        s = student_hidden_states @ student_lm_head_weight.T + student_lm_head_bias
        t = teacher_hidden_states @ teacher_lm_head_weight.T + teacher_lm_head_bias
        s, t = s * scales["student_logit_scale"], t * scales["teacher_logit_scale"]
        labels = torch.where(completion_mask != 0, 0, -100)
        loss = gkd_trainer_class().generalized_jsd_loss(s, t, labels, beta=beta, temperature=temperature,
                                                        num_items_in_batch=count)
        log_q = torch.log_softmax(s.detach() / temperature, dim=-1)
        entropy = -(log_q.exp() * log_q).sum(-1)[completion_mask != 0].sum()
        return loss, entropy, (completion_mask != 0).sum()

    want = fused_head_with_grads(materialised, case)
    assert got[2].item() == want[2].item() == 9
    for g, w, what in zip(got, want, ("loss", "entropy sum", "valid", "dH", "dW", "db"), strict=True):
        torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-12, atol=1e-14, msg=what)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("count", [None, 5, torch.tensor(11.0)], ids=["valid-tokens", "int", "tensor"])
def test_fused_head_equals_trls_chunked_loss(beta, temperature, count):
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    case = heads_case(seed=1, dtype=torch.float32)
    kwargs = dict(beta=beta, temperature=temperature, num_items_in_batch=count, student_logit_scale=0.8)
    got = fused_head_with_grads(fastkd_trl.chunked_divergence_loss, case, **kwargs)
    want = fused_head_with_grads(_chunked_divergence_loss, case, **kwargs)
    for g, w, what in zip(got, want, ("loss", "entropy sum", "valid", "dH", "dW", "db"), strict=True):
        torch.testing.assert_close(g, w.to(g.dtype), rtol=2e-5, atol=1e-6, msg=what)


@pytest.mark.parametrize("beta", (0.0, 0.5))
def test_fused_head_with_softcapping_equals_trls_chunked_loss(beta):
    """Gemma's final-logit softcapping (after a logit scale) on both models, as TRL's own loss applies it."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    case = heads_case(seed=2, dtype=torch.float32)
    common = dict(beta=beta, temperature=2.0, student_logit_scale=0.8)
    caps = dict(student_final_logit_softcapping=1.5, teacher_final_logit_softcapping=2.5)
    got = fused_head_with_grads(fastkd_trl.chunked_divergence_loss, case, **common, **caps)
    want = fused_head_with_grads(_chunked_divergence_loss, case, **common, **caps)
    uncapped = fused_head_with_grads(_chunked_divergence_loss, case, **common)
    assert not torch.allclose(want[0], uncapped[0], rtol=1e-3), "the caps bite on these logits"
    for g, w, what in zip(got, want, ("loss", "entropy sum", "valid", "dH", "dW", "db"), strict=True):
        torch.testing.assert_close(g, w.to(g.dtype), rtol=2e-5, atol=1e-6, msg=what)


def test_the_package_imports_neither_trl_nor_transformers():
    code = ("import sys, fastkd, fastkd.integrations, fastkd.integrations.trl; "
            "print(sorted(m for m in ('trl', 'transformers', 'tokenizers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- three optimiser steps of the stock trainer and of a subclass overriding one method ----------


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i + 4 for i in range(VOCAB - 4)}
    vocab = {"<unk>": 0, "<pad>": PAD, "<eos>": EOS, "<bos>": BOS, **words}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<eos>", bos_token="<bos>")
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_llama(hidden: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=PAD,
        eos_token_id=EOS, bos_token_id=BOS, tie_word_embeddings=False, initializer_range=0.2,
    )
    return LlamaForCausalLM(config).float()


def recording(trainer_class, losses: list):
    """``trainer_class`` with each micro-batch's loss appended to ``losses``."""

    class Recording(trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(loss.item())
            return loss

    return Recording


def common_arguments(tmp_path):
    return dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        learning_rate=1e-2, report_to="none", logging_steps=1, save_strategy="no", use_cpu=True,
        seed=3, disable_tqdm=True,
    )


def assert_same_training(stock: list, fast: list, stock_model, fast_model):
    assert len(stock) == len(fast) == 6  # three steps of two micro-batches
    assert max(stock) > 1e-2  # the models disagree enough for the comparison to mean something
    for step, (a, b) in enumerate(zip(stock, fast, strict=True)):
        assert abs(a - b) <= 1e-6, f"micro-batch {step}: stock {a} vs fastkd {b}"
    stock_params = dict(stock_model.named_parameters())
    for name, param in fast_model.named_parameters():
        torch.testing.assert_close(param, stock_params[name], rtol=1e-4, atol=1e-5, msg=name)


def test_gkd_trainer_with_fastkd_loss_gives_the_stock_losses(tmp_path):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    student, teacher = tiny_llama(16, seed=0), tiny_llama(24, seed=1)
    g = torch.Generator().manual_seed(5)
    rows = []
    for i in range(12):
        ids = torch.randint(4, VOCAB, (6 + i % 3,), generator=g).tolist()
        rows.append({"input_ids": ids, "prompt_length": 2 + i % 2})

    def collate(batch):
        width = max(len(row["input_ids"]) for row in batch)
        input_ids = torch.full((len(batch), width), PAD)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100)
        for i, row in enumerate(batch):
            n, p = len(row["input_ids"]), row["prompt_length"]
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            attention_mask[i, :n] = 1
            labels[i, p:n] = input_ids[i, p:n]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    class FastGKDTrainer(GKDTrainer):
        generalized_jsd_loss = staticmethod(fastkd_trl.generalized_jsd_loss)

    runs = {}
    for name, trainer_class in (("stock", GKDTrainer), ("fastkd", FastGKDTrainer)):
        losses = []
        args = GKDConfig(lmbda=0.0, seq_kd=False, beta=0.5, **common_arguments(tmp_path / name))
        trainer = recording(trainer_class, losses)(
            model=copy.deepcopy(student), teacher_model=teacher, args=args,
            train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer(), data_collator=collate,
        )
        trainer.train()
        runs[name] = losses, trainer.model
    assert_same_training(*runs["stock"][:1], *runs["fastkd"][:1], runs["stock"][1], runs["fastkd"][1])


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_distillation_trainer_with_fastkd_head_gives_the_stock_losses(tmp_path, temperature):
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    student, teacher = tiny_llama(16, seed=0), tiny_llama(24, seed=1)
    prompts = [" ".join(f"w{(3 * i + j) % (VOCAB - 4)}" for j in range(2 + i % 3)) for i in range(12)]

    class FastDistillationTrainer(DistillationTrainer):
        _compute_loss = fastkd_trl.distillation_compute_loss

    runs = {}
    for name, trainer_class in (("stock", DistillationTrainer), ("fastkd", FastDistillationTrainer)):
        losses = []
        args = DistillationConfig(beta=0.5, temperature=temperature, max_completion_length=4,
                                  **common_arguments(tmp_path / name))
        trainer = recording(trainer_class, losses)(
            model=copy.deepcopy(student), teacher_model=teacher, args=args,
            train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tiny_tokenizer(),
        )
        trainer.train()
        runs[name] = losses, trainer.model, trainer.state.log_history
    assert_same_training(runs["stock"][0], runs["fastkd"][0], runs["stock"][1], runs["fastkd"][1])
    # what the trainer logs from the returned entropy sum and valid-token count
    for stock, fast in zip(runs["stock"][2], runs["fastkd"][2], strict=True):
        if "entropy" in stock:
            assert fast["entropy"] == pytest.approx(stock["entropy"], rel=1e-5)
