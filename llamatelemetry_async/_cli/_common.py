"""What the commands share: running a coroutine, option parsers, models, API keys, signals."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import signal
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import anyio

from .._errors import ConfigError, UsageError
from .._groups import single_error
from .._placement import Placement

if TYPE_CHECKING:
    from .._placement import KaggleSplit
    from ..engine import ServerInfo

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "LineReader",
    "add_placement_options",
    "api_key_from",
    "gpu_memory",
    "parse_placement",
    "parse_sizes",
    "placement_from",
    "private_dir",
    "resolve",
    "run",
    "server_line",
    "stderr",
    "stop_on_signals",
    "write_private",
]

T = TypeVar("T")

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1  # a runtime failure: a server would not start, a request failed
EXIT_USAGE: Final = 2  # a usage error: bad options or arguments (argparse's code too)
EXIT_INTERRUPTED: Final = 130  # Ctrl-C, outside the commands that treat it as "stop"


def run(
    fn: Callable[[argparse.Namespace], Awaitable[T]],
    args: argparse.Namespace,
    *,
    fast_loop: bool = False,
) -> T:
    """Run one command's coroutine on asyncio (the library's target loop).

    ``fast_loop``: on uvloop when it is installed (a dependency on Linux and macOS), as
    uvicorn would run a server; the front door relays every token through the loop.
    """
    options: dict[str, Any] = {}
    if fast_loop and importlib.util.find_spec("uvloop") is not None:
        options["use_uvloop"] = True
    return anyio.run(fn, args, backend="asyncio", backend_options=options)


# ---------------------------------------------------------------------- placement


def _placement(text: str) -> Placement:
    kind, _, rest = text.strip().partition(":")
    if kind == "auto" and not rest:
        return Placement.auto()
    if kind == "cpu":
        if rest and not rest.isdigit():
            raise ConfigError(f"cpu:N takes a number of servers, got {text!r}")
        return Placement.cpu(int(rest) if rest else 1)
    if kind == "per-gpu":
        return Placement.per_gpu(_ids(rest, text) if rest else None)
    if kind == "pairs":
        if not rest:
            return Placement.pairs()
        pairs = []
        for part in rest.split(","):
            a, plus, b = part.partition("+")
            if not plus or not a.strip().isdigit() or not b.strip().isdigit():
                raise ConfigError(f"pairs are written 0+1,2+3; got {text!r}")
            pairs.append((int(a), int(b)))
        return Placement.pairs(pairs)
    raise ConfigError(
        f"unknown placement {text!r}; use auto, cpu:N, per-gpu[:0,1] or pairs[:0+1,2+3]"
    )


def parse_placement(text: str) -> Placement:
    """A placement as ``--placement`` or ``--preset`` write it (``cpu:2``, ``kaggle-t4x2``)."""
    if text.strip().partition(":")[0] in ("kaggle-t4x2", "kaggle-t4x2-pair", "single-gpu"):
        return _preset(text)
    return _placement(text)


def _preset(text: str) -> Placement:
    name, _, rest = text.strip().partition(":")
    if name == "kaggle-t4x2" and not rest:
        return Placement.kaggle_t4x2()
    if name == "kaggle-t4x2-pair":
        # The placement checks the split itself (50/50, 60/40 or 70/30).
        return Placement.kaggle_t4x2_pair(cast("KaggleSplit", rest or "50/50"))
    if name == "single-gpu":
        if rest and not rest.isdigit():
            raise ConfigError(f"single-gpu:N takes a GPU id, got {text!r}")
        return Placement.single_gpu(int(rest) if rest else 0)
    raise ConfigError(
        f"unknown preset {text!r}; use kaggle-t4x2, kaggle-t4x2-pair[:60/40] or single-gpu[:N]"
    )


def _ids(text: str, whole: str) -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise ConfigError(f"GPU ids are numbers separated by commas, got {whole!r}")
    return [int(p) for p in parts]


def _argtype(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse ``type=``: a ``ConfigError`` becomes argparse's usage error (exit 2)."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    convert.__name__ = parse.__name__.lstrip("_")  # argparse names the type in its errors
    return convert


def _n_gpu_layers(text: str) -> int | str:
    if text in ("auto", "all"):
        return text
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"a layer count, auto or all, got {text!r}")


def add_placement_options(
    parser: argparse.ArgumentParser, *, default: str = "auto", server_options: bool = True
) -> None:
    """``--placement``/``--preset`` and, for commands that start servers, their settings."""
    where = parser.add_argument_group("where the servers run")
    choice = where.add_mutually_exclusive_group()
    choice.add_argument(
        "--placement",
        type=_argtype(_placement),
        default=_placement(default),
        metavar="PLACEMENT",
        help=f"auto, cpu:N, per-gpu[:0,1] or pairs[:0+1,2+3] (default: {default}; "
        "auto is one server per visible GPU, else one on the CPU)",
    )
    choice.add_argument(
        "--preset",
        dest="placement",
        type=_argtype(_preset),
        metavar="PRESET",
        help="kaggle-t4x2 (a server per T4), kaggle-t4x2-pair[:60/40] (one server split "
        "over both T4s: 50/50, 60/40 or 70/30), single-gpu[:N]",
    )
    if not server_options:
        return
    server = parser.add_argument_group("each llama-server")
    server.add_argument("--ctx-size", type=int, metavar="N", help="context tokens, all slots")
    server.add_argument("--parallel", type=int, metavar="N", help="slots (requests at once)")
    server.add_argument(
        "--n-gpu-layers",
        type=_n_gpu_layers,
        metavar="N|auto|all",
        help="layers offloaded to the GPU (default: all on a GPU; CPU servers use 0)",
    )
    server.add_argument("--llama-server", metavar="PATH", help="the llama-server binary to run")
    server.add_argument("--log-dir", metavar="DIR", help="also write each server's log here")


def gpu_memory(values: list[str]) -> list[int]:
    """``--gpu-mem``'s words (``15GiB x2`` arrives as two) as sizes in bytes."""
    return parse_sizes(" ".join(values))


