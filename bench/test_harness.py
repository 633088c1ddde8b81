"""Checks of the shared benchmark machinery: measure, report, the family protocol (``pytest bench/``)."""

import time

import pytest
import torch

from bench import measure, report
from bench.family import SMALL_DEVICE, SweepContext, measure_config
from bench.run import discover

FAMILIES = discover()


@pytest.mark.skipif(not measure.cpu_peak_memory_supported(), reason="needs /proc/self/clear_refs (Linux)")
def test_peak_memory_known_cases():
    for check in measure.validate_peak_memory(torch.device("cpu")):
        assert check.ok, check


def test_time_call_stops_on_budget():
    # 50 ms per call, 0.1 s budget: the three minimum runs already exceed it.
    timing = measure.time_call(lambda: time.sleep(0.05), device=torch.device("cpu"), warmup=0, budget_s=0.1)
    assert timing.repeats == 3
    assert 45 <= timing.median_ms < 200


def test_floor_and_ratios():
    rows = [
        {"provider": report.EAGER, "cfg": 1, "median_ms": 100.0, "traffic_bytes": 10**9},
        {"provider": report.COMPILE, "cfg": 1, "median_ms": 40.0, "traffic_bytes": 10**9},
        {"provider": "fastkd-cpu", "cfg": 1, "median_ms": 10.0, "traffic_bytes": 10**9},
        {"provider": "liger", "cfg": 1, "note": "liger_kernel not installed", "traffic_bytes": 10**9},
    ]
    report.add_floor_and_ratios(rows, bandwidth=2e11, group_keys=("cfg",))
    assert rows[2]["floor_ms"] == pytest.approx(5.0)
    assert rows[2]["x_floor"] == pytest.approx(2.0)
    assert rows[2]["speedup_vs_eager"] == pytest.approx(10.0)
    assert rows[2]["speedup_vs_compile"] == pytest.approx(4.0)
    assert rows[3]["speedup_vs_eager"] is None


@pytest.mark.parametrize(
    ("stem", "provider", "config"),
    [
        pytest.param(stem, *param.values, id=f"{stem}-{param.id}")
        for stem, family in FAMILIES.items()
        for param in family.small_params()
    ],
)
def test_family_fwd_bwd(benchmark, stem, provider, config):
    """Every family's providers run forward + backward on a small configuration
    (pytest-benchmark times them with ``--benchmark-enable``)."""
    FAMILIES[stem].run_small(benchmark, provider, config)


@pytest.mark.parametrize(
    "stem", [stem for stem, family in FAMILIES.items() if family.no_compile is None and family.small_configs]
)
def test_compiled_provider_is_one_graph(stem):
    """What torch.compile compiles, every family's eager provider, traces as one graph
    (``fullgraph``): a prologue that reads the device on the host or makes
    data-dependent shapes would split it and flatter fastkd's speed-up over it."""
    family = FAMILIES[stem]
    assert family.compile_options.get("fullgraph") is True
    options = family.default_options()
    found, _ = family.providers(SMALL_DEVICE, options, use_compile=False)
    case = family.case(family.small_configs[0], SMALL_DEVICE, options, found)
    explanation = torch._dynamo.explain((case.loss_fns or found)[report.EAGER])(*case.inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons


class _Progress:
    """The part of rich's Progress that measure_config uses, doing nothing."""

    def update(self, task, **fields):
        pass

    def advance(self, task):
        pass


def test_a_provider_out_of_memory_is_a_row():
    ctx = SweepContext(
        device=torch.device("cpu"), quick=True, compile=False, thp=measure.thp_setting(), progress=_Progress()
    )
    x = torch.randn(8, 4, requires_grad=True)

    def too_big(x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB\n(details)")

    rows = measure_config(
        ctx, None, "test", {"cfg": 1}, {report.EAGER: lambda x: (x * x).sum(), "big": too_big}, (x,),
        lambda: setattr(x, "grad", None),
        timing_options={"warmup": 0, "min_repeats": 1, "max_repeats": 1, "attempts": 1},
    )
    by_provider = {row["provider"]: row for row in rows}
    assert by_provider["big"] == {
        "cfg": 1, "provider": "big", "note": "out of memory: CUDA out of memory. Tried to allocate 4.00 GiB"
    }
    assert by_provider[report.EAGER]["median_ms"] > 0
