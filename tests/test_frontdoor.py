"""The front door (``FrontDoor``) served by a real uvicorn over real llama-servers on the CPU:
openai-python and httpx as clients, the door mounted in FastAPI, trace propagation, the
benchmark through the door, and its /servers and /metrics pages."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
from _door import running_door, serve_asgi
from fastapi import FastAPI
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from llamatelemetry_async import (
    AsyncEngine,
    EngineModel,
    Placement,
    ServerConfig,
    TokenEvents,
    setup_telemetry,
)
from llamatelemetry_async.bench import BenchConfig, run_bench
from llamatelemetry_async.frontdoor import FrontDoor
from llamatelemetry_async.testing import write_tiny_model

pytestmark = pytest.mark.anyio

KEY = "door-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_TOKENS = 8
GREEDY: dict[str, Any] = {"temperature": 0, "seed": 7}


@pytest.fixture
def anyio_backend() -> str:
    """uvicorn runs on asyncio only."""
    return "asyncio"


def _messages(prompt: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": prompt}]


def _sse_payloads(lines: list[str]) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order; any other non-blank line fails."""
    payloads = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        payloads.append(line.removeprefix("data: "))
    return payloads


async def _post_sse(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[str]:
    async with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        return _sse_payloads([line async for line in response.aiter_lines()])


@pytest.fixture
async def door_url(tiny_model: Path) -> AsyncIterator[tuple[FrontDoor, str]]:
    """A door with a key over two CPU servers of four slots each, served by uvicorn."""
    engine = AsyncEngine(tiny_model, placement=Placement.cpu(2), server=ServerConfig(n_parallel=4))
    door = FrontDoor(engine, api_keys=[KEY])
    async with running_door(door) as url:
        yield door, url


# --------------------------------------------------------------------- openai-python
async def test_openai_streams_match_references_on_both_servers_with_usage(
    door_url: tuple[FrontDoor, str],
) -> None:
    door, url = door_url
    engine = door.engine
    prompts = [f"the old cat number {i}" for i in range(4)]
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0) as client:
        models = await client.models.list()
        assert len(models.data) >= 1
        assert models.data[0].id.endswith("tiny.gguf")

        references: list[str] = []
        for prompt in prompts:
            reply = await client.chat.completions.create(
                model="tiny", messages=_messages(prompt), max_tokens=MAX_TOKENS, **GREEDY
            )
            text = reply.choices[0].message.content
            assert text  # the reference says something
            references.append(text)

        served_before = [s.served for s in engine.servers]
        chunks: dict[int, list[ChatCompletionChunk]] = {}

        async def one(i: int) -> None:
            stream = await client.chat.completions.create(
                model="tiny",
                messages=_messages(prompts[i % len(prompts)]),
                max_tokens=MAX_TOKENS,
                stream=True,
                **GREEDY,
            )
            async with stream:
                chunks[i] = [chunk async for chunk in stream]

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(64):
                    tg.start_soon(one, i)
        served = [
            s.served - before for s, before in zip(engine.servers, served_before, strict=True)
        ]

    assert all(n > 0 for n in served), served  # both servers took streams
    assert sum(served) == 64
    for i in range(64):
        received = chunks[i]
        content = [c.choices[0].delta.content for c in received if c.choices]
        texts = [t for t in content if t]
        assert "".join(texts) == references[i % len(prompts)], i
        # usage comes once, on the final chunk, without stream_options asking for it
        *before_last, last = received
        assert all(c.usage is None for c in before_last), i
        assert last.usage is not None, i
        assert last.usage.completion_tokens == len(texts) == MAX_TOKENS, i
        assert last.usage.prompt_tokens > 0
        assert last.usage.total_tokens == last.usage.prompt_tokens + MAX_TOKENS


async def test_openai_embeddings_through_the_door(tiny_model: Path) -> None:
    engine = AsyncEngine(
        tiny_model,
        placement=Placement.cpu(1),
        server=ServerConfig(embeddings=True, pooling="mean"),
    )
    door = FrontDoor(engine, api_keys=[KEY])
    inputs = ["a cat", "a dog on the long road"]
    async with running_door(door) as url:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0) as client:
            reply = await client.embeddings.create(model="tiny", input=inputs)
        direct = (await engine.embeddings(inputs)).vectors
    vectors = [item.embedding for item in sorted(reply.data, key=lambda d: d.index)]
    assert len(vectors) == 2
    assert len(vectors[0]) > 0
    assert len(vectors[0]) == len(vectors[1])
    assert vectors[0] != vectors[1]
    for got, expected in zip(vectors, direct, strict=True):
        assert got == pytest.approx(list(expected), abs=1e-5)


