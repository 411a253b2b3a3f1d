"""Sweeps (``run_sweep``): several load points, ramps, their JSON, plots and command line;
the server side of each point (``/metrics`` deltas), energy per point, a span per request."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llamatelemetry_async import AsyncEngine, AsyncLlamaClient, ConfigError
from llamatelemetry_async._cli._bench import add_arguments, run_from_args
from llamatelemetry_async.bench import (
    SWEEP_SCHEMA,
    BenchConfig,
    Ramp,
    SweepConfig,
    run_bench,
    run_sweep,
)
from llamatelemetry_async.client._connection import Backend
from llamatelemetry_async.engine import Placement
from llamatelemetry_async.gpu import GPUSampler
from llamatelemetry_async.server import ServerConfig
from llamatelemetry_async.testing._fake_nvml import FakeGPU, FakeNVML
from llamatelemetry_async.testing._replay import recorded_requests, replay_server
from llamatelemetry_async.testing._server import RunningServer

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def paced_url() -> Iterator[str]:
    """Replay server pacing each stream at 200 tokens/s: throughput grows with concurrency."""
    with replay_server(tokens=10, rate=200.0) as url:
        yield url


# --------------------------------------------------------------------- sweeps on the replay server
@pytest.mark.anyio
async def test_concurrency_sweep_gives_one_result_per_point_with_growing_load(
    paced_url: str, client_backend: Backend
) -> None:
    sweep = SweepConfig(BenchConfig(requests=8, output_tokens=10), concurrencies=(1, 2, 4))
    async with AsyncLlamaClient(paced_url, backend=client_backend) as client:
        result = await run_sweep(client, sweep, progress=False)
    assert result.loads == (1.0, 2.0, 4.0)
    assert len(result.points) == 3
    for load, point in zip(result.loads, result.points, strict=True):
        assert point.config.concurrency == load
        # Warm-up per point: as many requests as the concurrency, left out of the metrics.
        assert sum(r.warmup for r in point.records) == load
        assert point.metrics.requests_completed == 8
        assert point.metrics.max_in_flight == load  # the load really was that
    # The load each point held: requests in flight on average (sum of E2E / duration).
    held = [
        sum(r.e2e for r in p.records if not r.warmup) / p.metrics.duration_s for p in result.points
    ]
    assert held[0] < held[1] < held[2]
    assert held[2] > 2.5  # four paced streams at once most of the time
    throughput = [p.metrics.output_throughput or 0.0 for p in result.points]
    assert throughput[2] > throughput[0]  # paced streams: more at once, more tokens/s
    assert result.stopped is None


@pytest.mark.anyio
async def test_rate_sweep_sends_at_each_rate(paced_url: str) -> None:
    sweep = SweepConfig(BenchConfig(requests=12, output_tokens=2, seed=3), rates=(20.0, 80.0))
    result = await run_sweep(paced_url, sweep, progress=False)
    assert [p.config.rate for p in result.points] == [20.0, 80.0]
    spans = []
    for point in result.points:
        scheduled = sorted(r.scheduled for r in point.records if not r.warmup and r.scheduled)
        spans.append(scheduled[-1] - scheduled[0])
    # The same seeded gaps, scaled by 1/rate: the faster point's schedule is 4 times shorter.
    assert spans[0] == pytest.approx(4 * spans[1], rel=1e-6)


@pytest.mark.anyio
async def test_a_ramp_stops_at_the_point_that_breaks_its_bound(paced_url: str) -> None:
    base = BenchConfig(requests=4, output_tokens=5)
    # A TPOT bound no real stream meets: the first point breaks it, and the ramp ends there.
    broken = await run_sweep(
        paced_url, SweepConfig(base, ramp=Ramp(max_tpot_p99_ms=1e-3, points=4)), progress=False
    )
    assert broken.loads == (1.0,)
    assert broken.stopped is not None
    assert broken.stopped.startswith("p99 TPOT")
    # A bound every point meets: the ramp runs all its points, load growing by the factor.
    whole = await run_sweep(
        paced_url,
        SweepConfig(base, ramp=Ramp(start=1, factor=2, points=3, max_ttft_p99_ms=60_000)),
        progress=False,
    )
    assert whole.loads == (1.0, 2.0, 4.0)
    assert whole.stopped is None
    assert [p.metrics.max_in_flight for p in whole.points] == [1, 2, 4]


def test_ramp_loads_and_sweep_config_errors() -> None:
    assert list(Ramp(start=1, factor=1.5, points=5, max_ttft_p99_ms=1).loads()) == [
        1.0,
        2.0,
        3.0,
        4.0,
        6.0,
    ]
    rates = list(Ramp("rate", start=0.5, factor=2, points=3, max_ttft_p99_ms=1).loads())
    assert rates == [0.5, 1.0, 2.0]
    with pytest.raises(ConfigError, match="exactly one"):
        SweepConfig(concurrencies=(1,), rates=(1.0,))
    with pytest.raises(ConfigError, match="exactly one"):
        SweepConfig()
    with pytest.raises(ConfigError, match="bound"):
        Ramp()
    with pytest.raises(ConfigError, match="needs an SLO"):
        SweepConfig(ramp=Ramp(min_goodput_fraction=0.9))
    with pytest.raises(ConfigError) as info:
        SweepConfig(concurrencies=(1, 0))
    assert info.value.field == "concurrencies"
    # The warm-up of a point: the base's, or else its concurrency.
    sweep = SweepConfig(BenchConfig(), concurrencies=(3,))
    assert sweep.point(3).warmup == 3
    assert SweepConfig(BenchConfig(warmup=1), concurrencies=(3,)).point(3).warmup == 1


@pytest.mark.anyio
async def test_sweep_json_and_plots(paced_url: str, tmp_path: Path) -> None:
    sweep = SweepConfig(
        BenchConfig(requests=4, output_tokens=3, ttft_slo_ms=10_000), concurrencies=(1, 2)
    )
    result = await run_sweep(paced_url, sweep, progress=False)
    paths = await result.save(tmp_path)
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["schema"] == SWEEP_SCHEMA
    assert data["sweep"]["load"] == "concurrency"
    assert data["sweep"]["concurrencies"] == [1, 2]
    assert [row["load"] for row in data["points"]] == [1, 2]
    assert data["points"][1]["max_in_flight"] == 2
    assert data["points"][0]["goodput"] == pytest.approx(result.points[0].metrics.goodput)
    for number in (0, 1):
        point = json.loads((tmp_path / f"point-{number:02d}" / "result.json").read_text())
        assert point["metrics"]["requests_completed"] == 4
    names = {p.name for p in paths}
    assert {"sweep_latency.png", "sweep_throughput.png", "sweep_goodput.png"} <= names
    for name in ("sweep_latency.png", "sweep_throughput.png", "sweep_goodput.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG)
    text = result.summary_text()
    assert len([line for line in text.splitlines() if line.strip().startswith(("1 ", "2 "))]) == 2


@pytest.mark.anyio
async def test_sweep_progress_has_a_bar_for_the_sweep_and_for_each_point(
    paced_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = SweepConfig(BenchConfig(requests=3, output_tokens=2), concurrencies=(1, 2))
    await run_sweep(paced_url, sweep, progress=True)
    err = capsys.readouterr().err
    assert "2/2" in err
    assert "point" in err
    assert "point 2/2 (concurrency 2)" in err  # each point's bar says which point
    assert "3/3" in err


# --------------------------------------------------------------------- command line
def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.anyio
async def test_cli_sweep_prints_each_point_and_writes_the_out_dir(
    paced_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _args(
        "--url",
        paced_url,
        "--sweep-concurrency",
        "1,2",
        "--requests",
        "3",
        "--output-tokens",
        "2",
        "--no-progress",
        "--no-plots",
        "--out",
        str(tmp_path),
    )
    assert await run_from_args(args) == 0
    out = capsys.readouterr().out
    assert "llamatelemetry_async sweep" in out
    assert json.loads((tmp_path / "sweep.json").read_text())["sweep"]["concurrencies"] == [1, 2]
    assert (tmp_path / "point-01" / "result.json").is_file()


def test_cli_sweep_options_make_the_sweep() -> None:
    from llamatelemetry_async._cli._bench import sweep_from_args

    base = BenchConfig()
    sweep = sweep_from_args(_args("--url", "u", "--sweep-rate", "0.5,2"), base)
    assert sweep is not None
    assert sweep.rates == (0.5, 2.0)
    ramp = sweep_from_args(
        _args("--url", "u", "--ramp", "concurrency", "--ramp-max-ttft-p99", "500"), base
    )
    assert ramp is not None
    assert ramp.ramp == Ramp(max_ttft_p99_ms=500)
    assert sweep_from_args(_args("--url", "u"), base) is None
    with pytest.raises(ConfigError, match="--sweep-concurrency"):
        sweep_from_args(_args("--url", "u", "--sweep-concurrency", "1,x"), base)


# --------------------------------------------------------------------- server side
@pytest.mark.anyio
async def test_server_metrics_deltas_match_what_the_run_sent(llama_server: RunningServer) -> None:
    # Prompt caching off: the server processes every prompt token the run sends.
    config = BenchConfig(
        concurrency=2,
        requests=6,
        input_tokens=20,
        output_tokens=6,
        params={"cache_prompt": False},
    )
    result = await run_bench(llama_server.url, config, progress=False)
    side = result.server
    sent = sum(r.prompt_tokens or 0 for r in result.records if not r.warmup)
    assert side["prompt_tokens_sent"] == sent > 0
    assert side["prompt_tokens_processed"] == sent
    assert side["prompt_cache_hit_rate"] == 0.0
    (server,) = side["servers"]
    assert server["counters"]["tokens_predicted_total"] == result.metrics.output_tokens
    assert server["metrics_error"] is None
    assert server["slots"] == 4  # /slots polled: the fixture runs -np 4
    assert server["busy_slots_max"] is not None
    assert side["requests_deferred_max"] is not None
    # KV cache in use, from /slots: some of the four slots' cells hold the run's tokens.
    assert side["kv_cache_usage_max"] is not None
    assert 0 < side["kv_cache_usage_max"] <= 1
    # Per-request server timings beside the client's.
    for r in result.records:
        assert r.server_prompt_n == r.prompt_tokens
        assert r.server_cache_n == 0
        assert r.server_predicted_n == 6
    assert result.metrics.server_predicted_per_token_ms.count == 6
    assert "server side: prompt tokens sent" in result.summary_text()


@pytest.mark.anyio
async def test_a_server_without_metrics_is_noted_and_the_run_goes_on(replay_url: str) -> None:
    result = await run_bench(replay_url, BenchConfig(requests=2, output_tokens=2), progress=False)
    assert result.metrics.requests_completed == 2
    (server,) = result.server["servers"]
    assert server["metrics_error"] is not None
    assert "404" in server["metrics_error"]
    assert result.server["prompt_tokens_processed"] is None


@pytest.mark.anyio
async def test_engine_sweep_gives_energy_per_point_and_results_per_server(
    tiny_model: Path,
) -> None:
    # A fake NVML stands in for the GPUs: its energy counters grow at 250 W and 120 W.
    nvml = FakeNVML([FakeGPU(power_w=250.0), FakeGPU(power_w=120.0)])
    engine = AsyncEngine(
        tiny_model,
        placement=Placement.cpu(2),
        server=ServerConfig(n_parallel=2, ctx_size=1024),
        telemetry=False,
        gpu_sampler=GPUSampler(interval=0.02, nvml=nvml),
    )
    sweep = SweepConfig(
        BenchConfig(requests=8, input_tokens=8, output_tokens=24), concurrencies=(1, 4)
    )
    result = await run_sweep(engine, sweep, progress=False)
    for point in result.points:
        energy = point.energy
        assert energy is not None
        assert energy["mean_power_w"] == pytest.approx(370.0, rel=0.05)
        assert energy["j_per_output_token"] == pytest.approx(
            energy["energy_j"] / point.metrics.output_tokens
        )
        names = {r.server for r in point.records}
        assert names <= {s.name for s in engine.servers}
        assert None not in names
        per_server = point.per_server()
        assert sum(m.requests_completed for m in per_server.values()) == 8
        assert {s["name"] for s in point.server["servers"]} == {s.name for s in engine.servers}
    # Four at once spread over both servers, each with its own line in the summary.
    assert len(result.points[1].per_server()) == 2
    text = result.points[1].summary_text()
    assert all(f"  server {s.name}: " in text for s in engine.servers)


@pytest.mark.anyio
async def test_trace_makes_a_span_per_request_and_sends_its_traceparent(replay_url: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    recorded_requests(replay_url, reset=True)
    config = BenchConfig(requests=3, warmup=1, output_tokens=2)
    await run_bench(replay_url, config, progress=False, trace=provider, server_metrics=False)
    spans = [s for s in exporter.get_finished_spans() if s.name == "bench.request"]
    assert len(spans) == 4
    assert sorted(bool(s.attributes and s.attributes["bench.warmup"]) for s in spans) == [
        False,
        False,
        False,
        True,
    ]
    sent = [
        tuple(r.header("traceparent")[0].split("-")[1:3])
        for r in recorded_requests(replay_url)
        if r.target == "/completion"
    ]
    # Each request carried its own span's trace and span id (the flags are the SDK's).
    expected = {(f"{s.context.trace_id:032x}", f"{s.context.span_id:016x}") for s in spans}
    assert len(sent) == 4
    assert set(sent) == expected
