"""What every ``bench_<family>.py`` shares: timing, peak memory, bandwidth and
the memory-traffic floor, the THP setting, and the report (CSV, rich progress
and table, matplotlib PNG).

Conventions (DESIGN.md, "Benchmarks are not tests"):

- A measurement is forward + backward of one loss call, timed with
  ``time.perf_counter`` (after ``torch.cuda.synchronize`` on CUDA) and
  reported as the median over repeats, after a warm-up. The providers of one
  configuration take turns, and the turns are retried while other processes
  load the machine; ``other_load`` records how loaded it was.
- Speed-ups are ratios of medians measured in the same run, against the
  ``eager`` and ``compile`` providers of the same configuration.
- The floor of a configuration is the bytes it must move (read the inputs
  once, write the outputs once) over the measured copy bandwidth of this
  machine; ``x_floor`` is how many floors a provider takes.
"""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import gc
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fastkd

MIB = 2**20
EAGER = "eager"
COMPILE = "compile"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    median_ms: float
    times_ms: tuple[float, ...]

    @property
    def repeats(self) -> int:
        return len(self.times_ms)


@dataclass(frozen=True)
class Call:
    """A callable to time, and what to run before each call, untimed (for a
    loss: ``x.grad = None``, so each backward writes a fresh gradient, as a
    training step after ``zero_grad(set_to_none=True)`` does)."""

    fn: Callable[[], object]
    setup: Callable[[], object] | None = None

    def __call__(self) -> None:
        if self.setup is not None:
            self.setup()
        self.fn()


def time_interleaved(
    calls: dict[str, Call],
    *,
    device: torch.device,
    warmup: int = 1,
    min_repeats: int = 3,
    max_repeats: int = 15,
    budget_s: float = 2.0,
) -> dict[str, Timing]:
    """Median wall time of each call in milliseconds, the calls taking turns.

    Taking turns spreads a slow drift of the machine evenly over the providers
    being compared. It does not rescue a core kept busy by another process:
    OpenMP's threads then wait for a descheduled one at every parallel region,
    which costs the providers with the most regions most; see
    :func:`time_uncontended`. A call stops taking turns at ``max_repeats``
    runs, or once it has ``min_repeats`` runs that together took ``budget_s``:
    one slower than ``budget_s / min_repeats`` gets exactly ``min_repeats``
    runs, a fast one up to ``max_repeats``.
    """
    for call in calls.values():
        for _ in range(warmup):
            call()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in calls}

    def wants_more(runs: list[float]) -> bool:
        return len(runs) < max_repeats and (len(runs) < min_repeats or sum(runs) < budget_s * 1e3)

    while active := [name for name, runs in times.items() if wants_more(runs)]:
        for name in active:
            call = calls[name]
            if call.setup is not None:
                call.setup()
            synchronize(device)
            start = time.perf_counter()
            call.fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: Timing(statistics.median(runs), tuple(runs)) for name, runs in times.items()}


def first_call(loss_fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], *,
               device: torch.device) -> tuple[float, float]:
    """(loss, seconds) of an untimed first forward + backward of ``loss_fn(*inputs)``:
    a warm-up, the compile for ``compile``, and the value the providers are
    checked by. The inputs' gradients are cleared before and after."""

    def clear_grads() -> None:
        for x in inputs:
            x.grad = None

    clear_grads()
    start = time.perf_counter()
    loss = loss_fn(*inputs)
    loss.backward()
    synchronize(device)
    seconds = time.perf_counter() - start
    clear_grads()
    return float(loss.detach()), seconds


def time_call(fn: Callable[[], object], *, device: torch.device, setup=None, **options) -> Timing:
    """:func:`time_interleaved` of one call."""
    return time_interleaved({"": Call(fn, setup)}, device=device, **options)[""]


