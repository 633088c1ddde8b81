"""Shared test set-up: the Triton interpreter on CPU-only machines, seeds,
and the hypothesis profiles every property test runs under."""

import os


def _cpu_runs_skylakex_kernels() -> bool:
    """Whether this CPU has the AVX-512 subsets OpenBLAS's SkylakeX kernels use."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= set(flags)


# The interpreter's tl.dot is numpy's matmul (OpenBLAS). With OpenBLAS's
# Haswell kernels (which this machine's environment asks for with
# OPENBLAS_CORETYPE=Haswell) a row of a product depends on how many rows the
# product has, and the interpreted Triton attention-relation backward at
# scores ~1e3 (tests/test_attention_relation_properties.py) comes out at 90
# times the float32 reference's gradient error on an AMD EPYC; with the
# SkylakeX kernels it is within twice that error. The suite asks for the
# SkylakeX kernels wherever the CPU runs them, before numpy (which torch
# imports) loads OpenBLAS.
if _cpu_runs_skylakex_kernels():
    os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"

import torch  # noqa: E402

# The Triton interpreter must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# "ci" (the default, used by `make test` and CI): derandomised, so every run
# draws the same examples and a red run can be reproduced. "explore":
# fresh random examples, for hunting bugs locally
# (HYPOTHESIS_PROFILE=explore make test). Each test sets its own
# max_examples to stay inside the suite's time budget.
settings.register_profile(
    "ci", derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
settings.register_profile(
    "explore", derandomize=False, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The Triton kernels' cases that the interpreter takes 8 s or more each on
# the 2-core CPU (together a fifth of `make test`'s time there). Under the
# interpreter they are `slow`: `make check` runs them (CI runs both), while
# the CPU backend's same cases stay in `make test`. On a GPU they are
# ordinary tests.
INTERPRETER_SLOW_CASES = frozenset({
    "tests/test_attention_relation.py::test_gradients_match_the_row_loop[300-True-triton]",
    "tests/test_attention_relation.py::test_matches_the_row_loop_in_float64[triton]",
    "tests/test_properties_logits.py::test_topk_property[triton]",
    "tests/test_uld.py::test_triton_rows_longer_than_a_block",
    "tests/test_uld.py::test_matches_the_loop_oracle[False-130-300-triton]",
    "tests/test_uld.py::test_matches_the_loop_oracle[True-130-300-triton]",
    *(f"tests/test_uld_logprob.py::test_log_prob_rows_match_the_oracle[{ties}-130-300-{side}-triton]"
      for ties in ("False", "True") for side in ("student", "teacher", "both")),
})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    for item in items:
        if item.nodeid in INTERPRETER_SLOW_CASES:
            item.add_marker(pytest.mark.slow)
