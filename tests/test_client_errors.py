"""Every error of the client's tree, produced for real."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest

from llamatelemetry_async import (
    AsyncLlamaClient,
    ClientClosedError,
    ConnectError,
    HTTPStatusError,
    LlamaTransport,
    ReadError,
    ReadTimeout,
    RemoteProtocolError,
    StreamError,
    TimeoutException,
    UsageError,
)
from llamatelemetry_async.client._connection import Backend
from llamatelemetry_async.testing._server import RunningServer, run_llama_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A loopback port with nothing listening (bound, never listened on)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_connect_error_names_the_server(dead_url: str, client_backend: Backend) -> None:
    async with AsyncLlamaClient(dead_url, backend=client_backend) as client:
        with pytest.raises(ConnectError, match="is the server running"):
            await client.health()
        with pytest.raises(ConnectError):
            async for _ in client.stream("x"):
                pass


async def test_connect_error_after_the_server_stopped(
    tiny_model: Any, client_backend: Backend
) -> None:
    with run_llama_server(tiny_model) as server:
        url = server.url
    async with AsyncLlamaClient(url, backend=client_backend) as client:
        with pytest.raises(ConnectError):
            await client.completion("x", n_predict=1)


async def test_http_4xx_carries_the_servers_message(
    llama_server: RunningServer, client_backend: Backend
) -> None:
    async with AsyncLlamaClient(llama_server.url, backend=client_backend) as client:
        with pytest.raises(HTTPStatusError) as info:
            bad = {"messages": "not a list"}  # past the client's own check, to the server's
            async for _ in client.stream_chat([], max_tokens=2, extra_body=bad):
                pass
    err = info.value
    assert err.status_code == 400
    assert err.error_type == "invalid_request_error"
    assert err.message == "Expected 'messages' to be an array"
    assert err.message in str(err)


async def test_http_501_says_which_flag_is_missing(
    embedding_server: RunningServer, client_backend: Backend
) -> None:
    async with AsyncLlamaClient(embedding_server.url, backend=client_backend) as client:
        with pytest.raises(HTTPStatusError, match="--props") as info:
            await client.set_props(n_parallel=1)
    assert info.value.status_code == 501
    assert info.value.error_type == "not_supported_error"


async def test_http_401_without_the_api_key(tiny_model: Any, client_backend: Backend) -> None:
    with run_llama_server(tiny_model, env={"LLAMA_API_KEY": "sekret"}) as server:
        async with AsyncLlamaClient(server.url, backend=client_backend) as client:
            with pytest.raises(HTTPStatusError, match="api_key") as info:
                await client.completion("x", n_predict=1)
            assert info.value.status_code == 401
        async with AsyncLlamaClient(server.url, api_key="sekret", backend=client_backend) as ok:
            assert (await ok.completion("x", n_predict=2)).usage.completion_tokens == 2
            async for _ in ok.stream("x", n_predict=2):
                pass


@pytest.mark.parametrize("fault", ["status_500", "status_400"])
async def test_http_status_from_replay(
    replay_url: str, client_backend: Backend, fault: str
) -> None:
    async with AsyncLlamaClient(replay_url, backend=client_backend) as client:
        with pytest.raises(HTTPStatusError) as info:
            async for _ in client.stream("x", _replay_fault=fault):
                pass
        with pytest.raises(HTTPStatusError):
            await client.completion("x", _replay_fault=fault)
        assert client.pool_stats is not None
        assert client.pool_stats.active == 0
    assert info.value.status_code == int(fault[-3:])


@pytest.mark.parametrize("fault", ["malformed_json", "bad_chunk"])
async def test_malformed_sse_is_a_protocol_error(
    replay_url: str, client_backend: Backend, fault: str
) -> None:
    async with AsyncLlamaClient(replay_url, backend=client_backend) as client:
        stream = client.stream("x", _replay_fault=fault)
        with pytest.raises(RemoteProtocolError):
            async for _ in stream:
                pass
        assert stream.closed
        assert client.pool_stats is not None
        assert client.pool_stats.active == 0


async def test_error_event_mid_stream(replay_url: str, client_backend: Backend) -> None:
    async with AsyncLlamaClient(replay_url, backend=client_backend) as client:
        got: list[str] = []
        with pytest.raises(StreamError, match="boom") as info:
            async for chunk in client.stream_chat(
                [{"role": "user", "content": "x"}], _replay_fault="error_event"
            ):
                got.append(chunk.text)
    assert len(got) == 2
    assert info.value.error_type == "server_error"


async def test_connection_closed_mid_stream(replay_url: str, client_backend: Backend) -> None:
    async with AsyncLlamaClient(replay_url, backend=client_backend) as client:
        with pytest.raises(ReadError):
            async for _ in client.stream("x", _replay_fault="close_mid_stream"):
                pass


async def test_read_timeout(replay_url: str, client_backend: Backend) -> None:
    timeout = httpx.Timeout(5.0, read=0.3)
    async with AsyncLlamaClient(replay_url, timeout=timeout, backend=client_backend) as client:
        stream = client.stream("x", _replay_fault="stall")
        with pytest.raises(ReadTimeout, match="no data") as info:
            async for _ in stream:
                pass
        assert isinstance(info.value, TimeoutException | TimeoutError)
        assert stream.text == " tok"  # the token before the stall arrived
        assert client.pool_stats is not None
        assert client.pool_stats.active == 0


async def test_closed_client_and_misuse(replay_url: str, client_backend: Backend) -> None:
    client = AsyncLlamaClient(replay_url, backend=client_backend)
    async with client:
        with pytest.raises(UsageError, match="already opened"):
            await client.__aenter__()
    await client.aclose()  # twice is harmless
    with pytest.raises(ClientClosedError):
        await client.health()
    with pytest.raises(ClientClosedError):
        client.stream("x")
    with pytest.raises(UsageError, match="base_url"):
        AsyncLlamaClient("ftp://example")


# Abandoning an httpx response mid-body leaves httpx's and httpcore's own nested async
# generators to the garbage collector, which trio reports; closing them is httpx's job
# (our side closes the iterator and the response it was given).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_own_httpx_client_path(replay_url: str, client_backend: Backend) -> None:
    # A user's own httpx client goes through httpx's pool and the generic source; the client
    # does not close it.
    async with httpx.AsyncClient() as http:
        async with AsyncLlamaClient(replay_url, http_client=http) as client:
            stream = client.stream("x", n_predict=7)
            async with stream:
                n = len([c async for c in stream])
            assert client.pool_stats is None
            with pytest.raises(StreamError):
                async for _ in client.stream("x", _replay_fault="error_event"):
                    pass
            with pytest.raises(RemoteProtocolError):
                async for _ in client.stream("x", _replay_fault="malformed_json"):
                    pass
        assert not http.is_closed
    assert n == 7
    assert stream.finish_reason == "length"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_own_httpx_client_aclose_from_another_task(replay_url: str) -> None:
    async with (
        httpx.AsyncClient() as http,
        AsyncLlamaClient(replay_url, http_client=http) as client,
    ):
        stream = client.stream("x", _replay_fault="stall")
        first = anyio.Event()

        async def read() -> None:
            async for _ in stream:
                first.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await first.wait()
            await stream.aclose()  # the reader is suspended inside httpx's iterator
        assert stream.closed


async def test_transport_sends_a_streamed_body_with_a_length(replay_url: str) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"prompt": "x", '
        yield b'"n_predict": 3}'

    async with httpx.AsyncClient(transport=LlamaTransport()) as http:
        response = await http.post(replay_url + "/completion", content=body())
    assert response.status_code == 200
    assert response.json()["tokens_predicted"] == 3