class OtherLoad:
    """How many CPU cores other processes kept busy while the block ran.

    ``with OtherLoad() as load: ...`` then ``load.cores``: busy time of the
    whole machine (``/proc/stat``) minus this process's own (``/proc/self/stat``,
    all threads), over the wall time. Timings from a configuration with a load
    near 1 on a 2-core machine are not comparable with quiet ones: OpenMP's
    threads wait for the one that was descheduled. ``None`` off Linux.
    """

    cores: float | None = None

    @staticmethod
    def _sample() -> tuple[float, float] | None:
        try:
            with open("/proc/stat") as stat:
                fields = [int(x) for x in stat.readline().split()[1:]]
            with open("/proc/self/stat") as own:
                own_fields = own.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            return None
        idle = fields[3] + fields[4]  # idle + iowait
        machine = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
        return machine, int(own_fields[11]) + int(own_fields[12])  # utime + stime

    def __enter__(self) -> OtherLoad:
        self._start = (time.perf_counter(), self._sample())
        return self

    def __exit__(self, *exc) -> None:
        end_sample = self._sample()
        start_time, start_sample = self._start
        if start_sample is None or end_sample is None:
            return
        ticks = os.sysconf("SC_CLK_TCK")
        other = (end_sample[0] - start_sample[0]) - (end_sample[1] - start_sample[1])
        self.cores = max(other, 0) / ticks / (time.perf_counter() - start_time)


# Cores other processes may keep busy before a measurement counts as contended.
CONTENDED_LOAD = 0.3


def time_uncontended(
    calls: dict[str, Call],
    *,
    device: torch.device,
    attempts: int = 3,
    pause_s: float = 10.0,
    **options,
) -> tuple[dict[str, Timing], float | None]:
    """:func:`time_interleaved`, retried while other processes load the machine.

    An attempt during which other processes kept more than
    ``CONTENDED_LOAD`` cores busy (:class:`OtherLoad`) is repeated after
    ``pause_s``, up to ``attempts`` in all; the least loaded attempt is kept.
    Returns its timings and its load (``None`` where unmeasurable).
    """
    best: tuple[dict[str, Timing], float | None] | None = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(pause_s)
        with OtherLoad() as load:
            timings = time_interleaved(calls, device=device, **options)
        if best is None or (load.cores is not None and best[1] is not None and load.cores < best[1]):
            best = (timings, load.cores)
        if load.cores is None or load.cores <= CONTENDED_LOAD:
            break
    return best


# ----------------------------------------------------------------------------- memory


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak_rss() -> bool:
    """Set VmHWM (peak RSS) to the current RSS (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _malloc_trim() -> None:
    """Hand glibc's free heap pages back to the kernel (no-op without glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def cpu_peak_memory_supported() -> bool:
    return os.path.exists("/proc/self/status") and _reset_peak_rss()


