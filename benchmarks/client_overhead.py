"""Client CPU per streamed token: raw httpx, openai-python and this library, in one run.

Run::

    .venv/bin/python benchmarks/client_overhead.py [--tokens 200] [--streams 10] [--rounds 7]
        [--llama-server PATH --model PATH]

The replay server (``llamatelemetry_async.testing._replay``, unpaced) runs in its own process,
so only the client's work counts: CPU time of this process (``time.process_time``) divided by
the tokens received, one stream at a time. Arms take turns within each round, so a noisy
neighbour slows them all alike; the table reports the median round. With ``--llama-server``
and ``--model``, arms (a) and (c) are repeated against a real llama-server.

The two "tracing on" arms run this library's client with ``setup_telemetry`` providers that
do the real work (a span per request through a ``BatchSpanProcessor``, GenAI histograms) but
export into memory: one with a span event per token (``TokenEvents.all()``), one with token
events off. The in-memory exporter is flushed and emptied between rounds, outside the timing.

Reading the numbers: unpaced, a client slower than the server finds many tokens per socket
read, and a faster one finds few and pays its per-read cost more often, so CPU per token
also depends on how busy the machine is. ``--count-reads`` adds a reads/token column to
show it; ``--rate 1000`` gives one read per token, where the cost of waking up (large in a
VM) dominates every client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import re
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from llamatelemetry_async.telemetry import Telemetry

PROMPT = "Tell me a story about a llama who measured its own latency."

# One arm: entered once, then called once per stream; each call returns the tokens it got.
OneStream = Callable[[], Awaitable[int]]
ArmFactory = Callable[[str, int], AbstractAsyncContextManager[OneStream]]


@dataclass
class Arm:
    """A client under test and the per-round samples it collected (µs per token)."""

    name: str
    endpoint: str
    factory: ArmFactory
    # Called after each round, outside the timing (e.g. to empty an in-memory exporter).
    between_rounds: Callable[[], None] | None = None
    samples: list[float] = field(default_factory=list)
    reads: list[float] = field(default_factory=list)  # socket reads per token, if counted
    tokens_per_round: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


class ReadCounter:
    """Counts socket reads in this process, to show how many tokens each read carried.

    Why it matters: a client faster than the server finds one or two tokens per read and pays
    its per-read cost (loop turn, parser entry, task wake-up) that often; a slower client finds
    many tokens waiting. CPU per token only compares like with like at similar reads/token.
    """

    def __init__(self) -> None:
        self.count = 0
        self.installed = False

    def install(self) -> None:
        # Patching socket.socket (a Python subclass of _socket.socket) reaches every asyncio
        # transport; it adds the same small cost to every arm.
        for name in ("recv", "recv_into"):
            original = getattr(socket.socket, name)

            def counted(sock: socket.socket, *args: Any, _original: Any = original) -> Any:
                self.count += 1
                return _original(sock, *args)

            setattr(socket.socket, name, counted)
        self.installed = True


READS = ReadCounter()


def _bootstrap_path() -> None:
    """Let ``python benchmarks/x.py`` import the package from a checkout that is not installed."""
    if importlib.util.find_spec("llamatelemetry_async") is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# -- arms ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def raw_httpx(url: str, tokens: int) -> AsyncIterator[OneStream]:
    """(a) One ``httpx.AsyncClient``, ``aiter_lines`` and ``json.loads`` per event."""
    # ignore_eos: a real model must not stop early, or per-request costs swamp per-token ones.
    body = {"prompt": PROMPT, "n_predict": tokens, "stream": True, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as client:

        async def once() -> int:
            n = 0
            async with client.stream("POST", url + "/completion", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        event = json.loads(line[6:])
                        if not event.get("stop"):
                            n += 1
            return n

        yield once


@contextlib.asynccontextmanager
async def openai_chat(url: str, tokens: int) -> AsyncIterator[OneStream]:
    """(b) openai-python ``AsyncOpenAI`` chat stream."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:

        async def once() -> int:
            n = 0
            stream = await client.chat.completions.create(
                model="replay",
                messages=[{"role": "user", "content": PROMPT}],
                max_tokens=tokens,
                stream=True,
            )
            async with stream:
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        n += 1
            return n

        yield once


@contextlib.asynccontextmanager
async def library_completion(url: str, tokens: int) -> AsyncIterator[OneStream]:
    """(c) This library, ``stream_completion`` against ``/completion``."""
    from llamatelemetry_async import AsyncLlamaClient

    async with AsyncLlamaClient(url) as client:

        async def once() -> int:
            n = 0
            async with client.stream_completion(
                PROMPT, n_predict=tokens, ignore_eos=True
            ) as stream:
                async for chunk in stream:
                    if chunk.text:
                        n += 1
            return n

        yield once


