"""The front door under faults and hostile clients: disconnects that must free slots,
backpressure (429), not ready (503), bad keys and bodies, upstream crashes, drains, a
storm of dropped streams. Real llama-servers behind a real uvicorn, on 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from _door import running_door
from _procs import gone

from llamatelemetry_async import (
    AsyncEngine,
    ConfigError,
    Placement,
    ServerConfig,
    ServerStartError,
    UsageError,
    find_llama_server,
)
from llamatelemetry_async.frontdoor import FrontDoor
from llamatelemetry_async.testing._replay import replay_server

pytestmark = pytest.mark.anyio

KEY = "front-door-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn runs on asyncio only


def _chat(max_tokens: int, *, stream: bool = True) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": "tell me a long story"}],
        "max_tokens": max_tokens,
        "stream": stream,
        "ignore_eos": True,
    }


async def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    # Polls state that changes in other tasks or processes (no event exposes it); bounded.
    with anyio.fail_after(timeout):  # the traceback names the caller and its `what`
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.02)


async def _busy_slots(engine: AsyncEngine) -> int:
    slots = await engine.each_server(lambda c: c.slots())
    return sum(1 for server in slots.values() for slot in server if slot.get("is_processing"))


async def _until_slots_free(engine: AsyncEngine, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):  # llama-server's own state, polled (bounded)
        while await _busy_slots(engine):  # noqa: ASYNC110
            await anyio.sleep(0.02)


async def _data_lines(response: httpx.Response) -> AsyncIterator[str]:
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            yield line[len("data: ") :]


@pytest.fixture
async def one_slot(tiny_model: Path) -> AsyncIterator[tuple[AsyncEngine, FrontDoor, str]]:
    engine = AsyncEngine(
        tiny_model,
        placement=Placement.cpu(1),
        server=ServerConfig(n_parallel=1, ctx_size=4096),
        max_waiting=1,
    )
    door = FrontDoor(engine, api_keys=[KEY], retry_after=2)
    async with running_door(door) as url:
        yield engine, door, url


# ---------------------------------------------------------------------- keys and bodies


async def test_keys_are_required_except_for_health(
    one_slot: tuple[AsyncEngine, FrontDoor, str],
) -> None:
    _, _, url = one_slot
    async with httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/health")).status_code == 200
        assert (await http.get("/livez")).json() == {"status": "alive"}
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Basic {KEY}"},
            {"Authorization": f"Bearer {KEY}x"},
            {"Authorization": "Bearer"},
            {"Authorization": "Bearer " + "k" * 60_000},  # hostile: huge
        ):
            for method, path in (("POST", CHAT), ("GET", "/v1/models"), ("GET", "/servers")):
                answer = await http.request(method, path, headers=headers, json=_chat(2))
                assert answer.status_code in (401, 431), (headers.keys(), path)
                if answer.status_code == 401:
                    assert answer.headers["www-authenticate"] == "Bearer"
                    assert answer.json()["error"]["code"] == "invalid_api_key"
        lower = {"authorization": f"bearer {KEY}"}  # header and scheme names are case-blind
        assert (await http.get("/v1/models", headers=lower)).status_code == 200
        twice = [("Authorization", f"Bearer {KEY}"), ("Authorization", "Bearer wrong")]
        assert (await http.get("/v1/models", headers=twice)).status_code == 401  # ambiguous
        for path in ("/v1/models/", "/nope", "//v1/models"):  # JSON 404s, no redirects
            missing = await http.get(path, headers=AUTH)
            assert missing.status_code == 404, path
            assert missing.json()["error"]["type"] == "not_found_error"


async def test_bad_bodies_get_400_or_413_in_openai_shape(
    one_slot: tuple[AsyncEngine, FrontDoor, str],
) -> None:
    engine, door, url = one_slot
    async with httpx.AsyncClient(base_url=url, headers=AUTH) as http:
        deep = b'{"a":' * 5000 + b"1" + b"}" * 5000  # a RecursionError in a decoder
        for body in (b"{bad", b"", b"[1, 2]", b"\xff\xfe", b'"text"', deep):
            answer = await http.post(CHAT, content=body)
            assert answer.status_code == 400, body
            error = answer.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert error["message"]
        door.max_body = 1000
        answer = await http.post(CHAT, json={"messages": [{"role": "user", "content": "x" * 2000}]})
        assert answer.status_code == 413
        # Upstream's own 4xx comes through with its body: llama-server refuses no messages.
        answer = await http.post(CHAT, json={"max_tokens": 2})
        assert answer.status_code == 400
        assert "messages" in answer.json()["error"]["message"]
    assert door.in_flight == 0
    assert engine.servers[0].outstanding == 0


def test_bad_door_arguments_are_config_errors(tiny_model: Path) -> None:
    engine = AsyncEngine(tiny_model, placement=Placement.cpu(1))
    with pytest.raises(ConfigError, match="auth=False"):
        FrontDoor(engine)
    with pytest.raises(ConfigError, match="one or the other"):
        FrontDoor(engine, api_keys=["k"], auth=False)
    with pytest.raises(ConfigError, match="API key"):
        FrontDoor(engine, api_keys=[" spaced "])
    with pytest.raises(ConfigError, match="drain_timeout"):
        FrontDoor(engine, auth=False, drain_timeout=-1)
    with pytest.raises(ConfigError, match="AsyncEngine"):
        FrontDoor(object(), auth=False)  # type: ignore[arg-type]


async def test_a_door_runs_once(tiny_model: Path) -> None:
    door = FrontDoor(AsyncEngine(tiny_model, placement=Placement.cpu(1)), auth=False)
    with pytest.raises(UsageError, match="async with door"):
        await door.wait_ready()
    async with door:
        await door.wait_ready()
    assert door.state == "closed"
    with pytest.raises(UsageError, match="already started"):
        async with door:
            pass


# ---------------------------------------------------------------------- backpressure


async def test_a_full_waiting_line_is_429_with_retry_after(
    one_slot: tuple[AsyncEngine, FrontDoor, str],
) -> None:
    engine, door, url = one_slot
    async with (
        httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as http,
        http.stream("POST", CHAT, json=_chat(3000)) as running,
    ):
        assert running.status_code == 200
        async with anyio.create_task_group() as tg:

            async def waits() -> None:
                async with http.stream("POST", CHAT, json=_chat(2)) as answer:
                    assert answer.status_code == 200
                    await answer.aread()

            tg.start_soon(waits)
            await _wait_for(lambda: engine.waiting == 1, "one request waiting")
            refused = await http.post(CHAT, json=_chat(2))
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "2"
            assert refused.json()["error"]["type"] == "rate_limit_error"
            await running.aclose()  # frees the slot: the waiting one goes through
    assert door.answered[CHAT, 429] == 1


async def test_503_with_retry_after_until_the_servers_are_ready(
    tiny_model: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    binary = tmp_path / "gated-llama-server"
    binary.write_text(  # starts only once the test removes the gate file
        f'#!/bin/sh\nwhile [ -e "{gate}" ]; do sleep 0.02; done\n'
        f'exec "{find_llama_server()}" "$@"\n'
    )
    binary.chmod(0o755)
    engine = AsyncEngine(tiny_model, placement=Placement.cpu(1), binary=binary)
    door = FrontDoor(engine, api_keys=[KEY])
    async with (
        running_door(door, ready=False) as url,
        httpx.AsyncClient(base_url=url, headers=AUTH) as http,
    ):
        health = await http.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "starting"
        assert health.headers["retry-after"] == "1"
        early = await http.post(CHAT, json=_chat(2, stream=False))
        assert early.status_code == 503
        assert early.headers["retry-after"] == "1"
        assert "starting" in early.json()["error"]["message"]
        gate.unlink()
        with anyio.fail_after(30):
            await door.wait_ready()
        assert (await http.get("/health")).status_code == 200
        answer = await http.post(CHAT, json=_chat(2, stream=False))
        assert answer.status_code == 200
        assert answer.json()["usage"]["completion_tokens"] == 2


# ---------------------------------------------------------------------- disconnects


async def test_a_client_that_disconnects_mid_stream_frees_the_upstream_slot(
    one_slot: tuple[AsyncEngine, FrontDoor, str],
) -> None:
    engine, door, url = one_slot
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as http:
        async with http.stream("POST", CHAT, json=_chat(3000)) as answer:
            lines = _data_lines(answer)
            for _ in range(3):
                await anext(lines)
            assert await _busy_slots(engine) == 1
        # The response is closed; the client never reads on: the door must notice alone.
        await _until_slots_free(engine)
        await _wait_for(lambda: door.in_flight == 0, "the door's request ended")
        assert engine.servers[0].outstanding == 0
        done = await http.post(CHAT, json=_chat(2, stream=False))
        assert done.status_code == 200


async def test_a_whole_reply_request_that_leaves_while_waiting_never_runs(
    one_slot: tuple[AsyncEngine, FrontDoor, str],
) -> None:
    engine, door, url = one_slot
    async with (
        httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as http,
        http.stream("POST", CHAT, json=_chat(3000)) as running,
    ):
        assert running.status_code == 200
        served = engine.servers[0].served
        with anyio.CancelScope() as scope:

            async def wait_then_leave() -> None:
                await _wait_for(lambda: engine.waiting == 1, "waiting for the slot")
                scope.cancel()  # the client gives up: its connection closes

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait_then_leave)
                await http.post(CHAT, json=_chat(2, stream=False))
        await _wait_for(lambda: engine.waiting == 0, "the line emptied")
        await _wait_for(lambda: door.answered[CHAT, 499] == 1, "counted as gone")
        await running.aclose()
    await _until_slots_free(engine)
    # Counted as each request ends: the running stream, and not the one that left.
    assert engine.servers[0].served == served + 1


async def test_concurrent_drains_all_end_when_the_last_request_does(
    one_slot: tuple[AsyncEngine, FrontDoor, str],
) -> None:
    _, door, url = one_slot
    door.drain_timeout = 60
    async with (
        httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as http,
        http.stream("POST", CHAT, json=_chat(40)) as answer,
    ):
        lines = _data_lines(answer)
        await anext(lines)
        with anyio.fail_after(30):  # not the 60 s of drain_timeout
            async with anyio.create_task_group() as tg:
                tg.start_soon(door.drain)
                tg.start_soon(door.drain)
                assert [line async for line in lines][-1] == "[DONE]"
    assert door.in_flight == 0


async def test_a_client_that_leaves_while_waiting_for_a_slot_leaves_the_line(
    one_slot: tuple[AsyncEngine, FrontDoor, str],
) -> None:
    engine, door, url = one_slot
    async with (
        httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as http,
        http.stream("POST", CHAT, json=_chat(3000)) as running,
    ):
        assert running.status_code == 200
        with anyio.CancelScope() as scope:

            async def wait_then_leave() -> None:
                await _wait_for(lambda: engine.waiting == 1, "waiting for the slot")
                scope.cancel()  # the client gives up: its connection closes

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait_then_leave)
                await http.post(CHAT, json=_chat(2))
        assert scope.cancelled_caught
        await _wait_for(lambda: engine.waiting == 0, "the line emptied")
        await _wait_for(lambda: door.in_flight == 1, "only the running stream left")
    await _until_slots_free(engine)


async def test_a_storm_of_dropped_and_cancelled_streams_leaves_nothing_taken(
    tiny_model: Path,
) -> None:
    engine = AsyncEngine(
        tiny_model, placement=Placement.cpu(2), server=ServerConfig(n_parallel=2, ctx_size=4096)
    )
    door = FrontDoor(engine, api_keys=[KEY])
    async with running_door(door) as url:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60, limits=limits) as http:
            finished = 0

            async def one(i: int) -> None:
                nonlocal finished
                mode = i % 4
                with anyio.CancelScope() as scope:
                    if mode == 0:  # gone before any answer (maybe still waiting)
                        scope.cancel()
                    async with http.stream("POST", CHAT, json=_chat(400 if mode else 6)) as answer:
                        lines = _data_lines(answer)
                        if mode == 1:  # closes after the first event
                            await anext(lines)
                            return
                        if mode == 2:  # cancelled mid-stream
                            await anext(lines)
                            await anext(lines)
                            scope.cancel()
                            await anext(lines)
                        async for _ in lines:
                            pass
                        finished += 1

            async with anyio.create_task_group() as tg:
                for i in range(40):
                    tg.start_soon(one, i)
            assert finished == 10  # mode 3: read to the end
        await _wait_for(lambda: door.in_flight == 0, "no request left in the door")
        await _until_slots_free(engine)
        assert engine.waiting == 0
        assert all(info.outstanding == 0 for info in engine.servers)


# ---------------------------------------------------------------------- upstream faults


async def test_an_upstream_crash_mid_stream_ends_the_relay_with_an_error_event(
    one_slot: tuple[AsyncEngine, FrontDoor, str],
) -> None:
    engine, _, url = one_slot
    pid = engine.servers[0].pid
    assert pid is not None
    async with (
        httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as http,
        http.stream("POST", CHAT, json=_chat(3000)) as answer,
    ):
        assert answer.status_code == 200
        lines = _data_lines(answer)
        await anext(lines)
        os.kill(pid, signal.SIGKILL)
        rest = [line async for line in lines]
    assert rest, "the relay ended without a word"
    assert "[DONE]" not in rest
    last = msgspec.json.decode(rest[-1])
    assert set(last) == {"error"}
    assert last["error"]["type"] == "server_error"
    assert "cpu0" in last["error"]["message"]
    # The engine restarts it; the door takes requests again.
    await _wait_for(lambda: engine.servers[0].state == "ready", "restarted", timeout=30)


async def test_an_event_that_did_not_parse_is_not_relayed() -> None:
    with replay_server(tokens=20) as upstream:
        engine = AsyncEngine(placement=Placement.remote([upstream]))
        door = FrontDoor(engine, api_keys=[KEY])
        async with running_door(door) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as http:
            body = {**_chat(20), "_replay_fault": "malformed_json"}
            async with http.stream("POST", CHAT, json=body) as answer:
                lines = [line async for line in _data_lines(answer)]
    decoded = [msgspec.json.decode(line) for line in lines]  # every relayed event parses
    assert set(decoded[-1]) == {"error"}
    assert "not a valid chunk" in decoded[-1]["error"]["message"]


def test_servers_page_entries_carry_no_logs_and_no_credentials() -> None:
    from llamatelemetry_async.frontdoor._app import _without_userinfo

    assert _without_userinfo("http://user:hunter2@10.0.0.5:8080") == "http://10.0.0.5:8080"
    assert _without_userinfo("http://10.0.0.5:8080") == "http://10.0.0.5:8080"
    assert _without_userinfo(None) is None


async def test_an_error_event_from_the_server_is_relayed_as_it_was_sent() -> None:
    with replay_server(tokens=20) as upstream:
        engine = AsyncEngine(placement=Placement.remote([upstream]))
        door = FrontDoor(engine, api_keys=[KEY])
        async with running_door(door) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as http:
            body = {**_chat(20), "_replay_fault": "error_event"}
            async with http.stream("POST", CHAT, json=body) as answer:
                assert answer.status_code == 200
                lines = [line async for line in _data_lines(answer)]
    assert "error" in msgspec.json.decode(lines[-1])


# ---------------------------------------------------------------------- drain


async def test_drain_lets_the_stream_finish_and_refuses_new_requests(
    one_slot: tuple[AsyncEngine, FrontDoor, str],
) -> None:
    engine, door, url = one_slot
    async with (
        httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as http,
        http.stream("POST", CHAT, json=_chat(300)) as answer,
    ):
        lines = _data_lines(answer)
        await anext(lines)
        async with anyio.create_task_group() as tg:
            tg.start_soon(door.drain)
            await _wait_for(lambda: door.state == "draining", "draining")
            health = await http.get("/health")
            assert health.status_code == 503
            assert health.json()["status"] == "draining"
            refused = await http.post(CHAT, json=_chat(2))
            assert refused.status_code == 503
            assert "shutting down" in refused.json()["error"]["message"]
            rest = [line async for line in lines]
        assert rest[-1] == "[DONE]"  # it finished as if nothing happened
    assert door.in_flight == 0
    assert engine.running  # drain does not stop the engine; leaving the door does


async def test_a_stream_past_the_drain_timeout_ends_with_an_error_event() -> None:
    # Paced at 20 tokens/s, 400 tokens: this stream outlives a 0.3 s drain.
    with replay_server(tokens=400, rate=20.0, slots=4) as upstream:
        engine = AsyncEngine(placement=Placement.remote([upstream]))
        door = FrontDoor(engine, api_keys=[KEY], drain_timeout=0.3)
        lines: list[str] = []
        async with httpx.AsyncClient(headers=AUTH, timeout=30) as http:
            async with running_door(door) as url:
                answer = await http.send(
                    http.build_request("POST", url + CHAT, json=_chat(400)), stream=True
                )
                reader = _data_lines(answer)
                lines.append(await anext(reader))
            # Leaving the door: drained for 0.3 s, then the engine stopped under the stream.
            lines += [line async for line in reader]
            await answer.aclose()
    assert len(lines) < 400
    assert "[DONE]" not in lines
    assert "error" in msgspec.json.decode(lines[-1])


async def test_an_engine_that_cannot_start_fails_the_door_with_its_own_error(
    tiny_model: Path, tmp_path: Path
) -> None:
    binary = tmp_path / "broken-llama-server"
    binary.write_text('#!/bin/sh\necho "cannot load the model" >&2\nexit 3\n')
    binary.chmod(0o755)
    engine = AsyncEngine(tiny_model, placement=Placement.cpu(1), binary=binary)
    door = FrontDoor(engine, api_keys=[KEY])
    with anyio.fail_after(30), pytest.raises(ServerStartError) as failed:
        async with running_door(door):
            pytest.fail("the door must not open onto an engine that did not start")
    assert "cannot load the model" in str(failed.value)
    assert door.error is failed.value
    assert door.state == "closed"


# ---------------------------------------------------------------------- any ASGI server


class _Client:
    """One request to an ASGI app, driven directly (no server): what any ASGI server does."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = msgspec.json.encode(body)
        self.sent = False
        self.gone = anyio.Event()  # set: the client disconnects
        self.messages: list[dict[str, Any]] = []
        self.first_body = anyio.Event()

    async def receive(self) -> dict[str, Any]:
        if not self.sent:
            self.sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        if message["type"] == "http.response.body":
            self.first_body.set()
            if not message.get("more_body"):
                self.gone.set()  # ASGI: receive() says disconnect once the response is done

    async def call(self, app: Any) -> None:
        headers = [(b"authorization", f"Bearer {KEY}".encode()), (b"host", b"door")]
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": CHAT, "raw_path": CHAT.encode(), "root_path": "",
            "query_string": b"", "headers": headers, "server": ("127.0.0.1", 80),
            "client": ("127.0.0.1", 5000),
        }  # fmt: skip
        await app(scope, self.receive, self.send)


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_the_door_relays_and_notices_disconnects_under_any_asgi_server(
    tiny_model: Path, anyio_backend: str
) -> None:
    engine = AsyncEngine(
        tiny_model, placement=Placement.cpu(1), server=ServerConfig(n_parallel=1, ctx_size=4096)
    )
    async with FrontDoor(engine, api_keys=[KEY]) as door:
        await door.wait_ready()
        whole = _Client(_chat(5))
        with anyio.fail_after(30):
            await whole.call(door)
        assert whole.messages[0]["status"] == 200
        events = b"".join(m.get("body", b"") for m in whole.messages[1:]).split(b"\n\n")
        assert events[-2] == b"data: [DONE]"
        # A client that leaves mid-stream: the relay ends and the server's slot is free.
        leaving = _Client(_chat(3000))
        async with anyio.create_task_group() as tg:
            tg.start_soon(leaving.call, door)
            with anyio.fail_after(30):
                await leaving.first_body.wait()
            assert await _busy_slots(engine) == 1
            leaving.gone.set()
        assert door.in_flight == 0
        await _until_slots_free(engine)


async def test_start_and_aclose_drain_without_async_with(tiny_model: Path) -> None:
    # A notebook: the door (and its engine) live across cells.
    engine = AsyncEngine(tiny_model, placement=Placement.cpu(1))
    door = await FrontDoor(engine, api_keys=[KEY]).start()
    states = [door.state]  # the door answers (503) while the servers load
    await door.wait_ready()
    states.append(door.state)
    assert states == ["starting", "ready"]
    pids = [info.pid for info in engine.servers if info.pid is not None]
    assert engine.running
    with pytest.raises(UsageError, match="already started"):
        await door.start()
    await door.aclose()
    await door.aclose()
    assert door.state in ("closed",)
    assert not engine.running
    assert gone(pids)
