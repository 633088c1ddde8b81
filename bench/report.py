"""Report: the ratios of a sweep's rows (to the floor, to ``eager``, to
``compile``), the CSV files, and the terminal's progress bar and tables.

Speed-ups are ratios of medians measured in the same run, against the
``eager`` and ``compile`` providers of the same configuration; ``x_floor`` is
how many memory-traffic floors a provider takes, ``x_gemm_floor`` how many
GEMM floors. The representative report (``make bench``) adds two tables over
all families: :func:`summary_lines` (each fastkd provider against eager,
compile and the floor, with the rates behind the floor) and
:func:`scaling_lines` (one thread against all).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from bench.measure import floor_ms

EAGER = "eager"
COMPILE = "compile"
# Marks the provider of a row measured with one thread (Family.scaling_configs).
ONE_THREAD = " (1 thread)"

# ----------------------------------------------------------------------------- rows and ratios


def add_floor_and_ratios(rows: list[dict], bandwidth: float, group_keys: Sequence[str]) -> None:
    """Fill ``floor_ms``, ``copy_gbs``, ``x_floor``, ``speedup_vs_eager`` and
    ``speedup_vs_compile`` in place.

    ``floor_ms`` is the row's ``traffic_bytes`` (the bytes its family counts
    as the least any implementation must move) at ``bandwidth`` bytes/s, or
    at the row's own ``copy_gbs`` where it has one (a row measured with fewer
    threads, next to the copy bandwidth of that many threads); a family whose
    loss is compute-bound gives ``traffic_bytes`` None and gets no floor
    (``floor_ms`` and ``x_floor`` None).
    Speed-ups are taken within one configuration (the rows sharing
    ``group_keys``) and thread count, between medians measured in this run.
    """

    def key(row: dict) -> tuple:
        return (*(row[k] for k in group_keys), row.get("threads"))

    baselines: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row["provider"] in (EAGER, COMPILE) and row.get("median_ms") is not None:
            baselines.setdefault(key(row), {})[row["provider"]] = row["median_ms"]
    for row in rows:
        if row.get("copy_gbs") is None:
            row["copy_gbs"] = bandwidth / 1e9
        traffic = row.get("traffic_bytes")
        row["floor_ms"] = None if traffic is None else floor_ms(traffic, row["copy_gbs"] * 1e9)
        ms = row.get("median_ms")
        base = baselines.get(key(row), {})
        row["x_floor"] = ms / row["floor_ms"] if ms and row["floor_ms"] else None
        row["speedup_vs_eager"] = base[EAGER] / ms if ms and EAGER in base else None
        row["speedup_vs_compile"] = base[COMPILE] / ms if ms and COMPILE in base else None


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_csv(path: Path, rows: Iterable[dict], columns: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])


def _parse(text: str):
    """A CSV cell back to ``None``, an int, a float or the text."""
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_csv(path: Path) -> list[dict]:
    """The rows :func:`write_csv` wrote, empty cells as None and numbers as numbers."""
    with open(path, newline="") as source:
        return [{key: _parse(value) for key, value in row.items()} for row in csv.DictReader(source)]


# ----------------------------------------------------------------------------- terminal report

def make_progress(console):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


# The table's columns: (row key, header, format). Every table starts with the
# time and memory, ends with the ratios and the load; a family puts its own
# metrics in between (default: the memory-traffic floor).
TABLE_HEAD = (
    ("median_ms", "median ms", ".1f"),
    ("repeats", "runs", "d"),
    ("peak_extra_mib", "peak extra MiB", ".0f"),
)
FLOOR_METRICS = (
    ("floor_ms", "floor ms", ".1f"),
    ("x_floor", "× floor", ".1f"),
)
TABLE_TAIL = (
    ("speedup_vs_eager", "vs eager", ".1f"),
    ("speedup_vs_compile", "vs compile", ".2f"),
    ("other_load", "other load", ".2f"),
)
TABLE_COLUMNS = TABLE_HEAD + FLOOR_METRICS + TABLE_TAIL


def print_table(
    console,
    rows: Sequence[dict],
    *,
    title: str,
    config_label: Callable[[dict], str],
    columns: Sequence[tuple[str, str, str]] = TABLE_COLUMNS,
) -> None:
    """One line per measured row: its configuration, provider, and the numbers
    (``columns``: (row key, header, format), default :data:`TABLE_COLUMNS`);
    then one line per provider that was not measured, with the reason."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("configuration")
    table.add_column("provider")
    for _, header, _ in columns:
        table.add_column(header, justify="right")
    previous = None
    for row in rows:
        if row.get("median_ms") is None:
            continue
        config = config_label(row)
        if previous is not None and config != previous:
            table.add_section()
        table.add_row(
            config if config != previous else "",
            row["provider"],
            *(_fmt(row.get(key), spec) for key, _, spec in columns),
        )
        previous = config
    console.print(table)
    for row in rows:
        if row.get("median_ms") is None and row.get("note"):
            console.print(f"  not measured: {row['provider']} ({config_label(row)}): {row['note']}")



# ----------------------------------------------------------------------------- the report over all families


def union_columns(column_lists: Iterable[Sequence[str]]) -> list[str]:
    """The columns of several families, each once, in order of first appearance."""
    return list(dict.fromkeys(c for columns in column_lists for c in columns))


def config_times(rows: Iterable[dict]) -> dict[tuple[str, str], tuple[float, float | None]]:
    """(family, ``config``) → (wall seconds, CPU seconds) of each configuration measured."""
    times = {}
    for row in rows:
        if row.get("config") is not None and row.get("config_s") is not None:
            times[(str(row["family"]), str(row["config"]))] = (row["config_s"], row.get("config_cpu_s"))
    return times


