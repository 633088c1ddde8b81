"""bfloat16 accuracy, time and memory of ``fastkd.fused_linear_divergence`` against other ways to compute it.

``python -m bench.fused_linear_precision`` prints, for bfloat16 inputs (the
same bfloat16 values for every path) and JSD (β = 0.5, T = 1, batchmean, the
student hidden states and weight requiring a gradient):

1. the relative Frobenius error of the loss, ``grad_hidden`` and
   ``grad_weight`` against a float64 computation of the same loss on the same
   values, at N = 2048, H = 256, V = 8000;
2. with ``--timing``: the median time of forward + backward over a few runs
   and the peak extra memory (``bench.measure.peak_extra_bytes``) at
   N = 1024, H = 1024, V = 32000, and their ratios to the fused head.

Providers:

- ``fused``: ``fastkd.fused_linear_divergence`` (automatic chunk size),
  ``fused-64`` (64-row chunks) and ``fused, bf16 dW sum``
  (``weight_grad_dtype=torch.bfloat16``: the weight gradient summed in
  bfloat16, one rounding per chunk, no float32 accumulator; skipped where the
  fused head does not take it);
- ``unfused bf16``: ``F.linear`` in bfloat16 (bfloat16 logits), then
  ``fastkd.divergence``;
- ``float32 projection``: hidden states and weights converted to float32,
  ``F.linear``, ``fastkd.reference.divergence`` and autograd, the gradients
  rounded to bfloat16 by the conversions' backward (how the chunked losses of
  TRL project; here unchunked, so its memory is the whole ``(N, V)``);
- ``TRL chunked``: TRL's own fused head, ``_chunked_divergence_loss`` of
  ``trl.trainer.distillation_trainer`` (every row kept, β = 0.5, which is
  the same loss: see docs/llm.md), when ``trl`` is importable
  (``pip install -e '.[integrations]'``).

``--csv PATH`` writes every provider's errors (and, with ``--timing``, its
time and memory and their ratios to ``fused``) as one table; the committed
``bench/results/llm/fused_linear_precision.csv`` is one such run.

The script uses only arguments every version of the fused head takes, so it
can measure another checkout too (``PYTHONPATH=<checkout> python
bench/fused_linear_precision.py``).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fastkd
from bench.measure import MIB, peak_extra_bytes
from fastkd import reference

ERROR_SHAPE = (2048, 256, 8000)  # N, H, V
TIMING_SHAPE = (1024, 1024, 32000)
OPTIONS = dict(divergence="jsd", beta=0.5, temperature=1.0)


def relative_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    return ((actual.double() - exact).norm() / exact.norm()).item()


def inputs(n: int, h: int, v: int) -> list[torch.Tensor]:
    """Student / teacher hidden states and weights (logits of O(1)), rounded to bfloat16."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, std=1.0):
        return (std * torch.randn(*shape, generator=generator)).to(torch.bfloat16)

    return [randn(n, h), randn(v, h, std=2 * h**-0.5), randn(n, h), randn(v, h, std=2 * h**-0.5)]


def fused(chunk_size=None, **more):
    def loss(s_h, s_w, t_h, t_w):
        return fastkd.fused_linear_divergence(s_h, s_w, t_h, t_w, chunk_size=chunk_size, **more, **OPTIONS)

    return loss


def unfused_bf16(s_h, s_w, t_h, t_w):
    with torch.no_grad():
        t = F.linear(t_h, t_w)
    return fastkd.divergence(F.linear(s_h, s_w), t, **OPTIONS)


def float32_projection(s_h, s_w, t_h, t_w):
    with torch.no_grad():
        t = F.linear(t_h.float(), t_w.float())
    return reference.divergence(F.linear(s_h.float(), s_w.float()), t, **OPTIONS)


def exact(s_h, s_w, t_h, t_w):
    return reference.divergence(F.linear(s_h, s_w), F.linear(t_h, t_w), **OPTIONS)


def trl_chunked():
    """TRL's chunked fused head, or None where trl is not installed."""
    try:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
    except ImportError:
        return None

    def loss(s_h, s_w, t_h, t_w):
        every_row = torch.ones(1, s_h.shape[0])
        value, _entropy, _count = _chunked_divergence_loss(
            s_h[None], t_h[None], s_w, t_w, every_row,
            beta=OPTIONS["beta"], temperature=OPTIONS["temperature"],
        )
        return value

    return loss


