"""Servers on Ray against servers on this machine: start-up rate, and 500 paced streams.

Run (as root: the cluster lives in a loopback-only network namespace)::

    .nox/tests/bin/python benchmarks/ray_scale.py [--quick] [--streams 500] [--spread 5]
        [--tokens 8] [--reps 3] [--llama-server PATH] [--json out.json]

A real two-node Ray cluster on this machine (``llamatelemetry_async.testing._ray.
LoopbackRayCluster``: a head with the custom resource ``node_a`` and a second ``ray start``
with ``node_b``, both on 127.0.0.1 inside an ``unshare -n`` namespace, GCS port 6600), and
the project's tiny model (``write_tiny_model``). Every figure comes from driver scripts run
inside that namespace, so both arms see the same loopback network and the same CPUs:

- **start**: ``async with AsyncEngine(model, placement=P)`` from just before ``__aenter__``
  until every server is ready, for N = 2 and 4 CPU servers, with P =
  ``ray_servers(N, gpus_per_server=0, resources=[{node_a}, {node_b}])`` (one actor per
  server, alternately on each node) and ``Placement.cpu(N)`` (local processes), the two
  taking turns in each repetition (order alternating). One unmeasured start of each arm
  comes first; the first Ray one (connecting the driver to the cluster, cold worker
  processes) is printed apart. Servers per second is N over the median time to ready.
- **streams**: one engine of 2 servers per arm (Ray-placed, or ``Placement.cpu(2)``), then
  ``--streams`` completions (``/completion``, ``n_predict=--tokens``, ``ignore_eos``) whose
  arrivals are spread evenly over ``--spread`` seconds. Figures: wall time from the first
  arrival to the last token, tokens received, the driver process's CPU seconds
  (``time.process_time``: this process and its threads, Ray's included; not the servers)
  per token, time to first token p50/p99. The arms run in the order ray, local, local, ray
  (``--rounds`` pairs, order flipped each pair), each on its own engine, start-up excluded;
  the table gives each arm's median and the ratio ray / local.

``--quick``: 100 streams over 2 s, 2 repetitions of the start-up timings, one pair of
stream rounds. llama-server comes from ``find_llama_server`` (or ``--llama-server``); every
server runs with one thread (``--threads``) so that 4 of them fit a small machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from _arms import bootstrap_path, installed_version

GCS_PORT: Final = 6600
ARMS: Final = ("ray", "local")

# One driver for both measurements, run inside the namespace: argv is ADDRESS MODEL BINARY
# MODE CONFIG-JSON; its last printed line is the JSON of the results.
_DRIVER: Final = """
import json, statistics, sys, time
from collections import Counter
import anyio
from llamatelemetry_async import AsyncEngine, Placement, ServerConfig
from llamatelemetry_async.cluster import ray_servers

ADDRESS, MODEL, BINARY, MODE = sys.argv[1:5]
CONF = json.loads(sys.argv[5])
CONFIG = ServerConfig(n_parallel=CONF["slots"], ctx_size=CONF["slots"] * 256,
                      threads=CONF["threads"])
PROMPT = "Tell me a story about a llama who measured its own latency."


def placement(arm, n):
    if arm == "local":
        return Placement.cpu(n)
    return ray_servers(n, gpus_per_server=0, resources=[{"node_a": 0.01}, {"node_b": 0.01}],
                       address=ADDRESS)


async def ready(engine):
    with anyio.fail_after(120):
        while not all(s.state == "ready" for s in engine.servers):
            await anyio.sleep(0.002)


async def start(arm, n):
    t0 = time.perf_counter()
    async with AsyncEngine(MODEL, placement=placement(arm, n), server=CONFIG,
                           binary=BINARY) as engine:
        await ready(engine)
        to_ready = time.perf_counter() - t0
        nodes = sorted({s.node for s in engine.servers if s.node})
        t1 = time.perf_counter()
    return {"arm": arm, "n": n, "to_ready": to_ready, "stop": time.perf_counter() - t1,
            "nodes": len(nodes)}


