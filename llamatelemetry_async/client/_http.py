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
import select
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
from ._headers import check_request_head

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
        "_hbuf",
        "_head_only",
        "_held",
        "_remaining",
        "eof_pending",
        "head",
        "origin",
        "request_head",
        "sink",
        "state",
    )

    def __init__(self, origin: tuple[str, int] = ("", 0)) -> None:
        self.state: int = _IDLE
        self.head: ResponseHead | None = None
        # Where the request in flight went: errors name its URL.
        self.origin = origin
        self.request_head = b""
        self.sink: Callable[[bytes], object] = _discard
        self._buf = b""
        # A head that spans reads collects here (amortized O(1) appends: a server that
        # trickles its head byte by byte costs linear time, not quadratic).
        self._hbuf = bytearray()
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
        self._hbuf.clear()
        self._head_only = head_only
        self._held = True
        self._early = b""
        self.eof_pending = False

    def set_sink(self, sink: Callable[[bytes], object]) -> None:
        """Route body bytes to ``sink``, starting with any that arrived with the head."""
        self.sink = sink
        self._held = False
        early, self._early = self._early, b""
        try:
            if early:
                self.feed(early)
            if self.eof_pending:
                self.eof_pending = False
                self.feed_eof()
        except TransportError as exc:
            _locate(exc, self.url)  # raised while the reader takes the body, not on the loop
            raise

    @property
    def url(self) -> str:
        """The URL of the request in flight (or the last one)."""
        return _url(*self.origin, self.request_head)

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
            if state == _DONE:
                self._extra_data()  # a body after a head that announced none
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
        elif state in (_DONE, _IDLE) and data:
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
        hbuf = self._hbuf
        if hbuf:
            start = len(hbuf) - 3 if len(hbuf) > 3 else 0  # a CRLFCRLF split by reads
            hbuf += data
            if hbuf.find(b"\r\n\r\n", start) < 0:
                if len(hbuf) > _MAX_HEAD:
                    raise RemoteProtocolError("response headers exceed 64 KiB")
                return b""
            data = bytes(hbuf)
            hbuf.clear()
        # The usual case is the whole head in one read: one find, no copy. A loop (not
        # recursion, nor a copy of the rest per head) walks a burst of interim 1xx heads.
        pos = 0
        while True:
            end = data.find(b"\r\n\r\n", pos)
            if end < 0:
                if len(data) - pos > _MAX_HEAD:
                    raise RemoteProtocolError("response headers exceed 64 KiB")
                hbuf += data[pos:] if pos else data
                return b""
            if end + 4 - pos > _MAX_HEAD:  # however it arrived, in one read or many
                raise RemoteProtocolError("response headers exceed 64 KiB")
            if self._parse_head(data[pos:end]):
                return data[end + 4 :]
            pos = end + 4  # an interim response: the real one follows
            if pos == len(data):
                return b""

    def _parse_head(self, block: bytes) -> bool:
        """Take one head; ``False`` for an interim (1xx) response, whose successor follows."""
        lines = block.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        status_text, _, reason = rest.partition(b" ")
        if not version.startswith(b"HTTP/1.") or len(status_text) != 3 or not status_text.isdigit():
            raise RemoteProtocolError(f"malformed status line {lines[0][:100]!r}")
        status = int(status_text)
        if 100 <= status < 200:
            return False
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
                # The last coding decides; anything but chunked is read until close.
                chunked = value.rpartition(b",")[2].strip().lower() == b"chunked"
            elif name == b"content-length":
                if not value.isdigit():
                    raise RemoteProtocolError(f"malformed Content-Length {value[:40]!r}")
                if length is not None and int(value) != length:
                    # Two lengths: which one frames the body is ambiguous (a smuggling
                    # vector through proxies), so neither is trusted.
                    raise RemoteProtocolError("conflicting Content-Length headers")
                length = int(value)
            elif name == b"connection":
                keep_alive = b"close" not in value.lower()
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
        return True

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
                    if end - pos > _MAX_HEAD:
                        raise RemoteProtocolError("a trailer line exceeds 64 KiB")
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


_HEX: Final = b"0123456789abcdefABCDEF"


