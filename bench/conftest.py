"""Collect ``bench_<stem>.py`` modules too, so ``pytest bench/`` runs their
checks of the families' own helpers (pytest's default only collects
``test_*.py``); ``test_harness.py`` runs every family's small pytest-benchmark
configurations."""

import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
