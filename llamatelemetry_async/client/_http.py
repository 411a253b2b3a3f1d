"""HTTP/1.1 connections and a connection pool whose every operation is O(1).

Why not httpcore's pool: it scans every connection each time a request is assigned or
released, on the event loop, which is O(n²) at 1,000 concurrent streams
(``shared/PERF_FACTS.md``). Here idle connections sit on a per-origin stack (LIFO: the
newest is the likeliest alive), active ones in a set, and a request never looks at
another request's connection.

Two connection kinds share one sans-IO response parser:

* ``_AsyncioConnection``: an ``asyncio.Protocol``; bytes are parsed inside
  ``data_received`` and the reader is woken with one future per batch. This is the fast
  path (asyncio and uvloop).
* ``_AnyioConnection``: an anyio socket stream, portable to trio (and used on asyncio
  when asked for, so both are tested side by side).
"""

from __future__ import annotations

import abc
import asyncio
import socket
import time
from collections.abc import Callable
from typing import Final, Literal

import anyio
import anyio.abc
import sniffio

from .._errors import (
    ClientClosedError,
    ConnectError,
    ConnectTimeout,
    PoolTimeout,
    ReadError,
    ReadTimeout,
    RemoteProtocolError,
    TransportError,
    UsageError,
    WriteError,
    WriteTimeout,
)

__all__ = ["Connection", "ConnectionPool", "PoolStats", "ResponseHead", "Timeouts"]

Backend = Literal["auto", "asyncio", "anyio"]

# Parser states.
_HEAD: Final = 0
_CHUNK_SIZE: Final = 1
_CHUNK_DATA: Final = 2
_CHUNK_END: Final = 3
_TRAILERS: Final = 4
_LENGTH: Final = 5
_UNTIL_CLOSE: Final = 6
_DONE: Final = 7
_IDLE: Final = 8

_MAX_HEAD = 64 * 1024
# Reading pauses when this many events (or body pieces) wait for a slow consumer
# (backpressure), and resumes once the consumer has taken them.
_HIGH_WATER = 4096


class Timeouts:
    """Connect, read, write and pool limits in seconds (``None``: no limit)."""

    __slots__ = ("connect", "pool", "read", "write")

    def __init__(
        self,
        *,
        connect: float | None,
        read: float | None,
        write: float | None,
        pool: float | None,
    ) -> None:
        self.connect = connect
        self.read = read
        self.write = write
        self.pool = pool