# --------------------------------------------------------------------- llama.cpp's own endpoints
async def test_native_endpoints_through_the_door(door_url: tuple[FrontDoor, str]) -> None:
    _, url = door_url
    body = {"prompt": "Once upon a time", "n_predict": 5, **GREEDY}
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as http:
        refused = await http.post("/completion", json=body, headers={"Authorization": "x"})
        assert refused.status_code == 401

        whole = await http.post("/completion", json=body)
        assert whole.status_code == 200, whole.text
        reply = whole.json()
        assert reply["stop"] is True
        assert reply["tokens_predicted"] == 5
        assert reply["content"]

        events = [
            json.loads(p) for p in await _post_sse(http, "/completion", body | {"stream": True})
        ]
        *tokens, last = events
        assert tokens
        assert all(e["stop"] is False for e in tokens)
        assert last["stop"] is True
        assert last["timings"]["predicted_n"] == 5
        assert "".join(e["content"] for e in events) == reply["content"]

        text = "Once upon a time"
        tokenized = await http.post("/tokenize", json={"content": text})
        assert tokenized.status_code == 200, tokenized.text
        ids = tokenized.json()["tokens"]
        assert ids
        assert all(isinstance(t, int) for t in ids)
        detokenized = await http.post("/detokenize", json={"tokens": ids})
        assert detokenized.status_code == 200, detokenized.text
        assert detokenized.json()["content"].strip() == text

        oai = {"prompt": "Once upon a time", "max_tokens": 4, **GREEDY}
        plain = await http.post("/v1/completions", json=oai)
        assert plain.status_code == 200, plain.text
        payloads = await _post_sse(http, "/v1/completions", oai | {"stream": True})
        assert payloads[-1] == "[DONE]"
        assert "[DONE]" not in payloads[:-1]
        chunks = [json.loads(p) for p in payloads[:-1]]
        streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        assert streamed == plain.json()["choices"][0]["text"]
        assert chunks[-1]["usage"]["completion_tokens"] == 4


# --------------------------------------------------------------------- mounted in FastAPI
async def test_door_mounted_under_a_prefix_in_fastapi(tiny_model: Path) -> None:
    engine = AsyncEngine(tiny_model, placement=Placement.cpu(1))
    door = FrontDoor(engine, api_keys=[KEY])
    app = FastAPI(lifespan=door.lifespan)
    app.mount("/llm", door)
    # serve_asgi runs uvicorn with lifespan="off": run the application's lifespan here.
    async with serve_asgi(app) as url, app.router.lifespan_context(app):
        await door.wait_ready()
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as http:
            chat = await http.post(
                "/llm/v1/chat/completions",
                json={"messages": _messages("hi"), "max_tokens": 3, **GREEDY},
            )
            health = await http.get("/llm/health")
            models = await http.get("/llm/v1/models")
            outside = await http.get("/v1/models")
    assert door.state == "closed"
    assert not engine.running
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["completion_tokens"] == 3
    assert chat.json()["choices"][0]["message"]["content"]
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "ready_servers": 1}
    assert models.status_code == 200
    assert models.json()["data"]
    assert outside.status_code == 404


# --------------------------------------------------------------------- trace propagation
class _ServerSpanEnded(SpanProcessor):
    """Sets ``event`` when a SERVER span ends (``on_end`` runs in the ending task's thread,
    here the event loop's)."""

    def __init__(self) -> None:
        self.event = anyio.Event()

    def on_end(self, span: ReadableSpan) -> None:
        if span.kind is SpanKind.SERVER:
            self.event.set()


