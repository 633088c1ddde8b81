"""What every ``bench_<family>.py`` shares: timing, peak memory, bandwidth and
the memory-traffic floor, the THP setting, and the report (CSV, rich progress
and table, matplotlib PNG).

Conventions (DESIGN.md, "Benchmarks are not tests"):

- A measurement is forward + backward of one loss call, timed with
  ``time.perf_counter`` (after ``torch.cuda.synchronize`` on CUDA) and
  reported as the median over repeats, after a warm-up.
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


def time_call(
    fn: Callable[[], object],
    *,
    device: torch.device,
    setup: Callable[[], object] | None = None,
    warmup: int = 1,
    min_repeats: int = 3,
    max_repeats: int = 15,
    budget_s: float = 2.0,
) -> Timing:
    """Median wall time of ``fn()`` in milliseconds.

    ``setup()`` runs before every call, outside the timed region (for a loss:
    ``x.grad = None``, so each backward writes a fresh gradient, as a training
    step after ``zero_grad(set_to_none=True)`` does). Timed runs stop at
    ``max_repeats``, or as soon as ``min_repeats`` runs are done and together
    took ``budget_s``: a provider slower than ``budget_s / min_repeats`` gets
    exactly ``min_repeats`` runs, a fast one up to ``max_repeats``.
    """
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    synchronize(device)
    times: list[float] = []
    while len(times) < max_repeats and (len(times) < min_repeats or sum(times) < budget_s * 1e3):
        if setup is not None:
            setup()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return Timing(statistics.median(times), tuple(times))


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
    :func:`validate_peak_memory` checks it on cases with known answers.

    Rejected alternatives: PyTorch's CPU allocator keeps no statistics;
    ``torch.profiler(profile_memory=True)`` attributes allocations to the op
    that made them (no peak inside an op) and reported none of Inductor's
    buffers; a ``TorchDispatchMode`` tracking op outputs sees neither
    Inductor's buffers nor an op's internal temporaries.

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
    - ``z * 2``, ``z`` (4096, 1024) float32 (16 MiB), right after an equal
      tensor was freed into glibc's heap, whose pages glibc keeps for reuse:
      without ``malloc_trim`` this reads 0.
    """
    x = torch.randn(2048, 32000, device=device)
    z = torch.randn(4096, 1024, device=device)
    kept: list[torch.Tensor] = []
    checks = [
        MemoryCheck("x * 2, x (2048, 32000) fp32", x.nbytes,
                    peak_extra_bytes(lambda: kept.append(x * 2), device=device)),
        MemoryCheck("((x * 2) + 1).sum(): a freed temporary", 2 * x.nbytes,
                    peak_extra_bytes(lambda: kept.append(((x * 2) + 1).sum()), device=device, setup=kept.clear)),
    ]
    kept.clear()
    for _ in range(3):
        # Freeing a large mmapped chunk raises glibc's mmap threshold; the
        # later pairs come from the heap, and the first of each is freed
        # below a live one, where glibc keeps it.
        pair = [z * 2, z * 2]
        kept.append(pair.pop())
    checks.append(MemoryCheck(
        "z * 2, z (4096, 1024) fp32, into memory glibc cached", z.nbytes,
        peak_extra_bytes(lambda: kept.append(z * 2), device=device, setup=kept.pop),
    ))
    return checks


# ----------------------------------------------------------------------------- bandwidth and floor


def copy_bandwidth(device: torch.device, nbytes: int = 256 * MIB, repeats: int = 10) -> float:
    """Measured memory bandwidth in bytes/s: ``dst.copy_(src)`` counts ``2 · nbytes``
    (read ``src``, write ``dst``), median of ``repeats``.

    Both tensors are allocated and written before timing, so no page fault is
    timed; the copy uses all of torch's threads, as the losses do.
    """
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
        return self.env is not None and self.env.upper() in _TRUE and self.kernel in ("always", "madvise")

    @property
    def short(self) -> str:
        """For a CSV cell: ``"<THP_MEM_ALLOC_ENABLE>/<kernel mode>"``, e.g. ``"unset/madvise"``."""
        return f"{self.env if self.env is not None else 'unset'}/{self.kernel}"

    def describe(self) -> str:
        env = f"THP_MEM_ALLOC_ENABLE={self.env}" if self.env is not None else "THP_MEM_ALLOC_ENABLE unset"
        state = "huge pages for large CPU tensors" if self.enabled else "4 KiB pages for CPU tensors"
        if self.kernel == "always":
            state = "huge pages for large CPU tensors (kernel THP=always)"
        return f"{env}, kernel THP mode '{self.kernel}': {state}"


def thp_setting() -> ThpSetting:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as modes:
            text = modes.read()
        kernel = text[text.index("[") + 1 : text.index("]")]
    except (OSError, ValueError):
        kernel = "unknown"
    return ThpSetting(os.environ.get("THP_MEM_ALLOC_ENABLE"), kernel)


# ----------------------------------------------------------------------------- rows and ratios


