"""Many concurrent paced streams: one raw httpx client vs this library, in one run.

Run::

    .venv/bin/python benchmarks/concurrency.py [--streams 1000] [--tokens 50] [--rate 20]
        [--uvloop]

The replay server (``llamatelemetry_async.testing._replay``) runs in its own process and paces
every stream at ``--rate`` tokens/s, so the ideal wall time is ``tokens / rate`` (2.5 s by
default). For each arm: wall time over ideal, errors, tokens received (must be streams x
tokens) and event-loop lag, measured by a 1 ms ticker task as actual minus expected wake-up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import resource
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

PROMPT = "Tell me a story about a llama who measured its own latency."
TARGET_WALL = 1.15
T = TypeVar("T")
TARGET_LAG_P99_MS = 5.0

# One arm: entered once, then called once per stream; each call returns the tokens it got.
OneStream = Callable[[], Awaitable[int]]
ArmFactory = Callable[[str, argparse.Namespace], AbstractAsyncContextManager[OneStream]]


@dataclass
class Result:
    """What one arm did."""

    name: str
    wall: float = 0.0
    tokens: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    lags_ms: list[float] = field(default_factory=list)
    connections: int = 0
    server_late_p99: float = 0.0
    server_late_max: float = 0.0
    server_cpu_s: float = 0.0

    def lag(self, q: float) -> float:
        ordered = sorted(self.lags_ms)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _bootstrap_path() -> None:
    """Let ``python benchmarks/x.py`` import the package from a checkout that is not installed."""
    if importlib.util.find_spec("llamatelemetry_async") is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft open-files limit toward the hard one; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- arms ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def raw_httpx(url: str, args: argparse.Namespace) -> AsyncIterator[OneStream]:
    """(a) One ``httpx.AsyncClient`` with a pool big enough for every stream."""
    limits = httpx.Limits(max_connections=args.streams + 10)
    body = {"prompt": PROMPT, "n_predict": args.tokens, "stream": True}
    async with httpx.AsyncClient(limits=limits, timeout=args.timeout) as client:

        async def once() -> int:
            n = 0
            async with client.stream("POST", url + "/completion", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and not json.loads(line[6:]).get("stop"):
                        n += 1
            return n

        yield once


@contextlib.asynccontextmanager
async def library(url: str, args: argparse.Namespace) -> AsyncIterator[OneStream]:
    """(b) This library's ``AsyncLlamaClient``, with its defaults."""
    from llamatelemetry_async import AsyncLlamaClient

    async with AsyncLlamaClient(url) as client:

        async def once() -> int:
            n = 0
            async with client.stream_completion(PROMPT, n_predict=args.tokens) as stream:
                async for chunk in stream:
                    if chunk.text:
                        n += 1
            return n

        yield once


class _FloorProtocol(asyncio.Protocol):
    """One bare HTTP/1.1 stream: count SSE events until the chunked terminator."""

    def __init__(self, done: asyncio.Future[int]) -> None:
        self.done = done
        self.tail = b""
        self.events = 0

    def data_received(self, data: bytes) -> None:
        data = self.tail + data
        # An event ends with a blank line; the last, incomplete piece waits for more bytes.
        *events, self.tail = data.split(b"\n\n")
        self.events += len(events)
        if self.tail.endswith(b"0\r\n\r\n") and not self.done.done():
            self.done.set_result(self.events)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("closed before the end"))


@contextlib.asynccontextmanager
async def floor(url: str, args: argparse.Namespace) -> AsyncIterator[OneStream]:
    """(f) The floor: a bare asyncio ``Protocol`` per stream, no HTTP library at all."""
    host, _, port = url.removeprefix("http://").rpartition(":")
    body = json.dumps({"prompt": PROMPT, "n_predict": args.tokens, "stream": True}).encode()
    request = (
        b"POST /completion HTTP/1.1\r\nHost: %b\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (host.encode(), len(body), body)
    )
    loop = asyncio.get_running_loop()

    async def once() -> int:
        done: asyncio.Future[int] = loop.create_future()
        transport, _ = await loop.create_connection(lambda: _FloorProtocol(done), host, int(port))
        try:
            transport.write(request)
            events = await asyncio.wait_for(done, args.timeout)
        finally:
            transport.close()
        return events - 1  # the last event is the stop event, not a token

    yield once


# -- measurement -----------------------------------------------------------------------------


async def _ticker(lags_ms: list[float]) -> None:
    """Sleep 1 ms at a time and record how late each wake-up is."""
    loop = asyncio.get_running_loop()
    while True:
        expected = loop.time() + 0.001
        await asyncio.sleep(0.001)
        lags_ms.append((loop.time() - expected) * 1000.0)


async def run_arm(name: str, factory: ArmFactory, url: str, args: argparse.Namespace) -> Result:
    """Run ``args.streams`` streams at once through one arm and measure them."""
    result = Result(name)

    async def guarded(once: OneStream) -> int:
        # Count failures instead of stopping at the first: the error rate is a result.
        try:
            return await once()
        except Exception as exc:
            result.errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
            return 0

    async with factory(url, args) as once:
        # One short stream first, so imports and first-use set-up are not timed.
        warm = argparse.Namespace(**{**vars(args), "tokens": 1})
        async with factory(url, warm) as warm_once:
            await warm_once()
        ticker = asyncio.create_task(_ticker(result.lags_ms))
        try:
            start = time.perf_counter()
            counts = await asyncio.gather(*(guarded(once) for _ in range(args.streams)))
            result.wall = time.perf_counter() - start
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
    result.tokens = sum(counts)
    return result


