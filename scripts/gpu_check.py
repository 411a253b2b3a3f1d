"""The GPU check's driver: write the model, measure, and give the verdict.

``scripts/gpu_check.sh`` runs it (it builds llama-server and sets ``PYTHONPATH``); see
``docs/gpu-report.md``. Four commands, each writing JSON or markdown into the results folder:

    python scripts/gpu_check.py write-model PATH [--small] [--info JSON]
    python scripts/gpu_check.py run --model PATH --binary PATH --json RESULTS/engine.json [--cpu]
    python scripts/gpu_check.py nccl --json RESULTS/nccl.json [--cpu]
    python scripts/gpu_check.py verdict --out-dir RESULTS --card "..." [--cpu]

``run`` starts llama-server through ``AsyncEngine`` (one GPU, ``--streams`` slots, the
library's ``GPUSampler`` handed to the engine) and measures, at 1 stream and at ``--streams``
streams: tokens/s as the caller receives them against llama-server's own
``timings.predicted_per_second``; the requests' GPU joules (``stream.gpu``: the attributes
their spans get) summed over the phase against the GPU energy counter's difference over the
phase; a 1 ms ticker's lateness (event-loop lag). Before the phases it compares the engine's
VRAM plan with NVML's used memory after warm-up and reads each llama-server's thread count
from ``/proc``. Then it runs the many-stream phase once more through the front door
(``FrontDoor`` served by uvicorn on 127.0.0.1, an httpx client), and, when two GPUs are
visible, one GPU pair per split mode the build supports (``Placement.pairs``).

``nccl`` drives NCCL through the library's ``Communicator``: one-rank collectives, and with
two or more GPUs ``init_all`` with a two-rank ``all_reduce`` and its bus bandwidth; device
buffers come from the CUDA runtime through ctypes (no CuPy needed).

``verdict`` reads both JSON files, prints the table (figure, value, target, PASS/FAIL) and
the report block, writes them to the results folder, and exits 3 when a target is missed.

``--cpu`` (a dry run without a GPU) runs the same code on a CPU llama-server. The figures
that need a GPU read "n/a (no GPU)", never PASS; the sampler runs on the project's fake
NVML there, so the lag is still measured with a sampler running.

Rates are compared like for like. llama-server's ``predicted_per_second`` is
``(predicted_n - 1)`` tokens over the time from its first sampled token to its last; the
caller's rate is the same count over the time from the first chunk received to the last.
The ratio is llama-server's generation time over the caller's, summed over a phase's
requests (token-weighted, so one request whose chunks arrived in a burst cannot swamp it).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime as _dt
import glob
import json
import math
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio

PROMPT = "Once upon a time"
TARGET_MISSED = 3  # exit status when a target is missed (1: a crash, 2: a setup error)

# The targets (docs/gpu-report.md says why each).
RATIO_MIN = 0.98  # tokens/s through the engine over llama-server's own rate
VRAM_TOLERANCE = 0.10  # the VRAM plan within ±10 % of NVML's used memory
ENERGY_TOLERANCE = 0.05  # the spans' joules within 5 % of the energy counter's difference
LAG_P99_MAX_MS = 5.0  # event-loop lag p99 with many streams and the GPU sampler on
PAIR_MODES = ("layer", "row")  # split modes tried on a GPU pair (if the build has them)

NO_GPU = "n/a (no GPU)"
ENERGY_KEY = "llamatelemetry.gpu.energy_j"
MIB = 2**20


# --------------------------------------------------------------------------- write-model
def write_model(args: argparse.Namespace) -> int:
    from llamatelemetry_async.testing._big_model import write_random_llama

    started = time.perf_counter()
    if args.small:
        path = write_random_llama(
            args.path, n_embd=256, n_layer=2, n_head=8, n_head_kv=2, n_ff=1024, n_vocab=1000
        )
    else:
        path = write_random_llama(args.path)
    seconds = time.perf_counter() - started
    size = path.stat().st_size
    params = _parameter_count(path)
    count = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    desc = f"random llama, {count} parameters, {size / 1e9:.2f} GB"
    print(f"wrote {path}: {desc}, in {seconds:.1f} s")
    if args.info:
        info = {"path": str(path), "bytes": size, "seconds": round(seconds, 2), "desc": desc}
        Path(args.info).write_text(json.dumps(info) + "\n")
    return 0


def _parameter_count(path: Path) -> int:
    import gguf

    reader = gguf.GGUFReader(path)
    return sum(int(t.n_elements) for t in reader.tensors)


# --------------------------------------------------------------------------- measuring
@dataclasses.dataclass
class Request:
    sent: float  # perf_counter when the caller sent the request
    first: float  # ... when it received the first chunk
    last: float  # ... and the last
    chunks: int
    predicted_n: int
    predicted_per_second: float  # llama-server's own figures (its timings)
    prompt_ms: float
    predicted_ms: float
    energy_j: float | None = None  # the request's GPU joules (its span's attribute)

    @property
    def server_s(self) -> float:
        # The time llama-server's rate covers: predicted_n - 1 tokens after the first one.
        return (self.predicted_n - 1) / self.predicted_per_second

    @property
    def engine_s(self) -> float:
        # The same tokens, as the caller saw them arrive.
        return self.last - self.first

    @property
    def ratio(self) -> float:
        return self.server_s / self.engine_s if self.engine_s > 0 else math.inf


@dataclasses.dataclass
class Phase:
    streams: int
    requests: list[Request]
    wall_s: float
    energy_j: float | None  # the GPU energy counter's difference over the phase
    samples: list[dict[str, Any]]
    lag_ms: list[float]

    def summary(self) -> dict[str, Any]:
        rs = self.requests
        tokens = sum(r.predicted_n for r in rs)
        counted = sum(r.predicted_n - 1 for r in rs)
        server_s = sum(r.server_s for r in rs)
        engine_s = sum(r.engine_s for r in rs)
        e2e_server = sum(r.prompt_ms + r.predicted_ms for r in rs) / 1e3
        e2e_engine = sum(r.last - r.sent for r in rs)
        ratios = [r.ratio for r in rs]
        measured = [r.energy_j for r in rs if r.energy_j is not None]
        out: dict[str, Any] = {
            "streams": self.streams,
            "requests": len(rs),
            "tokens": tokens,
            "server_tok_s_per_stream": counted / server_s,
            "engine_tok_s_per_stream": counted / engine_s if engine_s > 0 else math.inf,
            "ratio": server_s / engine_s if engine_s > 0 else math.inf,
            "median_request_ratio": statistics.median(ratios),
            "worst_request_ratio": min(ratios),
            "end_to_end_ratio": e2e_server / e2e_engine,
            "aggregate_tok_s": tokens / self.wall_s,
            "wall_s": self.wall_s,
            "chunks_per_token": sum(r.chunks for r in rs) / max(1, tokens),
            "energy_j": self.energy_j,
            "energy_j_per_token": None if self.energy_j is None else self.energy_j / tokens,
            # Every request's joules, or None: a sum over some requests compares with nothing.
            "spans_energy_j": sum(measured) if len(measured) == len(rs) else None,
            "requests_with_energy": len(measured),
            "gpu_samples": len(self.samples),
        }
        for key in ("utilization_gpu", "power_w", "memory_used"):
            values = [s[key] for s in self.samples if s.get(key) is not None]
            out[f"mean_{key}"] = statistics.fmean(values) if values else None
            out[f"max_{key}"] = max(values) if values else None
        out["lag_ms"] = percentiles(self.lag_ms)
        return out


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "p50": math.nan, "p99": math.nan, "max": math.nan}
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    return {"n": len(ordered), "p50": pct(50), "p99": pct(99), "max": ordered[-1]}


class Probe:
    """What a phase reads of the GPU sampler: a fresh energy reading, and the samples."""

    def __init__(self, sampler: Any, index: int) -> None:
        self.sampler = sampler
        self.index = index

    async def energy_j(self) -> float | None:
        if not self.sampler.available:
            return None
        sample = (await self.sampler.sample_now()).get(self.index)  # NVML in its thread
        return None if sample is None or sample.energy_j is None else float(sample.energy_j)

    def window(self, t0: float, t1: float) -> list[dict[str, Any]]:
        return [dataclasses.asdict(s) for s in self.sampler.window(t0, t1).get(self.index, [])]

    def latest(self) -> dict[str, Any] | None:
        sample = self.sampler.latest().get(self.index)
        return None if sample is None else dataclasses.asdict(sample)


async def engine_request(engine: Any, seed: int, n_predict: int) -> Request:
    """One ``/completion`` stream through the engine's own API."""
    first = last = 0.0
    chunks = 0
    sent = time.perf_counter()
    async with engine.stream(PROMPT, n_predict=n_predict, ignore_eos=True, seed=seed) as stream:
        async for _ in stream:
            last = time.perf_counter()
            if not chunks:
                first = last
            chunks += 1
    t = stream.timings
    if t is None or t.predicted_n < 2 or t.predicted_per_second <= 0:
        raise RuntimeError(f"request {seed} ended without llama-server timings: {t!r}")
    energy = (stream.gpu or {}).get(ENERGY_KEY)
    return Request(
        sent,
        first,
        last,
        chunks,
        t.predicted_n,
        t.predicted_per_second,
        t.prompt_ms,
        t.predicted_ms,
        None if energy is None else float(energy),
    )


