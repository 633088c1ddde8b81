"""``num_items_in_batch`` on :func:`fastkd.divergence`: the kept-row sum over a given count
(TRL's and transformers' gradient-accumulation normaliser)."""

from __future__ import annotations

import pytest
import torch

import fastkd
from tests.common_checks import assert_results_close
from tests.helpers import DEVICE, backend_params

BACKENDS = backend_params(include_reference=True)
# a number, and 0-d tensors of both kinds (transformers passes an integer count, TRL's
# DistillationTrainer a float one)
COUNTS = (
    pytest.param(lambda n: float(n), id="float"),
    pytest.param(lambda n: int(n), id="int"),
    pytest.param(lambda n: torch.tensor(n, dtype=torch.int64, device=DEVICE), id="int64-tensor"),
    pytest.param(lambda n: torch.tensor(float(n), dtype=torch.float64, device=DEVICE), id="float64-tensor"),
)


def logits_and_labels(rows=7, vocab=33, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2).to(device=DEVICE, dtype=dtype)
    t = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2).to(device=DEVICE, dtype=dtype)
    labels = torch.randint(0, vocab, (rows,), generator=g).to(DEVICE)
    labels[::3] = -100
    return s, t, labels


def dtype_and_rtol(backend):
    """float64 where the backend takes it (the Triton kernels take float32 at most)."""
    return (torch.float32, 2e-6) if backend == "triton" else (torch.float64, 1e-12)


