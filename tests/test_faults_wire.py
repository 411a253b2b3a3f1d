"""Faults on the wire: hand-written misbehaving HTTP servers on 127.0.0.1.

Each test pins one defect of the adversarial run (``shared/FAULTS.md``) and fails on the
code that had it: header injection (D3), a POST sent twice (D8), an endless SSE event (D9),
a dropped stream's socket left open (D10), errors without their URL (D16), and httpx
exceptions that escape the library's tree (D6).
"""

from __future__ import annotations

import contextlib
import gc
import socket
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Literal

import anyio
import httpx
import pytest

from llamatelemetry_async import (
    AsyncLlamaClient,
    ClientClosedError,
    ConnectError,
    HTTPStatusError,
    LlamaError,
    LlamaTransport,
    ReadError,
    ReadTimeout,
    RemoteProtocolError,
    TransportError,
    UsageError,
)
from llamatelemetry_async.client._connection import Backend
from llamatelemetry_async.client._errors_map import map_httpx_error, read_status_error
from llamatelemetry_async.client._headers import check_header, check_headers, check_request_head
from llamatelemetry_async.client._pool import ConnectionPool, Timeouts

pytestmark = pytest.mark.anyio

# What a handler tells the connection's thread to do after it answered (or not).
Next = Literal["keep", "close", "wait_eof"]
Handler = Callable[["Request", socket.socket], Next]

_OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n"
_OK_BODY = b'{"status":"ok"}'
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
_EVENT = b'data: {"content":" tok","stop":false}\n\n'
_TIMEOUT = 10.0  # seconds any wait on the server thread may take before the test fails


class Request:
    def __init__(self, method: str, target: str, head: bytes, body: bytes, n: int) -> None:
        self.method = method
        self.target = target
        self.head = head
        self.body = body
        self.n = n  # its rank on its connection, from 1


