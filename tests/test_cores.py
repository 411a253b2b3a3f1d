"""Servers sharing the machine's cores: the split (pure), the argv and pinning it leads to,
the RAM plan of CPU servers, and real engines whose llama-servers run as split."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import anyio
import psutil
import pytest

from llamatelemetry_async import (
    AsyncEngine,
    ConfigError,
    ModelDoesNotFitError,
    Placement,
    ServerConfig,
)
from llamatelemetry_async._placement import GPU_SERVER_THREADS, available_cores, share_cores
from llamatelemetry_async.models import (
    SERVER_OVERHEAD_BYTES,
    ModelInfo,
    inspect_model,
    model_shape,
    plan_ram,
    read_available_ram,
)
from llamatelemetry_async.server import (
    LlamaServer,
    ServerPlan,
    core_ranges,
    describe_cores,
    server_affinity,
    server_command,
)

CPU = ServerPlan("cpu0", ())
GPU = ServerPlan("gpu0", (0,))
GiB = 2**30


def _cpu(n: int) -> list[ServerPlan]:
    return [ServerPlan(f"cpu{i}", ()) for i in range(n)]


def _gpu(n: int) -> list[ServerPlan]:
    return [ServerPlan(f"gpu{i}", (i,)) for i in range(n)]


# -- the split, pure ----------------------------------------------------------------------

SERVERS = (1, 2, 3, 4)
CORES: dict[str, list[int]] = {
    "1 core": [0],
    "2 cores": [0, 1],
    "4 cores": [0, 1, 2, 3],
    "16 cores": list(range(16)),
    "mask 2,3,5,7": [2, 3, 5, 7],  # an affinity mask with gaps (a container, taskset)
    "mask 8-15": list(range(8, 16)),
}


def _check_split(plans: Sequence[ServerPlan], cores: Sequence[int]) -> list[ServerPlan]:
    shared = share_cores(plans, cores)
    assert [p.name for p in shared] == [p.name for p in plans]  # order and identity kept
    assert [p.gpus for p in shared] == [p.gpus for p in plans]
    for plan in shared:
        assert plan.cores, plan
        assert set(plan.cores) <= set(cores), plan  # never outside the affinity mask
        assert plan.threads == len(plan.cores), plan  # one thread per core
    return shared


@pytest.mark.parametrize("n", SERVERS)
@pytest.mark.parametrize("where", CORES)
def test_cpu_servers_get_disjoint_even_shares(n: int, where: str) -> None:
    cores = CORES[where]
    shared = _check_split(_cpu(n), cores)
    if len(cores) >= n:
        taken = [core for plan in shared for core in plan.cores]
        assert len(taken) == len(set(taken)), shared  # no core computes for two servers
        assert sorted(taken) == sorted(cores)  # and every core computes for one
        sizes = [len(plan.cores) for plan in shared]
        assert max(sizes) - min(sizes) <= 1, sizes
        assert all(plan.poll is None for plan in shared)  # llama-server's own polling
    else:
        # More servers than cores: one thread each, the cores dealt round, no polling.
        assert all(plan.threads == 1 and plan.poll == 0 for plan in shared)
        assert {plan.cores[0] for plan in shared} == set(cores)


@pytest.mark.parametrize("n", SERVERS)
@pytest.mark.parametrize("where", CORES)
def test_gpu_servers_get_a_few_threads_each(n: int, where: str) -> None:
    cores = CORES[where]
    shared = _check_split(_gpu(n), cores)
    if len(cores) >= n:
        expected = min(GPU_SERVER_THREADS, len(cores) // n)
        assert [plan.threads for plan in shared] == [expected] * n
        taken = [core for plan in shared for core in plan.cores]
        assert len(taken) == len(set(taken))


@pytest.mark.parametrize(("n_gpu", "n_cpu"), [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("where", ["4 cores", "16 cores", "mask 8-15"])
def test_mixed_gpu_and_cpu_servers(n_gpu: int, n_cpu: int, where: str) -> None:
    cores = CORES[where]
    plans = _gpu(n_gpu) + _cpu(n_cpu)
    shared = _check_split(plans, cores)
    fair = len(cores) // len(plans)
    gpu_threads = min(GPU_SERVER_THREADS, fair)
    assert all(p.threads == gpu_threads for p in shared if p.gpus)
    cpu_sizes = [len(p.cores) for p in shared if not p.gpus]
    # The CPU servers divide what the GPU servers leave, evenly.
    assert sum(cpu_sizes) == len(cores) - n_gpu * gpu_threads
    assert max(cpu_sizes) - min(cpu_sizes) <= 1
    taken = [core for plan in shared for core in plan.cores]
    assert len(taken) == len(set(taken))


def test_worked_examples() -> None:
    assert share_cores(_cpu(2), [0, 1]) == [
        ServerPlan("cpu0", (), cores=(0,), threads=1),
        ServerPlan("cpu1", (), cores=(1,), threads=1),
    ]
    # Kaggle: two T4s and 4 cores.
    assert [p.cores for p in share_cores(_gpu(2), range(4))] == [(0, 1), (2, 3)]
    # An H100 box: the GPU server takes 4 of 16, the other 12 stay with the application.
    assert share_cores(_gpu(1), range(16)) == [
        ServerPlan("gpu0", (0,), cores=(0, 1, 2, 3), threads=4)
    ]
    assert [p.cores for p in share_cores(_cpu(3), [0, 1])] == [(0,), (1,), (0,)]


def test_placement_plans_divide_cores_only_when_asked() -> None:
    assert Placement.cpu(2).plans([]) == _cpu(2)  # nothing known of the cores: unchanged
    plans = Placement.cpu(2).plans([], cores=[0, 1, 2, 3])
    assert [p.cores for p in plans] == [(0, 1), (2, 3)]
    pair = Placement.pairs().plans([0, 1], cores=range(8))
    assert pair[0].tensor_split == (0.5, 0.5)
    assert pair[0].cores == (0, 1, 2, 3)


@pytest.mark.parametrize("bad", [[-1], [True], ["0"], [0.5]])
def test_bad_core_ids_are_config_errors(bad: list[object]) -> None:
    with pytest.raises(ConfigError) as info:
        share_cores(_cpu(1), bad)  # type: ignore[arg-type]
    assert info.value.field == "cores"


def test_available_cores_is_the_affinity_mask() -> None:
    from llamatelemetry_async._placement import _cpu_quota

    quota = _cpu_quota()  # a CPU quota keeps to its share of the mask (test_review_engine)
    mask = sorted(os.sched_getaffinity(0))
    assert available_cores() == (mask if quota is None else mask[: max(1, quota)])


def test_core_ranges() -> None:
    assert core_ranges([5, 0, 1, 2]) == "0-2,5"
    assert core_ranges([3]) == "3"
    assert core_ranges([]) == ""


# -- what the split becomes: argv, affinity, words ----------------------------------------


def _argv(config: ServerConfig, plan: ServerPlan) -> list[str]:
    return server_command(config, binary="llama-server", model="m.gguf", plan=plan, base_env={})[0]


def _flag(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_plan_threads_and_poll_reach_argv() -> None:
    plan = ServerPlan("cpu0", (), cores=(2, 3), threads=2, poll=0)
    argv = _argv(ServerConfig(), plan)
    assert _flag(argv, "--threads") == "2"
    assert _flag(argv, "--poll") == "0"
    assert "--threads-batch" not in argv  # llama-server's default: as --threads
    assert server_affinity(ServerConfig(), plan) == (2, 3)
    assert describe_cores(ServerConfig(), plan) == "2 threads on cores 2-3, poll 0"


def test_explicit_values_win() -> None:
    plan = ServerPlan("cpu0", (), cores=(2, 3), threads=2, poll=0)
    config = ServerConfig(threads=8, threads_batch=4, poll=50)
    argv = _argv(config, plan)
    assert (_flag(argv, "--threads"), _flag(argv, "--threads-batch")) == ("8", "4")
    assert _flag(argv, "--poll") == "50"
    # A thread count of the user's own is not squeezed onto the plan's cores.
    assert server_affinity(config, plan) == ()
    assert describe_cores(config, plan) == "8 threads on any core, poll 50"
    assert server_affinity(ServerConfig(cpu_affinity=(1, 0)), plan) == (0, 1)
    assert server_affinity(ServerConfig(cpu_affinity=()), plan) == ()  # never pinned


def test_unsplit_plan_leaves_llama_server_defaults() -> None:
    argv = _argv(ServerConfig(), CPU)
    assert "--threads" not in argv
    assert "--poll" not in argv
    assert server_affinity(ServerConfig(), CPU) == ()
    assert describe_cores(ServerConfig(), CPU) == "default threads on any core"


# -- the RAM plan of CPU servers ----------------------------------------------------------


def _seven_b() -> ModelInfo:
    return model_shape(
        n_layer=32, n_embd=4096, n_head=32, n_ff=11008, n_vocab=32000, n_ctx_train=4096,
        weight_type="Q4_0",
    )  # fmt: skip


def test_weights_count_once_and_each_server_adds_its_cache() -> None:
    model = _seven_b()
    one = plan_ram(model, _cpu(1), available_bytes=64 * GiB, ctx_size=4096)
    three = plan_ram(model, _cpu(3), available_bytes=64 * GiB, ctx_size=4096)
    per_server = one.total_bytes - one.weights_bytes
    assert three.weights_bytes == one.weights_bytes  # the file is mapped once
    assert three.total_bytes == one.weights_bytes + 3 * per_server
    # Llama-2-7B-like: 32 layers x 4096 tokens x 2 (K, V) x 4096 x 2 bytes = 2 GiB of KV.
    assert three.servers[0].kv_bytes == 2 * GiB
    assert three.servers[0].overhead_bytes == SERVER_OVERHEAD_BYTES
    assert three.fits
    assert "3 CPU server(s)" in three.summary()
    # GPU servers are the VRAM planner's: left out here.
    mixed = plan_ram(model, [*_gpu(1), *_cpu(1)], available_bytes=64 * GiB, ctx_size=4096)
    assert [s.server.name for s in mixed.servers] == ["cpu0"]


def test_servers_that_do_not_fit_raise_with_suggestions_that_fit() -> None:
    model = _seven_b()
    available = 8 * GiB  # 3.6 GiB of weights + 3 x 2 GiB of KV cache does not fit
    with pytest.raises(ModelDoesNotFitError) as info:
        plan_ram(model, _cpu(3), available_bytes=available, ctx_size=4096)
    error = info.value
    assert "8.00 GiB is available" in str(error)
    text = "\n".join(error.suggestions)
    ctx = int(re.search(r"ctx_size=(\d+) \(the largest", text).group(1))  # type: ignore[union-attr]
    assert ctx % 256 == 0
    assert 0 < ctx < 4096
    assert plan_ram(model, _cpu(3), available_bytes=available, ctx_size=ctx).fits
    with pytest.raises(ModelDoesNotFitError):  # the largest: 256 more does not fit
        plan_ram(model, _cpu(3), available_bytes=available, ctx_size=ctx + 256)
    fewer = int(re.search(r"Placement\.cpu\((\d+)\)", text).group(1))  # type: ignore[union-attr]
    assert fewer == 2
    assert plan_ram(model, _cpu(fewer), available_bytes=available, ctx_size=4096).fits
    assert "q8_0" in text


def test_available_ram_is_read_from_the_kernel() -> None:
    available = read_available_ram()
    assert available is not None
    assert 0 < available <= psutil.virtual_memory().total


# -- real servers -------------------------------------------------------------------------


def _thread_affinities(pid: int) -> set[tuple[int, ...]]:
    """The affinity of every thread of process ``pid``."""
    return {
        tuple(sorted(os.sched_getaffinity(thread.id))) for thread in psutil.Process(pid).threads()
    }


@pytest.mark.anyio
async def test_two_cpu_servers_run_pinned_as_split(
    tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cores = available_cores()
    expected = share_cores(_cpu(2), cores)
    caplog.set_level(logging.INFO, logger="llamatelemetry_async")
    config = ServerConfig(n_parallel=1, ctx_size=512)
    async with AsyncEngine(tiny_model, placement=Placement.cpu(2), server=config) as engine:
        assert engine.ram_plan is not None
        assert len(engine.ram_plan.servers) == 2
        for info, plan in zip(engine.servers, expected, strict=True):
            assert (info.cores, info.threads) == (plan.cores, plan.threads)
            assert info.pid is not None
            cmdline = psutil.Process(info.pid).cmdline()
            assert _flag(cmdline, "--threads") == str(plan.threads)
            # Every thread of the process, llama.cpp's own and the HTTP ones, on its share.
            assert _thread_affinities(info.pid) == {plan.cores}
            assert f"{info.name}: {describe_cores(config, plan)}" in caplog.text
        async with engine.stream("Once upon a time", n_predict=4) as stream:
            assert [chunk async for chunk in stream]


@pytest.mark.anyio
async def test_the_users_threads_win_and_auto_configure_off_leaves_defaults(
    tiny_model: Path,
) -> None:
    everything = tuple(available_cores())
    config = ServerConfig(n_parallel=1, ctx_size=512, threads=1)
    async with AsyncEngine(tiny_model, placement=Placement.cpu(1), server=config) as engine:
        (info,) = engine.servers
        assert (info.threads, info.cores) == (1, ())
        assert info.pid is not None
        assert _thread_affinities(info.pid) == {everything}
    config = ServerConfig(n_parallel=1, ctx_size=512)
    async with AsyncEngine(
        tiny_model, placement=Placement.cpu(1), server=config, auto_configure=False
    ) as engine:
        (info,) = engine.servers
        assert (info.threads, info.cores) == (None, ())
        assert engine.ram_plan is None


@pytest.mark.anyio
async def test_a_core_this_process_may_not_use_is_a_config_error(tiny_model: Path) -> None:
    outside = max(os.sched_getaffinity(0)) + 1
    config = ServerConfig(n_parallel=1, ctx_size=512, cpu_affinity=(outside,))
    with pytest.raises(ConfigError) as info:
        async with AsyncEngine(tiny_model, placement=Placement.cpu(1), server=config):
            pass
    assert info.value.field == "cpu_affinity"
    assert str(outside) in str(info.value)


@pytest.mark.anyio
async def test_cpu_servers_that_do_not_fit_in_ram_fail_before_spawning(tiny_model: Path) -> None:
    available = read_available_ram()
    assert available is not None
    info = await inspect_model(tiny_model)
    # A context whose KV cache alone is twice the machine's available memory, per server.
    ctx = 2 * available // info.kv_row_bytes() // info.block_count
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    config = ServerConfig(ctx_size=ctx, n_parallel=1)
    with pytest.raises(ModelDoesNotFitError) as error:
        async with AsyncEngine(tiny_model, placement=Placement.cpu(2), server=config):
            pass
    assert "ctx_size=" in "\n".join(error.value.suggestions)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before  # none spawned


@pytest.mark.anyio
async def test_a_bare_llama_server_is_pinned_with_every_thread(
    tiny_model: Path, real_binary: Path
) -> None:
    core = max(os.sched_getaffinity(0))
    plan = ServerPlan("cpu0", (), cores=(core,), threads=1)
    config = ServerConfig(n_parallel=1, ctx_size=512)
    argv, env = server_command(config, binary=real_binary, model=tiny_model, plan=plan)
    server = LlamaServer(argv, env, cores=server_affinity(config, plan))
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        assert server.pid is not None
        assert _thread_affinities(server.pid) == {(core,)}
        tg.cancel_scope.cancel()


@pytest.fixture(scope="module")
def real_binary() -> Path:
    from llamatelemetry_async import find_llama_server

    return find_llama_server()


def test_replace_keeps_cores_validated() -> None:
    with pytest.raises(ConfigError):
        dataclasses.replace(CPU, cores=(-1,))
