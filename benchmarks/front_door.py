"""The front door under 1,000 paced streams: straight to the servers, through the door, and
through LiteLLM's proxy, side by side on the same two replay servers.

Run::

    .venv/bin/python benchmarks/front_door.py [--streams 1000] [--tokens 50] [--rate 20]
        [--arms direct,bare,door,litellm] [--litellm PATH] [--uvloop] [--no-pin] [--json out.json]

Two replay servers (``llamatelemetry_async.testing._replay``, each in its own process; the
stand-ins for two GPUs) pace every stream at ``--rate`` tokens/s, ``--tokens`` per stream
(ideal wall time ``tokens / rate``: 2.5 s by default). Each reports ``--slots`` slots on
``/props`` (default 4,096), which an engine reads as the slots its router hands out: the
engine never makes a request wait for a slot.

The load generator is this process: this library's ``AsyncLlamaClient``, ``stream_chat`` to
``/v1/chat/completions`` (``stream: true``), every stream started at once. It records each
stream's time to first token (request sent to first content chunk) and the whole run's wall
time. The arms:

- ``direct``: half the streams to each replay server, no proxy (the baseline);
- ``bare``: the floor of any Python ASGI relay, for scale: uvicorn and this library's client
  relaying raw events round-robin, with no engine, routing, keys or telemetry (this script with
  ``--serve-door --bare``), run like ``door``;
- ``door``: this library's ``FrontDoor`` over ``AsyncEngine(placement=Placement.remote([...]))``
  served by uvicorn in a process of its own (this script with ``--serve-door``), with an API
  key. It runs twice: once alone (CPU, wall time, time to first token), once with a 1 ms
  ticker task inside the door process that records how late each wake-up is (event-loop lag;
  the ticker costs CPU, so its run is not the one CPU is read from);
- ``litellm``: LiteLLM's proxy (``litellm --config``; ``--litellm`` or found on PATH or at
  ``/tmp/litellm-venv/bin/litellm``), the two replay servers as two deployments of one model
  (``openai/replay``, ``simple-shuffle``), no database, telemetry off. Skipped when absent.

A proxy's CPU is its process's (and children's) user + system time from psutil over the
timed run, divided by the tokens the load generator received. Unless ``--no-pin``, the load
generator and the replay servers share the first CPU and the proxy has the others to itself
(as on a machine of its own); on 2 cores that is one CPU each.

Figures per arm: wall time over the ideal and over the direct arm's, proxy CPU per relayed
token, time to first token (p50, p99) and what the proxy added to the direct arm's, the
door's event-loop lag p99, errors (exceptions and short streams), the replay servers' pacing
lateness (small: the servers kept their pace). Targets: the door within 1.10x the direct
arm's wall time, <= 15 µs of CPU per token and >= 5x less than LiteLLM, <= 2 ms added to the
time to first token at p99, no errors.

``--serve-door URL...`` is the mode this script runs its door child in; it is not meant to be
run by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import importlib.util
import itertools
import json
import os
import platform
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import httpx
import psutil
from _arms import (
    PROMPT,
    bootstrap_path,
    installed_version,
    percentile,
    raise_fd_limit,
    run_loop,
    server_stats,
)

TARGET_WALL_VS_DIRECT: Final = 1.10
TARGET_CPU_US: Final = 15.0
TARGET_VS_LITELLM: Final = 5.0
TARGET_TTFT_ADDED_P99_MS: Final = 2.0
ARMS: Final = ("direct", "bare", "door", "litellm")
ARM_NAMES: Final = {
    "direct": "direct to the replay servers",
    "bare": "bare ASGI relay (uvicorn + client)",
    "door": "FrontDoor (uvicorn, own process)",
    "litellm": "LiteLLM proxy (own process)",
}
MODEL: Final = "replay"
LITELLM_FALLBACK: Final = "/tmp/litellm-venv/bin/litellm"
_PR_SET_PDEATHSIG: Final = 1
_HERE: Final = Path(__file__).resolve()


# -- children --------------------------------------------------------------------------------


def _child_setup(cpus: frozenset[int] | None) -> Callable[[], None]:
    """Run in a child before exec: die with this process, keep to ``cpus``."""

    def setup() -> None:
        with contextlib.suppress(Exception):  # Linux only; the stdin watch covers the rest
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return setup


def _env() -> dict[str, str]:
    """The environment of a child of this script: the package importable from a checkout."""
    env = dict(os.environ)
    root = str(_HERE.parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _spawn(
    argv: list[str],
    cpus: frozenset[int] | None,
    *,
    env: dict[str, str] | None = None,
    stdout: Any = subprocess.PIPE,
    own_group: bool = False,
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,  # held open: a child that watches it exits when this one dies
        stdout=stdout,
        stderr=subprocess.STDOUT if stdout is not subprocess.PIPE else None,
        env=env or _env(),
        preexec_fn=_child_setup(cpus),  # before any thread starts in this process
        start_new_session=own_group,
    )


def _stop(proc: subprocess.Popen[bytes], *, group: bool = False) -> None:
    """SIGTERM (the whole group with ``group``), then SIGKILL after 10 s; always reaped."""

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

    try:
        if proc.poll() is None or group:
            send(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                send(signal.SIGKILL)
        if group:  # what the leader left behind
            send(signal.SIGKILL)
    finally:
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def _read_until(proc: subprocess.Popen[bytes], prefix: str, timeout: float) -> list[str]:
    """Lines from ``proc``'s stdout up to and including the first starting with ``prefix``."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    data = b""
    lines: list[str] = []
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            while b"\n" in data:
                raw, _, data = data.partition(b"\n")
                lines.append(raw.decode(errors="replace").rstrip())
                if lines[-1].startswith(prefix):
                    return lines
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {prefix!r} line within {timeout} s: {lines[-5:]}")
            if not selector.select(remaining):
                continue
            more = os.read(fd, 65536)
            if not more:
                code = proc.wait(timeout=5)
                raise RuntimeError(f"exited with code {code} before {prefix!r}: {lines[-10:]}")
            data += more


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- the replay servers ------------------------------------------------------------------------


