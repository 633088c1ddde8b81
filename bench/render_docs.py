"""Write ``docs/benchmarks.md`` from the benchmark results.

    python -m bench.render_docs [--results bench/results] [--out docs/benchmarks.md] [--check]

``<results>/report_<device>.csv``, the representative report (``make bench``),
becomes the first section: its summary of every fastkd provider against
``eager``, ``compile`` and the floor, its thread scaling, and its plot.
Every ``<results>/<stem>_<device>.csv`` whose stem is a family
(``bench/bench_<stem>.py``), the full sweep (``make bench-full``), becomes one section: what was measured (the
family module's first paragraph), the machine and run it came from (the CSV's
``device``, ``machine``, ``threads``, ``torch``, ``thp``, ``copy_gbs`` and
``other_load`` columns), one table with the family's report columns (time,
peak extra memory, the family's metrics or the memory-traffic floor, the
ratios to ``eager`` and ``compile``), the providers not measured and why, and
the plot. A summary table first gives, per family, the range of fastkd's
ratios. ``--check`` writes nothing and exits 1 when the file differs from
what it would write.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable
from pathlib import Path

from bench.family import Family
from bench.measure import CONTENDED_LOAD
from bench.report import (
    SCALING_HEADER,
    SUMMARY_HEADER,
    measuring_line,
    read_csv,
    scaling_lines,
    summary_lines,
)
from bench.run import discover

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
OUT = ROOT / "docs" / "benchmarks.md"
# Columns the report tables show that add nothing to a page read later.
LEFT_OUT = {"repeats"}


def _cell(value, spec: str) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def _markdown(text: str) -> str:
    """reStructuredText literals (````x````) as Markdown code (`` `x` ``)."""
    return text.replace("``", "`")


def _table(header: list[str], lines: Iterable[list[str]], left: Iterable[int] = (0, 1)) -> list[str]:
    """A Markdown table; the columns ``left`` (indices, negative from the end) are
    text, aligned left, the others numbers, aligned right."""
    text = {i % len(header) for i in left}
    align = ["---" if i in text else "---:" for i in range(len(header))]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines]
    return out


def summary_paragraph(stem: str) -> str:
    """The first paragraph of ``bench/bench_<stem>.py``'s docstring, on one line."""
    doc = importlib.import_module(f"bench.bench_{stem}").__doc__ or ""
    return _markdown(" ".join(doc.strip().split("\n\n")[0].split()))


def _values(rows: list[dict], column: str) -> list:
    return list(dict.fromkeys(row.get(column) for row in rows if row.get(column) not in (None, "")))


def machine_line(rows: list[dict]) -> str:
    """Where and how the rows were measured, from their columns."""
    parts = []
    missing = []
    for column in ("device", "machine", "threads", "torch"):
        values = _values(rows, column)
        if values:
            parts.append(f"{column} {', '.join(map(str, values))}")
        else:
            missing.append(column)
    bandwidth = _values(rows, "copy_gbs")
    if bandwidth:
        parts.append("copy bandwidth " + ", ".join(f"{b:.1f} GB/s" for b in bandwidth))
    thp = _values(rows, "thp")
    if thp:
        parts.append("THP (`THP_MEM_ALLOC_ENABLE`/kernel mode) " + ", ".join(thp))
    loads = [row["other_load"] for row in rows if isinstance(row.get("other_load"), (int, float))]
    if loads:
        parts.append(f"other processes' load during timing {_range(loads, '.2f')} cores")
    if missing:
        parts.append(f"not recorded in the file: {', '.join(missing)}")
    return "; ".join(parts) + "."


def _range(values: list[float], spec: str) -> str:
    if not values:
        return "—"
    low, high = min(values), max(values)
    return format(low, spec) if format(low, spec) == format(high, spec) else f"{low:{spec}}–{high:{spec}}"


