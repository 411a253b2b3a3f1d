"""Translation of dependency errors into the library's tree, in one place.

Every exception httpx raises (``httpx.HTTPError`` and its subclasses, ``httpx.StreamError``
and kin, ``httpx.InvalidURL``, ``httpx.CookieConflict``) has a library error here, so no
httpx exception reaches a caller through this library (tests/test_faults_wire.py walks
httpx's whole hierarchy to keep it so).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import cast

import anyio
import httpx
import msgspec

from .._errors import (
    ConnectError,
    ConnectTimeout,
    HTTPStatusError,
    LlamaError,
    PoolTimeout,
    ReadError,
    ReadTimeout,
    RemoteProtocolError,
    TimeoutException,
    TransportError,
    UsageError,
    WriteError,
    WriteTimeout,
)

__all__ = [
    "HttpxException",
    "map_httpx_error",
    "read_status_error",
    "status_error",
    "to_httpx_error",
]

# Everything httpx raises: its HTTPError tree and the exceptions outside it.
HttpxException = httpx.HTTPError | httpx.StreamError | httpx.InvalidURL | httpx.CookieConflict

# The most an error body is read (a 4xx/5xx body only feeds the error message).
MAX_ERROR_BODY = 1 << 20

# One table, read both ways: httpx errors -> ours (client side) and ours -> httpx
# (LlamaTransport, which must raise what httpx expects of a transport). Subclasses first.
_PAIRS: list[tuple[type[httpx.TransportError], type[TransportError]]] = [
    (httpx.ConnectTimeout, ConnectTimeout),
    (httpx.ReadTimeout, ReadTimeout),
    (httpx.WriteTimeout, WriteTimeout),
    (httpx.PoolTimeout, PoolTimeout),
    (httpx.ConnectError, ConnectError),
    (httpx.ReadError, ReadError),
    (httpx.WriteError, WriteError),
    (httpx.RemoteProtocolError, RemoteProtocolError),
]
_FROM_HTTPX: list[tuple[type[Exception], type[LlamaError]]] = [
    *_PAIRS,
    (httpx.TimeoutException, TimeoutException),
    (httpx.ProxyError, ConnectError),  # no connection made through the proxy
    (httpx.CloseError, ReadError),
    (httpx.NetworkError, ReadError),
    (httpx.DecodingError, RemoteProtocolError),  # a body its Content-Encoding cannot decode
    (httpx.TooManyRedirects, RemoteProtocolError),
    (httpx.ProtocolError, RemoteProtocolError),
    # The request as given cannot be sent: a header with CR/LF (h11, or LlamaTransport
    # whose own UsageError is the cause), a scheme httpx has no transport for, a bad URL.
    (httpx.LocalProtocolError, UsageError),
    (httpx.UnsupportedProtocol, UsageError),
    (httpx.InvalidURL, UsageError),
    (httpx.CookieConflict, UsageError),
    # A response closed before it was read (another task's aclose()); the other stream
    # errors are reads of a response in a way httpx does not allow.
    (httpx.StreamClosed, ReadError),
    (httpx.StreamError, UsageError),
]


def to_httpx_error(exc: TransportError, request: httpx.Request) -> httpx.TransportError:
    """The httpx error a transport raises for one of ours."""
    for theirs, ours in _PAIRS:
        if isinstance(exc, ours):
            return theirs(str(exc), request=request)
    return httpx.TransportError(str(exc), request=request)


def map_httpx_error(exc: HttpxException, url: str | None = None) -> LlamaError:
    """The library's error for anything httpx raises (raise it ``from exc``).

    Catch ``(httpx.HTTPError, httpx.StreamError)`` (add ``httpx.InvalidURL`` where a URL is
    parsed) around every httpx call, response reads included.
    """
    cause = exc.__cause__
    if isinstance(cause, LlamaError):
        return cause  # raised by our own transport and only wrapped by httpx
    if isinstance(exc, httpx.HTTPStatusError):  # from a user's raise_for_status() hook
        response = exc.response
        try:
            body = response.content
        except httpx.ResponseNotRead:
            body = b""
        return status_error(response.status_code, body, url or str(exc.request.url))
    text = str(exc) or type(exc).__name__
    message = f"{text} ({url})" if url else text
    for theirs, ours in _FROM_HTTPX:
        if isinstance(exc, theirs):
            if issubclass(ours, TransportError):
                return ours(message, url=url)
            return ours(message)
    return TransportError(f"{type(exc).__name__}: {message}", url=url)


async def read_status_error(
    response: httpx.Response, url: str, limit: int = MAX_ERROR_BODY
) -> HTTPStatusError:
    """The ``HTTPStatusError`` for a 4xx/5xx response, read from its body (at most ``limit``).

    Always closes the response. An httpx error while reading (a body that stalls past
    the read timeout, a connection reset) is raised as the library's own error.
    """
    pieces: list[bytes] = []
    size = 0
    # An async generator in fact: closed explicitly when left early, not by the GC.
    chunks = cast("AsyncGenerator[bytes, None]", response.aiter_bytes())
    try:
        try:
            async for piece in chunks:
                pieces.append(piece)
                size += len(piece)
                if size >= limit:
                    break  # enough for a message; the rest is never read
        finally:
            await close_response(response, chunks)
    except (httpx.HTTPError, httpx.StreamError) as exc:
        raise map_httpx_error(exc, url) from exc
    return status_error(response.status_code, b"".join(pieces)[:limit], url)


async def close_response(
    response: httpx.Response, chunks: AsyncGenerator[bytes, None] | None
) -> None:
    """Close a streamed httpx response and the iterator reading it, left at any point.

    httpx reads through a chain of async generators, and closing the outer one leaves the
    inner ones suspended (trio warns as each is collected). With the response closed, one
    more read fails at once and ends the whole chain. Not while a reader in another task is
    suspended inside it: its own read ends it.
    """
    await response.aclose()
    if chunks is None or getattr(chunks, "ag_running", False):
        return
    with (
        anyio.CancelScope(shield=True),
        anyio.move_on_after(1.0),
        contextlib.suppress(httpx.HTTPError, httpx.StreamError),
    ):
        async for _ in chunks:
            pass
    await chunks.aclose()


def status_error(status: int, body: bytes, url: str) -> HTTPStatusError:
    """An ``HTTPStatusError`` carrying llama-server's own ``{"error": {...}}`` message."""
    decoded: object
    try:
        decoded = msgspec.json.decode(body) if body else None
    except msgspec.DecodeError:
        decoded = body.decode("utf-8", "replace")
    message: str | None = None
    error_type: str | None = None
    if isinstance(decoded, dict):
        error = decoded.get("error")
        if isinstance(error, dict):
            message = str(error.get("message", "")) or None
            error_type = error.get("type") if isinstance(error.get("type"), str) else None
        elif isinstance(error, str):
            message = error
    elif isinstance(decoded, str) and decoded.strip():
        message = decoded.strip()[:500]
    hint = (
        " (the server needs an API key: pass api_key=...)"
        if status == 401
        else " (this server was not started with the flag this endpoint needs)"
        if status == 501
        else ""
    )
    text = f"HTTP {status} from {url}: {message or 'no error message'}{hint}"
    exc = HTTPStatusError(text, status_code=status, error_type=error_type, body=decoded, url=url)
    exc.message = message or ""  # the server's own words, without our framing
    return exc