@contextlib.contextmanager
def replay_servers(
    count: int, tokens: int, rate: float, slots: int, cpus: frozenset[int] | None
) -> Iterator[list[str]]:
    with contextlib.ExitStack() as stack:
        urls = []
        for _ in range(count):
            argv = [sys.executable, "-m", "llamatelemetry_async.testing._replay"]
            argv += ["--slots", str(slots), "--tokens", str(tokens), "--rate", repr(rate)]
            argv += ["--port", "0", "--watch-stdin"]
            proc = _spawn(argv, cpus)
            stack.callback(_stop, proc)
            line = _read_until(proc, "listening on ", 30)[-1]
            urls.append(line.removeprefix("listening on "))
        yield urls


# -- the front door, in its own process -------------------------------------------------------


def _bare_relay(urls: list[str]) -> Any:
    """The floor of any ASGI relay: uvicorn, this library's client, nothing else (no engine,
    no routing, no keys, no telemetry); round-robin over ``urls``."""
    import msgspec

    from llamatelemetry_async import AsyncLlamaClient

    clients = [AsyncLlamaClient(url) for url in urls]
    turn = itertools.count()

    def frame(raw: list[bytes]) -> bytes:
        data = b"".join([b"data: " + payload + b"\n\n" for payload in raw])
        raw.clear()
        return data

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        client = clients[next(turn) % len(clients)]
        stream = client.forward_stream(scope["path"], msgspec.json.decode(body))
        raw = stream.raw
        assert raw is not None
        async with stream:
            head = [(b"content-type", b"text/event-stream")]
            await send({"type": "http.response.start", "status": 200, "headers": head})
            async for _ in stream:
                await send({"type": "http.response.body", "body": frame(raw), "more_body": True})
            await send({"type": "http.response.body", "body": frame(raw), "more_body": False})

    return app


