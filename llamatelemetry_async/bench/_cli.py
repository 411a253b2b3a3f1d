"""The ``bench`` command line: options, and a run from parsed options.

The CLI's ``bench`` subcommand calls ``add_arguments(subparser)`` and then
``anyio.run(run_from_args, args)``; the exit status is what ``run_from_args`` returns
(0: every measured request completed, 1: some failed). Errors of the user's making are
``LlamaError``s, which the CLI prints without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio

from .._errors import ConfigError
from ..engine import AsyncEngine, Placement
from ..server import ServerConfig
from ._config import BenchConfig, load_prompts_jsonl
from ._run import run_bench

__all__ = ["PLACEMENTS", "add_arguments", "run_from_args"]

#: ``--placement`` names and the placements they make.
PLACEMENTS: dict[str, Callable[[], Placement]] = {
    "auto": Placement.auto,
    "cpu": Placement.cpu,
    "per-gpu": Placement.per_gpu,
    "pairs": Placement.pairs,
    "single-gpu": Placement.single_gpu,
    "kaggle-t4x2": Placement.kaggle_t4x2,
    "kaggle-t4x2-pair": Placement.kaggle_t4x2_pair,
}


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
        "--model", type=Path, metavar="GGUF", help="a GGUF file: start an engine on it here"
    )
    target.add_argument("--api-key", help="API key of the --url server")
    target.add_argument(
        "--placement",
        choices=sorted(PLACEMENTS),
        default="auto",
        help="where the engine's servers run (default: one per GPU, else one on the CPU)",
    )
    target.add_argument(
        "--servers",
        type=int,
        metavar="N",
        help="start this many CPU servers (placement cpu with n servers)",
    )
    target.add_argument(
        "--parallel", type=int, metavar="N", help="slots per server (llama-server -np)"
    )
    target.add_argument("--ctx-size", type=int, metavar="N", help="context size per server (-c)")
    target.add_argument("--llama-server", metavar="PATH", help="path to the llama-server binary")
    target.add_argument(
        "--sample-gpus",
        action="store_true",
        help="with --url: sample this machine's GPUs during the run (an engine on GPUs does)",
    )

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

    report = parser.add_argument_group("report")
    report.add_argument("--ttft-slo", type=float, metavar="MS", help="goodput limit on TTFT")
    report.add_argument("--tpot-slo", type=float, metavar="MS", help="goodput limit on TPOT")
    report.add_argument("--out", type=Path, metavar="DIR", help="write result.json and plots")
    report.add_argument("--no-plots", action="store_true", help="write JSON only")
    report.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The ``BenchConfig`` the options describe (``--prompts`` must be loaded already)."""
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
    )


async def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark the options describe; print the summary; write ``--out``.

    Returns 0 when every measured request completed, 1 when some failed.
    """
    config = config_from_args(args)
    if args.prompts is not None:
        prompts = await anyio.to_thread.run_sync(load_prompts_jsonl, args.prompts)
        config = dataclasses.replace(config, prompts=prompts)
    async with _target(args) as target:
        result = await run_bench(
            target,
            config,
            progress=not args.no_progress,
            gpu_sampler=True if args.sample_gpus else None,
            api_key=args.api_key,
        )
    print(result.summary_text())
    if args.out is not None:
        paths = await result.save(args.out, plots=not args.no_plots)
        print("\nwrote " + ", ".join(str(p) for p in paths))
    sys.stdout.flush()
    return 1 if result.metrics.requests_failed else 0


@contextlib.asynccontextmanager
async def _target(args: argparse.Namespace) -> AsyncIterator[str | AsyncEngine]:
    if args.url is not None:
        yield args.url
        return
    if args.servers is not None:
        if args.placement not in ("auto", "cpu"):
            raise ConfigError(
                "--servers starts CPU servers; leave --placement out", field="servers"
            )
        placement = Placement.cpu(args.servers)
    else:
        placement = PLACEMENTS[args.placement]()
    server = ServerConfig(n_parallel=args.parallel, ctx_size=args.ctx_size)
    async with AsyncEngine(
        args.model, placement=placement, server=server, binary=args.llama_server
    ) as engine:
        yield engine
