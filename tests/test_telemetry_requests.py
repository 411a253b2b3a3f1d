"""Telemetry that tells the truth about each request: spans (with the tokens the server read)
for embeddings and rerank, and the trace context every request sent under a span carries.

Spans are read back from in-memory exporters; embeddings and rerank run against the real
tiny-model llama-servers; what a request carried on the wire is read from the replay
server's record of the request heads it received.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import baggage, context
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind

from llamatelemetry_async import (
    AsyncEngine,
    AsyncLlamaClient,
    Placement,
    Telemetry,
    TokenEvents,
    setup_telemetry,
)
from llamatelemetry_async.client._dispatch import trace_context
from llamatelemetry_async.testing._replay import (
    RecordedRequest,
    recorded_requests,
    replay_server,
)
from llamatelemetry_async.testing._server import RunningServer, run_llama_server

pytestmark = pytest.mark.anyio


class Recorder:
    """A ``Telemetry`` with in-memory exporters."""

    def __init__(self, **kw: Any) -> None:
        self.spans = InMemorySpanExporter()
        self.telemetry: Telemetry = setup_telemetry(
            "test",
            token_events=TokenEvents.all(),
            span_exporters=[self.spans],
            metric_readers=[InMemoryMetricReader()],
            **kw,
        )

    def finished(self) -> list[ReadableSpan]:
        self.telemetry.tracer_provider.force_flush()
        return list(self.spans.get_finished_spans())

    def named(self, prefix: str) -> list[ReadableSpan]:
        return [s for s in self.finished() if s.name.startswith(prefix)]


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.telemetry.shutdown()


@pytest.fixture
def tracer_provider() -> Iterator[TracerProvider]:
    """The application's own provider (never set globally): its spans are the user's."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    yield provider
    provider.shutdown()


@pytest.fixture(scope="module")
def per_token_server(tiny_model: Path) -> Iterator[RunningServer]:
    """Embeddings without pooling: native ``/embedding`` answers one vector per token."""
    args = ["-np", "2", "--embeddings", "--pooling", "none"]
    with run_llama_server(tiny_model, args=args) as server:
        yield server


@pytest.fixture(scope="module")
def replay() -> Iterator[str]:
    """This module's own replay server: the requests it records are this module's alone."""
    with replay_server(tokens=4, slots=4) as url:
        yield url


def _attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def _traceparent(context: SpanContext | None) -> str:
    assert context is not None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def _sent(url: str, target: str) -> list[RecordedRequest]:
    """The requests to ``target`` since the last call (which forgets them)."""
    return [r for r in recorded_requests(url, reset=True) if r.target == target]


# --------------------------------------------------------------------- embeddings, rerank
async def test_embeddings_spans_count_the_input_tokens(
    embedding_server: RunningServer, recorder: Recorder
) -> None:
    inst = recorder.telemetry.instrumentation
    async with AsyncLlamaClient(embedding_server.url, instrumentation=inst) as client:
        reply = await client.embeddings(["the cat", "the dog sat"])
        native = await client.embedding("the old cat")
        raw = await client.request("POST", "/v1/embeddings", {"input": "a cat"})
    [openai, pooled, relayed] = recorder.named("embeddings")
    attrs = _attrs(openai)
    assert openai.name == "embeddings llama.cpp"
    assert openai.kind is SpanKind.CLIENT
    assert attrs["gen_ai.operation.name"] == "embeddings"
    assert attrs["gen_ai.provider.name"] == "llama.cpp"
    assert reply.usage.prompt_tokens > 0
    assert attrs["gen_ai.usage.input_tokens"] == reply.usage.prompt_tokens
    assert attrs["gen_ai.embeddings.dimension.count"] == 64
    assert attrs["server.address"] == "127.0.0.1"
    assert "error.type" not in attrs
    # The native endpoint's pooled reply counts no tokens: the span does not invent them.
    assert len(native[0]["embedding"]) == 1
    assert "gen_ai.usage.input_tokens" not in _attrs(pooled)
    assert _attrs(pooled)["gen_ai.embeddings.dimension.count"] == 64
    # A relayed request (the front door's forward) is observed too, from its usage alone.
    assert _attrs(relayed)["gen_ai.operation.name"] == "embeddings"
    assert _attrs(relayed)["gen_ai.usage.input_tokens"] == raw["usage"]["prompt_tokens"]


