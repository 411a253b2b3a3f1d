"""A synchronous llama-server runner for test fixtures (pytest session fixtures are sync).

It binds port 0 so there is no port race: llama-server picks a free port and logs
``listening on http://127.0.0.1:PORT`` once the model is loaded, which is both the
port and the readiness signal. Output goes through a pipe that a thread drains into a
bounded buffer (a pipe nobody reads would block the server once full).
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from .._errors import LlamaServerError
from ..server import dies_with_this_process, find_llama_server

__all__ = ["RunningServer", "run_llama_server"]

_LISTENING = re.compile(r"listening on (http://\S+?):(\d+)\s*$")


class RunningServer:
    """A llama-server started by ``run_llama_server``: its URL, process and recent log."""

    def __init__(self, process: subprocess.Popen[bytes], argv: list[str]) -> None:
        self.process = process
        self.argv = argv
        self.url = ""
        self.port = 0
        self._lines: collections.deque[str] = collections.deque(maxlen=400)
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._drain, name="llama-server-log", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(list(self._lines)[-n:])

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self._lines.append(line)
            if not self._ready.is_set():
                match = _LISTENING.search(line)
                if match:
                    self.url = f"{match.group(1)}:{match.group(2)}"
                    self.port = int(match.group(2))
                    self._ready.set()
        self._ready.set()  # EOF: the process ended; the waiter checks why

    def wait_ready(self, timeout: float) -> None:
        if not self._ready.wait(timeout) or not self.url:
            self.stop()
            why = "did not become ready" if self.process.poll() is None else "exited"
            raise LlamaServerError(
                f"llama-server {why} within {timeout:g} s "
                f"(exit code {self.process.returncode}); argv: {' '.join(self.argv)}\n"
                f"{self.log_tail()}"
            )

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group, then SIGKILL after ``grace`` seconds; always reaps."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._reader.join(timeout=grace)
        if self.process.stdout is not None:
            self.process.stdout.close()


@contextlib.contextmanager
def run_llama_server(
    model: str | os.PathLike[str],
    *,
    args: Sequence[str] = (),
    binary: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    ready_timeout: float = 60.0,
) -> Iterator[RunningServer]:
    """Start llama-server on 127.0.0.1 (free port) with ``model``; stop it on exit.

    ``args`` are extra llama-server flags (``--embeddings``, ``-np 4``, ...).
    """
    exe = find_llama_server(binary)
    argv = [str(exe), "-m", str(Path(model)), "--host", "127.0.0.1", "--port", "0", *args]
    process = subprocess.Popen(
        dies_with_this_process(argv),  # a test run that is killed leaves no server behind
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # its own process group: stop() reaches every child
    )
    server = RunningServer(process, argv)
    try:
        server.wait_ready(ready_timeout)
        yield server
    finally:
        server.stop()
