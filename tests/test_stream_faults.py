"""Streams against answers that are not a complete llama-server stream, on every path.

A hand-written HTTP server on 127.0.0.1 answers each connection with canned bytes (and may
then drip events forever or stall), so each case is exact and needs no model.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

from llamatelemetry_async import (
    AsyncLlamaClient,
    DeadlineExceeded,
    LlamaError,
    ReadTimeout,
    RemoteProtocolError,
    StreamError,
    UsageError,
)
from llamatelemetry_async.client._connection import Backend

pytestmark = pytest.mark.anyio

SECRET = "SECRET-COMPLETION-TEXT"
EVENT = b'data: {"index":0,"content":"a","tokens":[1],"stop":false}\n\n'
FINAL = b'data: {"index":0,"content":"","stop":true,"stop_type":"limit"}\n\n'


def _head(status: str, content_type: str = "text/event-stream", extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n{extra}"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b"0\r\n\r\n"


def _sse(*events: bytes, end: bool = True) -> bytes:
    body = _head("200 OK") + b"".join(_chunk(e) for e in events)
    return body + (_chunk(b"") if end else b"")


@contextlib.contextmanager
def canned(
    response: bytes, *, then: str = "close", gone: threading.Event | None = None
) -> Iterator[str]:
    """Serve ``response`` to every connection, then ``close``, ``stall`` or ``drip`` events.

    ``gone`` is set when a dripping connection finds its client gone.
    """
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                piece = conn.recv(65536)
                if not piece:
                    return
                data += piece
            try:
                conn.sendall(response)
                if then == "stall":
                    stop.wait()
                elif then == "drip":
                    while not stop.wait(0.05):  # a slow server's pace, not synchronisation
                        conn.sendall(_chunk(EVENT))
            except OSError:  # the client went away
                if gone is not None:
                    gone.set()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the serving thread
        server.close()
        thread.join(5)


@pytest.fixture(params=["pool", "httpx"])
def path(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.asynccontextmanager
async def _client(url: str, path: str, backend: Backend, **kw: Any) -> Any:
    if path == "httpx":
        async with (
            httpx.AsyncClient(timeout=kw.get("timeout", 5.0)) as http,
            AsyncLlamaClient(url, http_client=http, **kw) as client,
        ):
            yield client
    else:
        async with AsyncLlamaClient(url, backend=backend, **kw) as client:
            yield client


async def _read(stream: Any) -> list[Any]:
    async with stream:
        return [chunk async for chunk in stream]


@pytest.mark.parametrize(
    ("response", "match"),
    [
        (_head("200 OK", "text/html") + _chunk(b"<html>hi</html>") + _chunk(b""), "text/html"),
        (b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n", "status 204"),
        (
            _head("200 OK", extra="Content-Encoding: gzip\r\n") + _chunk(b"\x1f\x8b") + _chunk(b""),
            "gzip",
        ),
        (_sse(EVENT, EVENT), "ended before its final event"),
    ],
    ids=["html", "204", "gzip", "no-final-event"],
)
async def test_answers_that_are_not_a_stream_are_errors(
    response: bytes, match: str, path: str, client_backend: Backend
) -> None:
    with canned(response) as url:
        async with _client(url, path, client_backend) as client:
            with anyio.fail_after(10), pytest.raises(RemoteProtocolError, match=match):
                await _read(client.stream("x", n_predict=2))


async def test_a_chat_stream_without_done_is_an_error(path: str, client_backend: Backend) -> None:
    chunk = b'data: {"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}\n\n'
    with canned(_sse(chunk)) as url:
        async with _client(url, path, client_backend) as client:
            with anyio.fail_after(10), pytest.raises(RemoteProtocolError, match="final event"):
                await _read(client.stream_chat([{"role": "user", "content": "hi"}]))


async def test_a_complete_stream_still_ends_normally(path: str, client_backend: Backend) -> None:
    with canned(_sse(EVENT, FINAL)) as url:
        async with _client(url, path, client_backend) as client:
            stream = client.stream("x", n_predict=2)
            assert [c.text for c in await _read(stream)] == ["a"]
            assert stream.finish_reason == "length"


async def test_an_error_event_with_spaces_is_an_error(path: str, client_backend: Backend) -> None:
    error = b'data: { "error" : {"code": 500, "message": "boom", "type": "server_error"}}\n\n'
    with canned(_sse(EVENT, error)) as url:
        async with _client(url, path, client_backend) as client:
            with anyio.fail_after(10), pytest.raises(StreamError, match="boom") as info:
                await _read(client.stream("x"))
    assert info.value.error_type == "server_error"


@pytest.mark.parametrize(
    "event",
    [
        b'data: {"content": "' + SECRET.encode() + b'", \n\n',  # not JSON
        b'data: {"error": 7, "content": "' + SECRET.encode() + b'"}\n\n',  # odd error shape
    ],
    ids=["bad-json", "odd-error"],
)
async def test_error_messages_carry_no_completion_text(
    event: bytes, path: str, client_backend: Backend
) -> None:
    # Exception messages become span events even when content capture is off.
    with canned(_sse(EVENT, event)) as url:
        async with _client(url, path, client_backend) as client:
            with anyio.fail_after(10), pytest.raises(LlamaError) as info:
                await _read(client.stream("x"))
    assert SECRET not in str(info.value)


async def test_a_deadline_bounds_a_dripping_stream(path: str, client_backend: Backend) -> None:
    with canned(_head("200 OK") + _chunk(EVENT), then="drip") as url:
        async with _client(url, path, client_backend) as client:
            stream = client.stream("x", deadline=0.5)
            # The read timeout (600 s) never fires: each gap is short.
            with anyio.fail_after(20), pytest.raises(DeadlineExceeded, match=r"deadline of 0\.5"):
                await _read(stream)
            assert stream.chunks > 1


async def test_a_stalled_error_body_is_the_librarys_timeout(path: str) -> None:
    head = b'HTTP/1.1 500 Internal Server Error\r\nContent-Length: 1000\r\n\r\n{"error"'
    with canned(head, then="stall") as url:
        timeout = httpx.Timeout(5.0, read=0.3)
        async with _client(url, path, "auto", timeout=timeout) as client:
            with anyio.fail_after(10), pytest.raises(ReadTimeout):
                await _read(client.stream("x"))


async def test_two_tasks_reading_one_stream_is_a_usage_error(client_backend: Backend) -> None:
    with canned(_head("200 OK") + _chunk(EVENT), then="drip") as url:
        async with (
            AsyncLlamaClient(url, backend=client_backend) as client,
            client.stream("x") as stream,
        ):
            await stream.__anext__()
            errors: list[BaseException] = []
            async with anyio.create_task_group() as tg:

                async def read() -> None:
                    try:
                        await stream.__anext__()
                        await stream.__anext__()
                    except UsageError as exc:
                        errors.append(exc)

                tg.start_soon(read)
                tg.start_soon(read)
            assert errors
            assert "another task" in str(errors[0])


async def test_a_dropped_stream_closes_its_connection_on_every_path(
    path: str, client_backend: Backend
) -> None:
    import gc

    gone = threading.Event()
    with canned(_head("200 OK") + _chunk(EVENT), then="drip", gone=gone) as url:
        async with _client(url, path, client_backend) as client:
            gc.disable()  # reference counting alone must free it
            try:
                stream = client.stream("x")
                await stream.__anext__()
                del stream  # no aclose(): the server must still see the connection end
                # Set by the server's thread when it finds the connection gone.
                assert await anyio.to_thread.run_sync(gone.wait, 10)
            finally:
                gc.enable()