def peak_extra_bytes(
    fn: Callable[[], object], *, device: torch.device, setup: Callable[[], object] | None = None
) -> int | None:
    """Peak memory held during ``fn()`` above what was held when it started, in bytes.

    Inputs that exist before the call are not counted; results that outlive
    it (a parameter's ``.grad``) are. ``setup()`` runs first, unmeasured.

    CUDA: ``torch.cuda.max_memory_allocated()`` after
    ``torch.cuda.reset_peak_memory_stats()``, minus ``memory_allocated()`` at
    the start: every tensor byte the caching allocator handed out.

    CPU: the process's peak resident set size. Writing ``5`` to
    ``/proc/self/clear_refs`` resets the kernel's high-water mark ``VmHWM`` to
    the current ``VmRSS``; the result is ``VmHWM`` after the call minus
    ``VmRSS`` before it. The kernel updates the mark on every page it maps, so
    no peak is missed, however short. Just before the baseline, ``gc.collect()``
    and glibc's ``malloc_trim(0)`` return every free heap page to the kernel, so
    a tensor that reuses memory glibc cached from an earlier call (below
    glibc's mmap threshold, at most 32 MiB) faults its pages back in and is
    counted; larger tensors are mmapped fresh by glibc anyway.

    This sees everything the call touches on any thread: eager ops' outputs
    and temporaries, the buffers ``torch.compile``'s generated code allocates
    (outside the dispatcher), and temporaries inside fused C++ ops. It counts
    pages touched, not bytes reserved (an allocation never written costs
    nothing, as in the kernel's accounting). It can read high by memory freed
    inside the call that glibc keeps but does not reuse (at most its trim
    threshold, 64 MiB) and by 2 MiB rounding under ``THP_MEM_ALLOC_ENABLE=1``.
    :func:`validate_peak_memory` checks it on cases with known answers. Against
    a count of live tensor bytes (a ``TorchDispatchMode``) on the eager KL
    loss it agreed at (2048, 32000), 1812 MiB, and read 16-64 MiB over 116 MiB
    at (4096, 1024), whose 16 MiB temporaries come from glibc's heap.

    Rejected alternatives: PyTorch's CPU allocator keeps no statistics;
    ``torch.profiler(profile_memory=True)`` attributes allocations to the op
    that made them (no peak inside an op) and reported none of Inductor's
    buffers; a ``TorchDispatchMode`` tracking op outputs sees no op's internal
    temporaries, and ``torch.compile`` refuses to run under one ("non-infra
    torch dispatch mode present").

    Returns None where ``/proc/self/clear_refs`` is unavailable (not Linux).
    """
    if setup is not None:
        setup()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    gc.collect()
    # fastkd's CPU kernels keep freed output buffers for reuse (the CPU
    # counterpart of the CUDA caching allocator); a cached buffer is already
    # resident and would hide the call's output from the RSS peak. Drop it.
    fastkd.empty_cache()
    _malloc_trim()
    if not _reset_peak_rss():
        return None
    base = _proc_status_bytes("VmRSS")
    fn()
    return max(_proc_status_bytes("VmHWM") - base, 0)


@dataclass(frozen=True)
class MemoryCheck:
    case: str
    expected_bytes: int
    measured_bytes: int | None

    @property
    def ok(self) -> bool:
        if self.measured_bytes is None:
            return False
        return abs(self.measured_bytes - self.expected_bytes) <= 0.02 * self.expected_bytes + 4 * MIB


def validate_peak_memory(device: torch.device) -> list[MemoryCheck]:
    """:func:`peak_extra_bytes` on three calls whose answer is known.

    - ``x * 2``, ``x`` (2048, 32000) float32: one new tensor, 262,144,000 bytes.
    - ``((x * 2) + 1).sum()``: both intermediates are alive while ``+ 1`` runs,
      so the peak is twice that, although the call keeps only a scalar.
    - ``z * 2`` twice, ``z`` (4096, 1024) float32 (16 MiB), the first freed
      at the end: 32 MiB, six calls in a row. Sizes under 32 MiB come from
      glibc's heap, which keeps freed chunks; without ``malloc_trim``, and
      depending on the heap's history, calls after the first can read 16 MiB
      or 0.
    """
    x = torch.randn(2048, 32000, device=device)
    z = torch.randn(4096, 1024, device=device)
    kept: list[torch.Tensor] = []
    checks = [
        MemoryCheck(
            "x * 2, x (2048, 32000) fp32", x.nbytes,
            peak_extra_bytes(lambda: kept.append(x * 2), device=device),
        ),
        MemoryCheck(
            "((x * 2) + 1).sum(): a freed temporary", 2 * x.nbytes,
            peak_extra_bytes(lambda: kept.append(((x * 2) + 1).sum()), device=device, setup=kept.clear),
        ),
    ]
    kept.clear()

    def pair():
        first = z * 2
        kept.append(z * 2)
        del first  # freed below a live tensor: glibc keeps it in its heap

    # The sweeps measure a call after identical calls; glibc's state changes
    # over the first few, so every one of six must read right.
    repeated = [peak_extra_bytes(pair, device=device, setup=kept.clear) for _ in range(6)]
    worst = max(repeated, key=lambda m: math.inf if m is None else abs(m - 2 * z.nbytes))
    checks.append(MemoryCheck("z * 2 twice, z (4096, 1024) fp32, one freed; worst of 6", 2 * z.nbytes, worst))
    return checks