def _chunk_size(line: bytes) -> int:
    # Hex digits only: int(x, 16) alone would also take "0x1f", "1_0", "+5" and spaces,
    # which another parser on the path (a proxy) may read differently.
    if line and not line.strip(_HEX):
        return int(line, 16)
    size, sep, _ = line.partition(b";")  # a chunk extension: rare, ignored
    size = size.rstrip(b" \t")
    if sep and size and not size.strip(_HEX):
        return int(size, 16)
    raise RemoteProtocolError(f"malformed chunk size {line[:40]!r}")


def _discard(data: bytes) -> None:
    return None


class Connection(metaclass=abc.ABCMeta):
    """One HTTP/1.1 connection: write a request, then ``wait()`` for the parser to advance."""

    __slots__ = ("idle_since", "origin", "parser", "requests")

    def __init__(self, origin: tuple[str, int]) -> None:
        self.origin = origin
        self.parser = _Parser(origin)
        self.requests = 0
        self.idle_since = 0.0

    @property
    def url(self) -> str:
        """The URL of the current (or last) request on this connection."""
        return self.parser.url

    def _locate(self, exc: BaseException) -> BaseException:
        """Name this connection's URL in a transport error raised without it."""
        return _locate(exc, self.parser.url) if isinstance(exc, TransportError) else exc

    @property
    @abc.abstractmethod
    def is_closed(self) -> bool:
        """True once the connection can no longer carry a request."""

    @abc.abstractmethod
    def is_stale(self) -> bool:
        """True if an idle connection must not carry a request (closed, or readable)."""

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
        """Close at once, without waiting (on the loop's thread, like every method here)."""

    async def aclose(self) -> None:
        """Close the connection."""
        self.abort()


def _readable_now(fd: int) -> bool:
    """Whether ``fd`` has something to read (EOF included), without waiting.

    On an idle connection any of it means the server closed it, reset it or sent bytes
    nobody asked for: a request written there could be lost after the server read it, or
    mixed with a stale answer. (urllib3 checks reused connections the same way.)
    """
    if _HAS_POLL:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])  # Windows: no poll(), no FD_SETSIZE cap


_HAS_POLL: Final = hasattr(select, "poll")


