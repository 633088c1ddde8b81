"""Run the benchmark sweeps and write the report.

    python -m bench.run [--device cpu|cuda] [--out DIR] [--quick] [--no-compile]
                        [--families divergence ...] [family options, e.g. --divergence jsd]

Every ``bench/bench_<stem>.py`` is a family (its ``BENCH``, a
:class:`bench.family.Family`). Each one's sweep writes ``<out>/<stem>_<device>.csv``
and ``<out>/<stem>_<device>.png`` (default ``bench/results``) and prints a
table. Before the sweeps the run checks the peak-memory measurement on known
cases and measures the copy bandwidth; it measures the bandwidth again after
them and takes the higher of the two for the floors (the lower floor), since
other work on the machine can only slow a copy down. It prints the
``THP_MEM_ALLOC_ENABLE`` setting it ran under, and the configurations timed
while other processes kept a core busy. ``python -m bench.render_docs`` turns
the CSV files into ``docs/benchmarks.md``.
"""

from __future__ import annotations

import os
from pathlib import Path

# torch.compile's caches stay inside the repository's ignored build folder
# (the Makefile sets the same paths).
_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_ROOT / "build" / "inductor-cache"))
os.environ.setdefault("TRITON_CACHE_DIR", str(_ROOT / "build" / "triton-cache"))

import argparse  # noqa: E402
import importlib  # noqa: E402
import pkgutil  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import bench  # noqa: E402
from bench import measure, plot, report  # noqa: E402
from bench.family import Family, SweepContext  # noqa: E402


def discover() -> dict[str, Family]:
    """stem → the ``BENCH`` of ``bench/bench_<stem>.py``."""
    return {
        info.name.removeprefix("bench_"): importlib.import_module(f"bench.{info.name}").BENCH
        for info in pkgutil.iter_modules(bench.__path__)
        if info.name.startswith("bench_")
    }


def parse_args(families: dict, argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=_ROOT / "bench" / "results", help="bench/results")
    parser.add_argument("--quick", action="store_true", help="smallest shape, fp32 only: a smoke test")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--families", nargs="+", choices=sorted(families), default=sorted(families))
    for family in families.values():
        family.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    return args


def main(argv=None) -> None:
    from rich.console import Console

    families = discover()
    args = parse_args(families, argv)
    console = Console()
    if not console.is_terminal:  # a log file: no need to squeeze the table into 80 columns
        console = Console(width=150)
    device = torch.device(args.device)
    thp = measure.thp_setting()
    console.print(
        f"torch {torch.__version__}, {device.type}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
           f", {torch.get_num_threads()} threads, SIMD {torch.backends.cpu.get_cpu_capability()}")
    )
    console.print(f"THP: {thp.describe()}")
    for check in measure.validate_peak_memory(device):
        if check.measured_bytes is None:
            measured = "unavailable"
        else:
            measured = f"{check.measured_bytes / measure.MIB:.1f} MiB"
        verdict = "[green]ok[/]" if check.ok else "[bold red]WRONG: peak memory columns untrustworthy[/]"
        console.print(
            f"peak-memory check: {check.case}: expected {check.expected_bytes / measure.MIB:.1f} MiB, "
            f"measured {measured} {verdict}"
        )
    bandwidth_before = measure.copy_bandwidth(device)
    console.print(f"copy bandwidth (read + write): {bandwidth_before / 1e9:.1f} GB/s")

    results = {}
    started = time.perf_counter()
    with report.make_progress(console) as progress:
        ctx = SweepContext(
            device=device, quick=args.quick, compile=not args.no_compile, thp=thp, progress=progress,
            options=vars(args), machine=measure.machine_columns(device),
        )
        for name in args.families:
            results[name] = families[name].sweep(ctx)
    bandwidth_after = measure.copy_bandwidth(device)
    bandwidth = max(bandwidth_before, bandwidth_after)
    console.print(
        f"sweep took {time.perf_counter() - started:.0f} s; copy bandwidth after it "
        f"{bandwidth_after / 1e9:.1f} GB/s; floors use {bandwidth / 1e9:.1f} GB/s"
    )

    for name, rows in results.items():
        family = families[name]
        report.add_floor_and_ratios(rows, bandwidth, family.config_keys)
        csv_path = args.out / f"{name}_{device.type}.csv"
        png_path = args.out / f"{name}_{device.type}.png"
        report.write_csv(csv_path, rows, family.columns)
        title = family.title(ctx)
        plot.plot_family(
            rows, png_path, title=title, size_label=family.size_label, size_order=family.size_order,
            output_key=family.output_key, xlabel=family.size_axis,
        )
        report.print_table(
            console, rows, title=title, config_label=family.config_label, columns=family.table_columns
        )
        loaded = [r for r in rows if (r.get("other_load") or 0) > measure.CONTENDED_LOAD]
        busy = sorted({family.config_label(r) for r in loaded})
        if busy:
            console.print(
                f"[yellow]other processes kept over {measure.CONTENDED_LOAD} of a core busy while timing "
                f"{', '.join(busy)} (column other_load): their times and ratios are distorted[/]"
            )
        console.print(f"wrote {csv_path} and {png_path}")
    console.print(f"ran under {thp.describe()}")


if __name__ == "__main__":
    main()
