"""The seam between what to send and where it goes.

The client's request methods build a ``Request`` once (method, path, body, per-request
options) and hand it to a ``Dispatcher``:

- ``HttpDispatcher``: one server at one URL, through the library's own pool (``http://``) or
  an ``httpx.AsyncClient`` (``https://``, or a user's own client);
- the engine's routed dispatcher, which picks a server (slots, health, retries) and hands the
  request to that server's ``HttpDispatcher``.

A dispatcher answers a stream with a ``Source`` (read by a ``TokenStream``) and anything else
with a ``Reply``. Request heads are built in one place: ``HttpDispatcher._headers``.

Every request sent while an OpenTelemetry span is current carries that span's context
(W3C ``traceparent``, or whatever the application's global propagators write), so a server
that traces (a front door, a proxy) continues the caller's trace; see ``trace_context``.
"""

from __future__ import annotations

import abc
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import httpx

from .._version import __version__
from ._connection import Backend
from ._errors_map import MAX_ERROR_BODY, map_httpx_error, read_status_error, status_error
from ._headers import is_safe_header
from ._observe import RequestObserver
from ._params import NO_OPTIONS, RequestOptions, check_api_key, check_headers, encode_body
from ._pool import ConnectionPool, PoolStats, Timeouts
from ._stream import HttpxSource, PoolSource, Source

if TYPE_CHECKING:
    from opentelemetry.trace import Span

__all__ = ["Dispatcher", "HttpDispatcher", "Reply", "Request", "pool_timeouts", "trace_context"]

_STREAM_HEADERS: Final = {"Accept": "text/event-stream", "Content-Type": "application/json"}
_JSON_HEADERS: Final = {"Content-Type": "application/json"}


class Request:
    """One request as the client built it: what to send, not where.

    ``slot`` marks a generation request (it occupies one of a server's slots, so an engine
    waits for a free one); the others (tokenize, props, health...) go to any ready server.
    """

    __slots__ = ("body", "method", "options", "path", "payload", "slot", "stream")

    def __init__(
        self,
        method: str,
        path: str,
        body: Any = None,
        options: RequestOptions = NO_OPTIONS,
        *,
        stream: bool = False,
        slot: bool = False,
    ) -> None:
        self.method = method
        self.path = path
        self.body = body
        self.options = options
        self.stream = stream
        self.slot = slot
        self.payload = _payload(body, options.extra_body, stream)
        """The JSON body as sent, encoded once (a retry on another server reuses it)."""

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path}{' stream' if self.stream else ''}>"


def _payload(body: Any, extra: Mapping[str, Any] | None, stream: bool) -> bytes | None:
    """``body`` with ``extra_body`` merged in (and ``stream: true`` for a stream), encoded."""
    if body is None:
        return None
    if isinstance(body, dict) and (extra is not None or stream):
        body = {**body, **extra} if extra is not None else dict(body)
        if stream:
            body["stream"] = True  # after extra_body: a stream whatever it says
    return encode_body(body)


class Reply:
    """A complete answer with a 2xx status: its body, read whole."""

    __slots__ = ("content", "content_type", "gpu", "status", "url")

    def __init__(self, status: int, content: bytes, url: str, content_type: str = "") -> None:
        self.status = status
        self.content = content
        self.url = url
        self.content_type = content_type
        self.gpu: Mapping[str, Any] | None = None
        """The request's GPU figures (energy, power...), when an engine measured them."""

    @property
    def text(self) -> str:
        """The body as text (undecodable bytes replaced)."""
        return self.content.decode("utf-8", "replace")


class Dispatcher(abc.ABC):
    """Sends the requests a client builds. Implement it to route them elsewhere."""

    @abc.abstractmethod
    def open_stream(self, request: Request, observer: RequestObserver | None) -> Source:
        """The source a ``TokenStream`` reads ``request`` from (sent when the stream opens)."""

    @abc.abstractmethod
    async def send(self, request: Request, observer: RequestObserver | None) -> Reply:
        """Send ``request`` and read its answer; ``HTTPStatusError`` for a 4xx/5xx status.

        Tells ``observer`` (when given) which server answers, with ``on_server``.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close every connection this dispatcher owns."""


# Bound on the first request made once OpenTelemetry is loaded (see ``trace_context``).
_current_span: Callable[[], Span] | None = None
_no_span: object = None
_inject: Callable[[dict[str, str]], None] | None = None


def trace_context() -> dict[str, str] | None:
    """The trace headers of the span current now (``traceparent``...), or ``None``.

    The check every request makes. Until OpenTelemetry is loaded no span can be current:
    one dictionary lookup, and OpenTelemetry is never imported for it. Once loaded, one
    call to ``get_current_span`` and an identity test when no span is current. With a span
    whose context is valid (recording or not: an unsampled trace propagates too), the
    global propagator writes the headers, so the application's ``OTEL_PROPAGATORS`` (or
    ``set_global_textmap``) decide which. A header no server could parse is left out.
    """
    current_span = _current_span
    if current_span is None:
        if "opentelemetry.trace" not in sys.modules:
            return None
        current_span = _bind_opentelemetry()
    span = current_span()
    if span is _no_span or not span.get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    assert _inject is not None
    _inject(carrier)
    headers = {k: v for k, v in carrier.items() if is_safe_header(k, v)}
    return headers or None


