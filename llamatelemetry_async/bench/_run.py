"""``run_bench``: drive a server (a URL, a client or an engine) with a ``BenchConfig``."""

from __future__ import annotations

import array
import contextlib
import dataclasses
import datetime
import math
import platform
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any

import anyio

from .._errors import APIError, LlamaError, RemoteProtocolError, UsageError
from .._groups import single_error
from .._version import __version__
from ..client import AsyncLlamaClient, RequestMethods, TokenStream
from ..engine import AsyncEngine
from ..gpu import GPUSample, GPUSampler, visible_gpus
from ._config import BenchConfig, BenchPrompt, Conversation
from ._metrics import RequestRecord
from ._progress import Progress
from ._prompts import WORDS, PromptSource, inter_arrival_times
from ._result import BenchResult
from ._server_side import Read, ServerWatch, server_summary

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

__all__ = ["run_bench"]

#: What ``run_bench`` drives: a llama-server URL, a client, or an engine.
Target = str | AsyncLlamaClient | AsyncEngine


@dataclasses.dataclass(frozen=True, slots=True)
class _Target:
    """What the run drives: a client or an engine (one method set), and how to name it."""

    kind: str
    url: str | None
    api: RequestMethods
    engine: AsyncEngine | None = None


async def run_bench(
    target: Target,
    config: BenchConfig | None = None,
    *,
    progress: bool = True,
    gpu_sampler: GPUSampler | bool | None = None,
    api_key: str | None = None,
    server_metrics: bool = True,
    trace: bool | TracerProvider = False,
) -> BenchResult:
    """Load ``target`` as ``config`` says; return every request's record and the metrics.

    ``target`` is a llama-server URL (a client is opened and closed here), an
    ``AsyncLlamaClient`` (used as it is), or an ``AsyncEngine``: a running one is used as
    it is, one not yet started is started here and stopped at the end.

    ```python
    async with AsyncEngine("model.gguf") as engine:
        result = await run_bench(engine, BenchConfig(concurrency=8, requests=200))
    print(result.summary_text())
    await result.save("bench-out")  # result.json and PNG plots
    ```

    ``progress`` shows a progress bar on stderr. ``gpu_sampler``: ``None`` takes the
    engine's sampler when it has one; ``True`` runs a ``GPUSampler`` on this machine for
    the run (for a URL served here); or pass a running one. Its samples during the run
    go into the result and its GPU plot. ``api_key`` is sent to a URL target.

    ``server_metrics``: read each server's ``/metrics`` before and after the measured
    requests and poll it and ``/slots`` meanwhile (``BenchResult.server``: prompt tokens
    processed against sent, so the prompt-cache hit rate; requests deferred; KV cache
    usage where the build reports it); a server without ``--metrics`` is noted, not fatal.
    ``trace``: one OpenTelemetry span per request (``bench.request``) from the global
    tracer provider (or the ``TracerProvider`` given), current while the request runs,
    so the client sends its ``traceparent`` and the server's span sits under it.

    A request that fails (any ``LlamaError`` while it streams) is recorded with its error
    and counted as failed; the run goes on. Misuse raises ``UsageError`` or ``ConfigError``.

    Cancelling the run (Ctrl-C, a cancel scope) closes every open stream and ends every
    task of the run before the cancellation goes on; what was measured is dropped.
    """
    config = BenchConfig() if config is None else config
    if not isinstance(config, BenchConfig):
        raise UsageError(f"config must be a BenchConfig, got {type(config).__name__}")
    with single_error():
        async with contextlib.AsyncExitStack() as stack:
            resolved = await stack.enter_async_context(_open_target(target, api_key))
            sampler = await _sampler_for(stack, gpu_sampler, resolved)
            run = _Run(resolved, config, sampler, server_metrics=server_metrics, trace=trace)
            return await run.run(progress)


@contextlib.asynccontextmanager
async def _open_target(target: Target, api_key: str | None) -> AsyncIterator[_Target]:
    if isinstance(target, str):
        async with AsyncLlamaClient(target, api_key=api_key) as client:
            yield _client_target(client, "url")
    elif isinstance(target, AsyncLlamaClient):
        yield _client_target(target, "client")
    elif isinstance(target, AsyncEngine):
        if target.servers:  # started already (or finished: its stream() then says so)
            yield _engine_target(target)
        else:
            async with target:
                yield _engine_target(target)
    else:
        raise UsageError(
            "target must be a llama-server URL, an AsyncLlamaClient or an AsyncEngine, "
            f"got {type(target).__name__}"
        )


