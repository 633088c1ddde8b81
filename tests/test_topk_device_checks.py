"""The top-k teacher's values on a GPU (docs/spec.md §6): where
``fastkd._validate.values_checked_on_host`` is False, nothing reads a tensor
value on the host; a row with bad ids (outside ``[0, V)`` or repeated), an
all ``-inf`` teacher row, or ``teacher_is_logprob=True`` values that are not
log-probabilities give that row a NaN loss and a NaN gradient row, and every
other row is unchanged.

Here the checks are switched off for CPU tensors (monkeypatching the policy)
and the Triton kernel runs in the interpreter; under
``FASTKD_TEST_DEVICE=cuda`` the same tests run the Triton and CUDA kernels on
the GPU, where the policy is off by itself."""

from __future__ import annotations

import types

import pytest
import torch

import fastkd
from fastkd import _validate
from fastkd._enums import DivergenceKind
from fastkd.reference import topk as reference_topk
from tests.helpers import DEVICE, assert_matches
from tests.test_topk import kernel_params, sparse_teacher, student_logits

VOCAB, K, ROWS = 40, 6, 6
# Rows 1, 3 and 4 get bad ids (BAD_IDS); 0, 2 and 5 stay good.
BAD_ROWS = (1, 3, 4)
KIND_NAMES = {int(kind): kind.name.lower() for kind in DivergenceKind}


def bad_ids(index: torch.Tensor, vocab: int, case: str) -> torch.Tensor:
    """``index`` ``(ROWS, k)`` with one id of each of BAD_ROWS made bad: ``vocab``
    ("above"), −1 ("below"), ±10¹² ("far"), a copy of another id of the row
    ("twice"), or one of the first three each ("mixed")."""
    index = index.clone()
    for n, row in enumerate(BAD_ROWS):
        how = ("above", "below", "twice")[n] if case == "mixed" else case
        if how == "twice":
            index[row, 5] = index[row, 1]
        else:
            bad = {"above": vocab, "below": -1, "far": 10**12 if n % 2 else -(10**12)}[how]
            index[row, 2 * n] = bad
    return index


BAD_CASES = ("above", "below", "far", "twice", "mixed")


def as_on_a_gpu(monkeypatch) -> None:
    """The value-check policy answers for every tensor as for one on a GPU
    (the real function, on a stand-in CUDA tensor: FASTKD_CHECK_DEVICE_VALUES
    still decides)."""
    real = _validate.values_checked_on_host
    gpu = types.SimpleNamespace(device=torch.device("cuda"))
    monkeypatch.setattr(_validate, "values_checked_on_host", lambda value: real(gpu))


def kernel_forward(backend, s, index, values, kind, temperature, *, grad_scale=0.5, labels=None,
                   ids_checked=False):
    """``backend``'s fused op called directly: the Triton launcher, or the ``fastkd::`` op."""
    coef = 0.3 if kind in (2, 3, 4) else 0.0
    args = (s, index, values, None, kind, 1.0 / temperature, coef, grad_scale, True, labels,
            0.0 if labels is None else 0.25)
    if backend == "triton":
        from fastkd.kernels import topk as triton_topk

        return triton_topk.topk_divergence_forward(*args, ids_checked=ids_checked)
    return torch.ops.fastkd.topk_divergence_forward(*args)


def reference_rows(s, index, values, kind, temperature, grad_scale, scale=1.0):
    """Float64 row losses ``scale · ℓ`` ``(n,)`` and ``grad_scale · d(scale · ℓ)/ds`` ``(n, V)``."""
    s64 = s.detach().double().requires_grad_(True)
    coef = {"beta": 0.3} if kind == 2 else {"alpha": 0.3} if kind in (3, 4) else {}
    rows = reference_topk.topk_divergence(
        s64, index, values.double(), divergence=KIND_NAMES[kind], temperature=temperature,
        reduction="none", scale=scale, **coef,
    )
    (grad,) = torch.autograd.grad(rows.sum() * grad_scale, s64)
    return rows.detach(), grad


