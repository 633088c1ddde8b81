"""Report: the ratios of a sweep's rows (to the floor, to ``eager``, to
``compile``), the CSV files, and the terminal's progress bar and tables.

Speed-ups are ratios of medians measured in the same run, against the
``eager`` and ``compile`` providers of the same configuration; ``x_floor`` is
how many memory-traffic floors a provider takes.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from bench.measure import floor_ms

EAGER = "eager"
COMPILE = "compile"

# ----------------------------------------------------------------------------- rows and ratios


def add_floor_and_ratios(rows: list[dict], bandwidth: float, group_keys: Sequence[str]) -> None:
    """Fill ``floor_ms``, ``copy_gbs``, ``x_floor``, ``speedup_vs_eager`` and
    ``speedup_vs_compile`` in place.

    ``floor_ms`` is the row's ``traffic_bytes`` (the bytes its family counts
    as the least any implementation must move) at ``bandwidth`` bytes/s; a
    family whose loss is compute-bound gives ``traffic_bytes`` None and gets
    no floor (``floor_ms`` and ``x_floor`` None).
    Speed-ups are taken within one configuration (the rows sharing
    ``group_keys``), between medians measured in this run.
    """
    baselines: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row["provider"] in (EAGER, COMPILE) and row.get("median_ms") is not None:
            baselines.setdefault(tuple(row[k] for k in group_keys), {})[row["provider"]] = row["median_ms"]
    for row in rows:
        traffic = row.get("traffic_bytes")
        row["floor_ms"] = None if traffic is None else floor_ms(traffic, bandwidth)
        row["copy_gbs"] = bandwidth / 1e9
        ms = row.get("median_ms")
        base = baselines.get(tuple(row[k] for k in group_keys), {})
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

