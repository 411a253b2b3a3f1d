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
from ._common import add_placement_options, placement_from, resolve, run

if TYPE_CHECKING:
    from ..bench import BenchConfig
    from ..engine import AsyncEngine

__all__ = ["add_arguments", "add_parser", "config_from_args", "run_from_args"]

_EPILOG = """\
examples:
  llamatelemetry-async bench --url http://127.0.0.1:8080 --concurrency 16 --requests 200
  llamatelemetry-async bench --model model.gguf --rate 8 --burstiness 0.5 --duration 60
  llamatelemetry-async bench --model model.gguf --placement cpu:2 --out bench-out  # JSON + PNGs
  llamatelemetry-async bench --url http://127.0.0.1:8080 --ttft-slo 500 --tpot-slo 50

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

    report = parser.add_argument_group("report")
    report.add_argument("--ttft-slo", type=float, metavar="MS", help="goodput limit on TTFT")
    report.add_argument("--tpot-slo", type=float, metavar="MS", help="goodput limit on TPOT")
    report.add_argument("--out", type=Path, metavar="DIR", help="write result.json and plots")
    report.add_argument("--no-plots", action="store_true", help="write JSON only")
    report.add_argument("--no-progress", action="store_true", help="no progress bar")


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
    )


async def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark the options describe; print the summary; write ``--out``.

    Returns 0 when every measured request completed, 1 when some failed.
    """
    from ..bench import load_prompts_jsonl, run_bench

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
        yield engine
