"""Run the benchmarks and write the report.

    python -m bench.run [--device cpu|cuda] [--out DIR] [--quick] [--no-compile]
                        [--families divergence ...] [family options, e.g. --divergence jsd]

Every ``bench/bench_<stem>.py`` is a family (its ``BENCH``, a
:class:`bench.family.Family`). Two plans:

- ``--quick`` (``make bench``): the representative report, each family's
  ``report_configs`` (one or two configurations) with fewer timed runs, the
  configurations of ``scaling_configs`` also with one thread. It writes
  ``<out>/report_<device>.csv`` (every family's rows, the union of their
  columns) and ``<out>/report_<device>.png``, and prints each family's table,
  a summary of every fastkd provider against ``eager``, ``compile`` and the
  floor, and the thread scaling.
- the full sweep (``make bench-full``): every configuration of every family;
  each family writes ``<out>/<stem>_<device>.csv`` and ``.png`` and prints its
  table.

Both default to ``bench/results``. Before the sweeps the run checks the
peak-memory measurement on known cases and measures the copy bandwidth; it
measures the bandwidth again after them and takes the higher of the two for
the floors (the lower floor), since other work on the machine can only slow a
copy down. It prints the ``THP_MEM_ALLOC_ENABLE`` setting it ran under, the
configurations timed while other processes kept a core busy, and its own wall
and CPU time. ``python -m bench.render_docs`` turns the CSV files into
``docs/benchmarks.md``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_STARTED = time.perf_counter()  # before torch's import, which the run's wall time includes

# torch.compile's caches stay inside the repository's ignored build folder
# (the Makefile sets the same paths).
_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_ROOT / "build" / "inductor-cache"))
os.environ.setdefault("TRITON_CACHE_DIR", str(_ROOT / "build" / "triton-cache"))

import argparse  # noqa: E402
import importlib  # noqa: E402
import pkgutil  # noqa: E402
import resource  # noqa: E402

import torch  # noqa: E402

import bench  # noqa: E402
from bench import measure, plot, report  # noqa: E402
from bench.family import Family, SweepContext  # noqa: E402
from bench.report import COMPILE  # noqa: E402

# --quick's timing: the untimed first call is the warm-up, and 3 to 7 timed runs
# within about a second per provider; a contended attempt is retried once, soon.
QUICK_TIMING = {
    "warmup": 0, "min_repeats": 3, "max_repeats": 7, "budget_s": 1.0, "attempts": 2, "pause_s": 3.0,
}


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
    parser.add_argument(
        "--quick", action="store_true",
        help="the representative report (make bench): one or two configurations per family, fewer runs, "
             "into report_<device>.csv and .png",
    )
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
            timing=QUICK_TIMING if args.quick else {},
        )
        for name in args.families:
            results[name] = families[name].sweep(ctx)
    sweep_s = time.perf_counter() - started
    bandwidth_after = measure.copy_bandwidth(device)
    bandwidth = max(bandwidth_before, bandwidth_after)
    console.print(
        f"sweep took {sweep_s:.0f} s; copy bandwidth after it "
        f"{bandwidth_after / 1e9:.1f} GB/s; floors use {bandwidth / 1e9:.1f} GB/s"
    )

    for name, rows in results.items():
        family = families[name]
        report.add_floor_and_ratios(rows, bandwidth, family.config_keys)
        title = family.title(ctx)
        if not args.quick:
            csv_path = args.out / f"{name}_{device.type}.csv"
            png_path = args.out / f"{name}_{device.type}.png"
            report.write_csv(csv_path, rows, family.columns)
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
        if not args.quick:
            console.print(f"wrote {csv_path} and {png_path}")
    if args.quick:
        write_report(console, families, results, args.out, device, title=report_title(ctx, args))
    first_calls = [row["first_call_s"] for rows in results.values() for row in rows
                   if row["provider"] == COMPILE and row.get("first_call_s") is not None]
    if first_calls:
        console.print(
            f"torch.compile's first calls (compile or cache load): {sum(first_calls):.0f} s of the sweep's "
            f"{sweep_s:.0f} s, over {len(first_calls)} graphs"
        )
    usage = resource.getrusage(resource.RUSAGE_SELF)
    load = os.getloadavg()
    console.print(
        f"since bench.run's import: {time.perf_counter() - _STARTED:.0f} s wall, "
        f"{usage.ru_utime + usage.ru_stime:.0f} s CPU (user + system, all threads of this process); "
        f"load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min)"
    )
    console.print(f"ran under {thp.describe()}")


def report_title(ctx: SweepContext, args) -> str:
    return (
        f"fastkd, representative report (make bench): forward + backward, {ctx.device.type}, "
        f"{torch.get_num_threads()} threads, THP {ctx.thp.short}"
    )


def write_report(console, families: dict[str, Family], results: dict[str, list[dict]], out: Path,
                 device: torch.device, *, title: str) -> None:
    """``--quick``'s files (``report_<device>.csv``: every family's rows, in one
    table of the union of their columns; ``report_<device>.png``) and its two
    tables over all families."""
    rows = [row for family_rows in results.values() for row in family_rows]
    csv_path = out / f"report_{device.type}.csv"
    png_path = out / f"report_{device.type}.png"
    report.write_csv(csv_path, rows, report.union_columns(families[name].columns for name in results))

    def label(row: dict) -> str:
        return families[row["family"]].config_label(row)

    plot.plot_report(rows, png_path, title=title, config_label=label)
    report.print_lines(
        console, "fastkd against eager, torch.compile and the floor (same run)", report.SUMMARY_HEADER,
        report.summary_lines(rows, label),
    )
    scaling = report.scaling_lines(rows, label)
    if scaling:
        report.print_lines(console, "thread scaling", report.SCALING_HEADER, scaling)
    console.print(report.measuring_line(rows))
    console.print(f"wrote {csv_path} and {png_path}")


if __name__ == "__main__":
    main()