async def door_request(http: Any, seed: int, n_predict: int) -> Request:
    """The same stream through the front door, as any HTTP client sees it (SSE over httpx)."""
    first = last = 0.0
    chunks = 0
    timings: dict[str, Any] | None = None
    body = {"prompt": PROMPT, "n_predict": n_predict, "ignore_eos": True, "seed": seed}
    sent = time.perf_counter()
    async with http.stream("POST", "/completion", json={**body, "stream": True}) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")[:300]
            raise RuntimeError(f"the front door answered {response.status_code}: {text}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            event = json.loads(payload)
            if event.get("content"):
                last = time.perf_counter()
                if not chunks:
                    first = last
                chunks += 1
            if event.get("stop"):
                timings = event.get("timings")
    if not timings or timings.get("predicted_n", 0) < 2:
        raise RuntimeError(f"request {seed} through the door ended without timings")
    return Request(
        sent,
        first,
        last,
        chunks,
        int(timings["predicted_n"]),
        float(timings["predicted_per_second"]),
        float(timings["prompt_ms"]),
        float(timings["predicted_ms"]),
    )


async def ticker(lags: list[float], stop: anyio.Event) -> None:
    """A 1 ms ticker: how late each wake-up is, in ms (the event loop's lag)."""
    while not stop.is_set():
        began = time.perf_counter()
        await anyio.sleep(0.001)
        lags.append((time.perf_counter() - began - 0.001) * 1e3)


async def run_phase(
    send: Callable[[int], Awaitable[Request]],
    probe: Probe | None,
    streams: int,
    rounds: int,
    *,
    lag: bool,
) -> Phase:
    """``rounds`` times, ``streams`` requests at once; a 1 ms ticker beside them if ``lag``."""
    requests: list[Request] = []
    lags: list[float] = []

    async def go(seed: int) -> None:
        requests.append(await send(seed))

    energy0 = await probe.energy_j() if probe else None  # a fresh reading
    t0, began = time.monotonic(), time.perf_counter()
    async with anyio.create_task_group() as outer:
        stop = anyio.Event()
        if lag:
            outer.start_soon(ticker, lags, stop)
        for r in range(rounds):
            async with anyio.create_task_group() as tg:
                for i in range(streams):
                    tg.start_soon(go, r * streams + i)
        stop.set()
    wall, t1 = time.perf_counter() - began, time.monotonic()
    energy1 = await probe.energy_j() if probe else None
    energy = None if energy0 is None or energy1 is None else energy1 - energy0
    samples = probe.window(t0, t1) if probe else []
    return Phase(streams, requests, wall, energy, samples, lags)


async def idle_lag(seconds: float) -> list[float]:
    lags: list[float] = []
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker, lags, stop)
        await anyio.sleep(seconds)
        stop.set()
    return lags


