"""Telemetry leaving the process: through the real OTLP HTTP exporter into a loopback
receiver that decodes the protobuf, and into a real trace backend, Arize Phoenix.

The Phoenix test needs the ``phoenix`` dependency group (``nox -s tests`` installs it); it
fails, rather than skips, without it.
"""

from __future__ import annotations

import ctypes
import gzip
import http.server
import importlib.metadata
import os
import platform
import socket
import sys
import threading
import time
import uuid
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import llamatelemetry_async.nccl
from llamatelemetry_async import AsyncEngine, NCCLNotFoundError, Placement, __version__
from llamatelemetry_async.nccl import decode_version
from llamatelemetry_async.telemetry import Telemetry, TokenEvents, setup_telemetry
from llamatelemetry_async.testing._otlp_grpc import otlp_grpc_collector
from llamatelemetry_async.testing._phoenix import PhoenixServer, run_phoenix

if TYPE_CHECKING:
    from phoenix.client import Client
    from phoenix.client.__generated__ import v1

pytestmark = pytest.mark.anyio

PROMPT = "Once upon a time"
N_TOKENS = 20
# What the GenAI instrumentation records only when content capture is on.
CONTENT_KEYS = {"gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.token.text"}
NCCL_ENV_VAR = "LLAMATELEMETRY_NCCL_LIBRARY"
# What a process resource must never carry: a command line may hold secrets.
COMMAND_LINE_KEYS = {"process.command_args", "process.command_line"}
SECRET = "s3cret-api-key-on-the-command-line"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The engine's own clients take the default path: run each test on both loops."""
    return str(request.param)


# -- a loopback OTLP/HTTP receiver -------------------------------------------------------


@dataclass
class Received:
    path: str
    content_type: str
    body: bytes  # as decoded from any Content-Encoding: the protobuf bytes


@dataclass
class OTLPReceiver:
    """A thread-served OTLP/HTTP endpoint that keeps every export it is sent."""

    url: str
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def exports(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]


def _read_body(handler: http.server.BaseHTTPRequestHandler) -> bytes:
    length = handler.headers.get("Content-Length")
    if length is not None:
        return handler.rfile.read(int(length))
    chunks = []
    while size := int(handler.rfile.readline().split(b";")[0].strip(), 16):
        chunks.append(handler.rfile.read(size))
        handler.rfile.readline()
    handler.rfile.readline()
    return b"".join(chunks)


@pytest.fixture
def otlp_receiver() -> Iterator[OTLPReceiver]:
    responses = {
        "/v1/traces": ExportTraceServiceResponse().SerializeToString(),
        "/v1/metrics": ExportMetricsServiceResponse().SerializeToString(),
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = _read_body(self)
            encoding = self.headers.get("Content-Encoding", "")
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            answer = responses.get(self.path)
            if answer is None:
                self.send_error(404)
                return
            with receiver.lock:
                receiver.received.append(
                    Received(self.path, self.headers.get("Content-Type", ""), body)
                )
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    receiver = OTLPReceiver(f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},
        name="otlp-receiver",
        daemon=True,
    )
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# -- protobuf helpers ---------------------------------------------------------------------


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(v) for v in value.array_value.values)
    if kind == "kvlist_value":
        return _attrs(value.kvlist_value.values)
    return None if kind is None else getattr(value, kind)


def _attrs(pairs: Sequence[KeyValue]) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, tuple):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)


@dataclass
class ArrivedSpan:
    resource: Resource
    scope: str
    span: Span


def _arrived_spans(exports: list[Received]) -> list[ArrivedSpan]:
    return _spans_in([ExportTraceServiceRequest.FromString(export.body) for export in exports])


def _spans_in(requests: Sequence[ExportTraceServiceRequest]) -> list[ArrivedSpan]:
    spans: list[ArrivedSpan] = []
    for request in requests:
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                spans.extend(
                    ArrivedSpan(resource_spans.resource, scope_spans.scope.name, span)
                    for span in scope_spans.spans
                )
    return spans


def _record_spans(telemetry: Telemetry) -> InMemorySpanExporter:
    """What was sent: an in-memory copy of every span, beside the real exporter."""
    sent = InMemorySpanExporter()
    telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(sent))
    return sent