def placement_from(args: argparse.Namespace) -> Placement:
    """The ``Placement`` that ``--placement`` or ``--preset`` chose."""
    placement: Placement = args.placement
    return placement


# ---------------------------------------------------------------------- models and sizes


async def resolve(spec: str) -> Path:
    """The local GGUF file ``spec`` names: a path, ``owner/repo:file.gguf`` or a registry
    name (downloaded into huggingface_hub's cache when needed).

    Raises ``ModelNotFoundError`` listing what was tried.
    """
    from ..models import resolve_model

    return await resolve_model(spec)


_SIZE: Final = re.compile(r"(\d+(?:\.\d+)?)([KMGT]i?B|B)?(?:[x*](\d+))?", re.IGNORECASE)
_UNITS: Final = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_sizes(text: str) -> list[int]:
    """GPU memory sizes, one per GPU, in bytes: ``15GiB x2``, ``16GB,24GB``, ``80``.

    Sizes are separated by commas or spaces; ``xN`` repeats one; a bare number is GiB.
    Raises ``ConfigError`` for anything else.
    """
    # Glue "7.5 GiB" and "15GiB x 2" into single tokens, then split the list.
    glued = re.sub(r"(\d)\s+(?=[KMGT]?i?B\b)", r"\1", text.strip(), flags=re.IGNORECASE)
    glued = re.sub(r"\s*([x*])\s*(?=\d)", r"\1", glued)
    tokens = [t for t in re.split(r"[,\s]+", glued) if t]
    sizes: list[int] = []
    for token in tokens or [text]:
        match = _SIZE.fullmatch(token)
        if match is None:
            raise ConfigError(
                f"a GPU memory size is like 15GiB, 16GB or 15GiB x2, got {token!r}",
                field="gpu_mem",
            )
        number, unit, count = match.groups()
        size, repeat = int(float(number) * _UNITS[(unit or "GiB").lower()]), int(count or 1)
        if size <= 0 or repeat <= 0:
            raise ConfigError(f"GPU memory sizes and counts must be > 0, got {token!r}")
        sizes.extend([size] * repeat)
    return sizes


