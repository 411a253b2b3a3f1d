"""Watch requests live in Arize Phoenix: one trace per request, one event per token.

    pip install arize-phoenix        # or, from a checkout: pip install --group phoenix
    python examples/watch_in_phoenix.py                     # the project's tiny model
    python examples/watch_in_phoenix.py --model model.gguf --n-predict 64
    python examples/watch_in_phoenix.py --phoenix http://127.0.0.1:6006   # a Phoenix you run

Starts ``phoenix serve`` on 127.0.0.1 (offline, its database in a temporary folder) unless
``--phoenix`` names one already running, streams a completion through ``AsyncEngine`` with
telemetry pointed at Phoenix's OTLP/HTTP endpoint, and prints the link to the request's
trace in Phoenix's UI. Phoenix keeps running until Ctrl-C.

``--screenshot docs/phoenix-trace.png`` instead saves that trace view, with its token
events open, as a PNG (headless Chromium, Debian's ``chromium`` package, driven through the
DevTools protocol with the ``websockets`` package that Phoenix's dependencies bring), and
exits: this is how the README's screenshot is made.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llamatelemetry_async import AsyncEngine
from llamatelemetry_async.telemetry import TokenEvents, setup_telemetry
from llamatelemetry_async.testing import write_tiny_model
from llamatelemetry_async.testing._phoenix import run_phoenix


@contextlib.contextmanager
def phoenix_at(port: int, workdir: Path, timeout: float = 120) -> Iterator[str]:
    """``phoenix serve`` until the block ends; yields its URL."""
    try:
        with run_phoenix(workdir, port=port, timeout=timeout) as server:
            print(f"Phoenix {server.url} ready in {server.started_in:.1f} s (log: {server.log})")
            yield server.url
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from exc


async def stream_into_phoenix(
    phoenix: str, model: Path, prompt: str, n_predict: int, placement: str
) -> str:
    """Stream one completion with telemetry exported to Phoenix; return the span's id."""
    telemetry = setup_telemetry(
        "watch-in-phoenix",
        endpoint=f"{phoenix}/v1/traces",
        protocol="http/protobuf",
        token_events=TokenEvents.all(),
        metric_readers=[],  # Phoenix takes traces, not metrics
    )
    spans = InMemorySpanExporter()  # only to learn the request span's id for the link
    telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    try:
        async with AsyncEngine(model, placement=placement, telemetry=telemetry) as engine:
            print(f"\n{prompt}", end="", flush=True)
            async with engine.stream(prompt, n_predict=n_predict, temperature=0) as stream:
                async for chunk in stream:
                    print(chunk.text, end="", flush=True)
            print(f"\n[{stream.usage}]\n")
    finally:
        await anyio.to_thread.run_sync(telemetry.shutdown)  # flushes the span to Phoenix
    (span,) = spans.get_finished_spans()
    assert span.context is not None
    return format(span.context.span_id, "016x")


def wait_for_span(phoenix: str, span_id: str, timeout: float = 30) -> dict[str, Any]:
    """Read the span back through Phoenix's client once Phoenix has ingested it."""
    from phoenix.client import Client

    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=phoenix, timeout=10) as http:
        client = Client(http_client=http)
        while True:
            spans = client.spans.get_spans(project_identifier="default", span_ids=[span_id])
            if spans:
                return dict(spans[0])
            if time.monotonic() > deadline:
                raise SystemExit(f"span {span_id} not in Phoenix after {timeout:.0f} s")
            time.sleep(0.1)


# Open the selected span's Events tab, then its first event.
_OPEN_EVENTS = """(() => {
  const tab = [...document.querySelectorAll('[role=tab]')]
    .find(e => e.textContent.trim().startsWith('Events'));
  if (!tab) return false;
  tab.click();
  return true;
})()"""
_OPEN_FIRST_EVENT = """(() => {
  const rows = [...document.querySelectorAll('button[aria-expanded]')]
    .filter(e => e.textContent.trim().endsWith('gen_ai.token'));
  if (rows.length && rows[0].getAttribute('aria-expanded') === 'false') rows[0].click();
  return rows.length;
})()"""
_SHOWS_EVENT_ATTRIBUTES = "document.body.innerText.includes('gen_ai.token.time_since_start')"


