"""The front door's own telemetry: a SERVER span per request, HTTP server metrics.

The span continues the caller's W3C ``traceparent`` and is current while the engine handles
the request, so the engine's GenAI client span (with its token events) is its child. Both
come from the engine's providers; an engine without telemetry makes this cost nothing.
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import metrics, propagate, trace
from opentelemetry.trace import SpanKind, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._version import __version__
from ..engine import AsyncEngine

__all__ = ["HttpTelemetry"]

_SCOPE = "llamatelemetry_async.frontdoor"
# The HTTP semantic conventions' advisory buckets for http.server.request.duration.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)


class HttpTelemetry:
    """Spans and metrics of the HTTP requests the door serves."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None,
        meter_provider: metrics.MeterProvider | None,
    ) -> None:
        self.tracer = trace.get_tracer(_SCOPE, __version__, tracer_provider=tracer_provider)
        meter = metrics.get_meter(_SCOPE, __version__, meter_provider=meter_provider)
        self.duration = meter.create_histogram(
            "http.server.request.duration",
            unit="s",
            description="Duration of HTTP server requests.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self.active = meter.create_up_down_counter(
            "http.server.active_requests",
            unit="{request}",
            description="Number of active HTTP server requests.",
        )

    @classmethod
    def of(cls, engine: AsyncEngine) -> HttpTelemetry | None:
        """The engine's providers, or ``None`` when the engine observes nothing."""
        if engine.instrumentation is None:
            return None
        telemetry = engine.telemetry
        if telemetry is None:
            return cls(None, None)  # the application's global providers
        return cls(telemetry.tracer_provider, telemetry.meter_provider)

    async def serve(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Run ``app`` for one HTTP request inside its SERVER span."""
        carrier: dict[str, str] = {}
        user_agent = None
        for name, value in scope["headers"]:
            key = name.decode("latin-1")
            carrier[key] = value.decode("latin-1")
            if key == "user-agent":
                user_agent = carrier[key]
        method = scope["method"]
        attrs: dict[str, Any] = {
            "http.request.method": method,
            "url.path": scope["path"],
            "url.scheme": scope.get("scheme", "http"),
            "network.protocol.version": scope.get("http_version", "1.1"),
        }
        if scope.get("server"):
            attrs["server.address"], attrs["server.port"] = scope["server"]
        if scope.get("client"):
            attrs["client.address"], attrs["client.port"] = scope["client"]
        if user_agent is not None:
            attrs["user_agent.original"] = user_agent
        metric_attrs: dict[str, Any] = {
            "http.request.method": method,
            "url.scheme": attrs["url.scheme"],
        }
        span = self.tracer.start_span(
            method, context=propagate.extract(carrier), kind=SpanKind.SERVER, attributes=attrs
        )
        self.active.add(1, metric_attrs)
        start = time.perf_counter()
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        error: str | None = None
        try:
            with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                await app(scope, receive, send_status)
        except BaseException as exc:
            error = type(exc).__qualname__
            span.record_exception(exc)
            raise
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None)
            done: dict[str, Any] = {}
            if template is not None:
                # Mounted in an application: the route includes the mount's prefix (the
                # root path the application added, not one the server was given).
                root, app_root = scope.get("root_path", ""), scope.get("app_root_path", "")
                template = root.removeprefix(app_root) + template
                done["http.route"] = template
                span.update_name(f"{method} {template}")
            if status:
                done["http.response.status_code"] = status
                if status >= 500 and error is None:
                    error = str(status)
            if error is not None:
                done["error.type"] = error
                span.set_status(StatusCode.ERROR)
            span.set_attributes(done)
            span.end()
            self.active.add(-1, metric_attrs)
            self.duration.record(time.perf_counter() - start, {**metric_attrs, **done})
