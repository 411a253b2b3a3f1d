"""``setup_telemetry``: tracer and meter providers, exporters, and a GPU-aware resource.

Nothing global changes unless ``set_global=True``. The OTLP exporters read the standard
``OTEL_EXPORTER_OTLP_*`` variables. The resource is built in layers, each winning over the
one before: what the SDK's ``Resource.create`` gives (``telemetry.sdk.*``, any
``OTEL_EXPERIMENTAL_RESOURCE_DETECTORS``), what this module detects (host, OS, process, a
fresh ``service.instance.id``, the library, llama.cpp, GPUs, NCCL), ``OTEL_RESOURCE_ATTRIBUTES``
and ``OTEL_SERVICE_NAME``, ``resource_attributes=``, and last the ``service_name`` argument.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import socket
import sys
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from .._errors import ConfigError
from .._version import __version__
from ._genai import GenAIInstrumentation, TokenEvents

if TYPE_CHECKING:
    # The SDK (~40 ms with its resource detectors) loads when setup_telemetry runs, not on import.
    import httpx
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = ["Telemetry", "gpu_resource_attributes", "setup_telemetry"]

logger = logging.getLogger("llamatelemetry_async.telemetry")

Protocol = Literal["http/protobuf", "grpc", "console"]


@dataclasses.dataclass
class Telemetry:
    """Providers and the GenAI instrumentation built by ``setup_telemetry``.

    Pass it to ``AsyncEngine(telemetry=...)`` or ``AsyncLlamaClient(instrumentation=
    telemetry.instrumentation)``; call ``shutdown()`` (or use it as a context manager) to
    flush what is buffered.
    """

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    instrumentation: GenAIInstrumentation
    instrument_httpx: bool = False

    def force_flush(self) -> None:
        """Export what is buffered now, keeping the exporters running (blocking)."""
        self.tracer_provider.force_flush()
        self.meter_provider.force_flush()

    def shutdown(self) -> None:
        """Flush and stop the exporters (blocking: run it off the loop in async code)."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def httpx_client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An httpx client on the O(1) transport, instrumented with OpenTelemetry's httpx
        instrumentation under this telemetry's tracer provider."""
        import httpx
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        from ..client import LlamaTransport

        client = httpx.AsyncClient(transport=LlamaTransport(), **kwargs)
        HTTPXClientInstrumentor.instrument_client(
            client, tracer_provider=self.tracer_provider, meter_provider=self.meter_provider
        )
        return client


def setup_telemetry(
    service_name: str | None = None,
    *,
    endpoint: str | None = None,
    protocol: Protocol | None = None,
    token_events: TokenEvents | None = None,
    capture_content: bool | None = None,
    chunk_metrics: Literal["each", "mean", "off"] = "mean",
    instrument_httpx: bool = False,
    export_interval: float = 10.0,
    resource_attributes: Mapping[str, Any] | None = None,
    llama_server: str | os.PathLike[str] | None = None,
    span_exporters: Sequence[SpanExporter] | None = None,
    metric_readers: Sequence[MetricReader] | None = None,
    set_global: bool = False,
) -> Telemetry:
    """Build tracer and meter providers that export GenAI telemetry.

    ```python
    telemetry = setup_telemetry("my-service", endpoint="http://127.0.0.1:6006")
    async with AsyncEngine(model, telemetry=telemetry) as engine: ...
    ```

    ``protocol`` is "http/protobuf" (default, or ``OTEL_EXPORTER_OTLP_PROTOCOL``), "grpc"
    or "console". ``endpoint`` is the collector's base URL (``/v1/traces`` and
    ``/v1/metrics`` are appended for HTTP); without it the ``OTEL_EXPORTER_OTLP_*``
    variables decide. ``span_exporters`` and ``metric_readers`` replace the exporters
    (tests use in-memory ones).

    The resource carries ``service.name`` (``service_name``, else ``OTEL_SERVICE_NAME``, else
    "llamatelemetry_async"), a random ``service.instance.id`` per call, ``host.name`` and
    ``host.arch``, ``os.*``, ``process.*`` (pid, executable, runtime; never the command
    line, which may hold secrets), the library version, llama.cpp's build (from
    ``llama_server`` or the binary ``find_llama_server`` finds), the GPUs NVML reports and
    ``nccl.version``/``nccl.library`` when an NCCL library is found. What is not found is
    left out. ``OTEL_RESOURCE_ATTRIBUTES`` wins over what is detected,
    ``resource_attributes`` over both (a key given as ``None`` is left out), and
    ``service_name`` over all. This function blocks briefly (NVML, ``llama-server
    --version``, loading NCCL): call it at start-up, not on the event loop's hot path.
    """
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    token_events = token_events if token_events is not None else TokenEvents.all()
    resource = _resource(service_name, resource_attributes, llama_server)
    # Room for every token event the policy may emit, plus a few of the application's.
    limits = SpanLimits(max_events=token_events.max_events + 32)
    tracer_provider = TracerProvider(resource=resource, span_limits=limits)
    if span_exporters is None:
        span_exporters = [_span_exporter(endpoint, protocol)]
    for exporter in span_exporters:
        tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    if metric_readers is None:
        metric_readers = [
            PeriodicExportingMetricReader(
                _metric_exporter(endpoint, protocol),
                export_interval_millis=export_interval * 1000,
            )
        ]
    meter_provider = MeterProvider(resource=resource, metric_readers=list(metric_readers))
    if set_global:
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
    instrumentation = GenAIInstrumentation(
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        token_events=token_events,
        capture_content=capture_content,
        chunk_metrics=chunk_metrics,
    )
    return Telemetry(tracer_provider, meter_provider, instrumentation, instrument_httpx)