def measuring_line(rows: Iterable[dict]) -> str:
    """The run's measuring time: the configurations' wall and CPU seconds summed."""
    times = config_times(rows)
    wall = sum(w for w, _ in times.values())
    cpu = sum(c for _, c in times.values() if c is not None)
    return (
        f"measuring {len(times)} configurations took {wall:.0f} s wall, {cpu:.0f} s of this process's "
        "CPU time (first calls and compiling included)"
    )


def _ratio(numerator, denominator) -> float | None:
    return numerator / denominator if numerator and denominator else None


SUMMARY_HEADER = (
    "family", "configuration", "provider", "median ms", "vs eager", "vs compile", "floor", "× floor",
    "floor's work", "achieved", "machine", "config s",
)


def summary_lines(rows: Sequence[dict], config_label: Callable[[dict], str]) -> list[list[str]]:
    """One line per measured ``fastkd-*`` row at the full thread count: its time,
    its ratios to ``eager`` and ``compile``, and its floor with the numbers
    behind it. A copy floor (memory-bound loss): the bytes the loss must move,
    the rate they move at (those bytes / median time) and the copy bandwidth
    measured in the run. A GEMM floor (a loss bound by matrix products): their
    GFLOP, the rate the loss runs them at (GFLOP / median time) and the rate of
    ``torch.mm`` at the same shapes. ``config s``: the configuration's wall time
    in the run, first calls (compiling) included."""
    lines = []
    for row in rows:
        provider = str(row["provider"])
        measured = row.get("median_ms") is not None
        if not (provider.startswith("fastkd-") and measured) or provider.endswith(ONE_THREAD):
            continue
        ms = row["median_ms"]
        if row.get("floor_ms") is not None:
            floor = ["copy " + _fmt(row["floor_ms"], ".1f") + " ms", _fmt(row.get("x_floor"), ".2f"),
                     _fmt(row["traffic_bytes"] / 1e6, ".0f") + " MB",
                     _fmt(row["traffic_bytes"] / 1e6 / ms, ".1f") + " GB/s",
                     _fmt(row.get("copy_gbs"), ".1f") + " GB/s"]
        elif row.get("gemm_floor_ms") is not None:
            floor = ["GEMM " + _fmt(row["gemm_floor_ms"], ".1f") + " ms",
                     _fmt(row.get("x_gemm_floor"), ".2f"),
                     _fmt(row["gemm_gflop"], ".1f") + " GFLOP",
                     _fmt(row["gemm_gflop"] / ms * 1e3, ".1f") + " GFLOP/s",
                     _fmt(row.get("gemm_gflops"), ".1f") + " GFLOP/s"]
        else:
            floor = ["—"] * 5
        lines.append([
            str(row["family"]), config_label(row), provider, _fmt(ms, ".1f"),
            _fmt(row.get("speedup_vs_eager"), ".1f"), _fmt(row.get("speedup_vs_compile"), ".2f"), *floor,
            _fmt(row.get("config_s"), ".0f"),
        ])
    return lines


SCALING_HEADER = (
    "family", "configuration", "provider", "ms, 1 thread", "ms, all", "loss speed-up", "machine, 1 thread",
    "machine, all", "machine speed-up",
)


def scaling_lines(rows: Sequence[dict], config_label: Callable[[dict], str]) -> list[list[str]]:
    """One line per row measured with one thread (``<provider> (1 thread)``) and
    its row at the full thread count: both times, the speed-up the other threads
    give the loss, and the same for the machine's rate that bounds it (the copy
    bandwidth for a copy floor, ``torch.mm`` at the loss's shapes for a GEMM
    floor). A loss speed-up below the machine's is scaling the loss loses
    itself; equal to it, scaling the machine does not have."""
    full = {
        (row["family"], config_label(row), row["provider"]): row
        for row in rows if row.get("median_ms") is not None and not str(row["provider"]).endswith(ONE_THREAD)
    }
    lines = []
    for one in rows:
        provider = str(one["provider"])
        if not provider.endswith(ONE_THREAD) or one.get("median_ms") is None:
            continue
        name = provider.removesuffix(ONE_THREAD)
        many = full.get((one["family"], config_label(one), name))
        if many is None:
            continue
        if one.get("floor_ms") is not None:
            machine = (one.get("copy_gbs"), many.get("copy_gbs"), "GB/s copy")
        elif one.get("gemm_floor_ms") is not None:
            machine = (one.get("gemm_gflops"), many.get("gemm_gflops"), "GFLOP/s mm")
        else:
            machine = (None, None, "")
        low, high, unit = machine
        lines.append([
            str(one["family"]), config_label(one), name,
            _fmt(one["median_ms"], ".1f"), _fmt(many["median_ms"], ".1f"),
            _fmt(_ratio(one["median_ms"], many["median_ms"]), ".2f") + "×",
            f"{_fmt(low, '.1f')} {unit}".strip(), f"{_fmt(high, '.1f')} {unit}".strip(),
            _fmt(_ratio(high, low), ".2f") + "×",
        ])
    return lines


def print_lines(
    console, title: str, header: Sequence[str], lines: Sequence[Sequence[str]], *, text_columns: int = 3
) -> None:
    """A rich table of ready-made cells, the first ``text_columns`` left-aligned."""
    from rich.table import Table

    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i < text_columns else "right")
    for line in lines:
        table.add_row(*line)
    console.print(table)