# --------------------------------------------------------------------------- facts
def describe_server(binary: str) -> dict[str, Any]:
    """llama-server's version, its split modes, and its build record if it has one."""
    from llamatelemetry_async.server import llama_server_version

    out: dict[str, Any] = {"path": binary, "version": llama_server_version(binary)}
    record = Path(binary).resolve().parent.parent / "build.json"
    if record.is_file():
        out["build"] = json.loads(record.read_text())
    helped = subprocess.run(
        [binary, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    out["split_modes"] = split_modes(helped.stdout + helped.stderr)
    return out


def split_modes(help_text: str) -> list[str]:
    """The choices of ``--split-mode`` in llama-server's ``--help`` (``[]``: no such flag)."""
    found = re.search(r"--split-mode\s*\{([^}]*)\}", help_text)
    return [m.strip() for m in found.group(1).split(",") if m.strip()] if found else []


def flag_value(argv: Sequence[str], *names: str) -> str | None:
    """The value of the last of ``names`` in ``argv`` (``--threads 4`` or ``--threads=4``)."""
    value = None
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
    return value


def process_threads(pid: int, proc: Path = Path("/proc")) -> dict[str, Any]:
    """What a running llama-server shows of its threads: ``/proc/<pid>/status`` (Threads,
    Cpus_allowed_list) and the ``--threads``/``--threads-batch`` of its argv, if given."""
    status: dict[str, str] = {}
    for line in (proc / str(pid) / "status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key.strip()] = value.strip()
    raw = (proc / str(pid) / "cmdline").read_bytes()
    argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    return {
        "pid": pid,
        "threads": int(status["Threads"]),
        "cpus_allowed": status.get("Cpus_allowed_list"),
        "argv_threads": flag_value(argv, "--threads", "-t"),
        "argv_threads_batch": flag_value(argv, "--threads-batch", "-tb"),
    }


def server_threads(engine: Any) -> list[dict[str, Any]]:
    out = []
    for info in engine.servers:
        if info.pid is None:
            out.append({"server": info.name, "error": "no process"})
            continue
        try:
            out.append({"server": info.name, "gpus": list(info.gpus), **process_threads(info.pid)})
        except (OSError, KeyError, ValueError) as exc:  # the process went away: say so
            out.append({"server": info.name, "error": f"{type(exc).__name__}: {exc}"})
    return out


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- the front door
class _QuietServer:
    """uvicorn's Server without its signal handlers: SIGINT stays the check's."""

    @staticmethod
    def make(app: Any) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Any:
                yield

        config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False)
        return Server(config)


@contextlib.asynccontextmanager
async def serve_door(door: Any) -> AsyncIterator[str]:
    """Serve ``door`` with uvicorn on 127.0.0.1 (a free port) and enter it; yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    server = _QuietServer.make(door)
    with sock:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            try:
                async with door:
                    await door.wait_ready()
                    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
            finally:
                server.should_exit = True


async def door_phase(engine: Any, streams: int, rounds: int, n_predict: int) -> dict[str, Any]:
    """The many-stream phase once more, through ``FrontDoor`` and a real HTTP client."""
    import httpx

    from llamatelemetry_async import FrontDoor

    key = secrets.token_urlsafe(24)
    door = FrontDoor(engine, api_keys=[key])
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with (
        serve_door(door) as url,
        httpx.AsyncClient(
            base_url=url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(300.0, connect=10.0),
            limits=limits,
        ) as http,
    ):

        async def send(seed: int) -> Request:
            return await door_request(http, seed, n_predict)

        async def warm(seed: int) -> Request:
            return await door_request(http, seed, 16)

        await run_phase(warm, None, streams, 1, lag=False)  # connections open, paths warm
        phase = await run_phase(send, None, streams, rounds, lag=True)
    return {"url": "127.0.0.1 (uvicorn)", **phase.summary()}


# --------------------------------------------------------------------------- run
class Budget:
    def __init__(self, seconds: float) -> None:
        self.until = time.monotonic() + seconds

    def left(self) -> float:
        return self.until - time.monotonic()


def make_sampler(args: argparse.Namespace) -> Any:
    """The library's GPUSampler; on the project's fake NVML in a CPU dry run."""
    from llamatelemetry_async import GPUSampler

    if args.cpu:
        from llamatelemetry_async.testing._fake_nvml import FakeGPU, FakeNVML

        return GPUSampler(interval=args.interval, nvml=FakeNVML([FakeGPU()]))
    return GPUSampler(interval=args.interval)


async def measure(args: argparse.Namespace, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every figure of the engine's phases, filled into ``result`` as they come (so a step
    that fails or runs out of time leaves the figures before it)."""
    from llamatelemetry_async import AsyncEngine, Placement, ServerConfig
    from llamatelemetry_async.gpu import read_gpu_memory, visible_gpus

    budget = Budget(args.deadline)
    config = ServerConfig(
        n_parallel=args.streams, ctx_size=args.streams * args.slot_ctx, flash_attn="auto"
    )
    gpus = [] if args.cpu else await anyio.to_thread.run_sync(visible_gpus)
    placement = Placement.cpu(1) if args.cpu else Placement.single_gpu(args.gpu)
    where = "CPU (dry run)" if args.cpu else f"GPU {args.gpu}, layers planned by the engine"
    result = result if result is not None else {}
    result |= {
        "mode": "cpu" if args.cpu else "gpu",
        "visible_gpus": gpus,
        "streams": args.streams,
        "n_predict": args.n_predict,
        "single_requests": args.single_requests,
        "rounds": args.rounds,
        "interval": args.interval,
        "server_config": f"n_parallel={config.n_parallel}, ctx_size={config.ctx_size} "
        f"({args.slot_ctx} per slot), flash_attn={config.flash_attn}, {where}",
        "server": await anyio.to_thread.run_sync(describe_server, args.binary),
    }
    if args.model_info:
        result["model"] = json.loads(await anyio.Path(args.model_info).read_text())
    before = None
    if not args.cpu:  # NVML's used memory before the engine starts: the plan is its increase
        memory, why = await anyio.to_thread.run_sync(read_gpu_memory, [args.gpu])
        before = memory[0].used_bytes if memory else None
        result["memory_before_reason"] = why
    sampler = make_sampler(args)
    probe = Probe(sampler, args.gpu if not args.cpu else 0)
    log_dir = Path(args.log_dir) if args.log_dir else None
    started = time.perf_counter()
    engine_cm = AsyncEngine(
        args.model,
        placement=placement,
        server=config,
        binary=args.binary,
        telemetry=False,
        ready_timeout=args.ready_timeout,
        log_dir=log_dir,
        gpu_sampler=sampler,
    )
    async with engine_cm as engine:
        result["ready_s"] = time.perf_counter() - started
        result["sampler"] = {
            "available": sampler.available,
            "reason": sampler.reason,
            "fake_nvml": bool(args.cpu),
        }
        print(f"engine ready in {result['ready_s']:.1f} s; GPU sampler: {sampler.reason or 'on'}")

        async def send(seed: int) -> Request:
            return await engine_request(engine, seed, args.n_predict)

        async def warm(seed: int) -> Request:
            return await engine_request(engine, seed, 16)

        # Warm-up (kernels, CUDA graphs for batch 1 and the full batch): not counted.
        await run_phase(warm, probe, 1, 1, lag=False)
        await run_phase(warm, probe, args.streams, 1, lag=False)
        result["vram"] = await vram_check(engine, probe, before, args)
        result["threads"] = server_threads(engine)
        result["idle_lag_ms"] = percentiles(await idle_lag(1.0))
        phases = []
        for streams, rounds in ((1, args.single_requests), (args.streams, args.rounds)):
            phase = await run_phase(send, probe, streams, rounds, lag=True)
            phases.append(phase.summary())
            print(f"{streams} stream(s): ratio {phases[-1]['ratio']:.4f}")
        result["phases"] = phases
        result["latest_sample"] = None if args.cpu else probe.latest()
        if args.door and budget.left() > 60:
            try:
                result["door"] = await door_phase(engine, args.streams, args.rounds, args.n_predict)
                print(
                    f"{args.streams} streams through the front door: "
                    f"ratio {result['door']['ratio']:.4f}"
                )
            except Exception as exc:  # reported as a FAIL in the verdict, with the reason
                result["door"] = {"error": _error(exc)}
        elif args.door:
            result["door"] = {"error": f"skipped: {budget.left():.0f} s of the budget left"}
    result["pairs"] = await pair_phases(args, config, gpus, result["server"], budget)
    return result


async def vram_check(
    engine: Any, probe: Probe, before: int | None, args: argparse.Namespace
) -> dict[str, Any]:
    """The planner's bytes for the GPU next to what NVML says the server added.

    On a GPU the engine planned ``n_gpu_layers`` (left unset); its prediction is compared
    with NVML's used memory after warm-up less what was used before the engine started
    (the process's own figure beside it). On the CPU the same planner runs for a nominal
    80 GiB GPU, so the code path runs, with nothing to compare against.
    """
    from llamatelemetry_async.models import GPUSpec, inspect_model, plan

    vram_plan = engine.vram_plan
    out: dict[str, Any] = {}
    if args.cpu:
        info = await inspect_model(args.model)
        nominal = GPUSpec(0, "nominal 80 GiB GPU (CPU dry run)", 80 * 2**30)
        vram_plan = plan(
            info,
            [nominal],
            ctx_size=engine.config.ctx_size,
            n_parallel=engine.config.n_parallel,
            flash_attn=engine.config.flash_attn,
        )
        out["nominal"] = True
    if vram_plan is None or not vram_plan.servers or not vram_plan.servers[0].devices:
        return {**out, "error": "the engine made no VRAM plan (see its log)"}
    server = vram_plan.servers[0]
    device = server.devices[0]
    out.update(
        {
            "explain": vram_plan.explain(),
            "n_gpu_layers": server.n_gpu_layers,
            "predicted": {
                "weights": device.weights_bytes,
                "kv": device.kv_bytes,
                "compute": device.compute_bytes,
                "overhead": device.overhead_bytes,
                "total": device.used_bytes,
            },
        }
    )
    if args.cpu:
        return out
    await probe.sampler.sample_now()
    latest = probe.latest() or {}
    used = latest.get("memory_used")
    pid = engine.servers[0].pid
    process = dict(latest.get("processes") or ()).get(pid)
    out.update(
        {
            "nvml_used": used,
            "nvml_used_before": before,
            "measured": None if used is None or before is None else used - before,
            "process_used": process,
        }
    )
    return out


async def pair_phases(
    args: argparse.Namespace,
    config: Any,
    gpus: list[int],
    server: dict[str, Any],
    budget: Budget,
) -> dict[str, Any]:
    """With two GPUs visible: one pair server per split mode the build supports."""
    from llamatelemetry_async import AsyncEngine, Placement

    if args.cpu or len(gpus) < 2:
        return {"skipped": NO_GPU if args.cpu else f"{len(gpus)} GPU visible", "modes": {}}
    supported = server.get("split_modes") or []
    modes: dict[str, Any] = {}
    pair = (gpus[0], gpus[1])
    for mode in args.pair_modes:
        if mode not in supported:
            modes[mode] = {"error": f"not in this build's --split-mode {supported}"}
            continue
        if budget.left() < 60:
            modes[mode] = {"error": f"skipped: {budget.left():.0f} s of the budget left"}
            continue
        log_dir = Path(args.log_dir) / f"pair-{mode}" if args.log_dir else None
        try:
            with anyio.fail_after(budget.left() - 20):
                async with AsyncEngine(
                    args.model,
                    placement=Placement.pairs([pair], split_mode=mode),
                    server=config,
                    binary=args.binary,
                    telemetry=False,
                    gpu_sampler=False,
                    ready_timeout=args.ready_timeout,
                    log_dir=log_dir,
                ) as engine:

                    async def send(seed: int, engine: Any = engine) -> Request:
                        return await engine_request(engine, seed, args.n_predict)

                    async def warm(seed: int, engine: Any = engine) -> Request:
                        return await engine_request(engine, seed, 16)

                    await run_phase(warm, None, args.streams, 1, lag=False)
                    one = await run_phase(send, None, 1, 2, lag=False)
                    many = await run_phase(send, None, args.streams, 1, lag=False)
                    modes[mode] = {
                        "server": engine.servers[0].name,
                        "one": one.summary(),
                        "many": many.summary(),
                        "threads": [
                            {**t, "server": f"{t['server']} (split {mode})"}
                            for t in server_threads(engine)
                        ],
                    }
            print(f"pair {pair} split {mode}: {modes[mode]['many']['aggregate_tok_s']:.0f} tok/s")
        except Exception as exc:  # this mode's FAIL, with the reason; the others still run
            modes[mode] = {"error": _error(exc)}
    return {"pair": list(pair), "supported": supported, "modes": modes}


def run(args: argparse.Namespace) -> int:
    result: dict[str, Any] = {}

    async def main() -> None:
        with anyio.fail_after(args.deadline):
            await measure(args, result)

    try:
        anyio.run(main)
    except BaseException as exc:  # the figures so far are written, then it propagates
        result["error"] = (
            f"the measuring step ran past its {args.deadline:g} s deadline"
            if isinstance(exc, TimeoutError)
            else _error(exc)
        )
        raise
    finally:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"figures written to {args.json}")
    return 0


# --------------------------------------------------------------------------- NCCL
class CudaRuntime:
    """The few CUDA runtime calls the NCCL check needs, through ctypes (blocking: call them
    in a worker thread). The current device is per thread, so each call selects its own."""

    H2D, D2H = 1, 2

    def __init__(self, path: str) -> None:
        self.path = path
        lib = ctypes.CDLL(path)
        lib.cudaSetDevice.argtypes = (ctypes.c_int,)
        lib.cudaGetDeviceCount.argtypes = (ctypes.POINTER(ctypes.c_int),)
        lib.cudaMalloc.argtypes = (ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t)
        lib.cudaFree.argtypes = (ctypes.c_void_p,)
        lib.cudaMemcpy.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.cudaGetErrorString.argtypes = (ctypes.c_int,)
        self._lib = lib

    @classmethod
    def find(cls) -> CudaRuntime:
        """libcudart where the library's NCCL code looks for it, else the CUDA toolkit's."""
        from llamatelemetry_async.nccl._comm import _cudart_candidates

        candidates = list(_cudart_candidates())
        for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
            if home:
                candidates += sorted(glob.glob(f"{home}/lib64/libcudart.so*"), reverse=True)
        tried = []
        for path in candidates:
            try:
                return cls(path)
            except OSError as exc:
                tried.append(f"{path} ({exc})")
        raise RuntimeError(
            "no CUDA runtime (libcudart) found; tried: "
            + ("; ".join(tried) or "nothing")
            + ". Put CUDA's lib64 on LD_LIBRARY_PATH, or set CUDA_HOME."
        )

    def _check(self, rc: int, what: str) -> None:
        if rc:
            text = self._lib.cudaGetErrorString(rc).decode()
            raise RuntimeError(f"{what} failed: cudaError {rc} ({text})")

    def device_count(self) -> int:
        n = ctypes.c_int()
        self._check(self._lib.cudaGetDeviceCount(ctypes.byref(n)), "cudaGetDeviceCount")
        return n.value

    def alloc(self, device: int, nbytes: int) -> int:
        self._check(self._lib.cudaSetDevice(device), "cudaSetDevice")
        ptr = ctypes.c_void_p()
        self._check(self._lib.cudaMalloc(ctypes.byref(ptr), nbytes), "cudaMalloc")
        return int(ptr.value or 0)

    def free(self, device: int, ptr: int) -> None:
        self._check(self._lib.cudaSetDevice(device), "cudaSetDevice")
        self._check(self._lib.cudaFree(ctypes.c_void_p(ptr)), "cudaFree")

    def upload(self, device: int, ptr: int, array: Any) -> None:
        self._check(self._lib.cudaSetDevice(device), "cudaSetDevice")
        rc = self._lib.cudaMemcpy(ptr, array.ctypes.data, array.nbytes, self.H2D)
        self._check(rc, "cudaMemcpy (to the device)")

    def download(self, device: int, ptr: int, like: Any) -> Any:
        import numpy as np

        out = np.empty_like(like)
        self._check(self._lib.cudaSetDevice(device), "cudaSetDevice")
        rc = self._lib.cudaMemcpy(out.ctypes.data, ptr, out.nbytes, self.D2H)  # waits for
        self._check(rc, "cudaMemcpy (to the host)")  # the device's default stream
        return out

    def synchronize(self, device: int) -> None:
        self._check(self._lib.cudaSetDevice(device), "cudaSetDevice")
        self._check(self._lib.cudaDeviceSynchronize(), "cudaDeviceSynchronize")


def bus_bandwidth(nbytes: int, seconds: float, ranks: int) -> float:
    """all_reduce bus bandwidth in GB/s, as nccl-tests reports it: algbw * 2(n-1)/n."""
    return nbytes / seconds * 2 * (ranks - 1) / ranks / 1e9


async def nccl_measure(args: argparse.Namespace) -> dict[str, Any]:
    """One-rank collectives, then (two or more GPUs) init_all, a two-rank all_reduce and its
    bus bandwidth; the values are checked exactly against the known inputs."""
    import numpy as np

    from llamatelemetry_async import Communicator
    from llamatelemetry_async.nccl import find_nccl, group, load

    out: dict[str, Any] = {"mode": "cpu" if args.cpu else "gpu"}
    try:
        lib = await anyio.to_thread.run_sync(load)
        out["library"] = str(await anyio.to_thread.run_sync(find_nccl))
        out["version"] = lib.version()
    except Exception as exc:  # NCCLNotFoundError and friends: the verdict says why
        out["error"] = _error(exc)
        return out
    if args.cpu:
        return out  # communicators need a GPU
    run = anyio.to_thread.run_sync
    try:
        cuda = await run(CudaRuntime.find)
        out["cudart"] = cuda.path
        devices = list(range(await run(cuda.device_count)))
    except Exception as exc:
        out["error"] = _error(exc)
        return out
    out["devices"] = len(devices)
    lags: list[float] = []
    stop = anyio.Event()
    n = args.elements
    x = np.arange(n, dtype=np.float32)  # exact in float32 up to 2**24
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker, lags, stop)
        try:
            out["one_rank"] = await _one_rank(Communicator, lib, cuda, x)
            if len(devices) >= 2:
                out["two_ranks"] = await _two_ranks(Communicator, group, cuda, devices[:2], args)
        except Exception as exc:
            out["error"] = _error(exc)
        finally:
            stop.set()
    out["lag"] = percentiles(lags)
    return out