PROVIDERS = {
    "fused": fused(),
    "fused-64": fused(64),
    "fused, bf16 dW sum": fused(weight_grad_dtype=torch.bfloat16),
    "unfused bf16": unfused_bf16,
    "float32 projection": float32_projection,
}
if (_trl := trl_chunked()) is not None:
    PROVIDERS["TRL chunked"] = _trl


def supported(providers: dict) -> dict:
    """The providers whose arguments this fastkd takes (tried on a tiny problem)."""
    tiny = inputs(2, 4, 8)
    found = {}
    for name, loss_fn in providers.items():
        try:
            loss_fn(*tiny)
        except ValueError as exc:
            print(f"  ({name} skipped: {exc})")
            continue
        found[name] = loss_fn
    return found


def loss_and_grads(loss_fn, tensors, dtype=None):
    s_h, s_w, t_h, t_w = (x.detach().clone() if dtype is None else x.to(dtype) for x in tensors)
    s_h.requires_grad_(True)
    s_w.requires_grad_(True)
    loss = loss_fn(s_h, s_w, t_h, t_w)
    loss.backward()
    return loss.detach(), s_h.grad, s_w.grad


def errors(table: dict) -> None:
    tensors = inputs(*ERROR_SHAPE)
    want = loss_and_grads(exact, tensors, torch.float64)
    n, h, v = ERROR_SHAPE
    print(f"relative error vs float64 on the same bfloat16 inputs (N={n} H={h} V={v}, JSD β=0.5, T=1):")
    print(f"  {'provider':22s} {'loss':>9s} {'grad_h':>9s} {'grad_W':>9s}")
    for name, loss_fn in supported(PROVIDERS).items():
        got = loss_and_grads(loss_fn, tensors)
        errs = [relative_error(a, b) for a, b in zip(got, want, strict=True)]
        errors = zip(("loss_error", "grad_h_error", "grad_w_error"), errs, strict=True)
        table.setdefault(name, {}).update(errors)
        print(f"  {name:22s} " + " ".join(f"{e:9.2e}" for e in errs))


def timing(repeats: int, table: dict) -> None:
    tensors = inputs(*TIMING_SHAPE)
    device = torch.device("cpu")
    rows = {}
    for name, loss_fn in supported(PROVIDERS).items():
        loss_and_grads(loss_fn, tensors)  # warm-up
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            loss_and_grads(loss_fn, tensors)
            runs.append(time.perf_counter() - start)
        peak = peak_extra_bytes(lambda loss_fn=loss_fn: loss_and_grads(loss_fn, tensors), device=device)
        rows[name] = (statistics.median(runs) * 1e3, None if peak is None else peak / MIB)
    n, h, v = TIMING_SHAPE
    base_ms, base_mib = rows["fused"]
    print(f"forward + backward, bfloat16, N={n} H={h} V={v}, {torch.get_num_threads()} threads, "
          f"median of {repeats}:")
    print(f"  {'provider':22s} {'ms':>9s} {'/ fused':>8s} {'peak MiB':>9s} {'/ fused':>8s}")
    for name, (ms, mib) in rows.items():
        mem = "n/a" if mib is None else f"{mib:9.0f} {mib / base_mib:8.2f}"
        print(f"  {name:22s} {ms:9.0f} {ms / base_ms:8.2f} {mem}")
        table.setdefault(name, {}).update(
            ms=round(ms, 1), ms_over_fused=round(ms / base_ms, 3),
            peak_mib=None if mib is None else round(mib, 1),
            peak_over_fused=None if mib is None else round(mib / base_mib, 3),
        )


def write_csv(path: Path, table: dict) -> None:
    n, h, v = ERROR_SHAPE
    tn, th, tv = TIMING_SHAPE
    columns = ["provider", "loss_error", "grad_h_error", "grad_w_error",
               "ms", "ms_over_fused", "peak_mib", "peak_over_fused"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        handle.write(f"# bf16 inputs, JSD beta=0.5 T=1 batchmean; errors at N={n} H={h} V={v} vs float64; "
                     f"time/memory at N={tn} H={th} V={tv}, {torch.get_num_threads()} threads, torch "
                     f"{torch.__version__}\n")
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        for name, row in table.items():
            writer.writerow({"provider": name, **{k: ("" if v is None else v) for k, v in row.items()}})
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timing", action="store_true", help="also time and measure memory")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--csv", type=Path, help="also write the table here")
    args = parser.parse_args()
    table: dict = {}
    errors(table)
    if args.timing:
        timing(args.repeats, table)
    if args.csv:
        write_csv(args.csv, table)


if __name__ == "__main__":
    main()
