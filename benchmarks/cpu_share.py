"""CPU servers sharing the machine's cores: aggregate tokens/s, one server against two.

Run::

    .venv/bin/python benchmarks/cpu_share.py [--rounds 3] [--concurrency 32] [--tokens 150]
        [--llama-server PATH] [--model PATH]

Four arms, the same load each (``--concurrency`` streams of ``--tokens`` tokens on the
project's tiny model, greedy, ``ignore_eos``), taking turns within each round so that a
noisy neighbour slows them alike:

- ``before 1``/``before 2``: ``Placement.cpu(1)``/``cpu(2)`` with ``auto_configure=False``,
  the way every server ran before the engine divided the cores (llama-server's defaults:
  as many threads as the machine has cores, polling, no pinning);
- ``after 1``/``after 2``: the same placements with the engine's defaults (``share_cores``).

It prints each arm's tokens/s (median over rounds) and the ratios that matter: two servers
over one, before and after (target after: at least 0.9x), and after over before.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio


def _bootstrap_path() -> None:
    """Let ``python benchmarks/x.py`` import the package from a checkout that is not installed."""
    if importlib.util.find_spec("llamatelemetry_async") is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


_bootstrap_path()

from llamatelemetry_async import AsyncEngine, Placement, ServerConfig  # noqa: E402
from llamatelemetry_async.testing import write_tiny_model  # noqa: E402

TARGET_TWO_OVER_ONE = 0.9
ARMS = (("before", 1), ("before", 2), ("after", 1), ("after", 2))


async def _arm(
    model: Path, binary: str | None, kind: str, servers: int, concurrency: int, tokens: int
) -> tuple[float, str]:
    """Tokens/s of one arm, and its thread split as the engine reports it."""
    config = ServerConfig(n_parallel=max(1, concurrency // servers), ctx_size=4096 * servers)
    async with AsyncEngine(
        model,
        placement=Placement.cpu(servers),
        server=config,
        binary=binary,
        auto_configure=kind == "after",
        telemetry=False,
        gpu_sampler=False,
    ) as engine:
        split = "; ".join(
            f"{s.name}: {s.threads or 'default'} thread{'' if s.threads == 1 else 's'} on "
            f"{','.join(map(str, s.cores)) or 'any core'}"
            for s in engine.servers
        )
        counted = 0

        async def one(seed: int) -> None:
            nonlocal counted
            async with engine.stream(
                "Once upon a time", n_predict=tokens, ignore_eos=True, seed=seed, temperature=0
            ) as stream:
                async for chunk in stream:
                    counted += len(chunk.tokens) if chunk.tokens else 1

        await one(0)  # warm-up: first decode, page cache
        counted = 0
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(concurrency):
                tg.start_soon(one, i)
        elapsed = time.perf_counter() - t0
    return counted / elapsed, split


async def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else write_tiny_model(Path(tmp) / "tiny.gguf")
        rates: dict[tuple[str, int], list[float]] = {arm: [] for arm in ARMS}
        splits: dict[tuple[str, int], str] = {}
        for round_ in range(args.rounds):
            for kind, servers in ARMS:
                rate, split = await _arm(
                    model, args.llama_server, kind, servers, args.concurrency, args.tokens
                )
                rates[kind, servers].append(rate)
                splits[kind, servers] = split
                print(f"round {round_ + 1} {kind} cpu({servers}): {rate:8.0f} tok/s  [{split}]")
    median = {arm: statistics.median(values) for arm, values in rates.items()}
    print()
    print(f"concurrency {args.concurrency}, {args.tokens} tokens each, {args.rounds} rounds")
    print("| arm | tokens/s (median) | split |")
    print("|---|---:|---|")
    for kind, servers in ARMS:
        print(f"| {kind} cpu({servers}) | {median[kind, servers]:.0f} | {splits[kind, servers]} |")
    before = median["before", 2] / median["before", 1]
    after = median["after", 2] / median["after", 1]
    verdict = "PASS" if after >= TARGET_TWO_OVER_ONE else "FAIL"
    print()
    print(f"two servers / one, before: {before:.3f}x")
    print(f"two servers / one, after:  {after:.3f}x  (target >= {TARGET_TWO_OVER_ONE}x: {verdict})")
    print(f"cpu(2) after / before:     {median['after', 2] / median['before', 2]:.1f}x")
    print(f"cpu(1) after / before:     {median['after', 1] / median['before', 1]:.2f}x")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=150)
    parser.add_argument("--llama-server", default=None, help="llama-server binary")
    parser.add_argument("--model", default=None, help="GGUF model (default: the tiny model)")
    return parser


if __name__ == "__main__":
    sys.exit(anyio.run(main, _parser().parse_args()))