async def test_traceparent_is_continued_by_the_server_span(tiny_model: Path) -> None:
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry(
        "test",
        token_events=TokenEvents.all(),
        span_exporters=[exporter],
        metric_readers=[InMemoryMetricReader()],
    )
    try:
        engine = AsyncEngine(tiny_model, placement=Placement.cpu(1), telemetry=telemetry)
        door = FrontDoor(engine, api_keys=[KEY])
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        parent_id = "00f067aa0ba902b7"
        headers = AUTH | {"traceparent": f"00-{trace_id}-{parent_id}-01"}
        body = {"messages": _messages("hi"), "max_tokens": 6, "stream": True, **GREEDY}
        server_ended = _ServerSpanEnded()
        telemetry.tracer_provider.add_span_processor(server_ended)
        async with running_door(door) as url:
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as http:
                payloads = await _post_sse(http, "/v1/chat/completions", body)
            # The SERVER span ends just after the last byte is sent: wait for it.
            with anyio.fail_after(10):
                await server_ended.event.wait()
        telemetry.tracer_provider.force_flush()
        spans = list(exporter.get_finished_spans())
    finally:
        telemetry.shutdown()

    assert payloads[-1] == "[DONE]"
    contents = [json.loads(p)["choices"][0]["delta"].get("content") for p in payloads[:-1]]
    tokens = [c for c in contents if c]
    assert len(tokens) == 6

    [server] = [s for s in spans if s.kind is SpanKind.SERVER]
    assert server.name == "POST /v1/chat/completions"
    attrs = dict(server.attributes or {})
    assert attrs["http.route"] == "/v1/chat/completions"
    assert attrs["http.response.status_code"] == 200
    assert attrs["http.request.method"] == "POST"
    assert server.context is not None
    assert server.context.trace_id == int(trace_id, 16)
    assert server.parent is not None
    assert server.parent.span_id == int(parent_id, 16)
    assert server.parent.is_remote

    [client] = [s for s in spans if s.name.startswith("chat ")]
    assert client.kind is SpanKind.CLIENT
    assert client.context is not None
    assert client.context.trace_id == int(trace_id, 16)
    assert client.parent is not None
    assert client.parent.span_id == server.context.span_id
    token_events = [e for e in client.events if e.name == "gen_ai.token"]
    assert len(token_events) == 6


async def test_a_mounted_doors_spans_name_the_whole_route(tiny_model: Path) -> None:
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry("test", span_exporters=[exporter], metric_readers=[])
    try:
        engine = AsyncEngine(tiny_model, placement=Placement.cpu(1), telemetry=telemetry)
        door = FrontDoor(engine, api_keys=[KEY])
        app = FastAPI(lifespan=door.lifespan)
        app.mount("/llm", door)
        server_ended = _ServerSpanEnded()
        telemetry.tracer_provider.add_span_processor(server_ended)
        async with serve_asgi(app) as url, app.router.lifespan_context(app):
            await door.wait_ready()
            async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as http:
                reply = await http.post("/llm/v1/chat/completions", json={
                    "messages": _messages("hi"), "max_tokens": 2})  # fmt: skip
                assert reply.status_code == 200
            with anyio.fail_after(10):
                await server_ended.event.wait()
        telemetry.tracer_provider.force_flush()
        spans = list(exporter.get_finished_spans())
    finally:
        telemetry.shutdown()
    [server] = [s for s in spans if s.kind is SpanKind.SERVER]
    assert server.name == "POST /llm/v1/chat/completions"
    assert dict(server.attributes or {})["http.route"] == "/llm/v1/chat/completions"


# --------------------------------------------------------------------- the benchmark
async def test_bench_runs_against_the_door(door_url: tuple[FrontDoor, str]) -> None:
    door, url = door_url
    config = BenchConfig(concurrency=2, requests=4, input_tokens=16, output_tokens=6)
    result = await run_bench(url, config, progress=False, api_key=KEY)
    assert len(result.records) == 4
    for record in result.records:
        assert record.ok, record.error
        assert record.output_tokens == 6
        assert len(record.chunk_times) == 6
        assert record.prompt_tokens == 16  # /tokenize went through the door: exact lengths
    assert result.errors == {}
    assert result.metrics.requests_completed == 4
    assert result.metrics.output_tokens == 24
    assert door.answered["/completion", 200] == 4

    chat = BenchConfig(concurrency=2, requests=2, endpoint="chat", output_tokens=5)
    result = await run_bench(url, chat, progress=False, api_key=KEY)
    assert [r.output_tokens for r in result.records] == [5, 5]
    assert all(r.ok for r in result.records)
    assert door.answered["/v1/chat/completions", 200] == 2

    # Without the door's key every request is refused, and recorded as failed.
    keyless = await run_bench(url, BenchConfig(requests=2, output_tokens=2), progress=False)
    assert [r.ok for r in keyless.records] == [False, False]
    assert all("HTTP 401" in (r.error or "") for r in keyless.records)
    assert door.answered["/completion", 401] == 2


