"""Several models behind one engine: each with its own servers, loaded on demand, routed by name.

``AsyncEngine(models={"chat": EngineModel(...), "embed": EngineModel(...)})`` runs one inner
engine per loaded model, inside the outer engine's task group. A request names its model
(``model=`` in the body, as OpenAI clients send it); ``_ModelSet`` is the outer engine's
dispatcher: it finds that model's inner engine, loads it first if it is not running
(requests wait; the load is bounded by ``ready_timeout``, a stream by its ``deadline``), and
hands the request to the inner engine's own dispatcher. A model idle for its ``ttl`` is
stopped, and loaded again on its next request.

Loading is memory-aware through the planners the engine already uses: a model whose servers
do not fit beside the loaded ones (``ModelDoesNotFitError`` from the VRAM or RAM plan, made
from what NVML and the kernel report free) unloads the least recently used idle model and
tries again; with none left to unload, the planner's error, and its suggestions, reach the
request.

Timing the code relies on: a model chosen for eviction leaves ``READY`` at once (no request
takes it between the choice and its unload); requests that waited for a load that failed
get that load's error (one try, not one per request); closing the engine cancels the load
in progress and answers its waiting requests with ``EngineError``.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import msgspec

from .._errors import ConfigError, EngineError, ModelDoesNotFitError, ModelNotFoundError
from .._placement import Placement
from ..client import Dispatcher, Reply, Request, RequestObserver, Source, TokenStream
from ..server import ServerConfig

if TYPE_CHECKING:
    from ._engine import AsyncEngine

__all__ = ["EngineModel", "ModelState"]

logger = logging.getLogger("llamatelemetry_async.engine")


@dataclass(frozen=True, slots=True)
class EngineModel:
    """One model of a several-model engine: its file, where its servers run, how, how long.

    ``model`` is a GGUF path or any spec ``resolve_model`` takes. ``placement`` and
    ``server`` are those of a one-model ``AsyncEngine``. ``ttl``: seconds without a request
    after which the model's servers are stopped (``None``: kept while the engine runs); it
    loads again on its next request. ``preload``: start it with the engine (else on its first
    request); models are preloaded in order, and one that does not fit beside those before
    it is left to its first request (logged) instead of unloading them.

    ```python
    models = {
        "chat": EngineModel("qwen2.5-7b-q4.gguf", placement=Placement.per_gpu([0])),
        "small": EngineModel("smollm2", placement=Placement.cpu(1), ttl=300, preload=False),
    }
    async with AsyncEngine(models=models) as engine:
        await engine.complete("Hi", model="small", n_predict=8)  # loads "small" first
    ```
    """

    model: str | os.PathLike[str]
    placement: Placement | str = "auto"
    server: ServerConfig | None = None
    ttl: float | None = None
    preload: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.model, str | os.PathLike) or not os.fspath(self.model):
            raise ConfigError(f"model: a GGUF path or spec, got {self.model!r}", field="model")
        object.__setattr__(self, "placement", Placement.coerce(self.placement))
        if not self.placement.has_local:  # type: ignore[union-attr]
            raise ConfigError(
                "placement: a model of a several-model engine runs servers of its own; "
                "put remote servers in an engine of their own",
                field="placement",
            )
        if self.server is not None and not isinstance(self.server, ServerConfig):
            raise ConfigError("server: a ServerConfig", field="server")
        if self.ttl is not None and (
            isinstance(self.ttl, bool)
            or not isinstance(self.ttl, int | float)
            or not math.isfinite(self.ttl)
            or self.ttl <= 0
        ):
            raise ConfigError(f"ttl: seconds > 0 or None, got {self.ttl!r}", field="ttl")


class ModelState(enum.Enum):
    """Where a model of a several-model engine is."""

    STOPPED = "stopped"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"


class _Model:
    """A model's life in the engine: its inner engine while loaded, and its use."""

    def __init__(self, name: str, spec: EngineModel) -> None:
        self.name = name
        self.spec = spec
        self.state = ModelState.STOPPED
        self.engine: AsyncEngine | None = None
        self.in_flight = 0
        self.last_used = 0.0
        self.loads = 0
        self.tries_over = 0  # loads tried that ended: a waiting request sees one end
        self.load_error: Exception | None = None  # how the last try failed, if it did
        self.evict = anyio.Event()  # set: unload now (it is idle; another model needs room)
        self.stopped = anyio.Event()  # set when an unload finished
        self.stopped.set()

    def ready_engine(self) -> AsyncEngine | None:
        """The running engine, if the model is ready for requests."""
        return self.engine if self.state is ModelState.READY else None


