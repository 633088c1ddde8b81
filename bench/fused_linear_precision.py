"""Weight-gradient accuracy of ``fastkd.fused_linear_divergence`` in bfloat16, per accumulation mode.

``python -m bench.fused_linear_precision`` prints the relative Frobenius
error of ``grad_weight`` against a float64 computation of the same loss (KL
at T = 2, batchmean) for the unfused path (two ``F.linear`` + the fused
divergence: one rounding of the whole product) and for the fused head with
bfloat16 accumulation (the default: one rounding per chunk) or a float32
accumulator (``weight_grad_dtype=torch.float32``), at the automatic chunk
size and at 64-row chunks. All inputs are the same bfloat16 values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastkd
from fastkd import fused_linear, reference

N, H, V, TEMPERATURE = 2048, 256, 8000, 2.0


def relative_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    return ((actual.double() - exact).norm() / exact.norm()).item()


def weight_grad(loss_fn, inputs, dtype: torch.dtype) -> torch.Tensor:
    s_h, s_w, t_h, t_w = (x.to(dtype).clone() for x in inputs)
    s_h.requires_grad_(True)
    s_w.requires_grad_(True)
    loss_fn(s_h, s_w, t_h, t_w).backward()
    return s_w.grad


def main() -> None:
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, std=1.0):
        return std * torch.randn(*shape, generator=generator, dtype=torch.float64)

    # rounded to bfloat16 once, so that every path sees the same input values
    inputs = [x.to(torch.bfloat16).double() for x in (randn(N, H), randn(V, H, std=2 * H**-0.5),
                                                       randn(N, H), randn(V, H, std=2 * H**-0.5))]

    def unfused(s_h, s_w, t_h, t_w, divergence=reference.divergence):
        return divergence(F.linear(s_h, s_w), F.linear(t_h, t_w), temperature=TEMPERATURE)

    exact = weight_grad(unfused, inputs, torch.float64)
    rows = [("unfused bf16 (one rounding)", relative_error(
        weight_grad(lambda *x: unfused(*x, divergence=fastkd.divergence), inputs, torch.bfloat16), exact))]
    budget = fused_linear.default_memory_budget(torch.bfloat16)
    automatic = fused_linear.chunk_rows(V, torch.bfloat16, False, budget)
    for chunk in (automatic, 64):
        for accumulator in (None, torch.float32):
            def fused(s_h, s_w, t_h, t_w, chunk=chunk, accumulator=accumulator):
                return fastkd.fused_linear_divergence(
                    s_h, s_w, t_h, t_w, temperature=TEMPERATURE, chunk_size=chunk,
                    weight_grad_dtype=accumulator,
                )

            summed = "bf16" if accumulator is None else "fp32"
            name = f"fused, {-(-N // chunk)} chunks of {chunk} rows, {summed} sum"
            rows.append((name, relative_error(weight_grad(fused, inputs, torch.bfloat16), exact)))
    print(f"grad_weight relative error vs float64, N={N} H={H} V={V} T={TEMPERATURE}:")
    for name, error in rows:
        print(f"  {name:45s} {error:.2e}")


if __name__ == "__main__":
    main()
