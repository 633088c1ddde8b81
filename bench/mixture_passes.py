"""Multi-teacher KL on CPU against ``torch.compile`` and the memory-traffic floor.

Times, taking turns in one process, forward + backward (student gradient)
of ``fastkd.divergence(s, teachers, teacher_weights=w, backend="cpu")``
(``K`` teachers ``(K, N, V)``, KL to their mixture, T = 2, weights
``(0.5, 0.3, 0.2)`` as ``bench/bench_mixture.py``), the same through
``torch.compile`` (``fullgraph=True, dynamic=False``) of the benchmark's
eager provider (``bench.bench_mixture.reference_loss``), and a 256 MiB ``copy_``
that gives the copy bandwidth. The floor of a shape is ``(K + 2) · N · V ·
itemsize`` bytes (read the student and the K teachers, write the student
gradient) over that bandwidth. Taking turns makes the ratios robust to a
machine whose load drifts.

Two builds compare by alternating processes, e.g. ::

    for i in 1 2; do
      PYTHONPATH=/path/to/baseline python -m bench.mixture_passes --label before
      python -m bench.mixture_passes --label after
    done

Per-element work of the fused kernel's float path (K teachers): K + 1
exponentials in the normalising passes, kept in a scratch row, then 2K FMAs,
one division and one log for the log ratio to the mixture (the exact form,
K expm1 and a log1p more, only near float32's subnormals); one read of each
input row from memory, one write of the gradient.
"""

from __future__ import annotations

import statistics
import time

import torch

import fastkd
from bench.bench_mixture import TEMPERATURE, WEIGHTS, reference_loss
from bench.measure import MIB, OtherLoad, parse_passes_arguments, passes_argument_parser, passes_line


def measure(n: int, v: int, *, repeats: int, copy_mib: int, use_compile: bool):
    """Median ms of the fastkd call and of the compiled reference, median copy GB/s
    and the other processes' load, for ``(n, v)`` logits and ``len(WEIGHTS)`` teachers."""
    generator = torch.Generator().manual_seed(0)
    s = torch.randn(n, v, generator=generator).requires_grad_()
    t = torch.randn(len(WEIGHTS), n, v, generator=generator)
    w = torch.tensor(WEIGHTS, dtype=torch.float64)
    src = torch.ones(copy_mib * MIB // 4)
    dst = torch.zeros_like(src)
    compiled = torch.compile(reference_loss, fullgraph=True, dynamic=False) if use_compile else None

    def fused():
        s.grad = None
        fastkd.divergence(s, t, teacher_weights=w, temperature=TEMPERATURE, backend="cpu").backward()

    def reference():
        s.grad = None
        compiled(s, t, w).backward()

    fused()
    if compiled is not None:
        reference()
    dst.copy_(src)
    fused_ms, compile_ms, copy_gbs = [], [], []
    with OtherLoad() as load:
        for _ in range(repeats):
            start = time.perf_counter()
            fused()
            fused_ms.append((time.perf_counter() - start) * 1e3)
            if compiled is not None:
                start = time.perf_counter()
                reference()
                compile_ms.append((time.perf_counter() - start) * 1e3)
            start = time.perf_counter()
            dst.copy_(src)
            copy_gbs.append(2 * src.nbytes / (time.perf_counter() - start) / 1e9)
    compile_median = statistics.median(compile_ms) if compile_ms else float("nan")
    return statistics.median(fused_ms), compile_median, statistics.median(copy_gbs), load.cores


def main(argv: list[str] | None = None) -> None:
    parser = passes_argument_parser(__doc__, [(4096, 1024), (1024, 32000)], repeats=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    args = parse_passes_arguments(parser, argv)
    k = len(WEIGHTS)
    for n, v in args.shapes:
        fused_ms, compile_ms, copy_gbs, load = measure(n, v, repeats=args.repeats, copy_mib=args.copy_mib,
                                                       use_compile=not args.no_compile)
        # a pass reads the student and the K teachers and writes the gradient
        timings = f"fastkd {fused_ms:.1f} ms\tcompile {compile_ms:.1f} ms"
        line = passes_line(args.label, f"fp32 K={k}", n, v, timings, copy_gbs, k + 2, 4, fused_ms, load,
                           tail=f"x_compile {compile_ms / fused_ms:.2f}\t")
        print(line, flush=True)


if __name__ == "__main__":
    main()
