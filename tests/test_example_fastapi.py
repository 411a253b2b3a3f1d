"""examples/fastapi_app.py under a real uvicorn, streamed from with a real HTTP client."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _procs import gone

ROOT = Path(__file__).resolve().parents[1]
# Seconds of generation for the tiny model even on a quiet machine whose cores the engine
# gave its server alone (10k tokens/s there): the stream is surely still running when the
# test looks at it after five events.
N_PREDICT = 30_000


class App:
    """The example app under uvicorn: its URL, and its log, drained by a thread."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.url = ""
        self.log: list[str] = []
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self.log.append(line)
            # uvicorn logs the port it bound (--port 0) once the lifespan has started.
            match = re.search(r"Uvicorn running on (http://[\d.]+:\d+)", line)
            if match:
                self.url = match.group(1)
                self._started.set()
        self._started.set()  # EOF: it exited

    def wait_started(self, timeout: float) -> None:
        if not self._started.wait(timeout) or not self.url:
            log = "\n".join(self.log)
            raise AssertionError(f"uvicorn did not start within {timeout} s:\n{log}")

    def stats(self) -> dict[str, Any]:
        server: dict[str, Any] = httpx.get(f"{self.url}/stats", timeout=10).json()["servers"][0]
        return server

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def app(tiny_model: Path) -> Iterator[App]:
    env = {
        **os.environ,
        "LLAMA_MODEL": str(tiny_model),
        "LLAMA_PARALLEL": "1",  # one slot: "freed" means the next request can have it
        "LLAMA_CTX_SIZE": "32768",  # room for N_PREDICT tokens in the one slot
    }
    argv = [sys.executable, "-m", "uvicorn", "--app-dir", "examples", "fastapi_app:app"]
    proc = subprocess.Popen(
        [*argv, "--host", "127.0.0.1", "--port", "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    running = App(proc)
    try:
        running.wait_started(timeout=60)
        yield running
    finally:
        running.stop()


def _events(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        if line.startswith("data: "):
            yield line.removeprefix("data: ")


def _poll(check: Any, timeout: float) -> Any:
    """Call ``check()`` until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: last value {value!r}")
        time.sleep(0.02)  # a polling interval against a deadline


def test_tokens_stream_as_server_sent_events(app: App) -> None:
    body = {"prompt": "Once upon a time", "n_predict": 16, "seed": 1}
    with httpx.stream("POST", f"{app.url}/generate", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(_events(response.iter_lines()))
    assert events[-1] == "[DONE]"
    texts = [json.loads(e)["text"] for e in events[:-2]]
    assert len(texts) == 16
    assert all(texts)
    assert json.loads(events[-2]) == {
        "finish_reason": "length",
        "usage": {"prompt_tokens": 5, "completion_tokens": 16},
    }
    stats = app.stats()
    assert stats["in_flight"] == 0
    assert stats["served"] == 1


def test_a_client_that_disconnects_mid_stream_frees_the_server_slot(app: App) -> None:
    before = app.stats()["tokens_predicted_total"]
    body = {"prompt": "Once upon a time", "n_predict": N_PREDICT}
    with httpx.stream("POST", f"{app.url}/generate", json=body, timeout=30) as response:
        events = _events(response.iter_lines())
        received = [json.loads(next(events))["text"] for _ in range(5)]
        assert all(received)
        busy = app.stats()
        assert busy["in_flight"] == 1
        assert busy["slots_processing"] == 1  # llama-server is generating for us
    # The with block closed the connection mid-stream: the app must close the engine stream.
    idle = _poll(
        lambda: (s := app.stats())["slots_processing"] == 0 and s["in_flight"] == 0 and s,
        timeout=10,
    )
    # llama-server stopped early: it predicted fewer tokens than were asked for.
    predicted = idle["tokens_predicted_total"] - before
    # (the margin: on a loaded CPU the app may take a while to see the disconnect)
    assert predicted < N_PREDICT * 0.9, predicted
    # And the one slot serves the next request at once.
    short = {"prompt": "The king", "n_predict": 4}
    with httpx.stream("POST", f"{app.url}/generate", json=short, timeout=30) as response:
        assert list(_events(response.iter_lines()))[-1] == "[DONE]"


def test_shutting_the_app_down_reaps_the_servers(app: App) -> None:
    pid = app.stats()["pid"]
    app.proc.send_signal(signal.SIGINT)
    assert app.proc.wait(30) == 0
    assert gone([pid], timeout=2.0)
    assert any("Application shutdown complete" in line for line in app.log)