@contextlib.asynccontextmanager
async def library_chat(url: str, tokens: int) -> AsyncIterator[OneStream]:
    """(c) This library, ``stream_chat`` against ``/v1/chat/completions``."""
    from llamatelemetry_async import AsyncLlamaClient

    async with AsyncLlamaClient(url) as client:

        async def once() -> int:
            n = 0
            async with client.stream_chat(
                [{"role": "user", "content": PROMPT}], max_tokens=tokens, ignore_eos=True
            ) as stream:
                async for chunk in stream:
                    if chunk.text:
                        n += 1
            return n

        yield once


class TracedLibrary:
    """(c) This library's ``stream_completion`` with tracing on, exporting into memory.

    ``events=True``: a span event per token (``TokenEvents.all``); ``False``: token events
    off, so the span, its attributes and the metrics remain.
    """

    def __init__(self, events: bool) -> None:
        self.events = events
        self._exporter: InMemorySpanExporter | None = None
        self._telemetry: Telemetry | None = None

    @contextlib.asynccontextmanager
    async def factory(self, url: str, tokens: int) -> AsyncIterator[OneStream]:
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from llamatelemetry_async import AsyncLlamaClient
        from llamatelemetry_async.telemetry import TokenEvents, setup_telemetry

        exporter = InMemorySpanExporter()
        telemetry = setup_telemetry(
            "bench",
            token_events=TokenEvents.all(max_events=4096) if self.events else TokenEvents.off(),
            span_exporters=[exporter],
            metric_readers=[InMemoryMetricReader()],
        )
        self._exporter, self._telemetry = exporter, telemetry
        try:
            async with AsyncLlamaClient(url, instrumentation=telemetry.instrumentation) as client:

                async def once() -> int:
                    n = 0
                    async with client.stream_completion(
                        PROMPT, n_predict=tokens, ignore_eos=True
                    ) as stream:
                        async for chunk in stream:
                            if chunk.text:
                                n += 1
                    return n

                yield once
        finally:
            telemetry.shutdown()
            exporter.clear()
            self._exporter = self._telemetry = None

    def between_rounds(self) -> None:
        """Export what the batch processor holds, then drop it, so memory does not grow."""
        if self._telemetry is not None and self._exporter is not None:
            self._telemetry.tracer_provider.force_flush()
            self._exporter.clear()


def traced_arms() -> list[Arm]:
    arms = []
    for name, events in (("event per token", True), ("events off", False)):
        traced = TracedLibrary(events)
        arms.append(
            Arm(
                f"(c) this library, tracing on, {name}",
                "/completion",
                traced.factory,
                between_rounds=traced.between_rounds,
            )
        )
    return arms


def library_available() -> str | None:
    """Return why this library's client cannot be benchmarked, or None when it can."""
    try:
        from llamatelemetry_async import AsyncLlamaClient  # noqa: F401
    except ImportError as exc:
        return f"this library's client does not import yet ({exc})"
    return None


# -- measurement -----------------------------------------------------------------------------


async def run_arms(url: str, arms: list[Arm], args: argparse.Namespace) -> None:
    """Warm every arm up, then run rounds in which the arms take turns."""
    async with contextlib.AsyncExitStack() as stack:
        streams: list[OneStream] = []
        for arm in arms:
            once = await stack.enter_async_context(arm.factory(url, args.tokens))
            for _ in range(args.warmup):
                await once()
            streams.append(once)
        for _ in range(args.rounds):
            for arm, once in zip(arms, streams, strict=True):
                received = 0
                reads = READS.count
                start = time.process_time()
                for _ in range(args.streams):
                    received += await once()
                elapsed = time.process_time() - start
                if received == 0:
                    raise RuntimeError(f"{arm.name}: no tokens received")
                arm.samples.append(elapsed / received * 1e6)
                arm.reads.append((READS.count - reads) / received)
                arm.tokens_per_round = received
                if arm.between_rounds is not None:
                    arm.between_rounds()


