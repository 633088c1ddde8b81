"""Benchmark of ``fastkd.divergence``: forward + backward of a softmax
divergence on ``(N, V)`` logits, the student requiring a gradient and the
teacher not, ``loss.backward()`` with the default upstream gradient of 1.

Configurations: the sweep's divergence (``--divergence``, KL by default)
at every shape of ``SHAPES`` and every dtype, then each other divergence
at ``KINDS_SHAPE`` in float32 (JSD and the skew divergences take a
logarithm of the mixture per element, a different cost from KL's), all at
``T = 2``, JSD's ``β = 0.5`` and the skew divergences' ``α = 0.1``
(``--temperature``, ``--beta``, ``--alpha``). ``--divergence-shapes`` /
``--divergence-dtypes`` measure only the sweep's divergence at the shapes
and dtypes they name. The divergence is each provider's third argument.

Providers:

- ``eager``: the reference's computation in plain PyTorch, via
  :func:`reference_loss` (``log_softmax`` of both sides over ``T``, then
  ``fastkd.reference.divergence.row_divergence``, ``T²`` · batchmean). It is
  ``fastkd.reference.divergence`` without its row-selection prologue (no
  labels or mask here), whose ``nonzero`` / index copies and ``-inf`` check
  add work no one computing this loss would do, and break the graph of
  ``torch.compile``.
- ``compile``: ``torch.compile(reference_loss, fullgraph=True, dynamic=False)``,
  one graph per shape and dtype, compiled (or loaded from
  ``TORCHINDUCTOR_CACHE_DIR``) in an untimed first call. ``--no-compile``
  skips it.
- ``fastkd-cpu`` (CPU), ``fastkd-triton`` and ``fastkd-cuda`` (CUDA):
  ``fastkd.divergence(..., backend=...)``.
- ``liger`` (CUDA, when ``liger_kernel`` imports): ``LigerKLDIVLoss`` for
  ``kl`` and ``LigerJSD`` for ``jsd`` on ``log_softmax(x / T)`` inputs, times
  ``T²``; the ``log_softmax`` calls are timed, as they are part of the loss.

Memory traffic (the floor): read the student and teacher logits once, write
the student gradient once, ``3 · N · V · itemsize`` bytes.

Arithmetic (the exp floor, CPU): every softmax divergence takes at least
one exponential per logit of each side, ``2 · N · V``; ``exp_floor_ms`` is
their time at ``exp2_per_s``, the rate of fastkd's own vector exponential
measured in the same run at the same thread count (``bench.simd_peak``),
and ``x_exp_floor`` the call's time over it. A call far above its copy
floor and near its exp floor is bound by arithmetic, not bytes; one above
both is bound by neither alone (the rest of the row's work: maxima, sums,
the gradient).

``python -m bench.run --families divergence`` runs the sweep; ``pytest bench/``
runs the small pytest-benchmark cases once each (the project's pytest options
disable timing; add ``--benchmark-enable`` for timings).
"""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

import fastkd
from bench.family import Case, ExpFloorFamily
from bench.measure import MIB
from fastkd import _validate
from fastkd.reference import divergence as reference_divergence
from fastkd.reference import row_divergence

SHAPES = ((4096, 1024), (2048, 32000), (512, 128256))
KINDS_SHAPE = (2048, 32000)  # the other divergences', in float32
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTION_NAMES = ("divergence", "temperature", "beta", "alpha")
# one exponential per logit of each side: the least any softmax divergence takes
EXPONENTIALS_PER_ELEMENT = 2


def reference_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    divergence: str,
    temperature: float,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """``fastkd.reference.divergence`` for every row kept, batchmean, ``scale = T²``.

    Args:
        student: ``(N, V)`` logits.
        teacher: ``(N, V)`` logits.
    Returns:
        A float32 scalar (float64 for float64 input).
    """
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    log_q = F.log_softmax(student.to(acc) / temperature, dim=-1)
    log_p = F.log_softmax(teacher.to(acc) / temperature, dim=-1)
    rows = row_divergence(log_p, log_q, divergence, beta=beta, alpha=alpha)
    return temperature**2 * rows.sum() / student.shape[0]