async def test_embeddings_and_rerank_record_no_output_and_their_input_as_content(
    embedding_server: RunningServer, rerank_server: RunningServer
) -> None:
    reader = InMemoryMetricReader()
    spans = InMemorySpanExporter()
    telemetry = setup_telemetry(
        "test", capture_content=True, span_exporters=[spans], metric_readers=[reader]
    )
    inst = telemetry.instrumentation
    try:
        async with AsyncLlamaClient(embedding_server.url, instrumentation=inst) as client:
            await client.embeddings(["the cat", "the dog sat"], encoding_format="float")
        async with AsyncLlamaClient(rerank_server.url, instrumentation=inst) as client:
            await client.rerank("a cat?", ["the cat", "a car"])
        telemetry.tracer_provider.force_flush()
        embed, rerank = spans.get_finished_spans()
        for span in (embed, rerank):
            attrs = _attrs(span)
            assert "gen_ai.usage.output_tokens" not in attrs  # nothing is generated
            assert "gen_ai.output.messages" not in attrs
        assert _attrs(embed)["gen_ai.request.encoding_formats"] == ("float",)
        assert "the dog sat" in str(_attrs(embed)["gen_ai.input.messages"])
        assert "a car" in str(_attrs(rerank)["gen_ai.input.messages"])
        data = reader.get_metrics_data()
        assert data is not None
        kinds = {
            dict(point.attributes or {})["gen_ai.token.type"]
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
            if metric.name == "gen_ai.client.token.usage"
            for point in metric.data.data_points
        }
        assert kinds == {"input"}
    finally:
        telemetry.shutdown()


async def test_native_embeddings_without_pooling_count_one_token_per_vector(
    per_token_server: RunningServer, recorder: Recorder
) -> None:
    inst = recorder.telemetry.instrumentation
    inputs = ["the old cat", "a dog"]
    async with AsyncLlamaClient(per_token_server.url, instrumentation=inst) as client:
        reply = await client.embedding(inputs)
        tokens = [len(await client.tokenize(text, add_special=True)) for text in inputs]
    assert [len(item["embedding"]) for item in reply] == tokens
    [span] = recorder.named("embeddings")
    assert _attrs(span)["gen_ai.usage.input_tokens"] == sum(tokens)
    assert _attrs(span)["gen_ai.embeddings.dimension.count"] == 64


async def test_rerank_span_counts_the_tokens_the_server_read(
    rerank_server: RunningServer, recorder: Recorder
) -> None:
    inst = recorder.telemetry.instrumentation
    documents = ["the cat", "a dog", "the sky"]
    async with AsyncLlamaClient(rerank_server.url, instrumentation=inst) as client:
        results = await client.rerank("cat", documents, top_n=2)
        raw = await client.request("POST", "/rerank", {"query": "cat", "documents": documents})
        # The TEI shape answers a bare list, without counts: relayed as it is, no usage.
        tei = await client.request("POST", "/rerank", {"query": "cat", "texts": documents})
    assert len(results) == 2
    assert isinstance(tei, list)
    [span, relayed, relayed_tei] = recorder.named("rerank")
    assert "gen_ai.usage.input_tokens" not in _attrs(relayed_tei)
    assert "error.type" not in _attrs(relayed_tei)
    attrs = _attrs(span)
    assert span.name == "rerank llama.cpp"
    assert attrs["gen_ai.operation.name"] == "rerank"
    assert raw["usage"]["prompt_tokens"] > 0
    assert attrs["gen_ai.usage.input_tokens"] == raw["usage"]["prompt_tokens"]
    assert attrs["llamatelemetry.rerank.documents"] == 3
    assert attrs["llamatelemetry.rerank.results"] == 2
    assert _attrs(relayed)["gen_ai.usage.input_tokens"] == raw["usage"]["prompt_tokens"]


