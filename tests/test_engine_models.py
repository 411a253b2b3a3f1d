"""Several models behind one engine: routed by name, loaded on demand, unloaded when idle or
for room, listed, and refused by name when unknown (real CPU llama-servers)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from llamatelemetry_async import (
    AsyncEngine,
    ConfigError,
    EngineModel,
    ModelDoesNotFitError,
    ModelNotFoundError,
    Placement,
    ServerConfig,
)
from llamatelemetry_async.models import _ram, inspect_model, plan_ram
from llamatelemetry_async.testing import write_tiny_model

pytestmark = pytest.mark.anyio

SMALL = ServerConfig(n_parallel=2, ctx_size=512)
GREEDY: dict[str, Any] = {"temperature": 0, "seed": 3, "n_predict": 6}


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny model with other weights: its greedy text differs."""
    return write_tiny_model(tmp_path_factory.mktemp("other") / "other.gguf", seed=1)


def _models(tiny: Path, other: Path, **second: object) -> dict[str, EngineModel]:
    return {
        "a": EngineModel(tiny, placement=Placement.cpu(1), server=SMALL),
        "b": EngineModel(other, placement=Placement.cpu(1), server=SMALL, **second),  # type: ignore[arg-type]
    }


async def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    # Model states change in the engine's own tasks (no event exposes them); bounded.
    with anyio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.02)


def _pids(engine: AsyncEngine, model: str) -> set[int]:
    return {s.pid for s in engine.servers if s.model == model and s.pid is not None}


async def test_requests_go_to_the_model_they_name(tiny_model: Path, other_model: Path) -> None:
    async with AsyncEngine(tiny_model, placement=Placement.cpu(1), server=SMALL) as alone:
        expected_a = (await alone.completion("Once upon a time", **GREEDY)).content
    async with AsyncEngine(other_model, placement=Placement.cpu(1), server=SMALL) as alone:
        expected_b = (await alone.completion("Once upon a time", **GREEDY)).content
    assert expected_a != expected_b  # the two models tell their servers apart
    async with AsyncEngine(models=_models(tiny_model, other_model)) as engine:
        assert engine.model_states == {"a": "ready", "b": "ready"}  # both preloaded
        assert [(s.name, s.model) for s in engine.servers] == [("a/cpu0", "a"), ("b/cpu0", "b")]
        got_b = (await engine.completion("Once upon a time", model="b", **GREEDY)).content
        got_a = (await engine.completion("Once upon a time", model="a", **GREEDY)).content
        # No model named: the default (the first).
        got_default = (await engine.completion("Once upon a time", **GREEDY)).content
        async with engine.stream("Once upon a time", model="b", **GREEDY) as stream:
            streamed_b = "".join([chunk.content async for chunk in stream])
        served = {s.model: s.served for s in engine.servers}
    assert (got_a, got_b, got_default, streamed_b) == (
        expected_a,
        expected_b,
        expected_a,
        expected_b,
    )
    assert served == {"a": 2, "b": 2}


async def test_an_unknown_model_is_a_typed_error(tiny_model: Path, other_model: Path) -> None:
    async with AsyncEngine(models=_models(tiny_model, other_model)) as engine:
        with pytest.raises(ModelNotFoundError) as info:
            await engine.completion("x", model="c", n_predict=2)
        assert "'c'" in str(info.value)
        assert info.value.tried == ["a", "b"]
        with pytest.raises(ModelNotFoundError):
            async with engine.stream("x", model="nope", n_predict=2) as stream:
                async for _ in stream:
                    pass
        # Nothing was held by the refused requests: both models are idle.
        assert (await engine.completion("x", model="a", n_predict=2)).content is not None


async def test_ttl_unloads_an_idle_model_and_its_next_request_loads_it_again(
    tiny_model: Path, other_model: Path
) -> None:
    models = _models(tiny_model, other_model, ttl=0.5, preload=False)
    async with AsyncEngine(models=models) as engine:
        assert engine.model_states == {"a": "ready", "b": "stopped"}
        assert _pids(engine, "b") == set()
        # Several first requests at once: one load, every one served.
        results: list[str] = []

        async def one() -> None:
            results.append((await engine.completion("Hi", model="b", **GREEDY)).content)

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(one)
        assert len(set(results)) == 1
        assert len(results) == 4
        first = _pids(engine, "b")
        assert len(first) == 1
        # A stream in flight keeps the model loaded past its ttl.
        async with engine.stream("Hi", model="b", n_predict=2) as stream:
            await anyio.sleep(0.8)  # longer than the ttl: the point of this check
            assert engine.model_states["b"] == "ready"
            assert [chunk async for chunk in stream]
        await _wait_for(lambda: engine.model_states["b"] == "stopped", "b unloaded")
        assert not any(psutil.pid_exists(pid) for pid in first)
        assert engine.model_states["a"] == "ready"  # no ttl: kept
        again = (await engine.completion("Hi", model="b", **GREEDY)).content
        assert again == results[0]
        second = _pids(engine, "b")
        assert second
        assert second != first


