"""PNG plots of a result, drawn with matplotlib's Agg canvas (no pyplot, no global state).

matplotlib is imported here only, when a plot is asked for. Figures are plain ``Figure``
objects on their own ``FigureCanvasAgg``, so plotting is safe from a worker thread.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import UsageError
from ._metrics import FORMULAS, Stats, pooled_itl, throughput_timeline

if TYPE_CHECKING:
    import numpy.typing as npt
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ._result import BenchResult
    from ._sweep import SweepResult

__all__ = ["plot_result", "plot_sweep"]


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise UsageError(
            "plots need matplotlib: pip install 'llamatelemetry_async[bench]' "
            "(or pass plots=False / --no-plots)"
        ) from exc
    return FigureCanvasAgg, Figure


def plot_sweep(result: SweepResult, out_dir: Path) -> list[Path]:
    """Write sweep_latency.png, sweep_throughput.png and sweep_goodput.png to out_dir.

    The x axis is the load (concurrency or request rate, log scale when it spans more
    than a factor of 4); latencies in milliseconds.
    """
    canvas, figure = _matplotlib()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = result.rows()
    loads = [row["load"] for row in rows]
    xlabel = "concurrency" if result.sweep.load == "concurrency" else "request rate (req/s)"
    subtitle = result.sweep.base.describe()
    log_x = bool(loads) and min(loads) > 0 and max(loads) / min(loads) > 4
    paths: list[Path] = []

    def save(fig: Figure, name: str) -> None:
        canvas(fig)
        fig.suptitle(subtitle, fontsize=8)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        paths.append(path)

    def axis(ax: Axes, ylabel: str, title: str) -> None:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        if log_x:
            ax.set_xscale("log")
        ax.grid(True, alpha=0.3)

    fig = figure(figsize=(10, 4.5))
    for ax, key, name in zip(
        fig.subplots(1, 2), ("ttft_ms", "itl_ms"), ("TTFT", "ITL"), strict=True
    ):
        for q, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
            values = [row[key][q] for row in rows]
            ax.plot(
                loads,
                [math.nan if v is None else v for v in values],
                style,
                marker="o",
                label=f"{name} {q}",
            )
        axis(ax, f"{name} (ms)", f"{name} percentiles against load")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    save(fig, "sweep_latency.png")

    fig = figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    out = [row["output_throughput"] for row in rows]
    ax.plot(loads, [math.nan if v is None else v for v in out], marker="o", color="tab:blue")
    axis(ax, "output tokens/s", "Throughput against load (the knee)")
    ax.set_ylabel("output tokens/s", color="tab:blue")
    ax.set_ylim(bottom=0)
    twin = ax.twinx()
    req = [row["request_throughput"] for row in rows]
    twin.plot(
        loads,
        [math.nan if v is None else v for v in req],
        marker="s",
        color="tab:orange",
        alpha=0.8,
    )
    twin.set_ylabel("requests/s", color="tab:orange")
    twin.set_ylim(bottom=0)
    save(fig, "sweep_throughput.png")

    fig = figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    goodput = [row["goodput"] for row in rows]
    if any(v is not None for v in goodput):
        ax.plot(
            loads,
            [math.nan if v is None else v for v in goodput],
            marker="o",
            color="tab:green",
            label="goodput",
        )
        ax.plot(
            loads,
            [math.nan if v is None else v for v in req],
            marker=".",
            color="grey",
            alpha=0.6,
            label="completed",
        )
        ax.legend(fontsize=8)
    else:
        ax.text(
            0.5, 0.5, "no SLO given: no goodput", ha="center", va="center", transform=ax.transAxes
        )
    axis(ax, "requests/s", "Goodput against load (requests within the SLOs)")
    ax.set_ylim(bottom=0)
    save(fig, "sweep_goodput.png")
    return paths


def plot_result(result: BenchResult, out_dir: Path) -> list[Path]:
    """Write ttft.png, itl.png, throughput.png (and gpu.png with GPU samples) to out_dir.

    Histograms are in milliseconds (their p50, p90 and p99 marked); time axes are seconds
    since the run started, warm-up included.
    """
    canvas, figure = _matplotlib()
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [r for r in result.records if not r.warmup and r.ok]
    metrics = result.metrics
    subtitle = result.config.describe()
    paths = []

    def save(fig: Figure, name: str) -> None:
        canvas(fig)  # attaches itself: savefig renders with Agg
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        paths.append(path)

    fig = figure(figsize=(8, 4.5))
    _histogram(
        fig.add_subplot(),
        [t * 1000 for r in records if (t := r.ttft) is not None],
        metrics.ttft_ms,
        "TTFT (ms)",
        "requests",
        f"Time to first token\n{FORMULAS['ttft']}",
    )
    fig.suptitle(subtitle, fontsize=8)
    save(fig, "ttft.png")

    fig = figure(figsize=(8, 4.5))
    _histogram(
        fig.add_subplot(),
        pooled_itl(records) * 1000,
        metrics.itl_ms,
        "ITL (ms)",
        "gaps between chunks",
        f"Inter-token latency\n{FORMULAS['itl']}",
    )
    fig.suptitle(subtitle, fontsize=8)
    save(fig, "itl.png")

    timeline = throughput_timeline(result.records)
    fig = figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    starts = [s + timeline.bin_s / 2 for s in timeline.starts]
    ax.plot(starts, timeline.output_tokens_per_s, color="tab:blue", label="output tokens/s")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("output tokens/s", color="tab:blue")
    ax.set_title(f"Throughput over time ({timeline.bin_s * 1000:.0f} ms bins)")
    ax.set_ylim(bottom=0)
    twin = ax.twinx()
    twin.step(starts, timeline.in_flight, where="mid", color="tab:orange", alpha=0.7)
    twin.set_ylabel("requests in flight", color="tab:orange")
    twin.set_ylim(bottom=0)
    fig.suptitle(subtitle, fontsize=8)
    save(fig, "throughput.png")

    if result.gpu_samples:
        fig = figure(figsize=(8, 6))
        util_ax, power_ax = fig.subplots(2, 1, sharex=True)
        _gpu_series(util_ax, result, "utilization_gpu", "GPU utilization (%)")
        _gpu_series(power_ax, result, "power_w", "power (W)")
        util_ax.set_ylim(0, 105)
        power_ax.set_xlabel("time since start (s)")
        measured = [r.send for r in result.records if not r.warmup]
        if measured and any(r.warmup for r in result.records):
            for ax_ in (util_ax, power_ax):
                ax_.axvline(min(measured), color="grey", linestyle=":", label="warm-up ends")
        util_ax.legend(fontsize=8, loc="lower right")
        fig.suptitle(f"GPUs during the run\n{subtitle}", fontsize=9)
        save(fig, "gpu.png")
    return paths


# A tail reaching past this many times p99 squeezes linear bins into one bar: log x instead.
_LOG_SPREAD = 5.0


def _histogram(
    ax: Axes, values: npt.ArrayLike, stats: Stats, xlabel: str, ylabel: str, title: str
) -> None:
    import numpy as np

    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        ax.set_xlabel(xlabel)
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    count = min(60, max(10, data.size // 10))
    low, high = float(data.min()), float(data.max())
    positive = data[data > 0]
    if stats.p99 is not None and high > _LOG_SPREAD * stats.p99 and positive.size:
        # Heavy tail (a few long stalls among many short gaps): log-spaced bins on a log
        # axis keep both the bulk and the tail readable; values <= 0 go in the first bin.
        low = float(positive.min())
        bins: Any = np.geomspace(low, high, count + 1)
        ax.hist(np.clip(data, low, None), bins=bins, color="tab:blue", alpha=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(f"{xlabel}, log scale")
    else:
        ax.hist(data, bins=count, color="tab:blue", alpha=0.8)
        ax.set_xlabel(xlabel)
    marks: list[tuple[str, float | None, str]] = [
        ("p50", stats.p50, "tab:green"),
        ("p90", stats.p90, "tab:orange"),
        ("p99", stats.p99, "tab:red"),
    ]
    for name, value, color in marks:
        if value is not None:
            ax.axvline(value, color=color, linestyle="--", label=f"{name} {value:.2f} ms")
    ax.legend(fontsize=8)


def _gpu_series(ax: Axes, result: BenchResult, field: str, ylabel: str) -> None:
    by_gpu: dict[int, tuple[list[float], list[Any]]] = {}
    for sample in result.gpu_samples:
        value = getattr(sample, field)
        if value is not None:
            times, values = by_gpu.setdefault(sample.index, ([], []))
            times.append(sample.t)
            values.append(value)
    for index, (times, values) in sorted(by_gpu.items()):
        ax.plot(times, values, marker=".", label=f"GPU {index}")
    ax.set_ylabel(ylabel)
    if not by_gpu:
        ax.text(0.5, 0.5, "not reported", ha="center", va="center", transform=ax.transAxes)
