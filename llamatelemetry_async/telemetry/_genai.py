"""GenAI spans, per-token span events and GenAI metrics for each request.

``GenAIInstrumentation`` implements the client's ``Instrumentation`` hook. One span per
request, named ``{gen_ai.operation.name} {gen_ai.request.model}``, kind CLIENT, with the
GenAI semantic-convention attributes, llama.cpp's ``timings`` and the serving server. Each
token can become a span event (see ``TokenEvents``); prompt and completion text are
recorded only when content capture is on
(``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import anyio
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode

from .._errors import ConfigError, LlamaWarning
from .._version import __version__
from ._sdk import TokenFigures, span_events

if TYPE_CHECKING:
    from ..client import Outcome

__all__ = [
    "ContentCapture",
    "GenAIInstrumentation",
    "TokenEvents",
    "capture_content_from_env",
    "latest_experimental",
]

PROVIDER = "llama.cpp"
_SCOPE = "llamatelemetry_async"

# Bucket boundaries the GenAI semantic conventions give for each histogram.
_DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                     40.96, 81.92]  # fmt: skip
_TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                  16777216, 67108864]  # fmt: skip
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0]  # fmt: skip
_TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]

# Operations that read input and generate no tokens.
_NO_OUTPUT = frozenset({"embeddings", "rerank"})
# Where a request's input text is (completions, infill, embeddings), first found wins.
_INPUT_KEYS = ("prompt", "input_prefix", "input", "content")

# Request parameters -> gen_ai.request.* attributes (llama.cpp and OpenAI spellings).
_REQUEST_PARAMS: dict[str, str] = {
    "n_predict": "gen_ai.request.max_tokens",
    "max_tokens": "gen_ai.request.max_tokens",
    "max_completion_tokens": "gen_ai.request.max_tokens",
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "top_k": "gen_ai.request.top_k",
    "seed": "gen_ai.request.seed",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
}


ContentCapture = Literal["none", "span", "event", "span_and_event"]
"""Where prompt and completion text go: nowhere, the span (attributes, and each token
event's text), an event (``gen_ai.client.inference.operation.details``, a log record), or
both."""

_CONTENT_MODES: dict[str, ContentCapture] = {
    "NO_CONTENT": "none",
    "SPAN_ONLY": "span",
    "EVENT_ONLY": "event",
    "SPAN_AND_EVENT": "span_and_event",
}
_DETAILS_EVENT = "gen_ai.client.inference.operation.details"


def latest_experimental() -> bool:
    """``OTEL_SEMCONV_STABILITY_OPT_IN`` lists ``gen_ai_latest_experimental``."""
    opted = os.environ.get("OTEL_SEMCONV_STABILITY_OPT_IN", "")
    return "gen_ai_latest_experimental" in {v.strip().lower() for v in opted.split(",")}


def capture_content_from_env() -> ContentCapture:
    """``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``, read as OpenTelemetry's GenAI
    instrumentations read it: a mode (``NO_CONTENT``, ``SPAN_ONLY``, ``EVENT_ONLY``,
    ``SPAN_AND_EVENT``) under ``OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental``,
    else a boolean (true: on the span)."""
    value = os.environ.get("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "").strip()
    if latest_experimental():
        mode = _CONTENT_MODES.get(value.upper())
        if mode is None and value:
            warnings.warn(
                f"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT={value!r} is not one of "
                f"{', '.join(_CONTENT_MODES)}: no content is captured",
                LlamaWarning,
                stacklevel=2,
            )
        return mode or "none"
    return "span" if value.lower() in ("1", "true", "yes", "on") else "none"


def _content_mode(value: bool | str | None) -> ContentCapture:
    if value is None:
        return capture_content_from_env()
    if value is True or value is False:
        return "span" if value else "none"
    if value not in ("none", "span", "event", "span_and_event"):
        raise ConfigError(
            "capture_content must be True, False, 'none', 'span', 'event' or "
            f"'span_and_event', got {value!r}",
            field="capture_content",
        )
    return value  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class TokenEvents:
    """Which tokens become span events. The first and last token are always kept.

    - ``TokenEvents.all()``: every token, up to ``max_events`` per span;
    - ``TokenEvents.first_last(n)``: the first ``n`` tokens and the last;
    - ``TokenEvents.every(k)``: every k-th token (and the first and last);
    - ``TokenEvents.off()``: none (the span still carries counts and timings).

    Events follow tokens, not chunks: ``gen_ai.token.index`` is the index of the event's
    first token and ``gen_ai.token.count`` how many tokens its chunk carried (llama-server
    sends several at once after a held-back UTF-8 sequence or a partial stop word).

    OpenTelemetry's SDK keeps 128 events per span by default and silently drops the
    *oldest*. The policy fits the limit of the span it writes into, whatever provider made
    it (``setup_telemetry`` raises it to ``max_events``; an application's own provider, or
    ``OTEL_SPAN_EVENT_COUNT_LIMIT``, may not): it emits at most the limit less one (room for
    an exception event), and always keeps the first and the last token. The span records
    the tokens that events cover (``emitted``) and those they do not (``dropped``): the two
    add up to ``gen_ai.usage.output_tokens``.

    ```python
    telemetry = setup_telemetry("my-service", token_events=TokenEvents.first_last(32))
    ```
    """

    mode: Literal["all", "first_last", "every", "off"] = "all"
    n: int = 0
    k: int = 1
    max_events: int = 4096

    @classmethod
    def all(cls, max_events: int = 4096) -> TokenEvents:
        """Every token, up to ``max_events`` per span (the last token is always kept)."""
        return cls("all", max_events=max_events)

    @classmethod
    def first_last(cls, n: int = 16) -> TokenEvents:
        """The first ``n`` tokens, then only the last one."""
        return cls("first_last", n=n, max_events=n + 1)

    @classmethod
    def every(cls, k: int, max_events: int = 4096) -> TokenEvents:
        """Tokens 0, k, 2k, ... and the last one, up to ``max_events`` per span."""
        return cls("every", k=max(1, k), max_events=max_events)

    @classmethod
    def off(cls) -> TokenEvents:
        """No token events; the span still records chunk counts, usage and timings."""
        return cls("off", max_events=0)

    def __post_init__(self) -> None:
        if self.mode != "off" and self.max_events < 2:
            raise ConfigError(
                "max_events must leave room for the first and last token (>= 2)", field="max_events"
            )


class GenAIInstrumentation:
    """Spans, token events and metrics for requests (the client's ``Instrumentation``).

    ``chunk_metrics`` decides ``gen_ai.client.operation.time_per_output_chunk``: the GenAI
    conventions record every gap between chunks ("each"), but one SDK histogram record
    costs ~8 us, as much as the whole client spends per token, so the default records
    each request's mean gap once ("mean"); "off" records none.
    """

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        token_events: TokenEvents | None = None,
        capture_content: bool | ContentCapture | None = None,
        model: str | None = None,
        chunk_metrics: Literal["each", "mean", "off"] = "mean",
        logger_provider: Any = None,
    ) -> None:
        self.tracer = trace.get_tracer(_SCOPE, __version__, tracer_provider=tracer_provider)
        meter = metrics.get_meter(_SCOPE, __version__, meter_provider=meter_provider)
        self.token_events = token_events if token_events is not None else TokenEvents.all()
        self.content: ContentCapture = _content_mode(capture_content)
        self.capture_content = self.content in ("span", "span_and_event")
        """Content on the span: ``gen_ai.input/output.messages`` and each token's text."""
        self.content_logger: Any = None
        if self.content in ("event", "span_and_event"):
            from opentelemetry import _logs  # the Logs API (its module is marked unstable)

            self.content_logger = _logs.get_logger(
                _SCOPE, __version__, logger_provider=logger_provider
            )
        # Before the latest experimental conventions, backends keyed on gen_ai.system.
        self.legacy_names = not latest_experimental()
        self.model = model
        self.chunk_metrics = chunk_metrics
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
        )
        self.first_chunk = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk",
            unit="s",
            description="Time to receive the first chunk of a streamed response.",
            explicit_bucket_boundaries_advisory=_TTFT_BUCKETS,
        )
        self.per_chunk = meter.create_histogram(
            "gen_ai.client.operation.time_per_output_chunk",
            unit="s",
            description="Time between two chunks of a streamed response.",
            explicit_bucket_boundaries_advisory=_TPOT_BUCKETS,
        )
        self.server_ttft = meter.create_histogram(
            "gen_ai.server.time_to_first_token",
            unit="s",
            description="Time to generate the first token (llama.cpp's prompt time).",
            explicit_bucket_boundaries_advisory=_TTFT_BUCKETS,
        )
        self.server_tpot = meter.create_histogram(
            "gen_ai.server.time_per_output_token",
            unit="s",
            description="Time per output token after the first (llama.cpp's timings).",
            explicit_bucket_boundaries_advisory=_TPOT_BUCKETS,
        )
        self.server_duration = meter.create_histogram(
            "gen_ai.server.request.duration",
            unit="s",
            description="Server-side request duration (llama.cpp's prompt + generation time).",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        # Counted here and observed at collection: an SDK record costs ~10 us, twice a request.
        self.in_flight: dict[tuple[tuple[str, Any], ...], int] = {}
        # Metric attribute sets, built once per (operation, model, server, error): a request
        # looks its set up instead of building four dicts (the SDK copies what it records).
        self._metric_sets: dict[tuple[Any, ...], _MetricAttributes] = {}
        meter.create_observable_up_down_counter(
            "llamatelemetry.server.requests.in_flight",
            callbacks=[self._observe_in_flight],
            unit="{request}",
            description="Requests in flight, per server.",
        )

    def _observe_in_flight(self, options: CallbackOptions) -> Iterable[Observation]:
        # list(): a snapshot taken at once (the event loop's thread changes the counts).
        return [Observation(n, dict(key)) for key, n in list(self.in_flight.items())]

    def count_in_flight(self, attributes: Mapping[str, Any], delta: int) -> None:
        """A request on the server ``attributes`` name began (``delta`` 1) or ended (-1)."""
        key = tuple(attributes.items())
        self.in_flight[key] = self.in_flight.get(key, 0) + delta

    def metric_attributes(
        self,
        operation: str,
        model: str,
        server: tuple[tuple[str, Any], ...],
        error_type: str | None = None,
    ) -> _MetricAttributes:
        """The attribute sets a request's metrics carry (shared: never change them)."""
        key = (operation, model, server, error_type)
        found = self._metric_sets.get(key)
        if found is None:
            if len(self._metric_sets) >= _MAX_METRIC_SETS:
                self._metric_sets.clear()  # many models or error types: start afresh
            found = self._metric_sets[key] = _MetricAttributes(*key)
        return found

    def start(self, operation: str, body: Mapping[str, Any], *, stream: bool) -> _Observer:
        """Open one request's span (``operation``: "chat", "text_completion"...).

        The client and the engine call this per request; ``body`` is the request's JSON.
        """
        return _Observer(self, operation, body, stream)


_MAX_METRIC_SETS = 1024


class _MetricAttributes:
    """One request's metric attributes: its operation, model, server and error."""

    __slots__ = ("base", "input", "key", "output")

    def __init__(
        self,
        operation: str,
        model: str,
        server: tuple[tuple[str, Any], ...],
        error_type: str | None,
    ) -> None:
        base: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": PROVIDER,
            "gen_ai.request.model": model,
            **dict(server),
        }
        if error_type is not None:
            base["error.type"] = error_type
        self.base = base
        self.key = tuple(base.items())  # the in-flight count's key
        self.input = {**base, "gen_ai.token.type": "input"}
        self.output = {**base, "gen_ai.token.type": "output"}


