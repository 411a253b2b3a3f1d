"""AsyncEngine with real llama-server processes on the CPU (several stand in for GPUs)."""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from _procs import gone

from llamatelemetry_async import (
    AsyncEngine,
    EngineBusyError,
    LlamaServerNotFoundError,
    ModelFormatError,
    ModelNotFoundError,
    Placement,
    ReadTimeout,
    ServerConfig,
    ServerCrashedError,
    ServerStartError,
    UsageError,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The engine's own clients take the default path: run each test on both loops."""
    return str(request.param)


GREEDY: dict[str, Any] = {"temperature": 0, "seed": 3}


@pytest.fixture
def free_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]  # held (listening) for the test: the port is taken


async def test_three_servers_spread_streams_and_match_references(tiny_model: Path) -> None:
    config = ServerConfig(n_parallel=4, ctx_size=2048)
    async with AsyncEngine(tiny_model, placement=Placement.cpu(3), server=config) as engine:
        infos = engine.servers
        assert [s.state for s in infos] == ["ready"] * 3
        assert len({s.pid for s in infos}) == 3
        assert all(s.slots == 4 for s in infos)

        prompts = [f"the old cat number {i}" for i in range(60)]
        texts: dict[int, str] = {}

        async def one(i: int) -> None:
            async with engine.stream(prompts[i], n_predict=8, **GREEDY) as stream:
                texts[i] = "".join([chunk.text async for chunk in stream])

        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(one, i)
        served = [s.served for s in engine.servers]
        references = [await engine.completion(p, n_predict=8, **GREEDY) for p in prompts[:60]]
        chat = await engine.chat([{"role": "user", "content": "hi"}], max_tokens=4)
        async with engine.stream_chat([{"role": "user", "content": "hi"}], max_tokens=4) as cs:
            chat_chunks = [c async for c in cs]
    assert all(n > 0 for n in served), served  # every server took work
    assert sum(served) == 60
    assert [texts[i] for i in range(60)] == [r.text for r in references]
    assert chat.usage.completion_tokens == 4
    assert len(chat_chunks) == 4
    assert gone([s.pid for s in infos if s.pid is not None])


async def test_embed_and_log_files(tiny_model: Path, tmp_path: Path) -> None:
    config = ServerConfig(embeddings=True, pooling="mean")
    engine = AsyncEngine(tiny_model, placement=Placement.cpu(1), server=config, log_dir=tmp_path)
    async with engine:
        vectors = (await engine.embeddings(["a cat", "a dog"])).vectors
        recent = engine.servers[0].recent_logs
    assert [len(v) for v in vectors] == [64, 64]
    assert any("listening on" in line for line in recent)
    # Every byte the server printed also went to its log file, and the API key did not.
    log = (tmp_path / "cpu0.log").read_text()
    assert "listening on" in log
    assert "api-key" not in log
    assert engine._api_key not in log


async def test_killed_server_fails_its_stream_and_restarts(tiny_model: Path) -> None:
    async with AsyncEngine(tiny_model, placement=Placement.cpu(1)) as engine:
        first_pid = engine.servers[0].pid
        stream = engine.stream("Once upon a time", n_predict=100_000, ignore_eos=True)
        with anyio.fail_after(10):
            with pytest.raises(ServerCrashedError, match=r"exited \(code -9\)") as info:
                async with stream:
                    async for _ in stream:
                        if stream.chunks == 3:
                            engine._process("cpu0").send_signal(signal.SIGKILL)
            assert info.value.server == "cpu0"
            # The next request waits for the restarted server and succeeds.
            result = await engine.completion("again", n_predict=3)
        assert result.usage.completion_tokens == 3
        info_after = engine.servers[0]
        assert info_after.starts == 2
        assert info_after.pid != first_pid


async def test_stopped_server_times_out(tiny_model: Path) -> None:
    timeout = httpx.Timeout(10.0, read=0.5)
    async with AsyncEngine(tiny_model, placement=Placement.cpu(1), timeout=timeout) as engine:
        server = engine._process("cpu0")
        stream = engine.stream("x", n_predict=100_000, ignore_eos=True)
        try:
            with pytest.raises(ReadTimeout):
                async with stream:
                    async for _ in stream:
                        if stream.chunks == 2:
                            server.send_signal(signal.SIGSTOP)
        finally:
            server.send_signal(signal.SIGCONT)


async def test_start_errors_before_and_after_spawn(
    tiny_model: Path, tmp_path: Path, free_port: int
) -> None:
    with pytest.raises(ModelNotFoundError, match="model file not found"):
        async with AsyncEngine(tmp_path / "missing.gguf", placement=Placement.cpu(1)):
            pass
    with pytest.raises(LlamaServerNotFoundError):
        async with AsyncEngine(tiny_model, placement=Placement.cpu(1), binary=tmp_path / "nope"):
            pass
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(4096))
    # The RAM plan reads the model before anything is spawned: a broken file fails there.
    with pytest.raises(ModelFormatError):
        async with AsyncEngine(corrupt, placement=Placement.cpu(2)):
            pass
    # Unplanned, it reaches llama-server, which refuses it.
    with pytest.raises(ServerStartError) as info:
        async with AsyncEngine(corrupt, placement=Placement.cpu(2), auto_configure=False):
            pass
    assert info.value.exit_code not in (None, 0)
    assert "model" in info.value.log_tail.lower()

    with pytest.raises(ServerStartError, match="bind") as taken:
        async with AsyncEngine(
            tiny_model, placement=Placement.cpu(1), server=ServerConfig(port=free_port)
        ):
            pass
    assert taken.value.server == "cpu0"