def _protocol(protocol: str | None) -> str:
    value = protocol or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    if value not in ("http/protobuf", "grpc", "console"):
        raise ConfigError(
            f"protocol: {value!r} is not one of 'http/protobuf', 'grpc', 'console'",
            field="protocol",
        )
    return value


def _span_exporter(endpoint: str | None, protocol: str | None) -> SpanExporter:
    kind = _protocol(protocol)
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if kind == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HTTPSpanExporter,
    )

    return HTTPSpanExporter(endpoint=_join(endpoint, "/v1/traces"))


def _metric_exporter(endpoint: str | None, protocol: str | None) -> Any:
    kind = _protocol(protocol)
    if kind == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter()
    if kind == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HTTPMetricExporter,
    )

    return HTTPMetricExporter(endpoint=_join(endpoint, "/v1/metrics"))


def _join(endpoint: str | None, path: str) -> str | None:
    if endpoint is None:
        return None  # the exporter reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT itself
    return endpoint if endpoint.rstrip("/").endswith(path) else endpoint.rstrip("/") + path


_DEFAULT_SERVICE_NAME = "llamatelemetry_async"
# The process detector's opt-in keys: a command line may carry tokens, keys and passwords.
_COMMAND_LINE_KEYS = ("process.command_args", "process.command_line")


def _resource(
    service_name: str | None,
    resource_attributes: Mapping[str, Any] | None,
    llama_server: str | os.PathLike[str] | None,
) -> Resource:
    """The resource, in layers (later wins): the SDK's default, detected, environment,
    ``resource_attributes``, ``service_name``."""
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource

    detected: dict[str, Any] = {
        "service.name": _DEFAULT_SERVICE_NAME,
        # Per setup, not per process: two setups in one process export separate metric
        # streams, which must not look like one instance's to a backend.
        "service.instance.id": str(uuid.uuid4()),
        **_host_attributes(),
        **_os_attributes(),
        **_process_attributes(),
        "llamatelemetry_async.version": __version__,
        **_llama_cpp_attributes(llama_server),
        **gpu_resource_attributes(),
        **_nccl_attributes(),
    }
    given = dict(resource_attributes or {})
    removed = {key for key, value in given.items() if value is None}
    explicit = {key: value for key, value in given.items() if value is not None}
    if service_name:
        explicit["service.name"] = service_name
    # Resource.create adds telemetry.sdk.*, the SDK's own detectors and the environment
    # (whose service.name and service.instance.id would otherwise beat ours); the
    # environment is merged again over what we detected, so the user's word wins.
    merged = (
        Resource.create({})
        .merge(Resource(detected))
        .merge(OTELResourceDetector().detect())
        .merge(Resource(explicit))
    )
    if not removed:
        return merged
    kept = {key: value for key, value in merged.attributes.items() if key not in removed}
    return Resource(kept, merged.schema_url)


