"""``AsyncLlamaClient``: every llama-server endpoint of one server, streams as ``TokenStream``."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import TracebackType
from typing import Self

import httpx

from .._errors import ClientClosedError, UsageError
from ._api import Message, RequestMethods
from ._connection import Backend
from ._dispatch import HttpDispatcher
from ._observe import Instrumentation
from ._params import TimeoutTypes, client_timeout
from ._pool import PoolStats

__all__ = ["DEFAULT_TIMEOUT", "AsyncLlamaClient", "Message"]

#: Reads may wait long: a big prompt's prefill sends nothing until the first token.
DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=60.0)


class _State(enum.Enum):
    UNOPENED = 1
    OPENED = 2
    CLOSED = 3


class AsyncLlamaClient(RequestMethods):
    """An async client for one llama-server.

    ```python
    async with AsyncLlamaClient("http://127.0.0.1:8080") as client:
        async with client.stream("Once upon a time", n_predict=32) as stream:
            async for chunk in stream:
                print(chunk.text, end="", flush=True)
        print(stream.timings)
    ```

    By default requests go through the library's own HTTP/1.1 connection pool
    (``LlamaTransport``), whose cost per request does not grow with the number of open
    connections, so one client carries thousands of concurrent streams. Pass
    ``http_client`` to use your own ``httpx.AsyncClient`` instead (its transport, proxies,
    TLS and limits); the client then does not close it.

    ``timeout`` is an ``httpx.Timeout`` or seconds; the default allows 600 s between two
    reads because a long prompt's prefill sends nothing until the first token.
    ``max_connections=None`` (the default) sets no limit.

    Every request method also takes, as keywords, ``timeout=`` (this request only),
    ``extra_headers=`` and, where a JSON body is sent, ``extra_body=`` (fields merged into
    the body unchecked); streaming methods take ``deadline=`` (seconds for the whole
    stream). These names never go into the body. Other keywords are llama-server request
    parameters, sent as they are; a name that neither llama.cpp nor the OpenAI API knows
    (a typo such as ``n_predcit``) gives one ``UnknownParameterWarning`` per name, or a
    ``UsageError`` when the client was created with ``strict=True``.
    """

    def __init__(
        self,
        base_url: str | httpx.URL = "http://127.0.0.1:8080",
        *,
        api_key: str | None = None,
        timeout: TimeoutTypes | None = DEFAULT_TIMEOUT,
        max_connections: int | None = None,
        headers: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
        backend: Backend = "auto",
        instrumentation: Instrumentation | None = None,
        strict: bool = False,
    ) -> None:
        try:
            url = base_url if isinstance(base_url, httpx.URL) else httpx.URL(str(base_url))
        except httpx.InvalidURL as exc:
            raise UsageError(
                f"base_url {_redact_text(str(base_url))!r} is not a valid URL: {exc}"
            ) from None  # httpx's error may quote the URL whole, password included
        if url.scheme not in ("http", "https") or not url.host:
            raise UsageError(
                "base_url must be an http:// or https:// URL with a host, got "
                f"{_redact_text(str(base_url))!r}"
            )
        if backend not in ("auto", "asyncio", "anyio"):
            raise UsageError(f"backend must be 'auto', 'asyncio' or 'anyio', got {backend!r}")
        if max_connections is not None and (
            isinstance(max_connections, bool)
            or not isinstance(max_connections, int)
            or max_connections < 1
        ):
            raise UsageError(
                f"max_connections must be an int >= 1 or None, got {max_connections!r}"
            )
        self.base_url = url
        self.instrumentation = instrumentation
        self._strict = bool(strict)
        self._dispatcher: HttpDispatcher = HttpDispatcher(
            url,
            api_key=api_key,
            headers=headers,
            timeout=client_timeout(timeout),
            max_connections=max_connections,
            http_client=http_client,
            backend=backend,
        )
        self._state = _State.UNOPENED

    @property
    def dispatcher(self) -> HttpDispatcher:
        """Where this client's requests go (its ``HttpDispatcher``)."""
        return self._dispatcher

    # ----------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> Self:
        if self._state is not _State.UNOPENED:
            raise UsageError(
                "this client was already opened"
                if self._state is _State.OPENED
                else "this client is closed; create a new AsyncLlamaClient"
            )
        self._state = _State.OPENED
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection; calling it again does nothing."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        await self._dispatcher.aclose()

    @property
    def is_closed(self) -> bool:
        """True once ``aclose()`` was called (or the ``async with`` block was left)."""
        return self._state is _State.CLOSED

    @property
    def strict(self) -> bool:
        """True if unknown request parameter names raise ``UsageError`` (not a warning)."""
        return self._strict

    @property
    def pool_stats(self) -> PoolStats | None:
        """Connections opened, active, idle and requests sent (built-in pool only)."""
        return self._dispatcher.stats

    def _check_open(self) -> None:
        if self._state is _State.CLOSED:
            raise ClientClosedError("this client is closed; create a new AsyncLlamaClient")

    def __repr__(self) -> str:
        return f"<AsyncLlamaClient {_redact_url(self.base_url)} {self._state.name.lower()}>"


def _redact_url(url: httpx.URL) -> str:
    """The URL without its user and password (they may be credentials)."""
    return str(url.copy_with(userinfo=b"***")) if url.userinfo else str(url)


def _redact_text(url: str) -> str:
    """``_redact_url`` for text that did not parse as a URL."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    return f"{scheme}{sep}{authority}{slash}{path}"
