"""The GPU check's driver: write the big model, or run the engine on it and report.

Run by ``scripts/gpu_check.sh`` (which builds llama-server and sets PYTHONPATH); see
``docs/gpu-report.md``. Two commands:

    python scripts/gpu_check.py write-model PATH [--small]
    python scripts/gpu_check.py run --model PATH --binary PATH [--placement gpu|cpu] ...

``run`` starts one llama-server through ``AsyncEngine`` and measures, per request, the token
rate the engine delivers against llama-server's own ``timings.predicted_per_second``, at one
stream and at ``--streams`` concurrent streams; the event-loop lag of a 1 ms ticker during
the concurrent phase; and what the GPU did (``llamatelemetry_async.gpu.GPUSampler`` when that
exists, else nvidia-ml-py sampled in a worker thread): utilization, power, memory, and the
energy counter's delta per phase and per generated token. It prints a markdown block and
appends it to ``--report``.

Rates are compared like for like. llama-server's ``predicted_per_second`` is
``(predicted_n - 1)`` tokens over the time from its first sampled token to its last; the
engine's rate is the same count over the time from the first chunk the caller receives to
the last. The ratio is llama-server's generation time over the caller's, summed over a
phase's requests (token-weighted, so one request whose chunks arrived in a burst cannot swamp
it); 1.0 means the engine delivered tokens as fast as llama-server made them (target:
>= 0.98). Also reported: the per-request median and worst, and an end-to-end ratio
(llama-server's prompt + generation time over request sent to last token received).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import importlib
import inspect
import json
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio

PROMPT = "Once upon a time"
TARGET_MISSED = 3  # run's exit status when a ratio is under --target (1 is a crash)


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


# --------------------------------------------------------------------------- GPU probes
class GpuProbe:
    """What the check reads of GPU ``index``: a fresh energy reading, and periodic samples.

    Every NVML call runs in a worker thread. ``available`` False: ``reason`` says why.
    """

    source = "none"

    def __init__(self, reason: str | None = "not started") -> None:
        self._available = False
        self._reason = reason

    @property
    def available(self) -> bool:
        return self._available

    @property
    def reason(self) -> str | None:
        return self._reason

    async def energy_j(self) -> float | None:
        return None

    def window(self, t0: float, t1: float) -> list[dict[str, Any]]:
        return []

    def latest(self) -> dict[str, Any] | None:
        return None


def _as_dict(sample: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(sample) and not isinstance(sample, type):
        return dataclasses.asdict(sample)
    if isinstance(sample, dict):
        return dict(sample)
    return {k: v for k, v in vars(sample).items() if not k.startswith("_")}


class SamplerProbe(GpuProbe):
    """The project's own ``GPUSampler`` (issue 5), used through its public surface only."""

    source = "llamatelemetry_async.gpu.GPUSampler"

    def __init__(self, sampler: Any, index: int) -> None:
        super().__init__()
        self._sampler = sampler
        self._index = index

    # Read live: the engine starts the sampler after this probe is made.
    @property
    def available(self) -> bool:
        return bool(getattr(self._sampler, "available", True))

    @property
    def reason(self) -> str | None:
        return getattr(self._sampler, "reason", None)

    async def energy_j(self) -> float | None:
        sample_now = getattr(self._sampler, "sample_now", None)
        if sample_now is not None:
            await sample_now()
        latest = self.latest()
        value = latest.get("energy_j") if latest else None
        return float(value) if value is not None else None

    def window(self, t0: float, t1: float) -> list[dict[str, Any]]:
        return [_as_dict(s) for s in self._sampler.window(t0, t1).get(self._index, [])]

    def latest(self) -> dict[str, Any] | None:
        sample = self._sampler.latest().get(self._index)
        return None if sample is None else _as_dict(sample)


