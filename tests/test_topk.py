"""Top-k (sparse) teacher divergence (docs/spec.md §1): reference and fused kernels vs float64."""

from __future__ import annotations

import math

import pytest
import torch

import fastkd
from fastkd.reference import topk as reference_topk
from fastkd.topk import TOPK_DIVERGENCES, TOPK_KERNELS
from tests.common_checks import (
    check_student_parity,
    explicit_divergence,
    reference_in_summation_orders,
    row_exclusion_kwargs,
    run_with_grad,
)
from tests.helpers import DEVICE, KERNEL_BACKENDS, TOLERANCES, assert_matches, relative_error

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (N..., V, k): one entry; tiny; awkward; k = V; V above a SIMD block with a
# large k; leading dims flattened into rows.
SHAPES = (((1,), 1, 1), ((3,), 7, 3), ((41,), 1271, 17), ((4,), 9, 9), ((2,), 5000, 64), ((2, 3), 257, 5))
UPSTREAM = 0.7
# The Triton interpreter (triton on CPU tensors) pays milliseconds per program
# and loop iteration: it runs at most this many rows of a shape; on a GPU
# every shape runs whole.
INTERPRETED_ROWS = 5


def kernel_params():
    """The backends with a top-k kernel among DEVICE's kernel backends (cpu + triton
    on a CPU, triton + cuda under FASTKD_TEST_DEVICE=cuda), skipped with the
    reason when unavailable."""
    params = []
    for name in (name for name in KERNEL_BACKENDS if name in TOPK_KERNELS):
        status = fastkd._dispatch.backend_status(name, DEVICE.type)
        marks = () if status.available else (pytest.mark.skip(reason=f"{name}: {status.reason}"),)
        params.append(pytest.param(name, marks=marks, id=name))
    none = pytest.param("none", marks=pytest.mark.skip(reason=f"no top-k kernel on {DEVICE.type}"))
    return params or [none]


def sparse_teacher(lead, vocab, k, dtype=torch.float32, spread=3.0, generator_seed=None):
    """Distinct random ids (N..., k) and teacher logits at them."""
    g = torch.Generator().manual_seed(generator_seed) if generator_seed is not None else None
    rows = math.prod(lead)
    index = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(rows)]).reshape(*lead, k)
    values = (torch.randn((*lead, k), dtype=torch.float64, generator=g) * spread).to(dtype)
    return index.to(DEVICE), values.to(DEVICE)


def student_logits(lead, vocab, dtype=torch.float32, spread=3.0):
    return (torch.randn((*lead, vocab), dtype=torch.float64) * spread).to(device=DEVICE, dtype=dtype)


def check_parity(backend, s, index, values, **kwargs):
    """fastkd on ``backend`` vs the float64 reference (and the reference in s.dtype as baseline)."""
    values64 = values.double()
    check_student_parity(
        backend, lambda a: fastkd.topk_divergence(a, index, values, backend=backend, **kwargs),
        lambda a: reference_topk.topk_divergence(a, index, values64, **kwargs), s,
        reference_in_input_dtype(s, index, values, **kwargs),
    )


def reference_in_input_dtype(s, index, values, samples=3, **kwargs):
    """The reference from the same ``s.dtype`` inputs in ``samples`` summation
    orders: the vocabulary permuted and the teacher's ids renamed to match."""
    return reference_in_summation_orders(
        lambda perm, inverse: lambda a: reference_topk.topk_divergence(a, inverse[index], values, **kwargs),
        s, samples,
    )


# ---- the reference against the formulas written out ---------------------------


def explicit_topk_divergence(s, index, values, divergence, temperature, beta=0.5, alpha=0.1):
    """Row losses (N,) in float64 from docs/spec.md §1's formulas, with p zero off the ids."""
    log_q = torch.log_softmax(s.double() / temperature, dim=-1)
    q = log_q.exp()
    p = torch.zeros_like(q).scatter(-1, index, torch.softmax(values.double() / temperature, dim=-1))
    if divergence == "kl":
        log_p_k = torch.log_softmax(values.double() / temperature, dim=-1)
        return (log_p_k.exp() * (log_p_k - log_q.gather(-1, index))).sum(-1)
    return explicit_divergence(p, q, divergence, beta, alpha)


