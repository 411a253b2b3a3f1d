"""The load benchmark: metrics on hand-made timelines, the load shapes against the replay
server, real runs against llama-server, plots, the JSONL loader, the CLI and the example."""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import math
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
import sniffio
from _procs import with_default_sigint
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from llamatelemetry_async import AsyncEngine, AsyncLlamaClient, ConfigError
from llamatelemetry_async._cli._bench import add_arguments, run_from_args
from llamatelemetry_async.bench import (
    FORMULAS,
    SCHEMA,
    BenchConfig,
    BenchPrompt,
    BenchResult,
    PromptFileError,
    RequestRecord,
    compute_metrics,
    inter_arrival_times,
    load_prompts_jsonl,
    max_in_flight,
    pooled_itl,
    run_bench,
    throughput_timeline,
)
from llamatelemetry_async.bench._metrics import Stats
from llamatelemetry_async.bench._plots import _histogram
from llamatelemetry_async.client._connection import Backend
from llamatelemetry_async.engine import Placement
from llamatelemetry_async.gpu import GPUSample, GPUSampler
from llamatelemetry_async.server import ServerConfig, ServerState
from llamatelemetry_async.testing._fake_nvml import FakeGPU, FakeNVML
from llamatelemetry_async.testing._replay import replay_server
from llamatelemetry_async.testing._server import RunningServer

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def paced_replay_url() -> Iterator[str]:
    """A replay server that sends each stream's tokens at 200 tokens/s (5 ms apart)."""
    with replay_server(tokens=10, rate=200.0) as url:
        yield url


def _stats(url: str) -> dict[str, float]:
    response = httpx.get(f"{url}/stats", timeout=10)
    response.raise_for_status()
    stats: dict[str, float] = response.json()
    return stats


async def _astats(url: str) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"{url}/stats")
    response.raise_for_status()
    stats: dict[str, float] = response.json()
    return stats


async def _wait_for_stat(
    url: str, name: str, done: Callable[[float], bool], timeout: float = 20.0
) -> float:
    """Poll the replay server's /stats until ``done(value)`` (a condition, not a delay)."""
    with anyio.fail_after(timeout):
        while True:
            value = (await _astats(url))[name]
            if done(value):
                return value
            await anyio.sleep(0.02)


# --------------------------------------------------------------------- metrics (pure)
def _record(
    index: int,
    send: float,
    chunks: tuple[float, ...],
    end: float,
    *,
    tokens: int | None = None,
    prompt: int | None = None,
    warmup: bool = False,
    error: str | None = None,
) -> RequestRecord:
    return RequestRecord(
        index=index,
        send=send,
        end=end,
        chunk_times=chunks,
        output_tokens=len(chunks) if tokens is None else tokens,
        prompt_tokens=prompt,
        warmup=warmup,
        error=error,
    )


def test_one_request_formulas_on_a_hand_made_timeline() -> None:
    r = _record(0, 1.0, (1.1, 1.15, 1.25, 1.30), 1.32)
    assert r.ttft == pytest.approx(0.1)
    assert r.e2e == pytest.approx(0.32)
    assert r.tpot == pytest.approx((0.32 - 0.1) / 3)
    assert r.itl == pytest.approx([0.05, 0.1, 0.05])
    # One token: no TPOT; no chunk at all: no TTFT either.
    assert _record(1, 0.0, (0.2,), 0.3).tpot is None
    assert _record(2, 0.0, (), 0.3).ttft is None


def _timeline() -> list[RequestRecord]:
    return [
        _record(0, 0.0, (0.1, 0.2), 0.5, prompt=99, warmup=True),  # left out of everything
        _record(1, 1.0, (1.1, 1.2, 1.3), 1.3, prompt=10),
        _record(2, 1.0, (1.3, 1.35, 1.4, 1.45, 1.5), 1.5, prompt=20),
        _record(3, 1.2, (1.25,), 1.25, prompt=5),
        _record(4, 1.4, (1.6,), 2.0, prompt=7, error="ReadError: the connection broke"),
    ]