# ----------------------------------------------------------------------------- bandwidth and floor


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 10) -> float:
    """Measured memory bandwidth in bytes/s: ``dst.copy_(src)`` counts ``2 · nbytes``
    (read ``src``, write ``dst``), median of ``repeats``.

    ``nbytes`` defaults to 256 MiB on CPU (8x a 32 MiB L3) and 1 GiB on CUDA
    (a copy long enough that launch and synchronisation do not count). Both
    tensors are allocated and written before timing, so no page fault is
    timed; the copy uses all of torch's threads, as the losses do.
    """
    if nbytes is None:
        nbytes = 1024 * MIB if device.type == "cuda" else 256 * MIB
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.zeros_like(src)
    timing = time_call(
        lambda: dst.copy_(src), device=device, warmup=2, min_repeats=repeats, max_repeats=repeats
    )
    return 2 * src.nbytes / (timing.median_ms * 1e-3)


def floor_ms(nbytes: int, bandwidth: float) -> float:
    """Time to move ``nbytes`` at ``bandwidth`` bytes/s: no kernel can beat it."""
    return nbytes / bandwidth * 1e3


# ----------------------------------------------------------------------------- THP


_TRUE = {"1", "ON", "YES", "TRUE", "Y"}  # c10::utils::check_env's spellings of true


@dataclass(frozen=True)
class ThpSetting:
    """``THP_MEM_ALLOC_ENABLE`` (PyTorch madvises huge pages for large CPU
    tensors) and the kernel's transparent-huge-page mode, which gates it."""

    env: str | None
    kernel: str

    @property
    def enabled(self) -> bool:
        """Whether large CPU tensors get huge pages."""
        asked = self.env is not None and self.env.upper() in _TRUE
        return self.kernel == "always" or (asked and self.kernel == "madvise")

    @property
    def short(self) -> str:
        """For a CSV cell: ``"<THP_MEM_ALLOC_ENABLE>/<kernel mode>"``, e.g. ``"unset/madvise"``."""
        return f"{self.env if self.env is not None else 'unset'}/{self.kernel}"

    def describe(self) -> str:
        env = f"THP_MEM_ALLOC_ENABLE={self.env}" if self.env is not None else "THP_MEM_ALLOC_ENABLE unset"
        state = "huge pages for large CPU tensors" if self.enabled else "4 KiB pages for CPU tensors"
        return f"{env}, kernel THP mode '{self.kernel}': {state}"


def thp_setting() -> ThpSetting:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as modes:
            text = modes.read()
        kernel = text[text.index("[") + 1 : text.index("]")]
    except (OSError, ValueError):
        kernel = "unknown"
    return ThpSetting(os.environ.get("THP_MEM_ALLOC_ENABLE"), kernel)


# ----------------------------------------------------------------------------- one configuration

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
    loss value it is checked by), then the providers' timed runs take turns
    (:func:`time_uncontended`), then each one's peak extra memory. ``reset``
    clears the gradients before every call.

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
    calls = {
        name: Call(lambda loss_fn=loss_fn: loss_fn(*inputs).backward(), reset)
        for name, loss_fn in here.items()
    }
    first = {}
    for name, loss_fn in here.items():
        ctx.progress.update(task, description=f"{label} {name}: first call")
        first[name] = first_call(loss_fn, inputs, device=ctx.device)
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
            "peak_extra_mib": None if peak is None else peak / MIB,
            **{column: amount / seconds for column, amount in (per_second or {}).items()},
            "loss_rel_diff": rel_diff,
            "other_load": other_load,
            "note": "; ".join(notes),
        })
        ctx.progress.advance(task)
    rows.extend({**base, "provider": name, "note": reason} for name, reason in (unavailable or {}).items())
    return rows


# ----------------------------------------------------------------------------- rows and ratios


