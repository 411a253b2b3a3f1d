"""A connection pool whose every operation is O(1).

Why not httpcore's pool: it scans every connection each time a request is assigned or
released, on the event loop, which is O(n²) at 1,000 concurrent streams
(``shared/PERF_FACTS.md``). Here idle connections sit on a per-origin stack (LIFO: the
newest is the likeliest alive), active ones in a set, and a request never looks at
another request's connection.
"""

from __future__ import annotations

import time

import anyio

from .._errors import ClientClosedError, PoolTimeout, UsageError
from ._connection import Backend, Connection, open_connection
from ._headers import check_request_head
from ._parser import request_url

__all__ = ["ConnectionPool", "PoolStats", "Timeouts"]


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
                url = request_url(host, port, head)
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
        conn = await open_connection(origin, self._backend, timeout, head)
        self._opened += 1
        if self._closed:  # aclose() ran while this one connected: it must not outlive it
            with anyio.CancelScope(shield=True):
                await conn.aclose()
            raise ClientClosedError("the client was closed")
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
        conn.parser.reset()
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
