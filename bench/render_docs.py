"""Write ``docs/benchmarks.md`` from the benchmark results.

    python -m bench.render_docs [--results bench/results] [--out docs/benchmarks.md] [--check]

Every ``<results>/<stem>_<device>.csv`` whose stem is a family
(``bench/bench_<stem>.py``) becomes one section: what was measured (the
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
from bench.report import read_csv
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
        "`make bench` (`python -m bench.run`) measures every loss family against plain PyTorch (`eager`: the "
        "reference formula in `fastkd/reference`) and `torch.compile` of the same formula (`compile`), and "
        "writes `bench/results/<family>_<device>.csv` and `.png`; `python -m bench.render_docs` writes this "
        "page from those files.",
        "",
        "How to read the numbers:",
        "",
        "- A measurement is one forward + backward call, timed as the median of repeated runs after an "
        "untimed first call (which also compiles `compile`). The providers of one configuration take turns, "
        "and the turns are repeated while other processes load the machine; `other load` is how many cores "
        "they kept busy during the kept attempt.",
        "- `vs eager` and `vs compile` are ratios of medians from the same run: how many times faster than "
        "that provider on the same configuration.",
        "- `floor ms` is the least time any implementation needs to read the inputs once and write the "
        "outputs once at the copy bandwidth measured in the same run; `× floor` is how many floors a "
        "provider takes. Compute-bound families report GFLOP/s (or gather throughput) instead.",
        "- `peak extra MiB` is the memory a call holds at its peak above what existed before it (resident "
        "set size on CPU, allocator statistics on CUDA), gradients included.",
        "",
        "## Summary",
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
