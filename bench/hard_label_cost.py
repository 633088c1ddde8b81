"""What the hard-label cross-entropy adds to ``fastkd.divergence`` on the CPU backend.

``python -m bench.hard_label_cost`` times forward + backward (student
gradient only) of KL at T = 1 and T = 2 on ``(1024, 32000)`` float32 logits,
three ways, interleaved (each round runs each once; medians of 7 rounds),
and prints each as a ratio to the divergence alone:

- ``kd only``: ``fastkd.divergence``;
- ``kd + CE in the kernel``: the same with ``labels`` and ``hard_weight=0.5``
  (the CE in the kernel's pass: at T = 1 from the student normaliser it
  already has, at T ≠ 1 one more exponential per logit);
- ``kd + F.cross_entropy``: the divergence plus PyTorch's eager
  cross-entropy on the same logits (what one writes without fastkd's mixing).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

import fastkd

N, V, ROUNDS = 1024, 32000, 7


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    s = (2 * torch.randn(N, V, generator=generator)).requires_grad_(True)
    t = 2 * torch.randn(N, V, generator=generator)
    y = torch.randint(0, V, (N,), generator=generator)
    ways = {
        "kd only": lambda T: fastkd.divergence(s, t, temperature=T, backend="cpu"),
        "kd + CE in the kernel": lambda T: fastkd.divergence(
            s, t, temperature=T, labels=y, hard_weight=0.5, backend="cpu"
        ),
        "kd + F.cross_entropy": lambda T: fastkd.divergence(s, t, temperature=T, backend="cpu")
        + 0.5 * F.cross_entropy(s, y),
    }
    for temperature in (1.0, 2.0):
        times = {name: [] for name in ways}
        for _ in range(ROUNDS):
            for name, loss in ways.items():
                s.grad = None
                start = time.perf_counter()
                loss(temperature).backward()
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["kd only"])
        ratios = ", ".join(f"{name} {statistics.median(v) / base:.2f}×" for name, v in times.items())
        print(f"T = {temperature}: {ratios}  (kd only: {base * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