@pytest.mark.parametrize("divergence", TOPK_DIVERGENCES)
def test_reference_equals_written_out_formula(divergence):
    s = student_logits((6,), 50, torch.float64)
    index, values = sparse_teacher((6,), 50, 7, torch.float64)
    got = reference_topk.topk_divergence(
        s, index, values, divergence=divergence, temperature=1.7, scale=1.0, reduction="none"
    )
    want = explicit_topk_divergence(s, index, values, divergence, 1.7)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


# ---- parity -------------------------------------------------------------------


def interpreted(backend: str) -> bool:
    """Whether ``backend`` runs in the Triton interpreter (triton on CPU tensors)."""
    return backend == "triton" and DEVICE.type == "cpu"


def parity_params():
    """(backend, dtype, divergence, shape): every combination, except that the
    Triton interpreter runs bfloat16 / float16 (which change only the loads
    and the gradient store) on the vocabulary-sized shapes only."""
    params = []
    for backend in kernel_params():
        name = backend.values[0]
        for shape in SHAPES:
            for divergence in TOPK_DIVERGENCES:
                for dtype in DTYPES:
                    if interpreted(name) and dtype != torch.float32 and shape[1] < 1000:
                        continue
                    params.append(pytest.param(name, dtype, divergence, shape, marks=backend.marks,
                                               id=f"{shape}-{divergence}-{dtype}-{name}"))
    return params


@pytest.mark.parametrize(("backend", "dtype", "divergence", "shape"), parity_params())
def test_parity_every_divergence_dtype_shape(backend, dtype, divergence, shape):
    lead, vocab, k = shape
    if interpreted(backend):
        lead = (min(lead[0], INTERPRETED_ROWS), *lead[1:])
    s = student_logits(lead, vocab, dtype)
    index, values = sparse_teacher(lead, vocab, k, dtype)
    check_parity(backend, s, index, values, divergence=divergence, temperature=2.0)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("temperature", (0.05, 1.0, 4.0, 100.0))
@pytest.mark.parametrize("divergence", TOPK_DIVERGENCES)
def test_parity_temperatures(backend, temperature, divergence):
    s = student_logits((5,), 300)
    index, values = sparse_teacher((5,), 300, 20)
    check_parity(backend, s, index, values, divergence=divergence, temperature=temperature)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("reduction", ("batchmean", "sum", "mean", "none"))
@pytest.mark.parametrize("selector", ("all", "labels", "mask", "both"))
def test_parity_reductions_and_row_exclusion(backend, reduction, selector):
    s = student_logits((3, 5), 97)
    index, values = sparse_teacher((3, 5), 97, 11)
    kwargs = row_exclusion_kwargs(selector, 97)
    check_parity(backend, s, index, values, divergence="jsd", temperature=2.0, reduction=reduction, **kwargs)