def _the_request_span(sent: InMemorySpanExporter) -> ReadableSpan:
    spans = sent.get_finished_spans()
    assert len(spans) == 1, [s.name for s in spans]
    return spans[0]


def _check_request_span(
    got: ArrivedSpan, reference: ReadableSpan, model: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The request span that arrived is the one sent: ids, times, GenAI attributes and one
    event per token. Returns the span's attributes and its events'."""
    span = got.span

    # The span that arrived is the one sent, byte for byte where it matters.
    assert reference.context is not None
    assert span.trace_id == reference.context.trace_id.to_bytes(16, "big")
    assert span.span_id == reference.context.span_id.to_bytes(8, "big")
    assert span.name == reference.name == f"text_completion {model.name}"
    assert reference.kind is SpanKind.CLIENT
    assert span.kind == Span.SpanKind.SPAN_KIND_CLIENT
    assert span.start_time_unix_nano == reference.start_time
    assert span.end_time_unix_nano == reference.end_time
    assert got.scope == "llamatelemetry_async"
    attrs = _attrs(span.attributes)
    assert attrs == dict(reference.attributes or {})
    assert attrs["gen_ai.operation.name"] == "text_completion"
    assert attrs["gen_ai.provider.name"] == "llama.cpp"
    assert attrs["gen_ai.request.model"] == model.name
    assert attrs["gen_ai.request.max_tokens"] == N_TOKENS
    assert attrs["gen_ai.usage.output_tokens"] == N_TOKENS
    assert attrs["gen_ai.response.finish_reasons"] == ("length",)
    assert attrs["llamatelemetry.token_events.emitted"] == N_TOKENS
    assert attrs["llamatelemetry.token_events.dropped"] == 0
    assert span.dropped_events_count == 0
    assert span.dropped_attributes_count == 0

    # One event per token, in order, as sent.
    events = list(span.events)
    assert [e.name for e in events] == ["gen_ai.token"] * N_TOKENS
    event_attrs = [_attrs(e.attributes) for e in events]
    assert [a["gen_ai.token.index"] for a in event_attrs] == list(range(N_TOKENS))
    assert [(e.name, e.timestamp, dict(e.attributes or {})) for e in reference.events] == [
        (e.name, e.time_unix_nano, a) for e, a in zip(events, event_attrs, strict=True)
    ]
    since_start = [a["gen_ai.token.time_since_start"] for a in event_attrs]
    assert since_start == sorted(since_start)
    assert all(a["gen_ai.token.gap"] >= 0 for a in event_attrs)
    stamps = [e.time_unix_nano for e in events]
    assert stamps == sorted(stamps)
    assert span.start_time_unix_nano <= stamps[0] <= stamps[-1] <= span.end_time_unix_nano
    return attrs, event_attrs


def _check_duration_metric(
    requests: Sequence[ExportMetricsServiceRequest], span_resource: dict[str, Any]
) -> None:
    """One ``gen_ai.client.operation.duration`` histogram with the one request, exported
    under the same resource as the span."""
    durations: list[Metric] = []
    for request in requests:
        for resource_metrics in request.resource_metrics:
            assert _attrs(resource_metrics.resource.attributes) == span_resource
            for scope_metrics in resource_metrics.scope_metrics:
                durations.extend(
                    m for m in scope_metrics.metrics if m.name == "gen_ai.client.operation.duration"
                )
    assert durations, f"no gen_ai.client.operation.duration in {len(requests)} exports"
    duration = durations[0]
    assert duration.unit == "s"
    (point,) = duration.histogram.data_points
    assert point.count == 1
    assert _attrs(point.attributes)["gen_ai.operation.name"] == "text_completion"
    assert 0 < point.sum < 60


async def _stream_once(model: Path, telemetry: Telemetry) -> list[str]:
    async with (
        AsyncEngine(model, placement=Placement.cpu(1), telemetry=telemetry) as engine,
        engine.stream(PROMPT, n_predict=N_TOKENS, temperature=0) as stream,
    ):
        return [chunk.text async for chunk in stream]


# -- end to end through the OTLP HTTP exporter ------------------------------------------


async def test_otlp_http_export_arrives_as_sent(
    tiny_model: Path, otlp_receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", raising=False)
    telemetry = setup_telemetry(
        "export-test",
        endpoint=otlp_receiver.url,
        protocol="http/protobuf",
        token_events=TokenEvents.all(),
        export_interval=60,  # only the explicit flush exports metrics
    )
    sent = _record_spans(telemetry)
    try:
        tokens = await _stream_once(tiny_model, telemetry)
        await anyio.to_thread.run_sync(telemetry.force_flush)
    finally:
        await anyio.to_thread.run_sync(telemetry.shutdown)
    assert len(tokens) == N_TOKENS
    reference = _the_request_span(sent)

    traces = otlp_receiver.exports("/v1/traces")
    assert traces, "no trace export arrived"
    assert {r.content_type for r in traces} == {"application/x-protobuf"}
    arrived = _arrived_spans(traces)
    assert len(arrived) == 1, [a.span.name for a in arrived]
    got = arrived[0]
    attrs, event_attrs = _check_request_span(got, reference, tiny_model)

    resource = _attrs(got.resource.attributes)
    assert resource["service.name"] == "export-test"
    assert resource["llamatelemetry_async.version"] == __version__

    # Metrics: the client's operation duration came through the metric exporter too.
    _check_duration_metric(
        [
            ExportMetricsServiceRequest.FromString(export.body)
            for export in otlp_receiver.exports("/v1/metrics")
        ],
        resource,
    )

    # Content capture is off by default: neither the prompt nor the completion went out.
    completion = "".join(tokens)
    assert len(completion.strip()) > 10
    everything = b"".join(r.body for r in otlp_receiver.received)
    assert PROMPT.encode() not in everything
    assert completion.encode() not in everything
    assert completion.strip().encode() not in everything
    assert not CONTENT_KEYS & attrs.keys()
    assert not any(CONTENT_KEYS & a.keys() for a in event_attrs)
    strings = set(_strings(attrs)) | {s for a in event_attrs for s in _strings(a)}
    assert not strings & set(tokens), strings & set(tokens)


# -- end to end through the OTLP gRPC exporter ------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the exporter is the subject
async def test_otlp_grpc_export_arrives_as_sent(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (
        "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
        "OTEL_EXPORTER_OTLP_INSECURE",  # the collector speaks plaintext
        "OTEL_RESOURCE_ATTRIBUTES",
        "OTEL_SERVICE_NAME",
        NCCL_ENV_VAR,
    ):
        monkeypatch.delenv(name, raising=False)
    with otlp_grpc_collector() as collector:
        telemetry = setup_telemetry(
            "grpc-export-test",
            endpoint=collector.endpoint,
            protocol="grpc",
            token_events=TokenEvents.all(),
            export_interval=60,  # only the explicit flush exports metrics
        )
        sent = _record_spans(telemetry)
        try:
            tokens = await _stream_once(tiny_model, telemetry)
            # The exporters' Export calls are blocking unary RPCs: once the flush returns,
            # the collector has stored what it answered.
            assert await anyio.to_thread.run_sync(telemetry.tracer_provider.force_flush)
            assert await anyio.to_thread.run_sync(telemetry.meter_provider.force_flush)
        finally:
            await anyio.to_thread.run_sync(telemetry.shutdown)
        trace_requests = collector.trace_requests()
        metrics_requests = collector.metrics_requests()
    assert len(tokens) == N_TOKENS
    reference = _the_request_span(sent)

    arrived = _spans_in(trace_requests)
    assert len(arrived) == 1, [a.span.name for a in arrived]
    got = arrived[0]
    _check_request_span(got, reference, tiny_model)

    # The resource arrived whole: exactly the one the provider holds, and what it says is
    # true of this process, this host and the NCCL library the wheel installed.
    resource = _attrs(got.resource.attributes)
    assert resource == dict(telemetry.tracer_provider.resource.attributes)
    assert resource["service.name"] == "grpc-export-test"
    uuid.UUID(resource["service.instance.id"])
    assert resource["host.name"] == socket.gethostname()
    assert resource["process.pid"] == os.getpid()
    assert resource["process.executable.path"] == sys.executable
    assert resource["llamatelemetry_async.version"] == __version__
    assert resource["nccl.version"] == _nccl_wheel_version()
    assert not COMMAND_LINE_KEYS & resource.keys()

    _check_duration_metric(metrics_requests, resource)


# -- the resource -------------------------------------------------------------------------


def _nccl_wheel_version() -> str:
    for dist in ("nvidia-nccl-cu12", "nvidia-nccl-cu13"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    pytest.fail("the test group installs nvidia-nccl-cu12; neither NCCL wheel is installed")


def _resource_of(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """The resource one ``setup_telemetry`` builds (no exporters; shut down at once)."""
    telemetry = setup_telemetry(*args, span_exporters=[], metric_readers=[], **kwargs)
    try:
        return dict(telemetry.tracer_provider.resource.attributes)
    finally:
        telemetry.shutdown()


@pytest.fixture
def clean_resource_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_RESOURCE_ATTRIBUTES", "OTEL_SERVICE_NAME", NCCL_ENV_VAR):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("clean_resource_env")
def test_resource_describes_service_host_process_and_nccl(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A command line with a secret on it: the resource must not carry it.
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "app.py", "--api-key", SECRET])
    monkeypatch.setattr(sys, "argv", ["app.py", "--api-key", SECRET])
    resource = _resource_of()

    assert resource["service.name"] == "llamatelemetry_async"
    assert uuid.UUID(resource["service.instance.id"]).version == 4
    assert resource["telemetry.sdk.language"] == "python"
    assert resource["llamatelemetry_async.version"] == __version__
    assert resource["host.name"] == socket.gethostname()
    # The conventions' spelling, not platform.machine()'s ("x86_64", "aarch64").
    semconv_arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
    assert resource["host.arch"] == semconv_arch.get(platform.machine(), platform.machine())
    assert resource["os.type"] == platform.system().lower()
    assert resource["process.pid"] == os.getpid()
    assert resource["process.executable.path"] == sys.executable
    assert resource["process.executable.name"] == os.path.basename(sys.executable)
    assert resource["process.runtime.name"] == sys.implementation.name
    assert resource["process.runtime.version"].startswith(
        f"{sys.version_info.major}.{sys.version_info.minor}."
    )
    assert not COMMAND_LINE_KEYS & resource.keys()
    assert not any(SECRET in text for value in resource.values() for text in _strings(value)), (
        resource
    )

    # NCCL: the wheel's library, and its version as the library itself reports it, asked
    # here through plain ctypes rather than the package's binding.
    library = Path(resource["nccl.library"])
    assert library.is_file()
    assert library.parent.as_posix().endswith("nvidia/nccl/lib"), library
    code = ctypes.c_int()
    assert ctypes.CDLL(str(library)).ncclGetVersion(ctypes.byref(code)) == 0
    assert resource["nccl.version"] == decode_version(code.value) == _nccl_wheel_version()


@pytest.mark.usefixtures("clean_resource_env")
def test_service_instance_id_is_fresh_per_setup() -> None:
    first = _resource_of()["service.instance.id"]
    second = _resource_of()["service.instance.id"]
    assert first != second
    given = _resource_of(resource_attributes={"service.instance.id": "pod-7"})
    assert given["service.instance.id"] == "pod-7"


@pytest.mark.usefixtures("clean_resource_env")
def test_user_attributes_win_over_detected_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "OTEL_RESOURCE_ATTRIBUTES",
        "host.name=env-host,process.runtime.name=env-runtime,nccl.version=0.0.env,"
        "service.instance.id=env-instance,deployment.environment.name=staging",
    )
    monkeypatch.setenv("OTEL_SERVICE_NAME", "env-service")
    resource = _resource_of(
        resource_attributes={"host.name": "explicit-host", "team": "infra", "host.arch": None}
    )
    # OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME win over what is detected ...
    assert resource["service.name"] == "env-service"
    assert resource["process.runtime.name"] == "env-runtime"
    assert resource["nccl.version"] == "0.0.env"
    assert resource["service.instance.id"] == "env-instance"
    assert resource["deployment.environment.name"] == "staging"
    # ... resource_attributes over both (None removes a key) ...
    assert resource["host.name"] == "explicit-host"
    assert resource["team"] == "infra"
    assert "host.arch" not in resource
    # ... and what is not overridden is still detected.
    assert resource["process.pid"] == os.getpid()
    assert resource["nccl.library"]

    # The service_name argument wins over everything.
    named = _resource_of("arg-service", resource_attributes={"service.name": "attr-service"})
    assert named["service.name"] == "arg-service"
    attr_named = _resource_of(resource_attributes={"service.name": "attr-service"})
    assert attr_named["service.name"] == "attr-service"


@pytest.mark.usefixtures("clean_resource_env")
def test_no_nccl_leaves_the_attributes_out(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_found(path: str | None = None) -> Any:
        raise NCCLNotFoundError("NCCL library not found (test)", searched=["nowhere"])

    monkeypatch.setattr(llamatelemetry_async.nccl, "load", not_found)
    resource = _resource_of("no-nccl")
    assert not [key for key in resource if key.startswith("nccl.")], resource
    assert resource["service.name"] == "no-nccl"
    assert resource["process.pid"] == os.getpid()


# -- a real trace backend: Arize Phoenix -------------------------------------------------


def _import_phoenix_client() -> type[Client]:
    try:
        # Importing phoenix.client imports the whole phoenix package, whose dependencies
        # (ldap3 on pyasn1) warn about their own deprecations at import.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from phoenix.client import Client
    except ImportError as exc:
        pytest.fail(
            "Arize Phoenix is not installed: install the `phoenix` dependency group "
            f"(`pip install --group phoenix`, or run `nox -s tests`): {exc}"
        )
    return Client


@dataclass
class Phoenix:
    url: str
    client: Client
    server: PhoenixServer


@pytest.fixture
def phoenix(tmp_path: Path) -> Iterator[Phoenix]:
    """``phoenix serve`` on free loopback ports, its database in ``tmp_path``."""
    imported: list[type[Client]] = []
    try:
        with run_phoenix(
            tmp_path / "phoenix", while_starting=lambda: imported.append(_import_phoenix_client())
        ) as server:
            print(f"phoenix ready in {server.started_in:.1f} s")
            with httpx.Client(base_url=server.url, timeout=10) as http:
                yield Phoenix(server.url, imported[0](http_client=http), server)
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # Phoenix is the subject, not the loop
async def test_phoenix_receives_the_span_and_its_token_events(
    tiny_model: Path, phoenix: Phoenix, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", raising=False)
    telemetry = setup_telemetry(
        "phoenix-test",
        endpoint=f"{phoenix.url}/v1/traces",
        protocol="http/protobuf",
        token_events=TokenEvents.all(),
        metric_readers=[],  # Phoenix takes traces only (405 on /v1/metrics)
    )
    sent = _record_spans(telemetry)
    try:
        tokens = await _stream_once(tiny_model, telemetry)
        await anyio.to_thread.run_sync(telemetry.force_flush)
    finally:
        await anyio.to_thread.run_sync(telemetry.shutdown)
    assert len(tokens) == N_TOKENS
    reference = _the_request_span(sent)
    assert reference.context is not None
    span_id = format(reference.context.span_id, "016x")
    trace_id = format(reference.context.trace_id, "032x")

    def get_spans() -> list[v1.Span]:
        return phoenix.client.spans.get_spans(project_identifier="default", span_ids=[span_id])

    # Phoenix ingests asynchronously: poll until the span is there.
    deadline = time.monotonic() + 30
    while not (spans := await anyio.to_thread.run_sync(get_spans)):
        if time.monotonic() > deadline:
            pytest.fail(f"span {span_id} not in Phoenix after 30 s:\n{phoenix.server.log_tail()}")
        await anyio.sleep(0.1)
    assert len(spans) == 1, spans
    span = spans[0]
    assert span["name"] == f"text_completion {tiny_model.name}"
    assert span["context"] == {"trace_id": trace_id, "span_id": span_id}
    assert span.get("parent_id") is None
    attrs = span.get("attributes", {})
    assert attrs["gen_ai.operation.name"] == "text_completion"
    assert attrs["gen_ai.provider.name"] == "llama.cpp"
    assert attrs["gen_ai.request.model"] == tiny_model.name
    assert attrs["gen_ai.usage.output_tokens"] == N_TOKENS
    assert attrs["llamatelemetry.token_events.emitted"] == N_TOKENS
    assert not CONTENT_KEYS & attrs.keys()
    events = span.get("events", [])
    assert len(events) == N_TOKENS
    assert {e["name"] for e in events} == {"gen_ai.token"}
    assert [e["attributes"]["gen_ai.token.index"] for e in events] == list(range(N_TOKENS))
    assert all(not CONTENT_KEYS & e["attributes"].keys() for e in events)
