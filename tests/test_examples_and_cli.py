"""The small examples, run as a user would run them (the command line: test_cli.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from llamatelemetry_async.testing._server import RunningServer

ROOT = Path(__file__).resolve().parents[1]


def test_stream_tokens_example(llama_server: RunningServer) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "stream_tokens.py"), llama_server.url, "the cat"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "finish_reason=length" in result.stdout
    assert "completion_tokens=32" in result.stdout
