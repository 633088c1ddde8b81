"""The protocol every ``bench/bench_<stem>.py`` follows.

A family module defines one :class:`Family` subclass and puts an instance in
``BENCH``; ``python -m bench.run`` finds it there. The subclass says what
differs between families: its configuration columns, the reference it
measures as ``eager`` (and, compiled, as ``compile``), the fused call it
measures as ``fastkd-<backend>``, any further providers, the configurations of
the sweep, and how to build one configuration's inputs (:class:`Case`). The
base class runs the sweep (:func:`measure_config` on every configuration),
titles and labels the report, and runs one small configuration per provider
under pytest-benchmark (``pytest bench/``).

Two plans: the full sweep (``all_configs``, ``make bench-full``) and the
representative report (``report_configs``: one or two configurations per
family, ``make bench``, ``python -m bench.run --quick``). Configurations in
``scaling_configs`` are measured a second time with one thread (the fastkd
providers only), next to the hardware's own one-thread rates; a family whose
loss is bound by matrix products names them (:meth:`Family.floor_gemms`) and
gets a GEMM floor measured with ``torch.mm`` at the same shapes in the same run.

Every row has ``provider``, ``dtype``, ``traffic_bytes`` (None for a
compute-bound loss: no floor) and, when measured, ``median_ms`` and
``peak_extra_mib``; ``run`` adds the floor and the ratios
(:func:`bench.report.add_floor_and_ratios`).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
import torch

import fastkd
from bench.measure import (
    MIB,
    Call,
    ThpSetting,
    copy_bandwidth,
    few_runs,
    first_call,
    gemm_ms,
    peak_extra_bytes,
    synchronize,
    time_uncontended,
)
from bench.report import COMPILE, EAGER, FLOOR_METRICS, ONE_THREAD, TABLE_HEAD, TABLE_TAIL
from bench.simd_peak import EXP_FLOOR_COLUMNS, EXP_FLOOR_TABLE_METRICS, add_exp_floor


@dataclass
class SweepContext:
    """What ``run.py`` hands each family's ``sweep``."""

    device: torch.device
    quick: bool
    compile: bool
    thp: ThpSetting
    progress: object  # rich.progress.Progress
    options: dict = field(default_factory=dict)  # the parsed command line; families read their own
    machine: dict = field(default_factory=dict)  # bench.measure.machine_columns, copied into every row
    timing: dict = field(default_factory=dict)  # time_uncontended options under each case's own


# A provider's first loss may differ from the baseline's by this much
# (relative) before its row says so: a benchmark is not a parity test, but a
# provider computing something else must not pass silently.
LOSS_REL_TOLERANCE = 1e-3


