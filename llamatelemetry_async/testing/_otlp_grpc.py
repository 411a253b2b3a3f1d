"""A tiny real OTLP/gRPC collector for tests: what the OTLP gRPC exporters send, kept.

```python
with otlp_grpc_collector() as collector:
    telemetry = setup_telemetry(endpoint=collector.endpoint, protocol="grpc")
    ...
    telemetry.shutdown()
    requests = collector.trace_requests()  # ExportTraceServiceRequest, as they arrived
```

It is ``grpc.server`` on ``127.0.0.1`` (a free port, plaintext: the exporter picks an insecure
channel for an ``http://`` endpoint) serving the collector's ``TraceService/Export`` and
``MetricsService/Export``, each decoded into its protobuf request and stored, and answered
with an empty (full success) response. Nothing here retries, batches or drops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc  # type: ignore[import-untyped]  # grpcio ships no type information
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

__all__ = ["OTLPGrpcCollector", "otlp_grpc_collector"]


@dataclasses.dataclass
class OTLPGrpcCollector:
    """What a running collector received; ``endpoint`` is the URL to give an exporter."""

    endpoint: str
    port: int
    _traces: list[ExportTraceServiceRequest] = dataclasses.field(default_factory=list)
    _metrics: list[ExportMetricsServiceRequest] = dataclasses.field(default_factory=list)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def trace_requests(self) -> list[ExportTraceServiceRequest]:
        """Every ``ExportTraceServiceRequest`` received so far, in arrival order."""
        with self._lock:
            return list(self._traces)

    def metrics_requests(self) -> list[ExportMetricsServiceRequest]:
        """Every ``ExportMetricsServiceRequest`` received so far, in arrival order."""
        with self._lock:
            return list(self._metrics)

    def _add_trace(self, request: ExportTraceServiceRequest) -> None:
        with self._lock:
            self._traces.append(request)

    def _add_metrics(self, request: ExportMetricsServiceRequest) -> None:
        with self._lock:
            self._metrics.append(request)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, collector: OTLPGrpcCollector) -> None:
        self._collector = collector

    def Export(  # the gRPC method's name
        self, request: ExportTraceServiceRequest, context: Any
    ) -> ExportTraceServiceResponse:
        self._collector._add_trace(request)
        return ExportTraceServiceResponse()


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, collector: OTLPGrpcCollector) -> None:
        self._collector = collector

    def Export(  # the gRPC method's name
        self, request: ExportMetricsServiceRequest, context: Any
    ) -> ExportMetricsServiceResponse:
        self._collector._add_metrics(request)
        return ExportMetricsServiceResponse()


@contextlib.contextmanager
def otlp_grpc_collector(host: str = "127.0.0.1") -> Iterator[OTLPGrpcCollector]:
    """Serve OTLP/gRPC on ``host`` at a free port until the block exits; yield the collector.

    The exit stops the server at once (in-flight calls are cancelled): flush or shut the
    exporters down inside the block.
    """
    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp-grpc-collector")
    server = grpc.server(executor)
    try:
        port = server.add_insecure_port(f"{host}:0")
        if not port:
            raise RuntimeError(f"gRPC could not bind {host}:0")
        collector = OTLPGrpcCollector(endpoint=f"http://{host}:{port}", port=port)
        # The generated *_pb2_grpc modules are untyped.
        add_trace = trace_service_pb2_grpc.add_TraceServiceServicer_to_server
        add_metrics = metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server
        add_trace(_TraceService(collector), server)  # type: ignore[no-untyped-call]
        add_metrics(_MetricsService(collector), server)  # type: ignore[no-untyped-call]
        server.start()
        yield collector
    finally:
        server.stop(grace=None).wait(10)
        executor.shutdown(wait=True, cancel_futures=True)