def add_ratios(rows: list[dict], group_keys: Sequence[str]) -> None:
    """Fill ``speedup_vs_eager``, ``speedup_vs_compile`` and ``x_floor`` in place.

    Ratios are taken within one configuration (the rows sharing
    ``group_keys``), from medians measured in this run.
    """
    baselines: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row["provider"] in (EAGER, COMPILE) and row.get("median_ms") is not None:
            baselines.setdefault(tuple(row[k] for k in group_keys), {})[row["provider"]] = row["median_ms"]
    for row in rows:
        ms = row.get("median_ms")
        base = baselines.get(tuple(row[k] for k in group_keys), {})
        row["speedup_vs_eager"] = base[EAGER] / ms if ms and EAGER in base else None
        row["speedup_vs_compile"] = base[COMPILE] / ms if ms and COMPILE in base else None
        row["x_floor"] = ms / row["floor_ms"] if ms and row.get("floor_ms") else None


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
    bandwidth: float  # bytes/s, from copy_bandwidth
    thp: ThpSetting
    progress: object  # rich.progress.Progress
    options: dict = field(default_factory=dict)  # the family's own command-line options


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
)


def print_table(console, rows: Sequence[dict], *, title: str, config_keys: Sequence[str]) -> None:
    """One line per measured row: its configuration, provider, and the numbers."""
    from rich.table import Table

    table = Table(title=title)
    for key in config_keys:
        table.add_column(key)
    table.add_column("provider")
    for _, header, _ in TABLE_COLUMNS:
        table.add_column(header, justify="right")
    previous = None
    for row in rows:
        if row.get("median_ms") is None:
            continue
        config = tuple(str(row[k]) for k in config_keys)
        if previous is not None and config != previous:
            table.add_section()
        table.add_row(
            *(config if config != previous else [""] * len(config)),
            row["provider"],
            *(_fmt(row.get(key), spec) for key, _, spec in TABLE_COLUMNS),
        )
        previous = config
    console.print(table)
    for row in rows:
        if row.get("median_ms") is None and row.get("note"):
            config = ", ".join(f"{k}={row[k]}" for k in config_keys)
            console.print(f"  not measured: {row['provider']} ({config}): {row['note']}")


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
    size_order: Callable[[dict], float],
    output_key: str | None = None,
) -> None:
    """Two panels against problem size: median fwd+bwd time (with the traffic
    floor dashed) and peak extra memory (with the size of the outputs dashed
    when ``output_key`` names a MiB column), one line per provider and dtype.

    Sizes are placed in order of ``size_order`` at even spacing: families
    sweep shapes whose element counts can coincide (2048×32000 and
    512×128256), which a logarithmic x axis would stack on one another.
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
    for provider in providers:
        for dtype in dtypes:
            points = sorted(
                (position[size_label(r)], r) for r in measured if r["provider"] == provider and r["dtype"] == dtype
            )
            if not points:
                continue
            style, marker = DTYPE_STYLES.get(dtype, ("-", "o"))
            colour = PROVIDER_COLOURS.get(provider)
            xs = [x for x, _ in points]
            ax_time.plot(xs, [r["median_ms"] for _, r in points], style, marker=marker, color=colour)
            mem = [(x, r["peak_extra_mib"]) for x, r in points if r.get("peak_extra_mib")]
            if mem:
                ax_mem.plot(*zip(*mem, strict=True), style, marker=marker, color=colour)
    for grey, dtype in zip(FLOOR_GREYS, dtypes, strict=False):
        floor = {}
        outputs = {}
        for r in measured:
            if r["dtype"] == dtype:
                floor[position[size_label(r)]] = r["floor_ms"]
                if output_key:
                    outputs[position[size_label(r)]] = r[output_key]
        xs = sorted(floor)
        ax_time.plot(xs, [floor[x] for x in xs], "--", color=grey, linewidth=1.2)
        if outputs:
            ax_mem.plot(xs, [outputs[x] for x in xs], "--", color=grey, linewidth=1.2)

    for ax, ylabel in ((ax_time, "median forward + backward time (ms)"), (ax_mem, "peak extra memory (MiB)")):
        ax.set_yscale("log")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("problem size N × V (ordered by N·V)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xlim(-0.25, len(labels) - 0.75)
    ax_time.set_title("time (dashed: memory-traffic floor)")
    ax_mem.set_title("peak extra memory" + (" (dashed: size of the outputs)" if output_key else ""))

    handles = [Line2D([], [], color=PROVIDER_COLOURS.get(p), linewidth=2.5, label=p) for p in providers]
    handles += [
        Line2D([], [], color="0.3", linestyle=DTYPE_STYLES.get(d, ("-", "o"))[0],
               marker=DTYPE_STYLES.get(d, ("-", "o"))[1], label=d)
        for d in dtypes
    ]
    handles += [
        Line2D([], [], color=grey, linestyle="--", label=f"floor / outputs ({d})")
        for grey, d in zip(FLOOR_GREYS, dtypes, strict=False)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def finite(value: float | None) -> float | None:
    """``None`` for a missing or non-finite number (a CSV-friendly empty cell)."""
    return value if value is not None and math.isfinite(value) else None