async def _one_rank(communicator: Any, lib: Any, cuda: CudaRuntime, x: Any) -> dict[str, Any]:
    import numpy as np

    run = anyio.to_thread.run_sync
    out: dict[str, Any] = {"elements": int(x.size), "ops": {}}
    t = time.perf_counter()
    comm = await communicator.init_rank(1, 0, lib.unique_id(), device=0)
    out["init_rank_ms"] = (time.perf_counter() - t) * 1e3
    ptrs: list[int] = []
    try:
        xp = await run(cuda.alloc, 0, x.nbytes)
        ptrs.append(xp)
        yp = await run(cuda.alloc, 0, x.nbytes)
        ptrs.append(yp)
        await run(cuda.upload, 0, xp, x)
        send, recv = (xp, x.size, "f4"), (yp, x.size, "f4")
        ops: dict[str, Callable[[], Awaitable[None]]] = {
            "all_reduce": lambda: comm.all_reduce(send, recv),
            "broadcast": lambda: comm.broadcast(send, recv, root=0),
            "reduce": lambda: comm.reduce(send, recv, root=0),
            "all_gather": lambda: comm.all_gather(send, recv),
            "reduce_scatter": lambda: comm.reduce_scatter(send, recv),
        }
        minus = np.full_like(x, -1)
        for name, op in ops.items():
            await run(cuda.upload, 0, yp, minus)  # so a no-op cannot pass
            t = time.perf_counter()
            await op()
            ms = (time.perf_counter() - t) * 1e3
            got = await run(cuda.download, 0, yp, x)
            out["ops"][name] = {"ms": ms, "exact": bool(np.array_equal(got, x))}
    finally:
        await comm.aclose()
        for p in ptrs:
            await run(cuda.free, 0, p)
    return out