def summary_table(results: dict[str, list[dict]]) -> list[str]:
    """Per family: the range over configurations of each ``fastkd-*`` provider's ratios."""
    lines = []
    for stem, rows in results.items():
        fastkd = [row for row in rows if str(row["provider"]).startswith("fastkd-") and row.get("median_ms")]
        for provider in _values(fastkd, "provider"):
            mine = [row for row in fastkd if row["provider"] == provider]

            def ratios(column, mine=mine):
                return [row[column] for row in mine if isinstance(row.get(column), (int, float))]

            lines.append([
                f"[{stem}](#{stem})", provider, str(len(mine)),
                _range(ratios("speedup_vs_eager"), ".1f"), _range(ratios("speedup_vs_compile"), ".2f"),
                _range(ratios("x_floor"), ".1f"),
            ])
    header = ["family", "provider", "configurations", "× faster than eager", "× faster than compile",
              "× the floor"]
    return _table(header, lines)


def _shown(path: Path) -> str:
    """``path`` relative to the repository where it lies inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def family_section(stem: str, family: Family, rows: list[dict], csv: Path, png: Path | None) -> list[str]:
    columns = [c for c in family.table_columns if c[0] not in LEFT_OUT]
    measured = [row for row in rows if row.get("median_ms") is not None]
    header = ["configuration", "provider", *(c[1] for c in columns), "note"]
    lines = [
        [family.config_label(row), str(row["provider"]), *(_cell(row.get(k), spec) for k, _, spec in columns),
         _markdown(str(row.get("note") or ""))]
        for row in measured
    ]
    out = [
        f"## {stem}", "", summary_paragraph(stem), "",
        f"From `{_shown(csv)}`: {machine_line(rows)}", "",
    ]
    if not any(row.get("floor_ms") for row in measured):
        out += ["No memory-traffic floor: the family's cost is compute or a random gather, not streaming "
                "(see the family's metrics).", ""]
    out += _table(header, lines, left=(0, 1, -1))
    skipped = [row for row in rows if row.get("median_ms") is None and row.get("note")]
    reasons: dict[tuple[str, str], list[str]] = {}
    for row in skipped:
        key = (str(row["provider"]), _markdown(str(row["note"])))
        reasons.setdefault(key, []).append(family.config_label(row))
    if reasons:
        out += ["", "Not measured:", ""]
        out += [f"- {name} ({', '.join(configs)}): {note}" for (name, note), configs in reasons.items()]
    if png is not None:
        out += ["", f"![{stem}](../{_shown(png)})"]
    return out + [""]


def _contention_warning(rows: list[dict]) -> list[str]:
    """A paragraph where other processes loaded the machine during the timing."""
    loads = [row["other_load"] for row in rows if isinstance(row.get("other_load"), (int, float))]
    if not loads or max(loads) <= CONTENDED_LOAD:
        return []
    return [
        f"**Timed on a loaded machine**: other processes kept {_range(loads, '.2f')} cores busy while "
        "timing, so every time, ratio and rate of this run, the copy bandwidth and GEMM rate included, is "
        "distorted; the run shows that every family is measured and what the report holds, not fastkd's "
        "speed. Run `make bench` on an idle machine for numbers to quote.", "",
    ]


def report_section(path: Path, families: dict[str, Family]) -> list[str]:
    """The representative report's section, from ``report_<device>.csv`` (rows of
    families no longer in ``bench/`` are left out)."""
    device = path.stem.removeprefix("report_")
    rows = [row for row in read_csv(path) if row.get("family") in families]

    def label(row: dict) -> str:
        return families[row["family"]].config_label(row)

    title = "Representative report (`make bench`)" + ("" if device == "cpu" else f", {device}")
    out = [
        f"## {title}", "",
        f"From `{_shown(path)}`: {machine_line(rows)}", "",
        f"In that run, {measuring_line(rows)}.", "",
        *_contention_warning(rows),
        "Every fastkd provider at the full thread count; the CSV file has every provider's row. `floor` is "
        "the copy floor (the bytes the loss must move at the copy bandwidth) or the GEMM floor (the matrix "
        "products the loss needs, timed with `torch.mm` at the same shapes); `floor's work` is those "
        "bytes or GFLOP, `achieved` the rate the loss reaches on them, `machine` the rate measured "
        "in the run. `config s` is the configuration's wall time in the run, compiling included.", "",
        *_table(list(SUMMARY_HEADER), summary_lines(rows, label), left=(0, 1, 2)),
    ]
    scaling = scaling_lines(rows, label)
    if scaling:
        out += [
            "", "Thread scaling: the same configuration with one thread, against the machine's rate that "
            "bounds it measured with one thread too (copy bandwidth, or `torch.mm` at the loss's shapes). A "
            "loss speed-up below the machine's is scaling the loss itself loses.", "",
            *_table(list(SCALING_HEADER), scaling, left=(0, 1, 2)),
        ]
    png = path.with_suffix(".png")
    if png.exists():
        out += ["", f"![representative report](../{_shown(png)})"]
    return out + [""]


def render(results_dir: Path = RESULTS) -> str:
    """``docs/benchmarks.md`` for the CSV files in ``results_dir``."""
    families = discover()
    results: dict[str, list[dict]] = {}
    files = {}
    for path in sorted(results_dir.glob("*.csv")):
        stem, _, device = path.stem.rpartition("_")
        if stem in families:
            key = stem if device == "cpu" else f"{stem}_{device}"
            results[key] = read_csv(path)
            files[key] = (stem, path)
    out = [
        "<!-- Written by `python -m bench.render_docs` from bench/results/*.csv: edit those, or the "
        "script. -->",
        "",
        "# Benchmarks",
        "",
        "The benchmarks measure every loss family against plain PyTorch (`eager`: the reference formula in "
        "`fastkd/reference`) and `torch.compile` of the same formula (`compile`), with the machine's limits "
        "measured in the same run. Two plans write separate files:",
        "",
        "- `make bench` (`python -m bench.run --quick`, under 10 minutes on two cores): the representative "
        "report, one or two configurations per family (each family's `report_configs`), fewer timed runs, "
        "the dense divergence and InfoNCE also with one thread; `bench/results/report_<device>.csv` (all "
        "families in one file) and `report_<device>.png`.",
        "- `make bench-full` (`python -m bench.run`, over half an hour on two cores): every configuration "
        "of every family; `bench/results/<family>_<device>.csv` and `.png`.",
        "",
        "`python -m bench.render_docs` (run by both targets) writes this page from whichever files are in "
        "`bench/results/`: a run of one plan leaves the other's files as they were.",
        "",
        "How to read the numbers:",
        "",
        "- A measurement is one forward + backward call, timed as the median of repeated runs after an "
        "untimed first call (which also compiles `compile`). The providers of one configuration take turns, "
        "and the turns are repeated while other processes load the machine; `other load` is how many cores "
        "they kept busy during the kept attempt. The first call's time is the CSV's `first_call_s`: for "
        "`compile` it is the compile, or the load of the graph from `build/inductor-cache` (the Makefile's "
        "`TORCHINDUCTOR_CACHE_DIR`) on a later run.",
        "- `vs eager` and `vs compile` are ratios of medians from the same run: how many times faster than "
        "that provider on the same configuration.",
        "- `floor ms` is the least time any implementation needs to read the inputs once and write the "
        "outputs once at the copy bandwidth measured in the same run; `× floor` is how many floors a "
        "provider takes. A family bound by matrix products gets a GEMM floor instead: the time `torch.mm` "
        "takes for the products the loss needs, at the same shapes, in the same run (`× GEMM floor`); the "
        "other compute-bound families report GFLOP/s (or gather throughput).",
        "- `(1 thread)` rows are the same configuration measured with one thread, next to the copy "
        "bandwidth and GEMM rate of one thread: where a loss gains less from the second thread than the "
        "machine does, the loss loses the scaling.",
        "- `peak extra MiB` is the memory a call holds at its peak above what existed before it (resident "
        "set size on CPU, allocator statistics on CUDA), gradients included.",
        "",
    ]
    for path in sorted(results_dir.glob("report_*.csv")):
        out += report_section(path, families)
    out += [
        "## Summary",
        "",
        f"The full sweep (`make bench-full`), from `{_shown(results_dir)}/<family>_<device>.csv`.",
        "",
        *summary_table(results),
        "",
    ]
    for key, rows in results.items():
        stem, path = files[key]
        png = path.with_suffix(".png")
        out += family_section(stem, families[stem], rows, path, png if png.exists() else None)
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.render_docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs from the rendering")
    args = parser.parse_args(argv)
    text = render(args.results)
    if args.check:
        current = args.out.read_text() if args.out.exists() else None
        if current != text:
            print(f"{args.out} is not what `python -m bench.render_docs` writes from {args.results}")
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