def assert_nan_rows_and_good_rows(loss, grad, s, index, values, bad_rows, kind, temperature,
                                  grad_scale=0.5, scale=1.0, what=""):
    """NaN loss and a wholly NaN gradient row exactly at ``bad_rows``; the other
    rows agree with the float64 reference (:func:`reference_rows`)."""
    rows = loss.shape[0]
    bad = torch.zeros(rows, dtype=torch.bool, device=loss.device)
    bad[list(bad_rows)] = True
    nan_rows = loss.isnan().nonzero().flatten().tolist()
    assert torch.equal(loss.isnan(), bad), f"{what}: NaN loss rows {nan_rows}"
    assert grad.isnan()[bad].all(), f"{what}: a bad row's gradient is not all NaN"
    assert grad[~bad].isfinite().all(), f"{what}: a good row's gradient is not finite"
    want_loss, want_grad = reference_rows(s[~bad], index[~bad], values[~bad], kind, temperature, grad_scale,
                                          scale)
    assert_matches(loss[~bad], want_loss, s.dtype, f"{what} loss", elementwise=True)
    assert_matches(grad[~bad], want_grad, s.dtype, f"{what} grad")


def gpu_params():
    """kernel_params() of the backends whose kernel guards the ids (not the cpu op)."""
    params = [p for p in kernel_params() if p.values[0] not in ("cpu", "none")]
    none = pytest.param("none", marks=pytest.mark.skip(reason=f"no guarding top-k kernel on {DEVICE.type}"))
    return params or [none]


# ---- the kernels' own guard ------------------------------------------------------------


@pytest.mark.parametrize("backend", gpu_params())
@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("kind", (0, 2, 4, 5), ids=("kl", "jsd", "skew_reverse_kl", "tvd"))
def test_kernel_makes_rows_with_bad_ids_nan(backend, case, kind):
    """Called past the host check (the Triton launcher told the ids are checked;
    the CUDA op never reads them on the host), the kernel itself finds each
    bad row: NaN loss and gradient there, the other rows exact."""
    s = student_logits((ROWS,), VOCAB)
    index, values = sparse_teacher((ROWS,), VOCAB, K)
    index = bad_ids(index, VOCAB, case)
    loss, grad, _ = kernel_forward(backend, s, index, values, kind, 2.0, ids_checked=True)
    assert_nan_rows_and_good_rows(loss, grad, s, index, values, BAD_ROWS, kind, 2.0, what=f"{backend} {case}")


@pytest.mark.parametrize("backend", gpu_params())
def test_kernel_guard_across_support_tiles(backend, monkeypatch):
    """A repeat whose two copies fall into different Triton support tiles (the
    tile narrowed to 4 ids) and one at the row's end; k = 11 > 4."""
    if backend == "triton":
        from fastkd.kernels import topk as triton_topk

        monkeypatch.setattr(triton_topk, "MAX_KBLOCK", 4)
    s = student_logits((4,), 30)
    index, values = sparse_teacher((4,), 30, 11)
    ordered = index.sort(dim=1).values
    index[1] = ordered[1]
    index[1, 4] = index[1, 3]  # neighbours 3 and 4: tiles [0, 4) and [4, 8)
    index[2, 10] = index[2, 0]
    loss, grad, _ = kernel_forward(backend, s, index, values, 0, 1.0, ids_checked=True)
    assert_nan_rows_and_good_rows(loss, grad, s, index, values, (1, 2), 0, 1.0, what=backend)


@pytest.mark.parametrize("backend", gpu_params())
@pytest.mark.parametrize("temperature", (1.0, 2.0))
def test_kernel_guard_with_labels(backend, temperature):
    """With the hard-label CE in the pass, a bad row's CE is NaN too; the good rows' CE is finite."""
    s = student_logits((ROWS,), VOCAB)
    index, values = sparse_teacher((ROWS,), VOCAB, K)
    index = bad_ids(index, VOCAB, "mixed")
    labels = torch.arange(ROWS, device=DEVICE)
    loss, grad, ce = kernel_forward(backend, s, index, values, 0, temperature, labels=labels,
                                    ids_checked=True)
    bad = torch.zeros(ROWS, dtype=torch.bool, device=DEVICE)
    bad[list(BAD_ROWS)] = True
    assert torch.equal(loss.isnan(), bad)
    assert torch.equal(ce.isnan(), bad)
    assert grad[bad].isnan().all() and grad[~bad].isfinite().all()
    want_ce = torch.nn.functional.cross_entropy(s[~bad].double(), labels[~bad], reduction="none")
    assert_matches(ce[~bad], want_ce, torch.float32, f"{backend} row_ce", elementwise=True)