@pytest.mark.parametrize("backend", kernel_params())
def test_no_kept_rows_gives_zero_loss_and_gradient(backend):
    s = student_logits((4,), 30).requires_grad_(True)
    index, values = sparse_teacher((4,), 30, 5)
    loss = fastkd.topk_divergence(s, index, values, mask=torch.zeros(4, dtype=torch.bool, device=DEVICE),
                                  backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("divergence", TOPK_DIVERGENCES)
def test_student_mass_on_teacher_ids(backend, divergence):
    """The student puts nearly all its mass on the teacher's ids: the off-support
    mass R (JSD, skew reverse KL, TVD use it) must not come from 1 − Σ q_support."""
    lead, vocab, k = (8,), 2000, 32
    index, values = sparse_teacher(lead, vocab, k)
    s = student_logits(lead, vocab, spread=1.0) - 30.0
    s.scatter_(-1, index, values + 0.01 * torch.randn_like(values))
    check_parity(backend, s, index, values, divergence=divergence, temperature=1.0)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("divergence", ("kl", "skew_reverse_kl"))
def test_many_ids_per_row(backend, divergence, monkeypatch):
    """k = 300 ids: more than one CUDA block's threads (128 at this V) and, with
    the Triton support tile narrowed to 64, five support tiles per row."""
    if backend == "triton":
        from fastkd.kernels import topk as triton_topk

        monkeypatch.setattr(triton_topk, "MAX_KBLOCK", 64)
    s = student_logits((3,), 1000)
    index, values = sparse_teacher((3,), 1000, 300)
    check_parity(backend, s, index, values, divergence=divergence, temperature=1.5, reduction="none")


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("temperature", (1.0, 100.0))
@pytest.mark.parametrize("divergence", TOPK_DIVERGENCES)
def test_small_divergence_within_float32_tolerance(backend, temperature, divergence):
    """A student close to the teacher on its ids (logit ratios 1e-3 apart, the
    off-support mass e^-30): ℓ ~ 1e-7 (1e-4 for TVD) is a small difference of
    nearly equal log-probabilities. The reference computed in float32 is off
    by 60–180 % here; the kernels' float64 support terms keep ℓ and its
    gradient within the float32 rtol (measured: under 1e-7), with no atol and
    no allowance for the reference's own error, at T = 1 and, logits scaled
    by T, at T = 100."""
    lead, vocab, k = (4,), 3000, 48
    index, values = sparse_teacher(lead, vocab, k)
    values = values * temperature
    s = (student_logits(lead, vocab, spread=1.0) - 30.0) * temperature
    s.scatter_(-1, index, values + 1e-3 * temperature * torch.randn_like(values))
    kwargs = {"divergence": divergence, "temperature": temperature, "scale": 1.0, "reduction": "none"}
    got = run_with_grad(lambda a: fastkd.topk_divergence(a, index, values, backend=backend, **kwargs), s)
    want = run_with_grad(lambda a: reference_topk.topk_divergence(a, index, values.double(), **kwargs),
                         s.double())
    assert 0 < want[0].abs().max() < 1e-3  # the small-divergence case
    rtol = TOLERANCES[torch.float32][0]
    assert relative_error(got[0], want[0]) <= rtol, "loss"
    assert relative_error(got[1], want[1]) <= rtol, "student grad"


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize("divergence", TOPK_DIVERGENCES)
def test_large_logits_and_neg_inf(backend, divergence):
    lead, vocab, k = (6,), 500, 9
    s = student_logits(lead, vocab, spread=1e4)
    s[0, 3] = -torch.inf
    index, values = sparse_teacher(lead, vocab, k, spread=1e4)
    values[1, 2] = -torch.inf  # zero teacher mass at one id
    s[2, index[2, 0]] = -torch.inf  # a teacher id where the student has no mass
    check_parity(backend, s, index, values, divergence=divergence, temperature=3.0)


@pytest.mark.parametrize("backend", kernel_params())
def test_agrees_with_dense_divergence_on_padded_teacher(backend):
    """The fused sparse kernel and the fused dense kernel on the −inf-padded teacher."""
    s = student_logits((7,), 640)
    index, values = sparse_teacher((7,), 640, 25)
    dense = reference_topk.dense_teacher_logits(index, values, 640, s.dtype)
    for divergence in TOPK_DIVERGENCES:
        sparse_loss = fastkd.topk_divergence(s, index, values, divergence=divergence, backend=backend)
        dense_loss = fastkd.divergence(s, dense, divergence=divergence, backend=backend)
        torch.testing.assert_close(sparse_loss, dense_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", *kernel_params()])
def test_logprob_values_give_the_same_loss_as_logits(backend):
    s = student_logits((5,), 100)
    teacher = student_logits((5,), 100)
    values, index = teacher.topk(10, dim=-1)
    from_logits = fastkd.topk_divergence(s, index, values, temperature=2.0, backend=backend)
    logprobs = torch.log_softmax(teacher, dim=-1).gather(-1, index)
    from_logprobs = fastkd.topk_divergence(
        s, index, logprobs, temperature=2.0, teacher_is_logprob=True, backend=backend
    )
    torch.testing.assert_close(from_logprobs, from_logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", kernel_params())
def test_values_dtype_independent_of_student(backend):
    """fp32 values with a bf16 student: the kernel reads the values in float32."""
    s = student_logits((4,), 64, torch.bfloat16)
    index, values = sparse_teacher((4,), 64, 8)
    got = fastkd.topk_divergence(s, index, values, backend=backend)
    want = reference_topk.topk_divergence(s.double(), index, values.double())
    assert_matches(got, want, torch.bfloat16, "bf16 student, fp32 values")


@pytest.mark.parametrize("backend", kernel_params())
def test_nan_propagates(backend):
    s = student_logits((3,), 40)
    index, values = sparse_teacher((3,), 40, 4)
    s_nan = s.clone()
    s_nan[1, 7] = torch.nan
    assert torch.isnan(fastkd.topk_divergence(s_nan, index, values, backend=backend))
    values_nan = values.clone()
    values_nan[2, 1] = torch.nan
    assert torch.isnan(fastkd.topk_divergence(s, index, values_nan, backend=backend))


@pytest.mark.parametrize("backend", kernel_params())
def test_non_contiguous_student(backend):
    base = student_logits((6,), 2 * 130)
    s = base[:, ::2]  # stride 2 along V
    index, values = sparse_teacher((6,), 130, 12)
    check_parity(backend, s, index, values, divergence="kl", temperature=2.0)
    s_rows = student_logits((12,), 130)[::2]  # row stride 2 V
    check_parity(backend, s_rows, index, values, divergence="tvd", temperature=2.0)


@pytest.mark.parametrize("backend", kernel_params())
def test_float64_input(backend):
    s = student_logits((5,), 77, torch.float64)
    index, values = sparse_teacher((5,), 77, 6, torch.float64)
    if torch.float64 not in fastkd._dispatch.KERNEL_DTYPES[backend]:
        # the GPU kernels accumulate in float32: an explicit request is refused
        with pytest.raises(ValueError, match="does not take torch.float64"):
            fastkd.topk_divergence(s, index, values, backend=backend)
        return
    check_parity(backend, s, index, values, divergence="skew_reverse_kl", temperature=1.5)


def test_module_matches_function():
    s = student_logits((3,), 50)
    index, values = sparse_teacher((3,), 50, 6)
    module = fastkd.TopKDivergenceLoss("jsd", temperature=2.0, beta=0.3)
    expected = fastkd.topk_divergence(s, index, values, divergence="jsd", temperature=2.0, beta=0.3)
    torch.testing.assert_close(module(s, index, values), expected)
    assert "jsd" in repr(module)


# ---- hard-label mixing ----------------------------------------------------------------


def explicit_mixed(s, index, values, labels, hard_weight, soft_weight, reduction, **kwargs):
    """hard_weight · CE + soft_weight · top-k divergence, float64, CE written with F.cross_entropy."""
    soft = reference_topk.topk_divergence(s, index, values, labels=labels, reduction=reduction, **kwargs)
    flat = labels.reshape(-1)
    ce_rows = torch.nn.functional.cross_entropy(
        s.reshape(-1, s.shape[-1]), flat.clamp(min=0), reduction="none"
    ) * (flat != -100)
    if reduction == "none":
        hard = ce_rows.reshape(labels.shape)
    elif reduction == "sum":
        hard = ce_rows.sum()
    else:
        hard = ce_rows.sum() / (flat != -100).sum()
    return hard_weight * hard + soft_weight * soft


@pytest.mark.parametrize("backend", ["reference", *kernel_params()])
@pytest.mark.parametrize("reduction", ("batchmean", "sum", "none"))
def test_hard_label_mixing(backend, reduction):
    s = student_logits((3, 4), 90)
    index, values = sparse_teacher((3, 4), 90, 7)
    labels = torch.randint(0, 90, (3, 4), device=DEVICE)
    labels[1, 2] = -100
    kwargs = {"divergence": "jsd", "temperature": 2.0}
    got = run_with_grad(
        lambda a: fastkd.topk_divergence(a, index, values, labels=labels, hard_weight=0.3, soft_weight=0.7,
                                         reduction=reduction, backend=backend, **kwargs), s)
    v64 = values.double()
    want = run_with_grad(
        lambda a: explicit_mixed(a, index, v64, labels, 0.3, 0.7, reduction, **kwargs), s.double()
    )
    assert_matches(got[0], want[0], torch.float32, "mixed loss")
    assert_matches(got[1], want[1], torch.float32, "mixed grad")


@pytest.mark.parametrize("backend", ["reference", *kernel_params()])
def test_return_parts_and_default_unchanged(backend):
    s = student_logits((5,), 40)
    index, values = sparse_teacher((5,), 40, 6)
    labels = torch.randint(0, 40, (5,), device=DEVICE)
    plain = fastkd.topk_divergence(s, index, values, labels=labels, backend=backend)
    assert torch.equal(plain, fastkd.topk_divergence(s, index, values, labels=labels, hard_weight=0.0,
                                                     backend=backend))
    total, hard, soft = fastkd.topk_divergence(s, index, values, labels=labels, hard_weight=0.5,
                                               soft_weight=0.25, return_parts=True, backend=backend)
    torch.testing.assert_close(total, hard + soft)
    torch.testing.assert_close(soft, 0.25 * plain)
    assert hard.item() > 0
    with pytest.raises(ValueError, match="labels is required"):
        fastkd.topk_divergence(s, index, values, hard_weight=0.5, backend=backend)


# ---- bad input ------------------------------------------------------------------


def with_first_id(index, value):
    """``index`` with its first column set to ``value``."""
    return torch.cat([torch.full_like(index[:, :1], value), index[:, 1:]], dim=1)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda s, i, v: (s, i.int(), v), "teacher_index must be int64"),
        (lambda s, i, v: (s, with_first_id(i, 50), v), r"outside \[0, 50\)"),
        (lambda s, i, v: (s, with_first_id(i, -1), v), r"outside \[0, 50\)"),
        (lambda s, i, v: (s, torch.cat([i[:, :1], i[:, :1]], 1), v[:, :2]), "twice"),
        (lambda s, i, v: (s, i, v[:, :3]), "teacher_values shape"),
        (lambda s, i, v: (s, i[:2], v[:2]), "teacher_index shape"),
        (lambda s, i, v: (s, i[:, :0], v[:, :0]), "between 1 and V"),
        (lambda s, i, v: (s, i, torch.full_like(v, -torch.inf)), "all -inf"),
        (lambda s, i, v: (s, i, v.long()), "teacher_values must have dtype"),
        (lambda s, i, v: (s, i, v.clone().requires_grad_(True)), "detach"),
    ],
)
def test_bad_teacher_raises_value_error(mutate, match, monkeypatch):
    # the checks that read values run on a GPU only when asked for
    # (tests/test_topk_device_checks.py: the NaN rows otherwise)
    monkeypatch.setenv("FASTKD_CHECK_DEVICE_VALUES", "1")
    s = student_logits((4,), 50)
    index, values = sparse_teacher((4,), 50, 5)
    s, index, values = mutate(s, index, values)
    with pytest.raises(ValueError, match=match):
        fastkd.topk_divergence(s, index, values)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"divergence": "reverse_kl"}, "divergence must be one of"),
        ({"divergence": "jsd", "beta": 1.0}, "beta=1"),
        ({"divergence": "skew_reverse_kl", "alpha": 0.0}, "alpha=0"),
        ({"temperature": 0.0}, "temperature"),
        ({"teacher_is_logprob": True}, "teacher_is_logprob"),
        ({"reduction": "avg"}, "reduction"),
    ],
)
def test_bad_options_raise_value_error(kwargs, match, monkeypatch):
    monkeypatch.setenv("FASTKD_CHECK_DEVICE_VALUES", "1")  # teacher_is_logprob's check on a GPU
    s = student_logits((4,), 50)
    index, values = sparse_teacher((4,), 50, 5)
    values = values.abs() + 1.0  # positive: not log-probabilities
    with pytest.raises(ValueError, match=match):
        fastkd.topk_divergence(s, index, values, **kwargs)


