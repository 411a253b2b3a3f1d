"""Soak: many streamed requests over 4 CPU servers; nothing lost, mixed up or leaked.

Run::

    .venv/bin/python benchmarks/soak.py [--requests 10000] [--concurrency 256] [--servers 4]
        [--n-parallel 16] [--n-predict 8] [--prompts 32] [--threads N]
        [--backend asyncio|trio] [--strict]

One engine runs ``--servers`` llama-servers (the tiny test model by default) with
``--n-parallel`` slots and CPUs / servers threads each; requests beyond the slots wait in
the engine's router. Each prompt's reference text is computed once with ``engine.complete``;
then ``--concurrency`` workers stream ``/completion`` requests at temperature 0, each with a
prompt drawn from the set. Counted: lost (raised, or fewer tokens than asked), mixed (text
differs from its prompt's reference), file descriptors and sockets of this process before
the engine started vs after it closed, and llama-server processes still alive after it
closed. Exit status 0 when the run completed (with ``--strict``: and met every target).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import importlib.util
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import psutil

if TYPE_CHECKING:
    from llamatelemetry_async import AsyncEngine

GREEDY: dict[str, Any] = {"temperature": 0, "ignore_eos": True}
_SUBJECTS = (
    "the old cat",
    "a little dog",
    "the king",
    "my friend",
    "a blue bird",
    "the queen",
    "her mother",
    "the young boy",
)
_ENDINGS = ("went to the river", "saw the moon at night", "lived in a house", "found a tree")


def _bootstrap_path() -> None:
    """Let ``python benchmarks/x.py`` import the package from a checkout that is not installed."""
    if importlib.util.find_spec("llamatelemetry_async") is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_prompts(n: int) -> list[str]:
    """``n`` distinct short prompts in the tiny model's words (and numbers, which it spells)."""
    return [
        f"{_SUBJECTS[i % len(_SUBJECTS)]} {_ENDINGS[i // len(_SUBJECTS) % len(_ENDINGS)]} {i}"
        for i in range(n)
    ]


def fd_count() -> int:
    """Open file descriptors of this process (the listing's own one is in every count)."""
    return len(os.listdir("/proc/self/fd"))


def socket_count() -> int | None:
    """Open sockets of this process (inet and unix), or None if psutil cannot tell."""
    try:
        return len(psutil.Process().net_connections(kind="all"))
    except (psutil.Error, AttributeError):  # AttributeError: psutil < 6 names it differently
        return None


