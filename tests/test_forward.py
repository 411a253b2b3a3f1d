"""``forward`` and ``forward_stream``: requests another client made, sent on unchanged
(what a proxy needs), on a client and on an engine, on every backend."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from llamatelemetry_async import (
    AsyncEngine,
    AsyncLlamaClient,
    HTTPStatusError,
    Placement,
    StreamError,
    UsageError,
)
from llamatelemetry_async.client._connection import Backend

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"


async def test_forward_stream_keeps_every_event_as_the_server_sent_it(
    replay_url: str, client_backend: Backend
) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "x_unknown": 1}
    async with AsyncLlamaClient(replay_url, backend=client_backend) as client:
        stream = client.forward_stream(CHAT, body)
        assert stream.raw == []
        seen: list[bytes] = []
        texts = []
        async with stream:
            async for chunk in stream:
                texts.append(chunk.text)
                seen += stream.raw
                stream.raw.clear()
        seen += stream.raw
    # The role delta, five tokens, the final chunk and [DONE]: none dropped, none changed.
    assert seen[-1] == b"[DONE]"
    decoded = [msgspec.json.decode(payload) for payload in seen[:-1]]
    contents = [d["choices"][0]["delta"].get("content") for d in decoded if d["choices"]]
    assert "".join(c for c in contents if c) == "".join(texts) == stream.text
    assert len(texts) == 5
    assert stream.usage is not None
    assert stream.usage.completion_tokens == 5
    assert stream.gpu is None  # a client measures no GPU


async def test_forward_sends_the_body_unchecked_and_returns_the_raw_reply(
    replay_url: str, client_backend: Backend
) -> None:
    body = {"prompt": "hi", "n_predict": 3, "x_unknown": 1}  # no UnknownParameterWarning
    async with AsyncLlamaClient(replay_url, backend=client_backend) as client:
        reply = await client.forward("POST", "/completion", body)
        assert reply.status == 200
        assert reply.content_type.startswith("application/json")
        assert msgspec.json.decode(reply.content)["tokens_predicted"] == 3
        models = await client.forward("GET", "/v1/models")
        assert msgspec.json.decode(models.content)["data"][0]["id"] == "replay"
        with pytest.raises(HTTPStatusError) as refused:
            await client.forward("POST", "/completion", {**body, "_replay_fault": "status_400"})
        assert refused.value.status_code == 400
        with pytest.raises(UsageError, match="does not stream"):
            client.forward_stream("/tokenize", {"content": "x"})
        with pytest.raises(UsageError, match="use forward_stream"):
            await client.forward("POST", "/completion", {**body, "stream": True})


async def test_an_error_event_stays_in_raw_for_the_relay(
    replay_url: str, client_backend: Backend
) -> None:
    body = {"prompt": "hi", "n_predict": 5, "_replay_fault": "error_event"}
    async with AsyncLlamaClient(replay_url, backend=client_backend) as client:
        stream = client.forward_stream("/completion", body)
        with pytest.raises(StreamError):
            async with stream:
                async for _ in stream:
                    pass
    assert stream.raw is not None
    assert stream.raw[-1].startswith(b'{"error"')


async def test_forward_through_an_engine_takes_a_slot_and_is_observed(tiny_model: Path) -> None:
    async with AsyncEngine(tiny_model, placement=Placement.cpu(1)) as engine:
        reply = await engine.forward("POST", CHAT, {"messages": [{"role": "user", "content": "hi"}],
                                                    "max_tokens": 2})  # fmt: skip
        assert msgspec.json.decode(reply.content)["usage"]["completion_tokens"] == 2
        tokens = await engine.forward("POST", "/tokenize", {"content": "hello"})
        assert msgspec.json.decode(tokens.content)["tokens"]
        served = engine.servers[0].served
        async with engine.forward_stream("/completion", {"prompt": "hi", "n_predict": 3}) as s:
            chunks = [chunk async for chunk in s]
        assert len(chunks) == 3
        assert engine.servers[0].served == served + 1  # a generation request: a slot
        assert engine.servers[0].outstanding == 0
