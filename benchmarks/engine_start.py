"""Engine start: time to ready for 1 and 4 CPU servers, and readiness detection delay.

Run::

    .venv/bin/python benchmarks/engine_start.py [--reps 7] [--servers 1 4] [--threads N]
        [--llama-server PATH] [--model PATH]

Each repetition times ``async with AsyncEngine(model, placement=Placement.cpu(n))`` from just
before ``__aenter__`` to the first line of the block (every server ready), then leaves it and
checks that every llama-server pid is gone. Counts take turns within each repetition, so a
noisy neighbour slows them alike; one unmeasured start first warms the page cache and the
imports. Servers start in parallel, so 4 servers should cost about one start, as long as
the CPUs are not oversubscribed (``--threads`` defaults to CPUs / 4 for every count).

Readiness detection delay is how long the engine takes to notice a server that logged
``listening on``. The line's moment comes from llama-server's own log clock: every line is
prefixed with the time since its logger started (``M.SS.mmm.uuu``), and the engine logs
(debug level) each line as its pump reads it, plus ``started pid`` right after the spawn.
The estimate is ``ready - (spawn + shim + offset)``, with ``shim`` the parent-death exec
shim's own cost (measured here); the printed notes say which way each error pulls, and two
bounds bracket it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import psutil

TARGET_DETECTION_MS = 20.0
DELAY_ROWS = (
    ("offset", "listening line, printed offset (the server's own load time)"),
    ("spawn", "engine start to spawn logged"),
    ("estimate", "**detection delay, estimate**: ready - (spawn + shim + offset)"),
    ("upper", "detection delay, upper bound: ready - (engine start + shim + offset)"),
    ("lower", "detection delay, lower bound: ready - pump read the line"),
)
# The engine's server logger: "NAME: started pid N: ARGV" after the spawn, and, at debug
# level, "NAME: LINE" for each line its pump reads; llama-server prefixes lines M.SS.mmm.uuu.
_SERVER_LOGGER = "llamatelemetry_async.server"
_STARTED = re.compile(r"^(\S+): started pid (\d+):")
_LINE = re.compile(r"^(\S+): (\d+)\.(\d{2})\.(\d{3})\.(\d{3}) \S (.*)$")


def _bootstrap_path() -> None:
    """Let ``python benchmarks/x.py`` import the package from a checkout that is not installed."""
    if importlib.util.find_spec("llamatelemetry_async") is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class ServerTimes:
    """One server's moments in one start, in seconds of ``time.monotonic()``."""

    spawn: float | None = None
    listening_offset: float | None = None  # printed by llama-server, from its log clock
    listening_seen: float | None = None  # when the engine's pump read the line


@dataclass
class Start:
    """One measured engine start."""

    servers: int
    t0: float
    ready: float = 0.0
    stopped: float = 0.0
    per_server: dict[str, ServerTimes] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)
    left_alive: int = 0

    @property
    def to_ready(self) -> float:
        """Seconds from ``__aenter__`` to every server ready."""
        return self.ready - self.t0

    def last_listening(self, shim: float) -> tuple[float, float, float, float] | None:
        """(line moment, pump read it, spawn, offset) of the server that listened last."""
        best: tuple[float, float, float, float] | None = None
        for times in self.per_server.values():
            if times.spawn is None or times.listening_offset is None:
                return None
            if times.listening_seen is None:
                return None
            line_at = times.spawn + shim + times.listening_offset
            if best is None or line_at > best[0]:
                best = (line_at, times.listening_seen, times.spawn, times.listening_offset)
        return best


