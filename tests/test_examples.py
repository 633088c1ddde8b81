"""The digits example's end-to-end run (a few steps per method, the `--smoke` mode).

Needs the `examples` extra (scikit-learn): `make examples-smoke` installs it
and runs the tests marked `examples`; `make test` deselects them.
"""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.examples

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits.py"


def load_example():
    spec = importlib.util.spec_from_file_location("fastkd_example_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_digits_smoke(tmp_path, capsys):
    digits = load_example()
    rows = digits.main(["--smoke", "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == [m.name for m in digits.METHODS]
    assert all(0.0 <= r["mean"] <= 1.0 and len(r["accuracies"]) == 1 for r in rows)
    with open(tmp_path / "digits.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == [m.name for m in digits.METHODS]
    printed = capsys.readouterr().out
    assert "| student alone |" in printed and "| teacher |" in printed
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "digits.png").stat().st_size > 0
