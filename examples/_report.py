"""The report side every example shares: where its results go, the per-seed
statistics of a row, the csv of the rows and the optional matplotlib figure.

An example imports it as a sibling module (``examples/`` on ``sys.path``, as
when it runs as a script); matplotlib is optional: without it an example
writes its csv only.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import statistics
import sys
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def load_example(stem: str):
    """``examples/<stem>.py`` as the module ``fastkd_example_<stem>``, loaded once,
    for an example built on another's corpus, models and training loop."""
    name = f"fastkd_example_{stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{stem}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def argument_parser(doc: str, *, seeds: int, smoke: str, threads: str, name: str) -> argparse.ArgumentParser:
    """The options every example takes (``--seeds``, ``--smoke``, ``--methods``,
    ``--out``, ``--threads``), described by the example's docstring's first
    line; the example adds its own. ``smoke`` and ``threads`` complete the
    help of those options; ``name``: the stem of the written files."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=seeds)
    parser.add_argument("--smoke", action="store_true", help=smoke)
    parser.add_argument("--methods", nargs="*", help="only these METHODS names")
    parser.add_argument(
        "--out", type=Path, default=None,
        help=f"where {name}.csv / {name}.png go (default examples/results; a temporary folder with --smoke)",
    )
    parser.add_argument("--threads", type=int, default=1, help=f"torch threads ({threads})")
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None, smoke_name: str):
    """``argv`` parsed; ``out`` resolved by :func:`output_folder` (``smoke_name``
    names the temporary folder) and torch's thread count set to ``threads``."""
    args = parser.parse_args(argv)
    args.out = output_folder(args.out, args.smoke, smoke_name)
    torch.set_num_threads(args.threads)
    return args


def output_folder(out: Path | None, smoke: bool, name: str) -> Path:
    """``--out`` if given; else a fresh temporary folder for a ``--smoke`` run
    (so that it never overwrites the committed results), else examples/results."""
    if out is not None:
        return out
    return Path(tempfile.mkdtemp(prefix=f"fastkd-{name}-smoke-")) if smoke else RESULTS


def summary(method: str, params: int, note: str, **metrics: tuple[str, list[float]]) -> dict:
    """A result row from per-seed values, ``key=(column, values)`` per metric:
    ``method``, ``params``, ``seeds``, then ``{key}_mean`` and ``{key}_std``
    of each metric (std 0 for one seed), then each metric's values under
    ``column``, then ``note``."""
    row = {"method": method, "params": params, "seeds": len(next(iter(metrics.values()))[1])}
    for key, (_, values) in metrics.items():
        row[f"{key}_mean"] = statistics.fmean(values)
        row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    for column, values in metrics.values():
        row[column] = values
    return {**row, "note": note}


def write_results(out: Path, name: str, rows: list[dict], fields: list[str], series: tuple[str, ...],
                  draw) -> list[Path]:
    """Writes ``out/<name>.csv`` (see :func:`write_csv`) and, when matplotlib is
    installed, the figure ``draw(plt)`` returns as ``out/<name>.png``; prints
    and returns the paths written."""
    written = [out / f"{name}.csv"]
    write_csv(written[0], rows, fields, series)
    plt = pyplot()
    if plt is not None:
        fig = draw(plt)
        fig.tight_layout()
        written.append(out / f"{name}.png")
        fig.savefig(written[1])
        plt.close(fig)
    for path in written:
        print(f"wrote {path}")
    return written


def write_csv(path: Path, rows: list[dict], fields: list[str], series: tuple[str, ...] = ()) -> None:
    """The rows as csv with columns ``fields``; the per-seed lists named in
    ``series`` as space-separated numbers with four decimals."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **{key: " ".join(f"{x:.4f}" for x in row[key]) for key in series}})


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or None (said on
    stderr) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    return plt


def point_panels(plt, rows: list[dict], panels: tuple[tuple[str, str, float], ...],
                 figsize: tuple[float, float]):
    """A figure of side-by-side panels, one per ``(key, label, factor)``: each
    row's ``factor · {key}_mean ± factor · {key}_std`` as a point with error
    bars, the rows top to bottom, named on the first panel. Returns
    ``(figure, axes)``."""
    fig, axes = plt.subplots(1, len(panels), figsize=figsize, dpi=100, squeeze=False)
    axes = list(axes[0])
    names = [r["method"] for r in rows]
    for ax, (key, label, factor) in zip(axes, panels, strict=True):
        means = [factor * r[f"{key}_mean"] for r in rows]
        stds = [factor * r[f"{key}_std"] for r in rows]
        # points, not bars: the axes do not start at zero
        ax.errorbar(means, range(len(rows)), xerr=stds, fmt="o", color="#4c72b0", capsize=3)
        ax.set_yticks(range(len(rows)), names if ax is axes[0] else [""] * len(rows))
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel(label, fontsize=8)
    return fig, axes


def n_params(model) -> int:
    """The parameter count of an ``nn.Module``, as the reports state it."""
    return sum(p.numel() for p in model.parameters())