class NvmlThreadProbe(GpuProbe):
    """nvidia-ml-py sampled every ``interval`` s on its own thread (power, use, memory, energy)."""

    source = "pynvml in a worker thread"

    def __init__(self, index: int, interval: float) -> None:
        super().__init__()
        self._index = index
        self._interval = interval
        self._samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any = None
        self._handle: Any = None

    def start(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self._index)
        except Exception as exc:  # ImportError, NVMLError (no driver, no GPU)
            self._reason = f"unavailable: {type(exc).__name__}: {exc}"
            return
        self._available, self._reason = True, None
        self._thread = threading.Thread(target=self._run, name="gpu-check-nvml", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()

    def _read(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except self._nvml.NVMLError:
            return None  # NotSupported (or a transient error): skip this metric this time

    def _sample(self) -> dict[str, Any]:
        nv, h = self._nvml, self._handle
        util = self._read(lambda: nv.nvmlDeviceGetUtilizationRates(h))
        mem = self._read(lambda: nv.nvmlDeviceGetMemoryInfo(h))
        power = self._read(lambda: nv.nvmlDeviceGetPowerUsage(h))
        energy = self._read(lambda: nv.nvmlDeviceGetTotalEnergyConsumption(h))
        return {
            "t": time.monotonic(),
            "utilization_gpu": None if util is None else float(util.gpu),
            "utilization_memory": None if util is None else float(util.memory),
            "memory_used": None if mem is None else int(mem.used),
            "memory_total": None if mem is None else int(mem.total),
            "power_w": None if power is None else power / 1000.0,
            "energy_j": None if energy is None else energy / 1000.0,
        }

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._samples.append(self._sample())

    async def energy_j(self) -> float | None:
        if not self.available:
            return None
        read = self._read
        h = self._handle
        value = await anyio.to_thread.run_sync(
            lambda: read(lambda: self._nvml.nvmlDeviceGetTotalEnergyConsumption(h))
        )
        return None if value is None else value / 1000.0

    def window(self, t0: float, t1: float) -> list[dict[str, Any]]:
        return [s for s in list(self._samples) if t0 <= s["t"] <= t1]

    def latest(self) -> dict[str, Any] | None:
        return self._samples[-1] if self._samples else None


@contextlib.asynccontextmanager
async def gpu_probe(
    index: int, interval: float, enabled: bool, *, own_thread: bool = False
) -> AsyncIterator[tuple[GpuProbe, dict[str, Any]]]:
    """``(probe, extra AsyncEngine arguments)``: the project's GPUSampler if it can be imported
    (handed to the engine when the engine takes one, so one sampler serves both), else
    nvidia-ml-py on a thread of our own."""
    from llamatelemetry_async import AsyncEngine

    engine_takes_sampler = "gpu_sampler" in inspect.signature(AsyncEngine).parameters
    if not enabled:
        yield GpuProbe("not sampled (--sample-gpu, or a CPU placement)"), {}
        return
    gpu_module = importlib.import_module("llamatelemetry_async.gpu")
    sampler_cls: Any = getattr(gpu_module, "GPUSampler", None)
    if sampler_cls is not None and not own_thread:
        sampler = sampler_cls(interval=interval)
        if engine_takes_sampler:
            yield SamplerProbe(sampler, index), {"gpu_sampler": sampler}
        else:
            async with sampler:
                yield SamplerProbe(sampler, index), {}
        return
    thread_probe = NvmlThreadProbe(index, interval)
    await anyio.to_thread.run_sync(thread_probe.start)  # nvmlInit takes ~10 ms
    try:
        yield thread_probe, ({"gpu_sampler": False} if engine_takes_sampler else {})
    finally:
        await anyio.to_thread.run_sync(thread_probe.stop)


# --------------------------------------------------------------------------- measuring
@dataclasses.dataclass
class Request:
    sent: float  # perf_counter when the caller opened the stream
    first: float  # ... when it received the first chunk
    last: float  # ... and the last
    chunks: int
    predicted_n: int
    predicted_per_second: float  # llama-server's own figures (its timings)
    prompt_ms: float
    predicted_ms: float

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
    energy_j: float | None
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
        out: dict[str, Any] = {
            "streams": self.streams,
            "requests": len(rs),
            "tokens": tokens,
            "server_tok_s_per_stream": counted / server_s,
            "engine_tok_s_per_stream": counted / engine_s,
            "ratio": server_s / engine_s,
            "median_request_ratio": statistics.median(ratios),
            "worst_request_ratio": min(ratios),
            "end_to_end_ratio": e2e_server / e2e_engine,
            "aggregate_tok_s": tokens / self.wall_s,
            "wall_s": self.wall_s,
            "chunks_per_token": sum(r.chunks for r in rs) / max(1, tokens),
            "energy_j": self.energy_j,
            "energy_j_per_token": None if self.energy_j is None else self.energy_j / tokens,
            "gpu_samples": len(self.samples),
        }
        for key in ("utilization_gpu", "power_w", "memory_used"):
            values = [s[key] for s in self.samples if s.get(key) is not None]
            out[f"mean_{key}"] = statistics.fmean(values) if values else None
            out[f"max_{key}"] = max(values) if values else None
        out["lag_ms"] = _percentiles(self.lag_ms)
        return out


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "p50": math.nan, "p99": math.nan, "max": math.nan}
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    return {"n": len(ordered), "p50": pct(50), "p99": pct(99), "max": ordered[-1]}


async def one_request(engine: Any, seed: int, n_predict: int) -> Request:
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
    return Request(
        sent,
        first,
        last,
        chunks,
        t.predicted_n,
        t.predicted_per_second,
        t.prompt_ms,
        t.predicted_ms,
    )


async def ticker(lags: list[float], stop: anyio.Event) -> None:
    """A 1 ms ticker: how late each wake-up is, in ms (the event loop's lag)."""
    while not stop.is_set():
        began = time.perf_counter()
        await anyio.sleep(0.001)
        lags.append((time.perf_counter() - began - 0.001) * 1e3)


async def run_phase(
    engine: Any, probe: GpuProbe, streams: int, rounds: int, n_predict: int, *, lag: bool
) -> Phase:
    """``rounds`` times, ``streams`` requests at once; a 1 ms ticker beside them if ``lag``."""
    requests: list[Request] = []
    lags: list[float] = []

    async def go(seed: int) -> None:
        requests.append(await one_request(engine, seed, n_predict))

    energy0 = await probe.energy_j()  # a fresh reading, in a worker thread
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
    energy1 = await probe.energy_j()
    energy = None if energy0 is None or energy1 is None else energy1 - energy0
    return Phase(streams, requests, wall, energy, probe.window(t0, t1), lags)


async def idle_lag(seconds: float) -> list[float]:
    lags: list[float] = []
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker, lags, stop)
        await anyio.sleep(seconds)
        stop.set()
    return lags


