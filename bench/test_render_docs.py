"""``python -m bench.render_docs`` on the committed results (fast: reads CSV files only)."""

from pathlib import Path

import pytest

from bench import render_docs
from bench.report import write_csv
from bench.run import discover

RESULTS = Path(__file__).resolve().parent / "results"


def test_renders_every_committed_family():
    text = render_docs.render(RESULTS)
    families = discover()
    stems = [p.stem.rpartition("_")[0] for p in sorted(RESULTS.glob("*_cpu.csv")) if p.stem != "report_cpu"]
    assert stems, "no committed results"
    for stem in stems:
        assert stem in families, f"bench/results/{stem}_cpu.csv has no bench/bench_{stem}.py"
        assert f"\n## {stem}\n" in text
        assert f"From `bench/results/{stem}_cpu.csv`: device cpu;" in text
        assert f"![{stem}](../bench/results/{stem}_cpu.png)" in text
    assert "| fastkd-cpu |" in text


def test_renders_the_representative_report():
    text = render_docs.render(RESULTS)
    assert (RESULTS / "report_cpu.csv").exists(), "no committed representative report (make bench)"
    report = text.split("## Representative report (`make bench`)\n", 1)[1].split("\n## Summary\n", 1)[0]
    assert "From `bench/results/report_cpu.csv`: device cpu;" in report
    families = discover()
    for stem in ("divergence", "info_nce", "topk"):
        assert stem in families
        assert f"\n| {stem} | " in report
    assert "Thread scaling" in report
    assert "![representative report](../bench/results/report_cpu.png)" in report


def test_committed_page_is_current():
    """docs/benchmarks.md is what the script writes from the committed CSV files."""
    out = RESULTS.parent.parent / "docs" / "benchmarks.md"
    assert render_docs.main(["--results", str(RESULTS), "--out", str(out), "--check"]) == 0


def test_machine_columns_are_described(tmp_path):
    family = discover()["divergence"]
    row = {
        "family": "divergence", "divergence": "kl", "temperature": 2.0, "device": "cpu", "dtype": "fp32",
        "N": 8, "V": 16, "provider": "fastkd-cpu", "median_ms": 2.0, "floor_ms": 1.0, "x_floor": 2.0,
        "speedup_vs_eager": 3.0, "copy_gbs": 12.5, "thp": "unset/madvise", "threads": 2,
        "machine": "Some CPU, 2 cores, SIMD AVX2", "torch": "2.13.0", "other_load": 0.05,
    }
    write_csv(tmp_path / "divergence_cpu.csv", [row], family.columns)
    text = render_docs.render(tmp_path)
    assert (
        "device cpu; machine Some CPU, 2 cores, SIMD AVX2; threads 2; torch 2.13.0; copy bandwidth 12.5 GB/s"
        in text
    )
    assert "not recorded" not in text
    assert "| kl fp32 8×16 | fastkd-cpu | 2.0 |" in text


@pytest.mark.parametrize("stray", ["notes_cpu.csv", "divergence.csv"])
def test_other_csv_files_are_passed_over(tmp_path, stray):
    (tmp_path / stray).write_text("a,b\n1,2\n")
    assert "\n## " not in render_docs.render(tmp_path).split("## Summary", 1)[1]
