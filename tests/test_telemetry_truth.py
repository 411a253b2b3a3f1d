"""Token events that tell the truth under any provider: the span's own event limit decides
how many the policy emits, the first and the last token are always kept, events follow
tokens (not chunks), and the span's counts add up to ``gen_ai.usage.output_tokens``."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llamatelemetry_async import (
    AsyncEngine,
    AsyncLlamaClient,
    GenAIInstrumentation,
    Placement,
    Telemetry,
    TokenEvents,
    setup_telemetry,
)
from llamatelemetry_async.client import (
    ChatChunk,
    ChatChunkChoice,
    ChatDelta,
    CompletionChunk,
    Timings,
    Usage,
)
from llamatelemetry_async.testing._server import RunningServer

pytestmark = pytest.mark.anyio

TOKENS = 200
POLICIES = {
    "all": TokenEvents.all(),
    "first_last": TokenEvents.first_last(16),
    "every": TokenEvents.every(7),
    "off": TokenEvents.off(),
}


def app_provider(limit: int | None) -> tuple[TracerProvider, InMemorySpanExporter]:
    """A provider as an application makes its own: SDK defaults, or a smaller event limit."""
    exporter = InMemorySpanExporter()
    provider = (
        TracerProvider(span_limits=SpanLimits(max_events=limit)) if limit else TracerProvider()
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def num(attributes: Any, key: str) -> int:
    value = attributes[key]
    assert isinstance(value, int)
    return value


def check_span(span: ReadableSpan, policy: TokenEvents, limit: int) -> list[int]:
    """The span keeps what it says it keeps; the indices of its token events."""
    attrs = dict(span.attributes or {})
    events = [e for e in span.events if e.name == "gen_ai.token"]
    tokens = num(attrs, "gen_ai.usage.output_tokens")
    assert tokens == TOKENS
    assert span.dropped_events == 0  # the SDK itself dropped nothing
    assert num(attrs, "llamatelemetry.token_events.events") == len(events)
    emitted = num(attrs, "llamatelemetry.token_events.emitted")
    assert emitted == sum(num(e.attributes, "gen_ai.token.count") for e in events)
    assert emitted + num(attrs, "llamatelemetry.token_events.dropped") == tokens
    indices = [num(e.attributes, "gen_ai.token.index") for e in events]
    if policy.mode == "off":
        assert events == []
        return indices
    assert len(events) <= limit - 1  # room for an exception event
    assert indices[0] == 0  # the first token, time to first token
    last = events[-1].attributes
    assert num(last, "gen_ai.token.index") + num(last, "gen_ai.token.count") == tokens
    assert indices == sorted(set(indices))
    if policy.mode == "every":
        assert all(i % policy.k == 0 for i in indices[:-1])
    if policy.mode == "first_last":  # the first n, as the span's room allows
        assert indices[:-1] == list(range(min(policy.n, limit - 2)))
    return indices


@pytest.mark.parametrize("limit", [None, 16], ids=["sdk-default", "limit-16"])
@pytest.mark.parametrize("name", POLICIES)
async def test_a_client_stream_under_the_applications_provider(
    llama_server: RunningServer, name: str, limit: int | None
) -> None:
    policy = POLICIES[name]
    provider, exporter = app_provider(limit)
    inst = GenAIInstrumentation(tracer_provider=provider, token_events=policy)
    async with (
        AsyncLlamaClient(llama_server.url, instrumentation=inst) as client,
        client.stream("Once upon a time", n_predict=TOKENS, ignore_eos=True) as stream,
    ):
        async for _ in stream:
            pass
    [span] = exporter.get_finished_spans()
    indices = check_span(span, policy, limit or 128)
    if name == "all":
        assert len(indices) == min(TOKENS, (limit or 128) - 1)


@pytest.mark.parametrize("name", ["all", "every"])
async def test_an_engine_stream_under_setup_telemetry_and_a_limit_of_16(
    tiny_model: Path, name: str
) -> None:
    policy = POLICIES[name]
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry("test", token_events=policy, span_exporters=[exporter])
    limited, limited_exporter = app_provider(16)
    try:
        for chosen, spans in (
            (telemetry, exporter),
            (
                Telemetry(
                    limited,
                    MeterProvider(),
                    GenAIInstrumentation(tracer_provider=limited, token_events=policy),
                ),
                limited_exporter,
            ),
        ):
            engine = AsyncEngine(tiny_model, placement=Placement.cpu(1), telemetry=chosen)
            async with engine, engine.stream("Once upon a time", n_predict=TOKENS,
                                             ignore_eos=True) as stream:  # fmt: skip
                async for _ in stream:
                    pass
            chosen.tracer_provider.force_flush()
            [span] = [s for s in spans.get_finished_spans() if s.name.startswith("text_")]
            check_span(span, policy, policy.max_events + 32 if chosen is telemetry else 16)
    finally:
        telemetry.shutdown()


_GLOBAL = """
import json, sys, anyio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from llamatelemetry_async import AsyncEngine, AsyncLlamaClient, Placement

