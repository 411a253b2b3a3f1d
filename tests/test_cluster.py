"""Servers on a Ray cluster: a real two-node Ray cluster in a loopback-only network namespace
(``ray_cluster`` in conftest; see ``llamatelemetry_async.testing._ray`` for why), real
llama-servers in Ray actors, each test's driver run as a script inside the namespace.

Every driver ends by checking, from Ray's own records, that the engine left nothing behind:
no actor of ours alive, every placement group removed, no llama-server process left.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llamatelemetry_async import AsyncEngine, ConfigError, Placement, ServerStartError
from llamatelemetry_async.cluster import RayServers, ray_servers
from llamatelemetry_async.testing._ray import LoopbackRayCluster

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

_SETUP = """
import json, os, signal, sys, time
import anyio, psutil, ray
from llamatelemetry_async import AsyncEngine, ServerConfig, ServerCrashedError
from llamatelemetry_async.cluster import NAMESPACE, ray_servers
from llamatelemetry_async.testing._fake_nvml import FakeGPU, FakeNVML
from llamatelemetry_async.testing._ray import kill_raylet

ADDRESS, MODEL = sys.argv[1], sys.argv[2]
CONFIG = ServerConfig(n_parallel=2, ctx_size=2048)
ONE_SLOT = ServerConfig(n_parallel=1, ctx_size=2048)  # two streams land on two servers
PINNED = dict(resources=[{"node_a": 0.01}, {"node_b": 0.01}], address=ADDRESS)

def llama_servers():
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "llama-server"}

BEFORE = llama_servers()