async def _two_ranks(
    communicator: Any, group: Any, cuda: CudaRuntime, devices: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    import numpy as np

    run = anyio.to_thread.run_sync
    out: dict[str, Any] = {"devices": devices}
    t = time.perf_counter()
    comms = await communicator.init_all(devices)
    out["init_all_ms"] = (time.perf_counter() - t) * 1e3
    n = args.elements
    big = args.bandwidth_elements
    ptrs: list[tuple[int, int]] = []  # (device, pointer) to free
    try:
        # Rank r holds r + 1 everywhere: the sum over two ranks is 3, exactly.
        values = [np.full(n, r + 1, dtype=np.float32) for r in range(len(devices))]
        buffers = []
        for d, v in zip(devices, values, strict=True):
            p = await run(cuda.alloc, d, v.nbytes)
            ptrs.append((d, p))
            await run(cuda.upload, d, p, v)
            buffers.append((p, n, "f4"))
        t = time.perf_counter()
        async with group():
            for c, b in zip(comms, buffers, strict=True):
                await c.all_reduce(b)  # in place
        for d in devices:
            await run(cuda.synchronize, d)
        out["all_reduce_ms"] = (time.perf_counter() - t) * 1e3
        expected = np.full(n, sum(range(1, len(devices) + 1)), dtype=np.float32)
        got = [await run(cuda.download, d, p, expected) for (d, p) in ptrs]
        out["all_reduce_exact"] = all(bool(np.array_equal(g, expected)) for g in got)
        # Bus bandwidth over a larger buffer (values do not matter here).
        wide = []
        for d in devices:
            p = await run(cuda.alloc, d, big * 4)
            ptrs.append((d, p))
            wide.append((p, big, "f4"))
        for i in range(args.bandwidth_iters + 2):
            if i == 2:  # two warm-up rounds
                for d in devices:
                    await run(cuda.synchronize, d)
                t = time.perf_counter()
            async with group():
                for c, b in zip(comms, wide, strict=True):
                    await c.all_reduce(b)
        for d in devices:
            await run(cuda.synchronize, d)
        seconds = (time.perf_counter() - t) / args.bandwidth_iters
        out["bandwidth"] = {
            "bytes": big * 4,
            "ms": seconds * 1e3,
            "bus_gb_s": bus_bandwidth(big * 4, seconds, len(devices)),
        }
    finally:
        for c in comms:
            await c.aclose()
        for d, p in ptrs:
            await run(cuda.free, d, p)
    return out


def nccl(args: argparse.Namespace) -> int:
    result = anyio.run(nccl_measure, args)
    Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, default=str))
    return 0


# --------------------------------------------------------------------------- verdict
@dataclasses.dataclass(frozen=True)
class Verdict:
    figure: str
    value: str
    target: str
    status: str  # "PASS", "FAIL", or "n/a (why)"

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


def _unmeasured(phase: dict[str, Any] | None) -> str:
    why = (phase or {}).get("error")
    return f"not measured: {why}" if why else "not measured"