@pytest.mark.parametrize("backend", gpu_params())
def test_launcher_follows_the_value_check_policy(backend, monkeypatch):
    """Called directly, the Triton launcher refuses bad ids where values are checked
    on the host and leaves them to its kernel elsewhere; the CUDA op always
    leaves them to its kernel (no device → host read)."""
    s = student_logits((ROWS,), VOCAB)
    index, values = sparse_teacher((ROWS,), VOCAB, K)
    index = bad_ids(index, VOCAB, "mixed")
    if backend == "triton" and _validate.values_checked_on_host(s):
        with pytest.raises(ValueError, match="outside"):
            kernel_forward(backend, s, index, values, 0, 1.0)
    as_on_a_gpu(monkeypatch)
    monkeypatch.delenv("FASTKD_CHECK_DEVICE_VALUES", raising=False)
    loss, grad, _ = kernel_forward(backend, s, index, values, 0, 1.0)
    assert_nan_rows_and_good_rows(loss, grad, s, index, values, BAD_ROWS, 0, 1.0, what=backend)


def test_launcher_ids_checked_must_be_a_bool():
    from fastkd.kernels import topk as triton_topk

    if triton_topk.DEVICE_TYPE != DEVICE.type:
        pytest.skip(f"the Triton kernels take {triton_topk.DEVICE_TYPE} tensors here")
    s = student_logits((2,), 10)
    index, values = sparse_teacher((2,), 10, 3)
    with pytest.raises(ValueError, match="ids_checked must be a bool"):
        triton_topk.topk_divergence_forward(s, index, values, None, 0, 1.0, 0.0, 1.0, True, ids_checked=1)


# ---- fastkd.topk_divergence without the host checks --------------------------------------


def public_params():
    """The GPU-guarding kernels and the reference (which the Python layer guards)."""
    return [*gpu_params(), pytest.param("reference", id="reference")]


# fastkd.topk_divergence's arguments here: T = 2, so scale T² = 4, and the
# upstream gradient 0.5 of every row (PUBLIC: the checks' keywords for them)
PUBLIC = {"kind": 0, "temperature": 2.0, "scale": 4.0, "grad_scale": 0.5}


def run_rows(backend, s, index, values, **kwargs):
    """Row losses (``reduction="none"``, T = 2) and the student gradient of their sum times 0.5."""
    s = s.detach().clone().requires_grad_(True)
    loss = fastkd.topk_divergence(s, index, values, reduction="none", backend=backend, temperature=2.0,
                                  **kwargs)
    loss.backward(torch.full_like(loss, 0.5))
    return loss.detach(), s.grad


@pytest.mark.parametrize("backend", public_params())
@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_ids_give_nan_rows_not_value_error(backend, case, monkeypatch):
    as_on_a_gpu(monkeypatch)
    monkeypatch.delenv("FASTKD_CHECK_DEVICE_VALUES", raising=False)
    s = student_logits((ROWS,), VOCAB)
    index, values = sparse_teacher((ROWS,), VOCAB, K)
    index = bad_ids(index, VOCAB, case)
    loss, grad = run_rows(backend, s, index, values)
    assert_nan_rows_and_good_rows(loss, grad, s, index, values, BAD_ROWS, **PUBLIC, what=f"{backend} {case}")