class LineClock(logging.Handler):
    """Timestamps the engine's server log records as they are emitted (synchronously)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.current: Start | None = None

    def emit(self, record: logging.LogRecord) -> None:
        now = time.monotonic()
        message = record.getMessage()
        if record.levelno >= logging.WARNING:  # a server in trouble is worth seeing
            print(f"{record.levelname}: {message}", file=sys.stderr)
        start = self.current
        if start is None:
            return
        if match := _STARTED.match(message):
            start.per_server.setdefault(match[1], ServerTimes()).spawn = now
            return
        match = _LINE.match(message)
        if match is None or "listening on" not in match[6]:
            return
        times = start.per_server.setdefault(match[1], ServerTimes())
        if times.listening_offset is None:
            minutes, seconds, millis, micros = (int(g) for g in match.groups()[1:5])
            times.listening_offset = minutes * 60 + seconds + millis / 1e3 + micros / 1e6
            times.listening_seen = now


@contextlib.contextmanager
def capture_server_logs(clock: LineClock) -> Iterator[None]:
    """Route the engine's per-line debug records to ``clock`` only, then restore the logger."""
    logger = logging.getLogger(_SERVER_LOGGER)
    saved = (logger.level, logger.propagate)
    logger.setLevel(logging.DEBUG)
    # The server's lines are not this benchmark's output (the clock prints its warnings).
    logger.propagate = False
    logger.addHandler(clock)
    try:
        yield
    finally:
        logger.removeHandler(clock)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def time_exec(argv: Sequence[str], reps: int) -> list[float]:
    """Wall seconds of fork + exec + exit + reap of ``argv``, ``reps`` times."""
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - began)
    return times


