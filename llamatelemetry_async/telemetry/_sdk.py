"""The OpenTelemetry SDK's private API this package relies on, all of it, in one place.

Two things, both on the SDK's spans (``opentelemetry.sdk.trace.Span``):

- the span's event limit, ``_limits.max_events``: past it the SDK keeps the newest events and
  drops the oldest (the first token), and it exposes the limit nowhere public;
- ``_add_event``, which adds a prebuilt ``Event`` without validating its attributes again
  (per token: 4.5 -> 1.3 us).

``tests/test_telemetry_sdk.py`` fails when an SDK release changes either. At run time, a span
without them gets the public ``add_event`` and the SDK's documented default limit.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from opentelemetry import trace

__all__ = ["SDK_DEFAULT_MAX_EVENTS", "SpanEvents", "span_events"]

SDK_DEFAULT_MAX_EVENTS = 128  # OTEL_SPAN_EVENT_COUNT_LIMIT's default

AddEvent = Callable[[str, dict[str, Any]], None]


class SpanEvents:
    """How to add events to one span, and how many it keeps (``None``: no limit)."""

    __slots__ = ("add", "limit")

    def __init__(self, add: AddEvent, limit: int | None) -> None:
        self.add = add
        self.limit = limit


def span_events(span: trace.Span) -> SpanEvents:
    """The fastest way to add events to ``span``, and its event limit.

    Never imports the SDK: a span can only be the SDK's once the SDK is loaded, and with the
    API alone (no provider set) loading it would cost ~15 ms for nothing.
    """
    if not span.is_recording():
        return SpanEvents(_discard, 0)  # nothing is kept: build no events at all
    if "opentelemetry.sdk.trace" in sys.modules:
        from opentelemetry.sdk.trace import Event, Span

        if isinstance(span, Span):
            limits = getattr(span, "_limits", None)
            add_event = getattr(span, "_add_event", None)
            if limits is not None and add_event is not None:
                max_events = limits.max_events  # None: unlimited (SpanLimits.UNSET)

                def add(name: str, attributes: dict[str, Any]) -> None:
                    add_event(Event(name, attributes, time.time_ns()))

                return SpanEvents(add, max_events)
            return SpanEvents(span.add_event, SDK_DEFAULT_MAX_EVENTS)
    return SpanEvents(span.add_event, None)


def _discard(name: str, attributes: dict[str, Any]) -> None:
    return
