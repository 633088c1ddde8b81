"""tests/conftest.py's INTERPRETER_SLOW_CASES name tests that exist.

The list marks Triton-interpreter cases `slow` by node id. A renamed test or
parameter would silently leave the list and return to `make test` (over its
time budget); this collects the listed modules as `make test` does and checks
that every listed id is among the collected ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import INTERPRETER_SLOW_CASES

ROOT = Path(__file__).resolve().parent.parent


def collected_ids(*arguments: str) -> set[str]:
    """Node ids that ``pytest --collect-only`` lists for ``arguments``, run from the repository root."""
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *arguments]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True, timeout=300)
    return set(result.stdout.splitlines())


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="a list for the interpreter")
def test_every_listed_case_is_collected():
    modules = sorted({case.split("::")[0] for case in INTERPRETER_SLOW_CASES})
    missing = sorted(INTERPRETER_SLOW_CASES - collected_ids(*modules))
    assert not missing, f"listed in INTERPRETER_SLOW_CASES but not collected: {missing}"
    # and `make test`'s marker expression leaves them out
    assert not INTERPRETER_SLOW_CASES & collected_ids("-m", "not slow", *modules)
