"""The OpenTelemetry SDK's private API this package relies on, all of it, in one place.

Two things, both on the SDK's spans (``opentelemetry.sdk.trace.Span``):

- the span's event limit, ``_limits.max_events``: past it the SDK keeps the newest events and
  drops the oldest (the first token), and it exposes the limit nowhere public;
- its event list, ``_events`` (a ``BoundedList``): when a request ends, it is replaced by
  one that also holds the request's token figures (``TokenFigures``: four numbers per event
  in one list) and makes them token events (a subclass of the SDK's public ``Event``) only
  when an exporter reads the span, usually on the batch processor's thread. While a request
  streams, and while its finished span waits for export, a token costs four numbers in a
  list: nothing the garbage collector tracks or counts, no lock, no attribute validation.

``tests/test_telemetry_sdk.py`` fails when an SDK release changes either. At run time a span
without them gets the public ``add_event`` and the SDK's documented default limit.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from itertools import repeat
from typing import Any

from opentelemetry import trace

__all__ = ["SDK_DEFAULT_MAX_EVENTS", "TOKEN_EVENT", "SpanEvents", "TokenFigures", "span_events"]

SDK_DEFAULT_MAX_EVENTS = 128  # OTEL_SPAN_EVENT_COUNT_LIMIT's default
TOKEN_EVENT = "gen_ai.token"

# One token event's figures: first token's index, tokens in the chunk, seconds since the
# request began, seconds since the previous chunk, the chunk's text (None: content capture
# off), the request's start in wall-clock nanoseconds.
Figures = tuple[int, int, float, float, "str | None", int]


class TokenFigures:
    """A request's token events as figures: four numbers per event in one flat list.

    Numbers are objects the garbage collector does not track, so adding an event allocates
    nothing it counts or walks (a tuple per event would count toward every young collection
    and keep the collector running ~70 more times per 50,000 tokens), and reading them back
    converts nothing (an ``array`` would unbox and box every number: measured slower both
    ways). Texts are kept only when content is captured.
    """

    __slots__ = ("numbers", "t0_ns", "texts")

    def __init__(self, t0_ns: int, *, texts: bool = False) -> None:
        # Per event: first token's index and token count (ints), seconds since the start and
        # since the previous chunk (floats).
        self.numbers: list[Any] = []
        self.texts: list[str | None] | None = [] if texts else None
        self.t0_ns = t0_ns

    def add(self, first: int, count: int, since: float, gap: float, text: str | None) -> None:
        """One event (the observer's per-token path inlines this)."""
        self.numbers.extend((first, count, since, gap))
        if self.texts is not None:
            self.texts.append(text)

    def __len__(self) -> int:
        return len(self.numbers) >> 2

    def __iter__(self) -> Iterator[Figures]:
        return iter(self.all())

    def all(self) -> list[Figures]:
        """Each event's figures, in order (read when the span is exported)."""
        numbers = iter(self.numbers)
        texts = self.texts if self.texts is not None else repeat(None)
        t0 = self.t0_ns
        # Four at a time from one iterator; ``texts`` may be endless (``repeat``).
        quads = zip(numbers, numbers, numbers, numbers, strict=False)
        return [(f, c, s, g, text, t0) for (f, c, s, g), text in zip(quads, texts, strict=False)]


# How a span gets a request's token events: a module-level function, shared by every request
# (a closure per request would be three more objects for the collector per span).
AddTokens = Callable[[trace.Span, TokenFigures], None]


class SpanEvents:
    """How to add a request's token events to its span, all at once, and how many events the
    span keeps (``None``: no limit; ``0``: it records nothing)."""

    __slots__ = ("add", "limit", "span")

    def __init__(self, span: trace.Span, add: AddTokens, limit: int | None) -> None:
        self.span = span
        self.add = add
        self.limit = limit

    def add_tokens(self, tokens: TokenFigures) -> None:
        """The token events onto the span (before it ends)."""
        self.add(self.span, tokens)


def token_attributes(figures: Figures) -> dict[str, Any]:
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


def _timestamp(figures: Figures) -> int:
    return figures[5] + int(figures[2] * 1e9)


def span_events(span: trace.Span) -> SpanEvents:
    """The fastest way to add token events to ``span``, and its event limit.

    Never imports the SDK: a span can only be the SDK's once the SDK is loaded, and with the
    API alone (no provider set) loading it would cost ~15 ms for nothing.
    """
    if not span.is_recording():
        return SpanEvents(span, _discard, 0)  # nothing is kept: build no events at all
    if "opentelemetry.sdk.trace" in sys.modules:
        from opentelemetry.sdk.trace import Span
        from opentelemetry.sdk.util import BoundedList

        if isinstance(span, Span):
            limits = getattr(span, "_limits", None)
            if limits is not None and isinstance(getattr(span, "_events", None), BoundedList):
                return SpanEvents(span, _add_private, limits.max_events)  # None: UNSET
            return SpanEvents(span, _add_public, SDK_DEFAULT_MAX_EVENTS)
    return SpanEvents(span, _add_public, None)


def _add_private(span: Any, tokens: TokenFigures) -> None:
    span._events = _events_with_tokens(span._events, tokens)


def _add_public(span: trace.Span, tokens: TokenFigures) -> None:
    for f in tokens:
        span.add_event(TOKEN_EVENT, token_attributes(f), _timestamp(f))


def _discard(span: trace.Span, tokens: TokenFigures) -> None:
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

            def __init__(self, figures: Figures) -> None:
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


def _events_with_tokens(events: Any, tokens: TokenFigures) -> Any:
    """``events`` (a span's ``BoundedList``) with the request's token figures beside it."""
    global _EVENTS_CLASS
    if _EVENTS_CLASS is None:
        from opentelemetry.sdk.util import BoundedList

        class EventsWithTokens(BoundedList):  # type: ignore[type-arg]
            """A span's events: its own, and token events made from figures when read."""

            def __init__(self, events: Any, tokens: TokenFigures) -> None:
                self.dropped = events.dropped
                self._dq = events._dq  # the span's own events (an exception, the user's)
                self._lock = events._lock
                self._tokens = tokens

            def _all(self) -> list[Any]:
                with self._lock:
                    own = list(self._dq)
                token_event = _token_event_class()
                made = [token_event(f) for f in self._tokens.all()]
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
