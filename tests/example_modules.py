"""The example scripts (examples/*.py) as modules, for the tests of their pieces and smoke runs."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(stem: str):
    """examples/<stem>.py executed as the module ``fastkd_example_<stem>``,
    registered in sys.modules (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(f"fastkd_example_{stem}", EXAMPLES / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_smoke(
    stem: str, tmp_path: Path, capsys, csv_extra_rows: tuple[str, ...], printed_rows: tuple[str, ...]
):
    """``examples/<stem>.py --smoke --out tmp_path``, checked for what every
    example's run does: one returned row per METHODS entry, in order; the csv's
    rows those and ``csv_extra_rows``; ``printed_rows`` in the printed table;
    the png written when matplotlib is installed. Returns ``(module, rows)``."""
    example = load_example(stem)
    rows = example.main(["--smoke", "--out", str(tmp_path)])
    names = [m.name for m in example.METHODS]
    assert [r["method"] for r in rows] == names
    with open(tmp_path / f"{stem}.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == names + list(csv_extra_rows)
    printed = capsys.readouterr().out
    assert all(f"| {name} |" in printed for name in printed_rows), printed
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / f"{stem}.png").stat().st_size > 0
    return example, rows
