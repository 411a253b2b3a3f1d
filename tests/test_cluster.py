"""Servers on a Ray cluster: a real two-node Ray cluster in a loopback-only network namespace
(``ray_cluster`` in conftest; see ``llamatelemetry_async.testing._ray`` for why), real
llama-servers in Ray actors, each test's driver run as a script inside the namespace."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from llamatelemetry_async.testing._ray import LoopbackRayCluster

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

_SETUP = """
import json, os, signal, sys, time
import anyio
from llamatelemetry_async import AsyncEngine, ServerConfig, ServerCrashedError
from llamatelemetry_async.cluster import ray_servers

ADDRESS, MODEL = sys.argv[1], sys.argv[2]
PLACEMENT = ray_servers(2, gpus_per_server=0, resources=[{"node_a": 0.01}, {"node_b": 0.01}],
                        address=ADDRESS)
CONFIG = ServerConfig(n_parallel=2, ctx_size=2048)
"""


@pytest.fixture
def cluster(ray_cluster: LoopbackRayCluster) -> LoopbackRayCluster:
    return ray_cluster


@pytest.fixture
def model(tiny_model: Path) -> str:
    return str(tiny_model)


def _llama_servers() -> set[int]:
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "llama-server"}


def test_servers_spread_over_both_nodes_and_answer_like_a_local_one(
    cluster: LoopbackRayCluster, model: str
) -> None:
    before = _llama_servers()
    out = cluster.driver(
        _SETUP
        + """
async def main():
    async with AsyncEngine(MODEL, placement=PLACEMENT, server=CONFIG) as engine:
        async def one(i):
            messages = [{"role": "user", "content": f"hi {i % 3}"}]
            async with engine.stream_chat(messages, max_tokens=6, temperature=0, seed=1) as s:
                streamed = "".join([c.text async for c in s])
            whole = await engine.chat(messages, max_tokens=6, temperature=0, seed=1)
            return streamed == whole.text
        same = []
        async with anyio.create_task_group() as tg:
            for i in range(8):
                async def run(i=i): same.append(await one(i))
                tg.start_soon(run)
        servers = engine.servers
        print(json.dumps({"same": same, "nodes": [s.node for s in servers],
                          "kinds": [s.kind for s in servers],
                          "served": [s.served for s in servers]}))
anyio.run(main)
""",
        model,
    )
    assert out["same"] == [True] * 8
    assert len(set(out["nodes"])) == 2  # one per node
    assert out["kinds"] == ["ray", "ray"]
    assert all(served > 0 for served in out["served"])
    # None left behind: ray.kill is asynchronous; each dies with its actor's process.
    left = [psutil.Process(pid) for pid in _llama_servers() - before]
    _, alive = psutil.wait_procs(left, timeout=15)
    assert alive == []


def test_a_dead_server_fails_its_streams_as_crashes_and_comes_back(
    cluster: LoopbackRayCluster, model: str
) -> None:
    out = cluster.driver(
        _SETUP
        + """
async def main():
    async with AsyncEngine(MODEL, placement=PLACEMENT, server=CONFIG) as engine:
        victim = engine.servers[0]
        async def long():
            try:
                async with engine.stream_chat([{"role": "user", "content": "x"}],
                                              max_tokens=1500, ignore_eos=True) as s:
                    async for _ in s:
                        pass
                return "finished"
            except ServerCrashedError:
                return "crashed"
        results = []
        async with anyio.create_task_group() as tg:
            async def run(): results.append(await long())
            tg.start_soon(run)
            tg.start_soon(run)
            while engine.servers[0].outstanding == 0:
                await anyio.sleep(0.02)
            os.kill(victim.pid, signal.SIGKILL)
        with anyio.fail_after(60):
            while engine.servers[0].state != "ready" or engine.servers[0].starts < 2:
                await anyio.sleep(0.05)
        reply = await engine.chat([{"role": "user", "content": "after"}], max_tokens=3)
        print(json.dumps({"results": sorted(results), "starts": engine.servers[0].starts,
                          "after": reply.usage.completion_tokens}))
anyio.run(main)
""",
        model,
    )
    assert out["results"][0] == "crashed"
    assert out["starts"] == 2
    assert out["after"] == 3
