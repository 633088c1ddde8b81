"""Plot: one PNG per family, time and peak memory against problem size."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from bench.report import COMPILE, EAGER

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