def _bind_opentelemetry() -> Callable[[], Span]:
    global _current_span, _no_span, _inject
    from opentelemetry import propagate, trace

    _no_span = trace.INVALID_SPAN
    _inject = propagate.inject
    _current_span = trace.get_current_span
    return _current_span


def pool_timeouts(timeout: httpx.Timeout) -> Timeouts:
    """The pool's ``Timeouts`` from an ``httpx.Timeout``."""
    get = timeout.as_dict().get
    return Timeouts(connect=get("connect"), read=get("read"), write=get("write"), pool=get("pool"))


class HttpDispatcher(Dispatcher):
    """One server at ``base_url``: the built-in pool for ``http://`` (O(1) per request at any
    number of connections), httpx's transport for ``https://``, or ``http_client``."""

    def __init__(
        self,
        base_url: httpx.URL,
        *,
        api_key: str | None,
        headers: Mapping[str, str] | None,
        timeout: httpx.Timeout,
        max_connections: int | None = None,
        http_client: httpx.AsyncClient | None = None,
        backend: Backend = "auto",
    ) -> None:
        base = {"User-Agent": f"llamatelemetry_async/{__version__}"}
        if api_key is not None:
            check_api_key(api_key)
            if api_key:
                base["Authorization"] = f"Bearer {api_key}"
        if headers is not None:
            base = merge_headers(base, check_headers(headers, "headers"))
        netloc = base_url.netloc.decode("ascii")
        self.origin = f"{base_url.scheme}://{netloc}"
        """``scheme://host:port`` (no user info, no path)."""
        self._prefix = base_url.raw_path.rstrip(b"/").decode("ascii")
        self._host = base_url.host
        self._port = base_url.port or (443 if base_url.scheme == "https" else 80)
        self._base_headers = base
        self._timeout = timeout
        self._timeouts = pool_timeouts(timeout)
        self.owns_http = http_client is None
        """Whether ``aclose()`` closes the httpx client (not a user's own, by default)."""
        self.pool: ConnectionPool | None = None
        """The built-in pool, when requests go through it."""
        if http_client is None and base_url.scheme == "http":
            self.pool = ConnectionPool(max_connections=max_connections, backend=backend)
            # The head of every request that sets no headers of its own: made once, as bytes.
            self._static = {
                stream: _head_lines(self._headers(stream, True, NO_OPTIONS))
                for stream in (False, True)
            }
        elif http_client is None:  # TLS: httpx's own transport (the pool speaks plain HTTP)
            limits = httpx.Limits(max_connections=max_connections)
            http_client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(limits=limits))
        self._http = http_client

    @property
    def stats(self) -> PoolStats | None:
        """The built-in pool's counters (``None`` on the httpx path)."""
        return self.pool.stats if self.pool is not None else None

    def _headers(
        self,
        stream: bool,
        body: bool,
        options: RequestOptions,
        *,
        host: bool = True,
        context: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """Every header of a request, in one place (the pool's static heads come from here).

        The library's defaults (with ``context``, the current span's trace headers), then
        the client's headers, then this request's: each layer replaces a name of the one
        below whatever its case, so a ``traceparent`` the caller sets is sent, not ours.
        ``host=False`` for httpx, which writes Host from the URL (unless the caller set one).
        """
        defaults = {"Host": self._host_header()} if host else {}
        if context is not None:
            defaults.update(context)
        if stream:
            defaults.update(_STREAM_HEADERS)
        elif body:
            defaults.update(_JSON_HEADERS)
        headers = merge_headers(defaults, self._base_headers)
        if options.headers is not None:
            headers = merge_headers(headers, options.headers)
        return headers

    def _host_header(self) -> str:
        return self.origin.partition("://")[2]

    def _target(self, path: str) -> str:
        return self._prefix + path

    def _pool_head(
        self, request: Request, payload: bytes | None, context: Mapping[str, str] | None
    ) -> bytes:
        if request.options.headers is None and context is None:
            lines = self._static[request.stream]
        else:
            options = request.options
            lines = _head_lines(
                self._headers(request.stream, payload is not None, options, context=context)
            )
        length = b"" if payload is None else b"Content-Length: %d\r\n" % len(payload)
        if payload is None and request.method == "POST":
            length = b"Content-Length: 0\r\n"
        return b"%s %s HTTP/1.1\r\n%s%s\r\n" % (
            request.method.encode("ascii"),
            self._target(request.path).encode("ascii"),
            lines,
            length,
        )

    def _pool_timeouts(self, options: RequestOptions) -> Timeouts:
        return self._timeouts if options.timeout is None else pool_timeouts(options.timeout)

    def _httpx_request(
        self, request: Request, payload: bytes | None, context: Mapping[str, str] | None
    ) -> httpx.Request:
        assert self._http is not None
        headers = self._headers(
            request.stream, payload is not None, request.options, host=False, context=context
        )
        return self._http.build_request(
            request.method,
            self.origin + self._target(request.path),
            content=payload,
            headers=headers,
            timeout=self._timeout if request.options.timeout is None else request.options.timeout,
        )

    def open_stream(self, request: Request, observer: RequestObserver | None) -> Source:
        """A ``PoolSource`` (or ``HttpxSource``) for ``request``, sent when it opens.

        The trace headers are those of the span current when it opens (a ``TokenStream``
        opens its source with the request's own span current), not when it is made.
        """
        payload = request.payload
        url = self.origin + self._target(request.path)
        if self.pool is not None:
            return _PoolSource(
                self,
                request,
                self.pool,
                self._host,
                self._port,
                self._pool_head(request, payload, None),
                payload or b"",
                self._pool_timeouts(request.options),
                url,
            )
        assert self._http is not None
        return _HttpxSource(self, request, self._http, self._httpx_request(request, payload, None))

    async def send(self, request: Request, observer: RequestObserver | None) -> Reply:
        """Send ``request``, read the whole answer; ``HTTPStatusError`` for 4xx/5xx."""
        if observer is not None:
            observer.on_server(self.origin, None, ())
        payload = request.payload
        url = self.origin + self._target(request.path)
        if self.pool is None:
            assert self._http is not None
            try:
                built = self._httpx_request(request, payload, trace_context())
                response = await self._http.send(built, stream=True)
            except httpx.HTTPError as exc:
                raise map_httpx_error(exc, url) from exc
            if response.status_code >= 400:
                raise await read_status_error(response, url)
            try:
                content = await response.aread()
            except (httpx.HTTPError, httpx.StreamError) as exc:
                raise map_httpx_error(exc, url) from exc
            finally:
                await response.aclose()
            return Reply(
                response.status_code, content, url, response.headers.get("content-type", "")
            )
        pool = self.pool
        conn = await pool.request(
            self._host,
            self._port,
            self._pool_head(request, payload, trace_context()),
            payload or b"",
            self._pool_timeouts(request.options),
            head_only=request.method == "HEAD",
        )
        head = conn.parser.head
        assert head is not None
        pieces: list[bytes] = []
        limit = MAX_ERROR_BODY if head.status >= 400 else None
        try:
            conn.parser.set_sink(pieces.append)
            while not conn.parser.done and (limit is None or sum(map(len, pieces)) < limit):
                await conn.wait()
        except BaseException:
            await pool.discard(conn)
            raise
        await (pool.release if conn.parser.done else pool.discard)(conn)
        content = b"".join(pieces)
        if head.status >= 400:
            raise status_error(head.status, content, url)
        content_type = (head.get(b"content-type") or b"").decode("latin-1")
        return Reply(head.status, content, url, content_type)

    async def aclose(self) -> None:
        """Close the pool (or the httpx client, when it is this dispatcher's own)."""
        if self.pool is not None:
            await self.pool.aclose()
        elif self.owns_http and self._http is not None:
            await self._http.aclose()


class _PoolSource(PoolSource):
    """A ``PoolSource`` whose head gets the trace headers current when it opens."""

    __slots__ = ("_dispatcher", "_request")

    def __init__(
        self,
        dispatcher: HttpDispatcher,
        request: Request,
        pool: ConnectionPool,
        host: str,
        port: int,
        head: bytes,
        body: bytes,
        timeouts: Timeouts,
        url: str,
    ) -> None:
        super().__init__(pool, host, port, head, body, timeouts, url)
        self._dispatcher = dispatcher
        self._request = request

    async def open(self, sink: Callable[[bytes], None], backlog: Callable[[], int]) -> None:
        context = trace_context()
        if context is not None:
            request = self._request
            self._head = self._dispatcher._pool_head(request, request.payload, context)
        await super().open(sink, backlog)


class _HttpxSource(HttpxSource):
    """An ``HttpxSource`` whose request gets the trace headers current when it opens.

    An instrumented httpx client (``instrument_httpx=True``, or the user's own) then
    replaces ``traceparent`` with its HTTP span's: the request carries one, never two.
    """

    def __init__(
        self,
        dispatcher: HttpDispatcher,
        request: Request,
        http: httpx.AsyncClient,
        built: httpx.Request,
    ) -> None:
        super().__init__(http, built)
        self._dispatcher = dispatcher
        self._source_request = request

    async def open(self, sink: Callable[[bytes], None], backlog: Callable[[], int]) -> None:
        context = trace_context()
        if context is not None:
            request = self._source_request
            self._request = self._dispatcher._httpx_request(request, request.payload, context)
        await super().open(sink, backlog)


def merge_headers(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """``base`` updated by ``extra``, a name in ``extra`` replacing any case of it in ``base``."""
    lowered = {name.lower() for name in extra}
    merged = {name: value for name, value in base.items() if name.lower() not in lowered}
    merged.update(extra)
    return merged


def _head_lines(headers: Mapping[str, str]) -> bytes:
    # Checked on the way in (check_headers): latin-1 cannot fail here.
    return b"".join(
        b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
    )