def add_floor_and_ratios(rows: list[dict], bandwidth: float, group_keys: Sequence[str]) -> None:
    """Fill ``floor_ms``, ``copy_gbs``, ``x_floor``, ``speedup_vs_eager`` and
    ``speedup_vs_compile`` in place.

    ``floor_ms`` is the row's ``traffic_bytes`` (the bytes its family counts
    as the least any implementation must move) at ``bandwidth`` bytes/s; a
    family whose loss is compute-bound gives ``traffic_bytes`` None and gets
    no floor (``floor_ms`` and ``x_floor`` None).
    Speed-ups are taken within one configuration (the rows sharing
    ``group_keys``), between medians measured in this run.
    """
    baselines: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row["provider"] in (EAGER, COMPILE) and row.get("median_ms") is not None:
            baselines.setdefault(tuple(row[k] for k in group_keys), {})[row["provider"]] = row["median_ms"]
    for row in rows:
        traffic = row.get("traffic_bytes")
        row["floor_ms"] = None if traffic is None else floor_ms(traffic, bandwidth)
        row["copy_gbs"] = bandwidth / 1e9
        ms = row.get("median_ms")
        base = baselines.get(tuple(row[k] for k in group_keys), {})
        row["x_floor"] = ms / row["floor_ms"] if ms and row["floor_ms"] else None
        row["speedup_vs_eager"] = base[EAGER] / ms if ms and EAGER in base else None
        row["speedup_vs_compile"] = base[COMPILE] / ms if ms and COMPILE in base else None


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_csv(path: Path, rows: Iterable[dict], columns: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])


# ----------------------------------------------------------------------------- terminal report


@dataclass
class SweepContext:
    """What ``run.py`` hands each family's ``sweep``."""

    device: torch.device
    quick: bool
    compile: bool
    thp: ThpSetting
    progress: object  # rich.progress.Progress
    options: dict = field(default_factory=dict)  # the parsed command line; families read their own


def make_progress(console):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


TABLE_COLUMNS = (
    # (row key, header, format)
    ("median_ms", "median ms", ".1f"),
    ("repeats", "runs", "d"),
    ("peak_extra_mib", "peak extra MiB", ".0f"),
    ("floor_ms", "floor ms", ".1f"),
    ("x_floor", "× floor", ".1f"),
    ("speedup_vs_eager", "vs eager", ".1f"),
    ("speedup_vs_compile", "vs compile", ".2f"),
    ("other_load", "other load", ".2f"),
)


