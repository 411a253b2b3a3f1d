"""The engine's dispatcher: the client's requests, routed over backends.

A generation request takes a slot on the least busy ready backend (``Router``), goes to that
backend's own ``HttpDispatcher``, and gives the slot back when it ends. A request that failed
before the server could have taken it (connection refused, 503 "loading model") is retried on
another backend with backoff, at most ``retries`` times; one whose request was written is
never sent again (a prompt that crashes llama-server must not take down a second one).
Requests that need no slot (tokenize, props, health...) go to any ready backend.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import anyio
import msgspec

from .._errors import (
    ClientClosedError,
    ConnectError,
    ConnectTimeout,
    EngineError,
    HTTPStatusError,
    LlamaError,
    ReadError,
    RemoteProtocolError,
)
from ..client import (
    AsyncLlamaClient,
    Dispatcher,
    Reply,
    Request,
    RequestObserver,
    Source,
    TokenStream,
)
from ._backends import Backend, BackendContext
from ._energy_book import EnergyBook

__all__ = ["RoutedDispatcher"]

# What a dying server (or the engine closing its connections) looks like to a reader.
_BROKEN = (ReadError, ConnectError, ConnectTimeout, ClientClosedError, RemoteProtocolError)
_RETRY_DELAY = 0.05  # first backoff between attempts; doubles


def _not_taken(exc: LlamaError) -> bool:
    """True if the server provably did not take the request: safe to send elsewhere."""
    if isinstance(exc, ConnectError | ConnectTimeout | ClientClosedError):
        return True
    return isinstance(exc, HTTPStatusError) and exc.status_code == 503


class _Usage(msgspec.Struct):
    completion_tokens: int = 0


class _Counts(msgspec.Struct):
    usage: _Usage | None = None
    tokens_predicted: int = 0


_counts = msgspec.json.Decoder(_Counts).decode


class RoutedDispatcher(Dispatcher):
    """Routes each request to one of ``backends`` (see the module's docstring)."""

    def __init__(
        self,
        backends: list[Backend],
        ctx: BackendContext,
        *,
        retries: int,
        is_open: Callable[[], bool],
        energy: Callable[[Backend], EnergyBook | None],
    ) -> None:
        self.backends = backends
        self._ctx = ctx
        self.retries = retries
        self._is_open = is_open
        self._energy = energy

    def _backend(self, name: str) -> Backend:
        for backend in self.backends:
            if backend.name == name:
                return backend
        raise KeyError(name)

    def any_ready(self) -> Backend:
        """A ready backend for a request that needs no slot (the least busy)."""
        ready = [b for b in self.backends if b.client is not None and b.member.ready]
        healthy = [b for b in ready if b.member.healthy] or ready
        if not healthy:
            raise EngineError("no server is ready (all are starting or down); try again shortly")
        return min(healthy, key=lambda b: b.member.outstanding)

    async def failure(self, backend: Backend, exc: LlamaError) -> LlamaError:
        """What a broken request means: the engine closed, the server died, or ``exc``."""
        if not self._is_open():
            return EngineError("the engine is closed")
        return await backend.failure(exc)

    def _attempts(self, request: Request) -> int:
        retries = request.options.retries
        return 1 + (self.retries if retries is None else retries)

    def open_stream(self, request: Request, observer: RequestObserver | None) -> Source:
        return _RoutedSource(self, request, observer)

    async def send(self, request: Request, observer: RequestObserver | None) -> Reply:
        if not request.slot:
            backend = self.any_ready()
            assert backend.client is not None
            if observer is not None:
                observer.on_server(backend.url or "", backend.name, backend.gpus)
            try:
                return await backend.client.dispatcher.send(request, None)
            except _BROKEN as exc:
                raise await self.failure(backend, exc) from exc
        router = self._ctx.router
        attempts = self._attempts(request)
        failed: list[str] = []
        for attempt in range(attempts):
            member = await router.acquire()
            backend = self._backend(member.name)
            release = router.releaser(member)
            energy = self._energy(backend)
            key = energy.begin(backend.gpus, lambda: 0) if energy is not None else None
            try:
                client = _client_of(backend)
                if observer is not None:
                    observer.on_server(backend.url or "", backend.name, backend.gpus)
                reply = await client.dispatcher.send(request, None)
            except (*_BROKEN, HTTPStatusError) as exc:
                release()
                if energy is not None:
                    energy.end(key, 0)
                await self.next_attempt(backend, exc, attempt, attempts, failed, observer)
                continue
            except BaseException:
                release()
                if energy is not None:
                    energy.end(key, 0)
                raise
            release()
            if energy is not None:
                figures = energy.end(key, _completion_tokens(reply))
                if figures:
                    reply.gpu = figures
                    if observer is not None:
                        observer.annotate(figures)
            return reply
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def next_attempt(
        self,
        backend: Backend,
        exc: LlamaError,
        attempt: int,
        attempts: int,
        failed: list[str],
        observer: RequestObserver | None,
    ) -> None:
        """After attempt ``attempt`` failed with ``exc``: return (after a backoff) to try
        another server, or raise what the failure means.

        Only a request the server provably did not take is tried again; one that reached it
        is never sent twice (a prompt that crashes llama-server must not take down another).
        """
        if _not_taken(exc):
            backend.report(exc, self._ctx)
            if attempt + 1 < attempts and self._is_open():
                _note_retry(observer, failed, backend.name, exc)
                await anyio.sleep(_RETRY_DELAY * 2**attempt)  # backoff before the next server
                return
        if isinstance(exc, HTTPStatusError):
            raise exc
        raise await self.failure(backend, exc) from exc

    async def aclose(self) -> None:
        for backend in self.backends:
            client = backend.client
            if client is not None:
                await client.aclose()


def _client_of(backend: Backend) -> AsyncLlamaClient:
    """The backend's client; gone if it left service while a request waited for it."""
    client = backend.client
    if client is None:
        raise ClientClosedError(f"server {backend.name} left service before the request")
    return client


def _completion_tokens(reply: Reply) -> int:
    try:
        counts = _counts(reply.content)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return 0
    return counts.usage.completion_tokens if counts.usage is not None else counts.tokens_predicted


def _note_retry(
    observer: RequestObserver | None, failed: list[str], server: str, exc: BaseException
) -> None:
    """Record a failed attempt on the request's span: how many, and each one's server."""
    failed.append(f"{server}: {type(exc).__name__}")
    if observer is not None:
        observer.annotate(
            {
                "llamatelemetry.request.attempts": len(failed) + 1,
                "llamatelemetry.request.failed_attempts": tuple(failed),
            }
        )


class _RoutedSource(Source):
    """A stream source that first takes a slot from the router, then reads its server.

    It knows its stream only weakly: a stream dropped without ``aclose()`` must be freed by
    reference counting alone (its finalizer closes it), not wait for a GC pass.
    """

    def __init__(
        self, routes: RoutedDispatcher, request: Request, observer: RequestObserver | None
    ) -> None:
        self._routes = routes
        self._request = request
        self._observer = observer
        self._stream: weakref.ref[TokenStream[Any]] | None = None
        self._chunks = 0  # the stream's count, kept when the stream itself is gone
        self._energy: int | None = None
        self._inner: Source | None = None
        self._backend: Backend | None = None
        self._release: Callable[[], None] = _nothing
        self._aborted = False
        self.url = f"engine:{request.path}"

    def bind(self, stream: TokenStream[Any]) -> None:
        self._stream = weakref.ref(stream)

    def served_by(self) -> tuple[str, str | None, tuple[int, ...]]:
        backend = self._backend
        if backend is None:
            return self.url, None, ()
        return self.url, backend.name, backend.gpus

    async def open(self, sink: Callable[[bytes], None], backlog: Callable[[], int]) -> None:
        routes = self._routes
        router = routes._ctx.router
        attempts = routes._attempts(self._request)
        failed: list[str] = []
        for attempt in range(attempts):
            member = await router.acquire()
            backend = self._backend = routes._backend(member.name)
            self._release = router.releaser(member)
            try:
                client = _client_of(backend)
                inner = self._inner = client.dispatcher.open_stream(self._request, None)
                self.url = inner.url
                await inner.open(sink, backlog)
            except (*_BROKEN, HTTPStatusError) as exc:
                self._release()
                await routes.next_attempt(backend, exc, attempt, attempts, failed, self._observer)
                continue
            except BaseException:
                self._release()
                raise
            energy = routes._energy(backend)
            if energy is not None:
                self._energy = energy.begin(backend.gpus, self._tokens)
            return

    def _tokens(self) -> int:
        stream = self._stream() if self._stream is not None else None
        if stream is not None:
            self._chunks = stream.chunks
        return self._chunks

    def _account(self) -> None:
        """The request's GPU figures onto its span (once, at the end)."""
        key, self._energy = self._energy, None
        if key is None or self._backend is None:
            return
        energy = self._routes._energy(self._backend)
        if energy is None:
            return
        stream = self._stream() if self._stream is not None else None
        usage = stream.usage if stream is not None else None
        figures = energy.end(key, usage.completion_tokens if usage else self._tokens())
        if not figures:
            return
        if stream is not None:
            stream.gpu = figures
        if self._observer is not None:
            self._observer.annotate(figures)

    async def fill(self) -> bool:
        assert self._inner is not None
        assert self._backend is not None
        try:
            return await self._inner.fill()
        except _BROKEN as exc:
            if self._aborted:  # our own abort() broke the read
                raise
            raise await self._routes.failure(self._backend, exc) from exc

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


def _nothing() -> None:
    return None
