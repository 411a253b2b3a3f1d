"""The only private OpenTelemetry SDK API the package uses, behind ``telemetry/_sdk.py``.

If an SDK release renames or drops ``Span._limits``/``SpanLimits.max_events`` or
``Span._add_event``, these tests fail loudly; the package itself then falls back to the
public API (and the SDK's default limit) rather than break.
"""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import Span, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llamatelemetry_async.telemetry._sdk import SDK_DEFAULT_MAX_EVENTS, span_events


def test_the_sdk_still_has_what_the_adapter_reads() -> None:
    span = TracerProvider().get_tracer("t").start_span("s")
    assert isinstance(span, Span)
    limits = getattr(span, "_limits", None)
    assert isinstance(limits, SpanLimits), "SDK changed Span._limits: update telemetry/_sdk.py"
    assert hasattr(limits, "max_events"), "SDK changed SpanLimits.max_events: update _sdk.py"
    assert callable(getattr(span, "_add_event", None)), (
        "SDK changed Span._add_event: update telemetry/_sdk.py"
    )
    span.end()


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        (None, SDK_DEFAULT_MAX_EVENTS),
        (SpanLimits(max_events=16), 16),
        (SpanLimits(max_events=SpanLimits.UNSET), None),
    ],
)
def test_the_limit_and_the_fast_add_of_an_sdk_span(
    limits: SpanLimits | None, expected: int | None
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(span_limits=limits) if limits else TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    span = provider.get_tracer("t").start_span("s")
    events = span_events(span)
    assert events.limit == expected
    events.add("gen_ai.token", {"gen_ai.token.index": 0, "gen_ai.token.count": 2})
    span.end()
    [finished] = exporter.get_finished_spans()
    [event] = finished.events
    assert event.name == "gen_ai.token"
    assert dict(event.attributes or {}) == {"gen_ai.token.index": 0, "gen_ai.token.count": 2}


def test_a_span_that_records_nothing_gets_no_events_built() -> None:
    events = span_events(trace.INVALID_SPAN)
    assert events.limit == 0


class OtherSpan(trace.NonRecordingSpan):
    """A recording span from some other implementation: only the public API is used."""

    def __init__(self) -> None:
        super().__init__(trace.INVALID_SPAN_CONTEXT)
        self.added: list[tuple[str, object]] = []

    def is_recording(self) -> bool:
        return True

    def add_event(self, name: str, attributes: object = None, timestamp: int | None = None) -> None:
        self.added.append((name, attributes))


def test_another_implementations_span_gets_the_public_api_and_no_limit() -> None:
    span = OtherSpan()
    events = span_events(span)
    assert events.limit is None
    events.add("gen_ai.token", {"gen_ai.token.index": 3})
    assert span.added == [("gen_ai.token", {"gen_ai.token.index": 3})]
