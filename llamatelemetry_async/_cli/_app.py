"""The parser, the dispatch, and how failures become exit codes and one-line errors."""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Final

from .._errors import (
    ConfigError,
    ConnectError,
    HTTPStatusError,
    LlamaError,
    LlamaServerNotFoundError,
    ModelDoesNotFitError,
    ModelFormatError,
    ModelNotFoundError,
    ServerStartError,
    UsageError,
)
from . import _bench, _chat, _demo, _gpus, _inspect, _serve, _servers
from ._common import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, stderr

__all__ = ["build_parser", "main"]

PROG: Final = "llamatelemetry-async"

_EPILOG: Final = """\
examples:
  llamatelemetry-async demo                            stream from the built-in tiny model
  llamatelemetry-async serve model.gguf --preset kaggle-t4x2
  llamatelemetry-async serve model.gguf --placement cpu:2 --parallel 4
  llamatelemetry-async chat model.gguf                 chat in the terminal
  llamatelemetry-async chat --url http://127.0.0.1:8080
  llamatelemetry-async gpus                            GPUs and a live NVML sample
  llamatelemetry-async inspect model.gguf --gpu-mem 15GiB x2
  llamatelemetry-async build-server                    build llama-server (cached)

`python -m llamatelemetry_async` is the same program.

exit codes:
  0    done (serve: stopped by Ctrl-C or SIGTERM, every server reaped)
  1    a runtime failure: a server did not start, a model is missing, a request failed
  2    a usage error: unknown command or option, a bad value
  130  interrupted by Ctrl-C (commands other than serve and chat)

Errors print one line, `error: ...`, and a hint; --debug adds the traceback.
"""

# What to try next, by error class (the most specific class that has one wins).
_HINTS: Final[dict[type[LlamaError], str]] = {
    LlamaServerNotFoundError: "build one with `llamatelemetry-async build-server` "
    "(about 4 minutes on 2 cores, then cached), or pass --llama-server PATH",
    ModelNotFoundError: "pass the path of a .gguf file (`llamatelemetry-async demo` "
    "needs none: it writes a tiny model itself)",
    ModelFormatError: "is it a complete GGUF file? re-download it if it was cut short",
    ModelDoesNotFitError: "try one of the settings listed above",
    ServerStartError: "the lines above are the end of the server's log; they say why",
    ConnectError: "is a llama-server listening there? `llamatelemetry-async serve MODEL` "
    "starts one",
    ConfigError: "see --help for the allowed values",
}


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (each command registers its own subparser)."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: given after the command, it must not reset a --debug given before it.
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show tracebacks and the library's log",
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run llama.cpp's llama-server on your GPUs (or CPU) and stream tokens "
        "from it, with OpenTelemetry built in.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks and the library's log"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (_demo, _serve, _chat, _bench, _gpus, _inspect, _servers):
        module.add_parser(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (``sys.exit(main())``)."""
    # Piped output (a log collector, a test) must see each line as it is printed.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not debug:
        # Each server's own output is logged at DEBUG; the library's warnings still show.
        logging.getLogger("llamatelemetry_async").setLevel(logging.WARNING)
    try:
        code: int = args.func(args)
    except LlamaError as exc:
        _report(exc, debug)
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILURE
    except BrokenPipeError:
        # Output piped into `head` and the like: the reader left; not worth a message.
        # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except OSError as exc:  # a path the user gave that cannot be read or written
        _report(exc, debug)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        stderr("interrupted")
        return EXIT_INTERRUPTED
    return code


def _report(exc: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    lines = (str(exc) or type(exc).__name__).splitlines() or [type(exc).__name__]
    hint = _hint(exc)
    if isinstance(exc, ModelNotFoundError):
        # One line: what was not found and where it was looked for; the library's own
        # closing advice ("Did you mean ...?") becomes the hint.
        first = lines[0].removesuffix(" Tried:").rstrip(".")
        lines = [f"{first} (tried: {'; '.join(exc.tried)})" if exc.tried else first]
        advice = str(exc).splitlines()[-1]
        if len(str(exc).splitlines()) > 1 and not advice.startswith("  - "):
            hint = advice
    stderr(f"error: {lines[0]}")
    for line in lines[1:]:
        stderr(f"  {line}")
    if isinstance(exc, ModelDoesNotFitError):
        for suggestion in exc.suggestions:
            stderr(f"  - {suggestion}")
    if hint:
        stderr(f"hint: {hint}")
    elif not debug:
        stderr("hint: run it again with --debug for the traceback")


def _hint(exc: BaseException) -> str | None:
    if isinstance(exc, ModelDoesNotFitError) and not exc.suggestions:
        return "less context (--ctx-size), a quantized KV cache (--cache-type q8_0), more GPUs"
    if isinstance(exc, HTTPStatusError) and exc.status_code == 401:
        return "the server wants an API key: --api-key-env VAR or --api-key-file PATH"
    for cls in type(exc).__mro__:
        hint = _HINTS.get(cls)
        if hint is not None:
            return hint
    return None