async def test_leaving_the_block_reaps_every_process(tiny_model: Path) -> None:
    pids: list[int] = []
    with anyio.move_on_after(30) as scope:
        async with AsyncEngine(tiny_model, placement=Placement.cpu(2)) as engine:
            pids = [s.pid for s in engine.servers if s.pid is not None]
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert len(pids) == 2
    assert gone(pids)

    with pytest.raises(ValueError, match="boom"):
        async with AsyncEngine(tiny_model, placement=Placement.cpu(2)) as engine:
            pids = [s.pid for s in engine.servers if s.pid is not None]
            raise ValueError("boom")
    assert gone(pids)


async def test_busy_engine_bounds_its_waiting_line(tiny_model: Path) -> None:
    config = ServerConfig(n_parallel=1)
    async with AsyncEngine(
        tiny_model, placement=Placement.cpu(1), server=config, max_waiting=1
    ) as engine:
        hog = engine.stream("x", n_predict=100_000, ignore_eos=True)
        async with hog:
            await hog.__anext__()  # holds the only slot
            with anyio.CancelScope() as waiting:
                async with anyio.create_task_group() as tg:
                    started = anyio.Event()

                    async def wait_for_slot() -> None:
                        started.set()
                        await engine.completion("y", n_predict=1)

                    tg.start_soon(wait_for_slot)
                    await started.wait()
                    await anyio.lowlevel.checkpoint()
                    assert engine._router.waiting == 1
                    with pytest.raises(EngineBusyError, match="max_waiting=1"):
                        await engine.completion("z", n_predict=1)
                    waiting.cancel()  # the waiter gives up its place at once
            assert engine._router.waiting == 0
        # The slot is free again: a request goes straight through.
        assert (await engine.completion("z", n_predict=2)).usage.completion_tokens == 2


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_start_and_aclose_without_async_with(tiny_model: Path) -> None:
    engine = AsyncEngine(tiny_model, placement=Placement.cpu(1))
    await engine.start()
    pids = [s.pid for s in engine.servers if s.pid is not None]
    assert (await engine.completion("x", n_predict=2)).usage.completion_tokens == 2
    with pytest.raises(UsageError):
        await engine.start()
    await engine.aclose()
    await engine.aclose()
    assert gone(pids)


async def test_closing_a_stream_that_waits_for_a_slot_frees_its_place(tiny_model: Path) -> None:
    config = ServerConfig(n_parallel=1)
    engine = AsyncEngine(tiny_model, placement=Placement.cpu(1), server=config)
    async with engine, engine.stream("x", n_predict=100_000, ignore_eos=True) as hog:
        await hog.__anext__()  # holds the only slot
        waiting = engine.stream("y", n_predict=2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiting.__aenter__)
            await anyio.wait_all_tasks_blocked()
            assert engine._router.waiting == 1
            await waiting.aclose()
        assert engine._router.waiting == 0
        await hog.aclose()
        assert (await engine.completion("z", n_predict=2)).usage.completion_tokens == 2
        assert engine.servers[0].outstanding == 0


async def test_a_failing_restart_does_not_take_the_engine_down(
    tiny_model: Path, tmp_path: Path
) -> None:
    # A binary that runs the real server once, then fails to start every time after.
    from llamatelemetry_async import find_llama_server

    marker = tmp_path / "started-once"
    flaky = tmp_path / "flaky-llama-server"
    flaky.write_text(
        f'#!/bin/sh\nif [ -e "{marker}" ]; then echo "refusing to start" >&2; exit 3; fi\n'
        f'touch "{marker}"\nexec "{find_llama_server()}" "$@"\n'
    )
    flaky.chmod(0o755)
    engine = AsyncEngine(
        tiny_model, placement=Placement.cpu(1), binary=flaky, max_restart_delay=0.2
    )
    failures = anyio.Event()

    class TwoFailures(logging.Handler):
        count = 0

        def emit(self, record: logging.LogRecord) -> None:
            if "restart failed" in record.getMessage():
                self.count += 1
                if self.count == 2:
                    failures.set()

    handler = TwoFailures()
    logging.getLogger("llamatelemetry_async.engine").addHandler(handler)
    try:
        async with engine:
            engine._process("cpu0").send_signal(signal.SIGKILL)
            with anyio.fail_after(10):
                await failures.wait()  # it keeps trying, with backoff, and stays up
            assert engine.servers[0].starts >= 3
            assert "refusing to start" in "\n".join(engine.servers[0].recent_logs)
    finally:
        logging.getLogger("llamatelemetry_async.engine").removeHandler(handler)
    # Leaving the block still works and reaps everything.
