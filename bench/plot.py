"""Plot: one PNG per family (the full sweep), time and peak memory against
problem size; one PNG for the representative report, every fastkd provider's
ratios to eager, compile and its floor."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from bench.measure import CONTENDED_LOAD
from bench.report import COMPILE, EAGER, ONE_THREAD

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
        # labels that would run into each other side by side are slanted
        crowded = sum(len(label) for label in labels) > 60
        ax.set_xticks(range(len(labels)), labels, rotation=25 if crowded else 0,
                      ha="right" if crowded else "center")
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


def plot_report(rows: Sequence[dict], path: Path, *, title: str, config_label: Callable[[dict], str]) -> None:
    """The representative report in one figure, one line per measured ``fastkd-*``
    row at the full thread count (family, configuration, provider): left, how
    many times faster than ``eager`` and ``compile`` (same run); right, how many
    floors it takes (the copy floor, else the GEMM floor; none for the rest).
    Both axes logarithmic, 1 marked. A run timed while other processes kept
    more than ``CONTENDED_LOAD`` cores busy says so under the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    mine = [
        r for r in rows
        if str(r["provider"]).startswith("fastkd-") and not str(r["provider"]).endswith(ONE_THREAD)
        and r.get("median_ms") is not None
    ]
    labels = [f"{r['family']}: {config_label(r)}, {r['provider']}" for r in mine]
    ys = list(range(len(mine)))[::-1]
    fig, (ax_speed, ax_floor) = plt.subplots(
        1, 2, figsize=(14, 1.5 + 0.32 * max(len(mine), 1)), sharey=True, gridspec_kw={"width_ratios": (3, 2)}
    )
    for offset, column, colour, name in (
        (0.2, "speedup_vs_eager", PROVIDER_COLOURS[EAGER], "vs eager"),
        (-0.2, "speedup_vs_compile", PROVIDER_COLOURS[COMPILE], "vs torch.compile"),
    ):
        points = [(y + offset, r[column]) for y, r in zip(ys, mine, strict=True) if r.get(column)]
        if points:
            ax_speed.barh(*zip(*points, strict=True), height=0.38, color=colour, label=name)
    ax_speed.axvline(1.0, color="black", linewidth=1)
    ax_speed.set_xscale("log")
    ax_speed.set_xlabel("× faster (median fwd + bwd time, same run)")
    ax_speed.legend(loc="best")
    floors = (("copy floor", "x_floor", "tab:blue"), ("GEMM floor", "x_gemm_floor", "tab:green"))
    for kind, column, colour in floors:
        points = [(y, r[column]) for y, r in zip(ys, mine, strict=True) if r.get(column)]
        if points:
            ax_floor.barh(*zip(*points, strict=True), height=0.6, color=colour, label=kind)
    ax_floor.axvline(1.0, color="black", linewidth=1)
    ax_floor.set_xscale("log")
    ax_floor.set_xlabel("× the floor measured in the run (1 = the machine's limit)")
    if any(r.get("x_floor") or r.get("x_gemm_floor") for r in mine):
        ax_floor.legend(loc="best")
    ax_speed.set_yticks(ys, labels)
    for ax in (ax_speed, ax_floor):
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, axis="x", which="both", alpha=0.3)
    loads = [r["other_load"] for r in rows if isinstance(r.get("other_load"), (int, float))]
    if loads and max(loads) > CONTENDED_LOAD:
        title += (f"\ntimed while other processes kept up to {max(loads):.2f} cores busy: "
                  "times, ratios and floors distorted")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