def screenshot(url: str, path: Path, width: int = 1400, height: int = 900) -> None:
    """Save ``url`` as a PNG after opening the span's token events, in headless Chromium."""
    from websockets.sync.client import connect

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("--screenshot needs Chromium: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        argv = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "--remote-debugging-port=0",
            "about:blank",
        ]
        browser = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        try:
            assert browser.stderr is not None
            for line in browser.stderr:
                if match := re.search(r"DevTools listening on (ws://\S+)", line):
                    break
            else:
                raise SystemExit(f"chromium exited ({browser.wait()}) without DevTools")
            with connect(match.group(1), max_size=None) as ws:
                ids = itertools.count(1)

                def call(method: str, session: str | None = None, **params: Any) -> Any:
                    message: dict[str, Any] = {"id": next(ids), "method": method}
                    message["params"] = params
                    if session is not None:
                        message["sessionId"] = session
                    ws.send(json.dumps(message))
                    while True:  # skip events until our answer comes
                        reply = json.loads(ws.recv())
                        if reply.get("id") == message["id"]:
                            if "error" in reply:
                                raise RuntimeError(f"{method}: {reply['error']}")
                            return reply["result"]

                def until(expression: str, session: str, what: str, timeout: float = 30) -> None:
                    deadline = time.monotonic() + timeout
                    while not call(
                        "Runtime.evaluate", session, expression=expression, returnByValue=True
                    )["result"].get("value"):
                        if time.monotonic() > deadline:
                            raise SystemExit(f"{url}: no {what} after {timeout:.0f} s")
                        time.sleep(0.1)

                target = call("Target.createTarget", url="about:blank")["targetId"]
                page = call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
                call(
                    "Emulation.setDeviceMetricsOverride",
                    page,
                    width=width,
                    height=height,
                    deviceScaleFactor=1,
                    mobile=False,
                )
                call("Page.navigate", page, url=url)
                until(_OPEN_EVENTS, page, "Events tab")
                until(_OPEN_FIRST_EVENT, page, "token events")
                until(_SHOWS_EVENT_ATTRIBUTES, page, "event attributes")
                time.sleep(0.5)  # let the expand animation finish before the picture
                png = call("Page.captureScreenshot", page, format="png")["data"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(base64.b64decode(png))
                with contextlib.suppress(Exception):
                    call("Browser.close")
            browser.wait(10)
        finally:
            if browser.poll() is None:
                browser.terminate()
                try:
                    browser.wait(10)
                except subprocess.TimeoutExpired:
                    browser.kill()
                    browser.wait()
    print(f"saved {path} ({path.stat().st_size // 1024} KiB)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, help="a GGUF file (default: the tiny model)")
    parser.add_argument("--placement", default="auto", help="auto, cpu, cuda:0, ...")
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--n-predict", type=int, default=32)
    parser.add_argument("--phoenix", help="a running Phoenix's URL (default: start one)")
    parser.add_argument("--port", type=int, default=6006, help="port for the Phoenix started")
    parser.add_argument("--screenshot", type=Path, help="save the trace view as a PNG, exit")
    args = parser.parse_args(argv)

    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        model = args.model or write_tiny_model(workdir / "tiny.gguf")
        phoenix = args.phoenix or stack.enter_context(phoenix_at(args.port, workdir / "px"))
        phoenix = phoenix.rstrip("/")
        span_id = anyio.run(
            stream_into_phoenix, phoenix, model, args.prompt, args.n_predict, args.placement
        )
        span = wait_for_span(phoenix, span_id)
        link = f"{phoenix}/redirects/spans/{span_id}"
        print(f"Trace of {span['name']!r} ({len(span.get('events', []))} token events): {link}")
        if args.screenshot:
            screenshot(link, args.screenshot)
        elif not args.phoenix:
            print("Phoenix keeps running; Ctrl-C stops it.")
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop Phoenix on kill too
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)


if __name__ == "__main__":
    main()