def describe_server(binary: str) -> dict[str, Any]:
    """llama-server's version line, and its build record when it came from the build cache."""
    from llamatelemetry_async.server import llama_server_version

    out: dict[str, Any] = {"path": binary, "version": llama_server_version(binary)}
    record = Path(binary).resolve().parent.parent / "build.json"
    if record.is_file():
        out["build"] = json.loads(record.read_text())
    return out


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    from llamatelemetry_async import AsyncEngine, Placement, ServerConfig

    on_gpu = args.placement == "gpu"
    sample = on_gpu if args.sample_gpu == "auto" else args.sample_gpu != "no"
    placement = Placement.single_gpu(args.gpu) if on_gpu else Placement.cpu(1)
    config = ServerConfig(
        n_parallel=args.streams, ctx_size=args.streams * args.slot_ctx, flash_attn="auto"
    )
    where = f"all layers on GPU {args.gpu}" if on_gpu else "CPU"
    result: dict[str, Any] = {
        "server_config": f"n_parallel={config.n_parallel}, ctx_size={config.ctx_size} "
        f"({args.slot_ctx} per slot), flash_attn={config.flash_attn}, {where}",
        "server": await anyio.to_thread.run_sync(describe_server, args.binary),
    }
    probing = gpu_probe(args.gpu, args.interval, sample, own_thread=args.sample_gpu == "thread")
    started = time.perf_counter()
    async with probing as (probe, extra):
        engine_cm = AsyncEngine(
            args.model,
            placement=placement,
            server=config,
            binary=args.binary,
            telemetry=False,
            ready_timeout=args.ready_timeout,
            log_dir=args.log_dir,
            **extra,
        )
        async with engine_cm as engine:
            result["ready_s"] = time.perf_counter() - started
            result["gpu_source"] = probe.source if probe.available else "none"
            result["gpu_reason"] = probe.reason
            print(f"engine ready in {result['ready_s']:.1f} s; GPU sampling: {probe.source}")
            if not probe.available:
                print(f"  ({probe.reason})")
            # Warm-up (kernels, CUDA graphs for batch 1 and the full batch): not counted.
            await run_phase(engine, probe, 1, 1, 16, lag=False)
            await run_phase(engine, probe, args.streams, 1, 16, lag=False)
            result["vram"] = vram_check(engine, probe)
            result["idle_lag_ms"] = _percentiles(await idle_lag(1.0))
            phases = []
            for streams, rounds in ((1, args.single_requests), (args.streams, args.rounds)):
                phase = await run_phase(engine, probe, streams, rounds, args.n_predict, lag=True)
                phases.append(phase.summary())
                print(f"{streams} stream(s): {json.dumps(phases[-1], default=str)}")
            result["phases"] = phases
            result["latest_sample"] = probe.latest()
            result["servers"] = [dataclasses.asdict(s) for s in engine.servers]
    return result