def alive(pids: Sequence[int], timeout: float = 2.0) -> int:
    """How many of ``pids`` are still running after ``timeout`` (zombies count as gone)."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
    _, running = psutil.wait_procs(procs, timeout=timeout)
    count = 0
    for proc in running:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.status() != psutil.STATUS_ZOMBIE:
                count += 1
    return count


async def one_start(
    model: Path,
    n: int,
    args: argparse.Namespace,
    clock: LineClock,
    *,
    measured: bool = True,
) -> Start:
    """Start an engine of ``n`` CPU servers, note the moments, stop it, check its pids."""
    from llamatelemetry_async import AsyncEngine, Placement, ServerConfig

    config = ServerConfig(threads=args.threads or None)
    start = Start(servers=n, t0=0.0)
    clock.current = start if measured else None
    start.t0 = time.monotonic()
    async with AsyncEngine(
        model, placement=Placement.cpu(n), server=config, binary=args.llama_server
    ) as engine:
        start.ready = time.monotonic()
        clock.current = None
        start.pids = [s.pid for s in engine.servers if s.pid is not None]
    start.stopped = time.monotonic()
    start.left_alive = alive(start.pids)
    return start


def ms(seconds: float) -> str:
    """Seconds as milliseconds, one decimal."""
    return f"{seconds * 1e3:.1f}"


def stats_row(labels: Sequence[str], values: Sequence[float], *extra: str) -> str:
    """A markdown row: ``labels``, then median, min, max (in ms), then ``extra`` cells."""
    figures = [ms(statistics.median(values)), ms(min(values)), ms(max(values))] if values else []
    return "| " + " | ".join([*labels, *(figures or ["n/a"] * 3), *extra]) + " |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=7, help="measured starts per count")
    parser.add_argument("--servers", type=int, nargs="+", default=[1, 4], help="CPU servers")
    parser.add_argument("--exec-reps", type=int, default=30, help="runs per exec timing")
    parser.add_argument(
        "--threads",
        type=int,
        help="llama-server --threads; 0: its own default (all CPUs each); default: CPUs / "
        "the largest server count, the same for every count so that starts compare",
    )
    parser.add_argument("--llama-server", help="llama-server binary (default: found)")
    parser.add_argument("--model", type=Path, help="GGUF model (default: the tiny test model)")
    args = parser.parse_args()
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // max(args.servers))

    _bootstrap_path()
    from llamatelemetry_async.server import dies_with_this_process
    from llamatelemetry_async.testing import write_tiny_model

    # The shim is what the engine puts in front of llama-server; /bin/true isolates its cost.
    exec_rows = {
        "/bin/true (fork + exec + reap baseline)": ["/bin/true"],
        "python -I -S -c pass": [sys.executable, "-I", "-S", "-c", "pass"],
        "parent-death shim, then exec /bin/true": dies_with_this_process(["/bin/true"]),
    }
    execs = {label: time_exec(argv, args.exec_reps) for label, argv in exec_rows.items()}
    baseline = statistics.median(execs["/bin/true (fork + exec + reap baseline)"])
    shim = statistics.median(execs["parent-death shim, then exec /bin/true"]) - baseline

    clock = LineClock()
    starts: list[Start] = []
    with tempfile.TemporaryDirectory(prefix="engine-start-") as tmp:
        model = args.model or write_tiny_model(Path(tmp) / "tiny.gguf")

        async def run_all() -> float:
            began = time.monotonic()
            await one_start(model, 1, args, clock, measured=False)
            cold = time.monotonic() - began
            for _ in range(args.reps):
                for n in args.servers:  # counts take turns: drift hits all alike
                    starts.append(await one_start(model, n, args, clock))
            return cold

        with capture_server_logs(clock):
            cold = anyio.run(run_all)

    cpus = os.cpu_count() or 1
    threads = str(args.threads) if args.threads else "llama-server's default"
    print(f"# Engine start ({cpus} CPUs, threads per server: {threads}, {args.reps} starts each)\n")
    print("## Time to ready (`__aenter__` start to the block's first line)\n")
    print("| servers | median ms | min ms | max ms | stop ms (median) | pids alive after |")
    print("|---|---|---|---|---|---|")
    medians: dict[int, float] = {}
    for n in args.servers:
        mine = [s for s in starts if s.servers == n]
        medians[n] = statistics.median(s.to_ready for s in mine)
        stop = ms(statistics.median(s.stopped - s.ready for s in mine))
        left = str(sum(s.left_alive for s in mine))
        print(stats_row([str(n)], [s.to_ready for s in mine], stop, left))
    print(f"\nFirst (cold) start of 1 server, not counted: {ms(cold)} ms.")
    if 1 in medians and len(medians) > 1:
        for n in args.servers:
            if n != 1:
                ratio = medians[n] / medians[1]
                print(
                    f"Ratio {n} servers / 1 server (medians): **{ratio:.2f}** "
                    "(target: about 1, servers start in parallel)."
                )
        print(
            "Each llama-server's own load time is the `listening line, printed offset` below: "
            "when servers x threads exceed the CPUs, that grows (they share the cores, and "
            "llama.cpp's threads spin), and the ratio measures the machine, not the engine. "
            "The engine's part is the detection delay on top of the slowest server."
        )

    print("\n## Readiness detection delay (after the last server logs `listening on`)\n")
    print("| servers | quantity | median ms | min ms | max ms | target |")
    print("|---|---|---|---|---|---|")
    for n in args.servers:
        rows: dict[str, list[float]] = {key: [] for key, _ in DELAY_ROWS}
        for s in starts:
            last = s.last_listening(shim) if s.servers == n else None
            if last is None:
                continue
            line_at, seen, spawn, offset = last
            rows["offset"].append(offset)
            rows["spawn"].append(spawn - s.t0)
            rows["estimate"].append(s.ready - line_at)
            rows["upper"].append(s.ready - (s.t0 + shim + offset))
            rows["lower"].append(s.ready - seen)
        for key, label in DELAY_ROWS:
            target = f"<= {TARGET_DETECTION_MS:g} ms" if key == "estimate" else ""
            print(stats_row([str(n), label], rows[key], target))

    print(
        "\nHow the delay is estimated: llama-server prefixes each log line with the time since "
        "its logger started. The listening line's moment is taken as spawn (the engine logs "
        "`started pid` once the fork/exec returned) + the shim's exec overhead (below) + that "
        "printed offset, and the delay is ready minus that moment. Two errors pull opposite "
        "ways: llama-server's log clock starts a few ms after its exec (dynamic linking), which "
        "places the line early (delay errs high); the spawn is logged a little after the exec, "
        "by up to the time the other spawns take when several start (delay errs low). The "
        "bounds bracket it: `upper bound` anchors at the moment `__aenter__` began (before any "
        "spawn); `lower bound` is measured directly, from the engine's log pump reading the "
        "line (so the line was printed before) to ready. With several servers the server "
        "whose line came last is used: the engine is ready when all are."
    )

    print("\n## Exec overhead of the parent-death shim\n")
    print("| command | median ms | min ms | max ms |")
    print("|---|---|---|---|")
    for label, values in execs.items():
        print(stats_row([label], values))
    print(f"| **shim overhead** (shim - /bin/true, medians) | {ms(shim)} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