def fastkd_keywords(options: dict) -> dict:
    """The :func:`fastkd.divergence` keywords of ``options``: a coefficient only
    where the divergence reads it (fastkd rejects one it would ignore)."""
    kwargs = {"divergence": options["divergence"], "temperature": options["temperature"]}
    if options["divergence"] == "jsd":
        kwargs["beta"] = options["beta"]
    elif options["divergence"] in ("skew_kl", "skew_reverse_kl"):
        kwargs["alpha"] = options["alpha"]
    return kwargs


def shape(text: str) -> tuple[int, int]:
    """``"NxV"`` (or ``N×V``) as ``(N, V)``."""
    n, v = text.lower().replace("×", "x").split("x")
    return int(n), int(v)


def _liger(options: dict):
    """(name → loss function, name → why not) for Liger-Kernel's matching loss."""
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
    except ImportError:
        return {}, {"liger": "liger_kernel not installed"}
    temperature = options["temperature"]
    modules = {"kl": LigerKLDIVLoss(reduction="batchmean", log_target=True)}
    if 0 < options["beta"] < 1:
        modules["jsd"] = LigerJSD(beta=options["beta"])

    def liger(s, t, divergence):
        module = modules[divergence]  # the case's skip keeps the other divergences away
        log_q = F.log_softmax(s / temperature, dim=-1)
        log_p = F.log_softmax(t / temperature, dim=-1)
        return temperature**2 * module(log_q, log_p)

    return {"liger": liger}, {}


class DivergenceBench(ExpFloorFamily):
    name = "divergence"
    config_columns = ("divergence", "temperature", "device", "dtype", "N", "V")
    config_keys = ("divergence", "dtype", "N", "V")
    config_format = "{divergence} {dtype} {N}×{V}"
    small_configs = (("kl", "fp32", 64, 4096), ("kl", "bf16", 64, 4096), ("jsd", "fp32", 64, 4096))
    # KL in both dtypes, and JSD (GKD's loss), a logarithm of the mixture per element
    report_configs = (
        ("kl", "fp32", *KINDS_SHAPE), ("kl", "bf16", *KINDS_SHAPE), ("jsd", "fp32", *KINDS_SHAPE),
    )
    scaling_configs = (("kl", "fp32", *KINDS_SHAPE),)
    size_axis = (f"problem size N × V (KL, ordered by N·V), "
                 f"then the other divergences ({KINDS_SHAPE[0]}×{KINDS_SHAPE[1]})")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("divergence")
        group.add_argument("--divergence", default="kl", choices=_validate.DIVERGENCES)
        group.add_argument("--temperature", type=float, default=2.0)
        group.add_argument("--beta", type=float, default=0.5, help="JSD weight")
        group.add_argument("--alpha", type=float, default=0.1, help="skew weight")
        group.add_argument(
            "--divergence-shapes", nargs="+", type=shape, metavar="NxV",
            help="measure these shapes instead of the sweep's (e.g. 16384x131072)",
        )
        group.add_argument(
            "--divergence-dtypes", nargs="+", choices=DTYPE_NAMES,
            help="measure these dtypes instead of the sweep's",
        )

    def reference(self, options):
        kwargs = {k: options[k] for k in OPTION_NAMES if k != "divergence"}
        return lambda s, t, divergence: reference_loss(s, t, divergence=divergence, **kwargs)

    def fused(self, backend, options):
        def loss(s, t, divergence):
            return fastkd.divergence(s, t, **fastkd_keywords({**options, "divergence": divergence}),
                                     backend=backend)

        return loss

    def more_providers(self, device, options, found, skipped):
        if device.type == "cuda":
            liger_found, liger_skipped = _liger(options)
            found.update(liger_found)
            skipped.update(liger_skipped)

    def all_configs(self, divergence: str = "kl"):
        sweep = [(divergence, dtype, n, v) for dtype in self.dtypes for n, v in SHAPES]
        return sweep + [(kind, "fp32", *KINDS_SHAPE) for kind in _validate.DIVERGENCES if kind != divergence]

    def configs(self, quick, options):
        """The sweep's configurations (``report_configs`` with ``--quick``) for
        ``--divergence``, or those ``--divergence-shapes`` and
        ``--divergence-dtypes`` name (each defaulting to the sweep's, or to
        ``--quick``'s: the first shape, fp32)."""
        divergence = options["divergence"]
        shapes, dtypes = options.get("divergence_shapes"), options.get("divergence_dtypes")
        if not (shapes or dtypes):
            if not quick:
                return self.all_configs(divergence)
            chosen = [(divergence if kind == "kl" else kind, *rest) for kind, *rest in self.report_configs]
            return list(dict.fromkeys(chosen))
        shapes = shapes or (SHAPES[:1] if quick else SHAPES)
        dtypes = dtypes or (["fp32"] if quick else self.dtypes)
        return [(divergence, dtype, n, v) for dtype in dtypes for n, v in shapes]

    def case(self, config, device, options, providers):
        divergence, dtype_name, n, v = config
        generator = torch.Generator(device=device).manual_seed(0)
        dtype = DTYPE_NAMES[dtype_name]
        s = torch.randn(n, v, device=device, dtype=dtype, generator=generator).requires_grad_()
        t = torch.randn(n, v, device=device, dtype=dtype, generator=generator)
        columns = {
            "divergence": divergence, "temperature": options["temperature"], "dtype": dtype_name,
            "N": n, "V": v,
            "output_mib": s.nbytes / MIB,  # the student gradient: the least a fused call allocates
            "traffic_bytes": 3 * s.nbytes,
        }
        liger_has_it = divergence == "kl" or (divergence == "jsd" and 0 < options["beta"] < 1)  # as _liger

        def skip(provider: str) -> str | None:
            return None if provider != "liger" or liger_has_it else f"Liger-Kernel has no {divergence} loss"

        return Case(columns, (s, t, divergence), skip=skip)

    def describe(self, options):
        return f"fastkd.divergence: {options['divergence']} and the others (T={options['temperature']:g})"

    def size_label(self, row: dict) -> str:
        """N×V, with the divergence's name unless it is KL (``jsd 2048×32000``)."""
        size = f"{row['N']}×{row['V']}"
        return size if row["divergence"] == "kl" else f"{row['divergence']} {size}"

    def size_order(self, row: dict) -> tuple:
        """KL's shapes by size, then the other divergences in _validate.DIVERGENCES order."""
        return (_validate.DIVERGENCES.index(row["divergence"]), row["N"] * row["V"], row["N"])

    def transcendentals(self, row):
        """One exponential per logit of each side (the module docstring)."""
        return EXPONENTIALS_PER_ELEMENT * row["N"] * row["V"]


