"""The clients under test and how one run of them is measured, shared by the benchmarks.

An *arm* is one client: a factory that, entered once per run, yields ``once(tokens)``, which
streams one request asking for ``tokens`` tokens and returns how many it received. The arms:

========== =========================================================================
``raw``    one ``httpx.AsyncClient`` (pool sized for the run), ``aiter_lines`` +
           ``json.loads``, ``/completion``
``openai`` openai-python ``AsyncOpenAI`` chat stream, ``/v1/chat/completions``
``lib``    this library's ``stream``, no instrumentation
``chat``   this library's ``stream_chat`` (like for like with ``openai``)
``traced`` ``lib`` with tracing on: a span per request, token events off
``events`` ``lib`` with tracing on and a span event per token (``TokenEvents.all``)
``floor``  a bare asyncio ``Protocol`` per stream, no HTTP library (the floor)
========== =========================================================================

The two tracing arms use ``setup_telemetry`` with the SDK doing its real work (spans through
a ``BatchSpanProcessor``, GenAI histograms) but exporting into memory
(``InMemorySpanExporter``, ``InMemoryMetricReader``), emptied after each run outside the
timing, so the cost of a network exporter does not swamp the client's.

:func:`measure` runs one arm at a given concurrency and records process CPU time
(``time.process_time``: the server is another process), wall time, errors, and optionally
event-loop lag (a 1 ms ticker task) and a ``GPUSampler`` on a fake NVML whose calls take as
long as they did on an H100 (``NVML_CALL_SECONDS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import importlib
import importlib.util
import json
import os
import resource
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import httpx

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from llamatelemetry_async.client._observe import Instrumentation
    from llamatelemetry_async.gpu import GPUSampler
    from llamatelemetry_async.telemetry import Telemetry

PROMPT: Final = "Tell me a story about a llama who measured its own latency."
T = TypeVar("T")

# One stream: ask for this many tokens, return how many arrived.
OneStream = Callable[[int], Awaitable[int]]


@dataclasses.dataclass(frozen=True)
class Load:
    """What one run asks of an arm: ``concurrency`` workers, each streaming ``repeat``
    requests of ``tokens`` tokens one after another."""

    tokens: int
    concurrency: int = 1
    repeat: int = 1
    timeout: float = 120.0


ArmFactory = Callable[[str, Load], AbstractAsyncContextManager[OneStream]]


@dataclasses.dataclass
class Arm:
    """A client under test."""

    key: str
    name: str
    endpoint: str
    factory: ArmFactory
    library: bool = False  # this library's client: also measured beside the GPU sampler
    # Called after each run, outside the timing; returns counts to record (spans exported).
    after_run: Callable[[], dict[str, int]] | None = None
    close: Callable[[], None] | None = None  # once, when the benchmark ends


def bootstrap_path() -> None:
    """Let ``python benchmarks/x.py`` import the package from a checkout that is not
    installed, here and in the processes it starts (servers' helpers, Ray workers)."""
    if importlib.util.find_spec("llamatelemetry_async") is None:
        root = str(Path(__file__).resolve().parents[1])
        sys.path.insert(0, root)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH")) if p
        )


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft open-files limit toward the hard one; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclasses.dataclass(frozen=True)
class CPUSplit:
    """One CPU for the client (this process's threads), the others for the server process.

    On a small machine the kernel tends to put a server woken by its client on the client's
    CPU; then the server's work shows up as the client's event-loop lag (measured on 2 cores:
    lag p99 ~7 ms when they shared one, ~1 ms when pinned apart). A server on its own CPUs
    is what a real deployment has (another machine, or a GPU doing the work).
    """

    client: frozenset[int]
    server: frozenset[int]

    @classmethod
    def plan(cls) -> CPUSplit | None:
        """The split, or None with fewer than 2 CPUs or no affinity control here."""
        if not hasattr(os, "sched_setaffinity"):
            return None
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return None
        return cls(frozenset(cpus[:1]), frozenset(cpus[1:]))

    def pin_client(self) -> None:
        """Pin the calling thread (and the threads it starts from now on) to the client CPU."""
        os.sched_setaffinity(0, self.client)

    @contextlib.contextmanager
    def spawning(self, *, pinned: bool = True) -> Iterator[None]:
        """Processes (and threads) started in the block run on the server CPUs, or on every
        CPU with ``pinned=False`` (a child inherits the affinity of the thread that starts it).
        """
        os.sched_setaffinity(0, self.server if pinned else self.client | self.server)
        try:
            yield
        finally:
            os.sched_setaffinity(0, self.client)