exporter = InMemorySpanExporter()
provider = TracerProvider()  # the application's own, SDK default limits (128 events)
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)

async def main():
    async with AsyncEngine(sys.argv[1], placement=Placement.cpu(1)) as engine:
        async with engine.stream("Once upon a time", n_predict=200, ignore_eos=True) as s:
            async for _ in s:
                pass
        url = engine.servers[0].url
    out = []
    for span in exporter.get_finished_spans():
        if span.name.startswith("text_"):
            events = [e for e in span.events if e.name == "gen_ai.token"]
            out.append({"attrs": dict(span.attributes), "dropped": span.dropped_events,
                        "indices": [e.attributes["gen_ai.token.index"] for e in events],
                        "counts": [e.attributes["gen_ai.token.count"] for e in events]})
    print(json.dumps(out))
anyio.run(main)
"""


def test_the_applications_global_provider_with_default_limits(tiny_model: Path) -> None:
    # A process of its own: the global provider can be set once per process.
    result = subprocess.run(
        [sys.executable, "-c", _GLOBAL, str(tiny_model)],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [span] = json.loads(result.stdout.strip().splitlines()[-1])
    attrs: dict[str, Any] = span["attrs"]
    assert span["dropped"] == 0
    assert span["indices"][0] == 0
    assert span["indices"][-1] + span["counts"][-1] == TOKENS
    assert len(span["indices"]) == 127  # 128 less the room for an exception event
    assert (
        attrs["llamatelemetry.token_events.emitted"] + attrs["llamatelemetry.token_events.dropped"]
        == attrs["gen_ai.usage.output_tokens"]
        == TOKENS
    )


@dataclasses.dataclass
class Finished:
    """What a finished stream tells the observer (the ``Outcome`` protocol)."""

    usage: Usage | None
    text: str = ""
    finish_reason: str | None = "length"
    timings: Timings | None = None


@pytest.mark.parametrize("name", ["all", "every", "first_last"])
def test_indices_follow_tokens_when_native_chunks_carry_several(name: str) -> None:
    # llama-server counts the tokens it has sent in every native chunk (tokens_predicted);
    # one chunk may carry several (after a held-back UTF-8 sequence or partial stop word).
    policy = TokenEvents.every(3) if name == "every" else POLICIES[name]
    provider, exporter = app_provider(None)
    inst = GenAIInstrumentation(tracer_provider=provider, token_events=policy)
    observer = inst.start("text_completion", {}, stream=True)
    totals = [1, 3, 4, 7, 7, 9, 12]  # one chunk (the 5th) brings no new token
    for total in totals:
        observer.on_chunk(CompletionChunk(content="x", tokens_predicted=total))
    observer.on_chunk(CompletionChunk(content="", stop=True, tokens_predicted=12))
    observer.on_end(Finished(Usage(5, 12, 17)))
    [span] = exporter.get_finished_spans()
    events = [dict(e.attributes or {}) for e in span.events]
    pairs = [(num(e, "gen_ai.token.index"), num(e, "gen_ai.token.count")) for e in events]
    if name == "all":
        assert pairs == [(0, 1), (1, 2), (3, 1), (4, 3), (7, 2), (9, 3)]
    elif name == "every":  # the chunks that hold token 0, 3, 6 and 9 (the last)
        assert pairs == [(0, 1), (3, 1), (4, 3), (9, 3)]
    attrs = dict(span.attributes or {})
    assert attrs["llamatelemetry.tokens.chunks"] == 8
    emitted = num(attrs, "llamatelemetry.token_events.emitted")
    assert emitted == sum(count for _, count in pairs)
    assert emitted + num(attrs, "llamatelemetry.token_events.dropped") == 12


def test_openai_chunks_without_counts_are_one_token_each_and_usage_settles_the_total() -> None:
    provider, exporter = app_provider(None)
    inst = GenAIInstrumentation(tracer_provider=provider)
    observer = inst.start("chat", {}, stream=True)
    role = ChatChunk(choices=[ChatChunkChoice(delta=ChatDelta(role="assistant"))])
    observer.on_chunk(role)  # no token: no event
    for word in ("a", "b", "c"):
        observer.on_chunk(ChatChunk(choices=[ChatChunkChoice(delta=ChatDelta(content=word))]))
    observer.on_chunk(ChatChunk(usage=Usage(4, 5, 9)))  # the usage chunk: no token
    observer.on_end(Finished(Usage(4, 5, 9)))
    [span] = exporter.get_finished_spans()
    indices = [dict(e.attributes or {})["gen_ai.token.index"] for e in span.events]
    assert indices == [0, 1, 2]
    attrs = dict(span.attributes or {})
    # The server generated 5 tokens in 3 chunks: 2 are not covered by an event, and say so.
    assert attrs["llamatelemetry.token_events.emitted"] == 3
    assert attrs["llamatelemetry.token_events.dropped"] == 2
    assert attrs["gen_ai.usage.output_tokens"] == 5
