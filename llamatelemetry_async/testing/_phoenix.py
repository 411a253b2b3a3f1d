"""Arize Phoenix (``phoenix serve``) on loopback, offline, for tests and the example.

Phoenix is an optional dependency (the ``phoenix`` dependency group); this module only
starts its server as a subprocess and waits until it answers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

__all__ = ["PHOENIX_OFFLINE", "PhoenixServer", "free_port", "run_phoenix"]

# Serve offline and quietly: no fonts, pixels, sandbox downloads or docs server from the
# internet, no assistant, no migration log.
PHOENIX_OFFLINE = {
    "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false",
    "PHOENIX_TELEMETRY_ENABLED": "false",
    "PHOENIX_DISABLE_AGENT_ASSISTANT": "true",
    "PHOENIX_LOG_MIGRATIONS": "false",
}


@dataclasses.dataclass(frozen=True)
class PhoenixServer:
    url: str
    log: Path
    started_in: float  # seconds from spawn to healthy

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def free_port() -> int:
    """A free loopback port (released before use: Phoenix binds it itself)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def run_phoenix(
    workdir: Path,
    *,
    port: int | None = None,
    timeout: float = 80.0,
    while_starting: Callable[[], object] | None = None,
) -> Iterator[PhoenixServer]:
    """Run ``phoenix serve`` on free loopback ports until the block ends.

    Its database and log live in ``workdir``; ``port`` defaults to a free one.
    ``while_starting`` runs after the spawn and before the wait (importing
    ``phoenix.client`` takes seconds: overlap it with the start).
    Raises ``RuntimeError`` with the log tail if Phoenix exits or is not ready in time.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = {
        **os.environ,
        **PHOENIX_OFFLINE,
        "PHOENIX_HOST": "127.0.0.1",
        "PHOENIX_PORT": str(port),
        "PHOENIX_GRPC_PORT": str(free_port()),
        "PHOENIX_WORKING_DIR": str(workdir),
    }
    log = workdir / "phoenix.log"
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "phoenix.server.main", "serve"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = PhoenixServer(url, log, 0.0)
    try:
        if while_starting is not None:
            while_starting()
        with httpx.Client(timeout=2) as http:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"phoenix exited ({process.returncode}):\n{server.log_tail()}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if http.get(f"{url}/healthz").status_code == 200:
                        break
                if time.monotonic() - started > timeout:
                    raise RuntimeError(
                        f"phoenix not ready after {timeout:g} s:\n{server.log_tail()}"
                    )
                time.sleep(0.1)  # readiness poll of another process, with a deadline
        yield dataclasses.replace(server, started_in=time.monotonic() - started)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