def node_with(resource):
    [node] = [n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"]]
    return node

async def nothing_left():
    # ray.kill and placement-group removal are asynchronous: wait (bounded) for Ray's records.
    with anyio.fail_after(30):
        while True:
            actors = ray.util.list_named_actors(all_namespaces=True)
            ours = [a for a in actors if a["namespace"] == NAMESPACE]
            groups = [g["state"] for g in ray.util.placement_group_table().values()]
            servers = llama_servers() - BEFORE
            if not ours and set(groups) <= {"REMOVED"} and not servers:
                return {"actors": ours, "groups": groups, "servers": sorted(servers)}
            await anyio.sleep(0.1)

async def one(engine, i, tokens=6, **extra):
    messages = [{"role": "user", "content": f"hi {i % 3}"}]
    params = dict(max_tokens=tokens, temperature=0, seed=1, **extra)
    async with engine.stream_chat(messages, **params) as s:
        streamed = "".join([c.text async for c in s])
    whole = await engine.chat(messages, **params)
    return {"same": streamed == whole.text, "gpu": s.gpu}

async def until(done, timeout=30):
    with anyio.fail_after(timeout):  # polling the engine's own view, bounded
        while not done():
            await anyio.sleep(0.02)

def busy(engine):
    return all(s.outstanding for s in engine.servers)

async def crash_or_finish(engine, tokens=1500):
    try:
        # (a prompt per length: the router keeps a prompt on the server that cached it)
        async with engine.stream_chat([{"role": "user", "content": f"x {tokens}"}],
                                      max_tokens=tokens, ignore_eos=True) as s:
            async for _ in s:
                pass
        return "finished"
    except ServerCrashedError:
        return "crashed"
"""


@pytest.fixture
def cluster(ray_cluster: LoopbackRayCluster) -> LoopbackRayCluster:
    return ray_cluster


@pytest.fixture
def model(tiny_model: Path) -> str:
    return str(tiny_model)


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_servers_spread_over_both_nodes_and_answer_like_a_local_one(
    cluster: LoopbackRayCluster, model: str, loop: str
) -> None:
    out = cluster.driver(
        _SETUP
        + """
async def main():
    placement = ray_servers(2, gpus_per_server=0, **PINNED)
    async with AsyncEngine(MODEL, placement=placement, server=CONFIG) as engine:
        results = []
        async with anyio.create_task_group() as tg:
            for i in range(8):
                async def run(i=i): results.append(await one(engine, i))
                tg.start_soon(run)
        servers = engine.servers
        out = {"results": results, "nodes": [s.node for s in servers],
               "placed": [node_with("node_a"), node_with("node_b")],
               "kinds": [s.kind for s in servers], "served": [s.served for s in servers],
               "gpus": [list(s.gpus) for s in servers],
               "named": sorted(a["name"] for a in ray.util.list_named_actors(True))}
    out["left"] = await nothing_left()
    print(json.dumps(out))
anyio.run(main, backend=sys.argv[3])
""",
        model,
        loop,
    )
    assert [r["same"] for r in out["results"]] == [True] * 8
    # CPU servers, no NVML: no GPU figures.
    assert [r["gpu"] for r in out["results"]] == [None] * 8
    assert out["nodes"] == out["placed"]  # each server on the node it was pinned to
    assert out["kinds"] == ["ray", "ray"]
    assert out["gpus"] == [[], []]
    assert all(served > 0 for served in out["served"])
    assert len(out["named"]) == 2
    assert all(name.startswith("llama-server.") for name in out["named"])
    assert out["left"]["groups"]
    assert out["left"]["servers"] == []


def test_energy_of_requests_served_on_other_nodes_comes_from_their_nodes_sampler(
    cluster: LoopbackRayCluster, model: str
) -> None:
    # Each node has one GPU as Ray counts it; each actor samples it through a fake NVML
    # (the real one cannot run here) at a constant 300 W, and the engine's spans get energy.
    out = cluster.driver(
        _SETUP
        + """
async def main():
    nvml = FakeNVML([FakeGPU(power_w=300.0)])
    # build=True: each node uses the library's build in its cache (here: already built).
    placement = ray_servers(2, gpus_per_server=1, strategy="STRICT_SPREAD", nvml=nvml,
                            sampler_interval=0.05, address=ADDRESS, build=True)
    async with AsyncEngine(MODEL, placement=placement, server=CONFIG) as engine:
        results = []
        async with anyio.create_task_group() as tg:
            for i in range(4):
                async def run(i=i): results.append(await one(engine, i, 48, ignore_eos=True))
                tg.start_soon(run)
        servers = engine.servers
        from llamatelemetry_async.server import cached_builds
        out = {"results": results, "gpus": [list(s.gpus) for s in servers],
               "nodes": len({s.node for s in servers}),
               "binaries": [psutil.Process(s.pid).exe() for s in servers],
               "cache": [str(p) for p in cached_builds()]}
    out["left"] = await nothing_left()
    print(json.dumps(out))
anyio.run(main)
""",
        model,
    )
    assert out["gpus"] == [[0], [0]]
    assert all(binary in out["cache"] for binary in out["binaries"]), out
    assert out["nodes"] == 2
    for result in out["results"]:
        figures = result["gpu"]
        assert figures["llamatelemetry.gpu.energy_j"] > 0
        assert figures["llamatelemetry.gpu.mean_power_w"] == pytest.approx(300.0, rel=0.05)
        assert figures["llamatelemetry.gpu.energy_j_per_token"] > 0
    assert out["left"]["servers"] == []


def test_a_dead_server_fails_its_streams_as_crashes_and_comes_back(
    cluster: LoopbackRayCluster, model: str
) -> None:
    out = cluster.driver(
        _SETUP
        + """
async def main():
    placement = ray_servers(2, gpus_per_server=0, **PINNED)
    async with AsyncEngine(MODEL, placement=placement, server=ONE_SLOT) as engine:
        victim = engine.servers[0]
        results = []
        async with anyio.create_task_group() as tg:
            async def run(): results.append(await crash_or_finish(engine))
            tg.start_soon(run)
            tg.start_soon(run)
            await until(lambda: busy(engine))
            os.kill(victim.pid, signal.SIGKILL)
            await until(lambda: engine.servers[0].state != "ready")  # learnt over Ray
            new = await engine.chat([{"role": "user", "content": "meanwhile"}], max_tokens=3)
        await until(lambda: engine.servers[0].state == "ready" and engine.servers[0].starts == 2)
        reply = await engine.chat([{"role": "user", "content": "after"}], max_tokens=3)
        out = {"results": sorted(results), "starts": engine.servers[0].starts,
               "meanwhile": new.usage.completion_tokens, "after": reply.usage.completion_tokens,
               "pid_changed": engine.servers[0].pid != victim.pid}
    out["left"] = await nothing_left()
    print(json.dumps(out))
anyio.run(main)
""",
        model,
    )
    # The stream on the killed server crashed; the one on the other server finished.
    assert out["results"] == ["crashed", "finished"]
    assert out["meanwhile"] == 3  # a new request went to the survivor meanwhile
    assert out["starts"] == 2
    assert out["pid_changed"]
    assert out["after"] == 3
    assert out["left"]["servers"] == []


def test_a_cancelled_start_and_a_cancelled_stream_leave_no_actor_group_or_server(
    cluster: LoopbackRayCluster, model: str
) -> None:
    out = cluster.driver(
        _SETUP
        + """
async def main():
    placement = ray_servers(2, gpus_per_server=0, **PINNED)
    out = {}
    # Cancelled while the actors start their servers.
    with anyio.move_on_after(0.5) as scope:
        async with AsyncEngine(MODEL, placement=placement, server=CONFIG) as engine:
            await anyio.sleep_forever()
    out["start_cancelled"] = scope.cancelled_caught
    out["after_start"] = await nothing_left()
    # Cancelled mid-stream, the stream never closed by the caller.
    with anyio.move_on_after(60) as scope:
        async with AsyncEngine(MODEL, placement=placement, server=CONFIG) as engine:
            stream = await engine.stream_chat([{"role": "user", "content": "x"}],
                                              max_tokens=1500, ignore_eos=True).__aenter__()
            async for _ in stream:
                scope.cancel()
    out["stream_cancelled"] = scope.cancelled_caught
    out["after_stream"] = await nothing_left()
    print(json.dumps(out))
anyio.run(main)
""",
        model,
    )
    assert out["start_cancelled"] is True
    assert out["stream_cancelled"] is True
    assert out["after_start"]["servers"] == []
    assert out["after_stream"]["servers"] == []


def test_a_lost_node_fails_its_streams_and_its_server_moves_to_the_other_node(
    cluster: LoopbackRayCluster, model: str
) -> None:
    try:
        out = cluster.driver(
            _SETUP
            + """
async def main():
    placement = ray_servers(2, gpus_per_server=0, address=ADDRESS)  # SPREAD: it may move
    async with AsyncEngine(MODEL, placement=placement, server=ONE_SLOT) as engine:
        node_b = node_with("node_b")
        [lost] = [i for i, s in enumerate(engine.servers) if s.node == node_b]
        results = []
        async with anyio.create_task_group() as tg:
            async def run(): results.append(await crash_or_finish(engine))
            tg.start_soon(run)
            tg.start_soon(run)
            await until(lambda: busy(engine))
            kill_raylet("node_b")
            await until(lambda: engine.servers[lost].state != "ready")  # learnt over Ray
            new = await engine.chat([{"role": "user", "content": "meanwhile"}], max_tokens=3)
        await until(lambda: engine.servers[lost].state == "ready"
                    and engine.servers[lost].starts == 2, 90)
        reply = await engine.chat([{"role": "user", "content": "after"}], max_tokens=3)
        out = {"results": sorted(results), "meanwhile": new.usage.completion_tokens,
               "moved_to": engine.servers[lost].node, "node_a": node_with("node_a"),
               "after": reply.usage.completion_tokens}
    out["left"] = await nothing_left()
    print(json.dumps(out))
anyio.run(main)
""",
            model,
        )
    finally:
        cluster.add_node({"node_b": 1}, num_gpus=1)  # the next tests get two nodes again
    assert out["results"] == ["crashed", "finished"]  # the stream on node_b's server crashed
    assert out["meanwhile"] == 3
    assert out["moved_to"] == out["node_a"]  # restarted on the remaining node
    assert out["after"] == 3
    assert out["left"]["servers"] == []


def test_bad_arguments_are_typed_errors_before_ray_is_touched() -> None:
    with pytest.raises(ConfigError, match="gpus_per_server"):
        ray_servers(2, gpus_per_server=3)
    with pytest.raises(ConfigError, match="count"):
        ray_servers(0)
    with pytest.raises(ConfigError, match="strategy"):
        ray_servers(2, strategy="EVERYWHERE")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="tensor_split"):
        ray_servers(1, gpus_per_server=2, tensor_split=(1.0, -1.0))
    with pytest.raises(ConfigError, match="cpus_per_server"):
        ray_servers(1, gpus_per_server=0, cpus_per_server=0)
    with pytest.raises(ConfigError, match="build"):
        ray_servers(1, build="")
    with pytest.raises(ConfigError, match="not both"):
        [provider] = ray_servers(1, build="90").providers
        provider.backends("m.gguf", object(), "/usr/bin/llama-server")
    with pytest.raises(ConfigError, match="model"):
        [provider] = ray_servers(1).providers
        provider.backends(None, object(), None)
    [provider] = ray_servers(3, gpus_per_server=2, resources=[{"a": 1}, {"b": 1}]).providers
    assert isinstance(provider, RayServers)
    assert provider.bundles() == [
        {"CPU": 1, "GPU": 2, "a": 1},
        {"CPU": 1, "GPU": 2, "b": 1},
        {"CPU": 1, "GPU": 2, "a": 1},
    ]
    assert isinstance(ray_servers(1), Placement)


def test_serve_with_ray_puts_the_front_door_before_servers_on_the_cluster(
    cluster: LoopbackRayCluster, model: str
) -> None:
    out = cluster.driver(
        _SETUP
        + """
import re, subprocess, httpx
ray.init(address=ADDRESS, logging_level="ERROR", log_to_driver=False)
argv = [sys.executable, "-m", "llamatelemetry_async", "serve", MODEL, "--ray", ADDRESS,
        "--ray-servers", "2", "--ray-gpus-per-server", "0", "--port", "0", "--no-auth",
        "--parallel", "2", "--ctx-size", "2048"]
proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
lines = []
for line in proc.stdout:
    lines.append(line.rstrip())
    if line.startswith("ready:"):
        break
url = re.search(r"front door: (http://\\S+)", "\\n".join(lines)).group(1)
reply = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
    "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
servers = httpx.get(f"{url}/servers", timeout=10).json()
proc.send_signal(signal.SIGTERM)
rest, err = proc.communicate(timeout=60)
out = {"status": reply.status_code, "tokens": reply.json()["usage"]["completion_tokens"],
       "kinds": [s["kind"] for s in servers["servers"]],
       "nodes": len({s["node"] for s in servers["servers"]}),
       "announced": [l for l in lines if l.startswith("server ")],
       "rc": proc.returncode, "stopped": rest.strip().splitlines()[-1], "stderr": err[-2000:]}
out["left"] = anyio.run(nothing_left)
print(json.dumps(out))
""",
        model,
    )
    assert out["rc"] == 0, out["stderr"]
    assert out["status"] == 200
    assert out["tokens"] == 4
    assert out["kinds"] == ["ray", "ray"]
    assert out["nodes"] == 2  # SPREAD
    assert all("Ray node" in line for line in out["announced"]), out["announced"]
    assert out["stopped"].startswith("stopped:")
    assert out["left"]["servers"] == []


def test_a_node_without_the_model_or_the_binary_fails_the_start_with_the_nodes_own_error(
    cluster: LoopbackRayCluster, model: str
) -> None:
    out = cluster.driver(
        _SETUP
        + """
from llamatelemetry_async import LlamaServerNotFoundError, ModelNotFoundError
async def main():
    placement = ray_servers(2, gpus_per_server=0, **PINNED)
    out = {}
    for name, kwargs in [("binary", {"binary": "/nonexistent/llama-server"}),
                         ("model", {"model": "/nonexistent/model.gguf"})]:
        try:
            async with AsyncEngine(kwargs.pop("model", MODEL), placement=placement,
                                   server=CONFIG, **kwargs):
                out[name] = "started"
        except (LlamaServerNotFoundError, ModelNotFoundError) as exc:
            out[name] = [type(exc).__name__, str(exc).splitlines()[0]]
        out[name + "_left"] = await nothing_left()
    print(json.dumps(out))
anyio.run(main)
""",
        model,
    )
    assert out["binary"][0] == "LlamaServerNotFoundError"
    assert "/nonexistent/llama-server" in out["binary"][1]
    assert out["model"][0] == "ModelNotFoundError"
    assert out["binary_left"]["servers"] == []
    assert out["model_left"]["servers"] == []


@pytest.mark.anyio
async def test_no_cluster_at_the_address_is_a_typed_error_at_once(model: str) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    placement = ray_servers(1, gpus_per_server=0, address=f"127.0.0.1:{port}")
    with pytest.raises(ServerStartError, match="no Ray cluster at") as info:
        async with AsyncEngine(model, placement=placement):
            pass
    assert "ray start --head" in str(info.value)
