"""``run_sweep``: several load points in one call, each a full ``run_bench`` with warm-up.

A sweep is a list of concurrencies, a list of request rates, or a ramp that grows the
load by a factor until a bound (p99 TTFT, p99 TPOT, or the goodput fraction) breaks. Every
point reuses one target (one client, one engine), gets its own warm-up, server readings
and energy, and becomes one ``BenchResult``; ``SweepResult`` holds them in order of load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio
import msgspec

from .._errors import ConfigError, UsageError
from .._groups import single_error
from ..gpu import GPUSampler
from ._config import BenchConfig
from ._progress import Progress
from ._result import BenchResult
from ._run import Target, _open_target, _Run, _sampler_for

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

__all__ = ["SWEEP_SCHEMA", "Ramp", "SweepConfig", "SweepResult", "run_sweep"]

#: The ``schema`` value of a sweep's JSON (``sweep.json``).
SWEEP_SCHEMA = "llamatelemetry_async.bench.sweep/1"

Load = Literal["concurrency", "rate"]


@dataclasses.dataclass(frozen=True, slots=True)
class Ramp:
    """Grow the load from ``start`` by ``factor`` until a bound breaks (or ``points`` run).

    Bounds (give one or more): ``max_ttft_p99_ms``, ``max_tpot_p99_ms``, and
    ``min_goodput_fraction`` (goodput requests / measured requests, failed ones included,
    with the base config's SLOs). The point that breaks a bound is kept in the result, and
    the ramp stops there. Concurrencies are rounded up to whole numbers, always growing.

    ```python
    Ramp("concurrency", start=1, factor=2, max_ttft_p99_ms=2000)
    ```
    """

    load: Load = "concurrency"
    start: float = 1.0
    factor: float = 2.0
    points: int = 8
    max_ttft_p99_ms: float | None = None
    max_tpot_p99_ms: float | None = None
    min_goodput_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.load not in ("concurrency", "rate"):
            raise ConfigError(
                f"load must be 'concurrency' or 'rate', got {self.load!r}", field="load"
            )
        if not _number(self.start) or self.start <= 0 or math.isinf(self.start):
            raise ConfigError(f"start must be a number > 0, got {self.start!r}", field="start")
        if not _number(self.factor) or self.factor <= 1 or math.isinf(self.factor):
            raise ConfigError(f"factor must be a number > 1, got {self.factor!r}", field="factor")
        if not isinstance(self.points, int) or isinstance(self.points, bool) or self.points < 1:
            raise ConfigError(f"points must be an int >= 1, got {self.points!r}", field="points")
        bounds = (self.max_ttft_p99_ms, self.max_tpot_p99_ms, self.min_goodput_fraction)
        if all(b is None for b in bounds):
            raise ConfigError(
                "a ramp needs a bound to break: max_ttft_p99_ms, max_tpot_p99_ms or "
                "min_goodput_fraction",
                field="max_ttft_p99_ms",
            )
        for name in ("max_ttft_p99_ms", "max_tpot_p99_ms"):
            value = getattr(self, name)
            if value is not None and (not _number(value) or value <= 0):
                raise ConfigError(f"{name} must be a number > 0, got {value!r}", field=name)
        goodput = self.min_goodput_fraction
        if goodput is not None and (not _number(goodput) or not 0 < goodput <= 1):
            raise ConfigError(
                f"min_goodput_fraction must be in (0, 1], got {goodput!r}",
                field="min_goodput_fraction",
            )

    def loads(self) -> Iterator[float]:
        """The loads of the ramp, in order (at most ``points``)."""
        value = self.start
        last = 0.0
        for _ in range(self.points):
            load = float(max(math.ceil(value), last + 1)) if self.load == "concurrency" else value
            yield load
            last = load
            value *= self.factor

    def broken(self, result: BenchResult) -> str | None:
        """Which bound ``result`` breaks (a sentence), or ``None``."""
        m = result.metrics
        if m.requests_completed == 0:
            return "no request completed"
        ttft, tpot = m.ttft_ms.p99, m.tpot_ms.p99
        if self.max_ttft_p99_ms is not None and ttft is not None and ttft > self.max_ttft_p99_ms:
            return f"p99 TTFT {ttft:.1f} ms > {self.max_ttft_p99_ms:g} ms"
        if self.max_tpot_p99_ms is not None and tpot is not None and tpot > self.max_tpot_p99_ms:
            return f"p99 TPOT {tpot:.2f} ms > {self.max_tpot_p99_ms:g} ms"
        if self.min_goodput_fraction is not None:
            good = m.goodput_requests
            # A failed request is not good: over completed ones alone, a server that fails
            # most requests under the load passes on the few it answers in time.
            fraction = (good or 0) / (m.requests_completed + m.requests_failed)
            if fraction < self.min_goodput_fraction:
                return f"goodput fraction {fraction:.2f} < {self.min_goodput_fraction:g}"
        return None


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A sweep: ``base`` (a ``BenchConfig``) run at each load of exactly one of
    ``concurrencies``, ``rates`` or ``ramp``.

    A rate sweep keeps the base's ``concurrency`` as the cap of requests in flight.
    ``warmup``: warm-up requests before each point (``None``: the base's ``warmup``, or
    else as many as the point's concurrency, at least 1), left out of its metrics.

    ```python
    SweepConfig(BenchConfig(requests=64, output_tokens=64), concurrencies=(1, 4, 16, 64))
    SweepConfig(BenchConfig(duration=30, requests=None), rates=(1.0, 2.0, 4.0))
    SweepConfig(BenchConfig(requests=50, ttft_slo_ms=500), ramp=Ramp(min_goodput_fraction=0.9))
    ```
    """

    base: BenchConfig = dataclasses.field(default_factory=BenchConfig)
    concurrencies: tuple[int, ...] | None = None
    rates: tuple[float, ...] | None = None
    ramp: Ramp | None = None
    warmup: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.base, BenchConfig):
            raise ConfigError("base must be a BenchConfig", field="base")
        given = [n for n in ("concurrencies", "rates", "ramp") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ConfigError(
                "give exactly one of concurrencies, rates or ramp"
                + (f" (got {', '.join(given)})" if given else ""),
                field="concurrencies",
            )
        if self.concurrencies is not None:
            values = tuple(self.concurrencies)
            if not values or not all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in values
            ):
                raise ConfigError(
                    f"concurrencies must be ints >= 1, got {self.concurrencies!r}",
                    field="concurrencies",
                )
            object.__setattr__(self, "concurrencies", values)
        if self.rates is not None:
            rates = tuple(self.rates)
            if not rates or not all(_number(r) and r > 0 for r in rates):
                raise ConfigError(f"rates must be numbers > 0, got {self.rates!r}", field="rates")
            object.__setattr__(self, "rates", tuple(float(r) for r in rates))
        if self.ramp is not None and not isinstance(self.ramp, Ramp):
            raise ConfigError("ramp must be a Ramp", field="ramp")
        if (
            self.ramp is not None
            and self.ramp.min_goodput_fraction is not None
            and self.base.ttft_slo_ms is None
            and self.base.tpot_slo_ms is None
        ):
            raise ConfigError(
                "min_goodput_fraction needs an SLO: set ttft_slo_ms or tpot_slo_ms "
                "on the base config",
                field="ramp",
            )
        warmup = self.warmup
        if warmup is not None and (
            not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0
        ):
            raise ConfigError(f"warmup must be an int >= 0, got {warmup!r}", field="warmup")
        # Every point's config is checked here, not when the sweep reaches it: by then an
        # engine has started and the points before it have run (conversations at a rate,
        # rate=inf without a request count). A ramp's points differ only in the load.
        loads = self.concurrencies or self.rates or (next(self.ramp.loads()) if self.ramp else 1,)
        for load in loads:
            self.point(load)

    @property
    def load(self) -> Load:
        """What the sweep varies: ``"concurrency"`` or ``"rate"``."""
        if self.ramp is not None:
            return self.ramp.load
        return "concurrency" if self.concurrencies is not None else "rate"

    def point(self, load: float) -> BenchConfig:
        """The ``BenchConfig`` of the point at ``load``."""
        base = self.base
        if self.load == "concurrency":
            config = dataclasses.replace(base, concurrency=int(load), rate=None)
        else:
            config = dataclasses.replace(base, rate=float(load))
        warmup = self.warmup
        if warmup is None:
            warmup = base.warmup or max(1, config.workers or 1)
        return dataclasses.replace(config, warmup=warmup)

    def to_json(self) -> dict[str, Any]:
        """The sweep's settings as JSON values."""
        return {
            "load": self.load,
            "concurrencies": list(self.concurrencies) if self.concurrencies else None,
            "rates": list(self.rates) if self.rates else None,
            "ramp": dataclasses.asdict(self.ramp) if self.ramp is not None else None,
            "warmup": self.warmup,
            "base": self.base.to_json(),
        }


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """What ``run_sweep`` measured: one ``BenchResult`` per point, in the order run.

    ``loads`` are the points' concurrencies or rates; ``stopped`` says why a ramp ended
    early (the bound it broke), else ``None``.
    """

    sweep: SweepConfig
    points: tuple[BenchResult, ...]
    loads: tuple[float, ...]
    stopped: str | None = None

    def rows(self) -> list[dict[str, Any]]:
        """One dict per point: load, the main metrics and the server side."""
        rows = []
        for load, result in zip(self.loads, self.points, strict=True):
            m = result.metrics
            server = result.server
            energy = result.energy
            # The servers' own count when read, else llama.cpp's per-request timings.
            hit = server.get("prompt_cache_hit_rate")
            rows.append(
                {
                    "load": load,
                    "requests_completed": m.requests_completed,
                    "requests_failed": m.requests_failed,
                    "max_in_flight": m.max_in_flight,
                    "request_throughput": m.request_throughput,
                    "output_throughput": m.output_throughput,
                    "goodput": m.goodput,
                    "ttft_ms": m.ttft_ms.to_json(),
                    "tpot_ms": m.tpot_ms.to_json(),
                    "itl_ms": m.itl_ms.to_json(),
                    "e2e_ms": m.e2e_ms.to_json(),
                    "server_predicted_per_token_ms": m.server_predicted_per_token_ms.to_json(),
                    "ttft_minus_server_prompt_ms": m.ttft_minus_server_prompt_ms.to_json(),
                    "prompt_cache_hit_rate": hit if hit is not None else m.prompt_cache_hit_rate,
                    "requests_deferred_max": server.get("requests_deferred_max"),
                    "kv_cache_usage_max": server.get("kv_cache_usage_max"),
                    "j_per_output_token": energy["j_per_output_token"] if energy else None,
                    "mean_power_w": energy["mean_power_w"] if energy else None,
                }
            )
        return rows

    def to_json(self) -> dict[str, Any]:
        """The sweep's document: ``schema`` (``SWEEP_SCHEMA``), ``sweep``, ``stopped``,
        ``points`` (one row per point, ``rows()``); each point's full result is its own
        ``result.json`` (``save``)."""
        return {
            "schema": SWEEP_SCHEMA,
            "sweep": self.sweep.to_json(),
            "stopped": self.stopped,
            "points": self.rows(),
        }

    def plot(self, out_dir: str | os.PathLike[str]) -> list[Path]:
        """``sweep_latency.png`` (TTFT and ITL p50/p90/p99 against load),
        ``sweep_throughput.png`` (output tokens/s and requests/s against load: the knee)
        and ``sweep_goodput.png`` (with SLOs). Needs matplotlib; blocking."""
        from ._plots import plot_sweep

        return plot_sweep(self, Path(out_dir))

    async def save(self, out_dir: str | os.PathLike[str], *, plots: bool = True) -> list[Path]:
        """Write ``sweep.json``, each point's ``point-NN/result.json`` (and plots) from a
        worker thread; return the paths."""

        def write() -> list[Path]:
            root = Path(out_dir)
            root.mkdir(parents=True, exist_ok=True)
            path = root / "sweep.json"
            path.write_bytes(msgspec.json.format(msgspec.json.encode(self.to_json()), indent=2))
            paths = [path]
            for number, result in enumerate(self.points):
                folder = root / f"point-{number:02d}"
                paths.append(result.write_json(folder / "result.json"))
                if plots:
                    paths += result.plot(folder)
            if plots:
                paths += self.plot(root)
            return paths

        return await anyio.to_thread.run_sync(write)

    def summary_text(self) -> str:
        """One line per point: load, throughput, latency percentiles, server side."""
        unit = "conc" if self.sweep.load == "concurrency" else "req/s"
        head = (
            f"{unit:>7} {'done':>5} {'fail':>4} {'out tok/s':>10} {'req/s':>7} "
            f"{'TTFT p50':>9} {'p99':>8} {'ITL p50':>8} {'p99':>8} {'TPOT':>7} "
            f"{'srv TPOT':>8} {'goodput':>8} {'cache':>6} {'defer':>5} {'J/tok':>7}"
        )
        lines = [f"llamatelemetry_async sweep: {self.sweep.base.describe()}", head]
        for row in self.rows():
            hit = row["prompt_cache_hit_rate"]
            lines.append(
                f"{row['load']:>7g} {row['requests_completed']:>5} {row['requests_failed']:>4} "
                f"{_f(row['output_throughput']):>10} {_f(row['request_throughput']):>7} "
                f"{_f(row['ttft_ms']['p50']):>9} {_f(row['ttft_ms']['p99']):>8} "
                f"{_f(row['itl_ms']['p50']):>8} {_f(row['itl_ms']['p99']):>8} "
                f"{_f(row['tpot_ms']['mean']):>7} "
                f"{_f(row['server_predicted_per_token_ms']['mean']):>8} "
                f"{_f(row['goodput']):>8} {'-' if hit is None else f'{hit:.0%}':>6} "
                f"{_f(row['requests_deferred_max'], 0):>5} {_f(row['j_per_output_token'], 3):>7}"
            )
        if self.stopped:
            lines.append(f"ramp stopped: {self.stopped}")
        lines.append("latencies in ms; srv TPOT: llama.cpp timings.predicted_per_token_ms")
        return "\n".join(lines)


