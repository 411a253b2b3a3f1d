"""Streaming against a real llama-server (and the replay server where a fault is needed)."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest

from llamatelemetry_async import AsyncLlamaClient, StreamConsumedError, TokenStream
from llamatelemetry_async.client._connection import Backend
from llamatelemetry_async.testing._server import RunningServer

pytestmark = pytest.mark.anyio

GREEDY: dict[str, Any] = {"temperature": 0, "seed": 7}
MESSAGES = [{"role": "user", "content": "tell me about the old cat"}]


async def _drain(stream: TokenStream[Any]) -> list[Any]:
    async with stream:
        return [chunk async for chunk in stream]


async def test_completion_stream_matches_non_streamed(
    llama_server: RunningServer, client_backend: Backend
) -> None:
    async with AsyncLlamaClient(llama_server.url, backend=client_backend) as client:
        stream = client.stream("Once upon a time", n_predict=24, **GREEDY)
        chunks = await _drain(stream)
        whole = await client.completion("Once upon a time", n_predict=24, **GREEDY)

    assert stream.text == whole.text
    assert stream.text.strip(), "the tiny model generates words"
    assert "".join(c.text for c in chunks) == stream.text
    assert stream.finish_reason == "length" == whole.finish_reason
    assert stream.usage is not None
    assert stream.timings is not None
    # One token per chunk on this vocabulary; the server's counts agree with ours.
    assert sum(len(c.tokens) for c in chunks) == stream.usage.completion_tokens == 24
    assert stream.timings.predicted_n == 24 == len(chunks) == stream.chunks
    assert stream.usage.prompt_tokens == stream.timings.prompt_n + stream.timings.cache_n
    assert stream.usage.total_tokens == stream.usage.prompt_tokens + 24


async def test_chat_stream_matches_non_streamed(
    llama_server: RunningServer, client_backend: Backend
) -> None:
    async with AsyncLlamaClient(llama_server.url, backend=client_backend) as client:
        stream = client.stream_chat(MESSAGES, max_tokens=20, **GREEDY)
        chunks = await _drain(stream)
        whole = await client.chat(MESSAGES, max_tokens=20, **GREEDY)

    assert stream.text == whole.text != ""
    assert "".join(c.text for c in chunks) == stream.text
    assert stream.finish_reason == whole.finish_reason == "length"
    assert stream.usage is not None
    assert stream.timings is not None
    assert stream.usage == whole.usage
    assert stream.usage.completion_tokens == 20 == len(chunks)
    assert stream.timings.predicted_n == 20


async def test_openai_completion_and_infill_stream(
    llama_server: RunningServer, client_backend: Backend
) -> None:
    async with AsyncLlamaClient(llama_server.url, backend=client_backend) as client:
        text = client.stream_openai_completion("the river", max_tokens=8, **GREEDY)
        await _drain(text)
        whole = await client.openai_completion("the river", max_tokens=8, **GREEDY)
        infill = client.stream_infill("def f(", ")", n_predict=6, **GREEDY)
        await _drain(infill)
        whole_infill = await client.infill("def f(", ")", n_predict=6, **GREEDY)
    assert text.text == whole.text != ""
    assert text.usage is not None
    assert text.usage.completion_tokens == 8
    assert infill.text == whole_infill.text != ""


async def test_aclose_from_another_task_stops_generation(
    llama_server: RunningServer, client_backend: Backend
) -> None:
    async with AsyncLlamaClient(llama_server.url, backend=client_backend) as client:
        stream = client.stream("Once upon a time", n_predict=100_000, ignore_eos=True)
        received: list[str] = []
        three = anyio.Event()

        async def consume() -> None:
            async for chunk in stream:
                received.append(chunk.text)
                if len(received) == 3:
                    three.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await three.wait()
            await stream.aclose()
            await stream.aclose()  # twice is harmless

        assert len(received) >= 3
        assert stream.closed
        assert stream.finish_reason is None
        # The server noticed the closed connection and freed the slot.
        with anyio.fail_after(1.0):
            while any(slot["is_processing"] for slot in await client.slots()):
                pass
        assert client.pool_stats is not None
        assert client.pool_stats.active == 0


async def test_break_then_aclose_releases_connection(
    llama_server: RunningServer, client_backend: Backend
) -> None:
    async with AsyncLlamaClient(llama_server.url, backend=client_backend) as client:
        async with client.stream("a", n_predict=1000, ignore_eos=True) as stream:
            async for _ in stream:
                break
        assert stream.closed
        stats = client.pool_stats
        assert stats is not None
        assert stats.active == 0
        with anyio.fail_after(1.0):
            while any(slot["is_processing"] for slot in await client.slots()):
                pass


async def test_consumed_stream_refuses_iteration(
    llama_server: RunningServer, client_backend: Backend
) -> None:
    async with AsyncLlamaClient(llama_server.url, backend=client_backend) as client:
        stream = client.stream("a", n_predict=3)
        await _drain(stream)
        with pytest.raises(StreamConsumedError, match="already ended"):
            await stream.__anext__()
        closed = client.stream("a", n_predict=3)
        await closed.aclose()
        assert closed.closed
        with pytest.raises(StopAsyncIteration):
            await closed.__anext__()
        with pytest.raises(StreamConsumedError):
            await closed.__anext__()


async def test_sequential_streams_reuse_one_connection(
    replay_url: str, client_backend: Backend
) -> None:
    async with AsyncLlamaClient(replay_url, backend=client_backend) as client:
        before = (await client.request("GET", "/stats"))["connections_opened"]
        for _ in range(200):
            stream = client.stream("x", n_predict=5)
            assert len(await _drain(stream)) == 5
        after = await client.request("GET", "/stats")
        stats = client.pool_stats
    assert stats is not None
    assert stats.opened == 1, stats  # one connection, kept alive across 201 requests
    assert after["connections_opened"] - before == 0
    assert stats.active == 0
    assert stats.idle == 1


async def test_sequential_streams_against_llama_server_leak_nothing(
    llama_server: RunningServer, client_backend: Backend
) -> None:
    # llama-server closes the connection after every streamed response (cpp-httplib treats
    # the provider's final `false` as a cancel), so reuse is impossible there; what must
    # hold is that no connection is left behind and no request is retried.
    async with AsyncLlamaClient(llama_server.url, backend=client_backend) as client:
        for _ in range(50):
            await _drain(client.stream("x", n_predict=2))
        stats = client.pool_stats
        assert stats is not None
        assert stats.requests == 50 == stats.opened
        assert stats.active == 0
        assert stats.idle == 0
        await client.health()
        await client.health()
        stats = client.pool_stats
        assert stats is not None
        assert stats.opened == 51
        assert stats.idle == 1


async def test_concurrent_streams_share_one_client(
    llama_server: RunningServer, client_backend: Backend
) -> None:
    results: dict[int, str] = {}
    async with AsyncLlamaClient(llama_server.url, backend=client_backend) as client:

        async def one(i: int) -> None:
            results[i] = (await client.completion(f"story {i}", n_predict=4)).text
            stream = client.stream(f"story {i}", n_predict=6, **GREEDY)
            await _drain(stream)
            assert stream.usage is not None
            assert stream.usage.completion_tokens == 6

        async with anyio.create_task_group() as tg:
            for i in range(16):
                tg.start_soon(one, i)
        stats = client.pool_stats
    assert len(results) == 16
    assert stats is not None
    assert stats.active == 0


async def test_slow_consumer_pauses_reading(replay_url: str, client_backend: Backend) -> None:
    from llamatelemetry_async.client._connection import _AsyncioConnection
    from llamatelemetry_async.client._stream import PoolSource

    client = AsyncLlamaClient(replay_url, backend=client_backend)
    async with client, client.stream("x", n_predict=20_000) as stream:
        first = await stream.__anext__()
        source = stream._source
        assert isinstance(source, PoolSource)
        conn = source._conn
        if isinstance(conn, _AsyncioConnection):
            # The server writes far faster than nobody reads: the transport must stop
            # reading rather than buffer the whole response.
            with anyio.fail_after(10):
                while not conn._paused:
                    await anyio.lowlevel.checkpoint()
            assert stream._decoder.backlog() <= 2 * 4096
        rest = [chunk async for chunk in stream]
    assert first.text == " tok"
    assert len(rest) + 1 == 20_000 == stream.chunks


# Only the asyncio fast path can close a connection from a finalizer (a transport closes
# synchronously); an anyio stream needs an await, so elsewhere `async with` is the way.
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_stream_dropped_without_close_frees_its_connection(
    replay_url: str, client_backend: Backend
) -> None:
    import gc

    gc.disable()  # reference counting alone must free it: no cycle may hold it
    try:
        async with AsyncLlamaClient(replay_url, backend=client_backend) as client:
            stream = client.stream("x", n_predict=1000)
            await stream.__anext__()
            del stream
            # The release is handed to the loop (the last reference may die on any thread).
            with anyio.fail_after(10):
                while client.pool_stats.active:  # type: ignore[union-attr]
                    await anyio.lowlevel.checkpoint()
    finally:
        gc.enable()


async def test_aclose_while_opening_releases_everything(
    replay_url: str, client_backend: Backend
) -> None:
    client = AsyncLlamaClient(replay_url, backend=client_backend, max_connections=1)
    async with client, client.stream("x", _replay_fault="stall") as holder:
        await holder.__anext__()  # holds the only connection
        waiting = client.stream("y", n_predict=3)
        got: list[object] = []

        async def open_and_read() -> None:
            async with waiting:  # blocks: no free connection
                got.extend([c async for c in waiting])

        async with anyio.create_task_group() as tg:
            tg.start_soon(open_and_read)
            await anyio.wait_all_tasks_blocked()
            await waiting.aclose()  # from another task, while it is still opening
        assert got == []
        assert waiting.closed
        await holder.aclose()
        stats = client.pool_stats
        assert stats is not None
        assert stats.active == 0
        # The connection slot came back: a new request gets it.
        assert len(await _drain(client.stream("z", n_predict=2))) == 2


def test_the_fast_path_runs_under_uvloop(llama_server: RunningServer) -> None:
    # uvicorn runs applications (and so this client, embedded in them) on uvloop when it is
    # installed; uvloop's transports are not asyncio.Transport subclasses.
    import uvloop  # a test dependency

    async def main() -> tuple[str, str]:
        async with AsyncLlamaClient(llama_server.url) as client:
            assert client.dispatcher.pool is not None  # the Protocol path, not httpx
            async with client.stream("The old cat", n_predict=6, **GREEDY) as stream:
                streamed = "".join([chunk.text async for chunk in stream])
            whole = await client.completion("The old cat", n_predict=6, **GREEDY)
            return streamed, whole.text

    streamed, whole = uvloop.run(main())
    assert streamed == whole
    assert streamed
