"""An httpx transport on the O(1) connection pool, so every httpx feature still works."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx

from .._errors import ClientClosedError, TransportError, UsageError
from ._connection import Backend, Connection
from ._errors_map import to_httpx_error
from ._headers import check_header
from ._pool import ConnectionPool, PoolStats, Timeouts

__all__ = ["LlamaTransport", "httpx_timeouts"]


def httpx_timeouts(timeout: httpx.Timeout | dict[str, Any]) -> Timeouts:
    """Our ``Timeouts`` from an ``httpx.Timeout`` or httpx's per-request timeout dict."""
    get = timeout.get if isinstance(timeout, dict) else timeout.as_dict().get
    return Timeouts(connect=get("connect"), read=get("read"), write=get("write"), pool=get("pool"))


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, pool: ConnectionPool, conn: Connection, request: httpx.Request) -> None:
        self._pool = pool
        self._conn = conn
        self._request = request
        self._pieces: list[bytes] = []
        self._released = False
        conn.watch_buffer(self._pieces.__len__)
        conn.parser.set_sink(self._pieces.append)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        pieces = self._pieces
        try:
            while True:
                if pieces:
                    data = b"".join(pieces)
                    pieces.clear()
                    conn.resume_if_drained()
                    yield data
                elif conn.parser.done:
                    break
                else:
                    await conn.wait()
        except TransportError as exc:
            raise to_httpx_error(exc, self._request) from exc
        await self._release()

    async def _release(self) -> None:
        if not self._released:
            self._released = True
            await self._pool.release(self._conn)

    async def aclose(self) -> None:
        if not self._released:
            self._released = True
            if self._conn.parser.done:
                await self._pool.release(self._conn)
            else:
                await self._pool.discard(self._conn)


class LlamaTransport(httpx.AsyncBaseTransport):
    """An ``httpx.AsyncBaseTransport`` (plain HTTP/1.1) on an O(1) connection pool.

    ``AsyncLlamaClient`` uses it by default; pass it to your own ``httpx.AsyncClient`` to
    get the same behaviour at high concurrency::

        httpx.AsyncClient(transport=LlamaTransport(max_connections=None))
    """

    def __init__(
        self,
        *,
        max_connections: int | None = None,
        max_idle: int = 256,
        keepalive_expiry: float = 4.0,
        backend: Backend = "auto",
    ) -> None:
        self.pool = ConnectionPool(
            max_connections=max_connections,
            max_idle=max_idle,
            keepalive_expiry=keepalive_expiry,
            backend=backend,
        )

    @property
    def stats(self) -> PoolStats:
        """Connections opened so far, active and idle now, requests sent."""
        return self.pool.stats

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` on the pool (httpx's transport interface; plain HTTP only)."""
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(
                f"LlamaTransport speaks plain http, not {url.scheme!r}: pass an "
                "httpx.AsyncClient with its default transport for TLS",
                request=request,
            )
        body = await request.aread()
        # (A non-ASCII method becomes "?", which the pool's head check refuses.)
        lines = [request.method.encode("ascii", "replace"), b" ", url.raw_path, b" HTTP/1.1\r\n"]
        try:
            for name, value in request.headers.raw:
                # httpx lets CR and LF through; written raw they would inject headers or a
                # second request (h11, httpx's own transport, refuses them too).
                check_header(name, value)
                # The body was read whole: it goes out with a Content-Length, never chunked.
                if name.lower() not in (b"transfer-encoding", b"content-length"):
                    lines += (name, b": ", value, b"\r\n")
        except UsageError as exc:
            # What httpx's own transport raises; AsyncLlamaClient maps it back to the
            # UsageError (its cause) through map_httpx_error.
            raise httpx.LocalProtocolError(str(exc), request=request) from exc
        if body or request.method not in ("GET", "HEAD"):
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        timeouts = httpx_timeouts(request.extensions.get("timeout", {}))
        try:
            conn = await self.pool.request(
                url.host,
                url.port or 80,
                b"".join(lines),
                body,
                timeouts,
                head_only=request.method == "HEAD",
            )
        except TransportError as exc:
            raise to_httpx_error(exc, request) from exc
        except ClientClosedError:
            raise
        except UsageError as exc:  # a request line the pool refused (a bad method or path)
            raise httpx.LocalProtocolError(str(exc), request=request) from exc
        head = conn.parser.head
        assert head is not None
        try:
            stream = _ResponseStream(self.pool, conn, request)  # parses bytes that came early
        except TransportError as exc:
            await self.pool.discard(conn)
            raise to_httpx_error(exc, request) from exc
        return httpx.Response(
            head.status,
            headers=head.headers,
            stream=stream,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": head.reason.encode()},
        )

    async def aclose(self) -> None:
        """Close every pooled connection (``httpx.AsyncClient.aclose`` calls this)."""
        await self.pool.aclose()