def serve_door(args: argparse.Namespace) -> int:
    """``--serve-door URL...``: FrontDoor over a remote-only engine, under uvicorn.

    SIGUSR1 starts a 1 ms lag ticker; SIGUSR2 stops it and writes its figures to
    ``--lag-file`` (JSON, renamed into place); SIGTERM, SIGINT or EOF on stdin stop it.
    """
    raise_fd_limit(65536)
    if not args.profile_door:
        return run_loop(_door_main(args), args.uvloop)
    import cProfile

    profile = cProfile.Profile()
    profile.enable()
    try:
        return run_loop(_door_main(args), args.uvloop)
    finally:
        profile.disable()
        profile.dump_stats(args.profile_door)


async def _door_main(args: argparse.Namespace) -> int:
    import uvicorn

    from llamatelemetry_async import AsyncEngine, Placement
    from llamatelemetry_async.frontdoor import FrontDoor

    class Quiet(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:  # ours, not uvicorn's
            yield

    engine = AsyncEngine(placement=Placement.remote(args.serve_door))
    door = FrontDoor(engine, api_keys=[os.environ["FRONT_DOOR_BENCH_KEY"]])
    app: Any = _bare_relay(args.serve_door) if args.bare else door
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    config = uvicorn.Config(
        app, lifespan="off", log_config=None, access_log=False, log_level="warning"
    )
    server = Quiet(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    lags: list[float] = []
    peaks = {"waiting": 0, "outstanding": 0}
    ticker: asyncio.Task[None] | None = None

    async def tick() -> None:
        while True:
            expected = loop.time() + 0.001
            await asyncio.sleep(0.001)
            lags.append((loop.time() - expected) * 1000.0)
            peaks["waiting"] = max(peaks["waiting"], engine.waiting)
            busy = sum(info.outstanding for info in engine.servers) if len(lags) % 100 == 0 else 0
            peaks["outstanding"] = max(peaks["outstanding"], busy)

    def start_ticker() -> None:
        nonlocal ticker
        if ticker is None:
            lags.clear()
            peaks.update(waiting=0, outstanding=0)
            ticker = loop.create_task(tick())

    def stop_ticker() -> None:
        nonlocal ticker
        if ticker is not None:
            ticker.cancel()
            ticker = None
        out = {
            "ticks": len(lags),
            "lag_p50_ms": percentile(lags, 0.5) if lags else None,
            "lag_p99_ms": percentile(lags, 0.99) if lags else None,
            "lag_max_ms": max(lags) if lags else None,
            "waiting_peak": peaks["waiting"],
            "outstanding_peak": peaks["outstanding"],
        }
        path = Path(args.lag_file)
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps(out))
        partial.replace(path)

    def on_stdin() -> None:
        try:
            data = os.read(0, 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(0)
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, start_ticker)
    loop.add_signal_handler(signal.SIGUSR2, stop_ticker)
    loop.add_reader(0, on_stdin)
    port = sock.getsockname()[1]
    serving = asyncio.create_task(server.serve([sock]))
    try:
        async with door:
            await door.wait_ready()
            for info in engine.servers:
                print(f"server {info.name}: {info.url} {info.state}, {info.slots} slots")
            print(f"front door: http://127.0.0.1:{port}", flush=True)
            await stop.wait()
    finally:
        server.should_exit = True
        await serving
        sock.close()
    return 0


@contextlib.contextmanager
def door_process(
    urls: list[str],
    key: str,
    lag_file: Path,
    cpus: frozenset[int] | None,
    uvloop: bool,
    profile: str | None,
    bare: bool = False,
) -> Iterator[tuple[str, subprocess.Popen[bytes], list[str]]]:
    argv = [sys.executable, str(_HERE), "--serve-door", *urls, "--lag-file", str(lag_file)]
    if bare:
        argv.append("--bare")
    if uvloop:
        argv.append("--uvloop")
    if profile:
        argv += ["--profile-door", profile]
    env = _env()
    env["FRONT_DOOR_BENCH_KEY"] = key
    proc = _spawn(argv, cpus, env=env)
    try:
        lines = _read_until(proc, "front door: ", 60)
        yield lines[-1].removeprefix("front door: "), proc, lines[:-1]
    finally:
        _stop(proc)


# -- LiteLLM's proxy --------------------------------------------------------------------------


def find_litellm(given: str | None) -> str | None:
    if given:
        return given if Path(given).exists() or shutil.which(given) else None
    return shutil.which("litellm") or (
        LITELLM_FALLBACK if Path(LITELLM_FALLBACK).exists() else None
    )


def litellm_config(urls: list[str]) -> str:
    deployments = "".join(
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {url}/v1\n"
        "      api_key: none\n"
        for url in urls
    )
    return (
        f"model_list:\n{deployments}"
        "router_settings:\n  routing_strategy: simple-shuffle\n"
        "litellm_settings:\n  telemetry: false\n  drop_params: true\n  set_verbose: false\n"
    )


@contextlib.contextmanager
def litellm_process(
    binary: str,
    urls: list[str],
    key: str,
    workdir: Path,
    cpus: frozenset[int] | None,
    timeout: float,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    cfg = workdir / "litellm.yaml"
    cfg.write_text(litellm_config(urls))
    port = _free_port()
    env = dict(os.environ)
    env.update(
        LITELLM_LOG="ERROR",
        LITELLM_TELEMETRY="False",
        LITELLM_LOCAL_MODEL_COST_MAP="True",  # no fetch of the price list at start
        DISABLE_ADMIN_UI="True",
        NO_DOCS="True",
        LITELLM_MASTER_KEY=key,  # it refuses to start without one (and the door has keys too)
    )
    for name in ("DATABASE_URL", "OPENAI_API_KEY"):
        env.pop(name, None)
    log = (workdir / "litellm.log").open("wb")
    argv = [binary, "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)]
    proc = _spawn(argv, cpus, env=env, stdout=log, own_group=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"litellm exited ({proc.returncode}): {_tail(workdir)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health/liveliness", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"litellm did not answer within {timeout} s: {_tail(workdir)}")
            time.sleep(0.25)
        yield url, proc
    finally:
        _stop(proc, group=True)
        log.close()


def _tail(workdir: Path) -> str:
    with contextlib.suppress(OSError):
        return (workdir / "litellm.log").read_text(errors="replace")[-2000:]
    return ""


# -- one measured run ------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """What the load generator saw in one run through one arm."""

    wall: float = 0.0
    tokens: int = 0
    expected: int = 0
    ttft_ms: list[float] = dataclasses.field(default_factory=list)
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    proxy_cpu_s: float | None = None
    loadgen_cpu_s: float = 0.0
    replay_late_p99_ms: float = 0.0
    replay_cpu_s: float = 0.0
    warm_streams: int = 0
    warm_proxy_cpu_s: float | None = None  # the proxy's CPU over the warm-up burst


def _proxy_cpu(proc: psutil.Process | None) -> float | None:
    """User + system seconds of ``proc`` and its live children."""
    if proc is None:
        return None
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = p.cpu_times()
            total += times.user + times.system
    return total


async def drive(
    targets: Sequence[str],
    replays: Sequence[str],
    streams: int,
    tokens: int,
    *,
    api_key: str | None,
    proxy: psutil.Process | None,
    timeout: float,
    warm: int,
) -> Run:
    """``streams`` chat streams at once, stream i to ``targets[i % len]``; measure them."""
    from llamatelemetry_async import AsyncLlamaClient

    run = Run(expected=streams * tokens)
    messages = [{"role": "user", "content": PROMPT}]
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(AsyncLlamaClient(t, api_key=api_key, timeout=timeout))
            for t in targets
        ]

        async def one(i: int, n_tokens: int, record: bool) -> int:
            client = clients[i % len(clients)]
            n = 0
            start = time.perf_counter()
            try:
                async with client.stream_chat(messages, model=MODEL, max_tokens=n_tokens) as s:
                    async for chunk in s:
                        if chunk.text:
                            if not n and record:
                                run.ttft_ms.append((time.perf_counter() - start) * 1000.0)
                            n += 1
            except Exception as exc:
                if record:
                    run.errors[f"{type(exc).__name__}: {exc}"[:160]] += 1
                return n
            if record and n != n_tokens:
                run.errors[f"stream ended with {n} of {n_tokens} tokens"] += 1
            return n

        # Warm-up, not timed: imports, the proxy's first-request set-up, and (a burst as large
        # as the run) every connection pool full, the proxy's upstream one included, so the
        # timed run measures relaying, not connecting.
        warm0 = _proxy_cpu(proxy)
        await asyncio.gather(*(one(i, 2, False) for i in range(warm)))
        warm1 = _proxy_cpu(proxy)
        run.warm_streams = warm
        if warm0 is not None and warm1 is not None:
            run.warm_proxy_cpu_s = warm1 - warm0
        before = [await server_stats(url, reset=True) for url in replays]
        cpu0 = _proxy_cpu(proxy)
        own0 = time.process_time()
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(i, tokens, True) for i in range(streams)))
        run.wall = time.perf_counter() - start
        run.loadgen_cpu_s = time.process_time() - own0
        cpu1 = _proxy_cpu(proxy)
        if cpu0 is not None and cpu1 is not None:
            run.proxy_cpu_s = cpu1 - cpu0
        after = [await server_stats(url) for url in replays]
    run.tokens = sum(counts)
    run.replay_late_p99_ms = max(a["pacing_late_p99_ms"] for a in after)
    run.replay_cpu_s = sum(
        a["process_cpu_s"] - b["process_cpu_s"] for a, b in zip(after, before, strict=True)
    )
    return run


