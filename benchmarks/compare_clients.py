"""Client comparison: every arm on one server in one run, at several concurrencies.

Run::

    .venv/bin/python benchmarks/compare_clients.py [--quick] [--json out.json]
        [--servers replay,llama] [--arms raw,openai,lib,chat,traced,events]
        [--concurrency 1,16,256,1000] [--rounds 3] [--passes cpu,lag,sampler]

Arms (``benchmarks/_arms.py``): ``raw`` httpx loop, ``openai`` (openai-python
``AsyncOpenAI``, from the ``bench`` extra), this library with tracing off (``lib``, and
``chat`` against the same endpoint as openai), with tracing on and token events off
(``traced``) and with an event per token (``events``); ``floor`` (a bare asyncio Protocol)
on request. Tracing exports into memory (``InMemorySpanExporter``, ``InMemoryMetricReader``
behind the SDK's batch processor), so a network exporter's cost does not dominate.

Servers, each in its own process so that only the client's CPU counts. Unless ``--no-pin``,
this process is pinned to one CPU and the replay server to the others, because a server
sharing the client's CPU turns its own work into the client's event-loop lag (1,000 paced
streams on 2 cores: lag p99 ~7 ms shared, ~1-2 ms apart). The real llama-server keeps every
CPU (see below).

- ``replay``: ``llamatelemetry_async.testing._replay``, every stream paced at ``--rate``
  tokens/s (default 20), ``--tokens`` per stream (default 50): ideal wall time
  ``repeat * tokens / rate``. ``--rate 0`` replays as fast as it can (no ideal).
- ``llama``: the real llama-server (``find_llama_server``, or ``--llama-server``) on the
  project's tiny model (or ``--model``) on every CPU, the client's included, as on a
  CPU-only box (pinned to the one CPU a 2-core split leaves, its HTTP threads starved the
  generation at 1,000 connections), with ``-np`` = the largest concurrency capped at 256
  (llama.cpp's maximum number of sequences) and ``-cram 0``. What
  is feasible on a CPU: streams of ``--llama-tokens`` (default 32, ``ignore_eos``), shortened
  so that a run stays within ``--llama-token-budget`` tokens (default 8,192: at 1,000 streams,
  8 tokens each; 256 generate at once and the rest wait in the server); at low concurrency
  each worker streams several requests so a run has ``--llama-min-streams`` (default 16).
  There is no ideal; the wall column shows seconds.

For each server and concurrency ``c``, ``--rounds`` rounds; in each round the arms take turns
(the starting arm rotates), so a noisy neighbour slows them all alike. Each arm does up to
three passes per round, each ``c`` workers x ``--repeat`` streams:

- ``cpu``: nothing else in the process; client CPU per token is this process's
  ``time.process_time`` over the run divided by the tokens received (median over rounds),
  plus wall time and errors (the ticker is left out because it costs CPU too: in a VM one
  idle wake-up of the loop can cost ~50-170 µs, more than a token);
- ``lag``: the same with a 1 ms ticker task measuring event-loop lag (actual minus expected
  wake-up; p50/p99 over every tick of every round);
- ``sampler``: this library's arms only: the ticker and a ``GPUSampler`` in the same process
  on the fake NVML backend, with two fake GPUs whose calls take the times measured on an H100
  (``../shared/GPU_FACTS.md``: 3.9 ms for the energy counter, 20.8 ms per PCIe direction;
  PCIe on, one sample every 0.1 s).

Table columns: CPU per token (``cpu`` pass) and its ratios, against raw httpx and
openai-python's against each arm; wall time (``cpu`` pass, else ``lag``), errors summed over
every pass (exceptions and streams that ended short); lag; the same with the GPU sampler and
the samples it took during the timing; for the replay server, how late it wrote paced tokens
(p99; small means the client, not the server, set the pace). Notes under each table give the
per-token cost of a span and of a token event, errors, and the longest garbage-collection
pause per arm (one process holds every arm's imports, openai-python's included, so a full
collection takes longer here than in an application that imports only this library).
``--json`` writes every run's figures. Targets
(printed at the end): 1,000 paced streams within 1.15x the ideal wall time with no errors
and event-loop lag p99 <= 5 ms while the GPU sampler runs; at concurrency 1 on the replay
server, this client <= 0.5x raw httpx, <= 0.65x with an event per token, and openai-python
>= 10x this client's chat stream.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import httpx
from _arms import (
    ARMS,
    READS,
    Arm,
    CPUSplit,
    Load,
    Run,
    SamplerSpec,
    bootstrap_path,
    idle_wake_cost,
    installed_version,
    make_arms,
    measure,
    percentile,
    raise_fd_limit,
    run_loop,
    server_stats,
    settle_llama,
    settle_replay,
)

TARGET_WALL: Final = 1.15
TARGET_LAG_P99_MS: Final = 5.0
TARGET_CPU_VS_RAW: Final = 0.5
TARGET_EVENTS_VS_RAW: Final = 0.65
TARGET_OPENAI_VS_CHAT: Final = 10.0
MAX_SLOTS: Final = 256  # llama.cpp's LLAMA_MAX_SEQ: -np above it fails to load
PASSES: Final = ("cpu", "lag", "sampler")
DEFAULT_ARMS: Final = "raw,openai,lib,chat,traced,events"


@dataclasses.dataclass
class Server:
    """One server under the arms, and what an ideal client would take."""

    kind: str  # "replay" or "llama"
    url: str
    title: str
    tokens: int
    rate: float = 0.0  # tokens/s per stream, 0 when not paced
    repeat: int = 1  # streams per worker
    min_streams: int = 1  # per run: low concurrencies get more streams per worker
    token_budget: int | None = None  # per run: high concurrencies get shorter streams
    wake_us: float | None = None  # CPU of one idle loop wake-up after 1/rate s

    def ideal(self, load: Load) -> float | None:
        return load.repeat * load.tokens / self.rate if self.rate > 0 else None

    def load(self, concurrency: int, timeout: float) -> Load:
        repeat = max(self.repeat, -(-self.min_streams // concurrency))
        tokens = self.tokens
        if self.token_budget is not None:
            tokens = max(4, min(tokens, self.token_budget // concurrency))
        return Load(tokens, concurrency, repeat, timeout)


@dataclasses.dataclass
class Cell:
    """One arm at one concurrency on one server: its runs, by pass."""

    server: Server
    load: Load
    arm: Arm
    runs: dict[str, list[Run]] = dataclasses.field(default_factory=lambda: {p: [] for p in PASSES})
    server_late_p99_ms: list[float] = dataclasses.field(default_factory=list)
    server_cpu_s: float = 0.0

    @property
    def key(self) -> str:
        return self.arm.key

    def cpu_us(self) -> float | None:
        runs = self.runs["cpu"]
        return statistics.median(r.cpu_us_per_token for r in runs) if runs else None

    def wall(self, pass_: str) -> float | None:
        """Median wall time of a pass: over the ideal when there is one, else seconds."""
        runs = self.runs[pass_]
        if not runs:
            return None
        ideal = self.server.ideal(self.load)
        return statistics.median(r.wall / ideal if ideal else r.wall for r in runs)

    def lags(self, pass_: str) -> list[float]:
        return [lag for r in self.runs[pass_] for lag in r.lags_ms]

    def errors(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for runs in self.runs.values():
            for r in runs:
                total.update(r.errors)
        return total

    def reads_per_token(self) -> float | None:
        runs = self.runs["cpu"]
        if not runs or not READS.installed:
            return None
        return statistics.median(r.reads / max(r.tokens, 1) for r in runs)

    def to_json(self) -> dict[str, Any]:
        ideal = self.server.ideal(self.load)
        out: dict[str, Any] = {
            "server": self.server.kind,
            "concurrency": self.load.concurrency,
            "tokens": self.load.tokens,
            "repeat": self.load.repeat,
            "rate": self.server.rate,
            "ideal_s": ideal,
            "arm": self.arm.key,
            "name": self.arm.name,
            "endpoint": self.arm.endpoint,
            "cpu_us_per_token": self.cpu_us(),
            "errors": dict(self.errors()),
            "server_late_p99_ms": self.server_late_p99_ms,
            "server_cpu_us_per_token": None,
            "passes": {},
        }
        tokens = sum(r.tokens for runs in self.runs.values() for r in runs)
        if self.server.kind == "replay" and tokens:
            out["server_cpu_us_per_token"] = self.server_cpu_s / tokens * 1e6
        for pass_, runs in self.runs.items():
            if not runs:
                continue
            lags = self.lags(pass_)
            out["passes"][pass_] = {
                "wall_s": [r.wall for r in runs],
                "wall_over_ideal": [r.wall / ideal for r in runs] if ideal else None,
                "cpu_us_per_token": [r.cpu_us_per_token for r in runs],
                "tokens": [r.tokens for r in runs],
                "expected_tokens": [r.expected for r in runs],
                "lag_p50_ms": percentile(lags, 0.5) if lags else None,
                "lag_p99_ms": percentile(lags, 0.99) if lags else None,
                "lag_max_ms": max(lags) if lags else None,
                "lag_ticks": len(lags),
                "sampler_ticks": [r.sampler_ticks for r in runs],
                "exported": [r.exported for r in runs],
                "gc_full": [r.gc_full for r in runs],
                "gc_max_ms": [r.gc_max_ms for r in runs],
                "gc_max_cpu_ms": [r.gc_max_cpu_ms for r in runs],
                "gc_collections": [r.gc_collections for r in runs],
                "reads_per_token": (
                    [r.reads / max(r.tokens, 1) for r in runs] if READS.installed else None
                ),
            }
        return out


# -- servers ---------------------------------------------------------------------------------


def _spawning(split: CPUSplit | None, pinned: bool) -> contextlib.AbstractContextManager[None]:
    return split.spawning(pinned=pinned) if split is not None else contextlib.nullcontext()


@contextlib.contextmanager
def replay(args: argparse.Namespace, split: CPUSplit | None) -> Iterator[Server]:
    from llamatelemetry_async.testing._replay import replay_server

    pacing = f"paced at {args.rate:g} tokens/s per stream" if args.rate > 0 else "unpaced"
    wake = run_loop(idle_wake_cost(1 / args.rate)) * 1e6 if args.rate > 0 else None
    with contextlib.ExitStack() as stack:
        with _spawning(split, pinned=True):
            url = stack.enter_context(replay_server(tokens=args.tokens, rate=args.rate))
        title = f"replay server (own process), {pacing}"
        yield Server("replay", url, title, args.tokens, args.rate, args.repeat, wake_us=wake)


@contextlib.contextmanager
def llama(args: argparse.Namespace, slots: int, split: CPUSplit | None) -> Iterator[Server]:
    from llamatelemetry_async.server import find_llama_server
    from llamatelemetry_async.testing import write_tiny_model
    from llamatelemetry_async.testing._server import run_llama_server

    binary = find_llama_server(args.llama_server)
    with contextlib.ExitStack() as stack:
        model = args.model
        if model is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="compare-clients-"))
            model = write_tiny_model(Path(tmp) / "tiny.gguf")
        # Room per slot for the chat-templated prompt (~25 tokens) and the reply. No prompt
        # cache in RAM (-cram 0): with more streams than slots it saves and restores KV state
        # as requests rotate through the slots, server work that only adds noise here.
        ctx = slots * max(128, args.llama_tokens + 96)
        server_args = ["-np", str(slots), "-c", str(ctx), "-cram", "0"]
        # Not pinned: it keeps every CPU, the client's included, as on a CPU-only box. With
        # 1,000 connections its HTTP threads (slots + 2) keep hundreds of threads runnable;
        # squeezed onto the one CPU a 2-core split leaves, it served ~140 tokens/s.
        with _spawning(split, pinned=False):
            srv = stack.enter_context(
                run_llama_server(
                    model, binary=binary, args=server_args, ready_timeout=args.server_timeout
                )
            )
        title = f"real llama-server ({Path(model).name}, {' '.join(server_args)}, CPU)"
        yield Server(
            "llama",
            srv.url,
            title,
            args.llama_tokens,
            repeat=args.repeat,
            min_streams=args.llama_min_streams,
            token_budget=args.llama_token_budget,
        )


# -- running ---------------------------------------------------------------------------------


async def _one(
    cell: Cell, pass_: str, sampler: SamplerSpec, use_sampler: bool
) -> tuple[Run, dict[str, float] | None]:
    server = cell.server
    # The replay server's pacing figures start afresh here; its CPU time is read on both sides.
    before = await server_stats(server.url, reset=True) if server.kind == "replay" else None
    run = await measure(
        cell.arm,
        server.url,
        cell.load,
        lag=pass_ != "cpu",
        sampler=sampler if use_sampler else None,
    )
    if server.kind == "replay":
        after = await settle_replay(server.url)
        assert before is not None
        after = {**after, "cpu_delta": after["process_cpu_s"] - before["process_cpu_s"]}
        return run, after
    await settle_llama(server.url)
    return run, None


def run_level(
    server: Server,
    arms: list[Arm],
    load: Load,
    args: argparse.Namespace,
    sampler: SamplerSpec,
) -> list[Cell]:
    """Every arm, every pass, ``--rounds`` times, taking turns; return one cell per arm."""
    cells = [Cell(server, load, arm) for arm in arms]
    for round_ in range(args.rounds):
        shift = round_ % len(cells)
        order = cells[shift:] + cells[:shift]
        for pass_ in args.passes:
            for cell in order:
                if pass_ == "sampler" and not cell.arm.library:
                    continue
                run, stats = run_loop(_one(cell, pass_, sampler, pass_ == "sampler"), args.uvloop)
                if cell.arm.after_run is not None:
                    run.exported = cell.arm.after_run()
                if stats is not None:
                    cell.server_late_p99_ms.append(stats["pacing_late_p99_ms"])
                    cell.server_cpu_s += stats["cpu_delta"]
                cell.runs[pass_].append(run)
                ideal = server.ideal(load)
                wall = f"{run.wall / ideal:.2f}x ideal" if ideal else f"{run.wall:.2f} s"
                lag = f", lag p99 {percentile(run.lags_ms, 0.99):.1f} ms" if run.lags_ms else ""
                print(
                    f"  {server.kind} c={load.concurrency} round {round_ + 1}/{args.rounds} "
                    f"{pass_:7} {cell.arm.name}: {wall}, {run.cpu_us_per_token:.1f} us/token, "
                    f"{sum(run.errors.values())} errors{lag}",
                    file=sys.stderr,
                    flush=True,
                )
    return cells


# -- printing --------------------------------------------------------------------------------


def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if value is None or value != value else f"{value:{fmt}}{suffix}"


def _lag_cell(lags: list[float]) -> str:
    if not lags:
        return "-"
    return f"{percentile(lags, 0.5):.2f} / {percentile(lags, 0.99):.2f}"


def print_level(cells: list[Cell], args: argparse.Namespace) -> None:
    server, load = cells[0].server, cells[0].load
    ideal = server.ideal(load)
    by_key = {c.key: c for c in cells}
    raw, openai = by_key.get("raw"), by_key.get("openai")
    raw_cpu = raw.cpu_us() if raw else None
    openai_cpu = openai.cpu_us() if openai else None
    what = f"{load.concurrency} streams x {load.tokens} tokens"
    if load.repeat > 1:
        what = f"{load.concurrency} workers x {load.repeat} streams x {load.tokens} tokens"
    shown = f"ideal {ideal:.2f} s" if ideal else "no ideal: wall in seconds"
    print(f"\n### {server.title}: {what} ({shown}), {args.rounds} rounds\n")
    wall_head = "wall / ideal" if ideal else "wall s"
    reads = " reads/token |" if READS.installed else ""
    print(
        f"| arm | CPU µs/token | vs raw httpx | openai ÷ arm | {wall_head} | errors "
        f"| lag p50 / p99 ms | with GPU sampler: {wall_head} | lag p50 / p99 ms "
        f"| sampler ticks | server late p99 ms |{reads}"
    )
    print("| --- |" + " ---: |" * (10 + (1 if READS.installed else 0)))
    wall_fmt = ".2f"
    for c in cells:
        cpu = c.cpu_us()
        vs_raw = cpu / raw_cpu if cpu and raw_cpu else None
        openai_over = openai_cpu / cpu if cpu and openai_cpu else None
        ticks = [r.sampler_ticks for r in c.runs["sampler"]]
        late = statistics.median(c.server_late_p99_ms) if c.server_late_p99_ms else None
        extra = f" {_num(c.reads_per_token(), '.2f')} |" if READS.installed else ""
        sampled = c.arm.library and "sampler" in args.passes
        print(
            f"| {c.arm.name} | {_num(cpu, '.1f')} | {_num(vs_raw, '.2f', 'x')} "
            f"| {_num(openai_over, '.1f', 'x')} "
            f"| {_num(c.wall('cpu') or c.wall('lag'), wall_fmt, 'x' if ideal else '')} "
            f"| {sum(c.errors().values())} | {_lag_cell(c.lags('lag'))} "
            f"| {_num(c.wall('sampler'), wall_fmt, 'x' if ideal else '') if sampled else '-'} "
            f"| {_lag_cell(c.lags('sampler'))} | {min(ticks) if ticks else '-'} "
            f"| {_num(late, '.2f')} |{extra}"
        )
    lib, traced, events = by_key.get("lib"), by_key.get("traced"), by_key.get("events")
    notes = []
    if server.wake_us is not None and load.concurrency == 1:
        notes.append(
            f"for reference, one idle event-loop wake-up after {1 / server.rate:g} s costs "
            f"{server.wake_us:.0f} µs of CPU here (a bare asyncio.sleep loop): at concurrency "
            "1 every paced token pays one"
        )
    if lib and traced and (a := traced.cpu_us()) and (b := lib.cpu_us()):
        notes.append(f"span + metrics per token (traced - lib): {a - b:.2f} µs")
    if traced and events and (a := events.cpu_us()) and (b := traced.cpu_us()):
        notes.append(f"one token event (events - traced): {a - b:.2f} µs")
    for c in cells:
        for message, count in c.errors().most_common(3):
            notes.append(f"{c.arm.name}: {count} x {message}")
    pauses = []
    for c in cells:
        runs = c.runs["lag"] + c.runs["sampler"]
        if runs and (worst := max(r.gc_max_ms for r in runs)) > 5:
            cpu = max(r.gc_max_cpu_ms for r in runs)
            full = max(r.gc_full for r in runs)
            collections = max(r.gc_collections for r in runs)
            pauses.append(
                f"{c.arm.key} {worst:.0f} ms, {cpu:.0f} ms CPU ({full} full of {collections})"
            )
    if pauses:
        notes.append(
            "longest garbage-collection pause in a lag run (it stops the loop as long; the "
            "collector's own CPU time, less than the wall time when other processes preempt "
            f"it; most full collections in one run, of all collections): {', '.join(pauses)}"
        )
    for note in notes:
        print(f"- {note}")


def evaluate_targets(cells: list[Cell]) -> list[dict[str, Any]]:
    """The issue's targets, against the cells that measure them."""
    rows: list[dict[str, Any]] = []
    replay = [c for c in cells if c.server.kind == "replay"]
    for c in replay:
        if c.load.concurrency < 1000 or c.server.rate <= 0 or not c.arm.library:
            continue
        for pass_, beside in (("sampler", "GPU sampler on"), ("lag", "no sampler")):
            if not c.runs[pass_]:
                continue
            wall = c.wall(pass_)
            errors = sum(r.errors.total() for r in c.runs[pass_])
            lag_p99 = percentile(c.lags(pass_), 0.99)
            met = wall is not None and wall <= TARGET_WALL and errors == 0
            rows.append(
                {
                    "target": f"{c.load.concurrency} paced streams: wall <= {TARGET_WALL}x "
                    f"ideal, 0 errors ({beside})",
                    "arm": c.arm.name,
                    "value": f"{_num(wall, '.2f', 'x')}, {errors} errors",
                    "met": met,
                }
            )
            rows.append(
                {
                    "target": f"{c.load.concurrency} paced streams: event-loop lag p99 <= "
                    f"{TARGET_LAG_P99_MS:g} ms ({beside})",
                    "arm": c.arm.name,
                    "value": f"{lag_p99:.2f} ms",
                    "met": lag_p99 <= TARGET_LAG_P99_MS,
                }
            )
    for rate in sorted({c.server.rate for c in replay}):
        ones = {c.key: c for c in replay if c.load.concurrency == 1 and c.server.rate == rate}
        cpu = {k: c.cpu_us() for k, c in ones.items()}
        where = f"concurrency 1, replay {'unpaced' if rate <= 0 else f'at {rate:g} tokens/s'}"
        checks = (
            ("lib", "raw", TARGET_CPU_VS_RAW, "this client / raw httpx CPU <= {}x"),
            ("events", "raw", TARGET_EVENTS_VS_RAW, "event per token / raw httpx CPU <= {}x"),
        )
        for arm, base, limit, text in checks:
            mine, theirs = cpu.get(arm), cpu.get(base)
            if mine and theirs:
                value = mine / theirs
                rows.append(
                    {
                        "target": f"{where}: {text.format(limit)}",
                        "arm": ones[arm].arm.name,
                        "value": f"{value:.2f}x",
                        "met": value <= limit,
                    }
                )
        theirs, mine = cpu.get("openai"), cpu.get("chat")
        if theirs and mine:
            value = theirs / mine
            rows.append(
                {
                    "target": f"{where}: openai-python / this client (chat) CPU >= "
                    f"{TARGET_OPENAI_VS_CHAT:g}x",
                    "arm": ones["chat"].arm.name,
                    "value": f"{value:.1f}x",
                    "met": value >= TARGET_OPENAI_VS_CHAT,
                }
            )
    return rows


