"""Benchmark of multi-teacher ``fastkd.divergence``: forward + backward of KL
(T = 2, ``T²`` · batchmean) from the student ``(N, V)`` to the mixture of
``K = 3`` teachers ``(K, N, V)`` with weights ``(0.5, 0.3, 0.2)``, the
student requiring a gradient, ``loss.backward()`` with upstream gradient 1.

Providers:

- ``eager``: the reference's computation in plain PyTorch, via
  :func:`reference_loss`: the mixture's log-probabilities
  (``logsumexp_k(log w_k + log_softmax(t_k/T))``, an ``(N, V)`` tensor and K
  ``log_softmax`` temporaries), then the KL rows against ``log_softmax(s/T)``.
- ``compile``: ``torch.compile`` (``fullgraph=True, dynamic=False``) of the
  same function. ``--no-compile`` skips it.
- ``mixture+fastkd-cpu``: the mixture's log-probabilities in PyTorch (as
  ``eager``), then the fused single-teacher kernel ``fastkd.divergence(...,
  backend="cpu")`` on ``T · log p``.
- ``fastkd-cpu``: ``fastkd.divergence(s, teachers, teacher_weights=w,
  backend="cpu")``, one fused call, the mixture formed per row in log space.
- ``fastkd-triton``, ``fastkd-cuda`` (``--device cuda`` only): the same fused
  call on the GPU backends (kernels/mixture.py, csrc/cuda/mixture.cu),
  which compute the mixture in float64 (the CPU kernel uses float32 and
  one log of a ratio of its stored exponentials per element): on GPUs with little fp64 throughput they are
  compute-bound (see their headers).
- ``3×fastkd-cpu``: three single-teacher calls ``Σ_k w_k D(p_k ‖ q)`` — a
  *different* objective (the weighted average of the divergences, not the
  divergence to the mixture), listed only as the cost of three dense passes;
  its ``loss_rel_diff`` is expected to be large.

Memory traffic (the floor): read the student and the K teachers once, write
the student gradient once, ``(K + 2) · N · V · itemsize`` bytes.

Arithmetic (the exp floor, CPU): the divergence to the mixture takes at
least one exponential per logit of the student and of each teacher and one
logarithm of the mixture per element, ``(K + 2) · N · V`` in all, whatever
the dtype; ``exp_floor_ms`` is their time at the rate of fastkd's own
vector exponential measured in the same run (``bench.simd_peak``), and
``x_exp_floor`` the call's time over it. A bf16 call reads half the bytes
of a float32 one but needs the same transcendentals, so its copy floor is
half as far from its exp floor.

``python -m bench.run --families mixture`` runs the sweep.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastkd
from bench.family import Case, ExpFloorFamily
from bench.measure import MIB
from bench.report import EAGER
from fastkd.reference import mixture as reference_mixture
from fastkd.reference import row_divergence

SHAPES = ((4096, 1024), (1024, 32000))
WEIGHTS = (0.5, 0.3, 0.2)
TEMPERATURE = 2.0
SEPARATE = "3×fastkd-cpu"
CPU_ONLY = ("mixture+fastkd-cpu", SEPARATE)


def reference_loss(student, teachers, weights):
    """``fastkd.reference.mixture.mixture_divergence`` for every row kept: KL to the mixture, ``T²`` ·
    batchmean.

    It is the reference without its row-selection prologue (no labels or mask
    here), whose ``nonzero`` / index copies and ``-inf`` check add work no one
    computing this loss would do and break ``torch.compile``'s graph (as
    ``bench.bench_divergence.reference_loss``); nor does it make ``T · log p``
    teacher logits only to take their ``log_softmax`` again.

    Args:
        student: ``(N, V)`` logits.
        teachers: ``(K, N, V)`` logits.
        weights: ``(K,)`` mixture weights.
    Returns:
        A float32 scalar (float64 for float64 input).
    """
    with torch.no_grad():
        log_p = reference_mixture.mixture_log_probs(teachers, weights, TEMPERATURE)
    log_q = F.log_softmax(student.to(log_p.dtype) / TEMPERATURE, dim=-1)
    rows = row_divergence(log_p, log_q, "kl")
    return TEMPERATURE**2 * rows.sum() / student.shape[0]


def mixture_then_fastkd(student, teachers, weights):
    with torch.no_grad():
        log_p = reference_mixture.mixture_log_probs(teachers, weights, TEMPERATURE)
    return fastkd.divergence(student, (TEMPERATURE * log_p).to(student.dtype), temperature=TEMPERATURE,
                             backend="cpu")


def separate_calls(student, teachers, weights):
    return sum(
        float(w) * fastkd.divergence(student, teachers[k], temperature=TEMPERATURE, backend="cpu")
        for k, w in enumerate(weights)
    )


class MixtureBench(ExpFloorFamily):
    name = "mixture"
    config_columns = ("temperature", "device", "dtype", "N", "V", "K")
    config_keys = ("dtype", "N", "V", "K")
    config_format = "{dtype} K={K} {N}×{V}"
    description = f"fastkd.divergence with K={len(WEIGHTS)} teachers: kl to the mixture (T={TEMPERATURE:g})"
    unlike_baseline = {SEPARATE: "a different objective (Σ w_k D(p_k‖q)): cost of 3 dense passes only"}
    small_configs = (("fp32", 32, 2048),)
    report_configs = (("fp32", *SHAPES[0]),)

    def reference(self, options):
        return reference_loss

    def fused(self, backend, options):
        """``fastkd.divergence`` to the mixture, one fused call on ``backend``."""

        def loss(student, teachers, weights):
            return fastkd.divergence(student, teachers, teacher_weights=weights, temperature=TEMPERATURE,
                                     backend=backend)

        return loss

    def more_providers(self, device, options, found, skipped):
        cpu = fastkd.backends()["cpu"]
        for name, loss in zip(CPU_ONLY, (mixture_then_fastkd, separate_calls), strict=True):
            if device.type != "cpu":
                skipped[name] = "CPU tensors only"
            elif cpu.available:
                found[name] = loss
            else:
                skipped[name] = cpu.reason

    def transcendentals(self, row):
        """Each side's softmax and the mixture's log (the module docstring)."""
        return (row["K"] + 2) * row["N"] * row["V"]

    def all_configs(self):
        return [(dtype, n, v) for dtype in self.dtypes for n, v in SHAPES]

    def case(self, config, device, options, providers):
        dtype_name, n, v = config
        dtype = self.dtypes[dtype_name]
        generator = torch.Generator(device=device).manual_seed(0)
        s = torch.randn(n, v, device=device, generator=generator).to(dtype).requires_grad_()
        t = torch.randn(len(WEIGHTS), n, v, device=device, generator=generator).to(dtype)
        weights = torch.tensor(WEIGHTS, dtype=torch.float64)
        columns = {
            "temperature": TEMPERATURE, "dtype": dtype_name, "N": n, "V": v, "K": len(WEIGHTS),
            "output_mib": s.nbytes / MIB, "traffic_bytes": (len(WEIGHTS) + 2) * s.nbytes,
        }
        return Case(columns, (s, t, weights))


BENCH = MixtureBench()



def test_mixture_providers_agree():
    s = torch.randn(8, 500, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 8, 500, dtype=torch.float64)
    weights = torch.tensor(WEIGHTS, dtype=torch.float64)
    found, _ = BENCH.providers(torch.device("cpu"), {}, use_compile=False)
    losses = {name: fn(s, t, weights).item() for name, fn in found.items() if name != SEPARATE}
    for name, loss in losses.items():
        assert loss == pytest.approx(losses[EAGER], rel=1e-9), name


def test_reference_loss_is_the_reference():
    """The eager provider computes what fastkd.reference.mixture.mixture_divergence does."""
    s = torch.randn(7, 301, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 7, 301, dtype=torch.float64)
    weights = torch.tensor(WEIGHTS, dtype=torch.float64)
    ours = reference_loss(s, t, weights)
    (ours_grad,) = torch.autograd.grad(ours, s)
    theirs = reference_mixture.mixture_divergence(s, t, weights, temperature=TEMPERATURE)
    (theirs_grad,) = torch.autograd.grad(theirs, s)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_grad, theirs_grad)