async def run_sweep(
    target: Target,
    sweep: SweepConfig,
    *,
    progress: bool = True,
    gpu_sampler: GPUSampler | bool | None = None,
    api_key: str | None = None,
    server_metrics: bool = True,
    trace: bool | TracerProvider = False,
) -> SweepResult:
    """Run ``sweep``'s load points one after another against ``target``.

    ``target`` and the keywords are those of ``run_bench``; the target is opened once (an
    engine started here runs for the whole sweep). Each point warms up, then runs its
    measured requests with its own server readings; a progress bar follows the points
    and another each point's requests.

    ```python
    sweep = SweepConfig(BenchConfig(requests=64), concurrencies=(1, 4, 16))
    result = await run_sweep("http://127.0.0.1:8080", sweep)
    print(result.summary_text())
    await result.save("sweep-out")  # sweep.json, point-NN/result.json, sweep_*.png
    ```
    """
    if not isinstance(sweep, SweepConfig):
        raise UsageError(f"sweep must be a SweepConfig, got {type(sweep).__name__}")
    loads: Sequence[float]
    if sweep.concurrencies is not None:
        loads = [float(c) for c in sweep.concurrencies]
    elif sweep.rates is not None:
        loads = list(sweep.rates)
    else:
        assert sweep.ramp is not None
        loads = list(sweep.ramp.loads())
    points: list[BenchResult] = []
    done: list[float] = []
    stopped: str | None = None
    with single_error():
        async with contextlib.AsyncExitStack() as stack:
            resolved = await stack.enter_async_context(_open_target(target, api_key))
            sampler = await _sampler_for(stack, gpu_sampler, resolved)
            outer = Progress(
                progress, len(loads), None, lambda: len(points), unit="point", position=0
            )
            async with outer:
                for number, load in enumerate(loads):
                    label = f"point {number + 1}/{len(loads)} ({sweep.load} {load:g})"
                    outer.describe(label)
                    run = _Run(
                        resolved,
                        sweep.point(load),
                        sampler,
                        server_metrics=server_metrics,
                        trace=trace,
                        label=label,
                        position=1,
                    )
                    result = await run.run(progress)
                    points.append(result)
                    done.append(load)
                    if sweep.ramp is not None:
                        stopped = sweep.ramp.broken(result)
                        if stopped is not None:
                            break
    return SweepResult(sweep, tuple(points), tuple(done), stopped)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