async def test_engine_embeddings_and_rerank_spans(
    embedding_server: RunningServer, rerank_server: RunningServer, recorder: Recorder
) -> None:
    placement = Placement.remote([embedding_server.url])
    async with AsyncEngine(placement=placement, telemetry=recorder.telemetry) as engine:
        reply = await engine.embeddings(["the cat", "the dog"])
        await engine.embedding("the cat")
    placement = Placement.remote([rerank_server.url])
    async with AsyncEngine(placement=placement, telemetry=recorder.telemetry) as engine:
        await engine.rerank("cat", ["the cat", "a dog"])
    [openai, native] = recorder.named("embeddings")
    [rerank] = recorder.named("rerank")
    assert _attrs(openai)["gen_ai.usage.input_tokens"] == reply.usage.prompt_tokens
    for span in (openai, native, rerank):
        attrs = _attrs(span)
        assert span.kind is SpanKind.CLIENT
        assert attrs["server.address"] == "127.0.0.1"
        assert "llamatelemetry.server.name" in attrs
    assert _attrs(native)["gen_ai.operation.name"] == "embeddings"
    assert _attrs(rerank)["gen_ai.usage.input_tokens"] > 0


# --------------------------------------------------------------------- trace context
async def test_no_span_no_traceparent(replay: str) -> None:
    assert trace_context() is None
    async with AsyncLlamaClient(replay) as client:
        _sent(replay, "/completion")
        await client.completion("x", n_predict=1)
        async with client.stream("x", n_predict=1) as stream:
            assert len([c async for c in stream]) == 1
    sent = _sent(replay, "/completion")
    assert len(sent) == 2
    assert [r.header("traceparent") for r in sent] == [[], []]


async def test_requests_under_a_span_carry_its_context(
    replay: str, tracer_provider: TracerProvider
) -> None:
    tracer = tracer_provider.get_tracer("app")
    async with AsyncLlamaClient(replay) as client:
        _sent(replay, "/completion")
        with tracer.start_as_current_span("user") as span:
            expected = _traceparent(span.get_span_context())
            async with client.stream("x", n_predict=2) as stream:
                assert len([c async for c in stream]) == 2
            await client.completion("x", n_predict=1)
            # A stream made under the span and opened after it ended: the context is the
            # one current when the request is sent.
            late = client.stream("x", n_predict=1)
        async with late:
            assert len([c async for c in late]) == 1
        await client.completion("x", n_predict=1)
    sent = _sent(replay, "/completion")
    assert [r.header("traceparent") for r in sent] == [[expected], [expected], [], []]


async def test_a_users_httpx_client_carries_the_context_too(
    replay: str, tracer_provider: TracerProvider
) -> None:
    # The httpx path (a user's client, or https://) builds its request where the pool
    # builds its head: the same headers, the context included.
    async with httpx.AsyncClient() as http, AsyncLlamaClient(replay, http_client=http) as client:
        _sent(replay, "/completion")
        with tracer_provider.get_tracer("app").start_as_current_span("user") as span:
            expected = _traceparent(span.get_span_context())
            async with client.stream("x", n_predict=1) as stream:
                assert len([c async for c in stream]) == 1
            await client.completion("x", n_predict=1)
        await client.completion("x", n_predict=1)
    sent = _sent(replay, "/completion")
    assert [r.header("traceparent") for r in sent] == [[expected], [expected], []]