class Server:
    """A scripted HTTP/1.1 server: one thread per connection, every request recorded."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[Request] = []
        self.connections = 0
        self.eof = threading.Event()  # a connection the handler left open saw the client's EOF
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closing:
                    sock.close()
                    return
                self.connections += 1
                self._socks.append(sock)
                thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
                self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        buf = b""
        n = 0
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                body, buf = buf[:length], buf[length:]
                method, target = head.split(b" ")[:2]
                n += 1
                request = Request(method.decode(), target.decode(), head, body, n)
                with self._lock:
                    self.requests.append(request)
                action = self.handler(request, sock)
                if action == "close":
                    return
                if action == "wait_eof":
                    while sock.recv(65536):
                        pass
                    self.eof.set()
                    return
        except OSError:
            return
        finally:
            sock.close()

    def count(self, method: str, target: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if (r.method, r.target) == (method, target))

    def close(self) -> None:
        with self._lock:
            self._closing = True
            socks = list(self._socks)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        except OSError:
            pass
        self._listener.close()
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._acceptor.join(_TIMEOUT)
        for thread in self._threads:
            thread.join(_TIMEOUT)


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], Server]]:
    servers: list[Server] = []

    def start(handler: Handler) -> Server:
        server = Server(handler)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


async def _wait(event: threading.Event) -> bool:
    return await anyio.to_thread.run_sync(event.wait, _TIMEOUT)


def _health_ok(request: Request, sock: socket.socket) -> Next:
    sock.sendall(_OK + _OK_BODY)
    return "keep"


# ---------------------------------------------------------------- D3: header injection

SMUGGLE = "k\r\nContent-Length: 0\r\n\r\nGET /slots HTTP/1.1\r\nHost: x\r\nX-Pad: "


@pytest.mark.parametrize(
    ("name", "value", "kind"),
    [
        ("Authorization", "Bearer " + SMUGGLE, "carriage return"),
        ("X-Trace", "a\nX-Injected: yes", "line feed"),
        ("X-Trace", "a\x00b", "NUL"),
        ("X-Trace", "a\x1bb", "control character 0x1b"),
        ("X-Trace", "a\x7fb", "control character 0x7f"),
        ("X-Trace", "caf\u00e9", "non-ASCII"),
        ("X Trace", "v", "space"),
        ("X-Trace:", "v", "separator"),
        ("X-Tr\u00e4ce", "v", "non-ASCII"),
        ("", "v", "empty"),
    ],
)
def test_check_header_refuses_what_would_break_the_request(
    name: str, value: str, kind: str
) -> None:
    with pytest.raises(UsageError, match=kind) as info:
        check_header(name, value)
    message = str(info.value)
    assert "Bearer" not in message  # the value (often a secret) is never echoed
    assert "Injected" not in message
    if kind not in ("non-ASCII", "empty", "space", "separator"):
        assert repr(name) in message  # it names the header


def test_check_header_passes_what_http_allows() -> None:
    assert check_header("X-Trace", "a\tb c~!") == (b"X-Trace", b"a\tb c~!")
    assert check_header(b"x-bin", b"\x80\xff") == (b"x-bin", b"\x80\xff")  # obs-text bytes
    assert check_headers({"A": "1", "B-2": "x"}) == [(b"A", b"1"), (b"B-2", b"x")]
    check_request_head(b"POST /completion HTTP/1.1\r\nHost: h:1\r\nContent-Length: 2\r\n\r\n")


@pytest.mark.parametrize(
    "head",
    [
        b"GET /health HTTP/1.1\r\nX: k\r\nContent-Length: 0\r\n\r\nGET /slots HTTP/1.1\r\n\r\n",
        b"GET /health HTTP/1.1\r\nX: a\nInjected: b\r\n\r\n",
        b"GET /health HTTP/1.1\r\nX: a\rb\r\n\r\n",
        b"GET /health HTTP/1.1\r\nX: a\x00\r\n\r\n",
        b"GET /he alth HTTP/1.1\r\n\r\n",
        b"GET /health HTTP/1.1\r\nno colon\r\n\r\n",
    ],
)
def test_check_request_head_refuses_anything_but_one_head(head: bytes) -> None:
    with pytest.raises(UsageError):
        check_request_head(head)


async def test_injected_api_key_never_reaches_the_server(
    serve: Callable[[Handler], Server], client_backend: Backend
) -> None:
    server = serve(_health_ok)
    # Refused when the client is built or at the latest when a request is sent.
    with pytest.raises(UsageError, match="Authorization") as info:
        async with AsyncLlamaClient(server.url, api_key=SMUGGLE, backend=client_backend) as c:
            await c.health()
    assert "slots" not in str(info.value)
    with pytest.raises(UsageError):
        async with AsyncLlamaClient(server.url, api_key=SMUGGLE, backend=client_backend) as c:
            async for _ in c.stream("x", n_predict=1):
                pass
    with pytest.raises(UsageError, match="X-Trace"):
        async with AsyncLlamaClient(
            server.url, headers={"X-Trace": "a\r\nX-Injected: yes"}, backend=client_backend
        ) as c:
            await c.health()
    # A clean request after them: the server has read everything that was sent.
    async with AsyncLlamaClient(server.url, backend=client_backend) as c:
        await c.health()
    assert [(r.method, r.target) for r in server.requests] == [("GET", "/health")]
    assert b"Injected" not in server.requests[0].head


async def test_llama_transport_refuses_injection_as_httpx_does(
    serve: Callable[[Handler], Server],
) -> None:
    server = serve(_health_ok)
    async with httpx.AsyncClient(transport=LlamaTransport()) as http:
        with pytest.raises(httpx.LocalProtocolError) as info:
            await http.get(server.url + "/health", headers={"X-Trace": "a\r\nX-Injected: 1"})
        assert isinstance(info.value.__cause__, UsageError)
        assert isinstance(map_httpx_error(info.value), UsageError)
        assert (await http.get(server.url + "/health")).status_code == 200
    assert server.count("GET", "/health") == 1
    assert b"Injected" not in server.requests[0].head


async def test_pool_refuses_a_smuggling_head_before_connecting(
    serve: Callable[[Handler], Server],
) -> None:
    server = serve(_health_ok)
    pool = ConnectionPool()
    timeouts = Timeouts(connect=5, read=5, write=5, pool=5)
    host, port = "127.0.0.1", int(server.url.rsplit(":", 1)[1])
    head = b"GET /health HTTP/1.1\r\nX: k\r\nContent-Length: 0\r\n\r\nGET /slots HTTP/1.1\r\n\r\n"
    try:
        with pytest.raises(UsageError):
            await pool.request(host, port, head, b"", timeouts)
        assert pool.stats.opened == 0
    finally:
        await pool.aclose()
    assert server.connections == 0


# ---------------------------------------------------------------- D8: a POST sent twice


def _warm_then_swallow_posts(request: Request, sock: socket.socket) -> Next:
    if request.method == "GET":
        sock.sendall(_OK + _OK_BODY)  # keep-alive: the client pools this connection
        return "keep"
    return "close"  # read the POST whole, then die without a word (a query of death)


@pytest.mark.parametrize("how", ["stream", "complete"])
async def test_post_read_by_a_dying_server_is_sent_once(
    serve: Callable[[Handler], Server], client_backend: Backend, how: str
) -> None:
    server = serve(_warm_then_swallow_posts)
    async with AsyncLlamaClient(server.url, backend=client_backend) as client:
        await client.health()
        assert client.pool_stats is not None
        assert client.pool_stats.idle == 1  # the POST goes on this reused connection
        with pytest.raises((ReadError, RemoteProtocolError)) as info:
            if how == "stream":
                async for _ in client.stream("x", n_predict=1):
                    pass
            else:
                await client.completion("x", n_predict=1)
        assert client.pool_stats.active == 0
    # The error came after the server closed, which it does only after reading a POST
    # whole: a re-send would have been counted already.
    assert server.count("POST", "/completion") == 1
    assert server.connections == 1
    assert info.value.url is not None
    assert info.value.url.endswith("/completion")


async def test_idle_connection_closed_by_the_server_is_replaced_quietly(
    serve: Callable[[Handler], Server], client_backend: Backend
) -> None:
    closed = threading.Event()

    def answer_then_close_when_idle(request: Request, sock: socket.socket) -> Next:
        sock.sendall(_OK + _OK_BODY)  # keep-alive advertised...
        if request.n == 1 and not closed.is_set():
            closed.set()
            return "close"  # ...but the connection is dropped once idle (llama-server at 5 s)
        return "keep"

    server = serve(answer_then_close_when_idle)
    async with AsyncLlamaClient(server.url, backend=client_backend) as client:
        await client.health()
        assert await _wait(closed)
        await client.health()  # the dead idle connection is noticed and not used
        await client.completion("x", n_predict=1)
    assert server.connections == 2
    assert server.count("GET", "/health") == 2
    assert server.count("POST", "/completion") == 1


# ---------------------------------------------------------------- D9: an endless event


async def test_endless_sse_event_is_a_protocol_error(
    serve: Callable[[Handler], Server], client_backend: Backend
) -> None:
    def endless_line(request: Request, sock: socket.socket) -> Next:
        piece = b"x" * (1 << 20)
        chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
        try:
            sock.sendall(_SSE_HEAD + b"%x\r\ndata: \r\n" % 6)
            for _ in range(17):  # past the 16 MiB cap, and no end of event in sight
                sock.sendall(chunk)
        except OSError:
            return "close"  # the client gave up, as it should
        return "wait_eof"

    server = serve(endless_line)
    async with AsyncLlamaClient(server.url, backend=client_backend) as client:
        with pytest.raises(RemoteProtocolError, match="SSE event longer") as info:
            async for _ in client.stream("x", n_predict=1):
                pass
    assert info.value.url == server.url + "/completion"
    assert server.url + "/completion" in str(info.value)


# ---------------------------------------------------------------- D10: a dropped stream


def _stream_forever(request: Request, sock: socket.socket) -> Next:
    sock.sendall(_SSE_HEAD + b"%x\r\n%s\r\n" % (len(_EVENT), _EVENT))
    return "wait_eof"  # a generating llama-server: stops when the client goes away


async def test_dropped_stream_closes_its_socket_at_once(
    serve: Callable[[Handler], Server], client_backend: Backend
) -> None:
    server = serve(_stream_forever)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with AsyncLlamaClient(server.url, backend=client_backend) as client:
            stream = client.stream("x", n_predict=1000)
            assert (await stream.__anext__()).content == " tok"
            del stream  # no aclose(), no cycle: the last reference goes here
            assert await _wait(server.eof)  # the server sees the connection end
            assert client.pool_stats is not None
            assert client.pool_stats.active == 0
        gc.collect()
    leaks = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, [str(w.message) for w in leaks]


# ---------------------------------------------------------------- D16: errors name the URL


async def test_pool_errors_carry_the_url(
    serve: Callable[[Handler], Server], client_backend: Backend
) -> None:
    def silent(request: Request, sock: socket.socket) -> Next:
        return "wait_eof"

    server = serve(silent)
    url = server.url + "/completion"
    timeout = httpx.Timeout(5.0, read=0.2)
    async with AsyncLlamaClient(server.url, timeout=timeout, backend=client_backend) as client:
        with pytest.raises(ReadTimeout) as info:
            async for _ in client.stream("x", n_predict=1):
                pass
        assert info.value.url == url
        assert f"no data from {url} for 0.2 s" in str(info.value)
        with pytest.raises(ReadTimeout) as info:
            await client.completion("x", n_predict=1)
        assert info.value.url == url


async def test_protocol_errors_carry_the_url(
    serve: Callable[[Handler], Server], client_backend: Backend
) -> None:
    def hex_prefix(request: Request, sock: socket.socket) -> Next:
        sock.sendall(_SSE_HEAD + b"0x5\r\nhello\r\n0\r\n\r\n")
        return "wait_eof"

    server = serve(hex_prefix)
    async with AsyncLlamaClient(server.url, backend=client_backend) as client:
        with pytest.raises(RemoteProtocolError, match="chunk size") as info:
            async for _ in client.stream("x", n_predict=1):
                pass
    assert info.value.url == server.url + "/completion"
    assert server.url + "/completion" in str(info.value)


async def test_connect_error_carries_the_url(client_backend: Backend) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with AsyncLlamaClient(url, backend=client_backend) as client:
            with pytest.raises(ConnectError) as info:
                async for _ in client.stream("x", n_predict=1):
                    pass
    assert info.value.url == url + "/completion"


# ---------------------------------------------------------------- D6: every httpx error


def _httpx_exception_classes() -> list[type[Exception]]:
    roots: list[type[Exception]] = [
        httpx.HTTPError,
        httpx.StreamError,
        httpx.InvalidURL,
        httpx.CookieConflict,
    ]
    seen: list[type[Exception]] = []
    todo = list(roots)
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.append(cls)
            todo.extend(cls.__subclasses__())
    return sorted(seen, key=lambda c: c.__name__)


def _instance(cls: type[Exception]) -> Exception:
    request = httpx.Request("POST", "http://127.0.0.1:1/completion")
    if issubclass(cls, httpx.HTTPStatusError):
        response = httpx.Response(500, content=b'{"error":{"message":"boom"}}', request=request)
        return cls("500", request=request, response=response)
    if issubclass(cls, httpx.RequestError):
        return cls("it failed", request=request)
    try:
        return cls("it failed")
    except TypeError:
        return cls()  # StreamConsumed and kin take no message


@pytest.mark.parametrize("cls", _httpx_exception_classes(), ids=lambda c: c.__name__)
def test_every_httpx_exception_maps_into_the_tree(cls: type[Exception]) -> None:
    exc = _instance(cls)
    mapped = map_httpx_error(exc, "http://127.0.0.1:1/completion")  # type: ignore[arg-type]
    assert isinstance(mapped, LlamaError)
    if isinstance(exc, httpx.TimeoutException):
        assert isinstance(mapped, TimeoutError)
    if isinstance(exc, httpx.HTTPStatusError):
        assert isinstance(mapped, HTTPStatusError)
        assert mapped.status_code == 500
        assert mapped.message == "boom"
    if isinstance(mapped, TransportError):
        assert mapped.url == "http://127.0.0.1:1/completion"


async def test_read_status_error_maps_a_stalled_error_body(
    serve: Callable[[Handler], Server],
) -> None:
    def stalled_500(request: Request, sock: socket.socket) -> Next:
        sock.sendall(b'HTTP/1.1 500 Oops\r\nContent-Length: 100000000\r\n\r\n{"err')
        return "wait_eof"

    server = serve(stalled_500)
    url = server.url + "/completion"
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=0.2)) as http:
        response = await http.send(http.build_request("POST", url, content=b"{}"), stream=True)
        with pytest.raises(ReadTimeout) as info:
            await read_status_error(response, url)
    assert info.value.url == url
    assert response.is_closed


# Leaving an httpx body early leaves httpx's nested async generators to the garbage
# collector, which trio reports; closing them is httpx's job (ours closes the iterator it
# was given and the response).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_read_status_error_caps_a_huge_error_body(
    serve: Callable[[Handler], Server],
) -> None:
    body = b"x" * (3 << 20)

    def huge_500(request: Request, sock: socket.socket) -> Next:
        try:
            sock.sendall(b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        except OSError:
            return "close"  # the client stopped reading at its cap, as it should
        return "wait_eof"

    server = serve(huge_500)
    url = server.url + "/completion"
    async with httpx.AsyncClient() as http:
        response = await http.send(http.build_request("POST", url, content=b"{}"), stream=True)
        error = await read_status_error(response, url)
    assert error.status_code == 500
    assert isinstance(error.body, str)
    assert len(error.body) <= 1 << 20
    assert response.is_closed


def test_mapping_keeps_our_own_error_from_the_transport() -> None:
    ours = ReadError("the connection broke", url="http://h:1/x")
    wrapped = httpx.ReadError("wrapped")
    wrapped.__cause__ = ours  # as `raise httpx.ReadError(...) from ours` leaves it
    assert map_httpx_error(wrapped) is ours


async def test_a_connection_made_while_the_pool_closes_is_closed_not_used(
    client_backend: Backend,
) -> None:
    """``aclose()`` while a request is still connecting: that connection must not be used."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    # A full accept queue makes the kernel drop SYNs: the pool's connect waits in flight.
    fillers = []
    for _ in range(2):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    pool = ConnectionPool(backend=client_backend)
    timeouts = Timeouts(connect=20, read=5, write=5, pool=5)
    head = b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n"
    errors: list[BaseException] = []
    accepted: list[socket.socket] = []
    try:
        async with anyio.create_task_group() as tg:

            async def request() -> None:
                try:
                    await pool.request("127.0.0.1", port, head, b"{}", timeouts)
                except ClientClosedError as exc:
                    errors.append(exc)

            tg.start_soon(request)
            await anyio.wait_all_tasks_blocked()
            await pool.aclose()
            # Room in the queue again: the SYN is retried and the connect completes.
            listener.setblocking(False)
            with anyio.fail_after(_TIMEOUT):
                while not errors:
                    try:
                        accepted.append(listener.accept()[0])
                    except BlockingIOError:
                        await anyio.sleep(0.05)  # polling a non-blocking accept
        assert len(errors) == 1
        assert pool.stats.active == 0
    finally:
        for sock in fillers + accepted:
            sock.close()
        listener.close()


@pytest.mark.parametrize("own_httpx", [False, True], ids=["pool", "httpx"])
async def test_headers_merge_whatever_their_case(
    serve: Callable[[Handler], Server], client_backend: Backend, own_httpx: bool
) -> None:
    server = serve(_health_ok)
    headers = {"host": "h.example", "user-agent": "mine/1"}
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx.AsyncClient()) if own_httpx else None
        client = await stack.enter_async_context(
            AsyncLlamaClient(server.url, headers=headers, http_client=http, backend=client_backend)
        )
        await client.health(extra_headers={"HOST": "per.request", "x-one": "1"})
    (request,) = server.requests
    lines = [line.lower() for line in request.head.split(b"\r\n")[1:]]
    hosts = [line for line in lines if line.startswith(b"host:")]
    agents = [line for line in lines if line.startswith(b"user-agent:")]
    assert hosts == [b"host: per.request"]  # one Host: the request's own wins
    assert agents == [b"user-agent: mine/1"]  # the client's replaces the library's