def print_table(title: str, arms: list[Arm]) -> None:
    baseline = next((a for a in arms if a.name.startswith("(a)")), None)
    print(f"\n### {title}\n")
    print(
        "| arm | endpoint | µs/token (median) | min | max | reads/token | tokens/round "
        "| vs raw httpx |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for arm in arms:
        ratio = f"{arm.median / baseline.median:.2f}x" if baseline else "-"
        reads = f"{statistics.median(arm.reads):.2f}" if READS.installed else "-"
        print(
            f"| {arm.name} | `{arm.endpoint}` | {arm.median:.1f} | {min(arm.samples):.1f} "
            f"| {max(arm.samples):.1f} | {reads} "
            f"| {arm.tokens_per_round} | {ratio} |"
        )


def print_ratios(arms: list[Arm]) -> None:
    by_name = {arm.name: arm for arm in arms}
    raw = by_name.get("(a) raw httpx")
    openai = by_name.get("(b) openai-python")
    ours = by_name.get("(c) this library")
    ours_chat = by_name.get("(c) this library, chat")
    events_on = by_name.get("(c) this library, tracing on, event per token")
    events_off = by_name.get("(c) this library, tracing on, events off")
    rows: list[tuple[str, str, str, bool | None]] = []
    if raw and ours:
        value = ours.median / raw.median
        rows.append(
            ("this client / raw httpx (`/completion`)", f"{value:.2f}x", "≤ 0.5x", value <= 0.5)
        )
    if raw and events_on:
        value = events_on.median / raw.median
        rows.append(
            ("tracing on, event per token / raw httpx", f"{value:.2f}x", "≤ 0.65x", value <= 0.65)
        )
    if raw and events_off:
        value = events_off.median / raw.median
        rows.append(("tracing on, events off / raw httpx", f"{value:.2f}x", "-", None))
    if events_on and events_off:
        value = events_on.median - events_off.median
        rows.append(("events on - events off (per-event cost)", f"{value:.2f} µs", "-", None))
    if events_off and ours:
        value = events_off.median - ours.median
        rows.append(("events off - tracing off (span + metrics)", f"{value:.2f} µs", "-", None))
    if openai and ours_chat:
        value = openai.median / ours_chat.median
        rows.append(("openai / this client (chat)", f"{value:.2f}x", "≥ 10x", value >= 10))
    if openai and raw:
        rows.append(("openai / raw httpx", f"{openai.median / raw.median:.2f}x", "-", None))
    if not rows:
        return
    print("\n| ratio | value | target | met |")
    print("| --- | ---: | --- | --- |")
    for label, value_text, target, met in rows:
        mark = "-" if met is None else ("yes" if met else "**no**")
        print(f"| {label} | {value_text} | {target} | {mark} |")


# -- real llama-server -----------------------------------------------------------------------

_LISTENING = re.compile(r"listening on (http://[^\s/]+):(\d+)")


@contextlib.contextmanager
def llama_server(binary: str, model: str, timeout: float) -> Iterator[str]:
    """Start llama-server on a free loopback port (-np 1); yield its URL; stop and reap it."""
    from llamatelemetry_async.testing._server import run_llama_server

    with run_llama_server(model, binary=binary, args=["-np", "1"], ready_timeout=timeout) as srv:
        yield srv.url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tokens", type=int, default=200, help="tokens per stream")
    parser.add_argument("--streams", type=int, default=10, help="streams per arm per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3, help="streams per arm before rounds")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="replay pacing, tokens/s per stream (0: unpaced; try 1000 for one read per token)",
    )
    parser.add_argument("--llama-server", metavar="PATH", help="llama-server binary")
    parser.add_argument("--model", metavar="PATH", help="a small GGUF model for llama-server")
    parser.add_argument("--server-timeout", type=float, default=120.0)
    parser.add_argument(
        "--count-reads",
        action="store_true",
        help="count socket reads per token (patches socket.socket; adds a little to every arm)",
    )
    args = parser.parse_args()

    _bootstrap_path()
    from llamatelemetry_async.testing._replay import replay_server

    if args.count_reads:
        READS.install()

    missing = library_available()
    arms = [
        Arm("(a) raw httpx", "/completion", raw_httpx),
        Arm("(b) openai-python", "/v1/chat/completions", openai_chat),
    ]
    if missing is None:
        arms += [
            Arm("(c) this library", "/completion", library_completion),
            Arm("(c) this library, chat", "/v1/chat/completions", library_chat),
            *traced_arms(),
        ]
    print(
        f"client CPU per token: {args.rounds} rounds x {args.streams} streams x "
        f"{args.tokens} tokens per arm, median round; python {sys.version.split()[0]}, "
        f"httpx {httpx.__version__}"
    )
    if missing is not None:
        print(f"\nnote: arm (c) skipped: {missing}")

    with replay_server(tokens=args.tokens, rate=args.rate) as url:
        asyncio.run(run_arms(url, arms, args))
    pacing = f"paced at {args.rate:g} tokens/s" if args.rate > 0 else "unpaced"
    print_table(f"replay server ({pacing}, own process)", arms)
    print_ratios(arms)

    if not (args.llama_server and args.model):
        print("\nnote: real llama-server part skipped (give --llama-server PATH and --model PATH)")
        return 0
    real = [Arm("(a) raw httpx", "/completion", raw_httpx)]
    if missing is None:
        real += [
            Arm("(c) this library", "/completion", library_completion),
            Arm("(c) this library, chat", "/v1/chat/completions", library_chat),
            *traced_arms(),
        ]
    with llama_server(args.llama_server, args.model, args.server_timeout) as url:
        asyncio.run(run_arms(url, real, args))
    print_table(f"real llama-server ({Path(args.model).name}, -np 1)", real)
    print_ratios(real)
    return 0


if __name__ == "__main__":
    sys.exit(main())