class _AsyncioConnection(asyncio.Protocol, Connection):
    __slots__ = (
        "_buffered",
        "_drain",
        "_exc",
        "_fd",
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
        self._fd = -1
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
            self._fd = sock.fileno()

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
                f"the connection to {self.url} was lost before the response was complete"
                + (f": {exc}" if exc else ""),
                url=self.url,
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

    def is_stale(self) -> bool:
        # The transport reads continuously, but an EOF may sit in the kernel, not yet
        # seen by the loop: ask the socket too. (An open transport keeps the fd valid.)
        return self.is_closed or (self._fd >= 0 and _readable_now(self._fd))

    def set_read_timeout(self, timeout: float | None) -> None:
        self._cancel_timer()  # a timer of the previous request would fire on its old deadline
        self._read_timeout = timeout
        self._last_rx = self._loop.time()

    def watch_buffer(self, buffered: Callable[[], int] | None) -> None:
        self._buffered = buffered

    async def write(self, data: bytes, timeout: float | None) -> None:
        if self._transport is None:
            raise WriteError(f"the connection to {self.url} is closed", url=self.url)
        self._transport.write(data)
        drain = self._drain
        if drain is not None:
            try:
                with anyio.fail_after(timeout):
                    await drain
            except TimeoutError:
                self.abort()
                raise WriteTimeout(
                    f"sending the request to {self.url} timed out", url=self.url
                ) from None

    async def wait(self) -> None:
        if self._exc is not None:
            raise self._exc
        if self._transport is None:
            raise ReadError(f"the connection to {self.url} is closed", url=self.url)
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
            self._exc = self._locate(exc)
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
            self._fail(
                ReadTimeout(f"no data from {self.url} for {self._read_timeout:g} s", url=self.url)
            )
        else:
            self._timer = self._loop.call_at(deadline, self._on_timer)


class _AnyioConnection(Connection):
    __slots__ = ("_closed", "_read_timeout", "_sock", "_stream")

    def __init__(self, origin: tuple[str, int], stream: anyio.abc.SocketStream) -> None:
        super().__init__(origin)
        self._stream = stream
        self._sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        self._closed = False
        self._read_timeout: float | None = None

    @property
    def is_closed(self) -> bool:
        return self._closed

    def is_stale(self) -> bool:
        # Nothing is read while the connection idles, so an EOF from the server is seen
        # only by asking the socket.
        return self._closed or _readable_now(self._sock.fileno())

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
            raise WriteTimeout(
                f"sending the request to {self.url} timed out", url=self.url
            ) from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._closed = True
            raise WriteError(
                f"the connection to {self.url} broke while sending the request: {exc}",
                url=self.url,
            ) from exc

    async def wait(self) -> None:
        if self._closed:
            raise ReadError(f"the connection to {self.url} is closed", url=self.url)
        try:
            with anyio.fail_after(self._read_timeout):
                data = await self._stream.receive()
        except TimeoutError:
            await self.aclose()
            raise ReadTimeout(
                f"no data from {self.url} for {self._read_timeout:g} s", url=self.url
            ) from None
        except anyio.EndOfStream:
            self._closed = True
            try:
                self.parser.feed_eof()
            except TransportError as exc:
                self._locate(exc)
                raise
            return
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._closed = True
            raise ReadError(
                f"the connection to {self.url} broke while reading: {exc}", url=self.url
            ) from exc
        try:
            self.parser.feed(data)
        except TransportError as exc:
            await self.aclose()
            self._locate(exc)
            raise

    def abort(self) -> None:
        # An anyio stream closes asynchronously, so the synchronous path shuts the socket
        # down: the server sees the end of the connection at once (llama-server stops
        # generating), and the fd, still open, cannot be reused under anyone's feet. The
        # stream itself is closed when the pool drops the connection.
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # closed already, or the peer reset it

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

    A request is sent once. It is never sent again on a fresh connection, even when a
    reused one fails before the response head: the server may have read it already (a
    prompt that crashes llama-server would crash it twice). Instead, an idle connection
    is checked before reuse (closed, or readable: the server closed it while it idled) and
    dropped if it cannot carry the request.
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
        active = len(self._all) - idle
        return PoolStats(self._opened, active, idle, self._requests)

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
        ``head`` must be one well-formed request head (``UsageError`` otherwise: a header
        value with CR or LF would inject headers or a second request).
        """
        if self._closed:
            raise ClientClosedError("the client was closed")
        check_request_head(head)
        if self._sem is not None:
            try:
                with anyio.fail_after(timeouts.pool):
                    await self._sem.acquire()
            except TimeoutError:
                url = _url(host, port, head)
                raise PoolTimeout(
                    f"no connection to {url} became free within the pool timeout", url=url
                ) from None
            if self._closed:  # closed while this request queued for a connection
                self._sem.release()
                raise ClientClosedError("the client was closed")
        try:
            return await self._send(host, port, head, head + body, timeouts, head_only)
        except BaseException:
            if self._sem is not None:
                self._sem.release()
            raise

    async def _send(
        self,
        host: str,
        port: int,
        head: bytes,
        data: bytes,
        timeouts: Timeouts,
        head_only: bool,
    ) -> Connection:
        origin = (host, port)
        conn = await self._pop_idle(origin)
        if conn is None:
            conn = await self._connect(origin, timeouts.connect, head)
        conn.parser.request_head = head
        conn.parser.start(head_only=head_only)
        conn.requests += 1
        self._requests += 1
        conn.set_read_timeout(timeouts.read)
        try:
            # Once written, the request is the server's: whatever fails from here on is
            # the caller's error to see, never a reason to send it again.
            await conn.write(data, timeouts.write)
            while conn.parser.head is None:
                await conn.wait()
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
            if now - conn.idle_since > self._expiry or conn.is_stale():
                await self._drop(conn)
                continue
            return conn
        return None

    async def _connect(
        self, origin: tuple[str, int], timeout: float | None, head: bytes
    ) -> Connection:
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
            url = _url(host, port, head)
            raise ConnectTimeout(f"connecting to {url} timed out", url=url) from None
        except OSError as exc:
            url = _url(host, port, head)
            raise ConnectError(
                f"could not connect to {host}:{port} ({exc.strerror or exc}) for {url}; "
                "is the server running there?",
                url=url,
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


def _locate(exc: TransportError, url: str) -> TransportError:
    """Name ``url`` in a transport error raised where the URL was not known (the parser)."""
    if exc.url is None:
        exc.url = url
        exc.args = (f"{exc.args[0] if exc.args else type(exc).__name__} ({url})",)
    return exc


def _url(host: str, port: int, head: bytes) -> str:
    parts = head.split(b" ", 2)
    target = parts[1].decode("latin-1") if len(parts) == 3 else ""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{target}"
