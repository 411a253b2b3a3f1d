"""``demo``: an engine on the project's tiny model, a streamed reply, its trace and GPUs."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from ._common import EXIT_OK, add_placement_options, placement_from, resolve, run, server_line

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from ..engine import AsyncEngine
    from ..gpu import GPUSampler
    from ..telemetry import Telemetry

__all__ = ["add_parser", "print_gpus"]

_EPILOG = """\
examples:
  llamatelemetry-async demo
  llamatelemetry-async demo --prompt "The king said" --n-predict 64
  llamatelemetry-async demo --model model.gguf --placement auto
  llamatelemetry-async demo --no-telemetry
"""


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="stream tokens from an engine on the built-in tiny model, with its trace",
        description="Start an engine of llama-servers (by default two CPU servers on the "
        "project's own 360 KB tiny model), stream a completion and a chat reply, then print "
        "each request's trace (recorded with an in-memory OpenTelemetry exporter) and, when "
        "NVML works, what the GPUs did.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--model",
        help="a .gguf path, owner/repo:file.gguf or a registry name "
        "(default: the project's own tiny model)",
    )
    demo.add_argument("--prompt", default="Once upon a time", help="the completion prompt")
    demo.add_argument("--n-predict", type=int, default=48, metavar="N", help="tokens per reply")
    demo.add_argument(
        "--no-telemetry",
        dest="telemetry",
        action="store_false",
        help="do not record traces (no summary is printed)",
    )
    add_placement_options(demo, default="cpu:2")
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from ..testing import write_tiny_model

    with tempfile.TemporaryDirectory(prefix="llamatelemetry-demo-") as tmp:
        tiny = None if args.model else write_tiny_model(Path(tmp) / "tiny.gguf")
        run(lambda a: _engine_demo(a, tiny), args)
    return EXIT_OK


async def _engine_demo(args: argparse.Namespace, tiny: Path | None) -> None:
    from ..engine import AsyncEngine
    from ..server import ServerConfig

    if tiny is not None:
        model = tiny
        print(f"model: {model} (the project's own tiny model)")
    else:
        model = await resolve(args.model)
        print(f"model: {model}")
    telemetry, exporter = await _in_memory_telemetry(args) if args.telemetry else (None, None)
    config = ServerConfig(
        ctx_size=args.ctx_size, n_parallel=args.parallel, n_gpu_layers=args.n_gpu_layers
    )
    try:
        async with AsyncEngine(
            model,
            placement=placement_from(args),
            server=config,
            binary=args.llama_server,
            log_dir=args.log_dir,
            telemetry=telemetry if telemetry is not None else False,
            gpu_sampler=True,  # without NVML it only records why, and costs nothing
        ) as engine:
            for info in engine.servers:
                print(server_line(info))
            await _requests(engine, args)
            await _front_door(engine, args)
            if engine.gpu_sampler is not None:
                await print_gpus(engine.gpu_sampler)
        if telemetry is not None and exporter is not None:
            await anyio.to_thread.run_sync(telemetry.force_flush)  # spans leave in batches
            _print_trace(exporter.get_finished_spans())
    finally:
        if telemetry is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(telemetry.shutdown)


async def _requests(engine: AsyncEngine, args: argparse.Namespace) -> None:
    print(f"\n/completion  prompt={args.prompt!r}\n")
    start = time.perf_counter()
    first: float | None = None
    async with engine.stream(args.prompt, n_predict=args.n_predict, seed=42) as stream:
        async for chunk in stream:
            first = first or time.perf_counter() - start
            print(chunk.text, end="", flush=True)
    print(f"\n\n  finish_reason={stream.finish_reason}  usage={stream.usage}")
    if stream.timings and first is not None:
        t = stream.timings
        print(
            f"  first token after {first * 1e3:.1f} ms; server: prompt {t.prompt_ms:.1f} ms, "
            f"{t.predicted_n} tokens at {t.predicted_per_second:.0f} tok/s"
        )

    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    print("\n/v1/chat/completions  messages=" + repr(messages) + "\n")
    async with engine.stream_chat(messages, max_tokens=args.n_predict, seed=42) as chat:
        async for chat_chunk in chat:
            print(chat_chunk.text, end="", flush=True)
    print(f"\n\n  finish_reason={chat.finish_reason}  usage={chat.usage}")
    served = ", ".join(f"{s.name}: {s.served}" for s in engine.servers)
    print(f"\nrequests served per server: {served}")


async def _front_door(engine: AsyncEngine, args: argparse.Namespace) -> None:
    """The same engine behind its front door: one OpenAI-style stream over HTTP."""
    import json
    import secrets

    import httpx

    from ..frontdoor import FrontDoor
    from ._door import listen, serving

    key = secrets.token_urlsafe(16)
    door = FrontDoor(engine, api_keys=[key])  # the engine runs already: the door uses it
    sock = listen("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    body = {
        "messages": [{"role": "user", "content": "Tell me a story about a dog."}],
        "max_tokens": args.n_predict,
        "seed": 42,
        "stream": True,
    }
    print(f"\nfront door: {url}/v1  (one OpenAI-compatible URL for every server)")
    print("POST /v1/chat/completions  stream=true, through HTTP and the engine's router\n")
    events = 0
    final: dict[str, Any] = {}
    with sock:
        async with (
            serving(door, sock),
            door,
            httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}) as http,
        ):
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    events += 1
                    final = json.loads(line.removeprefix("data: "))
                    for choice in final.get("choices", []):
                        print(choice.get("delta", {}).get("content") or "", end="", flush=True)
            health = (await http.get("/health")).status_code
    print(f"\n\n  {events} SSE events relayed; final chunk usage={final.get('usage')}")
    print(f"  GET /health -> {health}")


async def _in_memory_telemetry(
    args: argparse.Namespace,
) -> tuple[Telemetry, InMemorySpanExporter]:
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from ..telemetry import setup_telemetry

    exporter = InMemorySpanExporter()

    def setup() -> Telemetry:
        return setup_telemetry(
            "llamatelemetry-demo",
            llama_server=args.llama_server,
            span_exporters=[exporter],
            metric_readers=[InMemoryMetricReader()],
        )

    # Blocking: NVML for the resource, `llama-server --version`.
    return await anyio.to_thread.run_sync(setup), exporter


def _print_trace(spans: tuple[ReadableSpan, ...]) -> None:
    print("\ntrace (OpenTelemetry, in-memory exporter):")
    if not spans:
        print("  no spans were recorded")
        return
    names = {span.context.span_id: span.name for span in spans if span.context is not None}
    for span in spans:
        attrs = span.attributes or {}
        tokens = [e for e in span.events if e.name == "gen_ai.token"]
        first = tokens[0].attributes if tokens and tokens[0].attributes else {}
        ttft = first.get("gen_ai.token.time_since_start")
        duration = (span.end_time or 0) - (span.start_time or 0)
        line = f"  span {span.name!r}: {len(tokens)} gen_ai.token events"
        if isinstance(ttft, float):
            line += f", TTFT {ttft * 1e3:.1f} ms"
        line += f", {duration / 1e6:.1f} ms in all"
        server = attrs.get("llamatelemetry.server.name")
        if server:
            line += f", server {server}"
        energy = attrs.get("llamatelemetry.gpu.energy_j")
        if isinstance(energy, float):
            line += f", GPU energy {energy:.2f} J"
        parent = names.get(span.parent.span_id) if span.parent is not None else None
        if parent is not None:
            line += f", under {parent!r}"
        print(line)


async def print_gpus(sampler: GPUSampler) -> None:
    """What the GPUs are doing now, or why they are not sampled."""
    from ._gpus import describe_sample

    if not sampler.available:
        reason = (sampler.reason or "").removeprefix("unavailable: ")
        print(f"\nGPUs: not sampled: {reason}")
        return
    print("\nGPUs (NVML, sampled while the engine ran):")
    for sample in (await sampler.sample_now()).values():
        print(f"  {describe_sample(sample)}")