def vram_check(engine: Any, probe: Any) -> dict[str, Any] | None:
    """The planner's bytes for the GPU next to what NVML says is used after warm-up.

    The engine planned ``n_gpu_layers`` (left unset above); comparing its prediction with
    the real footprint checks the compute-buffer estimate and ``CUDA_OVERHEAD_BYTES``.
    """
    plan = engine.vram_plan
    if plan is None or not plan.servers or not plan.servers[0].devices:
        return None
    device = plan.servers[0].devices[0]
    latest = probe.latest() if probe.available else None
    measured = latest.get("memory_used") if latest else None
    return {
        "explain": plan.explain(),
        "n_gpu_layers": plan.servers[0].n_gpu_layers,
        "predicted": {
            "weights": device.weights_bytes,
            "kv": device.kv_bytes,
            "compute": device.compute_bytes,
            "overhead": device.overhead_bytes,
            "total": device.used_bytes,
        },
        "measured_used": measured,
        "ratio": None if not measured else device.used_bytes / measured,
    }


# --------------------------------------------------------------------------- report
def _fmt(value: Any, spec: str = ".0f", unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:{spec}}{unit}"


def passed(result: dict[str, Any], target: float) -> bool:
    return all(p["ratio"] >= target for p in result["phases"])


def report(args: argparse.Namespace, result: dict[str, Any]) -> str:
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    single, many = result["phases"]
    server, model = result["server"], result["model"]
    build = server.get("build")
    built = (
        f"built for {build.get('backend')} {build.get('cuda_arch') or ''}".rstrip()
        + f" in {build.get('duration_s')} s with {build.get('jobs')} jobs "
        f"({build.get('built_at')})"
        if build
        else "not from the build cache"
    )
    lines = [
        f"### {now}: {args.card}",
        "",
        f"- Model: {model.get('desc', args.model)}; "
        f"written in {_fmt(model.get('seconds'), '.1f')} s",
        f"- llama-server: {server['version']}; {built}",
        f"- Server: {result['server_config']}; engine ready in {result['ready_s']:.1f} s",
        f"- Requests: {args.n_predict} tokens each (ignore_eos), prompt {PROMPT!r}; "
        f"1 stream x {args.single_requests} requests, then {args.streams} streams x "
        f"{args.rounds} rounds",
        "",
        "| streams | requests | llama-server tok/s per stream | engine tok/s per stream "
        "| ratio | per request: median, worst | end to end | aggregate tok/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in (single, many):
        lines.append(
            f"| {p['streams']} | {p['requests']} | {p['server_tok_s_per_stream']:.1f} "
            f"| {p['engine_tok_s_per_stream']:.1f} | **{p['ratio']:.4f}** "
            f"| {p['median_request_ratio']:.4f}, {p['worst_request_ratio']:.4f} "
            f"| {p['end_to_end_ratio']:.4f} | {p['aggregate_tok_s']:.0f} |"
        )
    verdict = "PASS" if passed(result, args.target) else "FAIL"
    idle, lag1, lag = result["idle_lag_ms"], single["lag_ms"], many["lag_ms"]
    lines += [
        "",
        f"Ratio target >= {args.target}: **{verdict}**. Ratio: llama-server's generation "
        "time (from `predicted_per_second`) over the time the caller saw the same tokens "
        "arrive in, summed over the phase's requests. End to end: llama-server's prompt + "
        "generation time over request sent to last token. Aggregate: all tokens over the "
        "phase's wall time.",
        "",
        f"Event-loop lag (1 ms ticker): idle p99 {_fmt(idle['p99'], '.2f')} ms; "
        f"1 stream p99 {_fmt(lag1['p99'], '.2f')} ms; {many['streams']} streams "
        f"p50 {_fmt(lag['p50'], '.2f')} ms, p99 **{_fmt(lag['p99'], '.2f')} ms**, "
        f"max {_fmt(lag['max'], '.2f')} ms ({lag['n']} ticks).",
        "",
    ]
    vram = result.get("vram")
    if vram:
        mib = 2**20
        pred = vram["predicted"]
        measured = vram["measured_used"]
        lines += [
            f"VRAM plan (n_gpu_layers={vram['n_gpu_layers']}, planned by the engine): "
            f"weights {pred['weights'] / mib:.0f} MiB + KV {pred['kv'] / mib:.0f} MiB + "
            f"compute {pred['compute'] / mib:.0f} MiB + overhead {pred['overhead'] / mib:.0f}"
            f" MiB = **{pred['total'] / mib:.0f} MiB** predicted; NVML used after warm-up: "
            f"**{_fmt(None if measured is None else measured / mib, '.0f', ' MiB')}**"
            + (f" (predicted / measured = {vram['ratio']:.3f})" if vram["ratio"] else "")
            + ".",
            "",
        ]
    if result["gpu_source"] == "none":
        lines.append(f"GPU sampling: none ({result['gpu_reason']}).")
    else:
        lines += [
            f"GPU sampling: {result['gpu_source']}, every {args.interval} s. Energy: the "
            "GPU's total-energy counter read just before and just after each phase.",
            "",
            "| phase | samples | GPU util mean / max | power mean / max | memory used max "
            "| energy | energy per token |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for p in (single, many):
            mem = p["max_memory_used"]
            lines.append(
                f"| {p['streams']} stream(s) | {p['gpu_samples']} "
                f"| {_fmt(p['mean_utilization_gpu'])} / {_fmt(p['max_utilization_gpu'])} % "
                f"| {_fmt(p['mean_power_w'])} / {_fmt(p['max_power_w'])} W "
                f"| {_fmt(None if mem is None else mem / 2**30, '.1f', ' GiB')} "
                f"| {_fmt(p['energy_j'], '.1f', ' J')} "
                f"| {_fmt(p['energy_j_per_token'], '.4f', ' J')} |"
            )
        latest = result["latest_sample"]
        if latest:
            shown = {k: v for k, v in latest.items() if v not in (None, (), [])}
            lines += ["", f"Latest sample: `{json.dumps(shown, default=str)}`"]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    async def main() -> dict[str, Any]:
        with anyio.fail_after(args.deadline):
            return await measure(args)

    result = anyio.run(main)
    result["model"] = json.loads(Path(args.model_info).read_text()) if args.model_info else {}
    block = report(args, result)
    print("\n" + block)
    if args.report:
        with open(args.report, "a", encoding="utf-8") as fh:
            fh.write("\n" + block)
        print(f"appended to {args.report}")
    if args.block:
        Path(args.block).write_text(block)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if passed(result, args.target) else TARGET_MISSED


async def nccl_measure() -> dict[str, Any]:
    """One-rank collectives and an init_all over the visible GPUs, on CuPy buffers with
    known values; timings and the event loop's lag while they run."""
    import cupy  # type: ignore[import-not-found]  # the device image's (GPU_FACTS)

    from llamatelemetry_async import Communicator
    from llamatelemetry_async.nccl import load

    lags: list[float] = []
    stop = anyio.Event()
    out: dict[str, Any] = {"version": load().version(), "ops": {}}
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker, lags, stop)
        t = time.perf_counter()
        comm = await Communicator.init_rank(1, 0, load().unique_id(), device=0)
        out["init_rank_ms"] = (time.perf_counter() - t) * 1e3
        n = 1 << 20
        x = cupy.arange(n, dtype=cupy.float32)
        y = cupy.empty_like(x)
        checks: dict[str, tuple[Callable[[], Awaitable[None]], Callable[[], Any]]] = {
            "all_reduce": (lambda: comm.all_reduce(x, y), lambda: cupy.array_equal(y, x)),
            "broadcast": (lambda: comm.broadcast(x, y, root=0), lambda: cupy.array_equal(y, x)),
            "reduce": (lambda: comm.reduce(x, y, root=0), lambda: cupy.array_equal(y, x)),
            "all_gather": (lambda: comm.all_gather(x, y), lambda: cupy.array_equal(y, x)),
            "reduce_scatter": (lambda: comm.reduce_scatter(x, y), lambda: cupy.array_equal(y, x)),
        }
        for name, (op, check) in checks.items():
            y.fill(-1)
            t = time.perf_counter()
            await op()
            out["ops"][name] = {"ms": (time.perf_counter() - t) * 1e3, "ok": bool(check())}
        await comm.aclose()
        devices = list(range(cupy.cuda.runtime.getDeviceCount()))
        t = time.perf_counter()
        comms = await Communicator.init_all(devices)
        out["init_all_ms"] = (time.perf_counter() - t) * 1e3
        buffers = []
        for d in devices:
            with cupy.cuda.Device(d):
                buffers.append(cupy.ones(n, dtype=cupy.float32))
        from llamatelemetry_async.nccl import group

        t = time.perf_counter()
        async with group():
            for c, b in zip(comms, buffers, strict=True):
                await c.all_reduce(b)
        out["init_all_all_reduce_ms"] = (time.perf_counter() - t) * 1e3
        out["init_all_ok"] = all(bool((b == len(devices)).all()) for b in buffers)
        out["devices"] = len(devices)
        for c in comms:
            await c.aclose()
        stop.set()
    out["lag"] = _percentiles(lags)
    return out


def nccl(args: argparse.Namespace) -> int:
    try:
        result = anyio.run(nccl_measure)
    except ImportError as exc:  # no CuPy on this machine: say so in the report
        block = f"\n### NCCL ({time.strftime('%Y-%m-%d')})\n\nskipped: {exc}\n"
        ok = False
    else:
        lines = [
            f"\n### NCCL {result['version']} ({time.strftime('%Y-%m-%d')}, {args.card})\n",
            f"- init_rank (1 rank): {result['init_rank_ms']:.0f} ms; init_all over "
            f"{result['devices']} GPU(s): {result['init_all_ms']:.0f} ms, grouped all_reduce "
            f"{result['init_all_all_reduce_ms']:.2f} ms, "
            f"values {'ok' if result['init_all_ok'] else 'WRONG'}",
            "- 1M float32 on one rank: "
            + ", ".join(
                f"{k} {v['ms']:.2f} ms ({'ok' if v['ok'] else 'WRONG'})"
                for k, v in result["ops"].items()
            ),
            f"- event-loop lag while they ran: p99 {result['lag'].get('p99', 0):.2f} ms, "
            f"max {result['lag'].get('max', 0):.2f} ms",
        ]
        block = "\n".join(lines) + "\n"
        ok = result["init_all_ok"] and all(v["ok"] for v in result["ops"].values())
    print(block)
    if args.report:
        with open(args.report, "a", encoding="utf-8") as fh:
            fh.write(block)
    return 0 if ok else TARGET_MISSED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="The GPU check's driver (docs/gpu-report.md).")
    sub = parser.add_subparsers(dest="command", required=True)

    w = sub.add_parser("write-model", help="write the random ~1B llama GGUF")
    w.add_argument("path")
    w.add_argument("--small", action="store_true", help="a 256-dim, 2-layer model (dry runs)")
    w.add_argument("--info", help="write {path, bytes, seconds, desc} as JSON here")
    w.set_defaults(func=write_model)

    r = sub.add_parser("run", help="run the engine on the model and report")
    r.add_argument("--model", required=True)
    r.add_argument("--model-info", help="the JSON that write-model --info wrote")
    r.add_argument("--binary", required=True, help="the llama-server to run")
    r.add_argument("--placement", choices=("gpu", "cpu"), default="gpu")
    r.add_argument("--gpu", type=int, default=0)
    r.add_argument("--streams", type=int, default=32)
    r.add_argument("--slot-ctx", type=int, default=256, help="context per slot")
    r.add_argument("--n-predict", type=int, default=224)
    r.add_argument("--single-requests", type=int, default=8)
    r.add_argument("--rounds", type=int, default=4, help="rounds of --streams requests")
    r.add_argument("--interval", type=float, default=0.1, help="GPU sampling interval (s)")
    r.add_argument(
        "--sample-gpu",
        choices=("auto", "yes", "thread", "no"),
        default="auto",
        help="auto: on GPU placements; yes: GPUSampler if importable, else an NVML thread; "
        "thread: always our own NVML thread",
    )
    r.add_argument("--target", type=float, default=0.98)
    r.add_argument("--ready-timeout", type=float, default=180.0)
    r.add_argument("--deadline", type=float, default=240.0, help="give up after (s)")
    r.add_argument("--card", default="unknown card", help="the report's heading")
    r.add_argument("--log-dir", help="llama-server logs go here")
    r.add_argument("--report", help="append the markdown block to this file")
    r.add_argument("--block", help="write the markdown block alone to this file")
    r.add_argument("--json", help="write the raw figures here")
    r.set_defaults(func=run)

    n = sub.add_parser("nccl", help="NCCL collectives on CuPy buffers (one rank, init_all)")
    n.add_argument("--card", default="unknown card")
    n.add_argument("--report", help="append the markdown block to this file")
    n.set_defaults(func=nccl)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
