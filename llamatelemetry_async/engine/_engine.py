"""``AsyncEngine``: start one llama-server per GPU (or pair, or CPU), keep them up, route.

Structure: the engine's ``async with`` owns one task group. Each server has a supervisor
task in it that runs the process (``LlamaServer.run``), marks it ready in the router, and
restarts it with capped exponential backoff when it dies. Leaving the block, however it is
left, cancels the supervisors, and each ``LlamaServer.run`` stops and reaps its process in a
shielded scope. Requests go through the router (``_router.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import secrets
import signal
import time
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

import anyio
import anyio.abc
import httpx
import sniffio
from opentelemetry import trace

from .._errors import (
    ClientClosedError,
    ConfigError,
    ConnectError,
    EngineError,
    LlamaError,
    ModelNotFoundError,
    ReadError,
    RemoteProtocolError,
    ServerCrashedError,
    ServerUnavailableError,
    UsageError,
)
from .._groups import single_error
from ..client import (
    DEFAULT_TIMEOUT,
    AsyncLlamaClient,
    ChatChunk,
    ChatCompletion,
    Completion,
    CompletionChunk,
    Message,
    TokenStream,
)
from ..client._client import chat_stream_request, completion_stream_request
from ..client._observe import RequestObserver
from ..client._params import (
    NO_OPTIONS,
    RequestOptions,
    TimeoutTypes,
    chat_messages,
    parse_options,
)
from ..client._stream import Source
from ..gpu import GPUSampler, visible_gpus
from ..models._gguf import inspect_model, with_adapters
from ..models._vram import VRAMPlan, _read_gpu_specs, plan
from ..server import find_llama_server
from ..server._config import ServerConfig, ServerPlan, server_command
from ..server._process import LlamaServer
from ..telemetry import GenAIInstrumentation, MetricsScraper, Telemetry
from ._energy_book import EnergyBook
from ._placement import Placement
from ._router import Member, Router

__all__ = ["AsyncEngine", "ServerInfo"]

logger = logging.getLogger("llamatelemetry_async.engine")

T = TypeVar("T")
ChunkT = TypeVar("ChunkT", CompletionChunk, ChatChunk)
TokenStreamT = TypeVar("TokenStreamT", bound=TokenStream[Any])


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """A snapshot of one server of an engine."""

    name: str
    """The server's name in the placement: ``"gpu0"``, ``"gpu0+1"`` (a pair), ``"cpu0"``."""
    url: str | None
    """Its base URL (``http://127.0.0.1:PORT``); ``None`` until it has bound a port."""
    pid: int | None
    """The llama-server process id; ``None`` while no process runs."""
    gpus: tuple[int, ...]
    """Physical GPU ids it runs on (NVML order); ``()`` on the CPU."""
    state: str
    """``"starting"``, ``"ready"``, ``"crashed"``, ``"stopped"`` (a ``ServerState`` value), or
    ``"unresponsive"`` (running but not answering its health probe: it gets no new requests)
    or ``"failed"`` (its last ``max_start_failures`` starts failed: it is still retried)."""
    slots: int
    """Requests it decodes at once (llama-server's ``total_slots``)."""
    outstanding: int
    """Requests the engine has in flight on it now."""
    served: int
    """Requests the engine has sent it since the engine started."""
    starts: int
    """How many times it was started (1 + restarts)."""
    exit_code: int | None
    """The last exit code, when it has exited (negative: killed by that signal)."""
    recent_logs: tuple[str, ...]
    """Its last output lines, oldest first."""
    last_error: str | None = None
    """Why its last start failed or its last health probe did not pass (``None``: no problem)."""


class _Server:
    """What the engine keeps per server: the process, its router entry, its client."""

    def __init__(self, process: LlamaServer, member: Member) -> None:
        self.process = process
        self.member = member
        self.client: AsyncLlamaClient | None = None
        self.http: httpx.AsyncClient | None = None  # an instrumented one, owned here
        self.start_failures = 0  # consecutive starts that did not reach ready
        self.last_error: str | None = None

    async def close_clients(self) -> None:
        client, self.client = self.client, None
        http, self.http = self.http, None
        if client is not None:
            await client.aclose()
        if http is not None:
            await http.aclose()