async def test_the_applications_propagators_write_the_headers(
    replay: str, tracer_provider: TracerProvider
) -> None:
    # The global propagator (W3C trace context and baggage unless the application says
    # otherwise) writes what is sent: baggage goes along with the trace context.
    token = context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        async with AsyncLlamaClient(replay) as client:
            _sent(replay, "/completion")
            with tracer_provider.get_tracer("app").start_as_current_span("user"):
                await client.completion("x", n_predict=1)
    finally:
        context.detach(token)
    [request] = _sent(replay, "/completion")
    assert len(request.header("traceparent")) == 1
    assert request.header("baggage") == ["tenant=acme"]


async def test_a_traceparent_the_caller_sets_is_the_one_sent(
    replay: str, tracer_provider: TracerProvider
) -> None:
    theirs = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with AsyncLlamaClient(replay) as client:
        _sent(replay, "/completion")
        with tracer_provider.get_tracer("app").start_as_current_span("user"):
            await client.completion("x", n_predict=1, extra_headers={"TraceParent": theirs})
    [request] = _sent(replay, "/completion")
    assert request.header("traceparent") == [theirs]


async def test_the_genai_span_is_the_parent_the_server_sees(
    replay: str, recorder: Recorder, tracer_provider: TracerProvider
) -> None:
    inst = recorder.telemetry.instrumentation
    async with AsyncLlamaClient(replay, instrumentation=inst) as client:
        _sent(replay, "/completion")
        with tracer_provider.get_tracer("app").start_as_current_span("user") as user:
            async with client.stream("x", n_predict=2) as stream:
                assert len([c async for c in stream]) == 2
            await client.completion("x", n_predict=1)
    sent = _sent(replay, "/completion")
    spans = recorder.named("text_completion")
    assert len(spans) == 2
    assert [r.header("traceparent") for r in sent] == [[_traceparent(s.context)] for s in spans]
    for span in spans:
        assert span.parent is not None
        assert span.parent.span_id == user.get_span_context().span_id
        assert span.context is not None
        assert span.context.trace_id == user.get_span_context().trace_id


async def test_an_engine_request_carries_its_genai_span(replay: str, recorder: Recorder) -> None:
    placement = Placement.remote([replay])
    async with AsyncEngine(placement=placement, telemetry=recorder.telemetry) as engine:
        _sent(replay, "/completion")
        async with engine.stream("x", n_predict=2) as stream:
            assert len([c async for c in stream]) == 2
        await engine.completion("x", n_predict=1)
        sent = _sent(replay, "/completion")
    spans = recorder.named("text_completion")
    assert len(spans) == 2
    assert [r.header("traceparent") for r in sent] == [[_traceparent(s.context)] for s in spans]


async def test_an_instrumented_httpx_client_sends_one_traceparent(replay: str) -> None:
    rec = Recorder(instrument_httpx=True)
    try:
        inst = rec.telemetry.instrumentation
        http = rec.telemetry.httpx_client()
        async with http, AsyncLlamaClient(replay, instrumentation=inst, http_client=http) as client:
            _sent(replay, "/completion")
            async with client.stream("x", n_predict=2) as stream:
                assert len([c async for c in stream]) == 2
            await client.completion("x", n_predict=1)
        sent = _sent(replay, "/completion")
        spans = rec.finished()
    finally:
        rec.telemetry.shutdown()
    genai = [s for s in spans if s.name.startswith("text_completion")]
    http_spans = [s for s in spans if s.name == "POST"]
    assert len(genai) == len(http_spans) == len(sent) == 2
    # Exactly one traceparent each: the HTTP span's, a child of the request's GenAI span.
    assert [r.header("traceparent") for r in sent] == [
        [_traceparent(s.context)] for s in http_spans
    ]
    for request_span, http_span in zip(genai, http_spans, strict=True):
        assert http_span.parent is not None
        assert request_span.context is not None
        assert http_span.parent.span_id == request_span.context.span_id
