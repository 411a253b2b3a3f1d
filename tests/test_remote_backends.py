"""Servers the engine did not start: real llama-servers launched by the test, attached as
remote backends, and hand-written servers that refuse, answer 503 or break mid-answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from _procs import gone

from llamatelemetry_async import (
    AsyncEngine,
    AsyncLlamaClient,
    ConnectError,
    LlamaError,
    Placement,
    ServerConfig,
    ServerUnavailableError,
)
from llamatelemetry_async.testing._server import RunningServer, run_llama_server

pytestmark = pytest.mark.anyio

KEY = "remote-test-key"
GREEDY: dict[str, Any] = {"temperature": 0, "seed": 5, "n_predict": 6}


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.contextmanager
def _remote(model: Path, *, port: int = 0) -> Iterator[RunningServer]:
    args = ["-np", "2", "-c", "1024"] + (["--port", str(port)] if port else [])
    with run_llama_server(model, args=args, env={"LLAMA_API_KEY": KEY}) as server:
        yield server


@pytest.fixture
def two_remotes(tiny_model: Path) -> Iterator[tuple[RunningServer, RunningServer]]:
    with _remote(tiny_model) as a, _remote(tiny_model) as b:
        yield a, b


async def _wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    # Polls engine state that changes in background tasks (no event exposes it); bounded.
    with anyio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.02)


async def test_streams_spread_over_two_remote_servers_and_match_references(
    two_remotes: tuple[RunningServer, RunningServer],
) -> None:
    a, b = two_remotes
    async with AsyncLlamaClient(a.url, api_key=KEY) as direct:
        prompts = [f"the remote cat {i}" for i in range(12)]
        references = [(await direct.completion(p, **GREEDY)).content for p in prompts]
    placement = Placement.remote([a.url, b.url], api_key=KEY)
    async with AsyncEngine(placement=placement) as engine:
        assert [(s.kind, s.state, s.slots) for s in engine.servers] == [("remote", "ready", 2)] * 2
        texts: dict[int, str] = {}

        async def one(i: int) -> None:
            async with engine.stream(prompts[i], **GREEDY) as stream:
                texts[i] = "".join([chunk.text async for chunk in stream])

        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(one, i)
        served = [s.served for s in engine.servers]
        assert await engine.tokenize("hello")  # no slot needed: any ready server answers
    assert [texts[i] for i in range(12)] == references
    assert all(n > 0 for n in served), served
    assert a.process.poll() is None  # leaving the engine leaves remote servers running
    assert b.process.poll() is None


async def test_a_killed_remote_is_routed_around_and_comes_back_on_its_port(
    tiny_model: Path, two_remotes: tuple[RunningServer, RunningServer]
) -> None:
    a, b = two_remotes
    port = a.port
    placement = Placement.remote([a.url, b.url], api_key=KEY)
    async with AsyncEngine(placement=placement, health_interval=0.1) as engine:
        os.killpg(a.pid, signal.SIGKILL)
        a.process.wait()
        began = time.monotonic()
        # None of these had started: none fails, whichever server each first tried.
        for _ in range(6):
            with anyio.fail_after(20):
                reply = await engine.completion("after the kill", **GREEDY)
            assert reply.usage.completion_tokens == 6
        rerouted = time.monotonic() - began
        assert engine.servers[0].state in ("unreachable", "failed")
        served_by_a = engine.servers[0].served
        with _remote(tiny_model, port=port):  # the same server back on the same port
            await _wait_for(lambda: engine.servers[0].state == "ready")
            for _ in range(8):
                await engine.completion("it is back", **GREEDY)
            assert engine.servers[0].served > served_by_a
    print(f"six requests around a killed remote in {rerouted:.2f} s")


async def test_a_stopped_remote_is_cooled_down_and_routed_around(
    two_remotes: tuple[RunningServer, RunningServer],
) -> None:
    a, b = two_remotes
    placement = Placement.remote([a.url, b.url], api_key=KEY)
    async with AsyncEngine(placement=placement, health_interval=0.1) as engine:
        os.killpg(a.pid, signal.SIGSTOP)
        try:
            # A remote that stops answering its probe is cooled down: no new requests.
            await _wait_for(lambda: engine.servers[0].state == "unreachable")
            before = engine.servers[0].served
            for _ in range(4):
                with anyio.fail_after(20):
                    await engine.completion("elsewhere", **GREEDY)
            assert engine.servers[0].served == before
        finally:
            os.killpg(a.pid, signal.SIGCONT)
        await _wait_for(lambda: engine.servers[0].state == "ready")


async def test_a_mixed_engine_uses_both_and_stops_only_its_own(tiny_model: Path) -> None:
    with _remote(tiny_model) as remote:
        placement = Placement.cpu(1) + Placement.remote([remote.url], api_key=KEY)
        config = ServerConfig(n_parallel=2, ctx_size=1024)
        async with AsyncEngine(tiny_model, placement=placement, server=config) as engine:
            assert [s.kind for s in engine.servers] == ["local", "remote"]

            async def one(i: int) -> None:
                await engine.completion(f"mixed {i}", **GREEDY)

            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(one, i)
            infos = engine.servers
        assert all(s.served > 0 for s in infos), [s.served for s in infos]
        assert infos[0].pid is not None
        assert gone([infos[0].pid])
        assert remote.process.poll() is None
        async with AsyncLlamaClient(remote.url, api_key=KEY) as client:
            assert (await client.health()).status == "ok"


# --------------------------------------------------------------------- hand-written servers
class _Fake:
    """A loopback HTTP server: ``/health`` and ``/props`` answer, and ``answer`` decides
    what a POST gets. Counts the POSTs it received."""

    def __init__(self, answer: Callable[[socket.socket], None]) -> None:
        self.posts = 0
        self._answer = answer
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(32)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                piece = conn.recv(65536)
                if not piece:
                    return
                data += piece
            line = data.split(b"\r\n", 1)[0]
            if line.startswith(b"GET /health"):
                _reply(conn, 200, {"status": "ok"})
            elif line.startswith(b"GET /props"):
                _reply(conn, 200, {"total_slots": 1})
            else:
                self.posts += 1
                self._answer(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)


def _reply(conn: socket.socket, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    conn.sendall(
        b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (status, len(payload), payload)
    )


def _loading(conn: socket.socket) -> None:
    error = {"code": 503, "message": "Loading model", "type": "unavailable_error"}
    _reply(conn, 503, {"error": error})


def _hang_up(conn: socket.socket) -> None:
    return  # read the request, then close without a word


def _half_a_stream(conn: socket.socket) -> None:
    event = b'data: {"content":"a","tokens":[1],"stop":false}\n\n'
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n%x\r\n%s\r\n" % (len(event), event)
    )


@contextlib.contextmanager
def _fake(answer: Callable[[socket.socket], None]) -> Iterator[_Fake]:
    fake = _Fake(answer)
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
def refused_url() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_refused_and_loading_servers_are_retried_on_another(
    two_remotes: tuple[RunningServer, RunningServer], refused_url: str
) -> None:
    real = two_remotes[0]
    with _fake(_loading) as loading:
        placement = Placement.remote([loading.url, real.url], api_key=KEY)
        async with AsyncEngine(placement=placement) as engine:
            assert engine.servers[0].state == "ready"  # its /health says ok
            for i in range(4):
                async with engine.stream(f"retried {i}", **GREEDY) as stream:
                    assert "".join([c.text async for c in stream])
                await engine.completion(f"retried {i}", **GREEDY)
            assert loading.posts >= 1  # it was tried, answered 503, and was cooled down
            assert engine.servers[0].state != "ready"
            assert engine.servers[1].served == 8
    placement = Placement.remote([refused_url, real.url], api_key=KEY)
    async with AsyncEngine(placement=placement) as engine:
        assert engine.servers[0].state == "unreachable"
        assert engine.servers[0].last_error
        for i in range(3):
            assert (await engine.completion(f"refused {i}", **GREEDY)).content


@pytest.mark.parametrize("answer", [_hang_up, _half_a_stream], ids=["no-answer", "half-stream"])
async def test_a_request_the_server_received_is_never_sent_again(
    two_remotes: tuple[RunningServer, RunningServer], answer: Callable[[socket.socket], None]
) -> None:
    real = two_remotes[0]
    with _fake(answer) as broken:
        placement = Placement.remote([broken.url, real.url], api_key=KEY)
        async with AsyncEngine(placement=placement, retries=3) as engine:
            # The broken server is the least busy and first: it gets the first request.
            with anyio.fail_after(20), pytest.raises(LlamaError):
                async with engine.stream("once only", **GREEDY) as stream:
                    async for _ in stream:
                        pass
            assert broken.posts == 1
            assert engine.servers[1].served == 0  # never re-sent to the healthy one


async def test_the_span_of_a_retried_request_records_each_attempt(
    two_remotes: tuple[RunningServer, RunningServer],
) -> None:
    from test_telemetry import Recorder

    from llamatelemetry_async import TokenEvents

    recorder = Recorder(TokenEvents.all())
    try:
        with _fake(_loading) as loading:
            placement = Placement.remote([loading.url, two_remotes[0].url], api_key=KEY)
            async with AsyncEngine(placement=placement, telemetry=recorder.telemetry) as engine:
                await engine.completion("retried and traced", **GREEDY)
        (span,) = recorder.finished()
        attributes = dict(span.attributes or {})
        assert attributes["llamatelemetry.request.attempts"] == 2
        assert attributes["llamatelemetry.request.failed_attempts"] == ("remote0: HTTPStatusError",)
        assert attributes["llamatelemetry.server.name"] == "remote1"
    finally:
        recorder.telemetry.shutdown()


async def test_a_remote_that_refuses_the_key_fails_requests_instead_of_hanging(
    tiny_model: Path,
) -> None:
    with _remote(tiny_model) as server:
        placement = Placement.remote([server.url], api_key="not-the-key")
        async with AsyncEngine(placement=placement, max_start_failures=2) as engine:
            # /health needs no key, /props does: it must not sit half-admitted forever.
            with anyio.fail_after(20), pytest.raises(ServerUnavailableError):
                await engine.completion("hi", **GREEDY)
            info = engine.servers[0]
            assert info.state == "failed"
            assert "/props" in (info.last_error or "")


async def test_a_lone_remote_that_dies_idle_fails_requests_with_a_reason(
    tiny_model: Path,
) -> None:
    with _remote(tiny_model) as server:
        placement = Placement.remote([server.url], api_key=KEY)
        async with AsyncEngine(
            placement=placement, max_start_failures=2, health_interval=0.1
        ) as engine:
            await engine.completion("before", **GREEDY)
            os.killpg(server.pid, signal.SIGKILL)
            server.process.wait()
            with anyio.fail_after(20), pytest.raises(ServerUnavailableError):
                await engine.completion("after", **GREEDY)


async def test_a_remote_that_comes_back_brings_its_new_slot_count(tiny_model: Path) -> None:
    with _remote(tiny_model) as server:
        port = server.port
        async with AsyncEngine(
            placement=Placement.remote([server.url], api_key=KEY), health_interval=0.1
        ) as engine:
            assert engine.servers[0].slots == 2
            os.killpg(server.pid, signal.SIGKILL)
            server.process.wait()
            await _wait_for(lambda: engine.servers[0].state != "ready")
            args = ["-np", "3", "-c", "1024", "--port", str(port)]
            with run_llama_server(tiny_model, args=args, env={"LLAMA_API_KEY": KEY}):
                await _wait_for(lambda: engine.servers[0].state == "ready")
                assert engine.servers[0].slots == 3


async def test_cooling_a_remote_down_leaves_its_streams_in_flight_alone(
    two_remotes: tuple[RunningServer, RunningServer],
) -> None:
    a, b = two_remotes
    placement = Placement.remote([a.url, b.url], api_key=KEY)
    async with AsyncEngine(placement=placement) as engine:
        async with engine.stream("a long one", n_predict=48, ignore_eos=True) as stream:
            await stream.__anext__()
            served_by = stream.url
            backend = next(x for x in engine._backends if served_by.startswith(x.url or "-"))
            # What a refused request on the same server does: out of rotation at once.
            backend.report(ConnectError("refused"), engine._ctx)
            assert backend.info().state != "ready"
            rest = [chunk async for chunk in stream]
        assert 1 + len(rest) == 48  # the stream in flight finished on the cooled-down server


async def test_fan_out_skips_servers_that_are_down(
    two_remotes: tuple[RunningServer, RunningServer],
) -> None:
    a, b = two_remotes
    placement = Placement.remote([a.url, b.url], api_key=KEY)
    async with AsyncEngine(placement=placement, health_interval=0.1) as engine:
        os.killpg(a.pid, signal.SIGKILL)
        a.process.wait()
        await _wait_for(lambda: engine.servers[0].state != "ready")
        health = await engine.each_server(lambda client: client.health())
        assert list(health) == ["remote1"]
        await engine.set_lora_adapters({})  # the live server only; no ConnectError


def test_a_connect_timeout_counts_as_not_taken() -> None:
    from llamatelemetry_async import ConnectTimeout, ReadError
    from llamatelemetry_async.engine._routing import _not_taken

    assert _not_taken(ConnectTimeout("slow connect"))
    assert _not_taken(ConnectError("refused"))
    assert not _not_taken(ReadError("the request was written"))
