"""Several-model engine under unlucky timing, the RAM room in a container, and ``auto``'s
clean-up: each test here failed before its fix (real CPU llama-servers, the tiny model)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from llamatelemetry_async import (
    AsyncEngine,
    EngineError,
    EngineModel,
    ModelDoesNotFitError,
    Placement,
    ServerConfig,
)
from llamatelemetry_async.models import _ram, inspect_model, plan_ram
from llamatelemetry_async.testing import write_tiny_model

SMALL = ServerConfig(n_parallel=2, ctx_size=512)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("other") / "other.gguf", seed=1)


async def _one_model_bytes(tiny: Path) -> int:
    info = await inspect_model(tiny)
    plans = Placement.cpu(1).plans([])
    return plan_ram(info, plans, available_bytes=2**40, ctx_size=512, n_parallel=2).total_bytes


def _room_for_one(engine_box: list[AsyncEngine], one: int) -> Callable[[], int]:
    """What the RAM plan reads as free: room for one model's server at a time."""

    def available() -> int:
        states = engine_box[0].model_states.values()
        loaded = sum(1 for state in states if state in ("ready", "unloading"))
        return one * 3 // 2 - loaded * one

    return available


async def _wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    # Model states change in the engine's own tasks (no event exposes them); bounded.
    with anyio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.01)


def _servers_alive() -> set[int]:
    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and p.name() == "llama-server"
    }


class _WakeFirst:
    """An ``anyio.Event`` whose ``set()`` first wakes another task: a request for the model
    chosen for eviction runs in the same scheduling round as the eviction itself."""

    def __init__(self, event: anyio.Event, first: anyio.Event) -> None:
        self._event = event
        self._first = first

    def set(self) -> None:
        self._first.set()
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()