class _ModelSet(Dispatcher):
    """The outer engine's dispatcher: the request's model, loaded, then its own dispatcher."""

    def __init__(
        self,
        models: Mapping[str, EngineModel],
        default: str | None,
        make: Callable[[str, EngineModel], AsyncEngine],
    ) -> None:
        if not models:
            raise ConfigError("models: name at least one model", field="models")
        for name in models:
            if not isinstance(name, str) or not name or "/" in name or name != name.strip():
                raise ConfigError(
                    f"models: names are non-empty strings without '/' or outer spaces, got "
                    f"{name!r}",
                    field="models",
                )
            if not isinstance(models[name], EngineModel):
                raise ConfigError(
                    f"models[{name!r}]: an EngineModel, got {type(models[name]).__name__}",
                    field="models",
                )
        self.models = {name: _Model(name, spec) for name, spec in models.items()}
        self.default = default if default is not None else next(iter(models))
        if self.default not in self.models:
            raise ConfigError(
                f"default_model: {self.default!r} is not one of {', '.join(self.models)}",
                field="default_model",
            )
        self._make = make
        self._tg: anyio.abc.TaskGroup | None = None
        self._load_lock = anyio.Lock()  # one load (and its evictions) at a time
        self._loading: anyio.CancelScope | None = None  # the load in progress
        self._closed = False

    # ----------------------------------------------------------------- lifecycle
    async def run(self, tg: anyio.abc.TaskGroup) -> None:
        """Take ``tg`` for the inner engines; load the models to preload, in order."""
        self._tg = tg
        self._closed = False
        for model in self.models.values():
            if model.spec.preload:
                async with self._load_lock:
                    try:
                        # Never by unloading another preloaded model: that load was wasted.
                        await self._load(model, evict=False)
                    except ModelDoesNotFitError as exc:
                        if not self.loaded():
                            raise  # it fits nowhere: the start fails
                        logger.info(
                            "model %s not preloaded, it does not fit beside %s; it loads on "
                            "its first request: %s",
                            model.name,
                            ", ".join(name for name, _ in self.loaded()),
                            exc,
                        )

    async def aclose(self) -> None:
        """Close every loaded model's connections (its servers stop with the task group);
        a load in progress stops, and requests waiting for one get ``EngineError``."""
        self._closed = True
        if self._loading is not None:
            # Until started, a load runs in its request's cancel scope, not the task
            # group's: cancelling the group would not stop it.
            self._loading.cancel()
        for model in self.models.values():
            if model.engine is not None:
                await model.engine._dispatcher.aclose()

    async def _serve(self, model: _Model, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        engine = self._make(model.name, model.spec)
        model.state = ModelState.LOADING
        model.stopped = anyio.Event()
        try:
            async with engine:
                model.engine = engine
                model.state = ModelState.READY
                model.loads += 1
                model.last_used = time.monotonic()
                model.evict = anyio.Event()
                task_status.started()
                await self._hold(model)
                # No await between the idle check in _hold and this: no request joins now.
                model.state = ModelState.UNLOADING
        finally:
            model.engine = None
            model.state = ModelState.STOPPED
            model.stopped.set()

    async def _hold(self, model: _Model) -> None:
        """Return when ``model`` is to be unloaded: evicted, or idle for its ttl."""
        ttl = model.spec.ttl
        while True:
            if ttl is None:
                await model.evict.wait()
                return
            # The ttl is a timer, not a wait for another task: it runs out with nothing set.
            idle_for = time.monotonic() - model.last_used
            with anyio.move_on_after(max(ttl - idle_for, 0.0) if not model.in_flight else ttl):
                await model.evict.wait()
                return
            if not model.in_flight and time.monotonic() - model.last_used >= ttl:
                return

    def _check_running(self) -> None:
        if self._tg is None:
            raise EngineError("the engine is not running: use `async with AsyncEngine(...)`")
        if self._closed:
            raise EngineError("the engine is closed")

    async def _load(self, model: _Model, *, evict: bool = True) -> None:
        """Start ``model``'s engine (the load lock held), unloading idle models for room
        (``evict``). Its error, if it fails, is kept for the requests that waited for it."""
        self._check_running()
        model.load_error = None
        try:
            with anyio.CancelScope() as self._loading:
                await self._load_evicting(model, evict)
        except Exception as exc:
            model.load_error = exc
            raise
        finally:
            self._loading = None
            model.tries_over += 1
        self._check_running()  # closed while it loaded: the load was cancelled

    async def _load_evicting(self, model: _Model, evict: bool) -> None:
        assert self._tg is not None
        await model.stopped.wait()  # an unload in progress finishes first
        while True:
            try:
                await self._tg.start(self._serve, model)
            except ModelDoesNotFitError as exc:
                victim = self._least_recently_used(model) if evict else None
                if victim is None:
                    loaded = [m.name for m in self.models.values() if m.engine is not None]
                    if loaded:
                        exc.add_note(
                            f"loaded now, each with requests in flight: {', '.join(loaded)}"
                        )
                    raise
                # Not READY from now: a request arriving before the victim's own task
                # runs must wait for a load, not take servers that are about to stop.
                victim.state = ModelState.UNLOADING
                victim.evict.set()
                await victim.stopped.wait()
            else:
                return

    def _least_recently_used(self, wanted: _Model) -> _Model | None:
        idle = [
            m
            for m in self.models.values()
            if m is not wanted and m.state is ModelState.READY and not m.in_flight
        ]
        return min(idle, key=lambda m: m.last_used) if idle else None

    # ----------------------------------------------------------------- requests
    def model_of(self, request: Request) -> _Model:
        body = request.body
        name = body.get("model") if isinstance(body, dict) else None
        if name is None or name == "":
            name = self.default
        model = self.models.get(name) if isinstance(name, str) else None
        if model is None:
            names = ", ".join(self.models)
            raise ModelNotFoundError(
                f"this engine serves no model {name!r}; its models: {names} "
                "(pass model= one of them)",
                model=str(name),
                tried=list(self.models),
            )
        return model

    async def acquire(self, model: _Model) -> AsyncEngine:
        """``model``'s running engine, loaded first if need be; counted as in use."""
        while (engine := model.ready_engine()) is None:
            self._check_running()
            tries_over = model.tries_over
            async with self._load_lock:
                if model.ready_engine() is not None:  # loaded while this one waited
                    continue
                if model.tries_over != tries_over and model.load_error is not None:
                    # The load this request waited for failed: its error, not a try per
                    # waiting request (each could take ready_timeout). The same object, as
                    # a future gives each awaiter.
                    raise model.load_error
                await self._load(model)
        model.in_flight += 1  # no await since the check: an idle unload cannot start now
        model.last_used = time.monotonic()
        return engine

    @staticmethod
    def release(model: _Model) -> None:
        model.in_flight -= 1
        model.last_used = time.monotonic()

    def open_stream(self, request: Request, observer: RequestObserver | None) -> Source:
        return _ModelSource(self, self.model_of(request), request, observer)

    async def send(self, request: Request, observer: RequestObserver | None) -> Reply:
        if request.method == "GET" and request.path == "/v1/models":
            return self._list()
        model = self.model_of(request)
        engine = await self.acquire(model)
        try:
            return await engine._dispatcher.send(request, observer)
        finally:
            self.release(model)

    def _list(self) -> Reply:
        """``GET /v1/models``: every model of the engine, loaded or not (OpenAI's shape)."""
        data = [
            {
                "id": m.name,
                "object": "model",
                "created": 0,
                "owned_by": "llamatelemetry_async",
                "status": m.state.value,
            }
            for m in self.models.values()
        ]
        content = msgspec.json.encode({"object": "list", "data": data})
        return Reply(200, content, "engine:/v1/models", "application/json")

    def states(self) -> dict[str, ModelState]:
        return {name: m.state for name, m in self.models.items()}

    def loaded(self) -> list[tuple[str, AsyncEngine]]:
        return [(m.name, m.engine) for m in self.models.values() if m.engine is not None]


class _ModelSource(Source):
    """A stream's source that loads its model first, then reads the model's own source."""

    def __init__(
        self,
        models: _ModelSet,
        model: _Model,
        request: Request,
        observer: RequestObserver | None,
    ) -> None:
        self._models = models
        self._model = model
        self._request = request
        self._observer = observer
        self._inner: Source | None = None
        self._stream: weakref.ref[TokenStream[Any]] | None = None
        self._held = False
        self.url = f"engine:{request.path}"

    def bind(self, stream: TokenStream[Any]) -> None:
        self._stream = weakref.ref(stream)

    def served_by(self) -> tuple[str, str | None, tuple[int, ...]]:
        return self._inner.served_by() if self._inner is not None else (self.url, None, ())

    async def open(self, sink: Callable[[bytes], None], backlog: Callable[[], int]) -> None:
        engine = await self._models.acquire(self._model)
        self._held = True
        try:
            inner = self._inner = engine._dispatcher.open_stream(self._request, self._observer)
            stream = self._stream() if self._stream is not None else None
            if stream is not None:
                inner.bind(stream)
            await inner.open(sink, backlog)
        except BaseException:
            self._done()  # the model is not in use by a request that never started
            raise
        self.url = inner.url

    async def fill(self) -> bool:
        assert self._inner is not None
        return await self._inner.fill()

    def taken(self) -> None:
        if self._inner is not None:
            self._inner.taken()

    async def finish(self) -> None:
        try:
            if self._inner is not None:
                await self._inner.finish()
        finally:
            self._done()

    async def abort(self) -> None:
        try:
            if self._inner is not None:
                await self._inner.abort()
        finally:
            self._done()

    def _done(self) -> None:
        if self._held:
            self._held = False
            self._models.release(self._model)