class _Observer:
    """One request's span and measurements."""

    __slots__ = (
        "_add_tokens",
        "_attrs",
        "_budget",
        "_chunks",
        "_emitted",
        "_ended",
        "_events",
        "_first",
        "_gaps",
        "_input",
        "_inst",
        "_last",
        "_last_chunk",
        "_model",
        "_numbers",
        "_operation",
        "_server",
        "_server_span_attrs",
        "_start",
        "_stream",
        "_texts",
        "_token_figures",
        "_tokens",
        "span",
    )

    def __init__(
        self, inst: GenAIInstrumentation, operation: str, body: Mapping[str, Any], stream: bool
    ) -> None:
        self._inst = inst
        self._operation = operation
        self._stream = stream
        model = str(body.get("model") or inst.model or PROVIDER)
        self._model = model
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": PROVIDER,
            "gen_ai.request.model": model,
            "gen_ai.request.stream": stream,
        }
        if inst.legacy_names:
            attrs["gen_ai.system"] = PROVIDER
        for key, name in _REQUEST_PARAMS.items():
            value = body.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                attrs[name] = value
        encoding = body.get("encoding_format")
        if isinstance(encoding, str):
            attrs["gen_ai.request.encoding_formats"] = [encoding]
        stop = body.get("stop")
        if isinstance(stop, str):
            attrs["gen_ai.request.stop_sequences"] = [stop]
        elif isinstance(stop, Sequence) and all(isinstance(s, str) for s in stop):
            attrs["gen_ai.request.stop_sequences"] = list(stop)
        self._input = _input_messages(body) if inst.content != "none" else None
        if inst.capture_content:
            attrs["gen_ai.input.messages"] = self._input
        # Kept for the content event only.
        self._attrs = attrs if inst.content_logger is not None else None
        self._server: tuple[tuple[str, Any], ...] = ()  # address and port, once routed
        self._server_span_attrs: dict[str, Any] | None = None  # set with the end's
        self.span = inst.tracer.start_span(
            f"{operation} {model}", kind=SpanKind.CLIENT, attributes=attrs
        )
        events = span_events(self.span)
        self._add_tokens = events.add  # a shared function, not a closure per request
        self._budget = _budget(inst.token_events, events.limit)
        # Token events' figures, added to the span at its end: numbers in one list, nothing
        # per token for the garbage collector; times are the start's plus time since start.
        figures = TokenFigures(time.time_ns(), texts=inst.capture_content)
        self._token_figures = figures
        self._numbers = figures.numbers
        self._texts = figures.texts
        self._start = time.perf_counter()
        self._last = self._start
        self._chunks = 0
        self._tokens = 0  # output tokens so far
        self._events = 0  # token events emitted
        self._emitted = 0  # tokens those events cover
        self._first = 0.0
        # Every gap only when each is recorded; their mean follows from the first and last.
        self._gaps: list[float] | None = [] if inst.chunk_metrics == "each" else None
        self._last_chunk: Any = None
        self._ended = False

    def activate(self) -> contextlib.AbstractContextManager[object]:
        return trace.use_span(self.span, end_on_exit=False)

    def on_server(self, url: str, name: str | None, gpus: tuple[int, ...]) -> None:
        if self._server:  # routed again (a retry elsewhere): the first one is done
            self._count_in_flight(-1)
        parts = urlsplit(url)
        attrs: dict[str, Any] = {}
        if parts.hostname:
            attrs["server.address"] = parts.hostname
        if parts.port:
            attrs["server.port"] = parts.port
        self._server = tuple(attrs.items())
        if name is not None:
            attrs["llamatelemetry.server.name"] = name
        if gpus:
            attrs["llamatelemetry.server.gpus"] = gpus  # the SDK keeps sequences as tuples
        # Set with the end's attributes: one validation pass and lock per span, not two.
        self._server_span_attrs = attrs
        self._count_in_flight(1)

    def _count_in_flight(self, delta: int) -> None:
        in_flight = self._inst.in_flight
        key = self._metric_attributes().key
        in_flight[key] = in_flight.get(key, 0) + delta

    def annotate(self, attributes: Mapping[str, Any]) -> None:
        if not self._ended:
            self.span.set_attributes(attributes)

    def on_chunk(self, chunk: Any) -> None:
        now = time.perf_counter()
        index = self._chunks
        self._chunks = index + 1
        gap = now - self._last
        self._last = now
        if not index:
            self._first = now - self._start
        elif self._gaps is not None:
            self._gaps.append(gap)
        budget = self._budget
        if not budget:
            return
        first = self._tokens
        count = _tokens_in(chunk, first)
        if not count:
            return  # a chunk with no token (the role, the final usage)
        self._tokens = first + count
        policy = self._inst.token_events
        mode = policy.mode
        # Room is kept for the last token, which is only known at the end.
        texts = self._texts
        if self._events < budget - 1 and (
            mode == "all"
            or (mode == "first_last" and first < policy.n)
            # "every": the chunk holds a multiple of k (the first one at or after `first`).
            or (mode == "every" and -(-first // policy.k) * policy.k < first + count)
        ):
            self._numbers.extend((first, count, now - self._start, gap))
            if texts is not None:
                texts.append(chunk.text)
            self._events += 1
            self._emitted += count
            self._last_chunk = None
        else:
            # Not the chunk itself: keeping it alive would keep its objects for the collector.
            text = chunk.text if texts is not None else None
            self._last_chunk = (first, count, now - self._start, gap, text)

    def _add_token_events(self) -> None:
        """The request's token events onto its span, in one go, before it ends."""
        last = self._last_chunk
        if last is not None:
            self._token_figures.add(*last)
            self._events += 1
            self._emitted += last[1]
            self._last_chunk = None
        if self._numbers:
            self._add_tokens(self.span, self._token_figures)
            self._numbers = []  # added once: a second call adds nothing

    def on_end(self, outcome: Outcome) -> None:
        if self._ended:
            return
        span = self.span
        self._add_token_events()
        attrs = self._end_attributes()
        attrs["llamatelemetry.tokens.chunks"] = self._chunks
        if outcome.finish_reason:
            attrs["gen_ai.response.finish_reasons"] = [outcome.finish_reason]
        usage = outcome.usage
        generates = self._operation not in _NO_OUTPUT
        if usage is not None:
            attrs["gen_ai.usage.input_tokens"] = usage.prompt_tokens
            if generates:
                attrs["gen_ai.usage.output_tokens"] = usage.completion_tokens
            # The server's count is the truth (a chunk without a count was taken as one).
            self._tokens = max(self._tokens, usage.completion_tokens)
        timings = outcome.timings
        if timings is not None:
            attrs.update(
                {
                    "llamacpp.timings.prompt_n": timings.prompt_n,
                    "llamacpp.timings.prompt_ms": timings.prompt_ms,
                    "llamacpp.timings.predicted_n": timings.predicted_n,
                    "llamacpp.timings.predicted_ms": timings.predicted_ms,
                    "llamacpp.timings.predicted_per_second": timings.predicted_per_second,
                    "llamacpp.timings.cache_n": timings.cache_n,
                }
            )
        if self._inst.content != "none":
            output = (
                json.dumps(
                    [{"role": "assistant", "parts": [{"type": "text", "content": outcome.text}]}]
                )
                if generates
                else None  # embeddings and rerank scores are not messages
            )
            if self._inst.capture_content and output is not None:
                attrs["gen_ai.output.messages"] = output
            if self._inst.content_logger is not None:
                self._details_event(attrs, output)
        self._count_events(attrs)
        span.set_attributes(attrs)
        self._finish(None, usage, timings)
        span.end()

    def _details_event(self, end_attrs: Mapping[str, Any], output: str | None) -> None:
        """The request's content as an event (a log record in the span's context)."""
        start = self._attrs or {}  # kept whenever there is a content logger
        attrs = {k: v for k, v in start.items() if not k.startswith("gen_ai.input")}
        attrs["gen_ai.input.messages"] = self._input
        if output is not None:
            attrs["gen_ai.output.messages"] = output
        for key in ("gen_ai.response.finish_reasons", "gen_ai.usage.input_tokens",
                    "gen_ai.usage.output_tokens"):  # fmt: skip
            if key in end_attrs:
                attrs[key] = end_attrs[key]
        self._inst.content_logger.emit(
            event_name=_DETAILS_EVENT,
            attributes=attrs,
            context=trace.set_span_in_context(self.span),
        )

    def on_error(self, exc: BaseException | None) -> None:
        if self._ended:
            return
        span = self.span
        self._add_token_events()  # the tokens that came, before the exception's event
        attrs = self._end_attributes()
        self._count_events(attrs)
        if exc is None or isinstance(exc, anyio.get_cancelled_exc_class()):
            attrs["llamatelemetry.closed_early"] = True  # the caller stopped it: not an error
            span.set_attributes(attrs)
            self._finish(None, None, None)
        else:
            error_type = type(exc).__qualname__
            status_code = getattr(exc, "status_code", None)
            attrs["error.type"] = str(status_code) if status_code else error_type
            span.set_attributes(attrs)
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, str(exc)[:500]))
            self._finish(attrs["error.type"], None, None)
        span.end()

    def _end_attributes(self) -> dict[str, Any]:
        """A dict for the span's last attributes, starting with the server's."""
        server = self._server_span_attrs
        return dict(server) if server else {}

    def _count_events(self, attrs: dict[str, Any]) -> None:
        attrs["llamatelemetry.token_events.policy"] = self._inst.token_events.mode
        attrs["llamatelemetry.token_events.events"] = self._events
        attrs["llamatelemetry.token_events.emitted"] = self._emitted
        attrs["llamatelemetry.token_events.dropped"] = self._tokens - self._emitted

    def _metric_attributes(self, error_type: str | None = None) -> _MetricAttributes:
        return self._inst.metric_attributes(self._operation, self._model, self._server, error_type)

    def _finish(self, error_type: str | None, usage: Any, timings: Any) -> None:
        self._ended = True
        inst = self._inst
        now = time.perf_counter()
        sets = self._metric_attributes(error_type)
        attrs = sets.base
        if self._server:
            self._count_in_flight(-1)
        inst.duration.record(now - self._start, attrs)
        if usage is not None:
            inst.token_usage.record(usage.prompt_tokens, sets.input)
            if self._operation not in _NO_OUTPUT:
                inst.token_usage.record(usage.completion_tokens, sets.output)
        if self._stream and self._chunks and error_type is None:
            inst.first_chunk.record(self._first, attrs)
            if self._gaps:
                for gap in self._gaps:  # at the end, off the per-token path; ~8 us per record
                    inst.per_chunk.record(gap, attrs)
            elif self._chunks > 1 and inst.chunk_metrics == "mean":
                span = self._last - self._start - self._first  # first chunk to last
                inst.per_chunk.record(span / (self._chunks - 1), attrs)
        if timings is not None:
            inst.server_ttft.record(timings.prompt_ms / 1000, attrs)
            if timings.predicted_n > 1:
                inst.server_tpot.record(timings.predicted_per_token_ms / 1000, attrs)
            inst.server_duration.record((timings.prompt_ms + timings.predicted_ms) / 1000, attrs)


