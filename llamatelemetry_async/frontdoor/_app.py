"""``FrontDoor``: the ASGI application (Starlette routing) in front of an ``AsyncEngine``.

Lifecycle: ``async with door`` (or the ASGI lifespan, when a server such as uvicorn runs
the door itself) starts the engine in a task of the door's own task group, so the door
answers while the servers load (``/health`` 503, requests 503 with ``Retry-After``). On
exit it drains: ``/health`` and new requests get 503, requests in flight may finish for
``drain_timeout`` seconds, then the engine stops (streams still open end with an error event).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hmac
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from typing import Any, Final, Literal, Self

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, Router
from starlette.types import Receive, Scope, Send

from .._errors import (
    ConfigError,
    DeadlineExceeded,
    EngineBusyError,
    EngineError,
    HTTPStatusError,
    LlamaError,
    ModelNotFoundError,
    ServerCrashedError,
    TransportError,
    UsageError,
)
from .._groups import Background, single_error
from ..client import Reply
from ..engine import AsyncEngine
from ._prometheus import exposition
from ._relay import error_body, extras, relay, splice, watching
from ._telemetry import HttpTelemetry

__all__ = ["FrontDoor"]

logger = logging.getLogger("llamatelemetry_async.frontdoor")

State = Literal["starting", "ready", "draining", "closed", "failed"]

_JSON: Final = "application/json"
_CLIENT_GONE: Final = 499  # counted as nginx does: the client closed the request
# POST paths relayed to the engine, and those of them that stream when the body says so.
_FORWARDED: Final = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/completion",
    "/infill",
    "/tokenize",
    "/detokenize",
    "/rerank",
    "/v1/rerank",
)
_STREAMING: Final = frozenset({"/v1/chat/completions", "/v1/completions", "/completion", "/infill"})


class _Refused(Exception):
    """A request answered with an error before reaching the engine."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