def test_metrics_of_a_hand_made_run_have_the_hand_computed_values() -> None:
    m = compute_metrics(_timeline(), ttft_slo_ms=150, tpot_slo_ms=80)
    assert (m.requests_completed, m.requests_failed) == (3, 1)
    assert m.duration_s == pytest.approx(1.0)  # last end 2.0 - first send 1.0 (failed counts)
    assert (m.input_tokens, m.output_tokens) == (35, 9)
    assert m.request_throughput == pytest.approx(3.0)
    assert m.output_throughput == pytest.approx(9.0)
    assert m.total_token_throughput == pytest.approx(44.0)
    assert m.max_in_flight == 3  # at t=1.2: requests 1, 2 and 3

    # TTFT 100, 300, 50 ms. Linear interpolation: p90 at rank 0.9*2 = 1.8 -> 100 + 0.8*200.
    t = m.ttft_ms
    assert t.count == 3
    assert (t.mean, t.p50, t.p90, t.p99, t.min, t.max) == pytest.approx(
        (150.0, 100.0, 260.0, 296.0, 50.0, 300.0)
    )
    assert t.std == pytest.approx(math.sqrt((50**2 + 150**2 + 100**2) / 3))  # population std
    # TPOT: (300-100)/2 = 100 ms and (500-300)/4 = 50 ms; request 3 has one token.
    p = m.tpot_ms
    assert p.count == 2
    assert (p.mean, p.p50, p.p90, p.p99) == pytest.approx((75.0, 75.0, 95.0, 99.5))
    # ITL pooled: 100, 100, 50, 50, 50, 50 ms.
    i = m.itl_ms
    assert i.count == 6
    assert (i.mean, i.p50, i.p90, i.p99) == pytest.approx((400 / 6, 50.0, 100.0, 100.0))
    # E2E 300, 500, 50 ms.
    e = m.e2e_ms
    assert (e.mean, e.p50, e.p90, e.p99) == pytest.approx((850 / 3, 300.0, 460.0, 496.0))
    # Goodput: request 1 misses TPOT (100 > 80), 2 misses TTFT (300 > 150), 3 meets both.
    assert m.goodput_requests == 1
    assert m.goodput == pytest.approx(1.0)
    assert compute_metrics(_timeline()).goodput is None  # no SLO, no goodput


def test_nothing_measured_gives_empty_statistics_not_errors() -> None:
    m = compute_metrics([_record(0, 0.0, (0.1,), 0.2, warmup=True)])
    assert m.requests_completed == 0
    assert m.request_throughput is None
    assert m.ttft_ms.count == 0
    assert m.ttft_ms.mean is None


def test_back_to_back_requests_do_not_overlap() -> None:
    records = [_record(0, 0.0, (), 1.0), _record(1, 1.0, (), 2.0), _record(2, 1.5, (), 1.7)]
    assert max_in_flight(records) == 2
    assert max_in_flight(records[:2]) == 1


def test_throughput_timeline_bins_chunks_and_counts_in_flight() -> None:
    records = [
        _record(0, 0.0, (0.05, 0.15, 0.25), 0.3),
        _record(1, 0.0, (0.12, 0.18), 0.2),
    ]
    timeline = throughput_timeline(records, bin_s=0.1)
    assert timeline.starts == pytest.approx((0.0, 0.1, 0.2))
    # Chunks per bin 1, 3, 1 -> /0.1 s; one request ends in the third bin (0.2 is its edge).
    assert timeline.output_tokens_per_s == pytest.approx((10.0, 30.0, 10.0))
    assert timeline.requests_per_s == pytest.approx((0.0, 0.0, 20.0))
    assert timeline.in_flight == (2, 2, 1)


def test_pooled_itl_never_bridges_two_requests() -> None:
    records = [
        _record(0, 0.0, (), 0.1),  # no chunk: no gap
        _record(1, 0.0, (0.5,), 0.6),  # one chunk: no gap
        _record(2, 1.0, (1.1, 1.3, 1.6), 1.7),
        _record(3, 0.0, (0.2, 0.25), 0.3),  # earlier than the last: a bridged gap is negative
        _record(4, 2.0, (2.5,), 2.6),
    ]
    gaps = pooled_itl(records)
    assert gaps.tolist() == pytest.approx([0.2, 0.3, 0.05])
    assert gaps.tolist() == pytest.approx([g for r in records for g in r.itl])
    assert pooled_itl([]).size == 0
    assert pooled_itl(records[:2]).size == 0
    # Chunk times are kept as 8-byte doubles, whatever sequence they were given as.
    assert isinstance(records[2].chunk_times, array.array)
    assert records[2].chunk_times.typecode == "d"
    assert RequestRecord.from_json(records[2].to_json()) == records[2]


def test_goodput_needs_a_token_whichever_limits_are_given() -> None:
    records = [
        _record(0, 0.0, (), 0.1),  # completed, but no token came
        _record(1, 0.0, (0.05,), 0.06),  # one token: no TPOT to miss
        _record(2, 0.0, (0.05, 0.07, 0.09), 0.1),  # TPOT 25 ms
    ]
    # Before the fix the token-less request met a TPOT-only limit (3 instead of 2).
    assert compute_metrics(records, tpot_slo_ms=30).goodput_requests == 2
    assert compute_metrics(records, ttft_slo_ms=100).goodput_requests == 2
    assert compute_metrics(records, tpot_slo_ms=20).goodput_requests == 1
    m = compute_metrics(records)
    assert m.requests_completed == 3
    assert (m.ttft_ms.count, m.tpot_ms.count, m.itl_ms.count) == (2, 1, 2)


