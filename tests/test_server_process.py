"""``LlamaServer`` start failures and the thread its children are forked from, with real
processes (shell scripts stand in for a llama-server that crashes while loading)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from _procs import gone

from llamatelemetry_async import AsyncLlamaClient, ServerStartError, find_llama_server
from llamatelemetry_async.server import _process
from llamatelemetry_async.server._process import LlamaServer, _shim_argv, _SpawnThread

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux processes")


def _fake_server(tmp_path: Path, crash: str) -> Path:
    binary = tmp_path / "llama-server"
    binary.write_text(f"#!/bin/sh\necho 'load_tensors: loading model tensors'\n{crash}\n")
    binary.chmod(0o755)
    return binary


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("crash", "code", "signal_name"),
    [
        ("kill -SEGV $$", -11, "SIGSEGV"),
        ("kill -ILL $$", -4, "SIGILL"),
        # A wrapper script that runs the server without exec reports 128 + the signal.
        ("sh -c 'kill -SEGV $$'; exit $?", 139, "SIGSEGV"),
        ("sh -c 'kill -ILL $$'; exit $?", 132, "SIGILL"),
    ],
    ids=["SIGSEGV", "SIGILL", "139", "132"],
)
async def test_a_crash_while_loading_names_the_likely_causes_and_the_way_out(
    tmp_path: Path, crash: str, code: int, signal_name: str
) -> None:
    server = LlamaServer([str(_fake_server(tmp_path, crash)), "--port", "0"], name="cpu0")
    with pytest.raises(ServerStartError) as info:
        await server.run(ready_timeout=60)
    exc = info.value
    assert exc.exit_code == code
    message = str(exc).splitlines()[0]
    assert f"killed by {signal_name} (exit code {code}) while loading" in message
    assert "built for another CPU" in message
    assert "weight-repack" in message
    assert "AVX-512/AMX" in message
    assert 'ServerConfig(extra_args=["--no-repack"])' in message
    assert "build-server --force" in message
    assert "loading model tensors" in exc.log_tail


@pytest.mark.anyio
async def test_an_ordinary_failed_start_gets_no_crash_hint(tmp_path: Path) -> None:
    server = LlamaServer([str(_fake_server(tmp_path, "exit 1")), "--port", "0"], name="cpu0")
    with pytest.raises(ServerStartError) as info:
        await server.run(ready_timeout=60)
    assert info.value.exit_code == 1
    assert "exited with code 1 while starting" in str(info.value)
    assert "--no-repack" not in str(info.value)


# Prints a line once it runs (so the parent-death signal is set), then waits for stdin to close.
_WAITER = "import sys; print('ready', flush=True); sys.stdin.read(); print('alive', flush=True)"


def _start_waiter() -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        _shim_argv([sys.executable, "-c", _WAITER], pdeath=True),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def _from_a_thread_that_exits(
    start: Callable[[], subprocess.Popen[bytes]],
) -> subprocess.Popen[bytes]:
    """Call ``start`` on a new thread, wait for its 'ready', and let the thread end."""
    result: list[subprocess.Popen[bytes]] = []

    def body() -> None:
        proc = start()
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        result.append(proc)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(30)
    assert result, "the child never started"
    # The kernel sends the parent-death signal while the thread exits, before its /proc entry
    # goes; once the entry is gone, a signal that was coming is already pending.
    task = Path(f"/proc/self/task/{thread.native_id}")
    deadline = time.monotonic() + 30
    while task.exists():
        assert time.monotonic() < deadline, "the thread never exited"
        time.sleep(0.01)  # polling the kernel for a thread's exit
    return result[0]


def _outcome(proc: subprocess.Popen[bytes]) -> tuple[int, bytes]:
    # A pending SIGKILL acts before the child's read returns: it cannot print 'alive'.
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out


def test_the_parent_death_signal_follows_the_forking_thread() -> None:
    # Why the spawn thread exists: a child forked by a thread that then exits is killed.
    assert _outcome(_from_a_thread_that_exits(_start_waiter)) == (-9, b"")


def test_children_forked_by_the_spawn_thread_outlive_the_thread_that_asked() -> None:
    # trio starts processes from worker threads that it retires; the library forks them from
    # its own daemon thread instead, which lives as long as the process.
    def start() -> subprocess.Popen[bytes]:
        popen: subprocess.Popen[bytes] = _SpawnThread.get().call(_start_waiter)
        return popen

    assert _outcome(_from_a_thread_that_exits(start)) == (0, b"alive\n")
    assert _SpawnThread.get().pid == os.getpid()


@pytest.mark.anyio
@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "no-pidfd"])
async def test_a_real_server_starts_answers_and_is_reaped_on_every_spawn_path(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch, pidfd: bool
) -> None:
    # Without pidfd_open (old kernels, some sandboxes) trio falls back to its own spawning.
    monkeypatch.setattr(_process, "_pidfd_works", lambda: pidfd)
    argv = [str(find_llama_server()), "-m", str(tiny_model), "--host", "127.0.0.1", "--port", "0"]
    server = LlamaServer([*argv, "-c", "256"], name="cpu0")
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        assert server.url is not None
        pid = server.pid
        async with AsyncLlamaClient(server.url) as client:
            reply = await client.completion("Once upon a time", n_predict=3)
        assert reply.usage.completion_tokens == 3
        tg.cancel_scope.cancel()
    assert server.exited.is_set()
    assert server.exit_code is not None
    assert pid is not None
    assert gone([pid], timeout=10.0)


def test_a_test_fixtures_server_dies_with_the_test_process(tiny_model: Path) -> None:
    # run_llama_server (the sync helper behind the session fixtures): a test run that is
    # SIGKILLed (or SIGTERMed: no fixture teardown runs) must not leave its servers behind.
    code = (
        "import sys, time\n"
        "from llamatelemetry_async.testing._server import run_llama_server\n"
        "with run_llama_server(sys.argv[1]) as server:\n"
        "    print(server.pid, flush=True)\n"
        "    time.sleep(600)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code, str(tiny_model)], stdout=subprocess.PIPE, text=True
    ) as holder:
        try:
            assert holder.stdout is not None
            pid = int(holder.stdout.readline())
            holder.kill()
            holder.wait(10)
            assert gone([pid], timeout=5.0)
        finally:
            if holder.poll() is None:
                holder.kill()
