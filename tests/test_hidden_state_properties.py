"""Property tests of hidden_state_loss: every backend (``reference``, ``cpu``,
``triton``; the last in the interpreter here, so with small shapes and few
examples) against the float64 reference on the same rounded inputs, loss and
both gradients, with a non-unit upstream gradient.

Hypothesis draws the kind, the reduction, a mask (or none), the dtype, the
number of rows and the width across the kernels' boundaries (cpu: the 8-lane
partial sums and their tails; triton: the power-of-two blocks), the scale of
the states and their layouts (transposed, sliced, expanded with stride 0).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkd
from fastkd import _ops
from fastkd.reference import hidden_state as reference
from tests.helpers import DEVICE, backend_params
from tests.strategies_embeddings import (
    SCALES,
    SEEDS,
    UPSTREAMS,
    check_against_reference,
    dtypes_for,
    operand,
)

pytestmark = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR))

BACKENDS = backend_params(include_reference=True)
INTERPRETED = DEVICE.type == "cpu"

# Examples per backend: the interpreter pays per operation and per program.
EXAMPLES = {"reference": 15, "cpu": 60, "triton": 12}

ROWS = (0, 1, 2, 3, 7, 8, 9, 17, 33)
ROWS_SMALL = (0, 1, 2, 3, 5)
DIMS = (1, 2, 7, 8, 9, 15, 16, 17, 33, 130, 257)
DIMS_SMALL = (1, 2, 7, 8, 9, 17, 33)


@st.composite
def cases(draw, backend):
    small = backend == "triton" and INTERPRETED
    n = draw(st.sampled_from(ROWS_SMALL if small else ROWS))
    d = draw(st.sampled_from(DIMS_SMALL if small else DIMS))
    dtype = draw(st.sampled_from(dtypes_for(backend)))
    scale = draw(SCALES)
    student = operand(draw, (n, d), scale=scale)
    teacher = operand(draw, (n, d), grad=draw(st.booleans()), scale=draw(SCALES))
    mask = None
    if draw(st.booleans()):
        g = torch.Generator().manual_seed(draw(SEEDS))
        mask = (torch.rand(n, generator=g) < draw(st.sampled_from((0.0, 0.5, 0.9)))).to(DEVICE)
    kwargs = {
        "kind": draw(st.sampled_from(reference.KINDS)),
        "reduction": draw(st.sampled_from(reference.REDUCTIONS)),
        "mask": mask,
    }
    return [student, teacher], kwargs, dtype, draw(UPSTREAMS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_the_reference(backend):
    @settings(max_examples=EXAMPLES[backend])
    @given(case=cases(backend))
    def inner(case):
        operands, kwargs, dtype, upstream = case
        # the features are summed in another order by the kernels: the reference on
        # the reversed features is one more rounding baseline
        check_against_reference(
            lambda s, t: fastkd.hidden_state_loss(s, t, backend=backend, **kwargs),
            lambda s, t: reference.hidden_state_loss(s, t, **kwargs), operands, dtype, upstream,
            f"{backend} hidden_state {kwargs['kind']} {kwargs['reduction']}", reorder=(-1,),
        )

    inner()