async def streams(arm, count, spread, tokens):
    async with AsyncEngine(MODEL, placement=placement(arm, 2), server=CONFIG,
                           binary=BINARY) as engine:
        await ready(engine)
        for _ in range(4):  # warm: connections, the router's slot counts
            await engine.completion(PROMPT, n_predict=2)
        received = []
        ttft = []
        errors = Counter()
        cpu0, t0 = time.process_time(), time.perf_counter()

        async def one(i):
            await anyio.sleep(i * spread / count)
            sent = time.perf_counter()
            n = 0
            try:
                async with engine.stream(PROMPT, n_predict=tokens, ignore_eos=True,
                                         cache_prompt=False) as stream:
                    async for chunk in stream:
                        if n == 0:
                            ttft.append((time.perf_counter() - sent) * 1000.0)
                        n += 1
                usage = stream.usage
                received.append(usage.completion_tokens if usage is not None else n)
            except Exception as exc:
                errors[f"{type(exc).__name__}: {exc}"[:200]] += 1

        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(one, i)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        ttft.sort()
        pick = lambda q: ttft[min(len(ttft) - 1, int(q * len(ttft)))] if ttft else None
        servers = engine.servers
        return {"arm": arm, "wall": wall, "cpu": cpu, "tokens": sum(received),
                "expected": count * tokens, "ttft_p50_ms": pick(0.5), "ttft_p99_ms": pick(0.99),
                "errors": dict(errors), "served": [s.served for s in servers],
                "nodes": len({s.node for s in servers if s.node}),
                "kinds": sorted({s.kind for s in servers})}


async def main():
    out = {"mode": MODE}
    if MODE == "start":
        out["first"] = [await start(arm, 2) for arm in ("ray", "local")]  # unmeasured warm-up
        runs = []
        for rep in range(CONF["reps"]):
            for n in CONF["counts"]:
                order = ("ray", "local") if (rep + n) % 2 == 0 else ("local", "ray")
                for arm in order:
                    runs.append(await start(arm, n))
        out["runs"] = runs
    else:
        runs = []
        for r in range(CONF["rounds"]):
            order = ("ray", "local") if r % 2 == 0 else ("local", "ray")
            for arm in order:
                runs.append(await streams(arm, CONF["streams"], CONF["spread"],
                                          CONF["tokens"]))
        out["runs"] = runs
    print(json.dumps(out))


