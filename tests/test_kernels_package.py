"""The Triton kernels package ``kernels/`` (installed as ``fastkd.kernels``): every
public launcher runs under its tensors' device, and the folder, which sits at
the repository root, does not hide an installed package named ``kernels``."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
STEMS = sorted(p.stem for p in (ROOT / "kernels").glob("*.py") if not p.stem.startswith("_"))
LAUNCH = re.compile(r"\b\w+_kernel\[")


def kernel_module(stem: str):
    return importlib.import_module(f"fastkd.kernels.{stem}")


def own_functions(module) -> dict:
    """The functions ``module`` defines itself (not those it imports), guarded ones unwrapped."""
    found = {}
    for name, obj in vars(module).items():
        target = inspect.unwrap(obj) if callable(obj) else obj
        if inspect.isfunction(target) and target.__module__ == module.__name__:
            found[name] = target
    return found


def launching_functions(module) -> set:
    """Names of the module's functions that launch a Triton kernel, directly or
    through the module's own private helpers."""
    functions = own_functions(module)
    sources = {name: inspect.getsource(f) for name, f in functions.items()}
    launching = {name for name, src in sources.items() if LAUNCH.search(src)}
    grew = True
    while grew:
        grew = False
        for name, src in sources.items():
            if name not in launching and any(re.search(rf"\b{h}\(", src) for h in launching):
                launching.add(name)
                grew = True
    return launching


@pytest.mark.parametrize("stem", STEMS)
def test_every_public_launcher_runs_under_its_tensors_device(stem):
    module = kernel_module(stem)
    launchers = [name for name in module.__all__ if inspect.isfunction(inspect.unwrap(getattr(module, name)))]
    assert launchers, f"kernels/{stem}.py lists no launcher in __all__"
    for name in launchers:
        assert getattr(getattr(module, name), "guards_device", False), f"{stem}.{name} lacks @guard_device"
    public = {name for name in launching_functions(module) if not name.startswith("_")}
    assert public <= set(launchers), f"kernels/{stem}.py launches kernels from {public - set(launchers)}"


def test_guard_enters_the_tensors_cuda_device(monkeypatch):
    from fastkd.kernels import _common

    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    seen_inside = []

    @_common.guard_device
    def launcher(x, y=None):
        seen_inside.append(list(entered))
        return x

    cpu = torch.zeros(2)
    assert launcher(cpu) is cpu
    assert entered == [] and seen_inside == [[]]  # CPU tensors: no guard
    monkeypatch.setattr(_common, "_first_tensor_device", lambda args, kwargs: torch.device("cuda", 1))
    launcher(cpu)
    assert entered == [torch.device("cuda", 1)] and seen_inside[-1] == entered


def test_guard_takes_the_first_tensor_argument():
    from fastkd.kernels._common import _first_tensor_device

    t = torch.zeros(1, device="meta")
    assert _first_tensor_device((3, None, t), {}) == t.device
    assert _first_tensor_device((1.0,), {"y": t}) == t.device
    assert _first_tensor_device((1.0,), {}) is None


def run_python(code: str, pythonpath: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(pythonpath), TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_repository_kernels_folder_does_not_hide_an_installed_kernels_package(tmp_path):
    stub = tmp_path / "site" / "kernels"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("STUB = True\n")
    (stub / "layers.py").write_text("LAYERS = 'stub'\n")
    # python started at the repository root: its folder is first on sys.path
    result = run_python("import kernels, kernels.layers; print(kernels.STUB, kernels.layers.LAYERS)",
                        tmp_path / "site")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "stub"]
    code = "import kernels, fastkd.kernels.divergence as d; print(kernels.STUB, d.__name__)"
    result = run_python(code, tmp_path / "site")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "fastkd.kernels.divergence"]
