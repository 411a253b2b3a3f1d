"""The only private OpenTelemetry SDK API the package uses, behind ``telemetry/_sdk.py``.

If an SDK release renames or drops ``Span._limits``/``SpanLimits.max_events`` or
``Span._events`` (a ``BoundedList``), these tests fail loudly; the package then falls back to the
public API (and the SDK's default limit) rather than break.
"""

from __future__ import annotations

import copy

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import Event, ReadableSpan, Span, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util import BoundedList

from llamatelemetry_async.telemetry._sdk import SDK_DEFAULT_MAX_EVENTS, TokenFigures, span_events


def test_the_sdk_still_has_what_the_adapter_reads() -> None:
    span = TracerProvider().get_tracer("t").start_span("s")
    assert isinstance(span, Span)
    limits = getattr(span, "_limits", None)
    assert isinstance(limits, SpanLimits), "SDK changed Span._limits: update telemetry/_sdk.py"
    assert hasattr(limits, "max_events"), "SDK changed SpanLimits.max_events: update _sdk.py"
    assert isinstance(getattr(span, "_events", None), BoundedList), (
        "SDK changed Span._events: update telemetry/_sdk.py"
    )
    events = span._events
    for name in ("dropped", "_dq", "_lock"):  # what the span's replacement list takes over
        assert hasattr(events, name), f"SDK changed BoundedList.{name}: update _sdk.py"
    assert isinstance(vars(ReadableSpan)["events"], property)  # tuple(span._events): __iter__
    # The token event overrides the public Event's properties, which exporters read.
    for name in ("name", "timestamp", "attributes", "dropped_attributes"):
        assert isinstance(getattr(Event, name, None), property), f"SDK changed Event.{name}"
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
    span.add_event("user's own", timestamp=1_000 + 600_000_000)  # between the two tokens
    tokens = TokenFigures(1_000, texts=True)
    tokens.add(0, 2, 0.5, 0.1, None)
    tokens.add(2, 1, 0.75, 0.25, "cat")
    events.add_tokens(tokens)
    span.end()
    [finished] = exporter.get_finished_spans()
    assert len(finished.events) == 3
    assert finished.dropped_events == 0
    first, user, second = finished.events  # in time order
    assert (first.name, user.name, second.name) == ("gen_ai.token", "user's own", "gen_ai.token")
    assert [e.name for e in copy.deepcopy(finished._events)] == [e.name for e in finished.events]
    assert dict(first.attributes or {}) == {
        "gen_ai.token.index": 0,
        "gen_ai.token.count": 2,
        "gen_ai.token.time_since_start": 0.5,
        "gen_ai.token.gap": 0.1,
    }
    assert dict(second.attributes or {})["gen_ai.token.text"] == "cat"
    assert first.timestamp == 1_000 + 500_000_000
    assert first.dropped_attributes == 0
    # The OTLP exporters' encoder reads them as any SDK event.
    [resource_spans] = encode_spans([finished]).resource_spans
    [pb_span] = resource_spans.scope_spans[0].spans
    assert [e.name for e in pb_span.events] == ["gen_ai.token", "user's own", "gen_ai.token"]
    assert pb_span.events[2].time_unix_nano == 1_000 + 750_000_000
    assert {a.key for a in pb_span.events[2].attributes} >= {"gen_ai.token.text"}


def test_a_span_that_records_nothing_gets_no_events_built() -> None:
    events = span_events(trace.INVALID_SPAN)
    assert events.limit == 0


class OtherSpan(trace.NonRecordingSpan):
    """A recording span from some other implementation: only the public API is used."""

    def __init__(self) -> None:
        super().__init__(trace.INVALID_SPAN_CONTEXT)
        self.added: list[tuple[str, object, int | None]] = []

    def is_recording(self) -> bool:
        return True

    def add_event(self, name: str, attributes: object = None, timestamp: int | None = None) -> None:
        self.added.append((name, attributes, timestamp))


def test_another_implementations_span_gets_the_public_api_and_no_limit() -> None:
    span = OtherSpan()
    events = span_events(span)
    assert events.limit is None
    tokens = TokenFigures(1_000)
    tokens.add(3, 1, 0.5, 0.1, "not kept: no content capture")
    events.add_tokens(tokens)
    assert span.added == [
        (
            "gen_ai.token",
            {
                "gen_ai.token.index": 3,
                "gen_ai.token.count": 1,
                "gen_ai.token.time_since_start": 0.5,
                "gen_ai.token.gap": 0.1,
            },
            1_000 + 500_000_000,
        )
    ]
