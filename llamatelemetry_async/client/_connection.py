"""HTTP/1.1 connections, how one is opened, and which kind serves the running loop.

Two connection kinds share one sans-IO response parser (``_parser``):

* ``_AsyncioConnection``: an ``asyncio.Protocol``; bytes are parsed inside
  ``data_received`` and the reader is woken with one future per batch. This is the fast
  path (asyncio and uvloop).
* ``_AnyioConnection``: an anyio socket stream, portable to trio (and used on asyncio
  when asked for, so both are tested side by side).

``current_backend`` is the one place in the client that asks which event loop
runs.
"""

from __future__ import annotations

import abc
import asyncio
import select
import socket
from collections.abc import Callable
from typing import Final, Literal, cast

import anyio
import anyio.abc

from .._errors import (
    ConnectError,
    ConnectTimeout,
    ReadError,
    ReadTimeout,
    TransportError,
    WriteError,
    WriteTimeout,
)
from ._parser import ResponseParser, locate, request_url

__all__ = ["Backend", "Connection", "current_backend", "open_connection"]

Backend = Literal["auto", "asyncio", "anyio"]

# Reading pauses when this many events (or body pieces) wait for a slow consumer
# (backpressure), and resumes once the consumer has taken them.
_HIGH_WATER = 4096


def current_backend() -> Literal["asyncio", "anyio"]:
    """The connection kind for the running event loop (the one such look-up in the client).

    ``"asyncio"`` under asyncio and uvloop (anyio on asyncio included): the protocol fast
    path. ``"anyio"`` otherwise, that is under trio: portable socket streams.
    """
    # asyncio's own C look-up (~50 ns) instead of sniffio's (~2 µs): this runs per request.
    # anyio serves only asyncio and trio, and trio runs no asyncio loop in its thread.
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return "anyio"
    return "asyncio"


class Connection(metaclass=abc.ABCMeta):
    """One HTTP/1.1 connection: write a request, then ``wait()`` for the parser to advance."""

    __slots__ = ("idle_since", "origin", "parser", "requests")

    def __init__(self, origin: tuple[str, int]) -> None:
        self.origin = origin
        self.parser = ResponseParser(origin)
        self.requests = 0
        self.idle_since = 0.0

    @property
    def url(self) -> str:
        """The URL of the current (or last) request on this connection."""
        return self.parser.url

    def _locate(self, exc: BaseException) -> BaseException:
        """Name this connection's URL in a transport error raised without it."""
        return locate(exc, self.parser.url) if isinstance(exc, TransportError) else exc

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
        # A stream transport, though not always an asyncio.Transport subclass (uvloop's
        # TCPTransport is not): no isinstance check.
        self._transport = cast(asyncio.Transport, transport)
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
        if self._exc is None and parser.incomplete and not parser.eof_pending:
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


async def open_connection(
    origin: tuple[str, int], backend: Backend, timeout: float | None, head: bytes
) -> Connection:
    """Open a connection to ``origin`` of the kind ``backend`` names (``"auto"``: the loop's).

    ``head`` is the request it is opened for: errors name its URL.
    """
    host, port = origin
    if backend == "auto":
        backend = current_backend()
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
        url = request_url(host, port, head)
        raise ConnectTimeout(f"connecting to {url} timed out", url=url) from None
    except OSError as exc:
        url = request_url(host, port, head)
        raise ConnectError(
            f"could not connect to {host}:{port} ({exc.strerror or exc}) for {url}; "
            "is the server running there?",
            url=url,
        ) from exc
    return conn
