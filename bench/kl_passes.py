"""Dense KL on CPU against its memory-traffic floor, for comparing two builds.

Times ``fastkd.divergence(s, t, divergence="kl", temperature=T)`` forward +
backward (student gradient only, as ``bench/bench_divergence.py`` does) and,
taking turns with it in the same process, the 256 MiB ``copy_`` that gives
the copy bandwidth. The floor of a shape is ``3 · N · V · itemsize`` bytes
(read student and teacher, write the student gradient) over that bandwidth;
``x_floor`` is the median call time over it. Taking turns makes the ratio
robust to a machine whose load drifts: both sides see the same load.

Two builds compare best by alternating processes, e.g. ::

    for i in 1 2 3; do
      PYTHONPATH=/path/to/baseline python -m bench.kl_passes --label before
      python -m bench.kl_passes --label after
    done

(each prints one line per configuration; the ``fastkd`` imported is the first
on ``sys.path``). ``--threads 1`` takes the other processes' load out of the
OpenMP barriers; the ratio then compares against a copy on one thread.
``--cpu-time`` times with the process's CPU time instead of the wall clock:
on a machine whose other processes take most of the cores, one thread's CPU
time is what it would take alone (with two threads it also counts the time
a thread spins waiting for the other).

Per-element work of the KL rows this measures (student gradient only):
the row's max (one read of ``s`` and ``t`` from memory), two exponentials,
three row sums, and the gradient ``(q − p)·scale/T`` (one write).
"""

from __future__ import annotations

import statistics
import time

import torch

import fastkd
from bench.measure import MIB, OtherLoad, parse_passes_arguments, passes_argument_parser, passes_line

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure(n: int, v: int, dtype: torch.dtype, *, temperature: float, repeats: int, copy_mib: int,
            clock=time.perf_counter):
    """(median call ms, median copy GB/s, other processes' load, median
    back-to-back call ms) for one shape.

    The calls take turns with the copy, which leaves the caches full of other
    (dirty) data, as the benchmark's providers do; then the same number of
    calls run back to back, which read inputs smaller than the last-level
    cache from it (4096×1024: 16 MiB of bf16 logits) instead of from memory:
    that time is the row work alone, the least the call could take if every
    read of memory overlapped it.

    Args:
        n, v: logits shape ``(n, v)``.
    """
    generator = torch.Generator().manual_seed(0)
    s = torch.randn(n, v, dtype=dtype, generator=generator).requires_grad_()
    t = torch.randn(n, v, dtype=dtype, generator=generator)
    src = torch.ones(copy_mib * MIB // 4)
    dst = torch.zeros_like(src)

    def call():
        s.grad = None
        fastkd.divergence(s, t, divergence="kl", temperature=temperature, backend="cpu").backward()

    call()
    dst.copy_(src)
    call_ms, copy_gbs = [], []
    with OtherLoad() as load:
        for _ in range(repeats):
            start = clock()
            call()
            call_ms.append((clock() - start) * 1e3)
            start = clock()
            dst.copy_(src)
            copy_gbs.append(2 * src.nbytes / (clock() - start) / 1e9)
        back_to_back_ms = []
        for _ in range(repeats):
            start = clock()
            call()
            back_to_back_ms.append((clock() - start) * 1e3)
    median = statistics.median
    return median(call_ms), median(copy_gbs), load.cores, median(back_to_back_ms)


def main(argv: list[str] | None = None) -> None:
    parser = passes_argument_parser(__doc__, [(4096, 1024), (2048, 32000), (512, 128256)], repeats=7)
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["fp32", "bf16"])
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--cpu-time", action="store_true", help="time with the process's CPU time")
    args = parse_passes_arguments(parser, argv)
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for n, v in args.shapes:
            call_ms, copy_gbs, load, back_to_back_ms = measure(
                n, v, dtype, temperature=args.temperature, repeats=args.repeats, copy_mib=args.copy_mib,
                clock=time.process_time if args.cpu_time else time.perf_counter,
            )
            timings = f"{'cpu' if args.cpu_time else 'wall'} {call_ms:.2f} ms"
            # a pass reads the student and the teacher and writes the gradient
            line = passes_line(args.label, dtype_name, n, v, timings, copy_gbs, 3, dtype.itemsize, call_ms,
                               load, tail=f"back to back {back_to_back_ms:.2f} ms\t")
            print(line, flush=True)


if __name__ == "__main__":
    main()