def _ratio_row(figure: str, phase: dict[str, Any] | None) -> Verdict:
    target = f">= {RATIO_MIN}"
    if not phase or "error" in phase:
        return Verdict(figure, _unmeasured(phase), target, "FAIL")
    ratio = phase.get("ratio")
    if not isinstance(ratio, int | float) or not math.isfinite(ratio):
        return Verdict(figure, f"not measured ({ratio!r})", target, "FAIL")
    value = (
        f"{ratio:.4f} ({phase['engine_tok_s_per_stream']:.1f} vs "
        f"{phase['server_tok_s_per_stream']:.1f} tok/s per stream)"
    )
    return Verdict(figure, value, target, "PASS" if ratio >= RATIO_MIN else "FAIL")


def _within(ratio: float, tolerance: float) -> bool:
    # Rounded: a ratio of 1.1 computed as 1.1000000000000001 is within ±10 %.
    return abs(round(ratio - 1.0, 9)) <= tolerance


def _vram_row(vram: dict[str, Any] | None, cpu: bool) -> Verdict:
    figure = "VRAM plan / NVML used after warm-up"
    target = f"1 ± {VRAM_TOLERANCE:.2f}"
    if not vram:
        return Verdict(figure, "not measured", target, NO_GPU if cpu else "FAIL")
    if "error" in vram:
        return Verdict(figure, vram["error"], target, NO_GPU if cpu else "FAIL")
    planned = vram["predicted"]["total"]
    if cpu:
        return Verdict(figure, f"plan {planned / MIB:.0f} MiB (nominal GPU)", target, NO_GPU)
    measured = vram.get("measured")
    if not measured or measured <= 0:
        used, before = vram.get("nvml_used"), vram.get("nvml_used_before")
        got = (
            f"NVML used {_fmt(None if used is None else used / MIB, '.0f', ' MiB')}, "
            f"before start {_fmt(None if before is None else before / MIB, '.0f', ' MiB')}"
        )
        return Verdict(figure, f"plan {planned / MIB:.0f} MiB; {got}", target, "FAIL")
    ratio = planned / measured
    value = f"{ratio:.3f} (plan {planned / MIB:.0f} MiB, used {measured / MIB:.0f} MiB)"
    return Verdict(figure, value, target, "PASS" if _within(ratio, VRAM_TOLERANCE) else "FAIL")


def _energy_row(figure: str, phase: dict[str, Any] | None, cpu: bool) -> Verdict:
    target = f"1 ± {ENERGY_TOLERANCE:.2f}"
    if cpu:
        return Verdict(figure, "no GPU energy on CPU servers", target, NO_GPU)
    if not phase or "error" in phase:
        return Verdict(figure, _unmeasured(phase), target, "FAIL")
    spans, counter = phase.get("spans_energy_j"), phase.get("energy_j")
    if counter is None or counter <= 0:
        return Verdict(figure, f"energy counter: no difference ({counter!r})", target, "FAIL")
    if spans is None:
        got = f"{phase.get('requests_with_energy', 0)} of {phase.get('requests')}"
        return Verdict(figure, f"joules on {got} requests' spans", target, "FAIL")
    ratio = spans / counter
    value = f"{ratio:.3f} ({spans:.1f} J on spans, {counter:.1f} J counted)"
    return Verdict(figure, value, target, "PASS" if _within(ratio, ENERGY_TOLERANCE) else "FAIL")


def _lag_row(phase: dict[str, Any] | None, sampler: dict[str, Any] | None, cpu: bool) -> Verdict:
    streams = phase.get("streams", "?") if phase else "?"
    on = "sampler on (fake NVML)" if cpu else "GPU sampler on"
    figure = f"event-loop lag p99, {streams} streams, {on}"
    target = f"<= {LAG_P99_MAX_MS:g} ms"
    if not phase or "error" in phase:
        return Verdict(figure, _unmeasured(phase), target, NO_GPU if cpu else "FAIL")
    if cpu:  # llama-server computes on the same cores as the loop: a figure, not a verdict
        p99 = phase["lag_ms"]["p99"]
        return Verdict(
            figure, f"{_fmt(p99, '.2f')} ms (CPU server on the same cores)", target, NO_GPU
        )
    if not (sampler or {}).get("available"):
        why = (sampler or {}).get("reason")
        return Verdict(figure, f"the sampler did not run ({why})", target, "FAIL")
    p99 = phase["lag_ms"]["p99"]
    if not isinstance(p99, int | float) or not math.isfinite(p99):
        return Verdict(figure, "no ticks", target, "FAIL")
    value = f"{p99:.2f} ms (max {phase['lag_ms']['max']:.2f} ms)"
    return Verdict(figure, value, target, "PASS" if p99 <= LAG_P99_MAX_MS else "FAIL")


def _nccl_rows(nccl: dict[str, Any] | None, cpu: bool, gpus: int | None) -> list[Verdict]:
    one_fig, two_fig = "NCCL one-rank collectives", "NCCL init_all + 2-rank all_reduce"
    one_t, two_t = "all exact", "exact"
    if cpu:
        loaded = f"libnccl {nccl['version']} loads" if nccl and "version" in nccl else "no libnccl"
        return [Verdict(one_fig, loaded, one_t, NO_GPU), Verdict(two_fig, "-", two_t, NO_GPU)]
    if not nccl:
        return [
            Verdict(one_fig, "not measured", one_t, "FAIL"),
            Verdict(two_fig, "-", two_t, "FAIL"),
        ]
    error = nccl.get("error")
    one = nccl.get("one_rank")
    if one:
        ops = one["ops"]
        exact = sum(1 for v in ops.values() if v["exact"])
        wrong = [k for k, v in ops.items() if not v["exact"]]
        value = f"{exact}/{len(ops)} exact" + (f" (wrong: {', '.join(wrong)})" if wrong else "")
        rows = [Verdict(one_fig, value, one_t, "PASS" if not wrong and ops else "FAIL")]
    else:
        rows = [Verdict(one_fig, f"not run: {error}", one_t, "FAIL")]
    devices = nccl.get("devices", gpus or 0)
    two = nccl.get("two_ranks")
    if two:
        bw = two.get("bandwidth")
        value = "exact" if two["all_reduce_exact"] else "WRONG values"
        if bw:
            value += f"; bus bandwidth {bw['bus_gb_s']:.1f} GB/s ({bw['bytes'] / MIB:.0f} MiB)"
        rows.append(Verdict(two_fig, value, two_t, "PASS" if two["all_reduce_exact"] else "FAIL"))
    elif devices is not None and devices < 2 and one:
        rows.append(Verdict(two_fig, f"{devices} GPU visible", two_t, "n/a (one GPU)"))
    else:
        rows.append(Verdict(two_fig, f"not run: {error}", two_t, "FAIL"))
    return rows


