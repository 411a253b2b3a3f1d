"""Prompt and completion text, where the GenAI instrumentations put it: nowhere, on the span,
in a ``gen_ai.client.inference.operation.details`` event (a log record in the span's
context), or both; read from the same environment variables as theirs."""

from __future__ import annotations

import json

import pytest
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llamatelemetry_async import AsyncLlamaClient, ConfigError, GenAIInstrumentation, LlamaWarning
from llamatelemetry_async.telemetry import capture_content_from_env
from llamatelemetry_async.testing._server import RunningServer

CONTENT = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
OPT_IN = "OTEL_SEMCONV_STABILITY_OPT_IN"


@pytest.mark.parametrize(
    ("opt_in", "value", "mode"),
    [
        ("", "", "none"),
        ("", "true", "span"),
        ("", "SPAN_ONLY", "none"),  # before the opt-in, only a boolean means anything
        ("gen_ai_latest_experimental", "EVENT_ONLY", "event"),
        ("http, gen_ai_latest_experimental", "span_and_event", "span_and_event"),
        ("gen_ai_latest_experimental", "SPAN_ONLY", "span"),
        ("gen_ai_latest_experimental", "NO_CONTENT", "none"),
        ("gen_ai_latest_experimental", "", "none"),
    ],
)
def test_the_environment_is_read_as_the_genai_instrumentations_read_it(
    monkeypatch: pytest.MonkeyPatch, opt_in: str, value: str, mode: str
) -> None:
    monkeypatch.setenv(OPT_IN, opt_in)
    monkeypatch.setenv(CONTENT, value)
    assert capture_content_from_env() == mode


def test_a_mode_that_does_not_exist_warns_and_captures_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(OPT_IN, "gen_ai_latest_experimental")
    monkeypatch.setenv(CONTENT, "true")
    with pytest.warns(LlamaWarning, match="SPAN_AND_EVENT"):
        assert capture_content_from_env() == "none"
    with pytest.raises(ConfigError, match="capture_content"):
        GenAIInstrumentation(capture_content="everywhere")  # type: ignore[arg-type]


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["none", "span", "event", "span_and_event"])
async def test_each_mode_puts_the_text_where_it_says(
    llama_server: RunningServer, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(OPT_IN, "gen_ai_latest_experimental")
    spans, logs = InMemorySpanExporter(), InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(logs))
    inst = GenAIInstrumentation(
        tracer_provider=tracer_provider,
        logger_provider=logger_provider,
        capture_content=mode,  # type: ignore[arg-type]
    )
    messages = [{"role": "user", "content": "tell me about cats"}]
    async with (
        AsyncLlamaClient(llama_server.url, instrumentation=inst) as client,
        client.stream_chat(messages, max_tokens=8, ignore_eos=True) as stream,
    ):
        text = "".join([chunk.text async for chunk in stream])
    [span] = spans.get_finished_spans()
    attrs = dict(span.attributes or {})
    on_span = mode in ("span", "span_and_event")
    in_event = mode in ("event", "span_and_event")
    assert ("gen_ai.input.messages" in attrs) is on_span
    assert ("gen_ai.output.messages" in attrs) is on_span
    tokens = [e for e in span.events if e.name == "gen_ai.token"]
    assert tokens
    assert all(("gen_ai.token.text" in (e.attributes or {})) is on_span for e in tokens)
    assert "gen_ai.system" not in attrs  # the latest conventions only under the opt-in
    records = [r.log_record for r in logs.get_finished_logs()]
    if not in_event:
        assert records == []
        return
    [record] = records
    assert record.event_name == "gen_ai.client.inference.operation.details"
    assert record.trace_id == span.context.trace_id
    assert record.span_id == span.context.span_id
    details = dict(record.attributes or {})
    assert "tell me about cats" in str(details["gen_ai.input.messages"])
    [output] = json.loads(str(details["gen_ai.output.messages"]))
    assert output["parts"][0]["content"] == text
    assert details["gen_ai.usage.output_tokens"] == 8
    assert details["gen_ai.operation.name"] == "chat"


def test_before_the_opt_in_the_span_also_names_the_system(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(OPT_IN, raising=False)
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    inst = GenAIInstrumentation(tracer_provider=provider, capture_content=False)
    observer = inst.start("chat", {"model": "m"}, stream=False)
    observer.on_error(None)
    [span] = spans.get_finished_spans()
    assert dict(span.attributes or {})["gen_ai.system"] == "llama.cpp"
    assert dict(span.attributes or {})["gen_ai.provider.name"] == "llama.cpp"
