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
from collections.abc import AsyncIterator
from typing import Any

import anyio

from .._errors import APIError, LlamaError, RemoteProtocolError, UsageError
from .._groups import single_error
from .._version import __version__
from ..client import AsyncLlamaClient, RequestMethods, TokenStream
from ..engine import AsyncEngine
from ..gpu import GPUSample, GPUSampler, visible_gpus
from ._config import BenchConfig, BenchPrompt
from ._metrics import RequestRecord
from ._progress import Progress
from ._prompts import WORDS, PromptSource, inter_arrival_times
from ._result import BenchResult

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
            return await _Run(resolved, config, sampler).run(progress)


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

    def __init__(self, target: _Target, config: BenchConfig, sampler: GPUSampler | None) -> None:
        self.target = target
        self.config = config
        self.sampler = sampler
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
        total = config.requests
        async with Progress(show_progress, total, config.duration, lambda: self.done) as bar:
            self.t0 = time.perf_counter()
            mono0 = time.monotonic()
            environment["started_at"] = datetime.datetime.now(datetime.UTC).isoformat()
            if config.warmup:
                bar.describe("warm-up")
                await self._warmup()
            bar.describe("bench")
            if config.duration is not None:
                self.deadline = anyio.current_time() + config.duration
            if config.rate is None:
                await self._fixed_concurrency()
            else:
                await self._arrivals()
            mono1 = time.monotonic()
        samples = self._gpu_samples(mono0, mono1, environment)
        records = tuple(sorted(self.records, key=lambda r: (not r.warmup, r.send)))
        return BenchResult(config, records, environment, samples)

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
        assert self.prompts is not None
        return self.prompts.next()

    # ----------------------------------------------------------------- one request
    async def _request(self, prompt: BenchPrompt, *, warmup: bool, scheduled: float | None) -> None:
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
            )
        )
        if not warmup:
            self.done += 1

    # ----------------------------------------------------------------- context
    async def _vocabulary(self) -> list[int] | None:
        """The token ids of WORDS, or None when the server cannot tokenize."""
        if self.config.prompts is not None:
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


def _local_environment() -> dict[str, Any]:
    """This machine: library, Python, OS and visible GPUs (blocking: NVML, uname)."""
    return {
        "library": f"llamatelemetry_async {__version__}",
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "gpus": [{"index": i, "name": None} for i in visible_gpus()],
    }
