"""What a traced request leaves for the garbage collector and the metrics SDK.

Timings are for ``benchmarks/compare_clients.py``; these tests pin the properties behind them
with counts that do not depend on the machine: a token event keeps no object the collector
tracks, a request's metric attribute sets are built once, and the in-flight count stays true
when a request is routed again. They drive the client's observer hook directly, with the
real SDK providers and the client's own chunk types.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llamatelemetry_async import Telemetry, TokenEvents, setup_telemetry
from llamatelemetry_async.client._types import CompletionChunk, Timings, Usage
from llamatelemetry_async.telemetry._genai import GenAIInstrumentation

TOKENS = 400
BODY = {"prompt": "Once upon a time", "n_predict": TOKENS, "stream": True}


class Outcome:
    """A finished stream, as the client's ``TokenStream`` reports it."""

    def __init__(self, tokens: int) -> None:
        self.text = "x" * tokens
        self.finish_reason = "length"
        self.usage = Usage(prompt_tokens=5, completion_tokens=tokens, total_tokens=5 + tokens)
        self.timings = Timings(
            prompt_n=5, prompt_ms=2.0, predicted_n=tokens, predicted_ms=40.0,
            predicted_per_token_ms=0.1, predicted_per_second=10_000.0,
        )  # fmt: skip


@pytest.fixture
def recorder() -> Iterator[tuple[Telemetry, InMemorySpanExporter, InMemoryMetricReader]]:
    spans = InMemorySpanExporter()
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry(
        "cost", token_events=TokenEvents.all(), span_exporters=[spans], metric_readers=[reader]
    )
    yield telemetry, spans, reader
    telemetry.shutdown()


def _chunks(tokens: int) -> list[CompletionChunk]:
    return [CompletionChunk(content="x", tokens_predicted=i + 1) for i in range(tokens)]


def _instrumentation(telemetry: Telemetry) -> GenAIInstrumentation:
    inst = telemetry.instrumentation
    assert isinstance(inst, GenAIInstrumentation)
    return inst


@pytest.mark.parametrize("capture", [False, True])
def test_a_token_event_keeps_no_object_the_collector_tracks(capture: bool) -> None:
    spans = InMemorySpanExporter()
    telemetry = setup_telemetry(
        "cost",
        token_events=TokenEvents.all(),
        capture_content=capture,
        span_exporters=[spans],
        metric_readers=[InMemoryMetricReader()],
    )
    try:
        observer = _instrumentation(telemetry).start("text_completion", BODY, stream=True)
        observer.on_server("http://127.0.0.1:8080", None, ())
        chunks = _chunks(TOKENS)  # built first: the server's bytes, not the observer's
        observer.on_chunk(chunks[0])
        gc.collect()
        gc.disable()  # nothing untracked or freed behind the count's back
        try:
            before = len(gc.get_objects())
            for chunk in chunks[1:]:
                observer.on_chunk(chunk)
            grown = len(gc.get_objects()) - before
        finally:
            gc.enable()
        # One object per token (a tuple, a closure's cell) would be hundreds here; an array
        # or a list that grows is the same object throughout.
        assert grown < 10, f"{grown} tracked objects for {TOKENS - 1} tokens"
        observer.on_end(Outcome(TOKENS))
        telemetry.tracer_provider.force_flush()
        [span] = spans.get_finished_spans()
        events = span.events
        assert len(events) == TOKENS
        assert [e.attributes["gen_ai.token.index"] for e in events if e.attributes] == list(
            range(TOKENS)
        )
        texts = [e.attributes.get("gen_ai.token.text") for e in events if e.attributes]
        assert texts == (["x"] * TOKENS if capture else [None] * TOKENS)
    finally:
        telemetry.shutdown()


def test_metric_attribute_sets_are_built_once_per_operation_model_server_and_error(
    recorder: tuple[Telemetry, InMemorySpanExporter, InMemoryMetricReader],
) -> None:
    telemetry, _, reader = recorder
    inst = _instrumentation(telemetry)
    server = (("server.address", "127.0.0.1"), ("server.port", 8080))
    first = inst.metric_attributes("chat", "m", server)
    assert inst.metric_attributes("chat", "m", server) is first
    failed = inst.metric_attributes("chat", "m", server, "500")
    assert failed is not first
    assert failed.base == {**first.base, "error.type": "500"}
    assert first.input == {**first.base, "gen_ai.token.type": "input"}
    assert first.output == {**first.base, "gen_ai.token.type": "output"}
    # Two requests share the sets, and the metrics still tell them apart by what they carry.
    for _ in range(2):
        observer = inst.start("text_completion", BODY, stream=True)
        observer.on_server("http://127.0.0.1:8080", None, ())
        for chunk in _chunks(3):
            observer.on_chunk(chunk)
        observer.on_end(Outcome(3))
    usage = _points(reader, "gen_ai.client.token.usage")
    by_type = {p.attributes["gen_ai.token.type"]: p for p in usage if p.attributes}
    assert (by_type["input"].count, by_type["input"].sum) == (2, 10)
    assert (by_type["output"].count, by_type["output"].sum) == (2, 6)
    for point in usage:
        assert point.attributes is not None
        assert point.attributes["server.port"] == 8080
        assert point.attributes["gen_ai.operation.name"] == "text_completion"


def test_a_request_routed_twice_counts_in_flight_once(
    recorder: tuple[Telemetry, InMemorySpanExporter, InMemoryMetricReader],
) -> None:
    telemetry, spans, reader = recorder
    observer = _instrumentation(telemetry).start("text_completion", BODY, stream=False)
    observer.on_server("http://127.0.0.1:8080", "a", (0,))
    assert _in_flight(reader) == {8080: 1}
    observer.on_server("http://127.0.0.1:8081", "b", (1,))  # the engine retried elsewhere
    assert _in_flight(reader) == {8080: 0, 8081: 1}
    observer.on_end(Outcome(2))
    assert _in_flight(reader) == {8080: 0, 8081: 0}
    telemetry.tracer_provider.force_flush()
    [span] = spans.get_finished_spans()
    attributes = dict(span.attributes or {})
    assert attributes["server.port"] == 8081
    assert attributes["llamatelemetry.server.name"] == "b"
    assert attributes["llamatelemetry.server.gpus"] == (1,)


def _points(reader: InMemoryMetricReader, name: str) -> list[Any]:
    data = reader.get_metrics_data()
    assert data is not None
    return [
        point
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


def _in_flight(reader: InMemoryMetricReader) -> dict[Any, int | float]:
    points: list[NumberDataPoint] = _points(reader, "llamatelemetry.server.requests.in_flight")
    return {p.attributes["server.port"]: p.value for p in points if p.attributes}