def alive(pids: Sequence[int], timeout: float = 2.0) -> list[int]:
    """The ``pids`` still running after ``timeout`` (zombies count as gone)."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
    _, running = psutil.wait_procs(procs, timeout=timeout)
    left = []
    for proc in running:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc.pid)
    return left


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1); NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


@dataclasses.dataclass
class Report:
    """Everything one soak run counted."""

    requests: int = 0
    done: int = 0
    ok: int = 0
    lost: int = 0
    mixed: int = 0
    short_references: int = 0
    tokens: int = 0
    wall: float = 0.0
    completed: bool = False
    ttft: list[float] = dataclasses.field(default_factory=list)
    latency: list[float] = dataclasses.field(default_factory=list)
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    mixed_examples: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    served: dict[str, int] = dataclasses.field(default_factory=dict)
    restarts: int = 0
    pids: list[int] = dataclasses.field(default_factory=list)
    fds_before: int = 0
    fds_after: int = 0
    sockets_before: int | None = None
    sockets_after: int | None = None
    alive_after: list[int] = dataclasses.field(default_factory=list)
    children_after: list[int] = dataclasses.field(default_factory=list)


async def stream_all(
    engine: AsyncEngine,
    args: argparse.Namespace,
    prompts: list[str],
    references: dict[str, str],
    report: Report,
) -> None:
    """Stream ``args.requests`` requests with ``args.concurrency`` workers; count into report."""
    rng = random.Random(args.seed)
    order = [rng.randrange(len(prompts)) for _ in range(args.requests)]
    next_index = 0

    async def one(prompt: str) -> None:
        began = time.perf_counter()
        first: float | None = None
        try:
            async with engine.stream(prompt, n_predict=args.n_predict, **GREEDY) as stream:
                async for _ in stream:
                    if first is None:
                        first = time.perf_counter()
        except Exception as exc:  # every failure is a lost request, counted by its type
            report.lost += 1
            report.errors[type(exc).__name__] += 1
            return
        finally:
            report.done += 1
        ended = time.perf_counter()
        tokens = stream.usage.completion_tokens if stream.usage is not None else 0
        if tokens < args.n_predict:
            report.lost += 1
            report.errors[f"short ({tokens} of {args.n_predict} tokens)"] += 1
            return
        report.ok += 1
        report.tokens += tokens
        report.latency.append(ended - began)
        if first is not None:
            report.ttft.append(first - began)
        if stream.text != references[prompt]:
            report.mixed += 1
            if len(report.mixed_examples) < 5:
                report.mixed_examples.append((prompt, references[prompt], stream.text))

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(order):  # one event loop: no lock needed between workers
            prompt = prompts[order[next_index]]
            next_index += 1
            await one(prompt)

    async def progress() -> None:
        while True:
            await anyio.sleep(args.progress)  # a report interval, not synchronisation
            print(f"  {report.done}/{report.requests} done, {report.lost} lost", file=sys.stderr)

    began = time.perf_counter()
    async with anyio.create_task_group() as tg:
        if args.progress > 0:
            tg.start_soon(progress)
        async with anyio.create_task_group() as workers:
            for _ in range(min(args.concurrency, args.requests)):
                workers.start_soon(worker)
        tg.cancel_scope.cancel()
    report.wall = time.perf_counter() - began


async def soak(args: argparse.Namespace, model: Path) -> Report:
    """Start the engine, compute references, stream everything, close, count leftovers."""
    from llamatelemetry_async import AsyncEngine, Placement, ServerConfig

    prompts = make_prompts(args.prompts)
    report = Report(requests=args.requests)
    config = ServerConfig(
        n_parallel=args.n_parallel,
        ctx_size=args.ctx_size or args.n_parallel * 512,
        threads=args.threads or None,
    )
    # Counted inside the running loop, so the loop's own descriptors are in both counts.
    report.fds_before = fd_count()
    report.sockets_before = socket_count()
    with anyio.move_on_after(args.deadline) as deadline:
        async with AsyncEngine(
            model,
            placement=Placement.cpu(args.servers),
            server=config,
            binary=args.llama_server,
        ) as engine:
            report.pids = [s.pid for s in engine.servers if s.pid is not None]
            references: dict[str, str] = {}
            for prompt in prompts:
                reference = await engine.completion(prompt, n_predict=args.n_predict, **GREEDY)
                references[prompt] = reference.text
                if reference.usage.completion_tokens < args.n_predict:
                    report.short_references += 1
            await stream_all(engine, args, prompts, references, report)
            infos = engine.servers
            report.served = {s.name: s.served for s in infos}
            report.restarts = sum(s.starts - 1 for s in infos)
            # A restarted server has a new pid: check those too.
            report.pids += [s.pid for s in infos if s.pid is not None and s.pid not in report.pids]
        report.completed = True
    if deadline.cancelled_caught:
        print(f"deadline of {args.deadline:g} s reached: the run did not complete", file=sys.stderr)
    report.fds_after = fd_count()
    report.sockets_after = socket_count()
    report.alive_after = alive(report.pids)
    report.children_after = [p.pid for p in psutil.Process().children(recursive=True)]
    return report


def print_report(report: Report, args: argparse.Namespace) -> bool:
    """Print the markdown tables; return True when every target was met."""
    fd_leak = report.fds_after - report.fds_before
    sock_leak = (
        report.sockets_after - report.sockets_before
        if report.sockets_after is not None and report.sockets_before is not None
        else None
    )
    wall = report.wall or float("nan")
    checks: list[tuple[str, str, str, bool]] = [
        ("requests completed (of asked)", f"{report.done} of {report.requests}", "all",
         report.completed and report.done == report.requests),
        ("**lost** (raised, or fewer tokens than asked)", str(report.lost), "0", report.lost == 0),
        ("**mixed** (text differs from its prompt's reference)", str(report.mixed), "0",
         report.mixed == 0),
        (f"**leaked file descriptors** (/proc/self/fd: {report.fds_before} before start, "
         f"{report.fds_after} after close)", str(fd_leak), "0", fd_leak == 0),
        ("**leaked sockets** (psutil net_connections: "
         f"{report.sockets_before} before, {report.sockets_after} after)",
         "n/a" if sock_leak is None else str(sock_leak), "0", not sock_leak),
        (f"llama-server pids alive after close (of {len(report.pids)})",
         str(len(report.alive_after)), "0", not report.alive_after),
        ("child processes of this process after close", str(len(report.children_after)), "0",
         not report.children_after),
    ]  # fmt: skip
    print(
        f"# Soak: {report.requests} streamed requests, {args.servers} CPU servers x "
        f"{args.n_parallel} slots, concurrency {args.concurrency}, n_predict {args.n_predict}, "
        f"{args.prompts} prompts, {args.backend}, {os.cpu_count()} CPUs, "
        f"threads per server: {args.threads or 'default'}\n"
    )
    print("| check | value | target | met |")
    print("|---|---|---|---|")
    for label, value, target, met in checks:
        print(f"| {label} | {value} | {target} | {'yes' if met else '**NO**'} |")

    print("\n| throughput and latency | value |")
    print("|---|---|")
    rows = [
        ("wall (streaming phase), s", f"{report.wall:.2f}"),
        ("tokens received (server-counted)", str(report.tokens)),
        ("**tokens/s** (total tokens / wall)", f"{report.tokens / wall:.0f}"),
        ("**requests/s** (successful requests / wall)", f"{report.ok / wall:.1f}"),
        ("**time to first token p50**, ms", f"{percentile(report.ttft, 0.5) * 1e3:.1f}"),
        ("**time to first token p99**, ms", f"{percentile(report.ttft, 0.99) * 1e3:.1f}"),
        ("request latency p50, ms", f"{percentile(report.latency, 0.5) * 1e3:.1f}"),
        ("request latency p99, ms", f"{percentile(report.latency, 0.99) * 1e3:.1f}"),
        ("server restarts", str(report.restarts)),
        ("requests served per server", ", ".join(f"{k}: {v}" for k, v in report.served.items())),
    ]
    for label, value in rows:
        print(f"| {label} | {value} |")
    print(
        "\nTime to first token counts from asking the engine for the stream, so it includes "
        "the wait in the engine's router while every slot is busy."
    )
    if report.short_references:
        print(f"\nWarning: {report.short_references} references came back short.")
    if report.errors:
        print("\n| lost, by cause | count |\n|---|---|")
        for cause, count in report.errors.most_common():
            print(f"| {cause} | {count} |")
    for prompt, expected, got in report.mixed_examples:
        print(f"\nmixed: prompt {prompt!r}\n  reference {expected!r}\n  streamed  {got!r}")
    return all(met for *_, met in checks) and not report.short_references


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--servers", type=int, default=4, help="CPU llama-servers")
    parser.add_argument("--n-parallel", type=int, default=16, help="slots per server")
    parser.add_argument("--ctx-size", type=int, help="per server (default: 512 per slot)")
    parser.add_argument(
        "--threads",
        type=int,
        help="llama-server --threads; 0: its own default (all CPUs each); "
        "default: CPUs / servers, so the servers do not fight over cores",
    )
    parser.add_argument("--n-predict", type=int, default=8, help="tokens per request")
    parser.add_argument("--prompts", type=int, default=32, help="distinct prompts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt draw")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--deadline", type=float, default=3600.0, help="give up after, s")
    parser.add_argument("--progress", type=float, default=10.0, help="stderr every, s (0: off)")
    parser.add_argument("--llama-server", help="llama-server binary (default: found)")
    parser.add_argument("--model", type=Path, help="GGUF model (default: the tiny test model)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.servers)

    _bootstrap_path()
    from llamatelemetry_async.testing import write_tiny_model

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        model = args.model or write_tiny_model(Path(tmp) / "tiny.gguf")

        async def run() -> Report:
            return await soak(args, model)

        report = anyio.run(run, backend=args.backend)
    met = print_report(report, args)
    if not report.completed:
        return 1
    return 1 if args.strict and not met else 0


if __name__ == "__main__":
    sys.exit(main())