def _client_target(client: AsyncLlamaClient, kind: str) -> _Target:
    return _Target(kind, str(client.base_url), client)


def _engine_target(engine: AsyncEngine) -> _Target:
    return _Target("engine", None, engine, engine)


async def _sampler_for(
    stack: contextlib.AsyncExitStack, choice: GPUSampler | bool | None, target: _Target
) -> GPUSampler | None:
    if isinstance(choice, GPUSampler):
        return choice
    if choice is True:
        return await stack.enter_async_context(GPUSampler(interval=0.25))
    if choice is None and target.engine is not None:
        return target.engine.gpu_sampler
    return None


class _Run:
    """One run: warm-up, then the measured load, with records kept in order of sending."""

    def __init__(
        self,
        target: _Target,
        config: BenchConfig,
        sampler: GPUSampler | None,
        *,
        server_metrics: bool = True,
        trace: bool | TracerProvider = False,
        label: str = "bench",
        position: int | None = None,
    ) -> None:
        self.target = target
        self.config = config
        self.sampler = sampler
        self.server_metrics = server_metrics
        self.trace = trace
        self.label = label
        self.position = position
        self.tracer: Any = None
        # An engine's server URLs, to name the server that answered each request.
        self.server_urls: list[tuple[str, str]] = []
        if target.engine is not None:
            self.server_urls = [(s.url.rstrip("/"), s.name) for s in target.engine.servers if s.url]
        self.records: list[RequestRecord] = []
        self.done = 0  # measured requests finished (completed or failed)
        self.issued = 0  # measured requests claimed
        self.sent = 0  # requests started, warm-up included: the next record's index
        self.t0 = 0.0  # perf_counter at the start; every record time is relative to it
        self.deadline = math.inf  # anyio clock
        self.prompts: PromptSource | None = None

    async def run(self, show_progress: bool) -> BenchResult:
        config = self.config
        environment = await self._environment()
        vocabulary = await self._vocabulary()
        prompts = self.prompts = PromptSource(config, vocabulary)
        environment["input_lengths"] = prompts.describe()
        if self.trace is not False:
            from opentelemetry import trace

            provider = None if self.trace is True else self.trace
            self.tracer = trace.get_tracer("llamatelemetry_async.bench", tracer_provider=provider)
        total = config.requests
        watch = ServerWatch(self._server_reads()) if self.server_metrics else None
        bar_ = Progress(
            show_progress, total, config.duration, lambda: self.done, position=self.position
        )
        async with bar_ as bar:
            self.t0 = time.perf_counter()
            mono0 = time.monotonic()
            environment["started_at"] = datetime.datetime.now(datetime.UTC).isoformat()
            if config.warmup:
                bar.describe(f"{self.label} warm-up")
                await self._warmup()
            bar.describe(self.label)
            async with watch.watch() if watch is not None else contextlib.nullcontext():
                measured0 = time.monotonic()
                # GPU samples at the very edges of the measured requests: a short point
                # gets its energy from two counter readings, whatever the sampling period.
                await self._sample_gpus()
                if config.duration is not None:
                    self.deadline = anyio.current_time() + config.duration
                if config.conversations is not None:
                    await self._conversations(config.conversations)
                elif config.rate is None:
                    await self._fixed_concurrency()
                else:
                    await self._arrivals()
                await self._sample_gpus()
                mono1 = time.monotonic()
        samples = self._gpu_samples(mono0, mono1, environment)
        environment["measured_from_s"] = round(measured0 - mono0, 6)
        records = tuple(sorted(self.records, key=lambda r: (not r.warmup, r.send)))
        server: dict[str, Any] = {}
        if watch is not None:
            sent = sum(r.prompt_tokens or 0 for r in records if not r.warmup)
            server = server_summary(watch.summaries(), sent)
        return BenchResult(config, records, environment, samples, server)

    async def _sample_gpus(self) -> None:
        if self.sampler is not None and self.sampler.available:
            await self.sampler.sample_now()

    def _server_reads(self) -> list[tuple[str, Read, Read]]:
        target = self.target
        engine = target.engine
        if engine is None:
            api = target.api
            return [(target.url or target.kind, api.metrics, api.slots)]
        reads = _EngineReads(engine)
        return [
            (s.name, reads.reader(s.name, "metrics"), reads.reader(s.name, "slots"))
            for s in engine.servers
        ]

    # ----------------------------------------------------------------- load shapes
    async def _warmup(self) -> None:
        count = self.config.warmup
        claimed = 0

        async def worker() -> None:
            nonlocal claimed
            while claimed < count:
                claimed += 1
                await self._request(self._next_prompt(), warmup=True, scheduled=None)

        with single_error():  # one failure (or Ctrl-C on trio) rises as itself
            async with anyio.create_task_group() as tg:
                for _ in range(min(count, self.config.workers or count)):
                    tg.start_soon(worker)

    def _claim(self, at: float | None = None) -> bool:
        """Take the next measured request, unless the count or the deadline is reached.

        ``at``: when the request is due (anyio clock). Nothing is sent at or after the
        deadline, whether it is due then or only reached then (a loop running late).
        """
        requests = self.config.requests
        if requests is not None and self.issued >= requests:
            return False
        now = anyio.current_time()
        if max(now, now if at is None else at) >= self.deadline:
            return False
        self.issued += 1
        return True

    def _claim_turns(self, count: int) -> int:
        """Take up to ``count`` measured requests at once (a conversation's turns)."""
        if not self._claim():
            return 0
        taken = 1
        requests = self.config.requests
        while taken < count and (requests is None or self.issued < requests):
            self.issued += 1
            taken += 1
        return taken

    async def _fixed_concurrency(self) -> None:
        async def worker() -> None:
            while self._claim():
                await self._request(self._next_prompt(), warmup=False, scheduled=None)

        workers = self.config.workers or 1
        if self.config.requests is not None:
            workers = min(workers, self.config.requests)
        with single_error():
            async with anyio.create_task_group() as tg:
                for _ in range(workers):
                    tg.start_soon(worker)

    async def _arrivals(self) -> None:
        import numpy as np

        config = self.config
        assert config.rate is not None
        rng = np.random.default_rng(config.seed)
        gaps = inter_arrival_times(config.rate, config.burstiness, rng)
        # A semaphore, not a limiter: the arrival loop takes a slot, the request gives it back.
        slots = anyio.Semaphore(config.workers) if config.workers else None
        # The schedule on the anyio clock (to sleep until) and, offset, on the records' clock.
        start = due = anyio.current_time()
        offset = time.perf_counter() - self.t0 - start
        with single_error():
            async with anyio.create_task_group() as tg:
                while self._claim(at=due):
                    await anyio.sleep_until(due)  # absolute times: arrivals never drift
                    if slots is not None:
                        # A request due while every slot is busy waits here, in order, and
                        # the arrivals behind it too: no queue of waiting tasks builds up.
                        # Its TTFT counts from its send; ``scheduled`` keeps when it was due.
                        await slots.acquire()
                        if anyio.current_time() >= self.deadline:
                            slots.release()  # the wait ran into the deadline: not sent
                            self.issued -= 1
                            break
                    tg.start_soon(self._arrival, slots, self._next_prompt(), due + offset)
                    due += next(gaps)

    async def _arrival(
        self, slots: anyio.Semaphore | None, prompt: BenchPrompt, scheduled: float
    ) -> None:
        try:
            await self._request(prompt, warmup=False, scheduled=scheduled)
        finally:
            if slots is not None:
                slots.release()

    def _next_prompt(self) -> BenchPrompt:
        conversations = self.config.conversations
        if conversations is not None:  # warm-up: the first turns, one request each
            conversation = conversations[self.sent % len(conversations)]
            return _turn_prompt(conversation, [], 0)
        assert self.prompts is not None
        return self.prompts.next()

    async def _conversations(self, conversations: tuple[Conversation, ...]) -> None:
        """Replay conversations turn by turn: each worker plays one whole conversation
        at a time, each turn sent once the previous answer has ended, carrying it."""
        started = 0

        async def worker() -> None:
            nonlocal started
            while True:
                number, started = started, started + 1
                conversation = conversations[number % len(conversations)]
                answers: list[str] = []
                # The whole conversation's requests are taken at once, so that a count
                # ends with whole conversations, not with turns cut from several.
                turns = self._claim_turns(len(conversation.turns))
                for turn in range(turns):
                    if turn and anyio.current_time() >= self.deadline:
                        self.issued -= turns - turn  # not sent: give the claims back
                        return
                    prompt = _turn_prompt(conversation, answers, turn)
                    text = await self._request(
                        prompt,
                        warmup=False,
                        scheduled=None,
                        conversation=number,
                        turn=turn,
                    )
                    if text is None:
                        self.issued -= turns - turn - 1  # the rest cannot follow a failure
                        break
                    answers.append(text)
                if not turns:
                    return

        workers = self.config.workers or 1
        with single_error():
            async with anyio.create_task_group() as tg:
                for _ in range(workers):
                    tg.start_soon(worker)

    # ----------------------------------------------------------------- one request
    async def _request(
        self,
        prompt: BenchPrompt,
        *,
        warmup: bool,
        scheduled: float | None,
        conversation: int | None = None,
        turn: int | None = None,
    ) -> str | None:
        """Send one request and record it; return its text (``None`` if it failed)."""
        if self.tracer is None:
            return await self._send(prompt, warmup, scheduled, conversation, turn)
        attributes = {"bench.warmup": warmup, "bench.label": self.label}
        if conversation is not None:
            attributes["bench.conversation"] = conversation
            attributes["bench.turn"] = turn if turn is not None else 0
        with self.tracer.start_as_current_span("bench.request", attributes=attributes) as span:
            text = await self._send(prompt, warmup, scheduled, conversation, turn)
            if text is None:
                from opentelemetry.trace import Status, StatusCode

                span.set_status(Status(StatusCode.ERROR, self.records[-1].error))
            return text

    async def _send(
        self,
        prompt: BenchPrompt,
        warmup: bool,
        scheduled: float | None,
        conversation: int | None,
        turn: int | None,
    ) -> str | None:
        config, target = self.config, self.target
        max_tokens = prompt.max_tokens or config.output_tokens
        params: dict[str, Any] = dict(config.params)
        if config.ignore_eos:
            params["ignore_eos"] = True
        if prompt.messages is not None or config.endpoint == "chat":
            messages = prompt.messages or ({"role": "user", "content": prompt.prompt},)
            stream: TokenStream[Any] = target.api.stream_chat(
                messages, max_tokens=max_tokens, **params
            )
        else:
            assert prompt.prompt is not None  # a BenchPrompt without messages has a prompt
            stream = target.api.stream(prompt.prompt, n_predict=max_tokens, **params)
        index, self.sent = self.sent, self.sent + 1
        clock = time.perf_counter
        times = array.array("d")  # 8 bytes a chunk, no float object kept
        append = times.append
        first_byte: float | None = None
        error: str | None = None
        send = clock()
        try:
            async with stream:
                first_byte = clock()
                async for _ in stream:
                    append(clock())
        except LlamaError as exc:  # the request failed: recorded, and the run goes on
            error = f"{type(exc).__name__}: {exc}"
        end = clock()
        t0 = self.t0
        usage, timings = stream.usage, stream.timings
        server = None
        if self.server_urls:
            url = stream.url
            # base + "/": port 4123 must not claim a request to port 41234.
            server = next(
                (name for base, name in self.server_urls if url.startswith(base + "/")), url
            )
        self.records.append(
            RequestRecord(
                index=index,
                send=send - t0,
                end=end - t0,
                first_byte=None if first_byte is None else first_byte - t0,
                chunk_times=array.array("d", [t - t0 for t in times]),
                output_tokens=usage.completion_tokens if usage is not None else len(times),
                prompt_tokens=usage.prompt_tokens if usage is not None else None,
                requested_tokens=max_tokens,
                scheduled=scheduled,
                warmup=warmup,
                finish_reason=stream.finish_reason,
                server_prompt_ms=timings.prompt_ms if timings is not None else None,
                server_predicted_ms=timings.predicted_ms if timings is not None else None,
                server_predicted_per_second=(
                    timings.predicted_per_second if timings is not None else None
                ),
                error=error,
                server_prompt_n=timings.prompt_n if timings is not None else None,
                server_cache_n=timings.cache_n if timings is not None else None,
                server_predicted_n=timings.predicted_n if timings is not None else None,
                server_predicted_per_token_ms=(
                    timings.predicted_per_token_ms if timings is not None else None
                ),
                server=server,
                conversation=conversation,
                turn=turn,
            )
        )
        if not warmup:
            self.done += 1
        return stream.text if error is None else None

    # ----------------------------------------------------------------- context
    async def _vocabulary(self) -> list[int] | None:
        """The token ids of WORDS, or None when the server cannot tokenize."""
        if self.config.prompts is not None or self.config.conversations is not None:
            return None
        try:
            return await self.target.api.tokenize(" " + " ".join(WORDS))
        except (APIError, RemoteProtocolError):  # not a llama-server: approximate lengths
            return None

    async def _environment(self) -> dict[str, Any]:
        env: dict[str, Any] = await anyio.to_thread.run_sync(_local_environment)
        target = self.target
        env["target"] = target.kind
        env["url"] = target.url
        if target.engine is not None:
            env["servers"] = [
                {"name": s.name, "url": s.url, "gpus": list(s.gpus), "slots": s.slots}
                for s in target.engine.servers
            ]
            env["model"] = target.engine.model_name
        env["llama_server"] = None
        try:
            props = await target.api.props()
        except (APIError, RemoteProtocolError) as exc:  # not every server has /props
            env["props_error"] = f"{type(exc).__name__}: {exc}"
        else:
            env["llama_server"] = props.get("build_info")
            model = props.get("model_alias") or props.get("model_path")
            env.setdefault("model", str(model).rsplit("/", 1)[-1] if model else None)
            env["slots"] = props.get("total_slots")
        return env

    def _gpu_samples(
        self, mono0: float, mono1: float, environment: dict[str, Any]
    ) -> tuple[GPUSample, ...]:
        sampler = self.sampler
        if sampler is None:
            environment["gpu_sampler"] = "none"
            return ()
        if not sampler.available and not sampler.ticks:
            environment["gpu_sampler"] = sampler.reason or "unavailable"
            return ()
        window = sampler.window(mono0, mono1)
        samples = sorted(
            (dataclasses.replace(s, t=s.t - mono0) for ring in window.values() for s in ring),
            key=lambda s: (s.t, s.index),
        )
        environment["gpu_sampler"] = f"{len(samples)} samples every {sampler.interval:g} s"
        names = {s.index: s.name for s in samples}
        environment["gpus"] = [{"index": i, "name": names.get(i)} for i in sampler.gpus]
        return tuple(samples)