# --------------------------------------------------------------------- arrival process
@pytest.mark.parametrize("burstiness", [1.0, 0.5, 4.0])
def test_gamma_arrivals_have_mean_one_over_rate_and_the_burstiness_spread(
    burstiness: float,
) -> None:
    rate, n = 50.0, 20_000
    gaps = inter_arrival_times(rate, burstiness, np.random.default_rng(7))
    sample = np.fromiter((next(gaps) for _ in range(n)), dtype=np.float64, count=n)
    # The standard error of the mean is 1/(rate*sqrt(burstiness*n)) <= 1.0% here: within
    # 3% is more than 3 standard errors. The coefficient of variation is 1/sqrt(shape).
    assert sample.mean() == pytest.approx(1 / rate, rel=0.03)
    assert sample.std() / sample.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)
    same = inter_arrival_times(rate, burstiness, np.random.default_rng(7))
    assert [next(same) for _ in range(5)] == pytest.approx(sample[:5].tolist())  # seeded


def test_an_infinite_rate_sends_everything_at_once() -> None:
    gaps = inter_arrival_times(math.inf, 1.0, np.random.default_rng(0))
    assert [next(gaps) for _ in range(3)] == [0.0, 0.0, 0.0]


@pytest.mark.anyio
async def test_rate_run_sends_on_the_seeded_schedule(
    replay_url: str, client_backend: Backend
) -> None:
    rate = 200.0
    config = BenchConfig(rate=rate, requests=60, output_tokens=4, seed=3)
    async with AsyncLlamaClient(replay_url, backend=client_backend) as client:
        result = await run_bench(client, config, progress=False)
    records = result.records
    assert len(records) == 60
    assert all(r.ok for r in records)
    scheduled = np.array([r.scheduled for r in records], dtype=np.float64)
    sends = np.array([r.send for r in records])
    # The schedule is the seeded gamma gaps (first arrival at once).
    gaps = inter_arrival_times(rate, 1.0, np.random.default_rng(3))
    expected = np.cumsum([0.0] + [next(gaps) for _ in range(59)])
    assert np.diff(scheduled) == pytest.approx(np.diff(expected), abs=1e-6)
    # Sends follow it: never early, and late by a few milliseconds at most on a busy machine.
    lateness = sends - scheduled
    assert lateness.min() > -1e-3
    assert float(np.median(lateness)) < 0.05
    # Without a concurrency cap requests overlapped (the replay server took them at once).
    assert result.metrics.max_in_flight > 1
    assert result.config.workers is None