async def test_a_stream_dropped_without_aclose_does_not_keep_its_model(
    tiny_model: Path, other_model: Path
) -> None:
    models = _models(tiny_model, other_model, ttl=0.3, preload=False)
    async with AsyncEngine(models=models) as engine:
        stream = engine.stream("Hi", model="b", n_predict=200)
        async for _ in stream:
            break
        del stream  # dropped mid-stream, never closed
        await _wait_for(lambda: engine.model_states["b"] == "stopped", "b unloaded")


async def test_a_model_that_does_not_fit_unloads_the_least_recently_used(
    tiny_model: Path, other_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kernel's free memory, as the RAM plan reads it, made to hold one model at a time:
    # what the loaded models' servers were planned to use is taken from a fixed budget.
    info = await inspect_model(tiny_model)
    one = plan_ram(
        info, Placement.cpu(1).plans([]), available_bytes=2**40, ctx_size=512, n_parallel=2
    ).total_bytes
    engine_box: list[AsyncEngine] = []

    def available() -> int:
        # Servers that run now: a model still loading has spawned nothing yet.
        states = engine_box[0].model_states.values()
        loaded = sum(1 for state in states if state in ("ready", "unloading"))
        return one * 3 // 2 - loaded * one

    monkeypatch.setattr(_ram, "read_available_ram", available)
    models = {
        "a": EngineModel(tiny_model, placement=Placement.cpu(1), server=SMALL),
        "b": EngineModel(other_model, placement=Placement.cpu(1), server=SMALL, preload=False),
    }
    engine = AsyncEngine(models=models)
    engine_box.append(engine)
    async with engine:
        a_pids = _pids(engine, "a")
        await engine.completion("Hi", model="b", n_predict=2)  # no room: "a" goes
        assert engine.model_states == {"a": "stopped", "b": "ready"}
        assert not any(psutil.pid_exists(pid) for pid in a_pids)
        # "b" busy with a stream: it cannot be unloaded, and "a" does not fit beside it.
        async with engine.stream("Hi", model="b", n_predict=50) as stream:
            async for _ in stream:
                break
            with pytest.raises(ModelDoesNotFitError) as error:
                await engine.completion("Hi", model="a", n_predict=2)
        assert "is available" in str(error.value)
        assert any("requests in flight: b" in note for note in error.value.__notes__)
        assert engine.model_states == {"a": "stopped", "b": "ready"}
        await engine.completion("Hi", model="a", n_predict=2)  # "b" idle now: it goes
        assert engine.model_states == {"a": "ready", "b": "stopped"}


def test_bad_settings_are_config_errors(tiny_model: Path) -> None:
    good = {"a": EngineModel(tiny_model, placement=Placement.cpu(1))}
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: AsyncEngine(tiny_model, models=good), "models"),
        (lambda: AsyncEngine(models={}), "models"),
        (lambda: AsyncEngine(models={"a/b": good["a"]}), "models"),
        (lambda: AsyncEngine(models={"a": tiny_model}), "models"),  # type: ignore[dict-item]
        (lambda: AsyncEngine(models=good, default_model="z"), "default_model"),
        (lambda: AsyncEngine(tiny_model, default_model="a"), "models"),
        (lambda: EngineModel(tiny_model, ttl=0), "ttl"),
        (lambda: EngineModel(tiny_model, ttl=float("inf")), "ttl"),
        (
            lambda: EngineModel(tiny_model, placement=Placement.remote("http://127.0.0.1:9")),
            "placement",
        ),
    ]
    for make, field in cases:
        with pytest.raises(ConfigError) as info:
            make()
        assert info.value.field == field


async def test_loads_cancelled_in_a_storm_leave_no_process_and_a_usable_model(
    tiny_model: Path, other_model: Path
) -> None:
    models = _models(tiny_model, other_model, preload=False)
    async with AsyncEngine(models=models) as engine:
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        # Requests that give up while their model loads, at several points of the load.
        for delay in (0.0, 0.01, 0.05, 0.1, 0.2):
            with anyio.move_on_after(delay):
                await engine.completion("Hi", model="b", n_predict=2)
        assert engine.model_states["b"] in ("stopped", "ready")
        # Every llama-server alive now belongs to a model the engine says is loaded.
        alive = {p.pid for p in psutil.Process().children(recursive=True)} - before
        loaded = {s.pid for s in engine.servers}
        assert {p for p in alive if psutil.Process(p).name() == "llama-server"} <= loaded
        reply = await engine.completion("Hi", model="b", **GREEDY)
        assert reply.content
        assert engine.model_states["b"] == "ready"
