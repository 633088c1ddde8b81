"""The Python enums of fastkd._enums against the C++ enums the kernels compile.

Each C++ enum must be defined exactly once under csrc/ (a header shared by the
cpu and cuda sources), with the same member names and values as its Python
counterpart.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fastkd._enums import DivergenceKind, HiddenStateKind, MMDKernel

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SOURCE_SUFFIXES = (".h", ".cpp", ".cu", ".cuh")

# (C++ enum name, Python enum)
ENUMS = (("Kind", DivergenceKind), ("MmdKernel", MMDKernel), ("HiddenStateKind", HiddenStateKind))


def _python_name(cpp_name: str) -> str:
    """``KL`` → ``KL``, ``kGaussian`` → ``GAUSSIAN``, ``kReverseKl`` → ``REVERSE_KL``."""
    if re.fullmatch(r"k[A-Z]\w*", cpp_name):
        cpp_name = re.sub(r"(?<!^)(?=[A-Z])", "_", cpp_name[1:])
    return cpp_name.upper()


def _definitions(enum_name: str) -> list[tuple[Path, dict[str, int]]]:
    """Every ``enum [class] <enum_name> [: type] { ... };`` under csrc/, with its members."""
    pattern = re.compile(
        rf"\benum\s+(?:class\s+|struct\s+)?{enum_name}\b\s*(?::\s*[\w:]+\s*)?\{{(.*?)\}}", re.S
    )
    found = []
    for path in sorted(CSRC.rglob("*")):
        if path.suffix not in SOURCE_SUFFIXES:
            continue
        text = re.sub(r"//[^\n]*", "", path.read_text())
        for match in pattern.finditer(text):
            members = {}
            for entry in match.group(1).split(","):
                entry = entry.strip()
                if not entry:
                    continue
                name, value = (part.strip() for part in entry.split("="))
                members[_python_name(name)] = int(value, 0)
            found.append((path, members))
    return found


@pytest.mark.parametrize("cpp_name,python_enum", ENUMS, ids=[name for name, _ in ENUMS])
def test_cpp_enum_matches_python(cpp_name, python_enum):
    definitions = _definitions(cpp_name)
    assert definitions, f"no enum {cpp_name} under {CSRC}"
    want = {member.name: int(member) for member in python_enum}
    for path, members in definitions:
        assert members == want, f"{path.relative_to(CSRC.parent)}: enum {cpp_name} {members} != {want}"


@pytest.mark.parametrize("cpp_name", [name for name, _ in ENUMS])
def test_cpp_enum_is_defined_once(cpp_name):
    paths = [str(path.relative_to(CSRC.parent)) for path, _ in _definitions(cpp_name)]
    assert len(paths) == 1, f"enum {cpp_name} is defined in {paths}; define it once, in a shared header"


def test_divergence_kind_names_match_the_divergence_argument():
    """Every ``divergence=`` name maps to its kind by name."""
    from fastkd._validate import DIVERGENCES

    assert [DivergenceKind.from_name(name).name.lower() for name in DIVERGENCES] == list(DIVERGENCES)