def test_explicit_backend_without_kernel_raises(monkeypatch):
    s = student_logits((2,), 10)
    index, values = sparse_teacher((2,), 10, 3)
    backend = KERNEL_BACKENDS[-1]
    monkeypatch.setattr(fastkd.topk, "TOPK_KERNELS", tuple(n for n in TOPK_KERNELS if n != backend))
    if not fastkd._dispatch.backend_status(backend, DEVICE.type).available:
        pytest.skip(f"{backend} is unavailable here")
    with pytest.raises(ValueError, match="no top-k divergence kernel"):
        fastkd.topk_divergence(s, index, values, backend=backend)


# ---- the op itself ------------------------------------------------------------------


def direct_op(backend):
    """``backend``'s top-k op without the Python layer's validation, and the
    exception it raises on bad arguments: the Triton launcher (ValueError), or
    ``fastkd::topk_divergence_forward`` dispatched on DEVICE (RuntimeError)."""
    if backend == "triton":
        from fastkd.kernels import topk as triton_topk

        return triton_topk.topk_divergence_forward, ValueError
    return torch.ops.fastkd.topk_divergence_forward, RuntimeError


def op_params():
    """kernel_params() of the backends that are torch.library ops (not triton)."""
    params = [p for p in kernel_params() if p.values[0] not in ("triton", "none")]
    none = pytest.param("none", marks=pytest.mark.skip(reason=f"no fastkd:: top-k op on {DEVICE.type}"))
    return params or [none]


