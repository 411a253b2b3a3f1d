"""``AsyncEngine``: start one llama-server per GPU (or pair, or CPU), keep them up, route.

Structure: the engine's ``async with`` owns one task group. Each backend (``_backends.py``)
runs in it: a local one supervises its process (restart with capped exponential backoff), a
remote one watches its server. Requests are the client's own methods (``RequestMethods``),
handed to the engine's routed dispatcher (``_routing.py``), which takes slots from the router
(``_router.py``). Leaving the block, however it is left, closes the engine's connections,
cancels the backends, and each ``LlamaServer.run`` stops and reaps its process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import secrets
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

import anyio
import anyio.abc
import httpx
from opentelemetry import trace

from .._errors import (
    ConfigError,
    EngineError,
    ModelNotFoundError,
    ServerUnavailableError,
    UsageError,
)
from .._groups import Background, single_error
from .._placement import Placement, available_cores
from ..client import (
    DEFAULT_TIMEOUT,
    AsyncLlamaClient,
    Dispatcher,
    RequestMethods,
    TimeoutTypes,
    lora_body,
)
from ..gpu import GPUSampler, visible_gpus
from ..models import (
    RAMPlan,
    VRAMPlan,
    inspect_model,
    plan,
    plan_ram,
    probe_gpu_specs,
    resolve_model,
    with_adapters,
)
from ..server import (
    LlamaServer,
    ServerConfig,
    ServerPlan,
    describe_cores,
    find_llama_server,
    server_affinity,
    server_command,
)
from ..telemetry import GenAIInstrumentation, MetricsScraper, Telemetry
from ._backends import Backend, BackendContext, LocalBackend, RemoteBackend, ServerInfo
from ._energy_book import EnergyBook
from ._models import EngineModel, _ModelSet
from ._router import Router
from ._routing import RoutedDispatcher

__all__ = ["AsyncEngine", "ServerInfo"]

logger = logging.getLogger("llamatelemetry_async.engine")

T = TypeVar("T")


class AsyncEngine(RequestMethods, anyio.AsyncContextManagerMixin):
    """Start and supervise llama-servers and spread requests over them.

    ```python
    async with AsyncEngine("model.gguf", placement=Placement.cpu(2)) as engine:
        async for chunk in engine.stream("Once upon a time", n_predict=64):
            print(chunk.text, end="")
        reply = await engine.chat([{"role": "user", "content": "hi"}], max_tokens=32)
    ```

    The engine has every request method of ``AsyncLlamaClient``, with the same names,
    signatures and return types: each request is routed to a server. Generation requests
    (completions, chat, embeddings, rerank) take a slot on the least busy ready server; the
    others (tokenize, props, health, ...) go to any ready server. A request that a server did
    not take (connection refused, 503 while loading) is tried on another, at most ``retries``
    times (per engine, or per request with ``retries=``), never once a response has started.

    Servers are backends: processes the engine starts from ``placement`` (one per GPU, pair
    or CPU share), and servers it did not start, given with ``Placement.remote(urls,
    api_key=...)``, mixable: ``Placement.cpu(1) + Placement.remote([...])``. Remote servers
    are watched, not supervised: one that fails is cooled down, probed with backoff, and
    takes requests again when it answers; ``aclose()`` leaves them running.

    ``model`` is the path of a GGUF file, or (as a string) any spec ``resolve_model``
    takes: a registry name or ``owner/repo:file.gguf`` on the Hugging Face Hub. It may be
    ``None`` when every server is remote.

    ``placement`` says where servers run (``"auto"``: one per GPU found, else one on the
    CPU); ``server`` configures each of them. On GPUs, the settings ``server`` leaves unset
    among ``n_gpu_layers``, ``ctx_size`` and ``n_parallel`` are chosen per server to fit the
    GPUs' free memory (``models.plan``; ``vram_plan`` holds the plan, the log explains it).
    The machine's CPU cores (its affinity mask) are divided among the servers
    (``share_cores``): each CPU server gets its own cores, pinned, one thread per core, and
    each GPU server the few threads it needs, unless ``server`` sets ``threads`` or
    ``cpu_affinity``; ``servers`` and the log show the split. CPU servers are checked to
    fit in RAM together (``models.plan_ram``: the model is mapped once, each server adds
    its KV cache). ``auto_configure=False`` leaves all of this to llama-server. Every server
    gets a fresh random API key through its environment. When all slots are busy, requests
    wait in the engine, up to ``max_waiting`` of them (``EngineBusyError`` beyond). A server
    that dies is restarted (backoff capped at ``max_restart_delay`` seconds) while requests
    go to the others.

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

    ``models``: several models behind one engine, by name (``EngineModel``: each with its own
    file, placement, server settings, ``ttl`` and ``preload``), instead of ``model``,
    ``placement`` and ``server``. A request names its model (``model="chat"``, the OpenAI
    field; ``default_model``, else the first, when it names none) and is routed to that
    model's servers, loaded first if they are not running; an unknown name raises
    ``ModelNotFoundError``. A model idle for its ``ttl`` is stopped. A model that does not
    fit beside the loaded ones (the VRAM or RAM plan) unloads the least recently used idle
    one first. ``servers`` names each server ``model/server``; ``model_states`` says which
    models are loaded.

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
        model: str | os.PathLike[str] | None = None,
        *,
        models: Mapping[str, EngineModel] | None = None,
        default_model: str | None = None,
        placement: Placement | str = "auto",
        server: ServerConfig | None = None,
        binary: str | os.PathLike[str] | None = None,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT,
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
        retries: int = 2,
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
        _check_count("retries", retries, minimum=0)
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
        self.placement = Placement.coerce(placement)
        if models is not None and (model is not None or server is not None or placement != "auto"):
            raise ConfigError(
                "give either models= (several models, each with its placement and server) "
                "or model=, placement= and server=, not both",
                field="models",
            )
        if models is None and default_model is not None:
            raise ConfigError("default_model names one of models=; give models", field="models")
        if model is None and models is None and self.placement.has_local:
            raise ConfigError(
                "model is needed to start local servers; pass the path of a .gguf file "
                "(or use only Placement.remote(...))",
                field="model",
            )
        self._spec = model
        self.model = Path(model) if model is not None else None
        """The model file (a spec is resolved to its local path when the engine starts);
        ``None`` when every server is remote."""
        self.model_name = self.model.name if self.model is not None else None
        self._auto_configure = auto_configure
        self.vram_plan: VRAMPlan | None = None
        """The VRAM plan the engine configured its GPU servers with, if it planned."""
        self.ram_plan: RAMPlan | None = None
        """The host-memory plan of its CPU servers, if it has any and planned."""
        self._lora_scales: list[dict[str, Any]] | None = None  # last set_lora_adapters body
        self._telemetry, self.instrumentation = _instrumentation(telemetry)
        self._scraper: MetricsScraper | None = None
        if self.instrumentation is not None and (server is None or server.metrics):
            meter_provider = self._telemetry.meter_provider if self._telemetry else None
            self._scraper = MetricsScraper(meter_provider)
        self._interval = metrics_interval
        self._sampler_choice = gpu_sampler
        self.gpu_sampler: GPUSampler | None = None
        """The NVML sampler running with the engine, if any (``available`` says if it works)."""
        self._energy: EnergyBook | None = None
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
        self._backends: list[Backend] = []
        self._api_key = self.config.api_key or secrets.token_urlsafe(24)
        self._open = False
        self._background = Background(self)
        self._ctx = BackendContext(
            router=self._router,
            client=self._client_for,
            on_ready=self._restore_lora,
            on_down=self._forget_metrics,
            availability=self._check_availability,
            max_start_failures=max_start_failures,
            health_interval=health_interval,
            hang_timeout=hang_timeout,
        )
        self._retries = retries
        self._server_prefix = ""  # "model/" for the servers of a model of a several-model engine
        self._scrapes = True  # False: a several-model engine's scraper reads this one's servers
        self._routes = RoutedDispatcher(
            self._backends,
            self._ctx,
            retries=retries,
            is_open=lambda: self._open,
            energy=lambda backend: self._energy if backend.energy is None else backend.energy,
        )
        self._models = (
            None if models is None else _ModelSet(models, default_model, self._model_engine)
        )
        self._dispatcher: Dispatcher = self._routes if self._models is None else self._models

    @property
    def _model_name(self) -> str | None:  # type: ignore[override]  # named on spans
        return self.model_name

    # ----------------------------------------------------------------- lifecycle
    @contextlib.asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        backends = await self._prepare()
        sampler = await self._gpu_sampler_for(backends)
        async with contextlib.AsyncExitStack() as stack:
            if sampler is not None:
                await stack.enter_async_context(sampler)  # unavailable: it just says why
                self.gpu_sampler = sampler
                self._energy = EnergyBook(sampler)
            await stack.enter_async_context(self._running(backends))
            yield self

    async def _gpu_sampler_for(self, backends: list[Backend]) -> GPUSampler | None:
        choice = self._sampler_choice
        if isinstance(choice, GPUSampler):
            return choice
        if choice is None and self._models is not None:  # its models may load on any GPU
            on_gpus = bool(await anyio.to_thread.run_sync(visible_gpus))
        else:
            on_gpus = any(b.gpus for b in backends)
        if choice is False or (choice is None and not on_gpus):
            return None
        meter_provider = self._telemetry.meter_provider if self._telemetry else None
        return GPUSampler(meter_provider=meter_provider)

    @contextlib.asynccontextmanager
    async def _running(self, backends: list[Backend]) -> AsyncGenerator[None]:
        with single_error():
            async with anyio.create_task_group() as tg:
                try:
                    await self._start_all(tg, backends)
                    if self._models is not None:
                        await self._models.run(tg)
                    if self._scraper is not None and self._scrapes:
                        tg.start_soon(self._scraper.run, self._ready_clients, self._interval)
                    self._open = True
                    yield
                finally:
                    self._open = False
                    self._router.close(EngineError("the engine is closed"))
                    # Our own open connections first: llama-server does not exit on SIGTERM
                    # while a stream's connection is open, and readers learn the real reason.
                    with anyio.CancelScope(shield=True):
                        await self._dispatcher.aclose()
                    tg.cancel_scope.cancel()  # backends stop; run() reaps each process

    def _client_for(self, url: str, api_key: str | None) -> AsyncLlamaClient:
        telemetry = self._telemetry
        http = telemetry.httpx_client() if telemetry and telemetry.instrument_httpx else None
        client = AsyncLlamaClient(
            url, api_key=api_key, timeout=self._timeout, http_client=http, strict=self._strict
        )
        if http is not None:
            client.dispatcher.owns_http = True  # an instrumented client of ours: closed with it
        return client

    def _forget_metrics(self, name: str) -> None:
        if self._scraper is not None:
            self._scraper.forget(name)

    def _check_availability(self) -> None:
        """Fail waiting requests when no backend can serve; take them again when one can."""
        members = [b.member for b in self._backends]
        if members and all(m.failed or m.dead for m in members):
            if all(m.dead for m in members):
                self._router.close(EngineError("every server has exited (restart=False)"))
            else:
                self._router.set_unavailable(self._unavailable_error)
        else:
            self._router.set_unavailable(None)

    def _unavailable_error(self) -> ServerUnavailableError:
        names = tuple(b.name for b in self._backends)
        tails = "\n".join(
            f"--- {b.name} (failed {b.failures} times: {b.last_error}):\n"
            + "\n".join(b.recent_logs(10))
            for b in self._backends
        )
        return ServerUnavailableError(
            f"no server can take requests: {', '.join(names)} failed "
            f"{self._max_start_failures} times in a row (the engine keeps trying; "
            "their last log lines say why)",
            servers=names,
            log_tail=tails,
        )

    async def _start_all(self, tg: anyio.abc.TaskGroup, backends: list[Backend]) -> None:
        errors: list[BaseException] = []

        async def start_one(backend: Backend) -> None:
            try:
                await tg.start(functools.partial(backend.run, self._ctx))
            except Exception as exc:  # collected, then the first is raised below
                errors.append(exc)
                starting.cancel_scope.cancel()  # no point waiting for the others

        async with anyio.create_task_group() as starting:  # all servers start at once
            for backend in backends:
                starting.start_soon(start_one, backend)
        if errors:
            first = errors[0]
            for other in errors[1:]:
                first.add_note(f"also: {other}")
            raise first

    async def _prepare(self) -> list[Backend]:
        """Everything that can fail before a process is spawned fails here."""
        backends: list[Backend] = []
        if self._models is not None:  # each model's own engine prepares its servers
            return backends
        if self.placement.has_local:
            model = self.model = await self._model_path()
            self.model_name = model.name
            # In a worker thread: with $LLAMA_SERVER_ARCHIVE it may unpack a build first.
            binary = await anyio.to_thread.run_sync(find_llama_server, self._binary)
            gpus = await anyio.to_thread.run_sync(visible_gpus)  # NVML init blocks ~10 ms
            cores = available_cores() if self._auto_configure else None
            plans = self.placement.plans(gpus, cores=cores)
            config = dataclasses.replace(self.config, api_key=self._api_key)
            configs = await self._configure(model, config, plans)
            if self._log_dir is not None:
                await anyio.Path(self._log_dir).mkdir(parents=True, exist_ok=True)
            for server_plan, server_config in zip(plans, configs, strict=True):
                argv, env = server_command(
                    server_config, binary=binary, model=model, plan=server_plan
                )
                name = self._server_prefix + server_plan.name
                logger.info("%s: %s", name, describe_cores(server_config, server_plan))
                log_file = self._log_dir / f"{server_plan.name}.log" if self._log_dir else None
                process = LlamaServer(
                    argv,
                    env,
                    name=name,
                    gpus=server_plan.gpus,
                    cores=server_affinity(server_config, server_plan),
                    log_file=log_file,
                )
                backends.append(
                    LocalBackend(
                        process,
                        api_key=self._api_key,
                        ready_timeout=self._ready_timeout,
                        restart=self._restart,
                        max_restart_delay=self._max_restart_delay,
                    )
                )
        for i, remote in enumerate(self.placement.remotes):
            backends.append(RemoteBackend(f"remote{i}", remote.url, remote.api_key))
        model_spec = None if self._spec is None else str(self._spec)
        binary_path = None if self._binary is None else str(self._binary)
        for provider in self.placement.providers:
            for backend in provider.backends(model_spec, self.config, binary_path):
                if not isinstance(backend, Backend):
                    raise ConfigError(
                        f"{type(provider).__name__}.backends() must return engine Backends, "
                        f"got {type(backend).__name__}",
                        field="placement",
                    )
                backends.append(backend)
        self._backends[:] = backends
        self._router.members[:] = [b.member for b in backends]
        return backends

    async def _model_path(self) -> Path:
        """The local model file: a path as given, or what ``resolve_model`` makes of a spec."""
        spec = self._spec
        assert spec is not None  # checked in __init__: local servers need a model
        if not isinstance(spec, str):
            if not await anyio.Path(spec).is_file():
                raise ModelNotFoundError(
                    f"model file not found: {spec} (pass the path of a .gguf file)",
                    model=str(spec),
                    tried=[f"local path {spec}"],
                )
            return Path(spec)
        return await resolve_model(spec)

    async def _configure(
        self, model: Path, config: ServerConfig, plans: list[ServerPlan]
    ) -> list[ServerConfig]:
        """One config per server: ``config``, with what it leaves unset planned on GPUs.

        CPU servers keep ``config`` as it is, once ``models.plan_ram`` has found that they
        fit in memory together (``ram_plan``; ``ModelDoesNotFitError`` if not). GPU servers
        get ``n_gpu_layers``, ``ctx_size`` and ``n_parallel`` from ``models.plan`` when
        ``config`` leaves them unset (or ``n_gpu_layers="auto"``) and NVML says how much
        memory each GPU has free. The plan counts the LoRA adapters of ``config.lora`` with
        the layers they adapt.
        """
        self.vram_plan = None
        self.ram_plan = None
        if not self._auto_configure:
            return [config] * len(plans)
        if any(not server_plan.gpus for server_plan in plans):
            info = await inspect_model(model)  # parses in a worker thread
            planning_ram = functools.partial(
                plan_ram,
                info,
                plans,
                ctx_size=config.ctx_size,
                n_parallel=config.n_parallel,
                cache_type_k=config.cache_type_k,
                cache_type_v=config.cache_type_v,
                ubatch_size=config.ubatch_size,
                flash_attn=config.flash_attn,
                swa_full="--swa-full" in config.extra_args,
            )
            self.ram_plan = await anyio.to_thread.run_sync(planning_ram)  # reads /proc
            logger.info("RAM plan for %s: %s", model.name, self.ram_plan.summary())
        unset = (
            config.n_gpu_layers in (None, "auto")
            or config.ctx_size is None
            or config.n_parallel is None
        )
        gpu_ids = sorted({gpu for server_plan in plans for gpu in server_plan.gpus})
        if not (unset and gpu_ids):
            return [config] * len(plans)
        specs, why = await anyio.to_thread.run_sync(probe_gpu_specs, gpu_ids)  # NVML blocks
        missing = sorted(set(gpu_ids) - {spec.index for spec in specs})
        if missing:
            logger.warning(
                "no memory figures for GPU %s (%s): n_gpu_layers, ctx_size and n_parallel "
                "left to llama-server",
                ", ".join(map(str, missing)),
                why or "NVML does not list it",
            )
            return [config] * len(plans)
        info = await inspect_model(model)  # parses in a worker thread
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
        logger.info("VRAM plan for %s: %s", model.name, vram.summary())
        return [vram.server(p.name).apply(config) for p in plans]

    @classmethod
    async def auto(
        cls,
        model: str | os.PathLike[str],
        *,
        server: ServerConfig | None = None,
        binary: str | os.PathLike[str] | None = None,
        build: bool = True,
        say: Callable[[str], None] | None = print,
        plan_settings: Mapping[str, Any] | None = None,
        **engine_options: Any,
    ) -> AsyncEngine:
        """One call for a notebook (Kaggle, Colab, local): a started engine on ``model``.

        It loads the notebook's secrets, finds the GPUs, gets a llama-server for them (an
        archive from ``$LLAMA_SERVER_ARCHIVE``, the cache, or a build for their compute
        capability), plans the model under each placement the GPUs allow and starts the
        first that fits (one server per GPU, else a GPU pair, else the CPU), printing what
        it chose and why through ``say``. Stop it with ``await engine.aclose()``.

        ```python
        spec = "Qwen/Qwen2.5-7B-Instruct-GGUF:qwen2.5-7b-instruct-q4_k_m.gguf"
        engine = await AsyncEngine.auto(spec)
        # Kaggle (GPU T4 x2) / GPU 0: Tesla T4, 14.7 GiB / GPU 1: Tesla T4, 14.7 GiB ...
        # placement: per_gpu: every layer on the GPU (gpu0: all 28 layers + output, ...)
        ```
        """
        from ._auto import auto_engine

        return await auto_engine(
            model,
            server=server,
            binary=binary,
            build=build,
            say=say,
            plan_settings=plan_settings,
            **engine_options,
        )

    async def start(self) -> Self:
        """Start without ``async with`` (a notebook cell): ``await engine.aclose()`` later."""
        await self._background.start("AsyncEngine(...)")
        return self

    async def aclose(self) -> None:
        """Stop every server and wait until each is reaped; calling it again does nothing."""
        await self._background.stop()

    # ----------------------------------------------------------------- introspection
    @property
    def running(self) -> bool:
        """True from the end of start-up to the start of shutdown: requests are taken."""
        return self._open

    @property
    def waiting(self) -> int:
        """Requests waiting now for a free slot (at most ``max_waiting``)."""
        return self._router.waiting + sum(engine.waiting for _, engine in self._loaded())

    @property
    def model_states(self) -> dict[str, str]:
        """Each model of a several-model engine and where it is: ``"stopped"``, ``"loading"``,
        ``"ready"`` or ``"unloading"`` (empty for a one-model engine)."""
        if self._models is None:
            return {}
        return {name: state.value for name, state in self._models.states().items()}

    def _loaded(self) -> list[tuple[str, AsyncEngine]]:
        return [] if self._models is None else self._models.loaded()

    def _model_engine(self, name: str, spec: EngineModel) -> AsyncEngine:
        """The engine of one model of this several-model engine: this one's settings, its
        telemetry, GPU sampler and scraper shared, its servers named ``name/...``."""
        engine = AsyncEngine(
            spec.model,
            placement=spec.placement,
            server=spec.server,
            binary=self._binary,
            timeout=self._timeout,
            max_waiting=self._router.max_waiting,
            ready_timeout=self._ready_timeout,
            restart=self._restart,
            max_restart_delay=self._max_restart_delay,
            log_dir=None if self._log_dir is None else self._log_dir / name,
            telemetry=False,  # requests are observed by this engine, which names the model
            gpu_sampler=False,
            auto_configure=self._auto_configure,
            max_start_failures=self._max_start_failures,
            health_interval=self._health_interval,
            hang_timeout=self._hang_timeout,
            retries=self._retries,
            strict=self._strict,
        )
        engine._server_prefix = f"{name}/"
        engine.gpu_sampler, engine._energy = self.gpu_sampler, self._energy
        engine._scraper, engine._scrapes = self._scraper, False
        return engine

    @property
    def telemetry(self) -> Telemetry | None:
        """The ``Telemetry`` given to the engine, if any (its providers)."""
        return self._telemetry

    @property
    def servers(self) -> list[ServerInfo]:
        """One snapshot per server: URL, pid, GPUs, state, load, recent log lines."""
        infos = [backend.info() for backend in self._backends]
        for name, engine in self._loaded():
            infos += [dataclasses.replace(info, model=name) for info in engine.servers]
        return infos

    def _process(self, name: str) -> LlamaServer:
        for backend in self._backends:
            if backend.name == name and isinstance(backend, LocalBackend):
                return backend.process
        raise KeyError(name)

    def _ready_clients(self) -> list[tuple[str, AsyncLlamaClient]]:
        clients = [
            (b.name, b.client)
            for b in self._backends
            if b.client is not None and b.member.ready and b.member.healthy
        ]
        for _, engine in self._loaded():
            clients += engine._ready_clients()
        return clients

    def _check_open(self) -> None:
        if not self._open:
            raise UsageError("the engine is not running: use `async with AsyncEngine(...)`")

    async def each_server(self, call: Callable[[AsyncLlamaClient], Awaitable[T]]) -> dict[str, T]:
        """``call`` on every ready server at once, by server name; the first failure is raised.

        For what differs per server: ``await engine.each_server(lambda c: c.slots())``.
        """
        self._check_open()
        found: dict[str, T] = {}

        async def one(name: str, client: AsyncLlamaClient) -> None:
            found[name] = await call(client)

        clients = self._ready_clients()
        await _on_each(clients, one)
        return {name: found[name] for name, _ in clients}

    # ----------------------------------------------------------------- LoRA adapters
    async def set_lora_adapters(
        self,
        adapters: Iterable[Mapping[str, Any]] | Mapping[int, float],
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Any:
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
        body = lora_body(adapters)
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
            await client.set_lora_adapters(body, timeout=timeout, extra_headers=extra_headers)

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
