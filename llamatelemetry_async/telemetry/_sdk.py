"""The OpenTelemetry SDK's private API this package relies on, all of it, in one place.

Two things, both on the SDK's spans (``opentelemetry.sdk.trace.Span``):

- the span's event limit, ``_limits.max_events``: past it the SDK keeps the newest events and
  drops the oldest (the first token), and it exposes the limit nowhere public;
- its event list, ``_events`` (a ``BoundedList``): when a request ends, it is replaced by
  one that also holds the request's token figures, as plain tuples, and makes them token
  events (a subclass of the SDK's public ``Event``) only when an exporter reads the span,
  usually on the batch processor's thread. While a request streams, and while its finished
  span waits for export, a token costs one tuple: no object for the garbage collector to
  walk, no lock, no attribute validation, nothing on the event loop but the tuple.

``tests/test_telemetry_sdk.py`` fails when an SDK release changes either. At run time a span
without them gets the public ``add_event`` and the SDK's documented default limit.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from opentelemetry import trace

__all__ = ["SDK_DEFAULT_MAX_EVENTS", "TOKEN_EVENT", "SpanEvents", "span_events"]

SDK_DEFAULT_MAX_EVENTS = 128  # OTEL_SPAN_EVENT_COUNT_LIMIT's default
TOKEN_EVENT = "gen_ai.token"

# first token's index, tokens in the chunk, seconds since the request began, seconds since
# the previous chunk, the chunk's text (None: content capture off), the request's start in
# wall-clock nanoseconds.
TokenFigures = tuple[int, int, float, float, "str | None", int]
AddTokens = Callable[[list[TokenFigures]], None]


class SpanEvents:
    """How to add a request's token events to its span, all at once, and how many events the
    span keeps (``None``: no limit; ``0``: it records nothing)."""

    __slots__ = ("add_tokens", "limit")

    def __init__(self, add_tokens: AddTokens, limit: int | None) -> None:
        self.add_tokens = add_tokens
        self.limit = limit


def token_attributes(figures: TokenFigures) -> dict[str, Any]:
    """A token event's attributes, from its figures."""
    first, count, since, gap, text, _ = figures
    attributes: dict[str, Any] = {
        "gen_ai.token.index": first,
        "gen_ai.token.count": count,
        "gen_ai.token.time_since_start": since,
        "gen_ai.token.gap": gap,
    }
    if text is not None:
        attributes["gen_ai.token.text"] = text
    return attributes


def _timestamp(figures: TokenFigures) -> int:
    return figures[5] + int(figures[2] * 1e9)


def span_events(span: trace.Span) -> SpanEvents:
    """The fastest way to add token events to ``span``, and its event limit.

    Never imports the SDK: a span can only be the SDK's once the SDK is loaded, and with the
    API alone (no provider set) loading it would cost ~15 ms for nothing.
    """
    if not span.is_recording():
        return SpanEvents(_discard, 0)  # nothing is kept: build no events at all
    if "opentelemetry.sdk.trace" in sys.modules:
        from opentelemetry.sdk.trace import Span
        from opentelemetry.sdk.util import BoundedList

        if isinstance(span, Span):
            limits = getattr(span, "_limits", None)
            if limits is not None and isinstance(getattr(span, "_events", None), BoundedList):

                def add_tokens(figures: list[TokenFigures]) -> None:
                    span._events = _events_with_tokens(span._events, figures)

                return SpanEvents(add_tokens, limits.max_events)  # None: SpanLimits.UNSET
            return SpanEvents(_public(span), SDK_DEFAULT_MAX_EVENTS)
    return SpanEvents(_public(span), None)


def _public(span: trace.Span) -> AddTokens:
    def add_tokens(figures: list[TokenFigures]) -> None:
        for f in figures:
            span.add_event(TOKEN_EVENT, token_attributes(f), _timestamp(f))

    return add_tokens


def _discard(figures: list[TokenFigures]) -> None:
    return


_TOKEN_EVENT_CLASS: Any = None


def _token_event_class() -> Any:
    """A subclass of the SDK's ``Event``, made once the SDK is loaded."""
    global _TOKEN_EVENT_CLASS
    if _TOKEN_EVENT_CLASS is None:
        from opentelemetry.sdk.trace import Event

        class TokenEvent(Event):
            """A ``gen_ai.token`` event whose attributes are built when read."""

            __slots__ = ("_figures",)

            def __init__(self, figures: TokenFigures) -> None:
                self._figures = figures  # the base's fields are properties below

            @property
            def name(self) -> str:
                return TOKEN_EVENT

            @property
            def timestamp(self) -> int:
                return _timestamp(self._figures)

            @property
            def attributes(self) -> dict[str, Any]:
                return token_attributes(self._figures)

            @property
            def dropped_attributes(self) -> int:
                return 0

        _TOKEN_EVENT_CLASS = TokenEvent
    return _TOKEN_EVENT_CLASS


_EVENTS_CLASS: Any = None


def _events_with_tokens(events: Any, tokens: list[TokenFigures]) -> Any:
    """``events`` (a span's ``BoundedList``) with the request's token figures beside it."""
    global _EVENTS_CLASS
    if _EVENTS_CLASS is None:
        from opentelemetry.sdk.util import BoundedList

        class EventsWithTokens(BoundedList):  # type: ignore[type-arg]
            """A span's events: its own, and token events made from figures when read."""

            def __init__(self, events: Any, tokens: list[TokenFigures]) -> None:
                self.dropped = events.dropped
                self._dq = events._dq  # the span's own events (an exception, the user's)
                self._lock = events._lock
                self._tokens = tokens

            def _all(self) -> list[Any]:
                with self._lock:
                    own = list(self._dq)
                token_event = _token_event_class()
                made = [token_event(f) for f in self._tokens]
                if not own:
                    return made
                return sorted([*made, *own], key=lambda e: e.timestamp)  # in time order

            def __len__(self) -> int:
                return len(self._dq) + len(self._tokens)

            def __iter__(self) -> Any:
                return iter(self._all())

            def __getitem__(self, index: Any) -> Any:
                return self._all()[index]

            def __deepcopy__(self, memo: Any) -> Any:
                return BoundedList.from_seq(None, self._all())

            def __repr__(self) -> str:
                return f"{type(self).__name__}({len(self)} events)"

        _EVENTS_CLASS = EventsWithTokens
    return _EVENTS_CLASS(events, tokens)