async def server_stats(url: str) -> dict[str, float]:
    """The replay server's counters, starting its pacing figures afresh (one connection)."""
    async with httpx.AsyncClient(timeout=10) as client:
        stats: dict[str, float] = (await client.get(url + "/stats?reset=1")).json()
        return stats


async def settle(url: str, timeout: float = 15.0) -> dict[str, float]:
    """Wait until the server has no connection open but the one asking (between arms)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            stats: dict[str, float] = (await client.get(url + "/stats")).json()
            if stats["connections_open"] <= 1 or time.monotonic() > deadline:
                return stats
            await asyncio.sleep(0.1)


def run(coro: Coroutine[Any, Any, T], use_uvloop: bool) -> T:
    """Run one coroutine on a fresh event loop (uvloop's when asked)."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if use_uvloop:
        loop_factory = importlib.import_module("uvloop").new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro)


def print_results(results: list[Result], args: argparse.Namespace, ideal: float) -> None:
    expected = args.streams * args.tokens
    print(
        f"\n### {args.streams} streams x {args.tokens} tokens at {args.rate:g} tokens/s "
        f"(ideal {ideal:.2f} s), {'uvloop' if args.uvloop else 'asyncio'} loop\n"
    )
    print(
        "| arm | wall s | wall / ideal | errors | tokens | lag p50 ms | lag p99 ms | lag max ms "
        "| connections | targets met | server late p99 / max ms | server CPU µs/token |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for r in results:
        ratio = r.wall / ideal
        errors = sum(r.errors.values())
        met = ratio <= TARGET_WALL and errors == 0 and r.lag(0.99) <= TARGET_LAG_P99_MS
        met = met and r.tokens == expected
        print(
            f"| {r.name} | {r.wall:.2f} | {ratio:.2f}x | {errors} | {r.tokens} "
            f"| {r.lag(0.5):.2f} | {r.lag(0.99):.2f} | {max(r.lags_ms, default=0.0):.1f} "
            f"| {r.connections} | {'yes' if met else '**no**'} "
            f"| {r.server_late_p99:.2f} / {r.server_late_max:.1f} "
            f"| {r.server_cpu_s / max(r.tokens, 1) * 1e6:.1f} |"
        )
    print(f"| target | | <= {TARGET_WALL}x | 0 | {expected} | | <= {TARGET_LAG_P99_MS} | | | | | |")
    print(
        "\nserver late: how far behind its deadlines the replay server (its own process) wrote "
        "paced tokens, and the CPU it spent per token (connection set-up included); small "
        "values mean the client, not the server, set the pace."
    )
    for r in results[1:]:
        if r.wall > 0:
            print(f"- wall time, {results[0].name} / {r.name}: {results[0].wall / r.wall:.2f}x")
    for r in results:
        for message, count in r.errors.most_common(5):
            print(f"- {r.name}: {count} x {message}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=50, help="tokens per stream")
    parser.add_argument("--rate", type=float, default=20.0, help="tokens/s per stream")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, s")
    parser.add_argument("--uvloop", action="store_true", help="run the client on uvloop")
    parser.add_argument(
        "--arms",
        default="a,b",
        help="comma-separated arms: a (raw httpx), b (this library), f (bare asyncio floor)",
    )
    args = parser.parse_args()
    if args.rate <= 0:
        parser.error("--rate must be positive: the ideal wall time is tokens / rate")
    if args.uvloop and importlib.util.find_spec("uvloop") is None:
        parser.error("--uvloop needs uvloop installed")

    _bootstrap_path()
    from llamatelemetry_async.testing._replay import replay_server

    limit = raise_fd_limit(args.streams * 2 + 100)
    # The replay server inherits the raised limit; it needs one descriptor per stream too.
    if limit < args.streams + 100:
        print(f"warning: open-files limit {limit} is low for {args.streams} streams")

    arms: list[tuple[str, ArmFactory]] = []
    wanted = {a.strip() for a in args.arms.split(",")}
    if "a" in wanted:
        arms.append(("(a) raw httpx, one AsyncClient", raw_httpx))
    if "f" in wanted:
        arms.append(("(f) floor: bare asyncio Protocol", floor))
    if "b" in wanted:
        try:
            from llamatelemetry_async import AsyncLlamaClient  # noqa: F401
        except ImportError as exc:
            print(f"note: arm (b) skipped: this library's client does not import yet ({exc})")
        else:
            arms.append(("(b) this library", library))

    ideal = args.tokens / args.rate
    results: list[Result] = []
    with replay_server(tokens=args.tokens, rate=args.rate) as url:
        for name, factory in arms:
            before = run(server_stats(url), args.uvloop)
            result = run(run_arm(name, factory, url, args), args.uvloop)
            after = run(settle(url), args.uvloop)
            # Connections the arm opened, less the warm-up's and the one settle() used.
            opened = after["connections_opened"] - before["connections_opened"] - 2
            result.connections = int(opened)
            result.server_late_p99 = after["pacing_late_p99_ms"]
            result.server_late_max = after["pacing_late_max_ms"]
            result.server_cpu_s = after["process_cpu_s"] - before["process_cpu_s"]
            results.append(result)
    print_results(results, args, ideal)
    return 0


if __name__ == "__main__":
    sys.exit(main())