anyio.run(main)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Ray-placed servers against local ones: start-up rate and paced streams "
        "(needs root: a loopback-only network namespace)."
    )
    parser.add_argument("--quick", action="store_true", help="100 streams, fewer repetitions")
    parser.add_argument("--streams", type=int, default=500, help="streams per arm and round")
    parser.add_argument("--spread", type=float, default=5.0, help="arrivals over S seconds")
    parser.add_argument("--tokens", type=int, default=8, help="n_predict of each stream")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of stream rounds")
    parser.add_argument("--reps", type=int, default=3, help="start-up repetitions")
    parser.add_argument("--counts", type=int, nargs="+", default=[2, 4], help="servers")
    parser.add_argument("--slots", type=int, default=16, help="n_parallel of each server")
    parser.add_argument("--threads", type=int, default=1, help="threads of each server")
    parser.add_argument("--llama-server", default=None, help="llama-server binary")
    parser.add_argument("--port", type=int, default=GCS_PORT, help="the cluster's GCS port")
    parser.add_argument("--json", default=None, help="write every figure here")
    return parser


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _f(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_starts(result: dict[str, Any], counts: Sequence[int]) -> None:
    first = {run["arm"]: run for run in result["first"]}
    print(
        f"\nfirst start of 2 servers (unmeasured warm-up): ray {first['ray']['to_ready']:.2f} s "
        f"(connects the driver to the cluster, cold workers), local "
        f"{first['local']['to_ready']:.2f} s"
    )
    print("\n## Start-up: AsyncEngine enter to every server ready (median of the repetitions)\n")
    print("| servers | arm | to ready (s) | servers / s | stop (s) | nodes | runs |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for n in counts:
        medians: dict[str, float] = {}
        for arm in ARMS:
            runs = [r for r in result["runs"] if r["arm"] == arm and r["n"] == n]
            ready = _median([r["to_ready"] for r in runs])
            medians[arm] = ready
            stop = _median([r["stop"] for r in runs])
            nodes = max((r["nodes"] for r in runs), default=0)
            print(
                f"| {n} | {arm} | {ready:.2f} | {n / ready:.2f} | {stop:.2f} | {nodes} "
                f"| {len(runs)} |"
            )
        print(f"| {n} | **ray / local** | {medians['ray'] / medians['local']:.2f}x | | | | |")


def print_streams(result: dict[str, Any]) -> None:
    runs = result["runs"]
    print("\n## Paced streams over 2 servers (each round on its own engine)\n")
    print(
        "| round | arm | wall (s) | tokens | driver CPU (s) | CPU µs / token | TTFT p50 (ms) "
        "| TTFT p99 (ms) | errors | served | nodes |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for i, r in enumerate(runs):
        per_token = r["cpu"] / max(r["tokens"], 1) * 1e6
        print(
            f"| {i + 1} | {r['arm']} | {r['wall']:.2f} | {r['tokens']}/{r['expected']} "
            f"| {r['cpu']:.2f} | {per_token:.1f} | {_f(r['ttft_p50_ms'], '.1f')} "
            f"| {_f(r['ttft_p99_ms'], '.1f')} | {sum(r['errors'].values())} "
            f"| {r['served']} | {r['nodes']} |"
        )
    print("\nmedians per arm, and the ratio ray / local:\n")
    print("| | wall (s) | tokens | CPU µs / token | TTFT p99 (ms) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    med: dict[str, dict[str, float]] = {}
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        med[arm] = {
            "wall": _median([r["wall"] for r in mine]),
            "tokens": _median([r["tokens"] for r in mine]),
            "cpu_us": _median([r["cpu"] / max(r["tokens"], 1) * 1e6 for r in mine]),
            "ttft": _median([r["ttft_p99_ms"] for r in mine if r["ttft_p99_ms"] is not None]),
        }
        m = med[arm]
        print(
            f"| {arm} | {m['wall']:.2f} | {m['tokens']:.0f} | {m['cpu_us']:.1f} | {m['ttft']:.1f} |"
        )
    ray, local = med["ray"], med["local"]
    print(
        f"| **ray / local** | {ray['wall'] / local['wall']:.3f}x "
        f"| {ray['tokens'] / max(local['tokens'], 1):.3f}x "
        f"| {ray['cpu_us'] / local['cpu_us']:.2f}x | {ray['ttft'] / local['ttft']:.2f}x |"
    )
    for r in runs:
        for message, count in r["errors"].items():
            print(f"error ({r['arm']}, {count}x): {message}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.streams = min(args.streams, 100)
        args.spread = min(args.spread, 2.0)
        args.reps = min(args.reps, 2)
        args.rounds = 1
    if args.streams < 1 or args.tokens < 1 or args.rounds < 1 or args.reps < 1:
        parser.error("--streams, --tokens, --rounds and --reps must be >= 1")
    if os.geteuid() != 0:
        parser.error("needs root: the Ray cluster runs in a network namespace (unshare -n)")
    bootstrap_path()

    from llamatelemetry_async.server import find_llama_server
    from llamatelemetry_async.testing import write_tiny_model
    from llamatelemetry_async.testing._ray import LoopbackRayCluster

    binary = str(find_llama_server(args.llama_server))
    print(
        f"ray_scale: python {platform.python_version()}, ray {installed_version('ray')}, "
        f"llamatelemetry_async {installed_version('llamatelemetry_async')}; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}; llama-server {binary}"
    )
    print(
        f"two Ray nodes (node_a, node_b) on 127.0.0.1:{args.port} in a loopback-only "
        f"namespace; tiny model; servers with {args.slots} slots and {args.threads} thread(s)"
    )
    print(
        f"streams: {args.streams} per round, arrivals over {args.spread:g} s, "
        f"{args.tokens} tokens each; {args.rounds * 2} rounds (ray, local alternating)"
    )
    started = time.monotonic()
    conf = {
        "slots": args.slots,
        "threads": args.threads,
        "reps": args.reps,
        "counts": args.counts,
        "streams": args.streams,
        "spread": args.spread,
        "tokens": args.tokens,
        "rounds": args.rounds,
    }
    with tempfile.TemporaryDirectory(prefix="ray-scale-") as tmp:
        model = str(write_tiny_model(Path(tmp) / "tiny.gguf"))
        with LoopbackRayCluster({"node_a": 1}, port=args.port) as cluster:
            cluster.add_node({"node_b": 1})
            print(f"cluster up in {time.monotonic() - started:.1f} s")
            extra = [model, binary]
            starts = cluster.driver(_DRIVER, *extra, "start", json.dumps(conf), timeout=900)
            print_starts(starts, args.counts)
            streams = cluster.driver(_DRIVER, *extra, "streams", json.dumps(conf), timeout=900)
            print_streams(streams)
    print(f"\nrun took {time.monotonic() - started:.1f} s")
    if args.json:
        out = {"command": [sys.executable, *sys.argv], "config": conf}
        out.update(start=starts, streams=streams)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
