"""The examples and the command line, run as a user would run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llamatelemetry_async.__main__ import main
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


def test_demo_streams_from_a_real_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--n-predict", "8"]) == 0
    out = capsys.readouterr().out
    assert "the project's own tiny model" in out
    assert out.count("finish_reason=length") == 2
    assert "tok/s" in out


def test_find_server_and_user_errors_without_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["find-server"]) == 0
    assert "version" in capsys.readouterr().out
    missing = tmp_path / "nope"
    assert main(["find-server", "--llama-server", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "Traceback" not in err
