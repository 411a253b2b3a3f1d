"""``bench``: the load benchmark (``llamatelemetry_async.bench``) from the command line.

The options and the run are the bench package's own (``bench/_cli.py``); this module only
registers them as a command.
"""

from __future__ import annotations

import argparse
from typing import Any

from ._common import run

__all__ = ["add_parser"]

_EPILOG = """\
examples:
  llamatelemetry-async bench --url http://127.0.0.1:8080 --concurrency 16 --requests 200
  llamatelemetry-async bench --model model.gguf --rate 8 --burstiness 0.5 --duration 60
  llamatelemetry-async bench --model model.gguf --placement cpu:2 --out bench-out  # JSON + PNGs
  llamatelemetry-async bench --url http://127.0.0.1:8080 --ttft-slo 500 --tpot-slo 50

Exit status: 0 when every measured request completed, 1 when some failed.
"""


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    from ..bench._cli import add_arguments, run_from_args

    bench = sub.add_parser(
        "bench",
        parents=[common],
        help="load-test a llama-server URL or an engine it starts (TTFT, ITL, tok/s)",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(bench)
    bench.set_defaults(func=lambda args: run(run_from_args, args))
