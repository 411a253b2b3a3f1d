"""What a caller passes: per-request options, parameter names, bad input, secrets in reprs.

A small recording HTTP server on 127.0.0.1 (a thread, so it serves asyncio and trio alike)
shows what reached the wire; it never answers a request that carries ``X-Hang`` and drips
events forever on ``X-Drip``, so a test finishes only if the option under test works.
"""

from __future__ import annotations

import math
import socket
import socketserver
import threading
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import msgspec
import pytest

from llamatelemetry_async import (
    AsyncLlamaClient,
    DeadlineExceeded,
    RemoteProtocolError,
    TimeoutException,
    UnknownParameterWarning,
    UsageError,
)
from llamatelemetry_async.client import _params
from llamatelemetry_async.client._connection import Backend
from llamatelemetry_async.client._params import (
    KNOWN_PARAMETERS,
    RESERVED,
)

pytestmark = pytest.mark.anyio

_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Transfer-Encoding: chunked\r\nServer: recorder\r\n\r\n"
)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Request(msgspec.Struct):
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return msgspec.json.decode(self.body) if self.body else None


class _Handler(socketserver.BaseRequestHandler):
    server: _Recorder

    def handle(self) -> None:
        sock: socket.socket = self.request
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                data = sock.recv(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
            length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
            while len(buffer) < length:
                data = sock.recv(65536)
                if not data:
                    return
                buffer += data
            body, buffer = buffer[:length], buffer[length:]
            request = _Request(method, target, headers, body)
            self.server.requests.append(request)
            if not self._answer(sock, request):
                return

    def _answer(self, sock: socket.socket, request: _Request) -> bool:
        if request.header("X-Hang"):
            while sock.recv(65536):  # until the client gives up and closes
                pass
            return False
        if request.header("X-Drip"):
            sock.sendall(_SSE_HEAD)
            event = b'data: {"content":"a","stop":false}\n\n'
            end = time.monotonic() + 60
            try:
                while time.monotonic() < end:
                    sock.sendall(_chunk(event))
                    time.sleep(0.02)  # the server's pace, not a synchronisation
            except OSError:
                pass
            return False
        if request.header("X-Garbage"):
            body = b"<html>SECRET-COMPLETION-TEXT</html>"
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            return True
        decoded = request.json()
        if isinstance(decoded, dict) and decoded.get("stream"):
            sock.sendall(_SSE_HEAD)
            sock.sendall(_chunk(b'data: {"content":"a","stop":false}\n\n'))
            sock.sendall(_chunk(b'data: {"content":"","stop":true,"stop_type":"eos"}\n\n'))
            sock.sendall(b"0\r\n\r\n")
            return True
        body = b"{}"
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        return True


class _Recorder(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[_Request] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def recorder() -> Iterator[_Recorder]:
    server = _Recorder()
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(params=["pool", "httpx"])
async def make_client(
    request: pytest.FixtureRequest, client_backend: Backend
) -> AsyncIterator[Callable[..., AsyncLlamaClient]]:
    """A client on the built-in pool, or on a caller's own ``httpx.AsyncClient``."""
    own: list[httpx.AsyncClient] = []

    def make(url: str, **kwargs: Any) -> AsyncLlamaClient:
        if request.param == "pool":
            return AsyncLlamaClient(url, backend=client_backend, **kwargs)
        kwargs.pop("timeout", None)  # a caller's own client has its own
        own.append(httpx.AsyncClient(timeout=httpx.Timeout(60.0, read=600.0)))
        return AsyncLlamaClient(url, http_client=own[-1], **kwargs)

    yield make
    for http in own:
        await http.aclose()


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget which names were warned about, so each test sees its first warning."""
    monkeypatch.setattr(_params, "_warned", set())


async def _drain(stream: Any) -> None:
    async with stream:
        async for _ in stream:
            pass


# ----------------------------------------------------------------- per-request timeout
_HANG = {"X-Hang": "1"}


def _every_request(client: AsyncLlamaClient, **o: Any) -> list[Awaitable[Any]]:
    """Every request method of the client, each with the same options ``o``."""
    messages = [{"role": "user", "content": "hi"}]
    return [
        client.health(**o),
        client.props(**o),
        client.set_props(**o),
        client.slots(**o),
        client.save_slot(0, "f.bin", **o),
        client.restore_slot(0, "f.bin", **o),
        client.erase_slot(0, **o),
        client.metrics(**o),
        client.lora_adapters(**o),
        client.set_lora_adapters([{"id": 0, "scale": 0.5}], **o),
        client.models(**o),
        client.tokenize("hi", **o),
        client.detokenize([1, 2], **o),
        client.apply_template(messages, **o),
        client.embedding("hi", **o),
        client.embeddings("hi", **o),
        client.rerank("q", ["a", "b"], **o),
        client.request("GET", "/health", **o),
        client.completion("hi", **o),
        client.chat(messages, **o),
        client.openai_completion("hi", **o),
        client.infill("a", "b", **o),
        _drain(client.stream("hi", **o)),
        _drain(client.stream_chat(messages, **o)),
        _drain(client.stream_openai_completion("hi", **o)),
        _drain(client.stream_infill("a", "b", **o)),
    ]


async def test_timeout_applies_to_that_request_on_every_method(
    recorder: _Recorder, make_client: Callable[..., AsyncLlamaClient]
) -> None:
    # The client's own read timeout is long: only the per-request one can end these.
    slow = httpx.Timeout(60.0, read=600.0)
    async with make_client(recorder.url, timeout=slow) as client:
        calls = _every_request(client, timeout=0.05, extra_headers=_HANG)
        for call in calls:
            with pytest.raises(TimeoutException):
                await call
    assert len(recorder.requests) == len(calls)
    for request in recorder.requests:
        assert request.header("X-Hang") == ["1"]
        body = request.json()
        if isinstance(body, dict):
            assert RESERVED.isdisjoint(body), request.target


async def test_timeout_as_httpx_timeout(recorder: _Recorder, client_backend: Backend) -> None:
    async with AsyncLlamaClient(recorder.url, backend=client_backend) as client:
        with pytest.raises(TimeoutException, match=r"0\.05"):
            await client.completion(
                "hi", timeout=httpx.Timeout(5.0, read=0.05), extra_headers=_HANG
            )
        with pytest.raises(TimeoutException, match=r"0\.05"):
            await _drain(
                client.stream("hi", timeout=httpx.Timeout(5.0, read=0.05), extra_headers=_HANG)
            )


async def test_timeout_is_for_that_request_only(
    recorder: _Recorder, make_client: Callable[..., AsyncLlamaClient]
) -> None:
    async with make_client(recorder.url) as client:
        with pytest.raises(TimeoutException):
            await client.completion("hi", timeout=0.05, extra_headers=_HANG)
        assert await client.completion("hi")  # the next request has the client's timeout
        await _drain(client.stream("hi"))


async def test_deadline_ends_a_stream_that_never_stops(
    recorder: _Recorder, make_client: Callable[..., AsyncLlamaClient]
) -> None:
    # Events keep coming, so no read timeout fires: only the deadline ends the stream.
    async with make_client(recorder.url) as client:
        stream = client.stream("hi", deadline=0.3, extra_headers={"X-Drip": "1"})
        with pytest.raises(DeadlineExceeded):
            await _drain(stream)
        chat = client.stream_chat(
            [{"role": "user", "content": "hi"}], deadline=0.3, extra_headers={"X-Drip": "1"}
        )
        with pytest.raises(DeadlineExceeded):
            await _drain(chat)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("timeout", "fast"),
        ("timeout", -1),
        ("timeout", math.nan),
        ("timeout", math.inf),
        ("timeout", True),
        ("timeout", httpx.Timeout(1.0, read=-2.0)),
        ("deadline", 0),
        ("deadline", "soon"),
        ("extra_headers", "X-A: b"),
        ("extra_headers", {"X-A": "b\r\nX-Injected: yes"}),
        ("extra_headers", {"X-A": "ключ"}),
        ("extra_headers", {"Bad Name": "b"}),
        ("extra_headers", {"Content-Length": "0"}),
        ("extra_body", ["not", "a", "mapping"]),
    ],
)
def test_bad_option_is_refused_when_the_request_is_made(option: str, value: Any) -> None:
    client = AsyncLlamaClient("http://127.0.0.1:9")
    with pytest.raises(UsageError, match=option):
        client.stream("hi", **{option: value})
    if option != "deadline":
        with pytest.raises(UsageError, match=option):
            client.completion("hi", **{option: value}).send(None)


def test_deadline_is_for_streams_only() -> None:
    client = AsyncLlamaClient("http://127.0.0.1:9")
    coro = client.completion("hi", deadline=3)
    with pytest.raises(UsageError, match="deadline= is the library's own keyword"):
        coro.send(None)


# ----------------------------------------------------------------- headers and body
async def test_extra_headers_add_and_replace_for_one_request(
    recorder: _Recorder, make_client: Callable[..., AsyncLlamaClient]
) -> None:
    extra = {"X-Trace": "t1", "authorization": "Bearer per-request"}
    async with make_client(recorder.url, api_key="client-key") as client:
        await client.completion("hi", extra_headers=extra)
        await _drain(client.stream("hi", extra_headers=extra))
        await client.completion("hi")
        await _drain(client.stream("hi"))
    with_extra, plain = recorder.requests[:2], recorder.requests[2:]
    for request in with_extra:
        assert request.header("X-Trace") == ["t1"]
        assert request.header("Authorization") == ["Bearer per-request"]
    for request in plain:
        assert request.header("X-Trace") == []
        assert request.header("Authorization") == ["Bearer client-key"]


async def test_extra_body_is_merged_and_never_checked(
    recorder: _Recorder, make_client: Callable[..., AsyncLlamaClient]
) -> None:
    extra = {"n_predcit": 3, "timeout": 5, "brand_new_option": [1]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        async with make_client(recorder.url, strict=True) as client:
            await client.completion("hi", n_predict=2, extra_body=extra)
            await _drain(client.stream("hi", n_predict=2, extra_body=extra))
            await client.chat([{"role": "user", "content": "hi"}], extra_body=extra)
    for request in recorder.requests:
        body = request.json()
        assert {k: body[k] for k in extra} == extra
    assert recorder.requests[0].json()["n_predict"] == 2
    assert recorder.requests[1].json()["stream"] is True


async def test_reserved_names_never_reach_the_body(
    recorder: _Recorder, make_client: Callable[..., AsyncLlamaClient]
) -> None:
    async with make_client(recorder.url) as client:
        await client.completion("hi", n_predict=1, timeout=30, extra_headers={"X-A": "b"})
        await _drain(client.stream("hi", timeout=30, deadline=30, extra_body={}))
    for request in recorder.requests:
        assert RESERVED.isdisjoint(request.json())


# ----------------------------------------------------------------- parameter names
@pytest.mark.usefixtures("fresh_warnings")
def test_unknown_parameter_warns_once_with_a_suggestion() -> None:
    client = AsyncLlamaClient("http://127.0.0.1:9")
    with pytest.warns(UnknownParameterWarning, match="did you mean 'n_predict'") as record:
        client.stream("hi", n_predcit=4)
    assert len(record) == 1
    assert record[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        client.stream("hi", n_predcit=4)  # once per name


@pytest.mark.usefixtures("fresh_warnings")
async def test_unknown_parameter_is_still_sent(recorder: _Recorder) -> None:
    async with AsyncLlamaClient(recorder.url) as client:
        with pytest.warns(UnknownParameterWarning, match="'zz_new_llama_option'"):
            await client.completion("hi", zz_new_llama_option=1)
    assert recorder.requests[0].json()["zz_new_llama_option"] == 1


async def test_strict_client_refuses_unknown_names(recorder: _Recorder) -> None:
    async with AsyncLlamaClient(recorder.url, strict=True) as client:
        assert client.strict
        with pytest.raises(UsageError, match=r"did you mean 'n_predict'.*extra_body"):
            await client.completion("hi", n_predcit=4)
        with pytest.raises(UsageError, match="did you mean 'max_tokens'"):
            client.stream_chat([{"role": "user", "content": "hi"}], max_token=4)
        with pytest.raises(UsageError, match="did you mean 'timeout'"):
            await client.embeddings("hi", timout=2)
    assert recorder.requests == []  # nothing was sent


def test_llama_cpp_and_openai_names_pass_silently() -> None:
    client = AsyncLlamaClient("http://127.0.0.1:9", strict=True)
    dotted: dict[str, Any] = {"speculative.n_max": 4}
    client.stream(
        "hi",
        n_predict=1,
        mirostat=2,
        mirostat_tau=5.0,
        dry_multiplier=0.5,
        xtc_probability=0.1,
        top_n_sigma=1.0,
        samplers=["top_k"],
        cache_prompt=False,
        id_slot=0,
        n_probs=2,
        return_tokens=True,
        t_max_predict_ms=10,
        response_fields=["content"],
        lora=[],
        **dotted,
    )
    client.stream_chat(
        [{"role": "user", "content": "hi"}],
        max_tokens=1,
        max_completion_tokens=1,
        response_format={"type": "json_object"},
        tools=[],
        tool_choice="auto",
        logprobs=True,
        top_logprobs=2,
        chat_template_kwargs={"enable_thinking": False},
        reasoning_format="none",
        stream_options={"include_usage": False},
        user="u",
    )


@pytest.mark.usefixtures("fresh_warnings")
def test_every_known_name_is_a_plain_field_name() -> None:
    assert RESERVED.isdisjoint(KNOWN_PARAMETERS)
    assert all(name.replace(".", "_").isidentifier() for name in KNOWN_PARAMETERS)


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "prompt",
    ["text with a lone surrogate \ud800 in it", object(), {1j: 2}],
    ids=["surrogate", "object", "unencodable"],
)
async def test_a_prompt_that_cannot_be_json_is_a_usage_error(
    recorder: _Recorder, make_client: Callable[..., AsyncLlamaClient], prompt: Any
) -> None:
    async with make_client(recorder.url) as client:
        with pytest.raises(UsageError) as info:
            await client.completion(prompt)
        assert "text with a lone" not in str(info.value)  # the prompt is never echoed
        with pytest.raises(UsageError):
            client.stream(prompt)
        with pytest.raises(UsageError):
            await client.chat([{"role": "user", "content": prompt}])
    assert recorder.requests == []


@pytest.mark.parametrize(
    "messages",
    [None, "hello", {"role": "user", "content": "hi"}, ["hello"], [None], 42],
    ids=["none", "str", "one-dict", "list-of-str", "list-of-none", "int"],
)
async def test_messages_must_be_a_list_of_dicts(recorder: _Recorder, messages: Any) -> None:
    async with AsyncLlamaClient(recorder.url) as client:
        with pytest.raises(UsageError, match="messages must be a list of"):
            await client.chat(messages)
        with pytest.raises(UsageError, match="messages must be a list of"):
            client.stream_chat(messages)
        with pytest.raises(UsageError, match="messages must be a list of"):
            await client.apply_template(messages)
    assert recorder.requests == []


async def test_messages_may_be_any_iterable_of_mappings(recorder: _Recorder) -> None:
    from types import MappingProxyType

    messages = (MappingProxyType({"role": "user", "content": "hi"}) for _ in range(2))
    async with AsyncLlamaClient(recorder.url) as client:
        await client.chat(messages)
    assert recorder.requests[0].json()["messages"] == [{"role": "user", "content": "hi"}] * 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"base_url": "http://[::1"}, "not a valid URL"),
        ({"base_url": "ftp://host"}, "http:// or https://"),
        ({"api_key": "k\r\nContent-Length: 0\r\n\r\nGET /slots HTTP/1.1"}, "api_key"),
        ({"api_key": "ключ"}, "api_key"),
        ({"api_key": b"bytes"}, "api_key"),
        ({"headers": {"X-Trace": "a\r\nX-Injected: yes"}}, "X-Trace"),
        ({"headers": {"X-Trace": "a\x00"}}, "NUL"),
        ({"headers": {"X\nY": "a"}}, "header name"),
        ({"timeout": "fast"}, "timeout"),
        ({"timeout": -5}, "timeout"),
    ],
)
def test_bad_client_arguments_are_usage_errors(kwargs: dict[str, Any], match: str) -> None:
    kwargs.setdefault("base_url", "http://127.0.0.1:9")
    with pytest.raises(UsageError, match=match):
        AsyncLlamaClient(**kwargs)


def test_no_timeout_at_all_is_allowed() -> None:
    AsyncLlamaClient("http://127.0.0.1:9", timeout=None)
    AsyncLlamaClient("http://127.0.0.1:9", timeout=httpx.Timeout(None))


# ----------------------------------------------------------------- secrets and content
def test_repr_hides_the_password_in_the_url() -> None:
    client = AsyncLlamaClient("http://alice:s3cret-pw@127.0.0.1:9/base")
    assert "s3cret-pw" not in repr(client)
    assert "alice" not in repr(client)
    assert "127.0.0.1:9/base" in repr(client)
    with pytest.raises(UsageError) as info:
        AsyncLlamaClient("http://alice:s3cret-pw@[::1")
    assert "s3cret-pw" not in str(info.value)
    with pytest.raises(UsageError) as info:
        AsyncLlamaClient("ftp://alice:s3cret-pw@host")
    assert "s3cret-pw" not in str(info.value)


async def test_a_response_that_is_not_json_is_described_not_quoted(
    recorder: _Recorder, make_client: Callable[..., AsyncLlamaClient]
) -> None:
    async with make_client(recorder.url) as client:
        with pytest.raises(RemoteProtocolError) as info:
            await client.completion("hi", extra_headers={"X-Garbage": "1"})
    message = str(info.value)
    assert "SECRET-COMPLETION-TEXT" not in message
    assert "HTTP 200" in message
    assert "text/html" in message
    assert "35 bytes" in message
