"""Automatic chunk sizes of the fused head: the memory-budget rule on CPU, and on a GPU at most
⌈V/H⌉ chunks (no tiny chunks at LLM vocabularies; a bound on the roundings of a weight
gradient summed in bfloat16)."""

from __future__ import annotations

import math

import pytest
import torch

from fastkd import fused_linear


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("n_rows, vocab, hidden", ((16384, 128256, 4096), (1024, 32000, 512), (7, 50, 3)))
def test_cpu_chunks_follow_the_memory_budget(dtype, n_rows, vocab, hidden):
    budget_rows = fused_linear.chunk_rows(vocab, dtype, False, fused_linear.default_memory_budget(dtype))
    assert fused_linear.default_chunk_rows(n_rows, vocab, hidden, dtype, "cpu") == budget_rows


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_gpu_chunks_of_an_llm_head_are_few_and_large(dtype):
    n_rows, vocab, hidden = 16384, 128256, 4096
    rows = fused_linear.default_chunk_rows(n_rows, vocab, hidden, dtype, "cuda")
    assert rows >= 512  # the memory budget alone gives 43 (bfloat16) / 87 (float32)
    assert math.ceil(n_rows / rows) <= math.ceil(vocab / hidden)


@pytest.mark.parametrize("n_rows, vocab, hidden", ((1, 128256, 4096), (4096, 1000, 4096), (100, 50, 3)))
def test_gpu_chunks_never_below_the_memory_budget_rule(n_rows, vocab, hidden):
    rows = fused_linear.default_chunk_rows(n_rows, vocab, hidden, torch.bfloat16, "cuda")
    budget_bytes = fused_linear.default_memory_budget(torch.bfloat16)
    budget = fused_linear.chunk_rows(vocab, torch.bfloat16, False, budget_bytes)
    assert rows >= budget and math.ceil(n_rows / rows) <= max(1, math.ceil(vocab / hidden))