def loss_and_grads(fn, s, t, upstream=(1.0,)):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    out = fn(s, t)
    parts = out if isinstance(out, tuple) else (out,)
    total = sum(w * p for w, p in zip(upstream, parts, strict=True))
    total.backward()
    return [p.detach() for p in parts], s.grad, t.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize(
    "options",
    [
        dict(divergence="jsd", beta=0.5, temperature=2.0, scale=1.0),
        dict(divergence="kl", temperature=3.0),  # scale=None: T²
        dict(divergence="reverse_kl", temperature=1.0, scale=0.5),
    ],
    ids=["jsd", "kl-default-scale", "reverse_kl"],
)
def test_kept_row_sum_over_the_given_count(backend, count, options):
    dtype, rtol = dtype_and_rtol(backend)
    s, t, labels = logits_and_labels(dtype=dtype)
    n = 11  # more than the 4 kept rows here: other micro-batches' tokens count too
    got = loss_and_grads(
        lambda a, b: fastkd.divergence(
            a, b, labels=labels, num_items_in_batch=count(n), backend=backend, **options
        ),
        s, t,
    )
    want = loss_and_grads(
        lambda a, b: fastkd.divergence(a, b, labels=labels, reduction="sum", backend=backend, **options) / n,
        s, t,
    )
    assert got[0][0].dtype == dtype
    torch.testing.assert_close(got[0][0], want[0][0], rtol=rtol, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=rtol, atol=rtol * 1e-3)
    torch.testing.assert_close(got[2], want[2], rtol=rtol, atol=rtol * 1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("count", COUNTS)
def test_hard_label_mixing_and_parts_are_divided_by_the_count(backend, count):
    dtype, rtol = dtype_and_rtol(backend)
    s, t, labels = logits_and_labels(seed=1, dtype=dtype)
    n = 9
    kwargs = dict(divergence="jsd", beta=0.3, temperature=2.0, labels=labels, hard_weight=0.4,
                  soft_weight=0.6, return_parts=True)
    # the parts back-propagated with different weights: each carries its own gradient
    upstream = (1.0, 0.25, 2.0)
    got = loss_and_grads(
        lambda a, b: fastkd.divergence(a, b, num_items_in_batch=count(n), backend=backend, **kwargs), s, t,
        upstream,
    )
    want = loss_and_grads(
        lambda a, b: tuple(
            p / n for p in fastkd.divergence(a, b, reduction="sum", backend=backend, **kwargs)
        ),
        s, t, upstream,
    )
    assert_results_close(got, want, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_micro_batch_losses_add_up_to_the_step_mean(backend):
    """Gradient accumulation: with the step's kept-token count, the micro-batches' losses and
    gradients add up to batchmean over the whole step (whose kept rows differ per micro-batch)."""
    dtype, rtol = dtype_and_rtol(backend)
    s, t, labels = logits_and_labels(rows=12, seed=2, dtype=dtype)
    labels[4:8] = -100
    step_tokens = int((labels != -100).sum())
    kwargs = dict(divergence="jsd", beta=0.5, scale=1.0, backend=backend)
    s = s.detach().clone().requires_grad_(True)
    total = sum(
        fastkd.divergence(
            s[i:i + 4], t[i:i + 4], labels=labels[i:i + 4], num_items_in_batch=step_tokens, **kwargs
        )
        for i in range(0, 12, 4)
    )
    (grad,) = torch.autograd.grad(total, s)
    s_whole = s.detach().clone().requires_grad_(True)
    whole = fastkd.divergence(s_whole, t, labels=labels, **kwargs)
    whole.backward()
    torch.testing.assert_close(total, whole, rtol=rtol, atol=0)
    torch.testing.assert_close(grad, s_whole.grad, rtol=rtol, atol=rtol * 1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_loss_stays_float32_with_a_float64_count(backend):
    s, t, labels = logits_and_labels(dtype=torch.float32)
    count = torch.tensor(5.0, dtype=torch.float64, device=DEVICE)
    loss = fastkd.divergence(s, t, labels=labels, num_items_in_batch=count, backend=backend)
    assert loss.dtype == torch.float32
    want = fastkd.divergence(s.double(), t.double(), labels=labels, reduction="sum", backend="reference") / 5
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)


def test_several_teachers_take_the_count():
    s, t, labels = logits_and_labels(seed=3)
    teachers = torch.stack([t, t.flip(-1)])
    got = fastkd.divergence(s, teachers, labels=labels, num_items_in_batch=6)
    want = fastkd.divergence(s, teachers, labels=labels, reduction="sum") / 6
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_no_kept_rows_gives_zero():
    s, t, labels = logits_and_labels()
    labels[:] = -100
    s = s.requires_grad_(True)
    loss = fastkd.divergence(s, t, labels=labels, num_items_in_batch=torch.tensor(3, device=DEVICE))
    loss.backward()
    assert loss.item() == 0.0 and not s.grad.any()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(num_items_in_batch=0), "num_items_in_batch must be finite and > 0"),
        (dict(num_items_in_batch=-2.0), "num_items_in_batch must be finite and > 0"),
        (dict(num_items_in_batch=float("nan")), "num_items_in_batch must be finite and > 0"),
        (dict(num_items_in_batch=float("inf")), "num_items_in_batch must be finite and > 0"),
        (dict(num_items_in_batch=torch.tensor(0)), "num_items_in_batch must be finite and > 0"),
        (dict(num_items_in_batch=torch.tensor(-1.0)), "num_items_in_batch must be finite and > 0"),
        (dict(num_items_in_batch=True), "num_items_in_batch must be a number or a 0-d tensor"),
        (dict(num_items_in_batch="4"), "num_items_in_batch must be a number or a 0-d tensor"),
        (dict(num_items_in_batch=torch.tensor([4])), "num_items_in_batch must be a number or a 0-d tensor"),
        (dict(num_items_in_batch=torch.tensor(True)), "num_items_in_batch must be real"),
        (dict(num_items_in_batch=4, reduction="sum"), "cannot be combined with reduction='sum'"),
        (dict(num_items_in_batch=4, reduction="mean"), "cannot be combined with reduction='mean'"),
        (dict(num_items_in_batch=4, reduction="none"), "cannot be combined with reduction='none'"),
        (dict(num_items_in_batch=4, reduction="max"), "reduction"),
        (dict(num_items_in_batch=4, temperature=0.0), "temperature"),
        (dict(num_items_in_batch=4, scale="2"), "scale"),
        (dict(num_items_in_batch=4, scale=float("inf")), "scale"),
        (dict(num_items_in_batch=4, hard_weight=-1.0), "hard_weight"),
    ],
)
def test_bad_count_raises_value_error_naming_it(kwargs, needle):
    s, t, labels = logits_and_labels()
    with pytest.raises(ValueError, match=needle):
        fastkd.divergence(s, t, labels=labels, **kwargs)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="host synchronisation: CUDA only (FASTKD_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_device_count_is_never_read_on_the_host(backend):
    """With the count on the device, neither the forward nor the backward waits for the device:
    the kept rows are not counted on the host either (the given count replaces them)."""
    if backend == "reference":
        pytest.skip("the reference is the plain-PyTorch specification, not held to this")
    s, t, labels = logits_and_labels(rows=64, vocab=1000, dtype=torch.float32)
    s.requires_grad_(True)
    count = torch.tensor(100.0, device=DEVICE)
    fastkd.divergence(s, t, labels=labels, num_items_in_batch=count, backend=backend).backward()  # warm-up
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fastkd.divergence(s, t, labels=labels, divergence="jsd", beta=0.5, num_items_in_batch=count,
                                 backend=backend)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