def run_loop(coro: Coroutine[Any, Any, T], use_uvloop: bool = False) -> T:
    """Run one coroutine on a fresh event loop (uvloop's when asked)."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if use_uvloop:
        loop_factory = importlib.import_module("uvloop").new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


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


# -- arms ------------------------------------------------------------------------------------


def _completion_body(tokens: int) -> dict[str, Any]:
    # ignore_eos: a real model must not stop early, or per-request costs swamp per-token ones.
    return {"prompt": PROMPT, "n_predict": tokens, "stream": True, "ignore_eos": True}


@contextlib.asynccontextmanager
async def raw_httpx(url: str, load: Load) -> AsyncIterator[OneStream]:
    """One ``httpx.AsyncClient`` with a pool big enough for every stream of the run."""
    limits = httpx.Limits(max_connections=load.concurrency + 10)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(load.timeout)) as client:

        async def once(tokens: int) -> int:
            n = 0
            body = _completion_body(tokens)
            async with client.stream("POST", url + "/completion", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and not json.loads(line[6:]).get("stop"):
                        n += 1
            return n

        yield once


@contextlib.asynccontextmanager
async def openai_chat(url: str, load: Load) -> AsyncIterator[OneStream]:
    """openai-python ``AsyncOpenAI`` chat stream, with its default connection limits."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(
        base_url=url + "/v1", api_key="x", max_retries=0, timeout=load.timeout
    ) as client:

        async def once(tokens: int) -> int:
            n = 0
            stream = await client.chat.completions.create(
                model="any",
                messages=[{"role": "user", "content": PROMPT}],
                max_tokens=tokens,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            async with stream:
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        n += 1
            return n

        yield once


@contextlib.asynccontextmanager
async def library(
    url: str,
    load: Load,
    *,
    chat: bool = False,
    instrumentation: Instrumentation | None = None,
) -> AsyncIterator[OneStream]:
    """This library's ``AsyncLlamaClient`` with its defaults (one client for every stream)."""
    from llamatelemetry_async import AsyncLlamaClient

    async with AsyncLlamaClient(
        url, timeout=load.timeout, instrumentation=instrumentation
    ) as client:

        async def once(tokens: int) -> int:
            n = 0
            async with client.stream(PROMPT, n_predict=tokens, ignore_eos=True) as s:
                async for chunk in s:
                    if chunk.text:
                        n += 1
            return n

        async def once_chat(tokens: int) -> int:
            n = 0
            messages = [{"role": "user", "content": PROMPT}]
            async with client.stream_chat(messages, max_tokens=tokens, ignore_eos=True) as s:
                async for chunk in s:
                    if chunk.text:
                        n += 1
            return n

        yield once_chat if chat else once


class TracedLibrary:
    """This library's client with tracing on, exporting into memory.

    ``events=True``: a span event per token (``TokenEvents.all``); ``False``: token events
    off, so the span, its attributes and the metrics remain. The providers are built once
    (``setup_telemetry`` runs ``llama-server --version`` and asks NVML) and reused by every
    run; ``after_run`` flushes, counts and empties the exporter outside the timing.
    """

    def __init__(self, events: bool) -> None:
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from llamatelemetry_async.telemetry import TokenEvents, setup_telemetry

        self.exporter: InMemorySpanExporter = InMemorySpanExporter()
        self.telemetry: Telemetry = setup_telemetry(
            "bench",
            token_events=TokenEvents.all(max_events=4096) if events else TokenEvents.off(),
            span_exporters=[self.exporter],
            metric_readers=[InMemoryMetricReader()],
        )

    def factory(self, url: str, load: Load) -> AbstractAsyncContextManager[OneStream]:
        return library(url, load, instrumentation=self.telemetry.instrumentation)

    def after_run(self) -> dict[str, int]:
        """Export what the batch processor holds, count it, drop it (memory stays flat)."""
        self.telemetry.tracer_provider.force_flush()
        finished = self.exporter.get_finished_spans()
        self.exporter.clear()
        return {"spans": len(finished), "span_events": sum(len(s.events) for s in finished)}

    def close(self) -> None:
        self.telemetry.shutdown()
        self.exporter.clear()


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
async def floor(url: str, load: Load) -> AsyncIterator[OneStream]:
    """A bare asyncio ``Protocol`` per stream, no HTTP library at all (the floor)."""
    host, _, port = url.removeprefix("http://").rpartition(":")
    loop = asyncio.get_running_loop()

    async def once(tokens: int) -> int:
        body = json.dumps(_completion_body(tokens)).encode()
        request = (
            b"POST /completion HTTP/1.1\r\nHost: %b\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (host.encode(), len(body), body)
        )
        done: asyncio.Future[int] = loop.create_future()
        transport, _ = await loop.create_connection(lambda: _FloorProtocol(done), host, int(port))
        try:
            transport.write(request)
            events = await asyncio.wait_for(done, load.timeout)
        finally:
            transport.close()
        return events - 1  # the last event is the stop event, not a token

    yield once


ARMS: Final = {
    "raw": "raw httpx",
    "openai": "openai-python",
    "lib": "this library, tracing off",
    "chat": "this library, chat, tracing off",
    "traced": "this library, tracing on, token events off",
    "events": "this library, tracing on, event per token",
    "floor": "floor: bare asyncio Protocol",
}


def make_arms(keys: Sequence[str]) -> tuple[list[Arm], list[str]]:
    """Build the arms named by ``keys`` (see ``ARMS``); return them and notes on any skipped."""
    arms: list[Arm] = []
    notes: list[str] = []
    for key in keys:
        name = ARMS[key]
        if key == "raw":
            arms.append(Arm(key, name, "/completion", raw_httpx))
        elif key == "openai":
            if importlib.util.find_spec("openai") is None:
                notes.append("openai arm skipped: openai-python is not installed (extra 'bench')")
                continue
            arms.append(Arm(key, name, "/v1/chat/completions", openai_chat))
        elif key == "lib":
            arms.append(Arm(key, name, "/completion", library, library=True))
        elif key == "chat":
            chat = functools.partial(library, chat=True)
            arms.append(Arm(key, name, "/v1/chat/completions", chat, library=True))
        elif key in ("traced", "events"):
            traced = TracedLibrary(events=key == "events")
            arms.append(
                Arm(
                    key,
                    name,
                    "/completion",
                    traced.factory,
                    library=True,
                    after_run=traced.after_run,
                    close=traced.close,
                )
            )
        elif key == "floor":
            arms.append(Arm(key, name, "/completion", floor))
    return arms, notes


# -- the GPU sampler beside the streams ------------------------------------------------------

# Seconds per NVML call measured on an H100 (../shared/GPU_FACTS.md), by the fake NVML's
# metric names. The fake sleeps that long in the sampler's worker thread, releasing the GIL as
# a real NVML call through ctypes does; time.sleep rounds the microsecond ones up to tens of
# microseconds, which only makes the sampler slower and its thread switches more frequent.
NVML_CALL_SECONDS: Final = {
    "utilization": 1.5e-6,
    "memory": 6.7e-6,
    "power_w": 1.5e-6,
    "power_limit_w": 1.5e-6,
    "energy_j": 3.856e-3,
    "temperature_c": 1.5e-6,
    "sm_clock_mhz": 1.5e-6,
    "memory_clock_mhz": 1.5e-6,
    "throttle_reasons": 1.5e-6,  # not in the table; like the other simple getters
    "ecc_errors": 2.3e-6,
    "pcie_tx_kbps": 20.8e-3,
    "pcie_rx_kbps": 20.8e-3,
    "processes": 8e-6,
}


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """A ``GPUSampler`` over ``gpus`` fake GPUs whose NVML calls take the H100's times.

    With PCIe on, one sample of one GPU spends ~45 ms in NVML, as measured there.
    """

    gpus: int = 2
    interval: float = 0.1
    pcie: bool = True

    def build(self) -> GPUSampler:
        from llamatelemetry_async.gpu import GPUSampler
        from llamatelemetry_async.testing._fake_nvml import FakeGPU, FakeNVML

        fakes = [FakeGPU(block=dict(NVML_CALL_SECONDS)) for _ in range(self.gpus)]
        return GPUSampler(self.interval, pcie=self.pcie, nvml=FakeNVML(fakes))


# -- one measured run ------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """What one arm did in one run."""

    wall: float = 0.0  # seconds, all streams
    cpu: float = 0.0  # seconds of this process's CPU time over the same span
    tokens: int = 0
    expected: int = 0
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    lags_ms: list[float] = dataclasses.field(default_factory=list)
    reads: int = 0  # socket reads, when READS is installed
    sampler_ticks: int = 0  # GPU samples completed during the timing
    exported: dict[str, int] = dataclasses.field(default_factory=dict)  # from Arm.after_run
    gc_full: int = 0  # full (generation 2) garbage collections during the timing
    gc_max_ms: float = 0.0  # the longest collection: it stops the event loop as long
    # The same collections' own CPU time (this thread's): on a shared machine a collection
    # preempted by other processes takes longer in wall time than the collector's work.
    gc_max_cpu_ms: float = 0.0
    gc_collections: int = 0  # collections of every generation during the timing

    @property
    def cpu_us_per_token(self) -> float:
        return self.cpu / self.tokens * 1e6 if self.tokens else float("nan")


async def idle_wake_cost(interval: float, wakes: int = 20) -> float:
    """CPU seconds one idle event loop spends per wake-up after sleeping ``interval``.

    A paced stream at low concurrency wakes the loop once per token; in a VM that wake-up
    alone can cost more CPU than decoding the token, so the tables print it for reference.
    """
    start = time.process_time()
    for _ in range(wakes):
        await asyncio.sleep(interval)
    return (time.process_time() - start) / wakes


@contextlib.contextmanager
def gc_watch(run: Run) -> Iterator[None]:
    """Record in ``run`` the full collections and the longest collection pause in the block.

    A full collection with many live objects (1,000 streams, their spans and events) stops
    the loop for tens of milliseconds: this tells those lag spikes from the client's own.
    """
    started = started_cpu = 0.0

    def callback(phase: str, info: dict[str, int]) -> None:
        nonlocal started, started_cpu
        if phase == "start":
            started = time.perf_counter()
            started_cpu = time.thread_time()
            return
        run.gc_max_ms = max(run.gc_max_ms, (time.perf_counter() - started) * 1000.0)
        run.gc_max_cpu_ms = max(run.gc_max_cpu_ms, (time.thread_time() - started_cpu) * 1000.0)
        run.gc_collections += 1
        if info["generation"] == 2:
            run.gc_full += 1

    gc.callbacks.append(callback)
    try:
        yield
    finally:
        gc.callbacks.remove(callback)


async def ticker(lags_ms: list[float]) -> None:
    """Sleep 1 ms at a time and record how late each wake-up is (the event-loop lag)."""
    loop = asyncio.get_running_loop()
    while True:
        expected = loop.time() + 0.001
        await asyncio.sleep(0.001)
        lags_ms.append((loop.time() - expected) * 1000.0)


def _describe(exc: BaseException) -> str:
    """One line for an error, with its cause (openai wraps httpx's errors in its own)."""
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) not in text:
        text += f" (from {type(cause).__name__}: {cause})"
    return text[:200]