@pytest.mark.anyio
async def test_rate_arrivals_catch_up_after_the_loop_stalls(
    replay_url: str, client_backend: Backend
) -> None:
    # Sleeping until absolute times, the requests due during a stall go out at once after
    # it and the rest keep to the schedule; relative sleeps would push every later
    # request back by the stall (100 ms here).
    config = BenchConfig(rate=200.0, requests=100, output_tokens=2, seed=5)
    stall = 0.1

    async def stall_the_loop() -> None:
        await anyio.sleep(0.15)  # when to inject the stall, not a synchronisation
        time.sleep(stall)  # noqa: ASYNC251  # blocks the event loop on purpose

    async with (
        AsyncLlamaClient(replay_url, backend=client_backend) as client,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(stall_the_loop)
        result = await run_bench(client, config, progress=False)
    lateness = np.array([r.send - r.scheduled for r in result.records if r.scheduled is not None])
    assert lateness.size == 100
    assert lateness.max() > stall / 2  # the stall landed inside the run
    assert float(np.median(lateness[-20:])) < 0.05  # and did not slip (relative sleeps: ~0.17)


@pytest.mark.anyio
async def test_rate_with_a_concurrency_cap_keeps_to_it(
    paced_replay_url: str, client_backend: Backend
) -> None:
    config = BenchConfig(rate=math.inf, concurrency=3, requests=9, output_tokens=5)
    async with AsyncLlamaClient(paced_replay_url, backend=client_backend) as client:
        result = await run_bench(client, config, progress=False)
    assert result.metrics.requests_completed == 9
    assert result.metrics.max_in_flight == 3
    assert all(r.output_tokens == 5 for r in result.records)


@pytest.mark.anyio
async def test_rate_with_a_cap_sends_nothing_after_the_deadline(
    paced_replay_url: str, client_backend: Backend
) -> None:
    # 100 arrivals/s into one slot that takes ~50 ms a request: most arrivals wait. The run
    # used to queue every arrival due before the deadline and send them all, long after it.
    duration = 0.3
    config = BenchConfig(
        rate=100.0, concurrency=1, duration=duration, requests=None, output_tokens=10
    )
    began = time.perf_counter()
    async with AsyncLlamaClient(paced_replay_url, backend=client_backend) as client:
        result = await run_bench(client, config, progress=False)
    took = time.perf_counter() - began
    records = result.records
    start = min(r.scheduled for r in records if r.scheduled is not None)
    assert 2 <= len(records) <= 8
    assert max(r.send for r in records) - start < duration + 0.01
    assert max(r.send - (r.scheduled or 0.0) for r in records) > 0.03  # the cap held them
    assert result.metrics.max_in_flight == 1
    assert took < duration + 1.0  # the last request ends, nothing queued behind it


# --------------------------------------------------------------------- load shapes, replay server
@pytest.mark.anyio
async def test_fixed_concurrency_is_never_exceeded_as_the_server_counts(
    paced_replay_url: str, client_backend: Backend
) -> None:
    before = await _astats(paced_replay_url)
    config = BenchConfig(concurrency=4, requests=16, warmup=4, output_tokens=10)
    async with AsyncLlamaClient(paced_replay_url, backend=client_backend) as client:
        # No /metrics polls: their connection would count as a stream's.
        result = await run_bench(client, config, progress=False, server_metrics=False)
    after = await _astats(paced_replay_url)
    # Each stream needs a connection of its own: the server saw at most 4 connections
    # opened by the run (the /stats requests open one each), so never 5 streams at once.
    opened = after["connections_opened"] - before["connections_opened"] - 1
    assert 1 <= opened <= 4
    m = result.metrics
    assert m.max_in_flight == 4  # and the client's own count says 4 was reached
    assert (m.requests_completed, m.requests_failed) == (16, 0)
    assert sum(r.warmup for r in result.records) == 4
    assert all(r.output_tokens == 10 and len(r.chunk_times) == 10 for r in result.records)
    # Paced at 200 tokens/s, every gap between tokens is about 5 ms.
    assert m.itl_ms.p50 == pytest.approx(5.0, abs=2.0)
    # Measured requests all start after every warm-up request ended.
    warm_end = max(r.end for r in result.records if r.warmup)
    assert min(r.send for r in result.records if not r.warmup) >= warm_end


@pytest.mark.anyio
async def test_a_run_by_duration_stops_sending_at_the_deadline(
    paced_replay_url: str, client_backend: Backend
) -> None:
    config = BenchConfig(requests=None, duration=0.3, concurrency=2, output_tokens=4)
    async with AsyncLlamaClient(paced_replay_url, backend=client_backend) as client:
        result = await run_bench(client, config, progress=False)
    sends = [r.send for r in result.records]
    assert len(sends) >= 4  # 20 ms per request, 2 at a time, for 0.3 s
    assert max(sends) - min(sends) < 0.3 + 0.05
    assert all(r.ok for r in result.records)


@pytest.mark.anyio
async def test_failed_requests_are_recorded_with_their_error(
    replay_url: str, client_backend: Backend
) -> None:
    config = BenchConfig(
        concurrency=2, requests=4, output_tokens=4, params={"_replay_fault": "error_event"}
    )
    async with AsyncLlamaClient(replay_url, backend=client_backend) as client:
        result = await run_bench(client, config, progress=False)
    assert result.metrics.requests_failed == 4
    assert all(r.error and r.error.startswith("StreamError: ") for r in result.records)
    assert list(result.errors.values()) == [4]
    assert "errors:" in result.summary_text()


class _Finished:
    """An instrumentation that only counts the streams that ended well."""

    def __init__(self) -> None:
        self.count = 0
        self.two = anyio.Event()

    def start(self, operation: str, body: Mapping[str, Any], *, stream: bool) -> _Finished:
        return self

    def activate(self) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()

    def on_server(self, url: str, name: str | None, gpus: tuple[int, ...]) -> None:
        pass

    def annotate(self, attributes: Mapping[str, Any]) -> None:
        pass

    def on_chunk(self, chunk: Any) -> None:
        pass

    def on_end(self, outcome: Any) -> None:
        self.count += 1
        if self.count == 2:
            self.two.set()

    def on_error(self, exc: BaseException | None) -> None:
        pass


@pytest.mark.anyio
async def test_a_server_that_dies_mid_run_fails_the_rest_and_the_run_goes_on(
    client_backend: Backend,
) -> None:
    config = BenchConfig(concurrency=2, requests=30, output_tokens=10)
    finished = _Finished()
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(replay_server(tokens=10, rate=200.0))  # ~50 ms a request

        async def kill_after_some_requests() -> None:
            # Two streams ended on the client's side: a kill can no longer lose their bytes.
            await finished.two.wait()
            await anyio.to_thread.run_sync(stack.close)  # SIGTERM, reaped

        async with (
            AsyncLlamaClient(url, backend=client_backend, instrumentation=finished) as client,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(kill_after_some_requests)
            result = await run_bench(client, config, progress=False)
    m = result.metrics
    assert len(result.records) == 30  # every request was tried and recorded
    assert m.requests_completed >= 2
    assert m.requests_failed >= 20
    assert m.requests_completed + m.requests_failed == 30
    assert sum(result.errors.values()) == m.requests_failed
    assert all(r.error for r in result.records if not r.ok)
    assert m.ttft_ms.count == m.requests_completed  # failed requests stay out of latencies
    text = result.summary_text()
    assert f"{m.requests_failed} failed" in text
    assert "errors:" in text


@pytest.mark.anyio
async def test_cancelling_a_run_closes_every_stream_and_leaves_no_task(
    replay_url: str, client_backend: Backend
) -> None:
    # Streams that stall after their first token: the run can only end by cancellation.
    config = BenchConfig(
        concurrency=4, requests=8, output_tokens=5, params={"_replay_fault": "stall"}
    )
    before = await _astats(replay_url)
    on_asyncio = sniffio.current_async_library() == "asyncio"
    tasks_before = set(asyncio.all_tasks()) if on_asyncio else set()
    async with AsyncLlamaClient(replay_url, backend=client_backend) as client:
        async with anyio.create_task_group() as tg:

            async def bench() -> None:
                # No /metrics polls: their idle keep-alive connection would stay open.
                await run_bench(client, config, progress=True, server_metrics=False)
                pytest.fail("a run of stalled streams ended by itself")

            tg.start_soon(bench)
            # All four streams are open at the server; then cancel, as Ctrl-C would.
            await _wait_for_stat(replay_url, "requests", lambda n: n >= before["requests"] + 4)
            tg.cancel_scope.cancel()
        # Every stream's connection was closed (the server sees each close).
        opened = await _wait_for_stat(
            replay_url, "connections_open", lambda n: n <= before["connections_open"]
        )
        assert opened == before["connections_open"]
    if on_asyncio:
        assert set(asyncio.all_tasks()) == tasks_before


_SIGINT_CHILD = """
import sys, anyio
from llamatelemetry_async.bench import BenchConfig, run_bench

async def main() -> None:
    config = BenchConfig(
        concurrency=4, requests=8, output_tokens=5, params={"_replay_fault": "stall"}
    )
    await run_bench(sys.argv[1], config, progress=True)

try:
    anyio.run(main, backend=sys.argv[2])
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
    sys.exit(130)
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_ctrl_c_closes_every_stream_and_raises_keyboard_interrupt(
    replay_url: str, backend: str
) -> None:
    before = _stats(replay_url)
    child = subprocess.Popen(
        with_default_sigint([sys.executable, "-c", _SIGINT_CHILD, replay_url, backend]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while _stats(replay_url)["requests"] < before["requests"] + 4:  # 4 streams open
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the streams never opened"
            time.sleep(0.02)  # polling another process for a condition
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    # KeyboardInterrupt itself, not wrapped in an exception group (trio nests task groups).
    assert (child.returncode, out.strip()) == (130, "KeyboardInterrupt"), err
    deadline = time.monotonic() + 10
    while _stats(replay_url)["connections_open"] > before["connections_open"]:
        assert time.monotonic() < deadline, "a stream was left open"
        time.sleep(0.02)


@pytest.mark.anyio
async def test_progress_bar_goes_to_stderr(
    replay_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await run_bench(replay_url, BenchConfig(requests=5, output_tokens=2), progress=True)
    captured = capsys.readouterr()
    assert "5/5" in captured.err
    assert "bench" in captured.err
    assert captured.out == ""


# --------------------------------------------------------------------- real llama-server
@pytest.mark.anyio
async def test_real_llama_server_every_request_gets_its_tokens(
    llama_server: RunningServer, tmp_path: Path
) -> None:
    config = BenchConfig(
        concurrency=4, requests=8, warmup=2, input_tokens=24, output_tokens=8, ttft_slo_ms=5000
    )
    result = await run_bench(llama_server.url, config, progress=False)
    measured = [r for r in result.records if not r.warmup]
    assert len(measured) == 8
    assert len(result.records) == 10
    for r in result.records:
        assert r.ok, r.error
        assert r.output_tokens == 8
        assert len(r.chunk_times) == 8
        assert r.prompt_tokens == 24  # token-id prompts: the exact length
        assert r.finish_reason == "length"
        assert r.server_predicted_per_second is not None
        assert r.server_predicted_per_second > 0
        assert r.first_byte is not None
        assert r.send <= r.first_byte <= r.chunk_times[0] <= r.end
    assert result.environment["llama_server"].startswith("b")
    assert result.environment["slots"] == 4
    assert result.environment["input_lengths"].startswith("exact")

    paths = await result.save(tmp_path)
    data = json.loads((tmp_path / "result.json").read_text())
    assert data["schema"] == SCHEMA
    assert set(data) >= {"config", "environment", "formulas", "metrics", "records", "errors"}
    assert data["formulas"] == FORMULAS
    assert data["config"]["concurrency"] == 4
    assert data["environment"]["library"].startswith("llamatelemetry_async ")
    assert data["metrics"]["requests_completed"] == 8
    assert data["metrics"]["output_tokens"] == 64
    assert set(data["metrics"]["ttft_ms"]) == {
        "count",
        "mean",
        "std",
        "min",
        "p50",
        "p90",
        "p99",
        "max",
    }
    assert len(data["records"]) == 10
    assert RequestRecord.from_json(data["records"][3]).ttft == pytest.approx(
        result.records[3].ttft, abs=1e-5
    )
    assert {p.name for p in paths} == {"result.json", "ttft.png", "itl.png", "throughput.png"}
    text = result.summary_text()
    for formula in ("TTFT = ", "TPOT = (E2E - TTFT) / (n - 1)", "ITL = ", "E2E = ", "goodput = "):
        assert formula in text


@pytest.mark.anyio
async def test_real_llama_server_chat_and_jsonl_prompts(
    llama_server: RunningServer, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "Once upon a time", "max_tokens": 3}\n'
        '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}\n'
    )
    config = BenchConfig(concurrency=2, requests=4, prompts=load_prompts_jsonl(prompts))
    result = await run_bench(llama_server.url, config, progress=False)
    assert [r.output_tokens for r in result.records] == [3, 5, 3, 5]
    assert all(r.ok for r in result.records)

    chat = BenchConfig(concurrency=2, requests=2, endpoint="chat", output_tokens=6)
    result = await run_bench(llama_server.url, chat, progress=False)
    assert [r.output_tokens for r in result.records] == [6, 6]
    assert result.environment["input_lengths"].startswith("approximate")


@pytest.mark.anyio
async def test_engine_started_by_the_benchmark_with_its_gpu_samples(
    tiny_model: Path, tmp_path: Path
) -> None:
    # A fake NVML stands in for the GPUs of this CPU machine; the servers run on the CPU.
    nvml = FakeNVML([FakeGPU(power_w=250.0, utilization=80), FakeGPU(power_w=120.0)])
    sampler = GPUSampler(interval=0.02, nvml=nvml)
    engine = AsyncEngine(
        tiny_model,
        placement=Placement.cpu(1),
        server=ServerConfig(n_parallel=2, ctx_size=1024),
        telemetry=False,
        gpu_sampler=sampler,
    )
    config = BenchConfig(concurrency=2, requests=6, input_tokens=16, output_tokens=16)
    result = await run_bench(engine, config, progress=False)  # starts and stops the engine
    assert engine.servers[0].state == ServerState.STOPPED.value  # stopped here, not crashed
    assert result.environment["target"] == "engine"
    assert all(r.ok and r.output_tokens == 16 for r in result.records)
    assert {s.index for s in result.gpu_samples} == {0, 1}
    assert all(s.t >= 0 for s in result.gpu_samples)
    assert "GPU 0 (" in result.summary_text()
    paths = result.plot(tmp_path)
    assert "gpu.png" in {p.name for p in paths}
    _assert_matplotlib_png(tmp_path / "gpu.png")


# --------------------------------------------------------------------- plots
def _assert_matplotlib_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    assert b"Matplotlib" in data  # the Software text chunk matplotlib writes
    assert len(data) > 5_000


def test_plots_are_pngs_drawn_by_matplotlib(tmp_path: Path) -> None:
    samples = tuple(
        GPUSample(index=i, t=0.1 * k, name="fake", utilization_gpu=50.0 + k, power_w=100.0 + i)
        for k in range(20)
        for i in (0, 1)
    )
    result = BenchResult(BenchConfig(), tuple(_timeline()), {}, samples)
    paths = result.plot(tmp_path / "plots")
    assert [p.name for p in paths] == ["ttft.png", "itl.png", "throughput.png", "gpu.png"]
    for path in paths:
        _assert_matplotlib_png(path)


def test_histograms_of_a_heavy_tail_use_a_log_axis() -> None:
    rng = np.random.default_rng(1)
    bulk = rng.normal(20.0, 2.0, size=2000)  # ITLs of ~20 ms
    tail = np.array([1500.0, 2500.0])  # two long stalls
    for values, scale in ((bulk, "linear"), (np.concatenate([bulk, tail, [0.0]]), "log")):
        ax = Figure().add_subplot()
        _histogram(ax, values, Stats.of(values), "ITL (ms)", "gaps", "title")
        assert ax.get_xscale() == scale
        assert ax.get_xlabel().startswith("ITL (ms)")
        assert ax.get_ylabel() == "gaps"
        # Every value is drawn (the one at 0 in the first bin of the log axis).
        assert sum(p.get_height() for p in ax.patches if isinstance(p, Rectangle)) == len(values)


# --------------------------------------------------------------------- JSON schema
_RECORD_KEYS = {
    "index",
    "send",
    "end",
    "first_byte",
    "chunk_times",
    "output_tokens",
    "prompt_tokens",
    "requested_tokens",
    "scheduled",
    "warmup",
    "finish_reason",
    "server_prompt_ms",
    "server_predicted_ms",
    "server_predicted_per_second",
    "error",
    "server_prompt_n",
    "server_cache_n",
    "server_predicted_n",
    "server_predicted_per_token_ms",
    "server",
    "conversation",
    "turn",
}
_METRIC_KEYS = {
    "requests_completed",
    "requests_failed",
    "duration_s",
    "input_tokens",
    "output_tokens",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "goodput",
    "goodput_requests",
    "max_in_flight",
    "ttft_ms",
    "tpot_ms",
    "itl_ms",
    "e2e_ms",
    "server_prompt_ms",
    "server_predicted_per_second",
    "ttft_slo_ms",
    "tpot_slo_ms",
    "server_predicted_per_token_ms",
    "ttft_minus_server_prompt_ms",
    "prompt_cache_hit_rate",
}
_TOP_KEYS = [
    "schema",
    "config",
    "environment",
    "units",
    "formulas",
    "metrics",
    "errors",
    "server",
    "energy",
    "per_server",
    "records",
    "gpu_samples",
]


def test_json_schema_is_pinned_and_documented(tmp_path: Path) -> None:
    # A change to these keys is a change of SCHEMA: bump it and update the guide.
    samples = (GPUSample(index=0, t=0.5, name="fake", utilization_gpu=50.0, power_w=100.0),)
    result = BenchResult(BenchConfig(ttft_slo_ms=150), tuple(_timeline()), {"x": 1}, samples)
    path = result.write_json(tmp_path / "result.json")
    data = json.loads(path.read_text())
    assert list(data) == _TOP_KEYS
    assert data["schema"] == SCHEMA == "llamatelemetry_async.bench/2"
    assert set(data["metrics"]) == _METRIC_KEYS
    assert all(set(r) == _RECORD_KEYS for r in data["records"])
    assert set(data["config"]) == set(BenchConfig.__dataclass_fields__) | {"mode"}
    assert set(data["units"]) == {"records", "metrics", "gpu_samples", "server", "energy"}
    # Written row by row, the file holds the same document as to_json().
    assert data == json.loads(json.dumps(result.to_json()))
    recomputed = compute_metrics(
        [RequestRecord.from_json(r) for r in data["records"]], ttft_slo_ms=150
    )
    assert recomputed == result.metrics
    # Empty rows are still valid JSON.
    empty = BenchResult(BenchConfig(), (), {}, ()).write_json(tmp_path / "empty.json")
    assert json.loads(empty.read_text())["records"] == []
    # The guide names every key a reader meets.
    guide = (ROOT / "docs" / "guides" / "benchmarking.md").read_text()
    documented = set(re.findall(r"`([a-z_0-9]+)`", guide))
    missing = (set(_TOP_KEYS) | _METRIC_KEYS | _RECORD_KEYS) - documented
    assert not missing, f"document these result.json keys in the guide: {sorted(missing)}"


# --------------------------------------------------------------------- prompts and config
def test_jsonl_loader_reads_every_kind_of_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"prompt": "hello", "max_tokens": 4}\n'
        "\n"
        '{"prompt": [1, 2, 3]}\n'
        '{"messages": [{"role": "user", "content": "hi"}]}\n'
    )
    prompts = load_prompts_jsonl(path)
    assert prompts == (
        BenchPrompt("hello", max_tokens=4),
        BenchPrompt((1, 2, 3)),
        BenchPrompt(messages=({"role": "user", "content": "hi"},)),
    )


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"prompt": "unterminated', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"max_tokens": 3}', 'needs exactly one of "prompt" or "messages"'),
        ('{"prompt": "x", "max_tokens": 0}', '"max_tokens" must be an int >= 1'),
        ('{"messages": []}', '"messages" must be a non-empty list'),
    ],
)
def test_jsonl_loader_names_the_bad_line(tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n\n' + line + "\n")
    with pytest.raises(PromptFileError) as info:
        load_prompts_jsonl(path)
    assert info.value.line == 3
    assert info.value.path == path
    assert f"prompts.jsonl:3: {problem}" in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_jsonl_loader_missing_or_empty_file(tmp_path: Path) -> None:
    with pytest.raises(PromptFileError, match="cannot read") as info:
        load_prompts_jsonl(tmp_path / "nope.jsonl")
    assert info.value.line is None
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(PromptFileError, match="no prompts"):
        load_prompts_jsonl(empty)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"requests": None}, "requests"),
        ({"requests": 0}, "requests"),
        ({"concurrency": 0}, "concurrency"),
        ({"rate": -1.0}, "rate"),
        ({"burstiness": 0.0}, "burstiness"),
        ({"duration": math.inf}, "duration"),
        ({"output_tokens": True}, "output_tokens"),
        ({"endpoint": "embeddings"}, "endpoint"),
        ({"ttft_slo_ms": 0}, "ttft_slo_ms"),
        ({"prompts": ()}, "prompts"),
        ({"prompts": (BenchPrompt((1, 2)),), "endpoint": "chat"}, "prompts"),
        # The run sets these itself: n_predict here was a TypeError mid-run.
        ({"params": {"n_predict": 5}}, "params"),
        ({"params": {"max_tokens": 5}}, "params"),
        ({"params": {"prompt": "x"}}, "params"),
        # Every request due at once, with no count to stop at: the run never ended.
        ({"rate": math.inf, "requests": None, "duration": 5.0}, "rate"),
    ],
)
def test_config_refuses_bad_values_naming_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        BenchConfig(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


# --------------------------------------------------------------------- CLI entry and example
def _cli_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench")
    add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.anyio
async def test_cli_run_prints_the_summary_and_writes_the_out_dir(
    paced_replay_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _cli_args(
        [
            "--url",
            paced_replay_url,
            "--concurrency",
            "2",
            "--requests",
            "4",
            "--output-tokens",
            "3",
            "--ttft-slo",
            "1000",
            "--out",
            str(tmp_path),
            "--no-plots",
            "--no-progress",
        ]
    )
    assert await run_from_args(args) == 0
    out = capsys.readouterr().out
    assert "requests: 4 completed, 0 failed" in out
    assert "goodput" in out
    assert [p.name async for p in anyio.Path(tmp_path).iterdir()] == ["result.json"]
    assert json.loads((tmp_path / "result.json").read_text())["config"]["ttft_slo_ms"] == 1000


def test_cli_options_make_the_config() -> None:
    from llamatelemetry_async._cli._bench import config_from_args

    config = config_from_args(_cli_args(["--url", "http://x", "--duration", "5", "--rate", "2"]))
    assert (config.requests, config.duration, config.rate, config.mode) == (None, 5.0, 2.0, "rate")
    config = config_from_args(_cli_args(["--model", "m.gguf", "--concurrency", "3"]))
    assert (config.requests, config.workers, config.mode) == (100, 3, "concurrency")
    # Placements are written as serve writes them (one parser for every command).
    args = _cli_args(["--model", "m.gguf", "--placement", "cpu:2", "--parallel", "3"])
    assert (args.placement, args.parallel) == (Placement.cpu(2), 3)
    assert _cli_args(["--url", "u", "--preset", "kaggle-t4x2"]).placement == (
        Placement.kaggle_t4x2()
    )


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("extra", "field"),
    [(["--parallel", "2"], "parallel"), (["--placement", "cpu:2"], "placement")],
)
async def test_cli_refuses_engine_options_with_a_url(
    paced_replay_url: str, extra: list[str], field: str
) -> None:
    # They used to be dropped without a word: the run went on without them.
    args = _cli_args(["--url", paced_replay_url, "--requests", "1", *extra])
    with pytest.raises(ConfigError) as info:
        await run_from_args(args)
    assert info.value.field == field
    assert "--model" in str(info.value)


@pytest.mark.anyio
async def test_cli_starts_an_engine_on_a_model_with_a_placement(
    tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _cli_args(
        [
            "--model",
            str(tiny_model),
            "--placement",
            "cpu:1",
            "--parallel",
            "2",
            "--ctx-size",
            "512",
            "--concurrency",
            "2",
            "--requests",
            "2",
            "--output-tokens",
            "2",
            "--no-progress",
        ]
    )
    assert await run_from_args(args) == 0
    out = capsys.readouterr().out
    assert "requests: 2 completed, 0 failed" in out
    assert "servers 1, slots each 2" in out
    # The server, and the share of the cores it computes with, are printed before the run.
    assert re.search(r"server cpu0: http://127\.0\.0\.1:\d+ .*\d+ threads? on cores ", out)


def test_load_test_example_writes_json_and_plots(
    llama_server: RunningServer, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "load_test.py"),
            "--url",
            llama_server.url,
            "--concurrency",
            "2",
            "--requests",
            "6",
            "--prompt-tokens",
            "16",
            "--output-tokens",
            "4",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "requests: 6 completed, 0 failed" in done.stdout
    data = json.loads((out / "result.json").read_text())
    assert data["metrics"]["output_tokens"] == 24
    for name in ("ttft.png", "itl.png", "throughput.png"):
        _assert_matplotlib_png(out / name)