@pytest.mark.parametrize("backend", kernel_params())
def test_op_checks_ids_itself(backend):
    """Called directly (no Python validation), each backend refuses ids that would
    take its gather or scatter out of the row where values are checked on the
    host (the cpu op; the Triton launcher on CPU tensors), and otherwise (on a
    GPU: the CUDA op, the Triton launcher) makes that row NaN in its kernel
    (tests/test_topk_device_checks.py checks the other rows); and refuses the
    reverse KL."""
    op, error = direct_op(backend)
    s = torch.randn(2, 10, device=DEVICE)
    values = torch.randn(2, 3, device=DEVICE)
    host_checked = backend == "cpu" or (backend == "triton" and fastkd._validate.values_checked_on_host(s))

    def ids(rows):
        return torch.tensor(rows, device=DEVICE)

    cases = (
        (ids([[0, 1, 10], [0, 1, 2]]), True, r"^teacher_index\b.* outside \[0, 10\)", 0),
        (ids([[0, 1, 2], [0, -1, 2]]), False, r"^teacher_index\b.* outside \[0, 10\)", 1),
        (ids([[0, 1, 2], [4, 4, 2]]), True, r"^teacher_index\b.* twice", 1),
    )
    for index, student_grad, match, bad_row in cases:
        if host_checked:
            with pytest.raises(error, match=match):
                op(s, index, values, None, 0, 1.0, 0.0, 1.0, student_grad)
            continue
        loss, grad, _ = op(s, index, values, None, 0, 1.0, 0.0, 1.0, student_grad)
        assert loss[bad_row].isnan() and loss[1 - bad_row].isfinite()
        if student_grad:
            assert grad[bad_row].isnan().all() and grad[1 - bad_row].isfinite().all()
    with pytest.raises(error, match="reverse KL"):
        op(s, ids([[0, 1, 2], [0, 1, 2]]), values, None, 1, 1.0, 0.0, 1.0, True)


