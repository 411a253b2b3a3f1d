"""``bench``: the load benchmark (``llamatelemetry_async.bench``) from the command line.

``add_parser`` registers the command; ``add_arguments(subparser)`` adds its options and
``run_from_args(args)`` runs it (``anyio.run``); the exit status is what ``run_from_args``
returns (0: every measured request completed, 1: some failed). Errors of the user's making
are ``LlamaError``s, which the CLI prints without a traceback. Where the engine's servers run
(``--placement``, ``--preset``, ``--parallel``, ...) and which model (``--model``: a path,
``owner/repo:file.gguf`` or a registry name) are read exactly as ``serve`` reads them.

The bench package is a library; this module is its command line, and imports the library
(and the engine) only when the command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from .._errors import ConfigError
from .._placement import Placement
from ._common import add_placement_options, placement_from, resolve, run, server_line

if TYPE_CHECKING:
    from ..bench import BenchConfig, SweepConfig
    from ..engine import AsyncEngine

__all__ = ["add_arguments", "add_parser", "config_from_args", "run_from_args", "sweep_from_args"]

_EPILOG = """\
examples:
  llamatelemetry-async bench --url http://127.0.0.1:8080 --concurrency 16 --requests 200
  llamatelemetry-async bench --model model.gguf --rate 8 --burstiness 0.5 --duration 60
  llamatelemetry-async bench --model model.gguf --placement cpu:2 --out bench-out  # JSON + PNGs
  llamatelemetry-async bench --url http://127.0.0.1:8080 --ttft-slo 500 --tpot-slo 50
  llamatelemetry-async bench --url http://127.0.0.1:8080 --sweep-concurrency 1,4,16,64 --out sweep
  llamatelemetry-async bench --model model.gguf --ramp concurrency --ramp-max-ttft-p99 2000
  llamatelemetry-async bench --url http://127.0.0.1:8080 --dataset sharegpt.json --multi-turn
  llamatelemetry-async bench --url http://127.0.0.1:8080 --prefix-tokens 512 --prompt-tokens 64