BENCH = DivergenceBench()



@pytest.mark.parametrize("divergence", _validate.DIVERGENCES)
def test_reference_loss_is_the_reference(divergence):
    """The eager provider computes what fastkd.reference.divergence does."""
    s = torch.randn(7, 301, dtype=torch.float64, requires_grad=True)
    t = torch.randn(7, 301, dtype=torch.float64)
    options = {"divergence": divergence, "temperature": 2.0, "beta": 0.3, "alpha": 0.2}
    ours = reference_loss(s, t, **options)
    (ours_grad,) = torch.autograd.grad(ours, s)
    theirs = reference_divergence(s, t, **options)
    (theirs_grad,) = torch.autograd.grad(theirs, s)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_grad, theirs_grad)


def test_configs_from_the_command_line():
    parse = BENCH.default_options
    assert BENCH.configs(False, parse()) == BENCH.all_configs()
    assert BENCH.configs(True, parse()) == list(BENCH.report_configs)
    others = [(kind, "fp32", *KINDS_SHAPE) for kind in _validate.DIVERGENCES if kind != "kl"]
    assert BENCH.all_configs()[len(SHAPES) * len(BENCH.dtypes):] == others
    options = {**parse(), "divergence_shapes": [shape("16384x131072")], "divergence_dtypes": ["bf16", "fp16"]}
    assert BENCH.configs(False, options) == [("kl", "bf16", 16384, 131072), ("kl", "fp16", 16384, 131072)]
    options = {**parse(), "divergence": "jsd", "divergence_dtypes": ["fp16"]}
    assert BENCH.configs(False, options) == [("jsd", "fp16", n, v) for n, v in SHAPES]
    assert BENCH.configs(True, options) == [("jsd", "fp16", *SHAPES[0])]
    options = {**parse(), "divergence": "jsd"}
    assert BENCH.configs(True, options) == [("jsd", "fp32", *KINDS_SHAPE), ("jsd", "bf16", *KINDS_SHAPE)]
