"""Translation of dependency errors into the library's tree, in one place."""

from __future__ import annotations

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
    TransportError,
    WriteError,
    WriteTimeout,
)

__all__ = ["map_httpx_error", "status_error", "to_httpx_error"]

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
_FROM_HTTPX: list[tuple[type[httpx.HTTPError], type[TransportError]]] = [
    *_PAIRS,
    (httpx.DecodingError, RemoteProtocolError),
]


def to_httpx_error(exc: TransportError, request: httpx.Request) -> httpx.TransportError:
    """The httpx error a transport raises for one of ours."""
    for theirs, ours in _PAIRS:
        if isinstance(exc, ours):
            return theirs(str(exc), request=request)
    return httpx.TransportError(str(exc), request=request)


def map_httpx_error(exc: httpx.HTTPError, url: str | None = None) -> LlamaError:
    """The library's error for an httpx one (raise it ``from exc``)."""
    cause = exc.__cause__
    if isinstance(cause, LlamaError):
        return cause  # raised by our own transport and only wrapped by httpx
    for theirs, ours in _FROM_HTTPX:
        if isinstance(exc, theirs):
            return ours(f"{exc} ({url})" if url else str(exc), url=url)
    return TransportError(f"{type(exc).__name__}: {exc}", url=url)


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