class FrontDoor(anyio.AsyncContextManagerMixin):
    """One OpenAI-compatible HTTP front door for ``engine``: an ASGI application.

    ```python
    door = FrontDoor(engine, api_keys=["s3cret"])
    uvicorn.run(door, host="127.0.0.1", port=8080)  # starts the engine, stops it on exit
    ```

    Every route but ``/health`` needs ``Authorization: Bearer KEY`` with one of
    ``api_keys`` (not the keys the engine gives its servers); ``auth=False`` serves without
    keys, and must be asked for. Requests go through the engine's router: slots, waiting
    line, retries, crash handling, telemetry. Errors are HTTP: 401 without a valid key, 400
    for a body that is not a JSON object, 413 past ``max_body`` bytes (8 MiB; the body is decoded
    on the event loop), 429 with
    ``Retry-After`` when the engine's waiting line is full, 503 with ``Retry-After`` while
    starting, draining or with no server able to serve, a server's own 4xx/5xx passed on
    with its body, 502 when the server broke, 504 past a deadline.

    Run by an ASGI server, the door handles the lifespan itself (``uvicorn.run(door)``: uvicorn
    waits for open connections before the lifespan ends, so set its
    ``timeout_graceful_shutdown``; ``llamatelemetry-async serve`` drains first). Mounted in an
    application (``app.mount("/llm", door)``), it gets no lifespan: enter it from the
    application's own (``FastAPI(lifespan=door.lifespan)``, or ``async with door:``). An
    engine that is already running is used as it is, and left running on exit.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        api_keys: Iterable[str] | None = None,
        auth: bool = True,
        drain_timeout: float = 30.0,
        retry_after: float = 1.0,
        max_body: int = 8 * 1024 * 1024,
    ) -> None:
        if not isinstance(engine, AsyncEngine):
            raise ConfigError(
                f"engine must be an AsyncEngine, not {type(engine).__name__}", field="engine"
            )
        keys = tuple(api_keys or ())
        for key in keys:
            if not isinstance(key, str) or not key or key != key.strip() or not key.isprintable():
                raise ConfigError(
                    "each API key must be a non-empty printable string without spaces around it",
                    field="api_keys",
                )
        if auth and not keys:
            raise ConfigError(
                "no api_keys: pass the keys clients present as `Authorization: Bearer KEY`, "
                "or auth=False to serve without authentication",
                field="api_keys",
            )
        if not auth and keys:
            raise ConfigError("api_keys with auth=False: pass one or the other", field="auth")
        for name, value in (("drain_timeout", drain_timeout), ("retry_after", retry_after)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{name} must be >= 0 seconds, got {value!r}", field=name)
        if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 1:
            raise ConfigError(
                f"max_body must be a positive int, got {max_body!r}", field="max_body"
            )
        self.engine = engine
        self._keys = tuple(key.encode() for key in keys)
        self.drain_timeout = float(drain_timeout)
        self.retry_after = retry_after
        self.max_body = max_body
        self.state: State = "starting"
        """``"starting"`` (the engine is starting), ``"ready"``, ``"draining"``, ``"closed"``,
        or ``"failed"`` (the engine could not start: ``error`` says why)."""
        self.error: BaseException | None = None
        self.in_flight = 0
        """Requests being answered now (``/health`` and ``/metrics`` not counted)."""
        self.answered: collections.Counter[tuple[str, int]] = collections.Counter()
        """Requests answered so far, by (route, status)."""
        self._entered = False
        self._ready: anyio.Event | None = None
        self._stop: anyio.Event | None = None
        self._idle: anyio.Event | None = None
        self._starting: anyio.CancelScope | None = None
        self._background = Background(self)
        self._http = HttpTelemetry.of(engine)
        routes = [
            Route("/health", self._health, methods=["GET"]),
            Route("/livez", self._live, methods=["GET"]),
            Route("/metrics", self._metrics, methods=["GET"]),
            Route("/servers", self._servers, methods=["GET"]),
            Route("/v1/models", self._models, methods=["GET"]),
        ]
        routes += [Route(path, _Forward(self, path), methods=["POST"]) for path in _FORWARDED]
        self._router = Router(routes=routes, redirect_slashes=False, default=_not_found)

    # ----------------------------------------------------------------- lifecycle
    @contextlib.asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        if self._entered:
            raise UsageError("this FrontDoor was already started; make a new one")
        self._entered = True
        self._ready = anyio.Event()
        self._stop = anyio.Event()
        self._starting = anyio.CancelScope()
        with single_error():
            async with anyio.create_task_group() as tg:
                if self.engine.running:
                    self._set_ready()
                else:
                    tg.start_soon(self._run_engine)
                try:
                    yield self
                finally:
                    with anyio.CancelScope(shield=True):
                        await self.drain()
                    if not self._ready.is_set():  # still starting: stop that now
                        self._starting.cancel()
                    self.state = "closed"
                    self._stop.set()
                    self._ready.set()  # nobody waits for a start that will not come

    async def start(self) -> Self:
        """Start without ``async with`` (a notebook cell; asyncio): ``await door.aclose()``."""
        await self._background.start("FrontDoor(...)")
        return self

    async def aclose(self) -> None:
        """Drain, then stop the engine (if the door started it); again: nothing."""
        await self._background.stop()

    async def _run_engine(self) -> None:
        assert self._stop is not None
        assert self._starting is not None
        try:
            with self._starting:
                async with self.engine:
                    self._set_ready()
                    await self._stop.wait()
        except Exception as exc:
            # Raised into the door's task group, which cancels the body of `async with
            # door` and raises this error as itself; waiters elsewhere wake on exit.
            if self.state == "starting":
                self.state = "failed"
                self.error = exc
            raise

    def _set_ready(self) -> None:
        if self.state == "starting":
            self.state = "ready"
        assert self._ready is not None
        self._ready.set()

    async def wait_ready(self) -> None:
        """Wait until the engine takes requests; ``EngineError`` if it could not start."""
        if self._ready is None:
            raise UsageError("the door is not running: use `async with door:` first")
        await self._ready.wait()
        if self.error is not None:
            raise EngineError(f"the engine did not start: {self.error}") from self.error
        if not self.engine.running:
            raise EngineError("the front door closed before the engine was ready")

    async def drain(self, timeout: float | None = None) -> None:
        """Stop taking requests (503, ``/health`` too) and let those in flight finish.

        Waits at most ``timeout`` seconds (``drain_timeout`` by default); what is still in
        flight then ends when the engine stops.
        """
        if self.state in ("starting", "ready"):
            self.state = "draining"
        if self._idle is None:  # one event for every drain waiting (set at zero in flight)
            self._idle = anyio.Event()
        if self.in_flight:
            with anyio.move_on_after(self.drain_timeout if timeout is None else timeout):
                await self._idle.wait()

    def cut_drain(self) -> None:
        """End a drain now: requests still in flight end when the engine stops (a second
        Ctrl-C). From the event loop's thread."""
        if self.state in ("starting", "ready"):
            self.state = "draining"
        if self._idle is None:
            self._idle = anyio.Event()
        self._idle.set()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object) -> AsyncIterator[None]:
        """The door's lifetime inside an application's: ``FastAPI(lifespan=door.lifespan)``."""
        async with self:
            yield

    # ----------------------------------------------------------------- ASGI
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif self._http is None or scope["type"] != "http":
            await self._router(scope, receive, send)
        else:
            await self._http.serve(self._router, scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        started = False
        try:
            async with self:
                started = True
                await send({"type": "lifespan.startup.complete"})
                await receive()  # lifespan.shutdown
        except Exception as exc:
            kind = "shutdown" if started else "startup"
            await send({"type": f"lifespan.{kind}.failed", "message": str(exc)})
            raise
        await send({"type": "lifespan.shutdown.complete"})

    # ----------------------------------------------------------------- admission
    def _admit(self, scope: Scope) -> None:
        """Raise ``_Refused`` for a request without a valid key, or while not ready."""
        if self._keys and not self._authorized(scope):
            raise _Refused(
                error_response(
                    401,
                    "a valid API key is needed: send `Authorization: Bearer KEY`",
                    "invalid_request_error",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            )
        if self.state != "ready":
            why = {
                "starting": "the servers are starting",
                "draining": "the front door is shutting down",
                "closed": "the front door is closed",
                "failed": f"the engine could not start: {self.error}",
            }[self.state]
            raise _Refused(self._unavailable(f"{why}; retry shortly"))

    def _authorized(self, scope: Scope) -> bool:
        given = [value for name, value in scope["headers"] if name == b"authorization"]
        if len(given) != 1:  # none, or several: which one counts would be a guess
            return False
        scheme, _, token = given[0].partition(b" ")
        token = token.strip()
        # Every key is compared, in constant time each: no early exit to time.
        found = False
        for key in self._keys:
            found |= hmac.compare_digest(token, key)
        return scheme.lower() == b"bearer" and found

    def _unavailable(self, message: str) -> Response:
        return error_response(
            503, message, "unavailable_error", headers={"Retry-After": self._retry_after()}
        )

    def _retry_after(self) -> str:
        return str(max(1, math.ceil(self.retry_after)))

    def _refusal(self, exc: LlamaError) -> Response:
        """The HTTP answer to a request the engine could not serve."""
        if isinstance(exc, HTTPStatusError) and exc.status_code is not None:
            body = msgspec.json.encode(exc.body) if exc.body is not None else None
            if body is None:
                return error_response(exc.status_code, exc.message, exc.error_type or "error")
            return Response(body, exc.status_code, media_type=_JSON)
        if isinstance(exc, ModelNotFoundError):  # a model= the engine does not serve
            return error_response(404, str(exc), "invalid_request_error", code="model_not_found")
        if isinstance(exc, EngineBusyError):
            return error_response(
                429, str(exc), "rate_limit_error", headers={"Retry-After": self._retry_after()}
            )
        if isinstance(exc, EngineError):  # no server ready, every one failed, closing
            return self._unavailable(str(exc).split("\n", 1)[0])
        if isinstance(exc, DeadlineExceeded):
            return error_response(504, str(exc), "timeout_error")
        if isinstance(exc, ServerCrashedError | TransportError):
            return error_response(502, str(exc), "server_error")
        if isinstance(exc, UsageError):
            return error_response(400, str(exc), "invalid_request_error")
        return error_response(500, str(exc), "server_error")

    def _begin(self) -> None:
        self.in_flight += 1

    def _end(self) -> None:
        self.in_flight -= 1
        if not self.in_flight and self._idle is not None:
            self._idle.set()

    # ----------------------------------------------------------------- routes
    async def _health(self, request: Request) -> Response:
        ready = sum(1 for info in self.engine.servers if info.state == "ready")
        state: str = self.state
        if state == "ready" and not ready:
            state = "unavailable"  # every server is down or restarting
        body = {"status": "ok" if state == "ready" else state, "ready_servers": ready}
        if self.error is not None:
            body["error"] = str(self.error).split("\n", 1)[0]
        headers = None if state == "ready" else {"Retry-After": self._retry_after()}
        status = 200 if state == "ready" else 503
        return Response(msgspec.json.encode(body), status, headers, media_type=_JSON)

    async def _live(self, request: Request) -> Response:
        # Liveness: the door answers, whatever the servers do (a long model load is not a
        # reason to restart the process; /health is the readiness probe).
        return Response(b'{"status":"alive"}', media_type=_JSON)

    async def _metrics(self, request: Request) -> Response:
        try:
            self._admit(request.scope)
        except _Refused as refused:
            if refused.response.status_code == 401:
                return refused.response
        text = await exposition(self)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _servers(self, request: Request) -> Response:
        try:
            self._admit(request.scope)
        except _Refused as refused:
            if refused.response.status_code == 401:
                return refused.response
        # Not the log lines (llama-server echoes parts of requests into them: one key
        # holder's content for every other), nor any user:password in a server's URL.
        servers = []
        for info in self.engine.servers:
            entry = dataclasses.asdict(info)
            del entry["recent_logs"]
            entry["url"] = _without_userinfo(info.url)
            servers.append(entry)
        return Response(msgspec.json.encode({"servers": servers}), media_type=_JSON)

    async def _models(self, request: Request) -> Response:
        try:
            self._admit(request.scope)
            reply = await self.engine.forward("GET", "/v1/models")
        except _Refused as refused:
            return refused.response
        except LlamaError as exc:
            return self._refusal(exc)
        return Response(reply.content, media_type=reply.content_type or _JSON)


class _Forward:
    """One POST route: the body, checked, through the engine (relayed when it streams)."""

    def __init__(self, door: FrontDoor, path: str) -> None:
        self.door = door
        self.path = path
        self.streams = path in _STREAMING

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        door = self.door
        try:
            door._admit(scope)
        except _Refused as refused:
            door.answered[self.path, refused.response.status_code] += 1
            await refused.response(scope, receive, send)
            return
        status = 500  # what an exception out of _answer means
        door._begin()
        try:
            status = await self._answer(scope, receive, send)
        finally:
            door._end()
            door.answered[self.path, status] += 1

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> int:
        """Answer the request; the status sent."""
        door = self.door
        engine = door.engine
        try:
            body = await _read_json(receive, door.max_body)
        except _Refused as refused:
            if refused.response.status_code != _CLIENT_GONE:
                await refused.response(scope, receive, send)
            return refused.response.status_code
        response: Response
        if self.streams and body.get("stream"):
            try:
                stream = engine.forward_stream(self.path, body)
            except LlamaError as exc:
                response = door._refusal(exc)
            else:
                statuses: list[int] = []

                async def refuse(exc: LlamaError) -> None:
                    answer = door._refusal(exc)
                    statuses.append(answer.status_code)
                    await answer(scope, receive, send)

                await relay(stream, receive, send, refuse)
                return statuses[0] if statuses else 200
        else:
            # A client that leaves takes its request out of the waiting line. One already
            # sent runs on in llama-server (b11434 stops only streams), though nobody waits.
            reply: Reply | None = None
            try:
                with anyio.CancelScope() as waiting:

                    async def gone() -> None:
                        waiting.cancel()

                    async with watching(receive, gone):
                        reply = await engine.forward("POST", self.path, body)
            except LlamaError as exc:
                response = door._refusal(exc)
            else:
                if reply is None:
                    return _CLIENT_GONE
                gpu = extras(reply.gpu)
                content = splice(reply.content, gpu) if gpu else reply.content
                response = Response(content, reply.status, media_type=reply.content_type or _JSON)
        await response(scope, receive, send)
        return response.status_code


def _without_userinfo(url: str | None) -> str | None:
    if url is None or "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


async def _read_json(receive: Receive, limit: int) -> dict[str, Any]:
    """The request body as a JSON object; ``_Refused`` (400, 413) otherwise."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Refused(Response(status_code=_CLIENT_GONE))  # counted; nobody to answer
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _Refused(
                error_response(
                    413, f"the body is larger than {limit} bytes", "invalid_request_error"
                )
            )
        parts.append(chunk)
        if not message.get("more_body", False):
            break
    try:
        body = msgspec.json.decode(b"".join(parts))
    except (msgspec.DecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise _Refused(
            error_response(400, f"the body is not valid JSON: {why}", "invalid_request_error")
        ) from None
    if not isinstance(body, dict):
        raise _Refused(
            error_response(
                400,
                f"the body must be a JSON object, not {type(body).__name__}",
                "invalid_request_error",
            )
        )
    return body


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        message = f"no route {scope['path']}: see /v1/models, /v1/chat/completions, /health"
        await error_response(404, message, "not_found_error")(scope, receive, send)


def error_response(
    status: int,
    message: str,
    kind: str,
    *,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    return Response(error_body(status, message, kind, code), status, headers, media_type=_JSON)