# -- results ---------------------------------------------------------------------------------


@dataclasses.dataclass
class ArmResult:
    key: str
    run: Run
    ideal: float
    lag: dict[str, Any] | None = None  # the door's ticker run
    lag_run: Run | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return ARM_NAMES[self.key]

    @property
    def wall_over_ideal(self) -> float:
        return self.run.wall / self.ideal

    @property
    def cpu_us(self) -> float | None:
        cpu = self.run.proxy_cpu_s
        return cpu / self.run.tokens * 1e6 if cpu is not None and self.run.tokens else None

    @property
    def per_request_us(self) -> float | None:
        """Proxy CPU per request of the warm-up burst (2 tokens each): the per-request cost."""
        cpu, n = self.run.warm_proxy_cpu_s, self.run.warm_streams
        return cpu / n * 1e6 if cpu is not None and n else None

    @property
    def loadgen_us(self) -> float:
        return self.run.loadgen_cpu_s / max(self.run.tokens, 1) * 1e6

    def ttft(self, q: float) -> float:
        return percentile(self.run.ttft_ms, q)

    def errors(self) -> Counter[str]:
        total = Counter(self.run.errors)
        if self.lag_run is not None:
            total.update(self.lag_run.errors)
        return total

    def to_json(self) -> dict[str, Any]:
        def pct(values: list[float]) -> dict[str, float]:
            return {f"p{int(q * 100)}": percentile(values, q) for q in (0.5, 0.9, 0.99)} | {
                "max": max(values, default=float("nan"))
            }

        return {
            "arm": self.key,
            "name": self.name,
            "wall_s": self.run.wall,
            "ideal_s": self.ideal,
            "wall_over_ideal": self.wall_over_ideal,
            "tokens": self.run.tokens,
            "expected_tokens": self.run.expected,
            "proxy_cpu_s": self.run.proxy_cpu_s,
            "proxy_cpu_us_per_token": self.cpu_us,
            "loadgen_cpu_us_per_token": self.loadgen_us,
            "ttft_ms": pct(self.run.ttft_ms),
            "errors": dict(self.errors()),
            "replay_late_p99_ms": self.run.replay_late_p99_ms,
            "replay_cpu_s": self.run.replay_cpu_s,
            "warm_streams": self.run.warm_streams,
            "warm_proxy_cpu_us_per_request": self.per_request_us,
            "lag": self.lag,
            "lag_run": None
            if self.lag_run is None
            else {
                "wall_over_ideal": self.lag_run.wall / self.ideal,
                "tokens": self.lag_run.tokens,
                "expected_tokens": self.lag_run.expected,
                "proxy_cpu_us_per_token": (
                    self.lag_run.proxy_cpu_s / self.lag_run.tokens * 1e6
                    if self.lag_run.proxy_cpu_s is not None and self.lag_run.tokens
                    else None
                ),
            },
            "notes": self.notes,
        }


