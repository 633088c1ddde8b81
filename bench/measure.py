"""Measurement: wall time, peak memory, copy bandwidth and the memory-traffic
floor, the load other processes put on the machine, the THP setting, and a
description of the machine.

Conventions:

- A measurement is forward + backward of one loss call, timed with
  ``time.perf_counter`` (after ``torch.cuda.synchronize`` on CUDA) and
  reported as the median over repeats, after a warm-up. The providers of one
  configuration take turns, and the turns are retried while other processes
  load the machine; ``other_load`` records how loaded it was.
- The floor of a configuration is the bytes it must move (read the inputs
  once, write the outputs once) over the measured copy bandwidth of this
  machine.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import fastkd

MIB = 2**20


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
    checked by. The gradients of the tensors among the inputs are cleared
    before and after."""

    def clear_grads() -> None:
        for x in inputs:
            if isinstance(x, torch.Tensor):
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


def gemm_ms(
    shapes: Sequence[tuple[int, int, int]], dtype: torch.dtype, device: torch.device, budget_s: float = 0.5
) -> float:
    """The summed median time, in milliseconds, of ``torch.mm`` on each ``(m, k, n)``
    of ``shapes`` (an ``(m, k)`` by ``(k, n)`` product of ``dtype``, into a
    preallocated output, with all of torch's threads): what the matrix
    products of a loss cost at the rate this machine's BLAS reaches at those
    shapes (the GEMM floor). A shape listed twice is timed once."""
    medians: dict[tuple[int, int, int], float] = {}
    for shape in dict.fromkeys(shapes):
        m, k, n = shape
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        out = torch.empty(m, n, device=device, dtype=dtype)
        medians[shape] = time_call(
            lambda a=a, b=b, out=out: torch.mm(a, b, out=out), device=device, warmup=1, min_repeats=3,
            max_repeats=10, budget_s=budget_s,
        ).median_ms
        del a, b, out
    return sum(medians[shape] for shape in shapes)


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



def few_runs(repeats: int = 2) -> dict:
    """Timing options for a configuration whose call takes seconds: the untimed
    first call is the only warm-up, each provider gets exactly ``repeats`` timed
    runs, and a contended attempt is retried once."""
    return {"warmup": 0, "min_repeats": repeats, "max_repeats": repeats, "attempts": 2}


# ----------------------------------------------------------------------------- memory available


def available_memory_bytes(device: torch.device) -> int | None:
    """Free device memory on CUDA, ``MemAvailable`` on CPU; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_skip_reason(
    need_bytes: int, available: int | None, what: str, fraction: float = 0.8
) -> str | None:
    """Why a provider needing ``need_bytes`` (``what`` they are) cannot run, or None:
    it would take more than ``fraction`` of the ``available`` bytes (None: unknown, run it)."""
    if available is None or need_bytes <= fraction * available:
        return None
    gib = 2**30
    return f"skipped: would need ~{need_bytes / gib:.0f} GiB ({what}), {available / gib:.0f} GiB available"


def fp32_tensors_skip_reason(
    count: int, elements: int, available: int | None, shape: str, fraction: float = 0.8
) -> str | None:
    """:func:`memory_skip_reason` of a provider holding ``count`` float32 tensors
    of ``elements`` elements (``shape``, e.g. ``"N×M"``) at once; None for 0."""
    if not count:
        return None
    return memory_skip_reason(count * elements * 4, available, f"{count} {shape} fp32 tensors", fraction)


# ----------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_columns(device: torch.device) -> dict:
    """What ran the measurement, as CSV columns copied into every row:
    ``machine`` (the GPU's name, or the CPU model and its SIMD level),
    ``threads`` (torch's intra-op threads) and ``torch`` (its version)."""
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{_cpu_model()}, {os.cpu_count()} cores, SIMD {torch.backends.cpu.get_cpu_capability()}"
    return {"machine": machine, "threads": torch.get_num_threads(), "torch": torch.__version__}


# ---- the options of the pass-count scripts (kl_passes.py, mixture_passes.py) ----


def shape_argument(text: str) -> tuple[int, int]:
    """``"NxV"`` (or ``"N×V"``) → ``(N, V)``."""
    n, v = text.lower().replace("×", "x").split("x")
    return int(n), int(v)


def passes_argument_parser(doc: str, shapes: list[tuple[int, int]], repeats: int) -> argparse.ArgumentParser:
    """The options every pass-count script takes (``--shapes``, ``--repeats``,
    ``--threads``, ``--copy-mib``, ``--label``), described by the first
    paragraph of its docstring; the script adds its own."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", type=shape_argument, default=shapes)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--copy-mib", type=int, default=256, help="size of the copied tensor")
    parser.add_argument("--label", default="", help="first column of every line")
    return parser


def passes_line(label: str, config: str, n: int, v: int, timings: str, copy_gbs: float, passes: int,
                element_bytes: int, call_ms: float, load: float | None, tail: str = "") -> str:
    """One tab-separated result line of a pass-count script: ``label``, ``config``, the
    ``N×V`` shape, torch's thread count, the script's ``timings``, the copy bandwidth, the
    floor (``passes`` passes over ``(N, V)`` tensors of ``element_bytes`` at that
    bandwidth), ``call_ms`` over the floor, ``tail`` and the other load on the machine."""
    floor_ms = passes * n * v * element_bytes / (copy_gbs * 1e9) * 1e3
    load_text = "?" if load is None else f"{load:.2f}"
    return (f"{label}\t{config}\t{n}x{v}\tthreads={torch.get_num_threads()}\t{timings}\t"
            f"copy {copy_gbs:.1f} GB/s\tfloor {floor_ms:.2f} ms\tx_floor {call_ms / floor_ms:.2f}\t"
            f"{tail}load {load_text}")


def parse_passes_arguments(parser: argparse.ArgumentParser, argv: list[str] | None):
    """``argv`` parsed, torch's thread count set to ``--threads`` when given."""
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args