@pytest.mark.anyio
async def test_a_request_for_the_model_being_evicted_is_not_served_by_its_dying_servers(
    tiny_model: Path, other_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = await _one_model_bytes(tiny_model)
    box: list[AsyncEngine] = []
    tight = _room_for_one(box, one)
    room = {"tight": True}
    monkeypatch.setattr(_ram, "read_available_ram", lambda: tight() if room["tight"] else 2**40)
    models = {
        "a": EngineModel(tiny_model, placement=Placement.cpu(1), server=SMALL),
        "b": EngineModel(other_model, placement=Placement.cpu(1), server=SMALL, preload=False),
    }
    engine = AsyncEngine(models=models)
    box.append(engine)
    evicting = anyio.Event()
    got: dict[str, Any] = {}
    async with engine:
        assert engine._models is not None
        a_model = engine._models.models["a"]
        a_model.evict = _WakeFirst(a_model.evict, evicting)  # type: ignore[assignment]

        async def request_a() -> None:
            await evicting.wait()
            room["tight"] = False  # "a" was chosen to go: from now on both fit
            try:
                got["a"] = (await engine.completion("Hi", model="a", n_predict=2)).content
            except Exception as exc:  # what the request saw, checked below
                got["a"] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(request_a)
            got["b"] = (await engine.completion("Hi", model="b", n_predict=2)).content
        states = engine.model_states
    assert isinstance(got["a"], str), f"the request for 'a' failed: {got['a']!r}"
    assert isinstance(got["b"], str)
    assert states == {"a": "ready", "b": "ready"}  # "a" loaded again, beside "b"
    assert a_model.loads == 2


@pytest.mark.anyio
async def test_requests_waiting_for_a_load_that_fails_all_get_its_error_from_one_try(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The load is held in its RAM check (a worker thread) until every request waits for it.
    release = threading.Event()
    reads = 0

    def nothing_free() -> int:
        nonlocal reads
        reads += 1  # once per load tried (each plans the RAM once)
        release.wait(20)
        return 0

    monkeypatch.setattr(_ram, "read_available_ram", nothing_free)
    models = {"a": EngineModel(tiny_model, placement=Placement.cpu(1), server=SMALL, preload=False)}
    errors: list[BaseException] = []
    try:
        async with AsyncEngine(models=models) as engine:
            assert engine._models is not None
            lock = engine._models._load_lock

            async def one() -> None:
                try:
                    await engine.completion("Hi", model="a", n_predict=2)
                except ModelDoesNotFitError as exc:
                    errors.append(exc)

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(one)
                    await _wait_for(lambda: reads == 1)  # the load has begun
                    for _ in range(4):  # requests that arrive while it runs
                        tg.start_soon(one)
                    await _wait_for(lambda: lock.statistics().tasks_waiting == 4)
                    release.set()
            assert len(errors) == 5  # every waiting request got the error
            assert reads == 1  # from one load, not one load per waiting request
            # A request after the failure tries again (the machine may have room now).
            with pytest.raises(ModelDoesNotFitError):
                await engine.completion("Hi", model="a", n_predict=2)
            assert reads == 2
    finally:
        release.set()


@pytest.mark.anyio
async def test_closing_the_engine_ends_loads_in_flight_with_a_typed_error(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The load is held in its RAM check (a worker thread) until the engine closes.
    release = threading.Event()

    def held() -> int:
        release.wait(20)
        return 2**40

    monkeypatch.setattr(_ram, "read_available_ram", held)
    models = {"a": EngineModel(tiny_model, placement=Placement.cpu(1), server=SMALL, preload=False)}
    before = _servers_alive()
    outcomes: list[BaseException | str] = []
    try:
        with anyio.fail_after(30):
            async with (
                anyio.create_task_group() as requests,
                AsyncEngine(models=models) as engine,
            ):

                async def one() -> None:
                    try:
                        reply = await engine.completion("Hi", model="a", n_predict=2)
                        outcomes.append(reply.content)
                    except Exception as exc:  # checked below
                        outcomes.append(exc)

                async def release_when_closing() -> None:
                    await _wait_for(lambda: not engine.running)
                    release.set()

                for _ in range(3):
                    requests.start_soon(one)
                await _wait_for(lambda: engine.model_states["a"] == "loading")
                requests.start_soon(release_when_closing)
    finally:
        release.set()
    assert len(outcomes) == 3
    assert all(isinstance(o, EngineError) and "closed" in str(o) for o in outcomes), outcomes
    # The load stopped where it was: no server was started for the closed engine.
    assert engine._models.models["a"].loads == 0  # type: ignore[union-attr]
    assert _servers_alive() <= before


@pytest.mark.anyio
async def test_preloading_does_not_unload_a_model_it_preloaded(
    tiny_model: Path, other_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = await _one_model_bytes(tiny_model)
    box: list[AsyncEngine] = []
    monkeypatch.setattr(_ram, "read_available_ram", _room_for_one(box, one))
    models = {
        "a": EngineModel(tiny_model, placement=Placement.cpu(1), server=SMALL),
        "b": EngineModel(other_model, placement=Placement.cpu(1), server=SMALL),
    }
    engine = AsyncEngine(models=models)
    box.append(engine)
    async with engine:
        # The first (the default) stays; the next loads on its first request.
        assert engine.model_states == {"a": "ready", "b": "stopped"}
        assert engine._models.models["a"].loads == 1  # type: ignore[union-attr]
        assert (await engine.completion("Hi", model="b", n_predict=2)).content is not None
        assert engine.model_states == {"a": "stopped", "b": "ready"}


@pytest.mark.anyio
async def test_preloading_a_model_that_fits_nowhere_still_fails_the_start(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_ram, "read_available_ram", lambda: 0)
    models = {"a": EngineModel(tiny_model, placement=Placement.cpu(1), server=SMALL)}
    with pytest.raises(ModelDoesNotFitError):
        async with AsyncEngine(models=models):
            pass


def test_cgroup_room_counts_page_cache_no_process_maps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    GiB = 2**30
    # A 16 GiB container whose charge (12 GiB) holds 10 GiB of file pages: 9 GiB of a model
    # unloaded (or just downloaded) that nobody maps now, 1 GiB mapped by a running server.
    (tmp_path / "memory.max").write_text(f"{16 * GiB}\n")
    (tmp_path / "memory.current").write_text(f"{12 * GiB}\n")
    stat = f"anon {2 * GiB}\nfile {10 * GiB}\nfile_mapped {1 * GiB}\n"
    stat += f"active_file {6 * GiB}\ninactive_file {4 * GiB}\nslab 10\n"
    (tmp_path / "memory.stat").write_text(stat)
    monkeypatch.setattr(_ram, "_CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(_ram, "_PROC_CGROUP", tmp_path / "no-such-file")
    assert _ram._cgroup_room() == 16 * GiB - 3 * GiB  # anon and mapped pages are used
    # memory.stat unreadable: the whole charge counts as used.
    (tmp_path / "memory.stat").unlink()
    assert _ram._cgroup_room() == 4 * GiB
    (tmp_path / "memory.max").write_text("max\n")
    assert _ram._cgroup_room() is None


def test_cgroup_v1_room_counts_page_cache_no_process_maps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    GiB = 2**30
    v1 = tmp_path / "memory"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text(f"{8 * GiB}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{6 * GiB}\n")
    stat = f"inactive_file 1\ntotal_active_file {2 * GiB}\ntotal_inactive_file {2 * GiB}\n"
    stat += f"total_mapped_file {1 * GiB}\n"
    (v1 / "memory.stat").write_text(stat)
    monkeypatch.setattr(_ram, "_CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(_ram, "_PROC_CGROUP", tmp_path / "no-such-file")
    assert _ram._cgroup_room() == 8 * GiB - 3 * GiB


def test_cgroup_room_is_read_from_the_process_own_cgroup_and_those_above(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A service's cgroup without a namespace (systemd's MemoryMax=): /proc/self/cgroup
    # names it below the mount, whose root has no limit.
    GiB = 2**30
    proc = tmp_path / "cgroup"
    proc.write_text("0::/system.slice/llm.service\n")
    service = tmp_path / "sys" / "system.slice" / "llm.service"
    service.mkdir(parents=True)
    (service / "memory.max").write_text(f"{4 * GiB}\n")
    (service / "memory.current").write_text(f"{1 * GiB}\n")
    (service.parent / "memory.max").write_text(f"{8 * GiB}\n")
    (service.parent / "memory.current").write_text(f"{6 * GiB}\n")  # the slice: 2 GiB room
    monkeypatch.setattr(_ram, "_CGROUP_ROOT", tmp_path / "sys")
    monkeypatch.setattr(_ram, "_PROC_CGROUP", proc)
    assert _ram._cgroup_room() == 2 * GiB
    (service.parent / "memory.max").write_text("max\n")
    assert _ram._cgroup_room() == 3 * GiB
    # v1: the memory controller's line names the cgroup.
    proc.write_text("4:memory:/ci/job\n3:cpu:/\n")
    job = tmp_path / "sys" / "memory" / "ci" / "job"
    job.mkdir(parents=True)
    (job / "memory.limit_in_bytes").write_text(f"{2 * GiB}\n")
    (job / "memory.usage_in_bytes").write_text(f"{GiB // 2}\n")
    assert _ram._cgroup_room() == 3 * GiB // 2


@pytest.mark.anyio
@pytest.mark.parametrize("_way", ["asyncio"])  # a started engine: asyncio only (see auto)
async def test_auto_stops_the_engine_it_started_when_it_cannot_return_it(
    tiny_model: Path,
) -> None:
    before = _servers_alive()

    def say(line: str) -> None:
        if line.startswith("server "):  # the engine runs by now
            raise RuntimeError("the notebook's output broke")

    with pytest.raises(RuntimeError, match="output broke"):
        await AsyncEngine.auto(tiny_model, server=SMALL, say=say)
    assert _servers_alive() <= before


@pytest.mark.anyio
async def test_pinning_holds_where_pidfd_is_missing(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A kernel before 5.3 or a sandbox without pidfd_open: trio spawns without the
    # parent-death signal, and the shim still pins every thread.
    from llamatelemetry_async import find_llama_server
    from llamatelemetry_async.server import LlamaServer, ServerPlan, _process, server_command

    monkeypatch.setattr(_process, "_pidfd_works", lambda: False)
    core = max(os.sched_getaffinity(0))
    plan = ServerPlan("cpu0", (), cores=(core,), threads=1)
    argv, env = server_command(SMALL, binary=find_llama_server(), model=tiny_model, plan=plan)
    server = LlamaServer(argv, env, cores=(core,))
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        assert server.pid is not None
        threads = psutil.Process(server.pid).threads()
        assert {tuple(sorted(os.sched_getaffinity(t.id))) for t in threads} == {(core,)}
        tg.cancel_scope.cancel()


def test_available_cores_keeps_to_a_cgroup_cpu_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llamatelemetry_async import _placement

    mask = sorted(os.sched_getaffinity(0))
    proc = tmp_path / "cgroup"
    proc.write_text("0::/\n")
    monkeypatch.setattr(_placement, "_CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(_placement, "_PROC_CGROUP", proc)
    assert _placement.available_cores() == mask  # no cpu.max: the mask
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _placement.available_cores() == mask
    # docker --cpus=0.5 (rounded up: one core) or 1.5 (two): the first cores of the mask.
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert _placement.available_cores() == mask[:1]
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert _placement.available_cores() == mask[:2]
    # A quota on the process's own cgroup below the mount, and cgroup v1.
    (tmp_path / "cpu.max").unlink()
    job = tmp_path / "ci" / "job"
    job.mkdir(parents=True)
    (job / "cpu.max").write_text("100000 100000\n")
    proc.write_text("0::/ci/job\n")
    assert _placement.available_cores() == mask[:1]
    proc.write_text("2:cpu,cpuacct:/\n")
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _placement.available_cores() == mask
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert _placement.available_cores() == mask[:1]