class AsyncEngine(anyio.AsyncContextManagerMixin):
    """Start and supervise llama-servers and spread requests over them.

    ```python
    async with AsyncEngine("model.gguf", placement=Placement.cpu(2)) as engine:
        async for chunk in engine.stream("Once upon a time", n_predict=64):
            print(chunk.text, end="")
        reply = await engine.chat([{"role": "user", "content": "hi"}], max_tokens=32)
    ```

    ``model`` is the path of a GGUF file, or (as a string) any spec ``resolve_model``
    takes: a registry name or ``owner/repo:file.gguf`` on the Hugging Face Hub.

    ``placement`` says where servers run (``"auto"``: one per GPU found, else one on the
    CPU); ``server`` configures each of them. On GPUs, the settings ``server`` leaves unset
    among ``n_gpu_layers``, ``ctx_size`` and ``n_parallel`` are chosen per server to fit the
    GPUs' free memory (``models.plan``; ``vram_plan`` holds the plan, the log explains it);
    ``auto_configure=False`` leaves them to llama-server. Every server gets a fresh random API key
    through its environment. When all slots are busy, requests wait in the engine, up to
    ``max_waiting`` of them (``EngineBusyError`` beyond). A server that dies is restarted
    (backoff capped at ``max_restart_delay`` seconds) while requests go to the others.

    Failure bounds, so that nothing waits forever:

    - A server whose last ``max_start_failures`` starts all failed is marked ``"failed"``.
      When every server is failed (or exited for good), waiting and new requests fail with
      ``ServerUnavailableError`` naming each server with its last log lines. The engine keeps
      restarting them in the background; one that comes back takes requests again.
    - Every ``health_interval`` seconds (four times as long while a server is idle) the
      engine probes each ready server's ``/health`` with a one-second limit. One that does not
      answer (a stopped or wedged process) is marked ``"unresponsive"`` and gets no new
      requests until it answers again; unresponsive for ``hang_timeout`` seconds, it is
      killed and restarted, which fails its requests in flight with ``ServerCrashedError``.
      ``health_interval=None`` turns the probe off; ``hang_timeout=None`` never kills.

    ``strict=True`` raises ``UsageError`` for a request keyword that is neither a known
    llama.cpp/OpenAI parameter nor passed through ``extra_body=`` (by default it is sent
    with one ``UnknownParameterWarning`` per name).

    ``gpu_sampler``: ``None`` runs a ``GPUSampler`` when servers run on GPUs, ``True``
    always, ``False`` never (or pass your own). With it, each request's span gets the GPU
    energy it used (split between concurrent requests by token share), joules per token,
    and mean power and utilization while it ran.

    ``telemetry`` (a ``setup_telemetry()`` result) turns each request into a GenAI span with
    per-token events and records GenAI metrics and llama-server's ``/metrics`` (scraped every
    ``metrics_interval`` s). Left ``None``, the application's global providers are used if
    it set any; ``False`` turns telemetry off.

    In a notebook, ``engine = await AsyncEngine(...).start()`` and ``await engine.aclose()``
    work too (asyncio only; under trio use ``async with``).
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        placement: Placement | str = "auto",
        server: ServerConfig | None = None,
        binary: str | os.PathLike[str] | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_waiting: int = 10_000,
        ready_timeout: float = 120.0,
        restart: bool = True,
        max_restart_delay: float = 30.0,
        log_dir: str | os.PathLike[str] | None = None,
        telemetry: Telemetry | bool | None = None,
        metrics_interval: float = 10.0,
        gpu_sampler: GPUSampler | bool | None = None,
        auto_configure: bool = True,
        max_start_failures: int = 3,
        health_interval: float | None = 0.5,
        hang_timeout: float | None = 60.0,
        strict: bool = False,
    ) -> None:
        if server is not None and not isinstance(server, ServerConfig):
            raise ConfigError(
                f"server must be a ServerConfig, not {type(server).__name__}: "
                "pass ServerConfig(**settings)",
                field="server",
            )
        _check_count("max_waiting", max_waiting, minimum=0)
        _check_count("max_start_failures", max_start_failures, minimum=1)
        for name, value in (
            ("ready_timeout", ready_timeout),
            ("max_restart_delay", max_restart_delay),
            ("metrics_interval", metrics_interval),
        ):
            _check_seconds(name, value)
        _check_seconds("health_interval", health_interval, optional=True)
        _check_seconds("hang_timeout", hang_timeout, optional=True)
        if not isinstance(timeout, httpx.Timeout):
            _check_seconds("timeout", timeout)
        self._spec = model
        self.model = Path(model)
        """The model file (a spec is resolved to its local path when the engine starts)."""
        self.model_name = self.model.name
        self._auto_configure = auto_configure
        self.vram_plan: VRAMPlan | None = None
        """The VRAM plan the engine configured its GPU servers with, if it planned."""
        self._lora_scales: list[dict[str, Any]] | None = None  # last set_lora_adapters body
        self._telemetry, self._instrumentation = _instrumentation(telemetry)
        self._scraper: MetricsScraper | None = None
        if self._instrumentation is not None and (server is None or server.metrics):
            meter_provider = self._telemetry.meter_provider if self._telemetry else None
            self._scraper = MetricsScraper(meter_provider)
        self._interval = metrics_interval
        self._sampler_choice = gpu_sampler
        self.gpu_sampler: GPUSampler | None = None
        """The NVML sampler running with the engine, if any (``available`` says if it works)."""
        self._energy: EnergyBook | None = None
        self.placement = Placement.coerce(placement)
        self.config = server if server is not None else ServerConfig()
        self._binary = binary
        self._timeout = timeout
        self._ready_timeout = ready_timeout
        self._restart = restart
        self._max_restart_delay = max_restart_delay
        self._max_start_failures = max_start_failures
        self._health_interval = health_interval
        self._hang_timeout = hang_timeout
        self._strict = strict
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._router = Router(max_waiting=max_waiting)
        self._servers: list[_Server] = []
        self._api_key = self.config.api_key or secrets.token_urlsafe(24)
        self._open = False
        self._runner: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None

    # ----------------------------------------------------------------- lifecycle
    @contextlib.asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        servers = await self._prepare()
        sampler = self._gpu_sampler_for(servers)
        try:
            async with contextlib.AsyncExitStack() as stack:
                if sampler is not None:
                    await stack.enter_async_context(sampler)  # unavailable: it just says why
                    self.gpu_sampler = sampler
                    self._energy = EnergyBook(sampler)
                await stack.enter_async_context(self._running(servers))
                yield self
        finally:
            with anyio.CancelScope(shield=True):
                for server in servers:
                    await server.close_clients()

    def _gpu_sampler_for(self, servers: list[_Server]) -> GPUSampler | None:
        choice = self._sampler_choice
        if isinstance(choice, GPUSampler):
            return choice
        if choice is False or (choice is None and not any(s.process.gpus for s in servers)):
            return None
        meter_provider = self._telemetry.meter_provider if self._telemetry else None
        return GPUSampler(meter_provider=meter_provider)

    @contextlib.asynccontextmanager
    async def _running(self, servers: list[_Server]) -> AsyncGenerator[None]:
        with single_error():
            async with anyio.create_task_group() as tg:
                try:
                    await self._start_all(tg, servers)
                    if self._scraper is not None:
                        tg.start_soon(self._scraper.run, self._ready_clients, self._interval)
                    if self._health_interval is not None:
                        for server in servers:
                            tg.start_soon(self._watch, server, self._health_interval)
                    self._open = True
                    yield
                finally:
                    self._open = False
                    self._router.close(EngineError("the engine is closed"))
                    # Our own open connections first: llama-server does not exit on SIGTERM
                    # while a stream's connection is open, and readers learn the real reason.
                    with anyio.CancelScope(shield=True):
                        for server in servers:
                            await server.close_clients()
                    tg.cancel_scope.cancel()  # supervisors stop; run() reaps each process

    async def _prepare(self) -> list[_Server]:
        """Everything that can fail before a process is spawned fails here."""
        self.model = await self._model_path()
        self.model_name = self.model.name
        binary = find_llama_server(self._binary)
        gpus = await anyio.to_thread.run_sync(visible_gpus)  # NVML init blocks ~10 ms
        plans = self.placement.plans(gpus)
        config = dataclasses.replace(self.config, api_key=self._api_key)
        configs = await self._configure(config, plans)
        if self._log_dir is not None:
            await anyio.Path(self._log_dir).mkdir(parents=True, exist_ok=True)
        servers = []
        for server_plan, server_config in zip(plans, configs, strict=True):
            argv, env = server_command(
                server_config, binary=binary, model=self.model, plan=server_plan
            )
            name = server_plan.name
            log_file = self._log_dir / f"{name}.log" if self._log_dir else None
            process = LlamaServer(argv, env, name=name, gpus=server_plan.gpus, log_file=log_file)
            member = Member(name, None, slots=1)
            self._router.members.append(member)
            servers.append(_Server(process, member))
        self._servers = servers
        return servers

    async def _model_path(self) -> Path:
        """The local model file: a path as given, or what ``resolve_model`` makes of a spec."""
        spec = self._spec
        if not isinstance(spec, str):
            if not await anyio.Path(spec).is_file():
                raise ModelNotFoundError(
                    f"model file not found: {spec} (pass the path of a .gguf file)",
                    model=str(spec),
                    tried=[f"local path {spec}"],
                )
            return Path(spec)
        from ..models._resolve import resolve_model  # only a spec needs the Hub machinery

        return await resolve_model(spec)

    async def _configure(self, config: ServerConfig, plans: list[ServerPlan]) -> list[ServerConfig]:
        """One config per server: ``config``, with what it leaves unset planned on GPUs.

        CPU servers keep ``config`` as it is. GPU servers get ``n_gpu_layers``, ``ctx_size``
        and ``n_parallel`` from ``models.plan`` when ``config`` leaves them unset (or
        ``n_gpu_layers="auto"``) and NVML says how much memory each GPU has free. The plan
        counts the LoRA adapters of ``config.lora`` with the layers they adapt.
        """
        self.vram_plan = None
        unset = (
            config.n_gpu_layers in (None, "auto")
            or config.ctx_size is None
            or config.n_parallel is None
        )
        gpu_ids = sorted({gpu for server_plan in plans for gpu in server_plan.gpus})
        if not (self._auto_configure and unset and gpu_ids):
            return [config] * len(plans)
        specs, why = await anyio.to_thread.run_sync(_read_gpu_specs, gpu_ids)  # NVML blocks
        missing = sorted(set(gpu_ids) - {spec.index for spec in specs})
        if missing:
            logger.warning(
                "no memory figures for GPU %s (%s): n_gpu_layers, ctx_size and n_parallel "
                "left to llama-server",
                ", ".join(map(str, missing)),
                why or "NVML does not list it",
            )
            return [config] * len(plans)
        info = await inspect_model(self.model)  # parses in a worker thread
        if config.lora:  # each adapter's tensors go where the weights they adapt are
            adapters = [entry if isinstance(entry, str) else entry[0] for entry in config.lora]
            info = await anyio.to_thread.run_sync(with_adapters, info, adapters)
        planning = functools.partial(
            plan,
            info,
            specs,
            placement=plans,
            ctx_size=config.ctx_size,
            n_parallel=config.n_parallel,
            n_gpu_layers=config.n_gpu_layers,
            cache_type_k=config.cache_type_k,
            cache_type_v=config.cache_type_v,
            ubatch_size=config.ubatch_size,
            flash_attn=config.flash_attn,
            swa_full="--swa-full" in config.extra_args,
        )
        vram = await anyio.to_thread.run_sync(planning)  # ~20 ms for an 80-layer model
        self.vram_plan = vram
        logger.info("VRAM plan for %s: %s", self.model.name, vram.summary())
        return [vram.server(p.name).apply(config) for p in plans]

    async def _start_all(self, tg: anyio.abc.TaskGroup, servers: list[_Server]) -> None:
        errors: list[BaseException] = []

        async def start_one(server: _Server) -> None:
            try:
                await tg.start(self._supervise, server)
            except Exception as exc:  # collected, then the first is raised below
                errors.append(exc)
                starting.cancel_scope.cancel()  # no point waiting for the others

        async with anyio.create_task_group() as starting:  # all servers start at once
            for server in servers:
                starting.start_soon(start_one, server)
        if errors:
            first = errors[0]
            for other in errors[1:]:
                first.add_note(f"also: {other}")
            raise first

    async def _supervise(self, server: _Server, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        process, member = server.process, server.member
        delay = 0.5
        first = True

        async def on_ready() -> None:
            assert process.url is not None
            telemetry = self._telemetry
            http = telemetry.httpx_client() if telemetry and telemetry.instrument_httpx else None
            client = AsyncLlamaClient(
                process.url,
                api_key=self._api_key,
                timeout=self._timeout,
                http_client=http,
                strict=self._strict,
            )
            server.http = http
            member.client = server.client = client  # closed in the finally below
            props = await client.props()
            member.slots = max(1, int(props.get("total_slots", 1)))
            await self._restore_lora(client)
            member.exited = process.exited
            server.start_failures = 0
            server.last_error = None
            member.failed = False
            member.healthy = True
            self._router.set_unavailable(None)
            self._router.set_ready(member, True)

        while True:
            began = time.monotonic()
            try:
                await process.run(
                    ready_timeout=self._ready_timeout,
                    on_ready=on_ready,
                    on_exit=lambda: self._router.set_ready(member, False),
                    task_status=task_status if first else anyio.TASK_STATUS_IGNORED,
                )
            except Exception as exc:
                if first:
                    raise
                # A failed restart must not take the engine down: back off and try again.
                logger.exception("%s: restart failed", process.name)
                self._start_failed(server, exc)
            finally:
                self._router.set_ready(member, False)
                with anyio.CancelScope(shield=True):
                    await server.close_clients()
                    if self._scraper is not None:
                        self._scraper.forget(process.name)
            first = False
            if not self._restart:
                member.dead = True
                if all(m.dead for m in self._router.members):
                    self._router.close(EngineError("every server has exited (restart=False)"))
                return
            if time.monotonic() - began > 60:
                delay = 0.5  # it ran for a while: this crash is news, not a crash loop
            logger.warning("%s: restarting in %.1f s", process.name, delay)
            await anyio.sleep(delay)  # backoff between restarts, not synchronisation
            delay = min(delay * 2, self._max_restart_delay)

    def _start_failed(self, server: _Server, exc: Exception) -> None:
        """Count a failed restart; when no server can serve, fail the waiting requests."""
        server.start_failures += 1
        server.last_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if server.start_failures < self._max_start_failures:
            return
        server.member.failed = True
        if all(s.member.failed or s.member.dead for s in self._servers):
            self._router.set_unavailable(self._unavailable_error)

    def _unavailable_error(self) -> ServerUnavailableError:
        names = tuple(s.process.name for s in self._servers)
        tails = "\n".join(
            f"--- {s.process.name} (failed {s.start_failures} starts: {s.last_error}):\n"
            + "\n".join(s.process.recent_logs(10))
            for s in self._servers
        )
        return ServerUnavailableError(
            f"no server can take requests: {', '.join(names)} failed to restart "
            f"{self._max_start_failures} times in a row (the engine keeps trying; "
            "their last log lines say why)",
            servers=names,
            log_tail=tails,
        )

    async def _watch(self, server: _Server, interval: float) -> None:
        """Probe a ready server's /health; route around it while it does not answer."""
        member, process = server.member, server.process
        silent_since: float | None = None
        while True:
            # A polling period, not synchronisation: probes are cheap, a busy server often.
            await anyio.sleep(interval if member.outstanding else interval * 4)
            client = server.client
            if client is None or not member.ready:
                silent_since = None
                continue
            problem = await _probe(client)
            if problem is None:
                if not member.healthy:
                    logger.warning("%s answers its health probe again", process.name)
                    server.last_error = None
                    self._router.set_healthy(member, True)
                silent_since = None
                continue
            now = time.monotonic()
            if member.healthy:
                logger.warning("%s: %s; no new requests go to it", process.name, problem)
                server.last_error = problem
                silent_since = now
                self._router.set_healthy(member, False)
            elif (
                self._hang_timeout is not None
                and silent_since is not None
                and now - silent_since >= self._hang_timeout
            ):
                logger.error(
                    "%s has not answered for %.0f s: killing it to restart it",
                    process.name,
                    now - silent_since,
                )
                silent_since = None
                process.send_signal(signal.SIGKILL)

    async def start(self) -> Self:
        """Start without ``async with`` (a notebook cell): ``await engine.aclose()`` later."""
        if sniffio.current_async_library() != "asyncio":
            raise UsageError("start() needs asyncio; under trio use `async with AsyncEngine(...)`")
        if self._runner is not None:
            raise UsageError("this engine was already started")
        started = asyncio.Event()
        self._stop = stop = asyncio.Event()

        async def run() -> None:
            async with self:
                started.set()
                await stop.wait()

        # The task group must be entered and left in one task, and a notebook runs each
        # cell in its own: so the engine lives in a task of its own.
        self._runner = runner = asyncio.get_running_loop().create_task(run())
        waiter = asyncio.ensure_future(started.wait())
        await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if runner.done():
            runner.result()  # raises why it could not start
        return self

    async def aclose(self) -> None:
        """Stop every server and wait until each is reaped; calling it again does nothing."""
        runner, self._runner = self._runner, None
        if runner is None or self._stop is None:
            return
        self._stop.set()
        await runner

    # ----------------------------------------------------------------- introspection
    @property
    def servers(self) -> list[ServerInfo]:
        """One snapshot per server: URL, pid, GPUs, state, load, recent log lines."""
        return [
            ServerInfo(
                name=s.process.name,
                url=s.process.url,
                pid=s.process.pid,
                gpus=s.process.gpus,
                state=self._state(s),
                slots=s.member.slots,
                outstanding=s.member.outstanding,
                served=s.member.served,
                starts=s.process.starts,
                exit_code=s.process.exit_code,
                recent_logs=tuple(s.process.recent_logs(20)),
                last_error=s.last_error,
            )
            for s in self._servers
        ]

    @staticmethod
    def _state(server: _Server) -> str:
        member = server.member
        if member.failed:
            return "failed"
        if member.ready and not member.healthy:
            return "unresponsive"
        return server.process.state.value

    def _process(self, name: str) -> LlamaServer:
        for s in self._servers:
            if s.process.name == name:
                return s.process
        raise KeyError(name)

    def _ready_clients(self) -> list[tuple[str, AsyncLlamaClient]]:
        return [(s.process.name, s.client) for s in self._servers if s.client is not None]

    def _check_open(self) -> None:
        if not self._open:
            raise UsageError("the engine is not running: use `async with AsyncEngine(...)`")

    def _any_client(self) -> AsyncLlamaClient:
        self._check_open()
        for _, client in self._ready_clients():
            return client
        raise EngineError("no server is ready (all are restarting); try again shortly")

    # ----------------------------------------------------------------- model facts
    # Every server runs the same model, so these go to any ready one and take no slot.
    async def tokenize(
        self, content: str, *, add_special: bool = False, parse_special: bool = True
    ) -> list[int]:
        """Token ids of ``content`` (``POST /tokenize`` on any ready server; takes no slot)."""
        return await self._any_client().tokenize(
            content, add_special=add_special, parse_special=parse_special
        )

    async def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of ``tokens`` (``POST /detokenize`` on any ready server; takes no slot)."""
        return await self._any_client().detokenize(tokens)

    async def props(self) -> dict[str, Any]:
        """``GET /props`` of any ready server: model path, chat template, slots, build."""
        return await self._any_client().props()

    # ----------------------------------------------------------------- LoRA adapters
    async def lora_adapters(self) -> dict[str, list[dict[str, Any]]]:
        """Each ready server's LoRA adapters, by server name (``GET /lora-adapters``).

        Adapters are loaded when a server starts, e.g. with
        ``ServerConfig(lora=("adapter.gguf",))``; the entries are
        llama-server's own: ``{"id": 0, "path": "adapter.gguf", "scale": 1.0}``.

        ```python
        await engine.lora_adapters()  # {"gpu0": [{"id": 0, ...}], "gpu1": [{"id": 0, ...}]}
        ```
        """
        self._check_open()
        found: dict[str, list[dict[str, Any]]] = {}

        async def read(name: str, client: AsyncLlamaClient) -> None:
            found[name] = await client.lora_adapters()

        clients = self._ready_clients()
        await _on_each(clients, read)
        return {name: found[name] for name, _ in clients}

    async def set_lora_adapters(
        self, adapters: Iterable[Mapping[str, Any]] | Mapping[int, float]
    ) -> None:
        """Set LoRA adapter scales on every ready server at once (``POST /lora-adapters``).

        ``adapters`` is ``[{"id": 0, "scale": 0.5}, ...]`` or ``{0: 0.5}``. As in
        llama-server, an adapter left out gets scale 0 (off). Ids that a server does not
        have raise ``ConfigError`` before any server is changed. The engine keeps the
        scales: a server that restarts, or was restarting during this call, gets them
        before it takes requests again.

        ```python
        await engine.set_lora_adapters([{"id": 0, "scale": 0.0}])  # adapter 0 off everywhere
        ```
        """
        self._check_open()
        body = _lora_body(adapters)
        clients = self._ready_clients()
        if not clients:
            raise EngineError("no server is ready to take LoRA adapter scales; retry shortly")
        present: dict[str, set[int]] = {}

        async def read(name: str, client: AsyncLlamaClient) -> None:
            present[name] = {int(entry["id"]) for entry in await client.lora_adapters()}

        await _on_each(clients, read)
        for name, _ in clients:
            unknown = sorted({entry["id"] for entry in body} - present[name])
            if unknown:
                have = sorted(present[name])
                raise ConfigError(
                    f"adapters: server {name} has no LoRA adapter with id {unknown} "
                    f"(its adapters: {have or 'none'}; load them with --lora when it starts)",
                    field="adapters",
                )
        # Kept before writing: a server that becomes ready meanwhile picks these up itself.
        self._lora_scales = body

        async def write(name: str, client: AsyncLlamaClient) -> None:
            await client.set_lora_adapters(body)

        await _on_each(clients, write)

    async def _restore_lora(self, client: AsyncLlamaClient) -> None:
        """Give a (re)started server the adapter scales last set on the engine, if any."""
        applied: list[dict[str, Any]] | None = None
        # Again if set_lora_adapters changed them while this one was on its way.
        while self._lora_scales is not applied:
            applied = self._lora_scales
            assert applied is not None
            await client.set_lora_adapters(applied)

    # ----------------------------------------------------------------- requests
    def stream(
        self,
        prompt: str | Sequence[Any],
        *,
        timeout: TimeoutTypes | None = None,
        deadline: float | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        **params: Any,
    ) -> TokenStream[CompletionChunk]:
        """Stream ``/completion`` from the least busy server (llama.cpp parameter names).

        ``timeout``, ``deadline``, ``extra_headers`` and ``extra_body`` are the client's
        per-request options (see ``AsyncLlamaClient.stream_completion``).
        """
        options = self._options(params, timeout, deadline, extra_headers, extra_body)
        path, body = completion_stream_request(prompt, params)
        return self._routed(path, body, options, CompletionChunk, "text_completion")

    def chat_stream(
        self,
        messages: Iterable[Message],
        *,
        timeout: TimeoutTypes | None = None,
        deadline: float | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        **params: Any,
    ) -> TokenStream[ChatChunk]:
        """Stream ``/v1/chat/completions`` from the least busy server (OpenAI names)."""
        options = self._options(params, timeout, deadline, extra_headers, extra_body)
        path, body = chat_stream_request(messages, params)
        return self._routed(path, body, options, ChatChunk, "chat")

    def _routed(
        self,
        path: str,
        body: dict[str, Any],
        options: RequestOptions,
        chunk_type: type[ChunkT],
        operation: str,
    ) -> TokenStream[ChunkT]:
        observer = self._observe(operation, body, stream=True)
        source = _RoutedSource(self, path, body, options, observer)
        return source.attach(TokenStream(source, chunk_type, observer, deadline=options.deadline))

    async def complete(
        self,
        prompt: str | Sequence[Any],
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        **params: Any,
    ) -> Completion:
        """``/completion`` without streaming."""
        self._options(params, timeout, None, extra_headers, extra_body)
        body = {"prompt": prompt, **params}
        return await self._call(
            lambda c: c.completion(
                prompt,
                timeout=timeout,
                extra_headers=extra_headers,
                extra_body=extra_body,
                **params,
            ),
            "text_completion",
            body,
        )

    async def chat(
        self,
        messages: Iterable[Message],
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        **params: Any,
    ) -> ChatCompletion:
        """``/v1/chat/completions`` without streaming."""
        self._options(params, timeout, None, extra_headers, extra_body)
        checked = chat_messages(messages)
        body = {"messages": checked, **params}
        return await self._call(
            lambda c: c.chat(
                checked,
                timeout=timeout,
                extra_headers=extra_headers,
                extra_body=extra_body,
                **params,
            ),
            "chat",
            body,
        )

    async def embed(
        self,
        texts: str | Sequence[str],
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> list[list[float]]:
        """Embedding vectors (servers need ``ServerConfig(embeddings=True, pooling=...)``)."""
        result = await self._call(
            lambda c: c.embeddings(texts, timeout=timeout, extra_headers=extra_headers),
            None,
            {},
        )
        return result.vectors

    def _options(
        self,
        params: Mapping[str, Any],
        timeout: TimeoutTypes | None,
        deadline: float | None,
        extra_headers: Mapping[str, str] | None,
        extra_body: Mapping[str, Any] | None,
    ) -> RequestOptions:
        self._check_open()
        return parse_options(
            params, timeout, deadline, extra_headers, extra_body, strict=self._strict
        )

    def _observe(
        self, operation: str, body: dict[str, Any], *, stream: bool
    ) -> RequestObserver | None:
        instrumentation = self._instrumentation
        if instrumentation is None:
            return None
        return instrumentation.start(operation, {**body, "model": self.model_name}, stream=stream)

    async def _call(
        self,
        fn: Callable[[AsyncLlamaClient], Awaitable[T]],
        operation: str | None,
        body: dict[str, Any],
    ) -> T:
        self._check_open()
        observer = self._observe(operation, body, stream=False) if operation else None
        try:
            member = await self._router.acquire()
        except BaseException as exc:
            if observer is not None:
                observer.on_error(exc)
            raise
        release = self._router.releaser(member)
        exited = member.exited
        energy = self._energy_begin(member, lambda: 0)
        try:
            client = member.client
            assert isinstance(client, AsyncLlamaClient)
            if observer is None:
                result = await fn(client)
            else:
                gpus = self._process(member.name).gpus
                observer.on_server(str(client.base_url), member.name, gpus)
                with observer.activate():
                    result = await fn(client)
        except _BROKEN as exc:
            # A server that died mid-request (its client closes when it does).
            error = await self._failure(member, exited, exc)
            if observer is not None:
                observer.on_error(error)
            raise error from exc
        except BaseException as exc:
            if observer is not None:
                observer.on_error(exc)
            raise
        finally:
            release()
        usage = getattr(result, "usage", None)
        figures = self._energy_end(energy, usage.completion_tokens if usage else 0)
        if observer is not None:
            if figures:
                observer.annotate(figures)
            observer.on_end(result)  # type: ignore[arg-type]  # completions carry text/usage
        return result

    def _energy_begin(self, member: Member, tokens: Callable[[], int]) -> int | None:
        if self._energy is None:
            return None
        return self._energy.begin(self._process(member.name).gpus, tokens)

    def _energy_end(self, key: int | None, tokens: int) -> dict[str, Any]:
        return self._energy.end(key, tokens) if self._energy is not None else {}

    async def _failure(
        self, member: Member, exited: anyio.Event | None, exc: LlamaError
    ) -> LlamaError:
        """What a broken request means: the engine closed, the server died, or ``exc``."""
        if not self._open:
            return EngineError("the engine is closed")
        if exited is None:
            return exc
        with anyio.move_on_after(1.0):  # the exit watcher may lag the broken socket a little
            await exited.wait()
        if not exited.is_set():
            return exc
        process = self._process(member.name)
        return ServerCrashedError(
            f"server {member.name} exited (code {process.exit_code}) during the request "
            f"({exc}); it is being restarted, retry the request",
            server=member.name,
            exit_code=process.exit_code,
        )


async def _probe(client: AsyncLlamaClient) -> str | None:
    """``None`` if the server answers ``/health`` within a second, else what went wrong."""
    try:
        with anyio.fail_after(_PROBE_TIMEOUT):
            await client.health()
    except TimeoutError:
        return f"no answer to its health probe within {_PROBE_TIMEOUT:.0f} s"
    except LlamaError as exc:
        return f"its health probe failed ({exc})"
    return None


_PROBE_TIMEOUT = 1.0


def _check_count(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}", field=name)


def _check_seconds(name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        allowed = "a positive number of seconds" + (" or None" if optional else "")
        raise ConfigError(f"{name} must be {allowed}, got {value!r}", field=name)


def _instrumentation(
    telemetry: Telemetry | bool | None,
) -> tuple[Telemetry | None, GenAIInstrumentation | None]:
    """What observes the engine's requests.

    A ``Telemetry``: its providers. ``None``: the application's global providers, if it set
    any (otherwise nothing, at no cost). ``False``: nothing. ``True``: the global providers
    whatever they are.
    """
    if isinstance(telemetry, Telemetry):
        return telemetry, telemetry.instrumentation
    if telemetry is False:
        return None, None
    configured = not isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider
    )
    if telemetry is None and not configured:
        return None, None
    return None, GenAIInstrumentation()


async def _on_each(
    clients: Sequence[tuple[str, AsyncLlamaClient]],
    call: Callable[[str, AsyncLlamaClient], Awaitable[None]],
) -> None:
    """Run ``call`` for every server at once; raise the first failure (the others as notes)."""
    errors: list[Exception] = []

    async def one(name: str, client: AsyncLlamaClient) -> None:
        try:
            await call(name, client)
        except Exception as exc:  # collected, then the first is raised below
            exc.add_note(f"server {name}")
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for name, client in clients:
            tg.start_soon(one, name, client)
    if errors:
        first = errors[0]
        for other in errors[1:]:
            first.add_note(f"also: {other} ({', '.join(getattr(other, '__notes__', []))})")
        raise first


def _lora_body(adapters: Iterable[Mapping[str, Any]] | Mapping[int, float]) -> list[dict[str, Any]]:
    """``[{"id": int, "scale": float}, ...]`` from either form, checked."""
    if isinstance(adapters, Mapping):
        entries: list[Any] = [{"id": k, "scale": v} for k, v in adapters.items()]
    elif isinstance(adapters, str | bytes):
        entries = [adapters]  # rejected below
    else:
        entries = list(adapters)
    body: list[dict[str, Any]] = []
    seen: set[int] = set()
    for entry in entries:
        ident = entry.get("id") if isinstance(entry, Mapping) else None
        scale = entry.get("scale") if isinstance(entry, Mapping) else None
        if (
            isinstance(ident, bool)
            or not isinstance(ident, int)
            or ident < 0
            or isinstance(scale, bool)
            or not isinstance(scale, int | float)
            or scale != scale  # NaN
            or scale in (float("inf"), float("-inf"))
        ):
            raise ConfigError(
                'adapters: each entry is {"id": int >= 0, "scale": finite number} '
                f"(or pass {{id: scale}}), got {entry!r}",
                field="adapters",
            )
        if ident in seen:
            raise ConfigError(f"adapters: id {ident} is given twice", field="adapters")
        seen.add(ident)
        body.append({"id": ident, "scale": float(scale)})
    return body


class _RoutedSource(Source):
    """A stream source that first takes a slot from the router, then reads its server.

    It knows its stream only weakly: a stream dropped without ``aclose()`` must be freed by
    reference counting alone (its finalizer gives the slot back), not wait for a GC pass.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        path: str,
        body: dict[str, Any],
        options: RequestOptions = NO_OPTIONS,
        observer: RequestObserver | None = None,
    ) -> None:
        self._engine = engine
        self._options = options
        self._observer = observer
        self._stream: weakref.ref[TokenStream[Any]] | None = None
        self._chunks = 0  # the stream's count, kept when the stream itself is gone
        self._energy: int | None = None
        self._path = path
        self._body = body
        self._inner: Source | None = None
        self._member: Member | None = None
        self._release: Callable[[], None] = _nothing
        self._exited: anyio.Event | None = None
        self._aborted = False
        self.url = f"engine:{path}"

    async def open(self, sink: Callable[[bytes], None], backlog: Callable[[], int]) -> None:
        engine = self._engine
        router = engine._router
        for attempt in range(2):
            member = await router.acquire()
            self._member = member
            self._exited = member.exited
            self._release = router.releaser(member)
            try:
                client = member.client
                assert isinstance(client, AsyncLlamaClient)
                inner = self._inner = client._stream_source(
                    self._path, dict(self._body), self._options
                )
                self.url = inner.url
                self.server_name = member.name
                self.gpus = engine._process(member.name).gpus
                await inner.open(sink, backlog)
            except (ConnectError, ClientClosedError) as exc:
                # Refused or closed before the request was written: safe on another server.
                self._release()
                error = await engine._failure(member, self._exited, exc)
                if attempt == 0 and isinstance(error, ServerCrashedError):
                    continue
                raise error from exc
            except _BROKEN as exc:
                # The request reached the server (a crash during prefill): never sent twice.
                self._release()
                raise await engine._failure(member, self._exited, exc) from exc
            except BaseException:
                self._release()
                raise
            self._energy = engine._energy_begin(member, self._tokens)
            return

    def attach(self, stream: TokenStreamT) -> TokenStreamT:
        """Know the stream this source feeds (its token count, for energy shares)."""
        self._stream = weakref.ref(stream)
        return stream

    def _tokens(self) -> int:
        stream = self._stream() if self._stream is not None else None
        if stream is not None:
            self._chunks = stream.chunks
        return self._chunks

    def _account(self) -> None:
        """The request's GPU figures onto its span (once, at the end)."""
        key, self._energy = self._energy, None
        if key is None:
            return
        stream = self._stream() if self._stream is not None else None
        usage = stream.usage if stream is not None else None
        figures = self._engine._energy_end(
            key, usage.completion_tokens if usage else self._tokens()
        )
        if figures and self._observer is not None:
            self._observer.annotate(figures)

    async def fill(self) -> bool:
        assert self._inner is not None
        assert self._member is not None
        try:
            return await self._inner.fill()
        except _BROKEN as exc:
            if self._aborted:  # our own abort() broke the read
                raise
            raise await self._engine._failure(self._member, self._exited, exc) from exc

    def taken(self) -> None:
        if self._inner is not None:
            self._inner.taken()

    async def finish(self) -> None:
        try:
            if self._inner is not None:
                await self._inner.finish()
        finally:
            self._account()
            self._release()

    async def abort(self) -> None:
        self._aborted = True
        try:
            if self._inner is not None:
                await self._inner.abort()
        finally:
            self._account()
            self._release()


# What a dying server (or the engine closing its connections) looks like to a reader.
_BROKEN = (ReadError, ConnectError, ClientClosedError, RemoteProtocolError)


def _nothing() -> None:
    return None
