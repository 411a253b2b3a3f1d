"""``TokenStream``: an SSE response read as an async iterator of typed chunks.

The per-token path: the connection parses HTTP chunks straight into the SSE decoder
(inside ``data_received`` on asyncio), the stream takes the finished ``data`` payloads in
batches and decodes each with one msgspec call. No per-token allocation beyond the
chunk object itself, no per-token timer, no per-token task switch when events arrive
together.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator, Mapping
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import anyio
import httpx
import msgspec

from .._errors import (
    DeadlineExceeded,
    LlamaError,
    RemoteProtocolError,
    StreamConsumedError,
    StreamError,
    UsageError,
)
from ._connection import Connection, current_backend
from ._errors_map import (
    MAX_ERROR_BODY,
    close_response,
    map_httpx_error,
    read_status_error,
    status_error,
)
from ._observe import RequestObserver
from ._pool import ConnectionPool, Timeouts
from ._sse import SSEDecoder
from ._types import (
    ChatChunk,
    CompletionChunk,
    TextCompletionChunk,
    Timings,
    Usage,
    native_finish_reason,
)

__all__ = ["HttpxSource", "PoolSource", "Source", "TokenStream"]

ChunkT = TypeVar("ChunkT", CompletionChunk, ChatChunk, TextCompletionChunk)

logger = logging.getLogger("llamatelemetry_async.client")

_NEW, _OPEN, _FINISHING, _DONE, _CLOSED = range(5)
_AsyncFn = Callable[[], Coroutine[Any, Any, None]]


class Source(abc.ABC):
    """Where a stream's bytes come from: the O(1) pool, any httpx client, or a router."""

    url: str

    def served_by(self) -> tuple[str, str | None, tuple[int, ...]]:
        """URL, server name and GPUs of the server that answered (known once opened)."""
        return self.url, None, ()

    def bind(self, stream: TokenStream[Any]) -> None:
        """Called once with the stream that reads this source (a router counts its tokens)."""
        return

    @abc.abstractmethod
    async def open(self, sink: Callable[[bytes], None], backlog: Callable[[], int]) -> None:
        """Send the request; raise ``HTTPStatusError`` for an error status."""

    @abc.abstractmethod
    async def fill(self) -> bool:
        """Feed more body bytes to the sink; ``False`` once the body has ended."""

    @abc.abstractmethod
    def taken(self) -> None:
        """The consumer took what was buffered (lets a paused connection read again)."""

    @abc.abstractmethod
    async def finish(self) -> None:
        """Read the body to its end and give the connection back for reuse."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """Abandon the response: close its connection (the server stops generating)."""


class PoolSource(Source):
    __slots__ = ("_body", "_conn", "_head", "_host", "_pool", "_port", "_timeouts", "url")

    def __init__(
        self,
        pool: ConnectionPool,
        host: str,
        port: int,
        head: bytes,
        body: bytes,
        timeouts: Timeouts,
        url: str,
    ) -> None:
        self._pool = pool
        self._host = host
        self._port = port
        self._head = head
        self._body = body
        self._timeouts = timeouts
        self._conn: Connection | None = None
        self.url = url

    async def open(self, sink: Callable[[bytes], None], backlog: Callable[[], int]) -> None:
        conn = await self._pool.request(
            self._host, self._port, self._head, self._body, self._timeouts
        )
        head = conn.parser.head
        assert head is not None
        if head.status >= 400:
            pieces: list[bytes] = []
            try:
                conn.parser.set_sink(pieces.append)
                while not conn.parser.done and sum(map(len, pieces)) < MAX_ERROR_BODY:
                    await conn.wait()
            finally:
                await (self._pool.release if conn.parser.done else self._pool.discard)(conn)
            raise status_error(head.status, b"".join(pieces), self.url)
        try:
            check_stream_head(
                head.status, head.get(b"content-type"), head.get(b"content-encoding"), self.url
            )
        except RemoteProtocolError:
            await self._pool.discard(conn)
            raise
        self._conn = conn  # from here on, abort() owns it
        conn.watch_buffer(backlog)
        conn.parser.set_sink(sink)  # may raise: bytes that came with the head are parsed now

    async def fill(self) -> bool:
        conn = self._conn
        assert conn is not None
        if conn.parser.done:
            return False
        await conn.wait()
        return True

    def taken(self) -> None:
        if self._conn is not None:
            self._conn.resume_if_drained()

    async def finish(self) -> None:
        conn = self._conn
        assert conn is not None
        conn.parser.sink = _ignore  # events after the last one are not the user's
        while not conn.parser.done:
            await conn.wait()
        self._conn = None
        head = conn.parser.head
        if head is not None and head.get(b"server") == b"llama.cpp":
            # llama-server (cpp-httplib) closes the connection after every streamed
            # response although it advertises keep-alive; pooling it would cost the next
            # request a failed round trip and a retry.
            await self._pool.discard(conn)
        else:
            await self._pool.release(conn)

    async def abort(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._pool.discard(conn)


def _ignore(data: bytes) -> None:
    return None


def check_stream_head(
    status: int, content_type: bytes | None, content_encoding: bytes | None, url: str
) -> None:
    """Refuse a 2xx answer to a streaming request that cannot be an SSE stream.

    A proxy's HTML page, a 204 or a compressed body would otherwise read as an empty stream
    that ended normally.
    """
    media = (content_type or b"").split(b";", 1)[0].strip().lower()
    encoded = (content_encoding or b"").strip().lower() not in (b"", b"identity")
    if status == 200 and media == b"text/event-stream" and not encoded:
        return
    if status != 200:
        problem = f"status {status} instead of 200"
    elif media != b"text/event-stream":
        shown = media.decode("latin-1")[:60] or "none"
        problem = f"content type {shown!r} instead of 'text/event-stream'"
    else:
        problem = f"a body encoded with {(content_encoding or b'').decode('latin-1')[:30]!r}"
    raise RemoteProtocolError(
        f"{url} answered a streaming request with {problem}: is this URL a llama-server "
        "(or a proxy that rewrites its answers)?",
        url=url,
    )


class HttpxSource(Source):
    """The portable path through any ``httpx.AsyncClient`` (a user's own, or for TLS)."""

    def __init__(self, http: httpx.AsyncClient, request: httpx.Request) -> None:
        self._http = http
        self._request = request
        self._response: httpx.Response | None = None
        self._chunks: AsyncGenerator[bytes, None] | None = None
        self._sink: Callable[[bytes], None] = _ignore
        self.url = str(request.url)

    async def open(self, sink: Callable[[bytes], None], backlog: Callable[[], int]) -> None:
        try:
            response = await self._http.send(self._request, stream=True)
        except httpx.HTTPError as exc:
            raise map_httpx_error(exc, self.url) from exc
        if response.status_code >= 400:
            raise await read_status_error(response, self.url)
        headers = response.headers
        try:
            check_stream_head(
                response.status_code,
                headers.get("content-type", "").encode("latin-1"),
                headers.get("content-encoding", "").encode("latin-1") or None,
                self.url,
            )
        except RemoteProtocolError:
            await response.aclose()
            raise
        self._response = response
        self._chunks = response.aiter_raw()  # type: ignore[assignment]  # an async generator
        self._sink = sink

    async def fill(self) -> bool:
        chunks = self._chunks
        if chunks is None:
            return False  # aborted
        try:
            data = await chunks.__anext__()
        except StopAsyncIteration:
            return False
        except httpx.HTTPError as exc:
            raise map_httpx_error(exc, self.url) from exc
        except RuntimeError:  # httpx.StreamClosed and kin, after abort() from another task
            if self._response is None:
                return False
            raise
        self._sink(data)
        return True

    def taken(self) -> None:
        return

    async def finish(self) -> None:
        self._sink = _ignore
        while await self.fill():
            pass
        await self.abort()

    async def abort(self) -> None:
        chunks, self._chunks = self._chunks, None
        response, self._response = self._response, None
        if response is not None:
            await close_response(response, chunks)


class TokenStream(Generic[ChunkT]):
    """A streaming response: ``async for chunk in stream`` yields typed chunks.

    Use it as an async context manager (or call ``aclose()``) so the connection is
    released however the loop ends. ``aclose()`` may be called from any task, any number
    of times; closing mid-generation closes the HTTP response and llama-server stops
    generating for it. After the end, ``text``, ``finish_reason``, ``usage`` and
    ``timings`` describe the whole response.

    The request is sent on ``__aenter__`` or on the first ``__anext__``.

    ```python
    async with client.stream("Once upon a time", n_predict=64) as stream:
        async for chunk in stream:  # CompletionChunk, ChatChunk or TextCompletionChunk
            print(chunk.text, end="")
    print(stream.finish_reason, stream.usage, stream.timings)
    ```
    """

    __slots__ = (
        "__weakref__",  # the engine's routed source points back here weakly: no cycle
        "_batch",
        "_deadline",
        "_deadline_at",
        "_decode",
        "_decoder",
        "_done_marker",
        "_final_seen",
        "_observer",
        "_opening",
        "_parts",
        "_pos",
        "_reading",
        "_reported_end",
        "_source",
        "_spawn",
        "_state",
        "chunks",
        "finish_reason",
        "gpu",
        "raw",
        "timings",
        "usage",
    )

    def __init__(
        self,
        source: Source,
        chunk_type: type[ChunkT],
        observer: RequestObserver | None = None,
        *,
        deadline: float | None = None,
    ) -> None:
        if deadline is not None and (
            isinstance(deadline, bool) or not isinstance(deadline, int | float) or not deadline > 0
        ):
            raise UsageError(f"deadline must be a positive number of seconds, got {deadline!r}")
        self._source = source
        source.bind(self)
        self._observer = observer
        self._decode: Callable[[bytes], ChunkT] = _decoder_for(chunk_type)
        self._done_marker = chunk_type is not CompletionChunk  # OpenAI shapes end with [DONE]
        self._decoder = SSEDecoder()
        self._state = _NEW
        self._batch: list[bytes] = []
        self._pos = 0
        self._parts: list[str] = []
        self._final_seen = False
        self._reported_end = False
        self._opening: anyio.CancelScope | None = None
        self._deadline = deadline
        self._deadline_at = float("inf")
        self._reading = False
        self._spawn: Callable[[_AsyncFn], None] | None = None
        self.chunks = 0
        """Chunks yielded so far."""
        self.finish_reason: str | None = None
        """Why generation stopped ("stop", "length", ...), once the stream has ended."""
        self.usage: Usage | None = None
        """Token counts from the server, once the stream has ended."""
        self.timings: Timings | None = None
        """llama.cpp's timings of the request, once the stream has ended."""
        self.gpu: Mapping[str, Any] | None = None
        """The request's GPU figures (energy, joules per token, power, utilization: the
        attributes its span gets), once the stream has ended, when an engine measured them."""
        self.raw: list[bytes] | None = None
        """``None``, or (a stream from ``forward_stream()``) the payload of each event read and
        not yet taken, exactly as the server sent it: also the events that yield no chunk
        (the role delta, the usage chunk, ``[DONE]``). A relay sends them on and clears it."""

    @property
    def url(self) -> str:
        """The URL the request goes to (``engine:/path`` until the engine has routed it)."""
        return self._source.url

    @property
    def text(self) -> str:
        """All text received so far (the whole completion once the stream has ended)."""
        return "".join(self._parts)

    @property
    def closed(self) -> bool:
        """True once the stream has ended or was closed."""
        return self._state in (_DONE, _CLOSED)

    async def __aenter__(self) -> Self:
        if self._state == _NEW:
            await self._open()
        return self  # closed already if aclose() came first: iteration just ends

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ChunkT:
        # The per-token fast path: the next event of the batch already in hand.
        pos = self._pos
        batch = self._batch
        if pos < len(batch) and self._state == _OPEN and not self._final_seen:
            self._pos = pos + 1
            try:
                chunk = self._handle(batch[pos])
            except BaseException as exc:
                await self._fail(exc)
                raise
            if chunk is not None:
                self.chunks += 1
                self._parts.append(chunk.text)
                if self._observer is not None:
                    self._observer.on_chunk(chunk)
                return chunk
        return await self._next_slow()

    async def _next_slow(self) -> ChunkT:
        # Another task may enter only while this one waits (opening, or for bytes).
        if self._reading:
            raise UsageError(
                "another task is already reading this stream; read it from one task "
                "(hand chunks to others through a memory object stream)"
            )
        if self._state == _NEW:
            self._reading = True
            try:
                await self._open()
            finally:
                self._reading = False
        if self._state != _OPEN:
            return self._end_of_iteration()
        try:
            while True:
                batch = self._batch
                while self._pos < len(batch) and not self._final_seen:
                    payload = batch[self._pos]
                    self._pos += 1
                    chunk = self._handle(payload)
                    if chunk is not None:
                        self.chunks += 1
                        self._parts.append(chunk.text)
                        if self._observer is not None:
                            self._observer.on_chunk(chunk)
                        return chunk
                if self._final_seen:
                    await self._finish()
                    return self._end_of_iteration()
                events = self._decoder.events
                if events:
                    self._decoder.events = []
                    self._batch = events
                    self._pos = 0
                    self._source.taken()
                    continue
                self._reading = True
                try:
                    if self._deadline is None:
                        more = await self._source.fill()
                    else:
                        with self._deadline_scope():
                            more = await self._source.fill()
                finally:
                    self._reading = False
                if not more:
                    if self._decoder.events:
                        continue
                    if not self._final_seen:
                        raise RemoteProtocolError(
                            f"the stream from {self.url} ended before its final event "
                            "(the server stopped or a proxy cut the response short)",
                            url=self.url,
                        )
                    await self._finish()
                    return self._end_of_iteration()
                if self._state != _OPEN:
                    return self._end_of_iteration()
        except (LlamaError, httpx.HTTPError) as exc:
            if self._state == _CLOSED:
                # aclose() from another task broke the read: the loop just ends.
                return self._end_of_iteration()
            if isinstance(exc, httpx.HTTPError):
                mapped = map_httpx_error(exc, self.url)
                await self._fail(mapped)
                raise mapped from exc
            await self._fail(exc)
            raise
        except BaseException as exc:
            await self._fail(exc)
            raise

    def _handle(self, payload: bytes) -> ChunkT | None:
        try:
            chunk = self._decode(payload)
        except msgspec.DecodeError as exc:
            if payload.startswith(b'{"error"') or (self._done_marker and payload == b"[DONE]"):
                chunk = None  # not a chunk, but a valid event: handled below
            else:
                # Not the payload itself: it may hold completion text, and errors reach spans.
                # Nor is it kept in raw: a relay must not pass on what did not parse.
                raise RemoteProtocolError(
                    f"{self.url} sent an event of {len(payload)} bytes that is not a valid "
                    f"chunk ({exc})",
                    url=self.url,
                ) from exc
        if self.raw is not None:
            self.raw.append(payload)
        if payload.startswith(b'{"error"'):
            raise _stream_error(payload, self.url)
        if chunk is None:  # [DONE]
            self._final_seen = True
            return None
        if isinstance(chunk, CompletionChunk):
            if chunk.stop:
                self._final_seen = True
                self.finish_reason = native_finish_reason(chunk.stop_type)
                self.timings = chunk.timings
                self.usage = Usage(
                    chunk.tokens_evaluated,
                    chunk.tokens_predicted,
                    chunk.tokens_evaluated + chunk.tokens_predicted,
                )
            if chunk.content:
                return chunk
            if not chunk.stop and _is_error(payload):  # an error event spaced otherwise
                raise _stream_error(payload, self.url)
            return None
        # OpenAI shapes: the finish reason, usage and timings may come on separate chunks.
        choices = chunk.choices
        if chunk.usage is not None:
            self.usage = chunk.usage
        if chunk.timings is not None:
            self.timings = chunk.timings
        if not choices:
            if chunk.usage is None and chunk.timings is None and _is_error(payload):
                raise _stream_error(payload, self.url)  # an error event spaced otherwise
            return None
        choice = choices[0]
        if choice.finish_reason is not None:
            self.finish_reason = choice.finish_reason
        if chunk.text:
            return chunk
        delta = getattr(choice, "delta", None)
        if delta is not None and (delta.reasoning_content or delta.tool_calls):
            return chunk
        return None

    def _end_of_iteration(self) -> ChunkT:
        if self._reported_end:
            raise StreamConsumedError(
                "this stream has already ended or was closed; start a new request "
                "to generate again (its text, usage and timings stay readable)"
            )
        self._reported_end = True
        raise StopAsyncIteration

    async def _open(self) -> None:
        if self._state != _NEW:
            raise UsageError("the stream was already started")
        self._state = _OPEN
        decoder = self._decoder
        # aclose() from another task cancels this scope: a long wait for a slot or for
        # the response head ends at once, and whatever was acquired is released below.
        scope = self._opening = anyio.CancelScope()
        observer = self._observer
        self._spawn = _loop_spawner()
        if self._deadline is not None:
            self._deadline_at = anyio.current_time() + self._deadline
            scope.deadline = self._deadline_at
        try:
            with scope:
                if observer is None:
                    await self._source.open(decoder.feed, decoder.backlog)
                else:
                    with observer.activate():  # an instrumented HTTP client nests under it
                        await self._source.open(decoder.feed, decoder.backlog)
                    observer.on_server(*self._source.served_by())
        except BaseException as exc:
            self._opening = None
            await self._fail(exc)
            raise
        self._opening = None
        if scope.cancelled_caught and self._state != _CLOSED:
            error = self._deadline_error()
            await self._fail(error)
            raise error
        if self._state == _CLOSED:
            await self._source.abort()

    @contextlib.contextmanager
    def _deadline_scope(self) -> Iterator[None]:
        with anyio.CancelScope(deadline=self._deadline_at) as scope:
            yield
        if scope.cancelled_caught:
            raise self._deadline_error()

    def _deadline_error(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"the stream from {self.url} did not finish within its deadline of "
            f"{self._deadline} s; pass a larger deadline= or none",
            url=self.url,
        )

    async def _finish(self) -> None:
        self._state = _FINISHING
        try:
            await self._source.finish()
        except BaseException as exc:
            await self._fail(exc)
            raise
        if self._state == _FINISHING:
            self._state = _DONE
            observer, self._observer = self._observer, None
            if observer is not None:
                observer.on_end(self)

    async def _fail(self, exc: BaseException | None) -> None:
        self._state = _CLOSED
        self._reported_end = True
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.on_error(exc)
        await self._source.abort()

    async def aclose(self) -> None:
        """Stop the stream and release its connection; safe from any task, twice."""
        if self._state in (_DONE, _CLOSED):
            return
        self._state = _CLOSED
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.on_error(None)  # closed early by its caller
        if self._opening is not None:
            self._opening.cancel()
        await self._source.abort()

    def __del__(self) -> None:
        # A loop left with `break` and no `async with`: do not keep the server generating,
        # and give the connection (and an engine's slot) back. The last reference may go on
        # any thread (a GC pass in a worker), so the release runs on the loop's own thread.
        if self._state in (_OPEN, _FINISHING) and self._spawn is not None:
            self._state = _CLOSED
            self._spawn(functools.partial(_drop, self._source, self._observer))

    def __repr__(self) -> str:
        states = ("new", "open", "finishing", "done", "closed")
        return f"<TokenStream {self.url} {states[self._state]} chunks={self.chunks}>"


async def _drop(source: Source, observer: RequestObserver | None) -> None:
    # A task of its own, started from a finalizer: nobody awaits it, so log what fails.
    try:
        if observer is not None:
            observer.on_error(None)  # closed early by its caller
        await source.abort()
    except Exception:
        logger.exception("closing a stream dropped without aclose() failed")


_dropping: set[asyncio.Task[None]] = set()  # asyncio keeps only weak references to tasks


def _loop_spawner() -> Callable[[_AsyncFn], None]:
    """Start ``fn()`` as a task of the running loop, from any thread, at any time later.

    For finalizers, which may run on another thread and must not touch the loop directly.
    Once the loop has finished there is nothing left to close.
    """
    if current_backend() == "anyio":  # anyio serves trio; under asyncio it says "asyncio"
        import trio

        token = trio.lowlevel.current_trio_token()

        def spawn_trio(fn: _AsyncFn) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(trio.lowlevel.spawn_system_task, fn)

        return spawn_trio
    loop = asyncio.get_running_loop()

    def start(fn: _AsyncFn) -> None:
        task = loop.create_task(fn())
        _dropping.add(task)
        task.add_done_callback(_dropping.discard)

    def spawn_asyncio(fn: _AsyncFn) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(start, fn)

    return spawn_asyncio


def _is_error(payload: bytes) -> bool:
    """An ``{"error": ...}`` event written with other spacing (checked only for events that
    carried nothing: never on the per-token path)."""
    if b'"error"' not in payload:
        return False
    try:
        decoded = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return False
    return isinstance(decoded, dict) and "error" in decoded


_DECODERS: dict[type[Any], Callable[[bytes], Any]] = {
    t: msgspec.json.Decoder(t).decode for t in (CompletionChunk, ChatChunk, TextCompletionChunk)
}


def _decoder_for(chunk_type: type[ChunkT]) -> Callable[[bytes], ChunkT]:
    return _DECODERS[chunk_type]


def _stream_error(payload: bytes, url: str) -> StreamError:
    try:
        error = msgspec.json.decode(payload).get("error")
    except (msgspec.DecodeError, AttributeError):
        error = None
    if not isinstance(error, dict):
        # Not the payload: it may carry completion text into a span's exception event.
        message = str(error)[:200] if isinstance(error, str) else f"{len(payload)} bytes"
        return StreamError(f"the server sent an error event: {message}", url=url)
    message = str(error.get("message", "unknown error"))
    return StreamError(
        f"the server reported an error mid-stream: {message}",
        status_code=error.get("code") if isinstance(error.get("code"), int) else None,
        error_type=error.get("type"),
        body=error,
        url=url,
    )
