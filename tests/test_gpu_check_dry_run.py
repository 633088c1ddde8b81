"""bench/gpu_check.sh and bench/gpu_smoke.py without a GPU.

The dry run (``GPU_CHECK_DRY_RUN=1``) runs every stage of the GPU check on
the CPU (Triton interpreter, tiny shapes): its outputs, stage lines and
verdict lines are checked here (``slow``: a few minutes, ``make check``). The
sync check's verdicts are checked against stand-ins for the CUDA calls, and
the deadline by a run that leaves no time for any stage.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from bench import gpu_smoke

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STAGES = ("build", "smoke", "tests", "sync", "bench")
OUTPUTS = {"gpu_check.log", "pytest.xml", "smoke.csv", "sync_check.csv", "bench.tar.gz"}
# What the GPU runner returns at most.
MAX_OUTPUT_FILES = 8


def run_check(out: Path, timeout_s: float, **env) -> subprocess.CompletedProcess:
    """bench/gpu_check.sh's dry run into ``out``, its work folder beside it."""
    environment = {
        **os.environ, "GPU_CHECK_DRY_RUN": "1", "OUT": str(out), "GPU_CHECK_WORK": str(out.parent / "work"),
        "PYTHON": sys.executable, **env,
    }
    return subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout_s
    )


def stage_lines(log: str) -> dict[str, str]:
    """stage name → its summary line (``STAGE <name> <status> <seconds>s``)."""
    return {line.split()[1]: line for line in log.splitlines() if line.startswith("STAGE ")}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dry_run_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    result = run_check(out, timeout_s=1700)
    log = (out / "gpu_check.log").read_text()
    assert result.returncode == 0, f"the dry run exited {result.returncode}:\n{log[-6000:]}{result.stderr}"
    assert {p.name for p in out.iterdir()} == OUTPUTS
    assert len(OUTPUTS) <= MAX_OUTPUT_FILES
    stages = stage_lines(log)
    assert list(stages) == list(STAGES), log[-3000:]
    for line in stages.values():
        assert line.split()[2] == "ok", line
    assert log.rstrip().endswith("GPU_CHECK PASSED")

    # smoke: one verdict per case, backend and dtype, every case judged, none failing
    smoke = read_csv(out / "smoke.csv")
    judged = {row["case"] for row in smoke}
    assert judged == {case.name for case in gpu_smoke.CASES}
    kernel_rows = [row for row in smoke if row["backend"] != gpu_smoke.TORCH_ONLY]
    assert {row["backend"] for row in kernel_rows} == {"cpu", "triton"}
    not_passed = [row for row in smoke if row["verdict"] != "PASS"]
    assert all(row["verdict"] == "SKIP" for row in not_passed), not_passed
    for row in smoke:
        line = f"SMOKE {row['case']} {row['backend']} {row['dtype']}: {row['verdict']}"
        assert line in log

    # sync: skipped on the CPU, with a line saying why
    sync = read_csv(out / "sync_check.csv")
    assert {row["case"] for row in sync} == set(gpu_smoke.SYNC_CASES)
    assert all(row["verdict"] == "SKIP" and "CUDA device" in row["detail"] for row in sync)
    assert "SYNC divergence-kl - -: SKIP" in log

    suite = ET.parse(out / "pytest.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) >= 1 and suite.get("failures") == "0" and suite.get("errors") == "0"
    names = [case.get("name") for case in suite.iter("testcase")]
    assert names and all("triton" in name or "cuda" in name for name in names)

    with tarfile.open(out / "bench.tar.gz") as tar:
        members = set(tar.getnames())
    for divergence in ("kl", "jsd"):
        assert f"bench/{divergence}/divergence_cpu.csv" in members
    assert {f"logs/{name}.log" for name in STAGES} | {"logs/versions.txt"} <= members


def test_no_time_left_skips_every_stage_and_still_writes_the_log(tmp_path):
    # A budget under 10 s: no stage starts, each is reported SKIPPED, the log
    # and the archive of the stage logs still come back, the exit status is 1.
    out = tmp_path / "out"
    result = run_check(out, timeout_s=300, GPU_CHECK_BUDGET_S="5")
    log = (out / "gpu_check.log").read_text()
    assert result.returncode == 1, log
    stages = stage_lines(log)
    assert list(stages) == list(STAGES)
    assert all("SKIPPED" in line for line in stages.values()), stages
    assert {p.name for p in out.iterdir()} == {"gpu_check.log", "bench.tar.gz"}
    assert "=== versions" in log and "torch" in log
    assert log.rstrip().endswith("GPU_CHECK FAILED")


class FakeSyncDebug:
    """Stand-ins for torch.cuda.set_sync_debug_mode / synchronize: remembers the mode."""

    def __init__(self):
        self.mode = 0
        self.modes = []

    def set_sync_debug_mode(self, mode):
        self.mode = mode
        self.modes.append(mode)

    def synchronize(self, device=None):
        pass


def _sync_report(tmp_path, monkeypatch, call):
    fake = FakeSyncDebug()
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", fake.set_sync_debug_mode)
    monkeypatch.setattr(torch.cuda, "synchronize", fake.synchronize)
    case = gpu_smoke.Case("fake", "divergence", gpu_smoke._logits, lambda x, b: call(fake, x, b))
    report = gpu_smoke.Report("sync", torch.device("cpu"), tmp_path / "sync.csv")
    gpu_smoke._sync_case(case, "cpu", torch.device("cpu"), gpu_smoke.TINY, report)
    report.close()
    return fake, read_csv(tmp_path / "sync.csv")


def test_sync_check_fails_a_host_sync_and_restores_the_mode(tmp_path, monkeypatch):
    def syncing(fake, x, backend):
        loss = torch.nn.functional.mse_loss(x["student"], x["teacher"])
        if fake.mode == "error":
            raise RuntimeError("called a synchronizing CUDA operation")
        return loss

    fake, rows = _sync_report(tmp_path, monkeypatch, syncing)
    assert [row["verdict"] for row in rows] == ["FAIL"]
    assert "host sync" in rows[0]["detail"]
    assert fake.modes == ["error", 0]


def test_sync_check_passes_a_path_without_a_sync(tmp_path, monkeypatch):
    def quiet(fake, x, backend):
        return torch.nn.functional.mse_loss(x["student"], x["teacher"])

    fake, rows = _sync_report(tmp_path, monkeypatch, quiet)
    assert [row["verdict"] for row in rows] == ["PASS"]
    assert fake.modes == ["error", 0]


def test_sync_check_tells_an_error_from_a_sync(tmp_path, monkeypatch):
    def broken(fake, x, backend):
        if fake.mode == "error":
            raise ValueError("shape mismatch")
        return torch.nn.functional.mse_loss(x["student"], x["teacher"])

    fake, rows = _sync_report(tmp_path, monkeypatch, broken)
    assert [row["verdict"] for row in rows] == ["ERROR"]
    assert "shape mismatch" in rows[0]["detail"]