@pytest.mark.parametrize("backend", public_params())
def test_bad_values_give_nan_rows_not_value_error(backend, monkeypatch):
    """An all -inf teacher row (row 1) and, with teacher_is_logprob=True, a row
    with a positive entry (row 3) and one whose probabilities sum past 1 (row 4)."""
    as_on_a_gpu(monkeypatch)
    monkeypatch.delenv("FASTKD_CHECK_DEVICE_VALUES", raising=False)
    s = student_logits((ROWS,), VOCAB)
    index, values = sparse_teacher((ROWS,), VOCAB, K)
    logprobs = torch.log_softmax(values.double() + 2.0, dim=-1).float() - 0.5
    logprobs[1] = -torch.inf
    logprobs[3, 2] = 0.5
    logprobs[4] = torch.log(torch.full_like(logprobs[4], 0.4))
    loss, grad = run_rows(backend, s, index, logprobs, teacher_is_logprob=True)
    assert_nan_rows_and_good_rows(loss, grad, s, index, logprobs, BAD_ROWS, **PUBLIC, what=backend)
    # without the flag only the all -inf row is bad
    loss, grad = run_rows(backend, s, index, logprobs)
    assert_nan_rows_and_good_rows(loss, grad, s, index, logprobs, (1,), **PUBLIC, what=f"{backend} logits")


@pytest.mark.parametrize("backend", public_params())
def test_check_device_values_env_restores_the_value_errors(backend, monkeypatch):
    """FASTKD_CHECK_DEVICE_VALUES=1 asks for the host checks on a GPU too."""
    as_on_a_gpu(monkeypatch)
    monkeypatch.setenv("FASTKD_CHECK_DEVICE_VALUES", "1")
    s = student_logits((ROWS,), VOCAB)
    index, values = sparse_teacher((ROWS,), VOCAB, K)
    with pytest.raises(ValueError, match="twice"):
        fastkd.topk_divergence(s, bad_ids(index, VOCAB, "twice"), values, backend=backend)
    with pytest.raises(ValueError, match="all -inf"):
        fastkd.topk_divergence(s, index, torch.full_like(values, -torch.inf), backend=backend)
    monkeypatch.setenv("FASTKD_CHECK_DEVICE_VALUES", "0")
    loss = fastkd.topk_divergence(s, bad_ids(index, VOCAB, "twice"), values, backend=backend)
    assert loss.isnan()


@pytest.mark.parametrize("backend", gpu_params())
def test_batch_loss_is_nan_with_one_bad_row(backend, monkeypatch):
    as_on_a_gpu(monkeypatch)
    s = student_logits((ROWS,), VOCAB)
    index, values = sparse_teacher((ROWS,), VOCAB, K)
    index[2, 0] = VOCAB + 3
    assert fastkd.topk_divergence(s, index, values, backend=backend).isnan()


class HostRead(AssertionError):
    pass


@pytest.mark.parametrize("backend", gpu_params())
@pytest.mark.parametrize("teacher_is_logprob", (False, True))
def test_no_host_read_without_the_host_checks(backend, teacher_is_logprob, monkeypatch):
    """Forward and backward of the top-k path read no tensor value on the host
    (on a GPU each would be a device → host synchronisation): every way of
    reading one raises while the call runs."""
    as_on_a_gpu(monkeypatch)
    monkeypatch.delenv("FASTKD_CHECK_DEVICE_VALUES", raising=False)
    s = student_logits((ROWS,), VOCAB).requires_grad_(True)
    index, values = sparse_teacher((ROWS,), VOCAB, K)
    if teacher_is_logprob:
        values = torch.log_softmax(values, dim=-1)
    index = bad_ids(index, VOCAB, "mixed")
    fastkd.topk_divergence(s.detach(), index, values, backend=backend)  # compiles outside the check

    def refuse(name):
        def read(self, *args, **kwargs):
            raise HostRead(f"Tensor.{name} read a value on the host")

        return read

    with monkeypatch.context() as patch:
        for name in ("__bool__", "item", "tolist", "__float__", "__int__", "__index__", "cpu", "numpy"):
            patch.setattr(torch.Tensor, name, refuse(name))
        batch = fastkd.topk_divergence(s, index, values, backend=backend,
                                       teacher_is_logprob=teacher_is_logprob)
        rows = fastkd.topk_divergence(s, index, values, backend=backend, reduction="none",
                                      teacher_is_logprob=teacher_is_logprob, temperature=2.0)
        rows.backward(torch.full_like(rows, 0.5))
    assert batch.isnan()
    bad = torch.zeros(ROWS, dtype=torch.bool, device=DEVICE)
    bad[list(BAD_ROWS)] = True
    assert torch.equal(rows.isnan(), bad)
    assert s.grad[bad].isnan().all() and s.grad[~bad].isfinite().all()
