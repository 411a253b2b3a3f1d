"""GenAI spans, token events and metrics, read back from in-memory exporters and readers,
against the real tiny-model llama-server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from llamatelemetry_async import (
    AsyncEngine,
    AsyncLlamaClient,
    ConnectError,
    HTTPStatusError,
    Placement,
    ReadTimeout,
    StreamError,
    Telemetry,
    TokenEvents,
    setup_telemetry,
)
from llamatelemetry_async.testing._server import RunningServer

pytestmark = pytest.mark.anyio

PROMPT = "Once upon a time"


class Recorder:
    """A ``Telemetry`` with in-memory exporters, and helpers to read what it recorded."""

    def __init__(self, token_events: TokenEvents, capture: bool = False, **kw: Any) -> None:
        self.spans = InMemorySpanExporter()
        self.reader = InMemoryMetricReader()
        self.telemetry: Telemetry = setup_telemetry(
            "test",
            token_events=token_events,
            capture_content=capture,
            span_exporters=[self.spans],
            metric_readers=[self.reader],
            **kw,
        )

    def finished(self) -> list[ReadableSpan]:
        self.telemetry.tracer_provider.force_flush()
        return list(self.spans.get_finished_spans())

    def histogram(self, name: str) -> list[HistogramDataPoint]:
        data = self.reader.get_metrics_data()
        assert data is not None
        points: list[HistogramDataPoint] = []
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == name:
                        points += metric.data.data_points  # type: ignore[arg-type]
        return points

    def metric(self, name: str) -> Any:
        data = self.reader.get_metrics_data()
        assert data is not None
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == name:
                        return metric
        return None


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder(TokenEvents.all())
    yield rec
    rec.telemetry.shutdown()


def _event_values(span: ReadableSpan, key: str) -> list[Any]:
    return [dict(e.attributes or {})[key] for e in span.events]


def _events(span: ReadableSpan) -> list[int]:
    return _event_values(span, "gen_ai.token.index")


async def test_engine_stream_span_follows_genai_conventions(
    tiny_model: Path, recorder: Recorder
) -> None:
    engine = AsyncEngine(tiny_model, placement=Placement.cpu(1), telemetry=recorder.telemetry)
    async with engine, engine.stream(PROMPT, n_predict=200, temperature=0) as stream:
        text = "".join([chunk.text async for chunk in stream])
    [span] = [s for s in recorder.finished() if s.name.startswith("text_completion")]
    assert span.name == f"text_completion {tiny_model.name}"
    assert span.kind is SpanKind.CLIENT
    attrs = dict(span.attributes or {})
    assert attrs["gen_ai.operation.name"] == "text_completion"
    assert attrs["gen_ai.provider.name"] == "llama.cpp"
    assert attrs["gen_ai.request.model"] == tiny_model.name
    assert attrs["gen_ai.request.max_tokens"] == 200
    assert attrs["gen_ai.request.temperature"] == 0
    assert attrs["gen_ai.request.stream"] is True
    assert attrs["gen_ai.usage.output_tokens"] == 200
    assert attrs["gen_ai.usage.input_tokens"] == stream.usage.prompt_tokens  # type: ignore[union-attr]
    assert attrs["gen_ai.response.finish_reasons"] == ("length",)
    assert attrs["server.address"] == "127.0.0.1"
    assert isinstance(attrs["server.port"], int)
    assert attrs["llamatelemetry.server.name"] == "cpu0"
    assert attrs["llamacpp.timings.predicted_n"] == 200
    assert attrs["llamatelemetry.token_events.emitted"] == 200
    assert attrs["llamatelemetry.token_events.dropped"] == 0
    assert span.status.status_code is StatusCode.UNSET
    assert [e.name for e in span.events] == ["gen_ai.token"] * 200
    assert _events(span) == list(range(200))
    since = _event_values(span, "gen_ai.token.time_since_start")
    assert since == sorted(since)
    # Content capture is off: no prompt or completion text anywhere on the span.
    everything = repr(attrs) + repr([e.attributes for e in span.events])
    assert PROMPT not in everything
    assert text.strip()[:20] not in everything


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (TokenEvents.first_last(5), [0, 1, 2, 3, 4, 199]),
        (TokenEvents.every(50), [0, 50, 100, 150, 199]),
        (TokenEvents.all(max_events=64), [*range(63), 199]),
        (TokenEvents.off(), []),
    ],
    ids=["first_last", "every", "all-capped", "off"],
)
async def test_token_event_policies_keep_first_and_last(
    llama_server: RunningServer, policy: TokenEvents, expected: list[int]
) -> None:
    rec = Recorder(policy)
    try:
        client = AsyncLlamaClient(llama_server.url, instrumentation=rec.telemetry.instrumentation)
        async with client, client.stream(PROMPT, n_predict=200) as stream:
            assert len([c async for c in stream]) == 200
        [span] = rec.finished()
        assert _events(span) == expected
        attrs = dict(span.attributes or {})
        assert attrs["llamatelemetry.token_events.policy"] == policy.mode
        assert attrs["llamatelemetry.token_events.emitted"] == len(expected)
        assert attrs["llamatelemetry.token_events.dropped"] == 200 - len(expected)
    finally:
        rec.telemetry.shutdown()


async def test_content_capture_when_asked(llama_server: RunningServer) -> None:
    rec = Recorder(TokenEvents.all(), capture=True)
    try:
        client = AsyncLlamaClient(llama_server.url, instrumentation=rec.telemetry.instrumentation)
        messages = [{"role": "user", "content": "tell me about the cat"}]
        async with client, client.stream_chat(messages, max_tokens=5) as stream:
            tokens = [c.text async for c in stream]
        [span] = rec.finished()
        attrs = dict(span.attributes or {})
        assert span.name == "chat llama.cpp"
        assert "tell me about the cat" in str(attrs["gen_ai.input.messages"])
        assert stream.text in str(attrs["gen_ai.output.messages"])
        assert _event_values(span, "gen_ai.token.text") == tokens
    finally:
        rec.telemetry.shutdown()


@pytest.mark.parametrize("chunk_metrics", ["each", "mean"])
async def test_genai_metrics(llama_server: RunningServer, chunk_metrics: Any) -> None:
    recorder = Recorder(TokenEvents.all(), chunk_metrics=chunk_metrics)
    inst = recorder.telemetry.instrumentation
    async with AsyncLlamaClient(llama_server.url, instrumentation=inst) as client:
        async with client.stream(PROMPT, n_predict=10) as stream:
            chunks = [c async for c in stream]
        whole = await client.completion(PROMPT, n_predict=7)
    [duration] = recorder.histogram("gen_ai.client.operation.duration")
    assert duration.count == 2
    assert recorder.metric("gen_ai.client.operation.duration").unit == "s"
    assert list(duration.explicit_bounds)[:3] == [0.01, 0.02, 0.04]
    usage = {
        p.attributes["gen_ai.token.type"]: p.sum  # type: ignore[index]
        for p in recorder.histogram("gen_ai.client.token.usage")
    }
    assert usage["output"] == 10 + 7
    assert usage["input"] == stream.usage.prompt_tokens + whole.usage.prompt_tokens  # type: ignore[union-attr]
    assert recorder.metric("gen_ai.client.token.usage").unit == "{token}"
    [first] = recorder.histogram("gen_ai.client.operation.time_to_first_chunk")
    assert first.count == 1  # streamed requests only
    [per_chunk] = recorder.histogram("gen_ai.client.operation.time_per_output_chunk")
    assert per_chunk.count == (len(chunks) - 1 if chunk_metrics == "each" else 1)
    [ttft] = recorder.histogram("gen_ai.server.time_to_first_token")
    assert ttft.count == 2
    [tpot] = recorder.histogram("gen_ai.server.time_per_output_token")
    assert tpot.count == 2
    [server_duration] = recorder.histogram("gen_ai.server.request.duration")
    assert server_duration.count == 2
    in_flight = recorder.metric("llamatelemetry.server.requests.in_flight")
    assert [p.value for p in in_flight.data.data_points] == [0]
    recorder.telemetry.shutdown()


async def test_error_spans(
    llama_server: RunningServer, replay_url: str, recorder: Recorder
) -> None:
    inst = recorder.telemetry.instrumentation
    async with AsyncLlamaClient(llama_server.url, instrumentation=inst) as client:
        with pytest.raises(HTTPStatusError):
            await client.chat([], extra_body={"messages": "not a list"})  # the server's 400
        async with client.stream(PROMPT, n_predict=1000) as early:
            await early.__anext__()  # closed early by the caller: not an error
    timeout = httpx.Timeout(5.0, read=0.3)
    async with AsyncLlamaClient(replay_url, instrumentation=inst, timeout=timeout) as replay:
        with pytest.raises(StreamError):
            async for _ in replay.stream("x", _replay_fault="error_event"):
                pass
        with pytest.raises(ReadTimeout):
            async for _ in replay.stream("x", _replay_fault="stall"):
                pass
    async with AsyncLlamaClient("http://127.0.0.1:9", instrumentation=inst) as dead:
        with pytest.raises(ConnectError):
            await dead.completion("x")
    spans = recorder.finished()
    errors = [dict(s.attributes or {}).get("error.type") for s in spans]
    assert errors == ["400", None, "500", "ReadTimeout", "ConnectError"]
    assert [s.status.status_code for s in spans] == [
        StatusCode.ERROR,
        StatusCode.UNSET,
        StatusCode.ERROR,
        StatusCode.ERROR,
        StatusCode.ERROR,
    ]
    assert dict(spans[1].attributes or {})["llamatelemetry.closed_early"] is True
    assert any(e.name == "exception" for e in spans[2].events)
    # Every request left the in-flight counter where it found it.
    in_flight = recorder.metric("llamatelemetry.server.requests.in_flight")
    assert {p.value for p in in_flight.data.data_points} == {0}


async def test_engine_exports_llama_server_metrics_and_nests_http_spans(
    tiny_model: Path,
) -> None:
    rec = Recorder(TokenEvents.all(), instrument_httpx=True)
    try:
        engine = AsyncEngine(tiny_model, placement=Placement.cpu(1), telemetry=rec.telemetry)
        async with engine:
            async with engine.stream(PROMPT, n_predict=4) as stream:
                assert len([c async for c in stream]) == 4
            scraper = engine._scraper
            assert scraper is not None
            [(name, client)] = engine._ready_clients()
            # llama-server sends the last event before it releases the slot, and only the
            # release adds the tokens to its counters (a metrics task may run in between,
            # it is allowed while a decode runs): scrape until the release has happened.
            with anyio.fail_after(10):
                while True:
                    await scraper.scrape(name, client)
                    predicted = rec.metric("llamacpp.tokens_predicted_total")
                    [point] = predicted.data.data_points
                    if point.value > 0:
                        break
                    await anyio.sleep(0.01)
        assert point.value >= 4
        assert point.attributes == {"llamatelemetry.server.name": "cpu0"}
        spans = rec.finished()
        [request] = [s for s in spans if s.name.startswith("text_completion")]
        http = [s for s in spans if s.name == "POST"]
        assert http, [s.name for s in spans]
        assert http[0].parent is not None
        assert http[0].parent.span_id == request.context.span_id
    finally:
        rec.telemetry.shutdown()


async def test_no_telemetry_configured_costs_nothing(tiny_model: Path) -> None:
    engine = AsyncEngine(tiny_model, placement=Placement.cpu(1))
    assert engine.instrumentation is None  # no global provider was set by this process
    assert engine._scraper is None
    async with engine, engine.stream(PROMPT, n_predict=2) as stream:
        assert stream._observer is None
        assert len([c async for c in stream]) == 2


def test_gpu_resource_attributes_from_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    from llamatelemetry_async.telemetry import gpu_resource_attributes

    class NVMLError(Exception):
        pass

    fake = types.ModuleType("pynvml")
    calls: list[str] = []
    fake.NVMLError = NVMLError  # type: ignore[attr-defined]
    fake.nvmlInit = lambda: calls.append("init")  # type: ignore[attr-defined]
    fake.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    fake.nvmlDeviceGetCount = lambda: 2  # type: ignore[attr-defined]
    fake.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    fake.nvmlDeviceGetName = lambda h: b"Tesla T4"  # type: ignore[attr-defined]
    fake.nvmlDeviceGetCudaComputeCapability = lambda h: (7, 5)  # type: ignore[attr-defined]
    fake.nvmlSystemGetDriverVersion = lambda: "580.159.04"  # type: ignore[attr-defined]

    def no_cuda() -> int:
        raise NVMLError("Not Supported")

    fake.nvmlSystemGetCudaDriverVersion = no_cuda  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    attrs = gpu_resource_attributes()
    assert attrs == {
        "gpu.count": 2,
        "gpu.names": ["Tesla T4", "Tesla T4"],
        "gpu.compute_capabilities": ["7.5", "7.5"],
        "gpu.driver.version": "580.159.04",
    }  # a metric NVML does not support is left out, not an error
    assert calls == ["init", "shutdown"]


def test_gpu_resource_attributes_without_a_driver() -> None:
    from llamatelemetry_async.telemetry import gpu_resource_attributes

    # This machine has the NVML bindings but no driver: the resource says nothing of GPUs.
    assert gpu_resource_attributes() == {}