# --------------------------------------------------------------------- /servers and /metrics
async def test_servers_and_metrics_pages_without_the_engines_key(
    door_url: tuple[FrontDoor, str],
) -> None:
    door, url = door_url
    engine = door.engine
    secret = engine._api_key  # the key the engine gives its servers: no public way to read it
    assert secret
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        health = await http.get("/health")  # open: no key needed
        no_key = [await http.get(path) for path in ("/servers", "/metrics")]
        http.headers.update(AUTH)
        reply = await http.post("/completion", json={"prompt": "hi", "n_predict": 2})
        assert reply.status_code == 200, reply.text
        servers = await http.get("/servers")
        metrics = await http.get("/metrics")

    assert health.status_code == 200
    assert [r.status_code for r in no_key] == [401, 401]
    assert servers.status_code == 200
    listed = servers.json()["servers"]
    assert [s["name"] for s in listed] == ["cpu0", "cpu1"]
    assert [s["state"] for s in listed] == ["ready", "ready"]
    assert sum(s["served"] for s in listed) >= 1
    assert all(s["slots"] == 4 for s in listed)

    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert re.search(r"^llamatelemetry_engine_waiting_requests 0\.0$", text, re.M)
    assert 'llamatelemetry_server_ready{server="cpu0"} 1.0' in text
    assert 'llamatelemetry_server_ready{server="cpu1"} 1.0' in text
    assert re.search(r'^llamacpp:\w+\{server="cpu1"\} \S+$', text, re.M), text
    assert re.search(r'^llamacpp:\w+\{server="cpu0"\} \S+$', text, re.M), text
    assert re.search(
        r'^llamatelemetry_frontdoor_requests_total\{code="200",route="/completion"\} 1\.0$',
        text,
        re.M,
    ), text

    for page in (servers.text, text):
        assert secret not in page
        assert KEY not in page


async def test_the_final_chunk_carries_the_requests_gpu_energy(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One "GPU" server (the CPU build runs it on the CPU) and a fake NVML at 300 W: the
    # engine measures each request's energy with telemetry off, and the door passes it on.
    from llamatelemetry_async import GPUSampler
    from llamatelemetry_async.testing._fake_nvml import FakeGPU, FakeNVML

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    sampler = GPUSampler(interval=0.02, nvml=FakeNVML([FakeGPU(power_w=300.0)]))
    engine = AsyncEngine(
        tiny_model, placement=Placement.per_gpu(), telemetry=False, gpu_sampler=sampler
    )
    door = FrontDoor(engine, api_keys=[KEY])
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 32, "ignore_eos": True}
    async with running_door(door) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as http:
        payloads = await _post_sse(http, "/v1/chat/completions", {**body, "stream": True})
        whole = await http.post("/v1/chat/completions", json=body)
    assert payloads[-1] == "[DONE]"
    final = json.loads(payloads[-2])
    gpu = final["llamatelemetry"]["gpu"]
    assert gpu["energy_j"] > 0
    assert gpu["mean_power_w"] == 300.0
    assert gpu["energy_j_per_token"] == pytest.approx(gpu["energy_j"] / 32)
    assert final["usage"]["completion_tokens"] == 32
    assert all("llamatelemetry" not in json.loads(p) for p in payloads[:-2])  # only the last
    assert whole.json()["llamatelemetry"]["gpu"]["energy_j"] > 0


# --------------------------------------------------------------------- several models
async def test_the_front_door_routes_by_model_and_lists_them(
    tiny_model: Path, tmp_path: Path
) -> None:
    other_model = write_tiny_model(tmp_path / "other.gguf", seed=1)
    small = ServerConfig(n_parallel=2, ctx_size=512)
    models = {
        "a": EngineModel(tiny_model, placement=Placement.cpu(1), server=small),
        "b": EngineModel(other_model, placement=Placement.cpu(1), server=small, preload=False),
    }
    door = FrontDoor(AsyncEngine(models=models), api_keys=[KEY])
    async with running_door(door) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as http:
        listed = (await http.get("/v1/models")).json()
        assert [m["id"] for m in listed["data"]] == ["a", "b"]
        assert [m["status"] for m in listed["data"]] == ["ready", "stopped"]
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        reply = await http.post("/v1/chat/completions", json={**body, "model": "b"}, timeout=60)
        assert reply.status_code == 200, reply.text
        assert door.engine.model_states["b"] == "ready"
        missing = await http.post("/v1/chat/completions", json={**body, "model": "gpt-4"})
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "model_not_found"
        servers = (await http.get("/servers")).json()["servers"]
        assert {s["model"] for s in servers} == {"a", "b"}