def _pair_rows(pairs: dict[str, Any] | None, cpu: bool) -> list[Verdict]:
    target = "generates"
    if cpu:
        return [Verdict("GPU pair (tensor split)", "-", target, NO_GPU)]
    if not pairs:
        return [Verdict("GPU pair (tensor split)", "not measured", target, "FAIL")]
    if "skipped" in pairs:
        return [Verdict("GPU pair (tensor split)", pairs["skipped"], target, "n/a (one GPU)")]
    rows = []
    for mode, got in pairs["modes"].items():
        figure = f"GPU pair {pairs['pair']}, split {mode}: tok/s"
        if "error" in got:
            rows.append(Verdict(figure, got["error"], target, "FAIL"))
            continue
        one, many = got["one"], got["many"]
        value = (
            f"{one['server_tok_s_per_stream']:.0f} at 1 stream; {many['aggregate_tok_s']:.0f} "
            f"aggregate at {many['streams']} (ratio {many['ratio']:.3f})"
        )
        rows.append(Verdict(figure, value, target, "PASS"))
    return rows


def verdicts(
    engine: dict[str, Any] | None, nccl: dict[str, Any] | None, *, cpu: bool
) -> list[Verdict]:
    """Every figure beside its target; GPU-only figures are "n/a (no GPU)" on the CPU."""
    engine = engine or {}
    stopped = {"error": engine["error"]} if "error" in engine else None  # why, if it stopped
    phases = engine.get("phases") or [stopped, stopped]
    single, many = phases[0], phases[1]
    streams = engine.get("streams", "?")
    door = engine.get("door", stopped)
    rows = [
        _ratio_row("tokens/s ratio, 1 stream (engine / llama-server)", single),
        _ratio_row(f"tokens/s ratio, {streams} streams (engine / llama-server)", many),
    ]
    rows.append(_ratio_row(f"tokens/s ratio, {streams} streams through the front door", door))
    rows.append(_vram_row(engine.get("vram"), cpu))
    rows.append(_energy_row("GPU joules on spans / energy counter, 1 stream", single, cpu))
    rows.append(_energy_row(f"GPU joules on spans / energy counter, {streams} streams", many, cpu))
    rows.append(_lag_row(many, engine.get("sampler"), cpu))
    gpus = len(engine["visible_gpus"]) if "visible_gpus" in engine else None
    rows += _nccl_rows(nccl, cpu, gpus)
    rows += _pair_rows(engine.get("pairs"), cpu)
    return rows


def verdict_table(rows: Sequence[Verdict]) -> str:
    lines = ["| figure | value | target | verdict |", "| --- | --- | --- | --- |"]
    for r in rows:
        status = f"**{r.status}**" if r.status in ("PASS", "FAIL") else r.status
        cells = (r.figure, r.value, r.target, status)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def exit_code(rows: Sequence[Verdict]) -> int:
    return TARGET_MISSED if any(r.failed for r in rows) else 0


def _fmt(value: Any, spec: str = ".0f", unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:{spec}}{unit}"


def report_block(
    engine: dict[str, Any] | None,
    nccl: dict[str, Any] | None,
    rows: Sequence[Verdict],
    *,
    card: str,
    cpu: bool,
    now: _dt.datetime | None = None,
) -> str:
    """The markdown block for docs/gpu-report.md: the verdict table, then the details."""
    when = (now or _dt.datetime.now(_dt.UTC)).strftime("%Y-%m-%d %H:%M UTC")
    failed = sum(r.failed for r in rows)
    unjudged = sum(r.status not in ("PASS", "FAIL") for r in rows)
    overall = (
        f"{failed} target(s) missed"
        if failed
        else f"no target missed; {unjudged} not judged here (n/a)"
        if unjudged
        else "every target met"
    )
    title = f"### {when}: {card}" + (" (a CPU dry run: no GPU figures)" if cpu else "")
    lines = [title, "", f"Verdict: **{overall}**.", "", verdict_table(rows)]
    engine = engine or {}
    if "error" in engine:
        lines += [f"The measuring step stopped: {engine['error']}", ""]
    if "phases" in engine:
        lines += _engine_details(engine, cpu)
    lines += _nccl_details(nccl)
    return "\n".join(lines).rstrip() + "\n"


def _phase_row(name: str, p: dict[str, Any]) -> str:
    return (
        f"| {name} | {p['requests']} | {p['server_tok_s_per_stream']:.1f} "
        f"| {p['engine_tok_s_per_stream']:.1f} | {p['ratio']:.4f} "
        f"| {p['median_request_ratio']:.4f}, {p['worst_request_ratio']:.4f} "
        f"| {p['end_to_end_ratio']:.4f} | {p['aggregate_tok_s']:.0f} "
        f"| {_fmt(p['lag_ms']['p99'], '.2f')} |"
    )