async def measure(
    arm: Arm,
    url: str,
    load: Load,
    *,
    lag: bool = False,
    sampler: SamplerSpec | None = None,
) -> Run:
    """Run ``load`` through ``arm`` once and measure it.

    One 1-token stream through the same client first, so imports and first-use set-up are not
    timed. The timing covers only the streams; with ``lag`` a 1 ms ticker runs beside them,
    with ``sampler`` a GPU sampler too (started before the timing, so its start is not timed).
    """
    run = Run(expected=load.concurrency * load.repeat * load.tokens)

    async def worker(once: OneStream) -> int:
        received = 0
        for _ in range(load.repeat):
            # Count failures instead of stopping at the first: the error rate is a result.
            try:
                n = await once(load.tokens)
            except Exception as exc:
                run.errors[_describe(exc)] += 1
                continue
            if n != load.tokens:
                run.errors[f"stream ended with {n} of {load.tokens} tokens"] += 1
            received += n
        return received

    async with contextlib.AsyncExitStack() as stack:
        once = await stack.enter_async_context(arm.factory(url, load))
        await once(1)
        gpu = await stack.enter_async_context(sampler.build()) if sampler else None
        ticks = 0
        if gpu is not None:
            if not gpu.available:
                raise RuntimeError(f"the fake GPU sampler did not start: {gpu.reason}")
            await gpu.sample_now()  # NVML warm: the timing sees the sampler in steady state
            ticks = gpu.ticks
        tick = asyncio.create_task(ticker(run.lags_ms)) if lag else None
        try:
            reads = READS.count
            with gc_watch(run):
                cpu = time.process_time()
                start = time.perf_counter()
                counts = await asyncio.gather(*(worker(once) for _ in range(load.concurrency)))
                run.wall = time.perf_counter() - start
                run.cpu = time.process_time() - cpu
            run.reads = READS.count - reads
        finally:
            if tick is not None:
                tick.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await tick
        run.sampler_ticks = gpu.ticks - ticks if gpu is not None else 0
    run.tokens = sum(counts)
    return run


# -- talking to the server between runs ------------------------------------------------------


async def server_stats(url: str, *, reset: bool = False) -> dict[str, float]:
    """The replay server's counters (``reset``: start its pacing figures afresh)."""
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url + ("/stats?reset=1" if reset else "/stats"))
        response.raise_for_status()
        stats: dict[str, float] = response.json()
        return stats


async def settle_replay(url: str, timeout: float = 15.0) -> dict[str, float]:
    """Wait until the replay server has no connection open but the one asking."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await server_stats(url)
        if stats["connections_open"] <= 1 or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.1)


async def settle_llama(url: str, timeout: float = 30.0) -> None:
    """Wait until no llama-server slot is processing (``GET /slots``; skipped if disabled)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=10) as client:
        while time.monotonic() < deadline:
            response = await client.get(url + "/slots")
            if response.status_code != 200:
                return
            if not any(slot.get("is_processing") for slot in response.json()):
                return
            await asyncio.sleep(0.1)


def installed_version(distribution: str) -> str:
    """The installed version of ``distribution``, for a benchmark's header line."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"