def _budget(policy: TokenEvents, limit: int | None) -> int:
    """Token events a span may get: the policy's, within what the span keeps, less one event
    of room for an exception (``record_exception``) so that it never pushes token 0 out."""
    if policy.mode == "off":
        return 0
    if limit is None:
        return policy.max_events
    return max(0, min(policy.max_events, limit - 1 if limit > 2 else limit))


def _tokens_in(chunk: Any, before: int) -> int:
    """How many output tokens ``chunk`` adds, ``before`` having come in earlier chunks.

    llama-server counts them in native chunks (``tokens_predicted``) and, when asked with
    ``timings_per_token``, in OpenAI ones (``timings.predicted_n``); otherwise a chunk with
    output is taken as one token (the final usage corrects the total).
    """
    total = getattr(chunk, "tokens_predicted", None)
    if total is None:
        timings = getattr(chunk, "timings", None)
        total = timings.predicted_n if timings is not None else None
    if total:
        return max(0, int(total) - before)
    return 1 if chunk.text or _has_other_output(chunk) else 0


def _has_other_output(chunk: Any) -> bool:
    """Output that is not text: a chat delta's reasoning or tool calls."""
    choices = getattr(chunk, "choices", None)
    if not choices:
        return False
    delta = getattr(choices[0], "delta", None)
    return delta is not None and bool(delta.reasoning_content or delta.tool_calls)


def _input_messages(body: Mapping[str, Any]) -> str:
    """The request's input as GenAI messages: chat messages, a prompt, the texts to embed,
    or a rerank query with its documents."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = [
            {"role": m.get("role"), "parts": [{"type": "text", "content": m.get("content")}]}
            for m in messages
            if isinstance(m, Mapping)
        ]
        return json.dumps(parts, default=str)
    if "query" in body:  # rerank
        texts = [body.get("query"), *(body.get("documents") or ())]
    else:
        text = next((body[k] for k in _INPUT_KEYS if k in body), "")
        texts = text if isinstance(text, list) else [text]
    parts = [{"role": "user", "parts": [{"type": "text", "content": t} for t in texts]}]
    return json.dumps(parts, default=str)
