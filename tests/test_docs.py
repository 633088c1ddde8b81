"""The project explains itself: README within its budget, every local link resolves,
and nothing points at documents outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def tracked_text_files() -> list[Path]:
    listing = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False)
    if listing.returncode != 0:
        pytest.skip("not a git checkout")
    suffixes = {".py", ".md", ".h", ".cuh", ".cpp", ".cu", ".toml", ".txt", ".sh", ""}
    return [ROOT / name for name in listing.stdout.splitlines() if Path(name).suffix in suffixes]


def test_readme_stays_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_local_links_resolve(document):
    broken = []
    for target in LINK.findall(document.read_text(encoding="utf-8")):
        if "://" in target or target.startswith(("#", "mailto:")):
            continue
        path = target.split("#", 1)[0]
        if not (document.parent / path).exists():
            broken.append(target)
    assert not broken, f"{document.name} links to missing files: {broken}"


def test_nothing_points_outside_the_repository():
    pattern = re.compile(r"\.\./shared|\bSPEC\.md\b|\bDESIGN\.md\b|\bSTYLE\.md\b")
    offenders = [
        str(path.relative_to(ROOT))
        for path in tracked_text_files()
        if path.is_file() and path != Path(__file__) and pattern.search(path.read_text(errors="ignore"))
    ]
    assert not offenders, f"these files refer to documents users do not have: {offenders}"


def test_losses_namespace_holds_every_module_form():
    """README promises every module form in ``fastkd.losses``."""
    import torch

    import fastkd
    import fastkd.losses

    forms = {name for name, obj in vars(fastkd).items()
             if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and name.endswith("Loss")}
    assert forms and forms == set(fastkd.losses.__all__)