def _engine_details(engine: dict[str, Any], cpu: bool) -> list[str]:
    server, model = engine.get("server", {}), engine.get("model", {})
    build = server.get("build")
    built = (
        f"built for {build.get('backend')} {build.get('cuda_arch') or ''}".rstrip()
        + f" in {build.get('duration_s')} s with {build.get('jobs')} jobs"
        if build
        else "not from the build cache"
    )
    single, many = engine["phases"]
    lines = [
        f"- Model: {model.get('desc', 'see model.log')}",
        f"- llama-server: {server.get('version')}; {built}; --split-mode "
        f"{{{','.join(server.get('split_modes') or [])}}}",
        f"- Server: {engine['server_config']}; engine ready in {engine['ready_s']:.1f} s",
        f"- Requests: {engine['n_predict']} tokens each (ignore_eos), prompt {PROMPT!r}; "
        f"1 stream x {engine['single_requests']} requests, then {engine['streams']} streams x "
        f"{engine['rounds']} rounds; the same through the front door",
        "",
        "| phase | requests | llama-server tok/s per stream | caller tok/s per stream | ratio "
        "| per request: median, worst | end to end | aggregate tok/s | lag p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        _phase_row("1 stream", single),
        _phase_row(f"{many['streams']} streams", many),
    ]
    door = engine.get("door") or {}
    if "ratio" in door:
        lines.append(_phase_row(f"{door['streams']} streams, front door", door))
    idle = engine.get("idle_lag_ms", {})
    lines += [
        "",
        "Ratio: llama-server's generation time (from `predicted_per_second`) over the time "
        "the caller saw the same tokens arrive in, summed over the phase's requests. End to "
        "end: llama-server's prompt + generation time over request sent to last token. "
        f"Event-loop lag (1 ms ticker) when idle: p99 {_fmt(idle.get('p99'), '.2f')} ms.",
        "",
    ]
    threads = engine.get("threads") or []
    for pair in (engine.get("pairs") or {}).get("modes", {}).values():
        threads += pair.get("threads", [])
    if threads:
        lines += ["Threads of the llama-server processes (`/proc/<pid>/status`, argv):", ""]
        for t in threads:
            if "error" in t:
                lines.append(f"- {t['server']}: {t['error']}")
            else:
                lines.append(
                    f"- {t['server']} (pid {t['pid']}): {t['threads']} threads; --threads "
                    f"{t['argv_threads'] or 'not given'}, --threads-batch "
                    f"{t['argv_threads_batch'] or 'not given'}; CPUs {t['cpus_allowed']}"
                )
        lines.append("")
    vram = engine.get("vram") or {}
    if "predicted" in vram:
        pred = vram["predicted"]
        measured = vram.get("measured")
        own = vram.get("process_used")
        lines += [
            f"VRAM plan (n_gpu_layers={vram['n_gpu_layers']}"
            + (", for a nominal GPU: CPU dry run" if vram.get("nominal") else "")
            + f"): weights {pred['weights'] / MIB:.0f} MiB + KV {pred['kv'] / MIB:.0f} MiB + "
            f"compute {pred['compute'] / MIB:.0f} MiB + overhead {pred['overhead'] / MIB:.0f} "
            f"MiB = **{pred['total'] / MIB:.0f} MiB**; NVML used after warm-up less before "
            f"start: **{_fmt(None if measured is None else measured / MIB, '.0f', ' MiB')}** "
            f"(the process's own: "
            f"{_fmt(None if own is None else own / MIB, '.0f', ' MiB')}).",
            "",
        ]
    if not cpu:
        lines += [
            f"GPU sampling: `GPUSampler` every {engine.get('interval')} s. Energy counted: the "
            "GPU's total-energy counter read just before and just after each phase; on spans: "
            "each request's `llamatelemetry.gpu.energy_j`, summed.",
            "",
            "| phase | samples | GPU util mean / max | power mean / max | memory used max "
            "| energy counted | on spans | per token |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for p in (single, many):
            mem = p["max_memory_used"]
            lines.append(
                f"| {p['streams']} stream(s) | {p['gpu_samples']} "
                f"| {_fmt(p['mean_utilization_gpu'])} / {_fmt(p['max_utilization_gpu'])} % "
                f"| {_fmt(p['mean_power_w'])} / {_fmt(p['max_power_w'])} W "
                f"| {_fmt(None if mem is None else mem / 2**30, '.1f', ' GiB')} "
                f"| {_fmt(p['energy_j'], '.1f', ' J')} | {_fmt(p['spans_energy_j'], '.1f', ' J')} "
                f"| {_fmt(p['energy_j_per_token'], '.4f', ' J')} |"
            )
        lines.append("")
    else:
        lines += ["GPU sampling: the project's fake NVML (CPU dry run): no GPU figures.", ""]
    return lines


def _nccl_details(nccl: dict[str, Any] | None) -> list[str]:
    if not nccl:
        return ["NCCL: not run."]
    head = f"NCCL {nccl.get('version', '?')} ({nccl.get('library', 'no library')})"
    lines = [head + (f": {nccl['error']}" if "error" in nccl else ""), ""]
    one = nccl.get("one_rank")
    if one:
        ops = ", ".join(
            f"{k} {v['ms']:.2f} ms ({'exact' if v['exact'] else 'WRONG'})"
            for k, v in one["ops"].items()
        )
        lines.append(
            f"- one rank: init {one['init_rank_ms']:.0f} ms; {one['elements']} float32: {ops}"
        )
    two = nccl.get("two_ranks")
    if two:
        bw = two.get("bandwidth") or {}
        lines.append(
            f"- init_all over GPUs {two['devices']}: {two['init_all_ms']:.0f} ms; all_reduce "
            f"{'exact' if two['all_reduce_exact'] else 'WRONG'}; {_fmt(bw.get('bytes', 0) / MIB)}"
            f" MiB in {_fmt(bw.get('ms'), '.2f')} ms: bus bandwidth "
            f"**{_fmt(bw.get('bus_gb_s'), '.1f')} GB/s**"
        )
    lag = nccl.get("lag")
    if lag and lag.get("n"):
        lines.append(
            f"- event-loop lag meanwhile: p99 {lag['p99']:.2f} ms, max {lag['max']:.2f} ms"
        )
    return lines


def _load(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def verdict(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    engine = _load(out / "engine.json")
    nccl_result = _load(out / "nccl.json")
    rows = verdicts(engine, nccl_result, cpu=args.cpu)
    block = report_block(engine, nccl_result, rows, card=args.card, cpu=args.cpu)
    (out / "verdict.md").write_text(verdict_table(rows))
    (out / "report-block.md").write_text(block)
    print("\n" + block)
    if args.append_report:
        with open(args.append_report, "a", encoding="utf-8") as fh:
            fh.write("\n" + block)
        print(f"appended to {args.append_report}")
    code = exit_code(rows)
    print("verdict: " + ("FAIL (a target was missed)" if code else "PASS"))
    return code


# --------------------------------------------------------------------------- arguments
def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("layer", "row", "tensor")]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown split mode(s) {bad}: use layer, row, tensor")
    return modes


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="The GPU check's driver (docs/gpu-report.md).")
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("write-model", help="write the random ~1B llama GGUF")
    w.add_argument("path")
    w.add_argument("--small", action="store_true", help="a 256-dim, 2-layer model (dry runs)")
    w.add_argument("--info", help="write {path, bytes, seconds, desc} as JSON here")
    w.set_defaults(func=write_model)

    r = sub.add_parser("run", help="run the engine on the model and write the figures")
    r.add_argument("--model", required=True)
    r.add_argument("--model-info", help="the JSON that write-model --info wrote")
    r.add_argument("--binary", required=True, help="the llama-server to run")
    r.add_argument("--json", required=True, help="write the figures here")
    r.add_argument("--cpu", action="store_true", help="a dry run on the CPU (no GPU)")
    r.add_argument("--gpu", type=int, default=0)
    r.add_argument("--streams", type=int, default=32)
    r.add_argument("--slot-ctx", type=int, default=256, help="context per slot")
    r.add_argument("--n-predict", type=int, default=224)
    r.add_argument("--single-requests", type=int, default=8)
    r.add_argument("--rounds", type=int, default=4, help="rounds of --streams requests")
    r.add_argument("--interval", type=float, default=0.1, help="GPU sampling interval (s)")
    r.add_argument("--no-door", dest="door", action="store_false", help="skip the front door")
    r.add_argument(
        "--pair-modes",
        type=_modes,
        default=list(PAIR_MODES),
        help="split modes for a GPU pair, comma-separated (default: layer,row)",
    )
    r.add_argument("--ready-timeout", type=float, default=180.0)
    r.add_argument("--deadline", type=float, default=240.0, help="give up after (s)")
    r.add_argument("--log-dir", help="llama-server logs go here")
    r.set_defaults(func=run)

    n = sub.add_parser("nccl", help="NCCL through the library's Communicator")
    n.add_argument("--json", required=True, help="write the figures here")
    n.add_argument("--cpu", action="store_true", help="no GPU: load the library only")
    n.add_argument("--elements", type=int, default=1 << 20, help="float32s per exactness check")
    n.add_argument(
        "--bandwidth-elements", type=int, default=16 << 20, help="float32s per bandwidth run"
    )
    n.add_argument("--bandwidth-iters", type=int, default=10)
    n.set_defaults(func=nccl)

    v = sub.add_parser("verdict", help="the verdict table and report block from the figures")
    v.add_argument("--out-dir", required=True, help="where engine.json and nccl.json are")
    v.add_argument("--card", default="unknown card", help="the report's heading")
    v.add_argument("--cpu", action="store_true", help="a CPU dry run: GPU figures are n/a")
    v.add_argument("--append-report", help="append the block to this file too")
    v.set_defaults(func=verdict)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