class ResponseHead:
    """Status line and headers of a response (header names lower-cased)."""

    __slots__ = ("headers", "keep_alive", "reason", "status")

    def __init__(
        self, status: int, reason: str, headers: list[tuple[bytes, bytes]], keep_alive: bool
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.keep_alive = keep_alive

    def get(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class _Parser:
    """Sans-IO HTTP/1.1 response parser; body bytes go to ``sink`` as they arrive."""

    __slots__ = (
        "_buf",
        "_early",
        "_head_only",
        "_held",
        "_remaining",
        "eof_pending",
        "head",
        "sink",
        "state",
    )

    def __init__(self) -> None:
        self.state: int = _IDLE
        self.head: ResponseHead | None = None
        self.sink: Callable[[bytes], object] = _discard
        self._buf = b""
        self._remaining = 0
        self._head_only = False
        # Body bytes that arrive before the reader has chosen a sink are held here.
        self._held = False
        self._early = b""
        self.eof_pending = False

    def start(self, *, head_only: bool) -> None:
        self.state = _HEAD
        self.head = None
        self.sink = _discard
        self._buf = b""
        self._head_only = head_only
        self._held = True
        self._early = b""
        self.eof_pending = False

    def set_sink(self, sink: Callable[[bytes], object]) -> None:
        """Route body bytes to ``sink``, starting with any that arrived with the head."""
        self.sink = sink
        self._held = False
        early, self._early = self._early, b""
        if early:
            self.feed(early)
        if self.eof_pending:
            self.eof_pending = False
            self.feed_eof()

    @property
    def done(self) -> bool:
        return self.state == _DONE

    def feed(self, data: bytes) -> None:
        state = self.state
        if state == _HEAD:
            data = self._feed_head(data)
            state = self.state
            if not data:
                return
        if self._held:
            self._early += data
            return
        if _CHUNK_SIZE <= state <= _TRAILERS:
            self._feed_chunked(data)
        elif state == _LENGTH:
            take = min(self._remaining, len(data))
            self.sink(data[:take] if take < len(data) else data)
            self._remaining -= take
            if not self._remaining:
                self.state = _DONE
                if take < len(data):
                    self._extra_data()
        elif state == _UNTIL_CLOSE:
            self.sink(data)
        elif state in (_DONE, _IDLE):
            self._extra_data()

    def feed_eof(self) -> None:
        if self._held and self.head is not None:
            self.eof_pending = True  # the reader has not taken the body yet
            return
        if self.state == _UNTIL_CLOSE:
            self.state = _DONE
        elif self.state not in (_DONE, _IDLE):
            raise ReadError("the server closed the connection before the response was complete")

    def _extra_data(self) -> None:
        raise RemoteProtocolError("the server sent data after the end of the response")

    def _feed_head(self, data: bytes) -> bytes:
        buf = self._buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEAD:
                raise RemoteProtocolError("response headers exceed 64 KiB")
            self._buf = buf
            return b""
        self._buf = b""
        lines = buf[:end].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        status_text, _, reason = rest.partition(b" ")
        if not version.startswith(b"HTTP/1.") or not status_text.isdigit():
            raise RemoteProtocolError(f"malformed status line {lines[0][:100]!r}")
        status = int(status_text)
        headers: list[tuple[bytes, bytes]] = []
        chunked = False
        length: int | None = None
        keep_alive = version == b"HTTP/1.1"
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise RemoteProtocolError(f"malformed header line {line[:100]!r}")
            name = name.strip().lower()
            value = value.strip()
            headers.append((name, value))
            if name == b"transfer-encoding":
                chunked = value.lower().endswith(b"chunked")
            elif name == b"content-length":
                if not value.isdigit():
                    raise RemoteProtocolError(f"malformed Content-Length {value[:40]!r}")
                length = int(value)
            elif name == b"connection":
                keep_alive = b"close" not in value.lower()
        rest_data = buf[end + 4 :]
        if 100 <= status < 200:  # an interim response: the real one follows
            self.state = _HEAD
            return self._feed_head(rest_data) if rest_data else b""
        self.head = ResponseHead(status, reason.decode("latin-1"), headers, keep_alive)
        if self._head_only or status in (204, 304):
            self.state = _DONE
        elif chunked:
            self.state = _CHUNK_SIZE
        elif length is not None:
            self._remaining = length
            self.state = _LENGTH if length else _DONE
        else:
            self.state = _UNTIL_CLOSE
            self.head.keep_alive = False
        if self.state == _DONE:
            self._held = False
            if rest_data:
                self._extra_data()
        return rest_data

    def _feed_chunked(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos = 0
        end = len(buf)
        state = self.state
        # Whole chunks are the common case (llama-server writes one event per chunk, and a
        # read often holds many): they take one pass each, and the sink is called once.
        out: list[bytes] = []
        while pos < end:
            if state == _CHUNK_SIZE:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos > 1024:
                        raise RemoteProtocolError("chunk-size line too long")
                    break
                size = _chunk_size(buf[pos:eol])
                pos = eol + 2
                if not size:
                    state = _TRAILERS
                    continue
                stop = pos + size
                if stop + 2 <= end:
                    if buf[stop : stop + 2] != b"\r\n":
                        raise RemoteProtocolError("chunk data not followed by CRLF")
                    out.append(buf[pos:stop])
                    pos = stop + 2
                    continue
                self._remaining = size
                state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                take = min(self._remaining, end - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    state = _CHUNK_END
            elif state == _CHUNK_END:
                if end - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise RemoteProtocolError("chunk data not followed by CRLF")
                pos += 2
                state = _CHUNK_SIZE
            elif state == _TRAILERS:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                blank = eol == pos  # the empty line that ends the trailers
                pos = eol + 2
                if blank:
                    state = _DONE
                    break
            else:  # _DONE
                break
        self.state = state
        self._buf = buf[pos:] if pos < end else b""
        if out:
            self.sink(out[0] if len(out) == 1 else b"".join(out))
        if state == _DONE and self._buf:
            self._buf = b""
            self._extra_data()


def _chunk_size(line: bytes) -> int:
    try:
        size = int(line, 16)
    except ValueError:
        text = line.split(b";", 1)[0].strip()  # a chunk extension: rare, ignored
        try:
            size = int(text, 16)
        except ValueError:
            raise RemoteProtocolError(f"malformed chunk size {line[:40]!r}") from None
    if size < 0:
        raise RemoteProtocolError(f"malformed chunk size {line[:40]!r}")
    return size


def _discard(data: bytes) -> None:
    return None


class Connection(metaclass=abc.ABCMeta):
    """One HTTP/1.1 connection: write a request, then ``wait()`` for the parser to advance."""

    __slots__ = ("idle_since", "origin", "parser", "requests")

    def __init__(self, origin: tuple[str, int]) -> None:
        self.origin = origin
        self.parser = _Parser()
        self.requests = 0
        self.idle_since = 0.0

    @property
    @abc.abstractmethod
    def is_closed(self) -> bool:
        """True once the connection can no longer carry a request."""

    @abc.abstractmethod
    def set_read_timeout(self, timeout: float | None) -> None:
        """Limit the silence between two reads of the current response."""

    @abc.abstractmethod
    def watch_buffer(self, buffered: Callable[[], int] | None) -> None:
        """Pause reading while ``buffered()`` exceeds the high-water mark (backpressure)."""

    @abc.abstractmethod
    async def write(self, data: bytes, timeout: float | None) -> None:
        """Send request bytes."""

    @abc.abstractmethod
    async def wait(self) -> None:
        """Return once the parser has advanced (or ended); raise if the connection failed."""

    @abc.abstractmethod
    def resume_if_drained(self) -> None:
        """Called by the consumer after taking buffered data (backpressure)."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Close at once, without waiting (safe from any task on the loop)."""

    async def aclose(self) -> None:
        """Close the connection."""
        self.abort()


class _AsyncioConnection(asyncio.Protocol, Connection):
    __slots__ = (
        "_buffered",
        "_drain",
        "_exc",
        "_last_rx",
        "_loop",
        "_paused",
        "_read_timeout",
        "_timer",
        "_transport",
        "_waiter",
    )

    def __init__(self, origin: tuple[str, int], loop: asyncio.AbstractEventLoop) -> None:
        Connection.__init__(self, origin)
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._exc: BaseException | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_rx = 0.0
        self._read_timeout: float | None = None
        self._paused = False
        self._buffered: Callable[[], int] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # One small write per request and per token: Nagle would only add latency.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._last_rx = self._loop.time()
        try:
            self.parser.feed(data)
        except TransportError as exc:
            self._fail(exc)
            return
        if self._buffered is not None and self._buffered() > _HIGH_WATER and not self._paused:
            self._paused = True
            assert self._transport is not None
            self._transport.pause_reading()
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def eof_received(self) -> bool:
        try:
            self.parser.feed_eof()
        except TransportError as exc:
            self._fail(exc)
        else:
            self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        parser = self.parser
        if self._exc is None and parser.state not in (_DONE, _IDLE) and not parser.eof_pending:
            self._exc = ReadError(
                "the connection was lost before the response was complete"
                + (f": {exc}" if exc else "")
            )
        self._transport = None
        self._cancel_timer()
        self._wake()
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def pause_writing(self) -> None:
        self._drain = self._loop.create_future()

    def resume_writing(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    # Connection
    @property
    def is_closed(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    def set_read_timeout(self, timeout: float | None) -> None:
        self._cancel_timer()  # a timer of the previous request would fire on its old deadline
        self._read_timeout = timeout
        self._last_rx = self._loop.time()

    def watch_buffer(self, buffered: Callable[[], int] | None) -> None:
        self._buffered = buffered

    async def write(self, data: bytes, timeout: float | None) -> None:
        if self._transport is None:
            raise WriteError("the connection is closed")
        self._transport.write(data)
        drain = self._drain
        if drain is not None:
            try:
                with anyio.fail_after(timeout):
                    await drain
            except TimeoutError:
                self.abort()
                raise WriteTimeout("sending the request timed out") from None

    async def wait(self) -> None:
        if self._exc is not None:
            raise self._exc
        if self._transport is None:
            raise ReadError("the connection is closed")
        waiter = self._waiter = self._loop.create_future()
        if self._read_timeout is not None and self._timer is None:
            self._timer = self._loop.call_at(self._last_rx + self._read_timeout, self._on_timer)
        await waiter
        if self._exc is not None:
            raise self._exc

    def resume_if_drained(self) -> None:
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # internals
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._exc is None:
            self._exc = exc
        self.abort()
        self._wake()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        # One timer per connection, re-armed lazily: the per-token path only stores a
        # timestamp instead of creating and cancelling a timer for every read.
        self._timer = None
        if self._waiter is None or self._read_timeout is None:
            return
        deadline = self._last_rx + self._read_timeout
        if self._loop.time() >= deadline:
            self._fail(ReadTimeout(f"no data from the server for {self._read_timeout:g} s"))
        else:
            self._timer = self._loop.call_at(deadline, self._on_timer)


class _AnyioConnection(Connection):
    __slots__ = ("_closed", "_read_timeout", "_stream")

    def __init__(self, origin: tuple[str, int], stream: anyio.abc.SocketStream) -> None:
        super().__init__(origin)
        self._stream = stream
        self._closed = False
        self._read_timeout: float | None = None

    @property
    def is_closed(self) -> bool:
        return self._closed

    def set_read_timeout(self, timeout: float | None) -> None:
        self._read_timeout = timeout

    def watch_buffer(self, buffered: Callable[[], int] | None) -> None:
        # Backpressure is natural here: nothing is read until the consumer asks.
        return

    def resume_if_drained(self) -> None:
        return

    async def write(self, data: bytes, timeout: float | None) -> None:
        try:
            with anyio.fail_after(timeout):
                await self._stream.send(data)
        except TimeoutError:
            await self.aclose()
            raise WriteTimeout("sending the request timed out") from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._closed = True
            raise WriteError(f"the connection broke while sending the request: {exc}") from exc

    async def wait(self) -> None:
        if self._closed:
            raise ReadError("the connection is closed")
        try:
            with anyio.fail_after(self._read_timeout):
                data = await self._stream.receive()
        except TimeoutError:
            await self.aclose()
            raise ReadTimeout(f"no data from the server for {self._read_timeout:g} s") from None
        except anyio.EndOfStream:
            self._closed = True
            self.parser.feed_eof()
            return
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._closed = True
            raise ReadError(f"the connection broke while reading: {exc}") from exc
        try:
            self.parser.feed(data)
        except TransportError:
            await self.aclose()
            raise

    def abort(self) -> None:
        # An anyio stream closes asynchronously; the synchronous path only marks it so
        # it is never reused, and the owner's aclose() (or the GC) releases the socket.
        self._closed = True

    async def aclose(self) -> None:
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self._stream.aclose()


class PoolStats:
    """Counters of a pool: connections opened so far, open now, idle now, requests sent."""

    __slots__ = ("active", "idle", "opened", "requests")

    def __init__(self, opened: int, active: int, idle: int, requests: int) -> None:
        self.opened = opened
        self.active = active
        self.idle = idle
        self.requests = requests

    def __repr__(self) -> str:
        return (
            f"PoolStats(opened={self.opened}, active={self.active}, "
            f"idle={self.idle}, requests={self.requests})"
        )


class ConnectionPool:
    """Per-origin stacks of idle connections; acquire and release are O(1).

    ``max_connections`` (``None``: unlimited) bounds open connections across origins with
    one semaphore; ``max_idle`` bounds the idle stack of each origin; idle connections older
    than ``keepalive_expiry`` are closed rather than reused (llama-server drops idle
    connections after 5 s).
    """

    def __init__(
        self,
        *,
        max_connections: int | None = None,
        max_idle: int = 256,
        keepalive_expiry: float = 4.0,
        backend: Backend = "auto",
    ) -> None:
        if max_connections is not None and max_connections < 1:
            raise UsageError("max_connections must be at least 1 (or None for no limit)")
        self._idle: dict[tuple[str, int], list[Connection]] = {}
        self._all: set[Connection] = set()
        self._max_idle = max_idle
        self._expiry = keepalive_expiry
        self._backend = backend
        self._sem = anyio.Semaphore(max_connections) if max_connections is not None else None
        self._opened = 0
        self._requests = 0
        self._closed = False

    @property
    def stats(self) -> PoolStats:
        idle = sum(len(stack) for stack in self._idle.values())
        return PoolStats(self._opened, len(self._all) - idle, idle, self._requests)

    async def request(
        self,
        host: str,
        port: int,
        head: bytes,
        body: bytes,
        timeouts: Timeouts,
        *,
        head_only: bool = False,
    ) -> Connection:
        """Send one request and return its connection once the response head is in.

        The caller reads the body through ``conn.parser`` (``sink``) and ``conn.wait()``, then
        hands the connection back with ``release`` (or ``discard`` when abandoning it).
        """
        if self._closed:
            raise ClientClosedError("the client was closed")
        if self._sem is not None:
            try:
                with anyio.fail_after(timeouts.pool):
                    await self._sem.acquire()
            except TimeoutError:
                raise PoolTimeout("no connection became free within the pool timeout") from None
            if self._closed:  # closed while this request queued for a connection
                self._sem.release()
                raise ClientClosedError("the client was closed")
        try:
            return await self._send(host, port, head + body, timeouts, head_only)
        except BaseException:
            if self._sem is not None:
                self._sem.release()
            raise

    async def _send(
        self, host: str, port: int, data: bytes, timeouts: Timeouts, head_only: bool
    ) -> Connection:
        origin = (host, port)
        while True:
            conn = await self._pop_idle(origin)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(origin, timeouts.connect)
            conn.parser.start(head_only=head_only)
            conn.requests += 1
            self._requests += 1
            conn.set_read_timeout(timeouts.read)
            try:
                await conn.write(data, timeouts.write)
                while conn.parser.head is None:
                    await conn.wait()
            except (ReadError, WriteError):
                await self._drop(conn)
                # A reused connection the server closed while it sat idle: nothing was
                # processed, so sending again on a fresh connection is safe.
                if reused and conn.parser.head is None:
                    continue
                raise
            except BaseException:
                await self._drop(conn)
                raise
            return conn

    async def _pop_idle(self, origin: tuple[str, int]) -> Connection | None:
        stack = self._idle.get(origin)
        if not stack:
            return None
        now = time.monotonic()
        while stack:
            conn = stack.pop()
            if conn.is_closed or now - conn.idle_since > self._expiry:
                await self._drop(conn)
                continue
            return conn
        return None

    async def _connect(self, origin: tuple[str, int], timeout: float | None) -> Connection:
        host, port = origin
        backend = self._backend
        if backend == "auto":
            backend = "asyncio" if sniffio.current_async_library() == "asyncio" else "anyio"
        conn: Connection
        try:
            with anyio.fail_after(timeout):
                if backend == "asyncio":
                    loop = asyncio.get_running_loop()
                    proto = _AsyncioConnection(origin, loop)
                    await loop.create_connection(lambda: proto, host, port)
                    conn = proto
                else:
                    stream = await anyio.connect_tcp(host, port)
                    stream.extra(anyio.abc.SocketAttribute.raw_socket).setsockopt(
                        socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
                    )
                    conn = _AnyioConnection(origin, stream)
        except TimeoutError:
            raise ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except OSError as exc:
            raise ConnectError(
                f"could not connect to {host}:{port} ({exc.strerror or exc}); "
                "is the server running there?"
            ) from exc
        self._opened += 1
        self._all.add(conn)
        return conn

    async def release(self, conn: Connection) -> None:
        """Return a connection whose response was read to its end."""
        if self._sem is not None:
            self._sem.release()
        head = conn.parser.head
        reusable = (
            not self._closed
            and conn.parser.done
            and head is not None
            and head.keep_alive
            and not conn.is_closed
        )
        conn.parser.state = _IDLE
        conn.parser.sink = _discard
        conn.parser._held = False
        conn.watch_buffer(None)
        conn.resume_if_drained()  # paused by a burst at the very end of the response
        stack = self._idle.setdefault(conn.origin, [])
        if reusable and len(stack) < self._max_idle:
            conn.idle_since = time.monotonic()
            stack.append(conn)
        else:
            await self._drop(conn)

    def discard_nowait(self, conn: Connection) -> None:
        """``discard`` for a finalizer: close at once, without awaiting."""
        if conn in self._all:
            self._all.discard(conn)
            if self._sem is not None:
                self._sem.release()
        conn.abort()

    async def discard(self, conn: Connection) -> None:
        """Close a connection mid-response (the caller gave up on it)."""
        if self._sem is not None:
            self._sem.release()
        await self._drop(conn)

    async def _drop(self, conn: Connection) -> None:
        self._all.discard(conn)
        await conn.aclose()

    async def aclose(self) -> None:
        """Close every connection, idle or in use; later requests are refused."""
        self._closed = True
        conns, self._all = self._all, set()
        self._idle.clear()
        with anyio.CancelScope(shield=True):
            for conn in conns:
                await conn.aclose()
