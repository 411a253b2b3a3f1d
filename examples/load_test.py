"""Load-test a llama-server from Python: metrics with their formulas, JSON and PNG plots.

python examples/load_test.py --url http://127.0.0.1:8080 --out bench-out
python examples/load_test.py --model model.gguf --concurrency 16 --requests 200 --out bench-out

With ``--model`` an engine is started on it (one server per GPU, or one on the CPU) and its
GPU sampler's readings go into the result; with ``--url`` any llama-server is loaded.
The same run from the command line: ``python -m llamatelemetry_async bench ...``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anyio

from llamatelemetry_async import AsyncEngine
from llamatelemetry_async.bench import BenchConfig, BenchResult, run_bench


async def main(args: argparse.Namespace) -> None:
    config = BenchConfig(
        concurrency=args.concurrency,
        requests=args.requests,
        warmup=2,
        input_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        ttft_slo_ms=args.ttft_slo,
    )
    result: BenchResult
    if args.url:
        result = await run_bench(args.url, config)
    else:
        async with AsyncEngine(args.model) as engine:
            result = await run_bench(engine, config)

    print(result.summary_text())
    m = result.metrics
    if m.requests_failed:
        print(f"\n{m.requests_failed} requests failed: {result.errors}")
    # Statistics are None when nothing completed (every request failed).
    if m.ttft_ms.p99 is not None and m.output_throughput is not None:
        print(
            f"\nfrom result.metrics: TTFT p99 {m.ttft_ms.p99:.1f} ms, "
            f"output {m.output_throughput:.1f} tok/s"
        )
    for path in await result.save(args.out):  # result.json and the PNGs, in a worker thread
        print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running llama-server")
    where.add_argument("--model", type=Path, help="a GGUF file to start an engine on")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--ttft-slo", type=float, default=500.0, help="goodput limit (ms)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    anyio.run(main, parser.parse_args())
