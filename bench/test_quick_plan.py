"""The representative report's plan (``make bench``, ``python -m bench.run --quick``):
every family is in it, with few configurations, and its measured cost fits the
README's budget. Reads the committed ``bench/results/report_cpu.csv``; measures nothing."""

from pathlib import Path

import pytest
import torch

from bench import report
from bench.family import Family, config_key
from bench.measure import gemm_ms
from bench.report import ONE_THREAD
from bench.run import discover

BENCH_DIR = Path(__file__).resolve().parent
REPORT = BENCH_DIR / "results" / "report_cpu.csv"
FAMILIES = discover()
# "One or two shapes each": a family with several terms (RKD, PKT / SP / CC) measures each at one shape.
MAX_CONFIGS = 3
# make bench must finish within 10 minutes on a fresh two-core machine; the measuring (every
# configuration's wall time, compiling included) is kept under 7 of them, leaving the rest for the
# start-up, the peak-memory checks, the copy bandwidth, the files and the page.
MEASURING_BUDGET_S = 7 * 60
# A configuration not in the committed report (a new family, or a changed plan) is counted at this
# much until `make bench` measures it: more than any configuration of the committed run took (CPU time).
UNMEASURED_CONFIG_S = 60
# CPU time of the compiler processes torch.compile started in the committed run (see committed_seconds).
COMPILER_CHILDREN_S = 52


def test_every_family_module_is_discovered():
    modules = sorted(path.stem.removeprefix("bench_") for path in BENCH_DIR.glob("bench_*.py"))
    assert sorted(FAMILIES) == modules
    assert all(isinstance(family, Family) for family in FAMILIES.values())


@pytest.mark.parametrize("stem", sorted(FAMILIES))
def test_plan_covers_the_family_with_few_configs(stem):
    family = FAMILIES[stem]
    plan = family.configs(True, family.default_options())
    assert 1 <= len(plan) <= MAX_CONFIGS, plan
    assert len(set(plan)) == len(plan)
    # a scaling configuration outside the plan would never be measured
    assert set(family.scaling_configs) <= set(plan)


def test_thread_scaling_covers_the_dense_divergence_and_info_nce():
    for stem in ("divergence", "info_nce"):
        assert FAMILIES[stem].scaling_configs, stem


def committed_seconds() -> dict[tuple[str, str], float]:
    """(family, configuration key) → an estimate of its wall time on an idle
    machine from the committed run: the lesser of its wall time there and the
    process's CPU time over it. Other processes only lengthen the wall time; the
    run waits on nothing but the CPU (the pauses between contended attempts
    happen only under load) and its own children, the C++ compiler that
    ``torch.compile`` runs, whose CPU time ``config_cpu_s`` leaves out: the
    committed run's children took 52 s in all (``/usr/bin/time``: 326 s of CPU
    against the process's own 274 s), which the margin between the estimate
    and ``MEASURING_BUDGET_S`` covers (checked below)."""
    return {
        key: wall if cpu is None else min(wall, cpu)
        for key, (wall, cpu) in report.config_times(report.read_csv(REPORT)).items()
    }


@pytest.mark.skipif(not REPORT.exists(), reason="no committed bench/results/report_cpu.csv")
def test_plan_fits_the_budget():
    """The plan's cost estimated from the committed run: every configuration it
    measured at its measured wall time, the rest at ``UNMEASURED_CONFIG_S``."""
    seconds = committed_seconds()
    assert seconds, "the committed report has no configuration times"
    estimate = 0.0
    unmeasured = []
    for stem, family in FAMILIES.items():
        for config in family.configs(True, family.default_options()):
            key = (stem, config_key(config))
            if key in seconds:
                estimate += seconds[key]
            else:
                unmeasured.append(key)
                estimate += UNMEASURED_CONFIG_S
    assert estimate + COMPILER_CHILDREN_S <= MEASURING_BUDGET_S, (estimate, unmeasured)


@pytest.mark.skipif(not REPORT.exists(), reason="no committed bench/results/report_cpu.csv")
def test_committed_report_has_floors_ratios_and_scaling():
    rows = report.read_csv(REPORT)

    def label(row):
        return FAMILIES[row["family"]].config_label(row)

    rows = [row for row in rows if row["family"] in FAMILIES]
    summary = report.summary_lines(rows, label)
    assert {line[0] for line in summary} >= {"divergence", "info_nce"}
    floors = {line[0]: line[6] for line in summary}
    assert floors["divergence"].startswith("copy ")
    assert floors["info_nce"].startswith("GEMM ")
    assert any(line[5] != "—" for line in summary), "no ratio to torch.compile"
    scaled = {line[0] for line in report.scaling_lines(rows, label)}
    assert scaled == {"divergence", "info_nce"}


def test_one_thread_rows_keep_their_own_floor_and_no_ratios():
    rows = [
        {"provider": report.EAGER, "cfg": 1, "threads": 2, "median_ms": 100.0, "traffic_bytes": 10**9},
        {"provider": "fastkd-cpu", "cfg": 1, "threads": 2, "median_ms": 10.0, "traffic_bytes": 10**9},
        {"provider": "fastkd-cpu" + ONE_THREAD, "cfg": 1, "threads": 1, "median_ms": 16.0,
         "traffic_bytes": 10**9, "copy_gbs": 125.0},
    ]
    report.add_floor_and_ratios(rows, bandwidth=2e11, group_keys=("cfg",))
    assert rows[1]["floor_ms"] == pytest.approx(5.0)
    assert rows[1]["speedup_vs_eager"] == pytest.approx(10.0)
    assert rows[2]["floor_ms"] == pytest.approx(8.0)  # 1 GB at the one-thread 125 GB/s
    assert rows[2]["x_floor"] == pytest.approx(2.0)
    assert rows[2]["speedup_vs_eager"] is None
    for row in rows:
        row["family"] = "divergence"
    (line,) = report.scaling_lines(rows, lambda row: "c")
    assert line[:6] == ["divergence", "c", "fastkd-cpu", "16.0", "10.0", "1.60×"]
    assert line[-1] == "1.60×"  # 200 / 125 GB/s


def test_gemm_floor_sums_the_products():
    shapes = [(64, 32, 48), (64, 32, 48), (48, 64, 32)]
    ms = gemm_ms(shapes, torch.float32, torch.device("cpu"), budget_s=0.01)
    assert ms > 0
    rows = [{"provider": "fastkd-cpu", "dtype": "fp32", "N": 64, "M": 48, "D": 32, "median_ms": 2 * ms}]

    class Ctx:
        device = torch.device("cpu")

    FAMILIES["info_nce"].add_gemm_floor(Ctx(), rows)
    assert rows[0]["gemm_gflop"] == pytest.approx(3 * 2 * 64 * 48 * 32 / 1e9)
    assert rows[0]["x_gemm_floor"] == pytest.approx(2 * ms / rows[0]["gemm_floor_ms"])