def allow_recompiles() -> None:
    """Let ``torch.compile`` keep one static graph per shape and dtype of the same function."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 256
    )


def measure_config(
    ctx: SweepContext,
    task,
    label: str,
    base: dict,
    loss_fns: dict[str, Callable[..., torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    reset: Callable[[], object],
    *,
    skip: Callable[[str], str | None] | None = None,
    unavailable: dict[str, str] | None = None,
    baseline: str | None = EAGER,
    tolerance: float = LOSS_REL_TOLERANCE,
    unlike_baseline: dict[str, str] | None = None,
    timing_options: dict | None = None,
    per_second: dict[str, float] | None = None,
) -> list[dict]:
    """Measure every provider on one configuration; one row per provider.

    Each provider ``loss_fns[name](*inputs)`` (a loss whose ``.backward()``
    is timed with it) gets an untimed first call (warm-up, compile, and the
    loss value it is checked by; a provider running out of device memory
    there gets a row saying so and is not measured), then the providers'
    timed runs take turns (:func:`time_uncontended`), then each one's peak
    extra memory. ``reset`` clears the gradients before every call.

    Args:
        ctx, task: the sweep's context and its progress task (advanced once
            per measured or ``skip``-ped provider).
        label: what the progress line says about this configuration.
        base: the configuration's columns, copied into every row.
        skip: ``skip(name)`` is why a provider is not run on this
            configuration (too big for memory, say) or None: a row with the
            reason as its note, first.
        unavailable: providers not run at all (not installed ...): rows with
            the reason, last; not counted in the progress.
        baseline: the provider whose first loss the others are compared with
            (``loss_rel_diff``, and a note beyond ``tolerance``); None or
            absent: no comparison.
        unlike_baseline: providers that compute a different objective on
            purpose, with the note saying so instead of a comparison.
        timing_options: passed to :func:`time_uncontended` (fewer repeats for
            slow configurations).
        per_second: column name → amount per call (GFLOP, GB ...); the row
            gets ``amount / median seconds`` under that name.
    """
    unlike_baseline = unlike_baseline or {}
    rows = []
    here = {}
    for name, loss_fn in loss_fns.items():
        reason = skip(name) if skip is not None else None
        if reason is None:
            here[name] = loss_fn
        else:
            rows.append({**base, "provider": name, "note": reason})
            ctx.progress.advance(task)
    first = {}
    for name, loss_fn in here.items():
        ctx.progress.update(task, description=f"{label} {name}: first call")
        try:
            first[name] = first_call(loss_fn, inputs, device=ctx.device)
        except torch.OutOfMemoryError as exc:
            # A provider too big for the device is a result, not the end of the sweep.
            reset()
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
            first_line = str(exc).splitlines()[0][:120]
            rows.append({**base, "provider": name, "note": f"out of memory: {first_line}"})
            ctx.progress.advance(task)
    calls = {
        name: Call(lambda loss_fn=loss_fn: loss_fn(*inputs).backward(), reset)
        for name, loss_fn in here.items()
        if name in first
    }
    ctx.progress.update(task, description=f"{label}: timing")
    timings, other_load = time_uncontended(calls, device=ctx.device, **(timing_options or {}))
    baseline_loss = first[baseline][0] if baseline in first else None
    for name, call in calls.items():
        ctx.progress.update(task, description=f"{label} {name}: memory")
        peak = peak_extra_bytes(call.fn, device=ctx.device, setup=reset)
        reset()
        loss, first_s = first[name]
        rel_diff = abs(loss - baseline_loss) / abs(baseline_loss) if baseline_loss else None
        notes = []
        if name == COMPILE:
            notes.append(f"first call (compile or cache load) {first_s:.1f} s")
        if name in unlike_baseline:
            notes.append(unlike_baseline[name])
        elif rel_diff is not None and rel_diff > tolerance:
            notes.append(f"loss differs from {baseline} by {rel_diff:.1e}")
        timing = timings[name]
        seconds = timing.median_ms * 1e-3
        rows.append({
            **base,
            "provider": name,
            "median_ms": timing.median_ms,
            "min_ms": min(timing.times_ms),
            "max_ms": max(timing.times_ms),
            "repeats": timing.repeats,
            "first_call_s": first_s,
            "peak_extra_mib": None if peak is None else peak / MIB,
            **{column: amount / seconds for column, amount in (per_second or {}).items()},
            "loss_rel_diff": rel_diff,
            "other_load": other_load,
            "note": "; ".join(notes),
        })
        ctx.progress.advance(task)
    rows.extend({**base, "provider": name, "note": reason} for name, reason in (unavailable or {}).items())
    return rows


# ----------------------------------------------------------------------------- the protocol

# The columns every family writes, around its own: configuration first, then
# the measurement, the family's metrics, the floor and ratios, the context.
MEASURED_COLUMNS = (
    "median_ms", "min_ms", "max_ms", "repeats", "first_call_s", "peak_extra_mib", "output_mib",
)
RATIO_COLUMNS = (
    "traffic_bytes", "floor_ms", "copy_gbs", "speedup_vs_eager", "speedup_vs_compile", "x_floor",
    "gemm_gflop", "gemm_gflops", "gemm_floor_ms", "x_gemm_floor",
)
CONTEXT_COLUMNS = (
    "loss_rel_diff", "other_load", "config", "config_s", "config_cpu_s", "thp", "threads", "machine", "torch",
    "note",
)
# A GEMM-bound family's table shows its GEMM floor (Family.floor_gemms).
GEMM_METRICS = (
    ("gemm_gflops", "torch.mm GFLOP/s", ".1f"),
    ("gemm_floor_ms", "GEMM floor ms", ".1f"),
    ("x_gemm_floor", "× GEMM floor", ".2f"),
)

# Where the pytest-benchmark cases run.
SMALL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def config_key(config) -> str:
    """A configuration (a family's tuple) as one CSV cell: its items joined by spaces."""
    return " ".join(map(str, config))


def backends_on(device: torch.device) -> tuple[str, ...]:
    """The fastkd backends that take tensors on ``device``."""
    return ("cpu",) if device.type == "cpu" else ("triton", "cuda")


def clear_grads(tensors: Sequence) -> None:
    """``x.grad = None`` for every tensor of ``tensors`` (other items are passed over)."""
    for x in tensors:
        if isinstance(x, torch.Tensor):
            x.grad = None


@dataclass
class Case:
    """One configuration: the providers' inputs and the row's columns.

    Attributes:
        columns: the configuration's columns (``dtype``, sizes, ``output_mib``,
            ``traffic_bytes`` ...); ``family``, ``device``, ``thp`` and the
            machine's columns are added.
        inputs: what each provider is called with, ``loss_fn(*inputs)``.
        reset: run before every call, untimed; default: clear the gradients of
            the tensors in ``inputs``.
        loss_fns: this configuration's providers, where they are built per
            configuration (modules with state); default: the family's.
        skip: ``skip(provider)`` is why a provider is not run here, or None.
        timing: options of :func:`bench.measure.time_uncontended`.
        per_second: column name → amount per call; the row gets amount / seconds.
            Default: ``model_gflops`` where the columns have ``model_gflop``.
    """

    columns: dict
    inputs: tuple
    reset: Callable[[], object] | None = None
    loss_fns: dict | None = None
    skip: Callable[[str], str | None] | None = None
    timing: dict | None = None
    per_second: dict | None = None

    def __post_init__(self) -> None:
        if self.reset is None:
            self.reset = lambda inputs=self.inputs: clear_grads(inputs)
        if self.per_second is None and "model_gflop" in self.columns:
            self.per_second = {"model_gflops": self.columns["model_gflop"]}


def compute_bound_case(columns: dict, inputs: tuple, skip, model_flop: int, long_calls: bool) -> Case:
    """The :class:`Case` of a compute-bound configuration whose ``inputs`` all get a
    gradient: ``columns`` plus ``output_mib`` (one gradient per input, the inputs'
    size), no ``traffic_bytes`` floor and ``model_gflop`` from ``model_flop``; with
    ``long_calls`` (calls of seconds) no extra warm-up and exactly two timed runs."""
    columns = {
        **columns,
        "output_mib": sum(x.nbytes for x in inputs) / MIB,
        "traffic_bytes": None,
        "model_gflop": model_flop / 1e9,
    }
    return Case(columns, inputs, skip=skip, timing=few_runs() if long_calls else None)


class Family:
    """One loss family's benchmark. Subclasses set the class attributes without
    a default and implement :meth:`reference`, :meth:`fused`,
    :meth:`all_configs` and :meth:`case`; the rest is optional."""

    name: str  # the stem: bench/bench_<name>.py, bench/results/<name>_<device>.csv
    description: str  # the loss measured, for the title (or override describe)
    config_columns: tuple[str, ...]  # the columns naming a configuration, after family and device
    config_keys: tuple[str, ...]  # those within which the speed-ups are taken
    config_format: str  # a configuration in the table and progress line, str.format of a row
    size_columns: tuple[str, ...] = ("N", "V")  # the plot's problem size: their product orders it
    metric_columns: tuple[str, ...] = ()  # the family's own measured columns
    table_metrics: tuple[tuple[str, str, str], ...] = FLOOR_METRICS  # between the time and the ratios
    size_axis = "problem size N × V (ordered by N·V)"
    output_key: str | None = "output_mib"  # a MiB column drawn on the memory panel: the outputs' size
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    tolerance = 1e-3  # a provider's first loss may differ from the baseline's this much (relative)
    compile_options = {"fullgraph": True, "dynamic": False}
    no_compile: str | None = None  # why torch.compile is not measured for this family
    unlike_baseline: dict[str, str] = {}  # providers computing another objective on purpose: the note
    small_configs: tuple = ()  # configurations of the pytest-benchmark cases
    # make bench's configurations (one or two, the costly providers included); None: the first of the sweep's
    report_configs: tuple | None = None
    scaling_configs: tuple = ()  # configurations measured again with one thread (the fastkd providers)

    # ------------------------------------------------------------------------- what a family says

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The family's command-line options."""

    def reference(self, options: dict) -> Callable | None:
        """The ``eager`` provider (compiled, also ``compile``), or None."""
        raise NotImplementedError

    def fused(self, backend: str, options: dict) -> Callable:
        """The ``fastkd-<backend>`` provider."""
        raise NotImplementedError

    def more_providers(self, device: torch.device, options: dict, found: dict, skipped: dict) -> None:
        """Add providers beyond eager, compile and fastkd (to ``found``), or why not (to ``skipped``)."""

    def all_configs(self) -> list:
        raise NotImplementedError

    def quick_configs(self) -> list:
        """``--quick`` (``make bench``): ``report_configs``, by default the sweep's first configuration."""
        return list(self.report_configs) if self.report_configs is not None else self.all_configs()[:1]

    def floor_gemms(self, row: dict) -> list[tuple[int, int, int]] | None:
        """The matrix products ``(m, k, n)`` the loss needs at the configuration of
        ``row`` (its columns), or None where it is not bound by matrix products.
        Their time with ``torch.mm`` in the same run is the row's GEMM floor."""
        return None

    def case(self, config, device: torch.device, options: dict, providers: dict) -> Case:
        raise NotImplementedError

    def baseline(self, providers: dict) -> str | None:
        """The provider the others' first loss is compared with."""
        return EAGER

    def finish(self, rows: list[dict]) -> None:
        """Complete one configuration's rows in place (columns derived from several rows)."""

    def describe(self, options: dict) -> str:
        """The loss measured, for the title."""
        return self.description

    # ------------------------------------------------------------------------- shared

    def config_label(self, row: dict) -> str:
        return self.config_format.format(**row)

    def size_label(self, row: dict) -> str:
        return "×".join(str(row[column]) for column in self.size_columns)

    def size_order(self, row: dict) -> tuple:
        sizes = tuple(row[column] for column in self.size_columns)
        return (math.prod(sizes), sizes)

    @property
    def has_gemm_floor(self) -> bool:
        return type(self).floor_gemms is not Family.floor_gemms

    @property
    def table_columns(self) -> tuple[tuple[str, str, str], ...]:
        return TABLE_HEAD + self.table_metrics + (GEMM_METRICS if self.has_gemm_floor else ()) + TABLE_TAIL

    @property
    def columns(self) -> tuple[str, ...]:
        return (
            "family", *self.config_columns, "provider", *MEASURED_COLUMNS, *self.metric_columns,
            *RATIO_COLUMNS, *CONTEXT_COLUMNS,
        )

    def default_options(self) -> dict:
        """The family's options at their defaults."""
        parser = argparse.ArgumentParser()
        self.add_arguments(parser)
        return vars(parser.parse_args([]))

    def configs(self, quick: bool, options: dict) -> list:
        """The configurations to measure (``options``: the parsed command line)."""
        return self.quick_configs() if quick else self.all_configs()

    def providers(self, device: torch.device, options: dict, *, use_compile: bool) -> tuple[dict, dict]:
        """(name → ``loss(*inputs)``, name → why it is not measured)."""
        found, skipped = {}, {}
        eager = self.reference(options)
        if eager is not None:
            found[EAGER] = eager
        if self.no_compile is not None:
            skipped[COMPILE] = self.no_compile
        elif not use_compile:
            skipped[COMPILE] = "--no-compile"
        elif eager is not None:
            found[COMPILE] = torch.compile(eager, **self.compile_options)
        status = fastkd.backends()
        for backend in backends_on(device):
            name = f"fastkd-{backend}"
            if status[backend].available:
                found[name] = self.fused(backend, options)
            else:
                skipped[name] = status[backend].reason
        self.more_providers(device, options, found, skipped)
        return found, skipped

    def sweep(self, ctx: SweepContext) -> list[dict]:
        """Every provider on every configuration; one row per (configuration, provider)
        (:func:`measure_config`), then the one-thread rows of ``scaling_configs``
        (:meth:`measure_one_thread`). Every row of a configuration gets its wall
        time and this process's CPU time (all threads), first calls and compiling
        included (``config_s``, ``config_cpu_s``)."""
        found, skipped = self.providers(ctx.device, ctx.options, use_compile=ctx.compile)
        if COMPILE in found:
            allow_recompiles()
        todo = self.configs(ctx.quick, ctx.options)
        scaling = [config for config in todo if config in self.scaling_configs and ctx.device.type == "cpu"]
        fused = [name for name in found if name.startswith("fastkd-")]
        task = ctx.progress.add_task(self.name, total=len(todo) * len(found) + len(scaling) * len(fused))
        rows = []
        for config in todo:
            started, cpu_started = time.perf_counter(), time.process_time()
            case = self.case(config, ctx.device, ctx.options, found)
            columns = {
                "family": self.name, "device": ctx.device.type, **case.columns, "thp": ctx.thp.short,
                **ctx.machine,
            }
            label = f"{self.name} {self.config_label(columns)}"
            measured = measure_config(
                ctx, task, label, columns, case.loss_fns or found, case.inputs,
                case.reset, skip=case.skip, unavailable=skipped, baseline=self.baseline(found),
                tolerance=self.tolerance, unlike_baseline=self.unlike_baseline,
                timing_options={**ctx.timing, **(case.timing or {})}, per_second=case.per_second,
            )
            self.finish(measured)
            self.add_gemm_floor(ctx, measured)
            if config in scaling:
                measured += self.measure_one_thread(ctx, task, label, columns, case, found)
            for row in measured:
                row["config"] = config_key(config)
                row["config_s"] = time.perf_counter() - started
                row["config_cpu_s"] = time.process_time() - cpu_started
            rows += measured
            del case, measured
        ctx.progress.update(task, description=f"{self.name} done")
        return rows

    def add_gemm_floor(self, ctx: SweepContext, rows: list[dict]) -> None:
        """Fill ``gemm_gflop``, ``gemm_floor_ms`` (:meth:`floor_gemms` timed with
        ``torch.mm`` now, at the current thread count), ``gemm_gflops`` and
        ``x_gemm_floor`` of one configuration's rows; nothing where the family
        names no GEMMs."""
        if not rows or (gemms := self.floor_gemms(rows[0])) is None:
            return
        dtype = self.dtypes.get(rows[0].get("dtype"), torch.float32)
        floor = gemm_ms(gemms, dtype, ctx.device)
        gflop = 2 * sum(m * k * n for m, k, n in gemms) / 1e9
        for row in rows:
            row["gemm_gflop"] = gflop
            row["gemm_floor_ms"] = floor
            row["gemm_gflops"] = gflop / (floor * 1e-3)
            if row.get("median_ms") is not None:
                row["x_gemm_floor"] = row["median_ms"] / floor

    def measure_one_thread(
        self, ctx: SweepContext, task, label: str, columns: dict, case: Case, found: dict
    ) -> list[dict]:
        """The fastkd providers on ``case`` again with one thread: rows named
        ``<provider> (1 thread)``, with the copy bandwidth (``copy_gbs``) and the
        GEMM floor measured with one thread too, so that the loss's scaling can be
        read against the machine's."""
        threads = torch.get_num_threads()
        providers = {
            name + ONE_THREAD: fn
            for name, fn in (case.loss_fns or found).items()
            if name.startswith("fastkd-")
        }
        skip = None
        if case.skip is not None:
            def skip(name: str, inner=case.skip) -> str | None:
                return inner(name.removesuffix(ONE_THREAD))
        torch.set_num_threads(1)
        try:
            base = {**columns, "threads": 1, "copy_gbs": copy_bandwidth(ctx.device) / 1e9}
            rows = measure_config(
                ctx, task, f"{label}, 1 thread", base, providers, case.inputs, case.reset, skip=skip,
                baseline=None, timing_options={**ctx.timing, **(case.timing or {})},
                per_second=case.per_second,
            )
            self.finish(rows)
            self.add_gemm_floor(ctx, rows)
        finally:
            torch.set_num_threads(threads)
        return rows

    def title(self, ctx: SweepContext) -> str:
        return (
            f"{self.describe(ctx.options)} forward + backward, {ctx.device.type}, "
            f"{torch.get_num_threads()} threads, THP {ctx.thp.short}"
        )

    # ------------------------------------------------------------------------- pytest-benchmark

    def small_params(self) -> list:
        """``pytest.param(provider, config)`` for every provider available without
        compiling (a cold compile costs 10-30 s on CPU) and every small configuration."""
        found, _ = self.providers(SMALL_DEVICE, self.default_options(), use_compile=False)
        return [
            pytest.param(provider, config, id=f"{provider}-{'-'.join(map(str, config))}")
            for provider in found
            for config in self.small_configs
        ]

    def run_small(self, benchmark, provider: str, config) -> None:
        """Time ``provider`` on the small ``config`` with pytest-benchmark (once,
        under the project's ``--benchmark-disable``), and check that every input
        requiring a gradient got one of its shape."""
        options = self.default_options()
        found, _ = self.providers(SMALL_DEVICE, options, use_compile=False)
        case = self.case(config, SMALL_DEVICE, options, found)
        reason = case.skip(provider) if case.skip is not None else None
        if reason is not None:
            pytest.skip(reason)
        loss_fn = (case.loss_fns or found)[provider]

        def step():
            loss_fn(*case.inputs).backward()
            synchronize(SMALL_DEVICE)

        benchmark.pedantic(step, setup=case.reset, rounds=5, warmup_rounds=1)
        for x in case.inputs:
            if isinstance(x, torch.Tensor) and x.requires_grad:
                assert x.grad is not None and x.grad.shape == x.shape


class ExpFloorFamily(Family):
    """A family whose CPU rows also get the exp floor
    (:func:`bench.simd_peak.add_exp_floor`): :meth:`transcendentals` gives the
    least number of exponentials and logarithms of one configuration."""

    metric_columns = EXP_FLOOR_COLUMNS
    table_metrics = (*FLOOR_METRICS, *EXP_FLOOR_TABLE_METRICS)

    def transcendentals(self, row: dict) -> int:
        raise NotImplementedError

    def add_gemm_floor(self, ctx: SweepContext, rows: list[dict]) -> None:
        """The GEMM floor (none for these families) and, on CPU, the exp floor at
        the current thread count."""
        super().add_gemm_floor(ctx, rows)
        if ctx.device.type == "cpu" and rows:
            add_exp_floor(rows, self.transcendentals(rows[0]))


class EmbeddingTermsFamily(Family):
    """A family of losses between ``(N, D)`` student and teacher embeddings, float32,
    the student requiring a gradient, with several terms measured side by side
    (RKD's distance and angle; PKT, SP and CC). Each provider takes the term's
    name as its third argument; the ``dtype`` column names the term and the
    dtype (``angle fp32``), so that the plot draws one line per provider and term.

    Subclasses set ``terms`` (name → (reference function, fastkd function)),
    ``sizes`` (the batch sizes N), ``dim`` (D), ``name`` and ``description``, and
    implement :meth:`model_flop`; :meth:`skip` and :meth:`timing` are optional.
    """

    terms: dict[str, tuple[Callable, Callable]]
    sizes: tuple[int, ...]
    dim = 128
    config_columns = ("loss", "device", "dtype", "N", "D")
    config_keys = ("loss", "dtype", "N", "D")
    config_format = "{loss} {N}"  # D is in the title
    size_columns = ("N",)
    metric_columns = ("model_gflop", "model_gflops")
    table_metrics = (  # no floor: compute-bound
        ("model_gflop", "GFLOP (model)", ".2f"),
        ("model_gflops", "GFLOP/s (model)", ".1f"),
        ("loss_rel_diff", "loss vs eager", ".1e"),
    )
    tolerance = 1e-4

    @property
    def size_axis(self) -> str:
        return f"batch size N (D = {self.dim})"

    @property
    def small_configs(self) -> tuple:
        return tuple((term, 96, 32) for term in self.terms)

    def model_flop(self, term: str, n: int, d: int) -> int:
        """The FLOP count of one call, a size scale for ``model_gflop``."""
        raise NotImplementedError

    def skip(self, provider: str, term: str, n: int) -> str | None:
        """Why ``provider`` does not run ``term`` at ``N = n``, or None."""
        return None

    def timing(self, term: str, n: int) -> dict | None:
        """Timing options for ``term`` at ``N = n`` (None: the defaults)."""
        return None

    def reference(self, options):
        return lambda s, t, term: self.terms[term][0](s, t)

    def fused(self, backend, options):
        return lambda s, t, term: self.terms[term][1](s, t, backend=backend)

    def all_configs(self):
        return [(term, n, self.dim) for term in self.terms for n in self.sizes]

    def quick_configs(self):
        """``report_configs``, by default every term at the smallest size."""
        if self.report_configs is not None:
            return list(self.report_configs)
        return [(term, self.sizes[0], self.dim) for term in self.terms]

    def case(self, config, device, options, providers):
        term, n, d = config
        generator = torch.Generator(device=device).manual_seed(0)
        teacher = torch.randn(n, d, device=device, generator=generator)
        student = (teacher + 0.5 * torch.randn(n, d, device=device, generator=generator)).requires_grad_()
        columns = {
            "loss": term, "dtype": f"{term} fp32", "N": n, "D": d,
            "output_mib": student.nbytes / MIB,  # the student's gradient
            "traffic_bytes": None,  # compute-bound: no floor
            "model_gflop": self.model_flop(term, n, d) / 1e9,
        }
        return Case(
            columns, (student, teacher, term), skip=lambda provider: self.skip(provider, term, n),
            timing=self.timing(term, n),
        )