def print_targets(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    print("\n### Targets\n")
    print("| target | arm | measured | met |")
    print("| --- | --- | ---: | --- |")
    for row in rows:
        print(
            f"| {row['target']} | {row['arm']} | {row['value']} "
            f"| {'yes' if row['met'] else '**no**'} |"
        )


# -- command line ----------------------------------------------------------------------------


def _csv(kind: type[Any], allowed: Sequence[str] | None = None) -> Any:
    def parse(text: str) -> list[Any]:
        items = [kind(item.strip()) for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError("give at least one value")
        if allowed is not None:
            unknown = [i for i in items if i not in allowed]
            if unknown:
                raise argparse.ArgumentTypeError(
                    f"unknown {', '.join(map(str, unknown))}; choose from {', '.join(allowed)}"
                )
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="arms: " + "; ".join(f"{k} = {v}" for k, v in ARMS.items()),
    )
    parser.add_argument(
        "--servers",
        type=_csv(str, ("replay", "llama")),
        default=["replay", "llama"],
        help="comma-separated: replay (paced replay server), llama (real llama-server)",
    )
    parser.add_argument(
        "--arms",
        type=_csv(str, tuple(ARMS)),
        default=DEFAULT_ARMS.split(","),
        help=f"comma-separated (default {DEFAULT_ARMS}; see below)",
    )
    parser.add_argument(
        "--concurrency",
        type=_csv(int),
        default=[1, 16, 256, 1000],
        help="comma-separated streams at once (default 1,16,256,1000)",
    )
    parser.add_argument("--tokens", type=int, default=50, help="tokens per replayed stream")
    parser.add_argument(
        "--rate", type=float, default=20.0, help="replay pacing, tokens/s per stream (0: unpaced)"
    )
    parser.add_argument("--llama-tokens", type=int, default=32, help="tokens per real stream")
    parser.add_argument("--repeat", type=int, default=1, help="streams per worker, one by one")
    parser.add_argument(
        "--llama-token-budget",
        type=int,
        default=8192,
        help="real server: at most about this many tokens per run (shorter streams at high "
        "c, at least 4 each)",
    )
    parser.add_argument(
        "--llama-min-streams",
        type=int,
        default=16,
        help="real server: at least this many streams per run (more per worker at low c)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="arms take turns in each round")
    parser.add_argument(
        "--passes",
        type=_csv(str, PASSES),
        default=list(PASSES),
        help="cpu (CPU alone), lag (1 ms ticker), sampler (ticker + fake-NVML GPU sampler)",
    )
    parser.add_argument("--sampler-gpus", type=int, default=2, help="fake GPUs to sample")
    parser.add_argument("--sampler-interval", type=float, default=0.1, help="seconds")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, s")
    parser.add_argument("--llama-server", metavar="PATH", help="llama-server binary")
    parser.add_argument("--model", metavar="PATH", help="GGUF model (default: the tiny model)")
    parser.add_argument(
        "--slots", type=int, help=f"llama-server -np (default: top concurrency, <= {MAX_SLOTS})"
    )
    parser.add_argument("--server-timeout", type=float, default=120.0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: cap concurrency at 16, tokens at 10 (4 real), 1 round, rate >= 50",
    )
    parser.add_argument("--json", metavar="PATH", help="write every measurement as JSON here")
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin this process to one CPU and the replay server to the others",
    )
    parser.add_argument("--uvloop", action="store_true", help="run the client on uvloop")
    parser.add_argument(
        "--count-reads",
        action="store_true",
        help="count socket reads per token (patches socket.socket; adds a little to every arm)",
    )
    return parser


def _apply_quick(args: argparse.Namespace) -> None:
    """Cap every size so the whole run takes seconds (it still runs every arm and pass)."""
    args.concurrency = sorted({min(c, 16) for c in args.concurrency})
    args.tokens = min(args.tokens, 10)
    args.llama_tokens = min(args.llama_tokens, 4)
    args.repeat = 1
    args.llama_min_streams = min(args.llama_min_streams, 4)
    args.llama_token_budget = min(args.llama_token_budget, 512)
    args.rounds = 1
    if args.rate > 0:
        args.rate = max(args.rate, 50.0)


def main(argv: Sequence[str] | None = None, *, defaults: dict[str, Any] | None = None) -> int:
    """Parse ``argv`` (``defaults`` preset some options), run, print; return the exit code."""
    parser = build_parser()
    if defaults:
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.quick:
        _apply_quick(args)
    if args.rate < 0 or min(args.concurrency) < 1 or args.repeat < 1 or args.rounds < 1:
        parser.error("--rate must be >= 0, --concurrency, --repeat and --rounds >= 1")
    if args.llama_min_streams < 1 or args.sampler_gpus < 1 or args.sampler_interval <= 0:
        parser.error("--llama-min-streams and --sampler-gpus >= 1, --sampler-interval > 0")
    if args.llama_token_budget < 1:
        parser.error("--llama-token-budget must be >= 1")
    # SIGTERM (timeout, a CI cancel) unwinds like Ctrl-C, so the servers are stopped and reaped.
    signal.signal(signal.SIGTERM, _terminate)
    if args.tokens < 2 or args.llama_tokens < 2:
        parser.error("--tokens and --llama-tokens must be >= 2")

    bootstrap_path()
    if args.count_reads:
        READS.install()
    top = max(args.concurrency)
    limit = raise_fd_limit(top * 2 + 100)
    if limit < top + 100:
        print(f"warning: open-files limit {limit} is low for {top} streams", file=sys.stderr)
    slots = min(MAX_SLOTS, args.slots or top)
    sampler = SamplerSpec(gpus=args.sampler_gpus, interval=args.sampler_interval)
    split = CPUSplit.plan() if args.pin else None
    if split is not None:
        split.pin_client()  # before any thread starts (tracing's batch processors)

    arms, notes = make_arms(args.arms)
    if not arms:
        parser.error("no arm can run here")
    versions = {
        "python": platform.python_version(),
        "httpx": httpx.__version__,
        "openai": installed_version("openai"),
        "llamatelemetry_async": installed_version("llamatelemetry_async"),
    }
    print(
        f"compare_clients: {', '.join(f'{k} {v}' for k, v in versions.items())}; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
        f"{'uvloop' if args.uvloop else 'asyncio'} loop"
    )
    print(
        f"GPU sampler beside this library's arms: {sampler.gpus} fake GPUs, every "
        f"{sampler.interval:g} s, PCIe on, NVML call times from GPU_FACTS.md; tracing exports "
        "into memory (InMemorySpanExporter behind a BatchSpanProcessor)"
    )
    if split is not None:
        print(
            f"CPUs: this process pinned to {sorted(split.client)}, the replay server to "
            f"{sorted(split.server)}, llama-server unpinned (--no-pin: the kernel places all)"
        )
    for note in notes:
        print(f"note: {note}")

    cells: list[Cell] = []
    interrupted = False
    try:
        for kind in args.servers:
            server_cm = replay(args, split) if kind == "replay" else llama(args, slots, split)
            with server_cm as server:
                for concurrency in args.concurrency:
                    load = server.load(concurrency, args.timeout)
                    level = run_level(server, arms, load, args, sampler)
                    print_level(level, args)
                    cells += level
    except KeyboardInterrupt:
        # Ctrl-C (or SIGTERM) mid-run: the servers are stopped by now; keep what finished.
        interrupted = True
        print("\ninterrupted: targets and JSON cover the levels that finished", file=sys.stderr)
    finally:
        for arm in arms:
            if arm.close is not None:
                arm.close()
    targets = evaluate_targets(cells)
    print_targets(targets)
    if args.json:
        out = {
            "command": [sys.executable, *sys.argv],
            "versions": versions,
            "cpus": os.cpu_count(),
            "config": {k: v for k, v in vars(args).items() if k != "json"},
            "sampler": dataclasses.asdict(sampler),
            "cpu_split": (
                {"client": sorted(split.client), "server": sorted(split.server)} if split else None
            ),
            "interrupted": interrupted,
            "cells": [c.to_json() for c in cells],
            "targets": targets,
        }
        Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 130 if interrupted else 0


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: servers stopped, partial results kept


if __name__ == "__main__":
    sys.exit(main())