# platform.machine() spellings -> the semantic conventions' host.arch values.
_HOST_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "i386": "x86",
    "i686": "x86",
    "x86": "x86",
    "armv6l": "arm32",
    "armv7l": "arm32",
    "arm": "arm32",
    "ppc": "ppc32",
    "ppc64": "ppc64",
    "ppc64le": "ppc64",
    "s390x": "s390x",
    "ia64": "ia64",
}


def _host_attributes() -> dict[str, Any]:
    # The SDK's host detector is private, reads a machine id and reports platform.machine()
    # as is ("x86_64"); the conventions say "amd64".
    attrs: dict[str, Any] = {}
    try:
        attrs["host.name"] = socket.gethostname()
    except OSError as exc:
        logger.debug("no host.name for the resource: %s", exc)
    if machine := platform.machine():
        attrs["host.arch"] = _HOST_ARCH.get(machine.lower(), machine.lower())
    return attrs


def _os_attributes() -> dict[str, Any]:
    from opentelemetry.sdk.resources import OsResourceDetector

    try:
        return dict(OsResourceDetector().detect().attributes)
    except Exception as exc:  # a detector's failure only makes the resource say less
        logger.debug("no os.* for the resource: %s", exc)
        return {}


def _process_attributes() -> dict[str, Any]:
    """The SDK's process detector, without the command line (older SDKs always add it,
    newer ones on request)."""
    from opentelemetry.sdk.resources import ProcessResourceDetector

    try:
        try:
            detector = ProcessResourceDetector(include_command_args=False)
        except TypeError:  # an SDK without the option
            detector = ProcessResourceDetector()
        attrs = dict(detector.detect().attributes)
    except Exception as exc:  # e.g. psutil's username() for a uid with no passwd entry
        logger.debug("process detector failed, using the basics: %s", exc)
        attrs = _basic_process_attributes()
    for key in _COMMAND_LINE_KEYS:
        attrs.pop(key, None)
    return attrs


def _basic_process_attributes() -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "process.pid": os.getpid(),
        "process.runtime.name": sys.implementation.name,
        "process.runtime.version": platform.python_version(),
    }
    if sys.executable:
        attrs["process.executable.path"] = sys.executable
        attrs["process.executable.name"] = os.path.basename(sys.executable)
    return attrs


def _nccl_attributes() -> dict[str, Any]:
    """``nccl.version`` (what the library's ``ncclGetVersion`` says) and ``nccl.library``
    (its path) for the NCCL library ``llamatelemetry_async.nccl.load()`` finds; empty when
    there is none. Loading maps the library without initialising CUDA."""
    from .._errors import NCCLError
    from ..nccl import load

    try:
        library = load()
        return {"nccl.version": library.version(), "nccl.library": str(library.path)}
    except (NCCLError, OSError) as exc:  # NCCLNotFoundError, a broken library, no symbol
        logger.debug("no NCCL for the resource: %s", exc)
        return {}


def _llama_cpp_attributes(binary: str | os.PathLike[str] | None) -> dict[str, Any]:
    from .._errors import LlamaServerError
    from ..server import find_llama_server, llama_server_version

    try:
        path = find_llama_server(binary)
        return {"llamacpp.build": llama_server_version(path), "llamacpp.binary": str(path)}
    except LlamaServerError as exc:  # no binary here: the resource simply says less
        logger.debug("no llama.cpp build for the resource: %s", exc)
        return {}


def gpu_resource_attributes() -> dict[str, Any]:
    """GPU count, names, driver and CUDA version and compute capability, from NVML.

    Empty without a GPU, a driver or the NVML library: a resource that says less is not an
    error. Blocks for NVML's init (~10 ms).
    """
    from ..gpu import read_gpu_inventory

    inventory = read_gpu_inventory()
    if inventory is None:
        logger.debug("NVML unavailable for the resource")
        return {}
    attrs: dict[str, Any] = {"gpu.count": len(inventory.names), "gpu.names": list(inventory.names)}
    if inventory.compute_capabilities:
        attrs["gpu.compute_capabilities"] = list(inventory.compute_capabilities)
    if inventory.driver_version is not None:
        attrs["gpu.driver.version"] = inventory.driver_version
    if inventory.cuda_version is not None:
        attrs["gpu.cuda.version"] = inventory.cuda_version
    return attrs