def _turn_prompt(conversation: Conversation, answers: list[str], turn: int) -> BenchPrompt:
    """Turn ``turn`` of ``conversation``: every earlier turn with its answer, then this one."""
    messages: list[dict[str, str]] = []
    if conversation.system is not None:
        messages.append({"role": "system", "content": conversation.system})
    for k in range(turn):
        messages.append({"role": "user", "content": conversation.turns[k]})
        messages.append({"role": "assistant", "content": answers[k]})
    messages.append({"role": "user", "content": conversation.turns[turn]})
    caps = conversation.max_tokens
    return BenchPrompt(messages=tuple(messages), max_tokens=caps[turn] if caps else None)


class _EngineReads:
    """An engine's per-server ``/metrics`` and ``/slots``, one fan-out per poll round."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}

    def reader(self, name: str, what: str) -> Read:
        async def read() -> Any:
            now = anyio.current_time()
            cached = self._cache.get(what)
            if cached is None or now - cached[0] > 0.05:
                values = await self._engine.each_server(
                    lambda c: _read_or_error(c.metrics() if what == "metrics" else c.slots())
                )
                cached = self._cache[what] = (anyio.current_time(), values)
            if name not in cached[1]:
                raise APIError(f"server {name} is not ready")
            value = cached[1][name]
            if isinstance(value, LlamaError):
                raise value
            return value

        return read


async def _read_or_error(read: Awaitable[Any]) -> Any:
    # Each server's failure is its own: each_server raises the first failure, which would
    # make every server's reading fail with one server's 404 or restart.
    try:
        return await read
    except LlamaError as exc:
        return exc


def _local_environment() -> dict[str, Any]:
    """This machine: library, Python, OS and visible GPUs (blocking: NVML, uname)."""
    return {
        "library": f"llamatelemetry_async {__version__}",
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "gpus": [{"index": i, "name": None} for i in visible_gpus()],
    }