def _f(value: float | None, spec: str = ".2f", none: str = "n/a") -> str:
    return none if value is None or value != value else format(value, spec)


def print_table(results: list[ArmResult]) -> None:
    direct = next((r for r in results if r.key == "direct"), None)
    print(
        "\n| arm | wall / ideal | vs direct | proxy CPU µs/token | TTFT p50 ms | TTFT p99 ms "
        "| added p50 ms | added p99 ms | door lag p99 ms | errors | load-gen µs/token "
        "| replay late p99 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        vs = r.wall_over_ideal / direct.wall_over_ideal if direct else None
        added50 = r.ttft(0.5) - direct.ttft(0.5) if direct and r is not direct else None
        added99 = r.ttft(0.99) - direct.ttft(0.99) if direct and r is not direct else None
        lag = r.lag.get("lag_p99_ms") if r.lag else None
        print(
            f"| {r.name} | {r.wall_over_ideal:.3f}x | {_f(vs, '.3f')}x | {_f(r.cpu_us, '.1f')} "
            f"| {r.ttft(0.5):.1f} | {r.ttft(0.99):.1f} | {_f(added50, '+.1f', '-')} "
            f"| {_f(added99, '+.1f', '-')} | {_f(lag, '.2f')} | {sum(r.errors().values())} "
            f"| {r.loadgen_us:.1f} | {r.run.replay_late_p99_ms:.2f} |"
        )
    for r in results:
        if r.per_request_us is not None:
            print(
                f"  {r.key}: proxy CPU per request {r.per_request_us:.0f} µs (untimed warm-up: "
                f"{r.run.warm_streams} streams of 2 tokens at once)"
            )
        for message, count in r.errors().most_common(5):
            print(f"  {r.key} error x{count}: {message}")
        for note in r.notes:
            print(f"  {r.key}: {note}")


def evaluate_targets(results: list[ArmResult]) -> list[dict[str, Any]]:
    by = {r.key: r for r in results}
    direct, door, lite = by.get("direct"), by.get("door"), by.get("litellm")
    rows: list[dict[str, Any]] = []

    def add(target: str, value: float | None, ok: bool | None, shown: str) -> None:
        rows.append({"target": target, "value": value, "pass": ok, "shown": shown})

    if door is None:
        return rows
    if direct is not None:
        ratio = door.wall_over_ideal / direct.wall_over_ideal
        add(
            f"door wall / direct wall <= {TARGET_WALL_VS_DIRECT:.2f}",
            ratio,
            ratio <= TARGET_WALL_VS_DIRECT,
            f"{ratio:.3f}",
        )
        added = door.ttft(0.99) - direct.ttft(0.99)
        add(
            f"door TTFT added at p99 <= {TARGET_TTFT_ADDED_P99_MS:g} ms",
            added,
            added <= TARGET_TTFT_ADDED_P99_MS,
            f"{added:+.2f} ms (p50 {door.ttft(0.5) - direct.ttft(0.5):+.2f} ms)",
        )
    cpu = door.cpu_us
    if cpu is not None:
        add(
            f"door CPU per token <= {TARGET_CPU_US:g} µs",
            cpu,
            cpu <= TARGET_CPU_US,
            f"{cpu:.1f} µs",
        )
    if lite is not None and lite.cpu_us is not None and cpu:
        times = lite.cpu_us / cpu
        add(
            f"LiteLLM CPU per token / door's >= {TARGET_VS_LITELLM:g}x",
            times,
            times >= TARGET_VS_LITELLM,
            f"{times:.1f}x ({lite.cpu_us:.1f} vs {cpu:.1f} µs)",
        )
    errors = sum(door.errors().values())
    add("door errors == 0", errors, errors == 0, str(errors))
    return rows


def print_targets(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    print("\ntargets:")
    for row in rows:
        word = "PASS" if row["pass"] else "MISS"
        print(f"  {word}  {row['target']}: {row['shown']}")


# -- main ------------------------------------------------------------------------------------


def _csv_arms(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ARMS]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(f"arms are {', '.join(ARMS)}; got {text!r}")
    return keys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Paced streams straight to two replay servers, through the front door "
        "and through LiteLLM's proxy.",
    )
    parser.add_argument("--streams", type=int, default=1000, help="concurrent streams")
    parser.add_argument("--tokens", type=int, default=50, help="tokens per stream")
    parser.add_argument("--rate", type=float, default=20.0, help="tokens/s per stream (> 0)")
    parser.add_argument("--servers", type=int, default=2, help="replay servers (GPUs)")
    parser.add_argument(
        "--slots", type=int, default=4096, help="slots each replay server reports in /props"
    )
    parser.add_argument(
        "--arms",
        type=_csv_arms,
        default=list(ARMS),
        help="direct,bare,door,litellm (in this order)",
    )
    parser.add_argument("--litellm", metavar="PATH", help="the litellm executable")
    parser.add_argument("--litellm-timeout", type=float, default=180.0, help="start-up, s")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, s")
    parser.add_argument(
        "--warm",
        type=int,
        help="untimed 2-token streams before each run, all at once (default: --streams, so "
        "every pool is full; a small number times connection set-up too)",
    )
    parser.add_argument("--uvloop", action="store_true", help="load generator and door on uvloop")
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not keep the proxy on CPUs of its own (load generator + replays on the first)",
    )
    parser.add_argument(
        "--profile-door",
        metavar="PATH",
        help="run the door process under cProfile, its whole life, and write pstats here "
        "(slows it: its figures are then not the door's)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 streams, 10 tokens")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON here")
    # The children's modes.
    parser.add_argument("--serve-door", nargs="+", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lag-file", help=argparse.SUPPRESS)
    return parser


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: every child stopped and reaped


def _lag_of(proc: subprocess.Popen[bytes], path: Path, timeout: float = 10.0) -> dict[str, Any]:
    path.unlink(missing_ok=True)
    proc.send_signal(signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("the door process wrote no lag figures")
        time.sleep(0.02)
    figures: dict[str, Any] = json.loads(path.read_text())
    return figures


def run_arms(
    args: argparse.Namespace,
    urls: list[str],
    cpus: tuple[frozenset[int], frozenset[int]] | None,
    workdir: Path,
) -> list[ArmResult]:
    ideal = args.tokens / args.rate
    proxy_cpus = cpus[1] if cpus else None
    results: list[ArmResult] = []

    def go(targets: list[str], key: str | None, proxy: psutil.Process | None) -> Run:
        coro = drive(
            targets,
            urls,
            args.streams,
            args.tokens,
            api_key=key,
            proxy=proxy,
            timeout=args.timeout,
            warm=args.streams if args.warm is None else args.warm,
        )
        return run_loop(coro, args.uvloop)

    def report(label: str, r: Run) -> None:
        print(
            f"  {label}: {r.wall / ideal:.3f}x ideal, {r.tokens}/{r.expected} tokens, "
            f"TTFT p99 {percentile(r.ttft_ms, 0.99):.1f} ms, {sum(r.errors.values())} errors"
            + (
                f", proxy {r.proxy_cpu_s / max(r.tokens, 1) * 1e6:.1f} µs/token"
                if r.proxy_cpu_s
                else ""
            )
        )

    for arm in args.arms:
        began = time.monotonic()
        if arm == "direct":
            run = go(urls, None, None)
            report("direct", run)
            results.append(ArmResult("direct", run, ideal))
        elif arm in ("door", "bare"):
            key = secrets.token_urlsafe(16)
            lag_file = workdir / f"{arm}-lag.json"
            with door_process(
                urls, key, lag_file, proxy_cpus, args.uvloop, args.profile_door, arm == "bare"
            ) as (url, proc, lines):
                for line in lines:
                    print(f"  {arm}: {line}")
                door = psutil.Process(proc.pid)
                run = go([url], key, door)
                report(f"{arm} (alone)", run)
                proc.send_signal(signal.SIGUSR1)  # the lag ticker, for the second run only
                lag_run = go([url], key, door)
                lag = _lag_of(proc, lag_file)
                report(f"{arm} (lag ticker on)", lag_run)
            result = ArmResult(arm, run, ideal, lag=lag, lag_run=lag_run)
            result.notes.append(
                f"lag run: p50 {_f(lag['lag_p50_ms'])} ms, max {_f(lag['lag_max_ms'])} ms over "
                f"{lag['ticks']} ticks; engine waiting peak {lag['waiting_peak']}, "
                f"outstanding peak {lag['outstanding_peak']}; wall {lag_run.wall / ideal:.3f}x"
            )
            results.append(result)
        elif arm == "litellm":
            binary = find_litellm(args.litellm)
            if binary is None:
                print("litellm: not installed, arm skipped")
                continue
            try:
                key = "sk-" + secrets.token_hex(32)
                with litellm_process(
                    binary, urls, key, workdir, proxy_cpus, args.litellm_timeout
                ) as (url, proc):
                    ready = time.monotonic() - began
                    print(f"  litellm: {binary} at {url} (ready in {ready:.1f} s)")
                    run = go([url], key, psutil.Process(proc.pid))
                    report("litellm", run)
            except (RuntimeError, TimeoutError) as exc:
                print(f"litellm: could not start, arm skipped ({exc})")
                continue
            results.append(ArmResult("litellm", run, ideal))
        print(f"  ({arm}: {time.monotonic() - began:.1f} s with start-up)")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    bootstrap_path()
    if args.serve_door:
        return serve_door(args)
    if args.quick:
        args.streams = min(args.streams, 16)
        args.tokens = min(args.tokens, 10)
        args.rate = max(args.rate, 50.0)
    if args.rate <= 0 or args.streams < 1 or args.tokens < 2 or args.servers < 1:
        parser.error("--rate must be > 0, --streams and --servers >= 1, --tokens >= 2")
    if args.uvloop and importlib.util.find_spec("uvloop") is None:
        parser.error("--uvloop: uvloop is not installed")
    signal.signal(signal.SIGTERM, _terminate)
    limit = raise_fd_limit(args.streams * 4 + 200)
    if limit < args.streams * 2 + 100:
        print(f"warning: open-files limit {limit} is low for {args.streams} streams")

    cpus: tuple[frozenset[int], frozenset[int]] | None = None
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if args.pin and len(allowed) >= 2:
        cpus = frozenset(allowed[:1]), frozenset(allowed[1:])
        os.sched_setaffinity(0, cpus[0])
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    print(
        f"front_door: python {platform.python_version()}, "
        f"llamatelemetry_async {installed_version('llamatelemetry_async')}, "
        f"uvicorn {installed_version('uvicorn')} ({http}), "
        f"starlette {installed_version('starlette')}; "
        f"{os.cpu_count()} CPUs ({len(allowed) or '?'} usable), load average "
        f"{os.getloadavg()[0]:.2f}; {'uvloop' if args.uvloop else 'asyncio'} loop"
    )
    print(
        f"{args.streams} concurrent chat streams, {args.tokens} tokens each at {args.rate:g} "
        f"tokens/s (ideal {args.tokens / args.rate:.2f} s), over {args.servers} replay servers "
        f"reporting {args.slots} slots each"
    )
    if cpus is not None:
        print(
            f"CPUs: load generator and replay servers on {sorted(cpus[0])}, the proxy on "
            f"{sorted(cpus[1])} (--no-pin: the kernel places all)"
        )
    results: list[ArmResult] = []
    interrupted = False
    started = time.monotonic()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="front-door-bench-") as tmp,
            replay_servers(
                args.servers, args.tokens, args.rate, args.slots, cpus[0] if cpus else None
            ) as urls,
        ):
            print(f"replay servers: {', '.join(urls)}")
            results = run_arms(args, urls, cpus, Path(tmp))
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: every child stopped; the table covers the arms that finished")
    print_table(results)
    targets = evaluate_targets(results)
    print_targets(targets)
    print(f"\nrun took {time.monotonic() - started:.1f} s; {os.cpu_count()} CPU cores")
    if args.json:
        out = {
            "command": [sys.executable, *sys.argv],
            "cpus": os.cpu_count(),
            "config": {k: v for k, v in vars(args).items() if k != "json"},
            "pinned": {"loadgen": sorted(cpus[0]), "proxy": sorted(cpus[1])} if cpus else None,
            "interrupted": interrupted,
            "arms": [r.to_json() for r in results],
            "targets": targets,
        }
        Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