Exit status: 0 when every measured request completed, 1 when some failed.
"""


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register the ``bench`` command on ``sub`` (the CLI's subparsers)."""
    bench = sub.add_parser(
        "bench",
        parents=[common],
        help="load-test a llama-server URL or an engine it starts (TTFT, ITL, tok/s)",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(bench)
    bench.set_defaults(func=lambda args: run(run_from_args, args))


# Options that shape an engine started here: meaningless against --url.
_ENGINE_OPTIONS = ("ctx_size", "parallel", "n_gpu_layers", "llama_server", "log_dir")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser``."""
    parser.description = (
        "Load a llama-server (a URL, or an engine started here on --model) with fixed "
        "concurrency or Poisson arrivals; print TTFT, TPOT, ITL, E2E, throughput and "
        "goodput with their formulas; write result.json and PNG plots to --out."
    )
    target = parser.add_argument_group("target (one of --url, --model)")
    where = target.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running llama-server, e.g. http://127.0.0.1:8080")
    where.add_argument(
        "--model",
        metavar="MODEL",
        help="a GGUF file, owner/repo:file.gguf or a registry name: start an engine on it "
        "here (--placement cpu:2 starts two CPU servers)",
    )
    target.add_argument("--api-key", help="API key of the --url server")
    target.add_argument(
        "--sample-gpus",
        action="store_true",
        help="with --url: sample this machine's GPUs during the run (an engine on GPUs does)",
    )
    add_placement_options(parser)

    load = parser.add_argument_group("load")
    load.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help="requests in flight (default 1); with --rate, the most in flight at once",
    )
    load.add_argument(
        "--rate",
        type=float,
        metavar="R",
        help="arrivals per second (open loop; 'inf': all at once)",
    )
    load.add_argument(
        "--burstiness",
        type=float,
        metavar="B",
        default=1.0,
        help="gamma shape of inter-arrival times: 1 Poisson, <1 burstier (default 1)",
    )
    load.add_argument("--requests", type=int, metavar="N", help="measured requests (default 100)")
    load.add_argument("--duration", type=float, metavar="S", help="seconds to send requests for")
    load.add_argument(
        "--warmup", type=int, metavar="N", default=0, help="warm-up requests, not measured"
    )
    load.add_argument(
        "--seed", type=int, metavar="N", default=0, help="seed of prompts and arrivals"
    )

    prompts = parser.add_argument_group("prompts")
    prompts.add_argument(
        "--prompt-tokens", type=int, metavar="N", default=128, help="synthetic input tokens"
    )
    prompts.add_argument(
        "--output-tokens", type=int, metavar="N", default=128, help="tokens to generate"
    )
    prompts.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE.jsonl",
        help='prompts, one JSON object per line: {"prompt": ..., "max_tokens": ...} '
        'or {"messages": [...]}',
    )
    prompts.add_argument(
        "--endpoint",
        choices=("completion", "chat"),
        default="completion",
        help="/completion or /v1/chat/completions (messages always go to chat)",
    )

    prompts.add_argument(
        "--dataset",
        type=Path,
        metavar="FILE.json",
        help="a ShareGPT-format file (JSON array or JSONL): first user turns as chat prompts",
    )
    prompts.add_argument(
        "--multi-turn",
        action="store_true",
        help="with --dataset: replay whole conversations turn by turn, each turn carrying "
        "the earlier turns and the server's answers",
    )
    prompts.add_argument(
        "--prefix-tokens",
        type=int,
        metavar="N",
        default=0,
        help="the same N-token prefix in front of every synthetic prompt (prompt cache)",
    )
    prompts.add_argument(
        "--range-ratio",
        type=float,
        metavar="R",
        default=0.0,
        help="sample input and output lengths uniformly within +-R of the given (0: fixed)",
    )
    prompts.add_argument(
        "--no-cache-prompt",
        action="store_true",
        help="send cache_prompt=false: llama-server processes every prompt token",
    )

    sweep = parser.add_argument_group("sweep (several load points in one run)")
    sweep_kind = sweep.add_mutually_exclusive_group()
    sweep_kind.add_argument(
        "--sweep-concurrency", metavar="N,N,...", help="run a point at each concurrency"
    )
    sweep_kind.add_argument(
        "--sweep-rate", metavar="R,R,...", help="run a point at each request rate (req/s)"
    )
    sweep_kind.add_argument(
        "--ramp",
        choices=("concurrency", "rate"),
        help="grow the load by --ramp-factor until a --ramp-max-*/--ramp-min-* bound breaks",
    )
    sweep.add_argument("--ramp-start", type=float, metavar="X", default=1.0, help="default 1")
    sweep.add_argument("--ramp-factor", type=float, metavar="F", default=2.0, help="default 2")
    sweep.add_argument("--ramp-points", type=int, metavar="N", default=8, help="at most N points")
    sweep.add_argument("--ramp-max-ttft-p99", type=float, metavar="MS", help="ramp bound")
    sweep.add_argument("--ramp-max-tpot-p99", type=float, metavar="MS", help="ramp bound")
    sweep.add_argument(
        "--ramp-min-goodput",
        type=float,
        metavar="FRACTION",
        help="ramp bound: goodput requests / measured, failed ones included (needs "
        "--ttft-slo or --tpot-slo)",
    )
    sweep.add_argument(
        "--sweep-warmup",
        type=int,
        metavar="N",
        help="warm-up requests per point (default: --warmup, else the point's concurrency)",
    )

    report = parser.add_argument_group("report")
    report.add_argument("--ttft-slo", type=float, metavar="MS", help="goodput limit on TTFT")
    report.add_argument("--tpot-slo", type=float, metavar="MS", help="goodput limit on TPOT")
    report.add_argument("--out", type=Path, metavar="DIR", help="write result.json and plots")
    report.add_argument("--no-plots", action="store_true", help="write JSON only")
    report.add_argument("--no-progress", action="store_true", help="no progress bar")
    report.add_argument(
        "--no-server-metrics",
        action="store_true",
        help="do not read the servers' /metrics and /slots around each point",
    )
    report.add_argument(
        "--trace",
        action="store_true",
        help="a span per request from the configured OpenTelemetry tracer (OTEL_* env)",
    )


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The ``BenchConfig`` the options describe (``--prompts`` must be loaded already)."""
    from ..bench import BenchConfig

    requests = args.requests
    if requests is None and args.duration is None:
        requests = 100
    return BenchConfig(
        requests=requests,
        duration=args.duration,
        concurrency=args.concurrency,
        rate=args.rate,
        burstiness=args.burstiness,
        warmup=args.warmup,
        input_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        endpoint=args.endpoint,
        ttft_slo_ms=args.ttft_slo,
        tpot_slo_ms=args.tpot_slo,
        seed=args.seed,
        prefix_tokens=args.prefix_tokens,
        range_ratio=args.range_ratio,
        params={"cache_prompt": False} if args.no_cache_prompt else {},
    )


def _numbers(text: str, option: str, kind: type[float] | type[int]) -> list[Any]:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ConfigError(
            f"{option}: give comma-separated numbers like 1,4,16 (got {text!r})",
            field=option.lstrip("-").replace("-", "_"),
        ) from exc


def sweep_from_args(args: argparse.Namespace, base: BenchConfig) -> SweepConfig | None:
    """The ``SweepConfig`` the sweep options describe, or ``None`` for a single run."""
    from ..bench import Ramp, SweepConfig

    warmup = args.sweep_warmup
    if args.sweep_concurrency is not None:
        values = _numbers(args.sweep_concurrency, "--sweep-concurrency", int)
        return SweepConfig(base, concurrencies=tuple(values), warmup=warmup)
    if args.sweep_rate is not None:
        rates = _numbers(args.sweep_rate, "--sweep-rate", float)
        return SweepConfig(base, rates=tuple(rates), warmup=warmup)
    if args.ramp is not None:
        ramp = Ramp(
            args.ramp,
            start=args.ramp_start,
            factor=args.ramp_factor,
            points=args.ramp_points,
            max_ttft_p99_ms=args.ramp_max_ttft_p99,
            max_tpot_p99_ms=args.ramp_max_tpot_p99,
            min_goodput_fraction=args.ramp_min_goodput,
        )
        return SweepConfig(base, ramp=ramp, warmup=warmup)
    return None


async def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark the options describe; print the summary; write ``--out``.

    Returns 0 when every measured request completed, 1 when some failed.
    """
    from ..bench import (
        BenchResult,
        SweepResult,
        load_prompts_jsonl,
        load_sharegpt,
        load_sharegpt_conversations,
        run_bench,
        run_sweep,
    )

    config = config_from_args(args)
    if args.prompts is not None and args.dataset is not None:
        raise ConfigError("give --prompts or --dataset, not both", field="prompts")
    if args.multi_turn and args.dataset is None:
        raise ConfigError("--multi-turn replays a --dataset: give one", field="dataset")
    if args.prompts is not None:
        prompts = await anyio.to_thread.run_sync(load_prompts_jsonl, args.prompts)
        config = dataclasses.replace(config, prompts=prompts)
    elif args.dataset is not None and args.multi_turn:
        conversations = await anyio.to_thread.run_sync(load_sharegpt_conversations, args.dataset)
        config = dataclasses.replace(config, conversations=conversations)
    elif args.dataset is not None:
        prompts = await anyio.to_thread.run_sync(load_sharegpt, args.dataset)
        config = dataclasses.replace(config, prompts=prompts)
    sweep = sweep_from_args(args, config)
    options: dict[str, Any] = {
        "progress": not args.no_progress,
        "gpu_sampler": True if args.sample_gpus else None,
        "api_key": args.api_key,
        "server_metrics": not args.no_server_metrics,
        "trace": args.trace,
    }
    result: BenchResult | SweepResult
    async with _target(args) as target:
        if sweep is None:
            result = await run_bench(target, config, **options)
        else:
            result = await run_sweep(target, sweep, **options)
    print(result.summary_text())
    if args.out is not None:
        paths = await result.save(args.out, plots=not args.no_plots)
        print("\nwrote " + ", ".join(str(p) for p in paths))
    sys.stdout.flush()
    points = result.points if isinstance(result, SweepResult) else (result,)
    return 1 if any(p.metrics.requests_failed for p in points) else 0


@contextlib.asynccontextmanager
async def _target(args: argparse.Namespace) -> AsyncIterator[str | AsyncEngine]:
    if args.url is not None:
        given = [name for name in _ENGINE_OPTIONS if getattr(args, name) is not None]
        if given or placement_from(args) != Placement.auto():
            options = ", ".join("--" + n.replace("_", "-") for n in given) or "--placement"
            raise ConfigError(
                f"{options}: these set up the servers of an engine started with --model; "
                "a --url server runs as it was started (leave them out)",
                field=given[0] if given else "placement",
            )
        yield args.url
        return
    from ..engine import AsyncEngine
    from ..server import ServerConfig

    model = await resolve(args.model)
    server = ServerConfig(
        ctx_size=args.ctx_size, n_parallel=args.parallel, n_gpu_layers=args.n_gpu_layers
    )
    async with AsyncEngine(
        model,
        placement=placement_from(args),
        server=server,
        binary=args.llama_server,
        log_dir=args.log_dir,
    ) as engine:
        for info in engine.servers:  # where the load goes, and the threads each computes with
            print(server_line(info), flush=True)
        yield engine
