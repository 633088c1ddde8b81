"""Shared test set-up: the Triton interpreter on CPU-only machines, seeds,
and the hypothesis profiles every property test runs under."""

import os

import torch

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