@pytest.mark.parametrize("backend", kernel_params())
@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda a: {**a, "teacher_value": a["teacher_value"].double()}, "(?i)teacher_value must be float"),
        (lambda a: {**a, "teacher_value": a["teacher_value"][:, :2]}, "same shape"),
        (lambda a: {**a, "teacher_index": a["teacher_index"].int()}, "teacher_index must be int64"),
        (lambda a: {**a, "teacher_index": a["teacher_index"][:1], "teacher_value": a["teacher_value"][:1]},
         "one row per student row"),
        (lambda a: {**a, "row_mask": a["row_mask"][:1]}, "row_mask"),
        (lambda a: {**a, "kind": 6}, "kind"),
        (lambda a: {**a, "kind": 2, "coef": 1.0}, "beta"),
        (lambda a: {**a, "kind": 3, "coef": 0.0}, "alpha"),
        (lambda a: {**a, "inv_temperature": 0.0}, "inv_temperature"),
        (lambda a: {**a, "grad_scale": math.inf}, "grad_scale"),
    ],
)
def test_op_checks_arguments(backend, mutate, match):
    op, error = direct_op(backend)
    index, values = sparse_teacher((3,), 20, 4)
    args = {
        "student": student_logits((3,), 20), "teacher_index": index, "teacher_value": values,
        "row_mask": torch.ones(3, dtype=torch.bool, device=DEVICE), "kind": 0, "inv_temperature": 0.5,
        "coef": 0.5, "grad_scale": 1.0, "student_grad": True,
    }
    op(*args.values())  # the unchanged arguments are accepted
    with pytest.raises(error, match=match):
        op(*mutate(args).values())


@pytest.mark.parametrize("backend", op_params())
@pytest.mark.parametrize("student_grad", (True, False))
def test_opcheck(backend, student_grad):
    s = student_logits((5,), 33)
    index, values = sparse_teacher((5,), 33, 4)
    mask = torch.tensor([True, False, True, True, True], device=DEVICE)
    torch.library.opcheck(
        torch.ops.fastkd.topk_divergence_forward,
        (s, index, values, mask, 2, 0.5, 0.3, 0.25, student_grad),
    )
