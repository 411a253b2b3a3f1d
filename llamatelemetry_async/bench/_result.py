"""``BenchResult``: a run's records and settings, its metrics, JSON, summary and plots."""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import msgspec

from ..gpu import GPUSample
from ._config import BenchConfig
from ._metrics import FORMULAS, BenchMetrics, RequestRecord, Stats, compute_metrics

__all__ = ["SCHEMA", "BenchResult"]

#: The ``schema`` value of a result's JSON.
SCHEMA = "llamatelemetry_async.bench/2"

# What the numbers of the JSON are in, written into it so that the file explains itself.
_UNITS = {
    "records": (
        "send, first_byte, chunk_times, end, scheduled in seconds since the run started "
        "(time.perf_counter); server_*_ms in milliseconds"
    ),
    "metrics": (
        "*_ms in milliseconds, duration_s in seconds; *_throughput and goodput per second "
        "of duration_s (requests/s or tokens/s)"
    ),
    "gpu_samples": "t in seconds since the run started; power in W; utilization in %",
    "server": (
        "counters are deltas over the measured requests (tokens, seconds); gauges mean and "
        "max over polls; prompt_cache_hit_rate a fraction"
    ),
    "energy": "energy_j in joules, mean_power_w in watts, j_per_output_token in J/token",
}


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """What ``run_bench`` measured.

    ``records``: one ``RequestRecord`` per request in order of sending, warm-up first
    (``warmup=True``; left out of every metric). ``environment``: library, Python, OS,
    llama-server build, model, servers, GPUs, how input lengths came about.
    ``gpu_samples``: the GPU sampler's readings during the run, ``t`` in seconds since
    the run started (empty without a sampler). ``server``: what the servers counted
    themselves over the measured requests (``/metrics`` deltas and ``/slots`` polls; empty
    when not read). ``energy`` and ``per_server`` are computed from these.

    ```python
    result = await run_bench("http://127.0.0.1:8080", BenchConfig(concurrency=4))
    print(result.summary_text())
    print(result.metrics.ttft_ms.p99)
    paths = await result.save("out")  # out/result.json, out/ttft.png, ...
    ```
    """

    config: BenchConfig
    records: tuple[RequestRecord, ...]
    environment: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    gpu_samples: tuple[GPUSample, ...] = ()
    server: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    @functools.cached_property
    def energy(self) -> dict[str, Any] | None:
        """GPU energy over the measured requests, or ``None`` without GPU samples.

        Per GPU, the energy counter's rise (``energy_j``, Volta and newer) or else power
        integrated over time (trapezoids); ``energy_j`` is their sum,
        ``mean_power_w`` that over the measured span, ``j_per_output_token`` that over the
        output tokens of the completed requests.
        """
        start = float(self.environment.get("measured_from_s", 0.0) or 0.0)
        samples = [s for s in self.gpu_samples if s.t >= start]
        if not samples:
            return None
        per_gpu: dict[str, float] = {}
        span = 0.0
        for index in sorted({s.index for s in samples}):
            mine = [s for s in samples if s.index == index]
            span = max(span, mine[-1].t - mine[0].t)
            counters = [s.energy_j for s in mine if s.energy_j is not None]
            if len(counters) >= 2:
                per_gpu[str(index)] = counters[-1] - counters[0]
                continue
            powered = [(s.t, s.power_w) for s in mine if s.power_w is not None]
            per_gpu[str(index)] = sum(
                (t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in itertools.pairwise(powered)
            )
        total = sum(per_gpu.values())
        tokens = self.metrics.output_tokens
        return {
            "energy_j": total,
            "energy_j_per_gpu": per_gpu,
            "seconds": span,
            "mean_power_w": total / span if span > 0 else None,
            "output_tokens": tokens,
            "j_per_output_token": total / tokens if tokens else None,
        }

    def per_server(self) -> dict[str, BenchMetrics]:
        """The metrics of each server's requests (an engine's run), by server name."""
        names = sorted({r.server for r in self.records if r.server is not None})
        return {
            name: compute_metrics(
                [r for r in self.records if r.server == name],
                ttft_slo_ms=self.config.ttft_slo_ms,
                tpot_slo_ms=self.config.tpot_slo_ms,
            )
            for name in names
        }

    @functools.cached_property
    def metrics(self) -> BenchMetrics:
        """The metrics of the measured requests, with the config's SLOs for goodput."""
        return compute_metrics(
            self.records,
            ttft_slo_ms=self.config.ttft_slo_ms,
            tpot_slo_ms=self.config.tpot_slo_ms,
        )

    @property
    def errors(self) -> dict[str, int]:
        """Each distinct error of the measured requests and how often it happened."""
        return dict(collections.Counter(r.error for r in self.records if r.error and not r.warmup))

    # ----------------------------------------------------------------- JSON
    def to_json(self) -> dict[str, Any]:
        """Everything as JSON values: the document ``write_json`` writes.

        Keys: ``schema`` (``SCHEMA``), ``config``, ``environment``, ``units``,
        ``formulas``, ``metrics``, ``errors``, ``server``, ``energy``, ``per_server``,
        ``records``, ``gpu_samples``; the benchmarking guide lists every field.
        """
        doc = self._head_json()
        doc["records"] = [r.to_json() for r in self.records]
        doc["gpu_samples"] = [_sample_json(s) for s in self.gpu_samples]
        return doc

    def _head_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "config": self.config.to_json(),
            "environment": dict(self.environment),
            "units": dict(_UNITS),
            "formulas": dict(FORMULAS),
            "metrics": self.metrics.to_json(),
            "errors": self.errors,
            "server": dict(self.server),
            "energy": self.energy,
            "per_server": {name: m.to_json() for name, m in self.per_server().items()},
        }

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        """Write ``to_json()`` to ``path`` (a file); return the path.

        Records are encoded one at a time, so a run of 100,000 requests never holds
        its whole document as Python objects. Blocking (file I/O): from async code,
        ``await result.save(out_dir)``.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as file:
            _dump(self, file)
        return path

    # ----------------------------------------------------------------- plots
    def plot(self, out_dir: str | os.PathLike[str]) -> list[Path]:
        """Write PNG plots into ``out_dir``; return their paths.

        ``ttft.png`` and ``itl.png`` (distributions), ``throughput.png`` (output tokens/s
        and requests in flight over time), and ``gpu.png`` (utilization and power per GPU
        over time) when GPU samples were taken. Needs matplotlib
        (``pip install 'llamatelemetry_async[bench]'``); blocking: from async code,
        ``await result.save(out_dir)``.
        """
        from ._plots import plot_result

        return plot_result(self, Path(out_dir))

    async def save(self, out_dir: str | os.PathLike[str], *, plots: bool = True) -> list[Path]:
        """Write ``result.json`` (and the plots) into ``out_dir`` from a worker thread."""

        def write() -> list[Path]:
            paths = [self.write_json(Path(out_dir) / "result.json")]
            if plots:
                paths += self.plot(out_dir)
            return paths

        return await anyio.to_thread.run_sync(write)

    # ----------------------------------------------------------------- text
    def summary_text(self) -> str:
        """A table of the metrics, with the formula of each."""
        m, env = self.metrics, self.environment
        lines = [f"llamatelemetry_async bench: {self.config.describe()}"]
        target = env.get("url") or env.get("target")
        server = ", ".join(
            f"{k} {v}"
            for k, v in (
                ("llama-server", env.get("llama_server")),
                ("model", env.get("model")),
                ("servers", len(env["servers"]) if env.get("servers") else None),
                ("slots each" if env.get("servers") else "slots", env.get("slots")),
            )
            if v is not None
        )
        if target:
            lines.append(f"target: {target}" + (f" ({server})" if server else ""))
        if env.get("input_lengths"):
            lines.append(f"input lengths: {env['input_lengths']}")
        lines.append("")
        lines.append(
            f"requests: {m.requests_completed} completed, {m.requests_failed} failed, "
            f"in {m.duration_s:.3f} s (at most {m.max_in_flight} in flight)"
        )
        lines.append(f"tokens: {m.input_tokens} input, {m.output_tokens} output")
        slo = " and ".join(
            f"{name} <= {value:g} ms"
            for name, value in (("TTFT", m.ttft_slo_ms), ("TPOT", m.tpot_slo_ms))
            if value is not None
        )
        rows = [
            ("request throughput", m.request_throughput, "req/s", FORMULAS["request_throughput"]),
            ("output throughput", m.output_throughput, "tok/s", FORMULAS["output_throughput"]),
            (
                "total throughput",
                m.total_token_throughput,
                "tok/s",
                FORMULAS["total_token_throughput"],
            ),
        ]
        if m.goodput is not None:
            rows.append(
                (
                    "goodput",
                    m.goodput,
                    "req/s",
                    f"goodput = completed requests with {slo} / duration "
                    f"({m.goodput_requests} met)",
                )
            )
        for label, value, unit, formula in rows:
            lines.append(f"{label:<20} {_num(value):>10} {unit:<6} {formula}")
        lines.append(f"{'':<38}{FORMULAS['duration']}")
        lines.append("")
        head = ("metric (ms)", "mean", "p50", "p90", "p99", "min", "max", "n")
        lines.append(f"{head[0]:<13}" + "".join(f"{h:>10}" for h in head[1:]) + "   formula")
        table: list[tuple[str, Stats, str]] = [
            ("TTFT", m.ttft_ms, FORMULAS["ttft"]),
            ("TPOT", m.tpot_ms, FORMULAS["tpot"]),
            ("ITL", m.itl_ms, FORMULAS["itl"]),
            ("E2E", m.e2e_ms, FORMULAS["e2e"]),
            ("server prompt", m.server_prompt_ms, "llama.cpp timings.prompt_ms"),
        ]
        for label, stats, formula in table:
            values = (stats.mean, stats.p50, stats.p90, stats.p99, stats.min, stats.max)
            lines.append(
                f"{label:<13}"
                + "".join(f"{_num(v):>10}" for v in values)
                + f"{stats.count:>10}   {formula}"
            )
        server_tpot = m.server_predicted_per_token_ms
        if server_tpot.count:
            lines.append(
                f"llama.cpp's clock: TPOT mean {_num(m.tpot_ms.mean)} ms (client) vs "
                f"{_num(server_tpot.mean)} ms (timings.predicted_per_token_ms); TTFT - "
                f"prompt_ms mean {_num(m.ttft_minus_server_prompt_ms.mean)} ms, p99 "
                f"{_num(m.ttft_minus_server_prompt_ms.p99)} (HTTP + queueing)"
            )
        if m.prompt_cache_hit_rate is not None:
            lines.append(f"prompt cache hit rate (timings): {m.prompt_cache_hit_rate:.1%}")
        side = self.server
        if side:
            hit = side.get("prompt_cache_hit_rate")
            lines.append(
                f"server side: prompt tokens sent {side.get('prompt_tokens_sent')}, "
                f"processed {_num(side.get('prompt_tokens_processed'))}"
                + (f" (cache hit rate {hit:.1%})" if hit is not None else "")
                + f", requests deferred max {_num(side.get('requests_deferred_max'))}"
            )
            for one in side.get("servers", []):
                if one.get("metrics_error"):
                    lines.append(f"  {one['name']}: /metrics unavailable ({one['metrics_error']})")
                elif one.get("counters_unknown"):
                    lines.append(f"  {one['name']}: counts unknown ({one['counters_unknown']})")
        per_server = self.per_server()
        if len(per_server) > 1:
            for name, pm in per_server.items():
                lines.append(
                    f"  server {name}: {pm.requests_completed} completed, "
                    f"{_num(pm.output_throughput)} tok/s, TTFT p50 {_num(pm.ttft_ms.p50)} ms, "
                    f"TPOT mean {_num(pm.tpot_ms.mean)} ms"
                )
        energy = self.energy
        if energy is not None:
            lines.append(
                f"energy: {_num(energy['energy_j'])} J, mean power "
                f"{_num(energy['mean_power_w'])} W, {_num(energy['j_per_output_token'])} "
                "J per output token"
            )
        decode = m.server_predicted_per_second
        if decode.count:
            lines.append(
                f"server decode speed (llama.cpp timings.predicted_per_second): mean "
                f"{_num(decode.mean)} tok/s, p50 {_num(decode.p50)}, min {_num(decode.min)}"
            )
        lines.append(FORMULAS["percentiles"])
        errors = self.errors
        if errors:
            lines.append("")
            lines.append("errors:")
            for message, count in sorted(errors.items(), key=lambda kv: -kv[1])[:5]:
                lines.append(f"  {count} x {message}")
            if len(errors) > 5:
                lines.append(f"  ... and {len(errors) - 5} other errors (result.json has all)")
        if self.gpu_samples:
            lines.append("")
            lines.append(_gpu_line(self.gpu_samples))
        return "\n".join(lines)


def _dump(result: BenchResult, file: BinaryIO) -> None:
    """Indented JSON, except one line per record and per GPU sample (a run has thousands).

    Each row is encoded and written on its own: memory stays one row, not one document.
    """
    head = msgspec.json.format(msgspec.json.encode(result._head_json()), indent=2)
    file.write(head.removesuffix(b"\n}"))
    rows: tuple[tuple[str, Iterable[dict[str, Any]]], ...] = (
        ("records", (r.to_json() for r in result.records)),
        ("gpu_samples", (_sample_json(s) for s in result.gpu_samples)),
    )
    encoder = msgspec.json.Encoder()
    for key, items in rows:
        file.write(b',\n  "%s": [' % key.encode())
        separator = b"\n    "
        for item in items:
            file.write(separator + encoder.encode(item))
            separator = b",\n    "
        file.write(b"\n  ]" if separator != b"\n    " else b"]")
    file.write(b"\n}\n")


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if abs(value) < 1e6 else f"{value:.3g}"


def _sample_json(sample: GPUSample) -> dict[str, Any]:
    out = dataclasses.asdict(sample)
    out["t"] = round(sample.t, 6)
    out["processes"] = [list(p) for p in sample.processes]
    return out


def _gpu_line(samples: tuple[GPUSample, ...]) -> str:
    parts = []
    for index in sorted({s.index for s in samples}):
        mine = [s for s in samples if s.index == index]
        util = [s.utilization_gpu for s in mine if s.utilization_gpu is not None]
        power = [s.power_w for s in mine if s.power_w is not None]
        text = f"GPU {index} ({mine[0].name}): {len(mine)} samples"
        if util:
            text += f", utilization mean {sum(util) / len(util):.0f}%"
        if power:
            text += f", power mean {sum(power) / len(power):.0f} W, max {max(power):.0f} W"
        parts.append(text)
    return "\n".join(parts)