# ---------------------------------------------------------------------- API keys


def api_key_from(env: str | None, file: str | None) -> str | None:
    """A key from the variable ``env`` or the file ``file`` (first line); ``None`` if neither.

    ``UsageError`` when the named variable is unset or the file is unreadable or empty.
    """
    if env:
        key = os.environ.get(env)
        if not key:
            raise UsageError(f"--api-key-env {env}: the variable is not set or empty")
        return key
    if file:
        try:
            text = Path(file).expanduser().read_text().strip()
        except OSError as exc:
            raise UsageError(f"--api-key-file {file}: {exc.strerror or exc}") from exc
        if not text:
            raise UsageError(f"--api-key-file {file}: the file is empty")
        return text.splitlines()[0].strip()
    return None


# ---------------------------------------------------------------------- signals and stdin


@contextlib.asynccontextmanager
async def stop_on_signals(
    on_signal: Callable[[signal.Signals], None], *signals: signal.Signals
) -> AsyncIterator[None]:
    """Call ``on_signal(signum)`` for each of ``signals`` while the block runs.

    The handler replaces Python's KeyboardInterrupt for SIGINT inside the block, so a
    command can decide what Ctrl-C means (stop serving, cancel a reply) and shut down in
    order; keep everything that must finish (reaping servers) inside the block.
    """
    with (
        anyio.open_signal_receiver(*(signals or (signal.SIGINT, signal.SIGTERM))) as received,
        single_error(),  # the block's own error comes out as itself, not in a group
    ):
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                async for signum in received:
                    on_signal(signum)

            tg.start_soon(watch)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()


class LineReader:
    """Lines from a file descriptor (stdin) without blocking the event loop.

    Pipes, terminals and sockets are waited on with the event loop (``wait_readable``), so
    reading can be cancelled at any time and leaves no thread stuck in ``read``; regular
    files, which are always readable, are read in a worker thread.
    """

    def __init__(self, fd: int = 0) -> None:
        self._fd = fd
        self._buffer = b""
        self._eof = False
        mode = os.fstat(fd).st_mode
        self._pollable = stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode)

    async def readline(self) -> str | None:
        """The next line without its newline; ``None`` at end of input."""
        while b"\n" not in self._buffer and not self._eof:
            if self._pollable:
                await anyio.wait_readable(self._fd)
                data = os.read(self._fd, 65536)  # readable: returns at once
            else:
                data = await anyio.to_thread.run_sync(os.read, self._fd, 65536)
            if not data:
                self._eof = True
            self._buffer += data
        if not self._buffer:
            return None
        line, newline, self._buffer = self._buffer.partition(b"\n")
        if not newline:
            self._buffer = b""
        return line.decode("utf-8", "replace").rstrip("\r")


@contextlib.contextmanager
def private_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory only this user can read (mode 0700), removed on exit."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by this user only (0600), whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
        f.write(text + "\n")


def server_line(info: ServerInfo) -> str:
    """One server as the commands print it: where it listens, what it runs on, its threads."""
    from ..server import core_ranges

    where = "GPU " + ",".join(map(str, info.gpus)) if info.gpus else "CPU"
    if info.kind == "remote":
        return f"server {info.name}: {info.url}  (remote, {info.slots} slots)"
    if info.kind == "ray":
        where = f"Ray node {(info.node or '?')[:12]}, pid {info.pid}, {where}"
        return f"server {info.name}: {info.url}  ({where}, {info.slots} slots)"
    threads = (
        "default threads"
        if info.threads is None
        else f"{info.threads} thread{'s' if info.threads != 1 else ''}"
    )
    if info.cores:
        threads += f" on cores {core_ranges(info.cores)}"
    return (
        f"server {info.name}: {info.url}  (pid {info.pid}, {where}, {info.slots} slots, {threads})"
    )


def stderr(*parts: object) -> None:
    """Print to stderr at once (messages, figures: what is not the command's output)."""
    print(*parts, file=sys.stderr, flush=True)