def print_table(
    console,
    rows: Sequence[dict],
    *,
    title: str,
    config_label: Callable[[dict], str],
    columns: Sequence[tuple[str, str, str]] = TABLE_COLUMNS,
) -> None:
    """One line per measured row: its configuration, provider, and the numbers
    (``columns``: (row key, header, format), default :data:`TABLE_COLUMNS`);
    then one line per provider that was not measured, with the reason."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("configuration")
    table.add_column("provider")
    for _, header, _ in columns:
        table.add_column(header, justify="right")
    previous = None
    for row in rows:
        if row.get("median_ms") is None:
            continue
        config = config_label(row)
        if previous is not None and config != previous:
            table.add_section()
        table.add_row(
            config if config != previous else "",
            row["provider"],
            *(_fmt(row.get(key), spec) for key, _, spec in columns),
        )
        previous = config
    console.print(table)
    for row in rows:
        if row.get("median_ms") is None and row.get("note"):
            console.print(f"  not measured: {row['provider']} ({config_label(row)}): {row['note']}")


# ----------------------------------------------------------------------------- plot

PROVIDER_COLOURS = {
    EAGER: "tab:gray",
    COMPILE: "tab:orange",
    "fastkd-cpu": "tab:blue",
    "fastkd-triton": "tab:green",
    "fastkd-cuda": "tab:purple",
    "liger": "tab:red",
}
DTYPE_STYLES = {"fp32": ("-", "o"), "bf16": (":", "s"), "fp16": ("-.", "^"), "fp64": ("--", "D")}
FLOOR_GREYS = ("black", "0.55", "0.75")


def plot_family(
    rows: Sequence[dict],
    path: Path,
    *,
    title: str,
    size_label: Callable[[dict], str],
    size_order: Callable[[dict], object],
    output_key: str | None = None,
    xlabel: str = "problem size N × V (ordered by N·V)",
) -> None:
    """Two panels against problem size: median fwd+bwd time (with the traffic
    floor dashed, where the rows have one) and peak extra memory (with the
    size of the outputs dashed when ``output_key`` names a MiB column), one
    line per provider and dtype.

    Sizes are placed in order of ``size_order`` at even spacing, providers
    side by side around each: families sweep shapes whose element counts can
    coincide (2048×32000 and 512×128256), which a logarithmic x axis would
    stack on one another.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    measured = [r for r in rows if r.get("median_ms") is not None]
    order = {size_label(r): size_order(r) for r in measured}
    labels = sorted(order, key=order.__getitem__)
    position = {label: i for i, label in enumerate(labels)}
    dtypes = list(dict.fromkeys(r["dtype"] for r in measured))
    providers = list(dict.fromkeys(r["provider"] for r in measured))

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(13, 5.2))
    for rank, provider in enumerate(providers):
        # Side by side around each size, so equal values (memory) stay visible.
        dodge = 0.05 * (rank - (len(providers) - 1) / 2)
        for dtype in dtypes:
            points = sorted(
                (position[size_label(r)], r)
                for r in measured
                if r["provider"] == provider and r["dtype"] == dtype
            )
            if not points:
                continue
            style, marker = DTYPE_STYLES.get(dtype, ("-", "o"))
            colour = PROVIDER_COLOURS.get(provider)
            xs = [x + dodge for x, _ in points]
            ax_time.plot(xs, [r["median_ms"] for _, r in points], style, marker=marker, color=colour)
            mem = [(x + dodge, r["peak_extra_mib"]) for x, r in points if r.get("peak_extra_mib")]
            if mem:
                ax_mem.plot(*zip(*mem, strict=True), style, marker=marker, color=colour)
    for grey, dtype in zip(FLOOR_GREYS, dtypes, strict=False):
        floor = {}
        outputs = {}
        for r in measured:
            if r["dtype"] == dtype:
                if r.get("floor_ms") is not None:
                    floor[position[size_label(r)]] = r["floor_ms"]
                if output_key:
                    outputs[position[size_label(r)]] = r[output_key]
        # A wide flat marker keeps a one-size floor (--quick) visible.
        dashed = {"linestyle": "--", "color": grey, "linewidth": 1.2, "marker": "_", "markersize": 18}
        if floor:
            xs = sorted(floor)
            ax_time.plot(xs, [floor[x] for x in xs], **dashed)
        if outputs:
            xs = sorted(outputs)
            ax_mem.plot(xs, [outputs[x] for x in xs], **dashed)
    has_floor = any(r.get("floor_ms") is not None for r in measured)

    for ax, ylabel in ((ax_time, "median forward + backward time (ms)"), (ax_mem, "peak extra memory (MiB)")):
        ax.set_yscale("log")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xlim(-0.25, len(labels) - 0.75)
    ax_time.set_title("time (dashed: memory-traffic floor)" if has_floor else "time")
    ax_mem.set_title("peak extra memory" + (" (dashed: size of the outputs)" if output_key else ""))

    handles = [Line2D([], [], color=PROVIDER_COLOURS.get(p), linewidth=2.5, label=p) for p in providers]
    handles += [
        Line2D([], [], color="0.3", linestyle=DTYPE_STYLES.get(d, ("-", "o"))[0],
               marker=DTYPE_STYLES.get(d, ("-", "o"))[1], label=d)
        for d in dtypes
    ]
    dashed_label = "floor / outputs" if has_floor else "outputs"
    if has_floor or output_key:
        handles += [
            Line2D([], [], color=grey, linestyle="--", label=f"{dashed_label} ({d})")
            for grey, d in zip(FLOOR_GREYS, dtypes, strict=False)
        ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)

