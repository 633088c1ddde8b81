"""The source layout: one stem per loss family in every layer, and an acyclic fastkd package.

A family's files carry the same stem in every layer (``fastkd/<stem>.py``,
``fastkd/reference/<stem>.py``, ``kernels/<stem>.py``, ``csrc/common/<stem>_*.h``,
``csrc/cpu/<stem>*.cpp``, ``csrc/cuda/<stem>.cu``, ``tests/test_<stem>*.py``,
``bench/bench_<stem>.py``), so a loss is found by its name. Shared machinery
lives in underscore modules; one family module does not import another.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastkd"

# family stem -> the files it must have, relative to the repository root; a
# pattern with "*" must match at least one file.
FAMILIES = {
    "divergence": (
        "fastkd/divergence.py", "fastkd/reference/divergence.py", "kernels/divergence.py",
        "csrc/common/divergence_*.h", "csrc/cpu/divergence.cpp", "csrc/cpu/divergence_kernel.cpp",
        "csrc/cpu/divergence_kernel.h", "csrc/cuda/divergence.cu", "tests/test_divergence*.py",
        "bench/bench_divergence.py",
    ),
    "mixture": (
        "fastkd/mixture.py", "fastkd/reference/mixture.py", "kernels/mixture.py", "csrc/common/mixture_*.h",
        "csrc/cpu/mixture.cpp", "csrc/cpu/mixture_kernel.cpp", "csrc/cpu/mixture_kernel.h",
        "csrc/cuda/mixture.cu", "tests/test_mixture*.py", "bench/bench_mixture.py",
    ),
    "topk": (
        "fastkd/topk.py", "fastkd/reference/topk.py", "kernels/topk.py", "csrc/common/topk_*.h",
        "csrc/cpu/topk.cpp", "csrc/cpu/topk_kernel.cpp", "csrc/cpu/topk_kernel.h", "csrc/cuda/topk.cu",
        "tests/test_topk*.py", "bench/bench_topk.py",
    ),
    "fused_linear": (
        "fastkd/fused_linear.py", "fastkd/reference/fused_linear.py", "csrc/cpu/fused_linear_gemm.cpp",
        "tests/test_fused_linear*.py", "bench/bench_fused_linear.py",
    ),
    "vocab_parallel": ("fastkd/vocab_parallel.py", "tests/test_vocab_parallel*.py"),
    "dkd": (
        "fastkd/dkd.py", "fastkd/reference/dkd.py", "kernels/dkd.py", "csrc/cpu/dkd.cpp", "csrc/cuda/dkd.cu",
        "tests/test_dkd*.py",
    ),
    "crd": (
        "fastkd/crd.py", "fastkd/reference/crd.py", "kernels/crd.py", "csrc/cpu/crd.cpp", "csrc/cuda/crd.cu",
        "tests/test_crd*.py", "bench/bench_crd.py",
    ),
    "rkd": (
        "fastkd/rkd.py", "fastkd/reference/rkd.py", "kernels/rkd.py", "csrc/cpu/rkd.cpp",
        "csrc/cpu/rkd_kernel.cpp", "csrc/cpu/rkd_kernel.h", "csrc/cuda/rkd.cu", "tests/test_rkd*.py",
        "bench/bench_rkd.py",
    ),
    "gram_relation": (
        "fastkd/gram_relation.py", "fastkd/reference/gram_relation.py", "kernels/gram_relation.py",
        "csrc/common/gram_relation*.h", "csrc/cpu/gram_relation.cpp", "csrc/cuda/gram_relation.cu",
        "tests/test_gram_relation*.py", "bench/bench_gram_relation.py",
    ),
    "mmd": (
        "fastkd/mmd.py", "fastkd/reference/mmd.py", "kernels/mmd.py", "csrc/common/mmd_*.h",
        "csrc/cpu/mmd.cpp", "csrc/cpu/mmd_kernel.cpp", "csrc/cpu/mmd_kernel.h", "csrc/cuda/mmd.cu",
        "tests/test_mmd*.py", "bench/bench_mmd.py",
    ),
    "nst": ("fastkd/nst.py", "fastkd/reference/nst.py", "tests/test_nst*.py"),
    "info_nce": (
        "fastkd/info_nce.py", "fastkd/reference/info_nce.py", "kernels/info_nce.py", "csrc/cpu/info_nce.cpp",
        "csrc/cpu/info_nce_kernel.cpp", "csrc/cpu/info_nce_kernel.h", "csrc/cuda/info_nce.cu",
        "tests/test_info_nce*.py", "bench/bench_info_nce.py",
    ),
    "attention_transfer": (
        "fastkd/attention_transfer.py", "fastkd/reference/attention_transfer.py",
        "kernels/attention_transfer.py", "csrc/cpu/attention_transfer.cpp", "csrc/cuda/attention_transfer.cu",
        "tests/test_attention_transfer*.py",
    ),
    "hint": ("fastkd/hint.py", "fastkd/reference/hint.py", "tests/test_hint*.py"),
    "attention_relation": (
        "fastkd/attention_relation.py", "fastkd/reference/attention_relation.py",
        "kernels/attention_relation.py", "csrc/cpu/attention_relation.cpp", "csrc/cuda/attention_relation.cu",
        "tests/test_attention_relation*.py",
        "bench/bench_attention_relation.py",
    ),
    "hidden_state": (
        "fastkd/hidden_state.py", "fastkd/reference/hidden_state.py", "kernels/hidden_state.py",
        "csrc/common/hidden_state_op.h", "csrc/cpu/hidden_state.cpp", "csrc/cuda/hidden_state.cu",
        "tests/test_hidden_state*.py", "bench/bench_hidden_state.py",
    ),
    "uld": (
        "fastkd/uld.py", "fastkd/reference/uld.py", "kernels/uld.py", "csrc/cpu/uld.cpp", "csrc/cuda/uld.cu",
        "tests/test_uld*.py", "bench/bench_uld.py",
    ),
}

# The files of each layer that belong to no family (shared machinery); every
# other file there must start with a family's stem.
NOT_FAMILIES = {
    # token_alignment.py: the cross-tokenizer alignment and merge that feed a
    # loss, plain PyTorch with no kernels: a preprocessing step, not a loss family.
    "fastkd": ("__init__.py", "_*.py", "distiller.py", "distributed.py", "functional.py", "losses.py",
               "token_alignment.py"),
    "fastkd/reference": ("__init__.py", "_*.py"),
    "kernels": ("__init__.py", "_*.py"),
    "csrc/common": ("checks.h",),
    "csrc/cpu": (
        "allocation.*", "capability.*", "vec_math.h", "row_sums.h", "single_threaded_tasks.h",
        "thread_invariant_mm.h", "quiet_avx512_intrinsics.h",
    ),
    "csrc/cuda": (
        "cuda_module.cpp", "block_reduce.cuh", "float_dispatch.cuh", "hard_label.cuh", "op_scope.cuh",
    ),
    "bench": ("*.py",),  # only bench_*.py files are family files there
}
LAYER_SUFFIXES = {"fastkd": ".py", "fastkd/reference": ".py", "kernels": ".py"}

# Family modules that import another family on purpose: fastkd.divergence is
# the entry point that routes (K, ..., V) teachers to mixture and a
# vocabulary-sharded process_group to vocab_parallel; the references of the
# top-k, mixture and fused-linear losses, and ULD's hybrid matched term, are
# defined through the dense divergence.
ALLOWED_FAMILY_IMPORTS = {
    ("fastkd.divergence", "fastkd.mixture"),
    ("fastkd.divergence", "fastkd.vocab_parallel"),
    ("fastkd.reference.topk", "fastkd.reference.divergence"),
    ("fastkd.reference.mixture", "fastkd.reference.divergence"),
    ("fastkd.reference.fused_linear", "fastkd.reference.divergence"),
    ("fastkd.reference.uld", "fastkd.reference.divergence"),
}


def _module_files() -> dict[str, Path]:
    """``fastkd.<...>`` module name -> file, for fastkd/**/*.py except the Triton kernels."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[1] == "kernels":
            continue
        parts = list(relative.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fastkd modules that ``name`` imports anywhere in its body (lazy imports included)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
    return {target for target in found if target in modules and target != name}


def _graph() -> dict[str, set[str]]:
    modules = _module_files()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _family_of(module: str) -> str | None:
    """The family of ``fastkd.<stem>`` / ``fastkd.reference.<stem>``, else None."""
    stem = module.rsplit(".", 1)[-1]
    parent = module.rsplit(".", 1)[0]
    return stem if stem in FAMILIES and parent in ("fastkd", "fastkd.reference") else None


def test_the_import_graph_is_seen():
    graph = _graph()
    assert "fastkd._row_loss" in graph["fastkd.topk"]
    assert "fastkd.reference.divergence" in graph["fastkd.reference.topk"]


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_no_family_module_imports_another_family():
    bad = sorted(
        (source, target)
        for source, targets in _graph().items()
        for target in targets
        if _family_of(source)
        and _family_of(target)
        and _family_of(source) != _family_of(target)
        and source.rsplit(".", 1)[0] == target.rsplit(".", 1)[0]
        and (source, target) not in ALLOWED_FAMILY_IMPORTS
    )
    assert not bad, f"family modules importing other families (use a shared underscore module): {bad}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_files_share_the_stem(family):
    missing = [pattern for pattern in FAMILIES[family] if not any(ROOT.glob(pattern))]
    assert not missing, f"{family}: missing {missing}"


@pytest.mark.parametrize("layer", sorted(NOT_FAMILIES))
def test_every_file_of_a_layer_belongs_to_a_family(layer):
    directory = ROOT / layer
    suffix = LAYER_SUFFIXES.get(layer)
    strays = []
    for path in sorted(directory.iterdir()):
        if not path.is_file() or (suffix and path.suffix != suffix) or path.suffix == ".pyc":
            continue
        name = path.name
        if layer == "bench":
            if name.startswith("bench_") and not any(name == f"bench_{stem}.py" for stem in FAMILIES):
                strays.append(name)
            continue
        if any(path.match(pattern) for pattern in NOT_FAMILIES[layer]):
            continue
        if not any(name.startswith(stem) for stem in FAMILIES):
            strays.append(name)
    assert not strays, f"{layer}: files named after no family: {strays}"
