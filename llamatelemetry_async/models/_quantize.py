"""``quantize(src, dst, type)``: llama.cpp's ``llama-quantize`` as a supervised subprocess.

The binary comes from the same build as llama-server (``find_llama_quantize``). Its output
is read line by line as it runs: ``[  12/ 291] blk.1.attn_k.weight - [...], type = f16,
converting to q4_K .. size = ...`` lines become ``QuantizeProgress`` values. The result is
written under a temporary name beside ``dst`` and renamed into place when llama-quantize
succeeds, so ``dst`` is never a half-written file. Cancelling kills the process group and
removes the temporary file.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import signal
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio
import anyio.abc
import anyio.to_thread

from .._errors import ConfigError, QuantizeError
from ..server import find_llama_quantize, open_process

__all__ = ["QUANT_TYPES", "QuantizeProgress", "quantize"]

logger = logging.getLogger("llamatelemetry_async.models")

QUANT_TYPES: Final[Mapping[str, int]] = {
    "Q1_0": 40,
    "Q2_0": 41,
    "Q4_0": 2,
    "Q4_1": 3,
    "MXFP4_MOE": 38,
    "Q5_0": 8,
    "Q5_1": 9,
    "IQ2_XXS": 19,
    "IQ2_XS": 20,
    "IQ2_S": 28,
    "IQ2_M": 29,
    "IQ1_S": 24,
    "IQ1_M": 31,
    "TQ1_0": 36,
    "TQ2_0": 37,
    "Q2_K": 10,
    "Q2_K_S": 21,
    "IQ3_XXS": 23,
    "IQ3_S": 26,
    "IQ3_M": 27,
    "Q3_K": 12,
    "IQ3_XS": 22,
    "Q3_K_S": 11,
    "Q3_K_M": 12,
    "Q3_K_L": 13,
    "IQ4_NL": 25,
    "IQ4_XS": 30,
    "Q4_K": 15,
    "Q4_K_S": 14,
    "Q4_K_M": 15,
    "Q5_K": 17,
    "Q5_K_S": 16,
    "Q5_K_M": 17,
    "Q6_K": 18,
    "Q8_0": 7,
    "F16": 1,
    "BF16": 32,
    "F32": 0,
}
"""llama-quantize's type names (llama.cpp build 11434) -> the ``general.file_type`` written."""

_TAIL_LINES: Final = 40
_PROGRESS: Final = re.compile(r"^\s*\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")


@dataclass(frozen=True, slots=True)
class QuantizeProgress:
    """llama-quantize reached tensor ``done`` of ``total``, named ``tensor``."""

    done: int
    total: int
    tensor: str

    @property
    def fraction(self) -> float:
        """``done / total``, between 0 and 1."""
        return self.done / self.total if self.total else 0.0


def _type_name(qtype: str) -> str:
    name = qtype.strip().upper() if isinstance(qtype, str) else ""
    if name not in QUANT_TYPES:
        valid = ", ".join(QUANT_TYPES)
        raise ConfigError(
            f"type: {qtype!r} is not a llama-quantize type; use one of {valid} "
            "(Q4_K_M is the usual choice, Q8_0 the near-lossless one)",
            field="type",
        )
    return name


def _prepare(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    binary: str | os.PathLike[str] | None,
) -> tuple[Path, Path, Path, Path]:
    """The blocking checks: (binary, src, dst, a new temporary file beside dst)."""
    from ._gguf import read_model_info

    src_path, dst_path = Path(src).expanduser(), Path(dst).expanduser()
    read_model_info(src_path)  # ModelNotFoundError / ModelFormatError unless a readable GGUF
    exe = find_llama_quantize(binary)
    if dst_path.is_dir():
        raise ConfigError(f"dst: {dst_path} is a directory; give the output file", field="dst")
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dst_path.name}.", suffix=".part", dir=dst_path.parent)
    os.close(fd)
    return exe, src_path, dst_path, Path(name)


def _publish(tmp: Path, dst: Path) -> None:
    # mkstemp made it 0600; a model file is ordinary readable data. Same folder: atomic.
    tmp.chmod(0o644)
    os.replace(tmp, dst)


async def run_tool(argv: Sequence[str], on_line: Callable[[str], object]) -> tuple[int, list[str]]:
    """Run one of llama.cpp's tools to the end, each output line to ``on_line`` (on the event
    loop); its exit status and last lines of output."""
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    tool = Path(argv[0]).name

    def line(raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        tail.append(text)
        logger.debug("%s: %s", tool, text)
        on_line(text)

    # Its own process group (a kill reaches all of it), tied to this process on asyncio and trio.
    process = await open_process(list(argv))
    try:
        assert process.stdout is not None
        pending = b""
        async for data in process.stdout:
            *lines, pending = (pending + data).split(b"\n")
            for raw in lines:
                line(raw)
        if pending:
            line(pending)
        returncode = await process.wait()
    except BaseException:
        # Cancelled, or on_line raised: the output file will be thrown away, so there is
        # nothing to finish cleanly; kill the group and reap it before going on.
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await process.aclose()
    return returncode, list(tail)


async def run_tool_into(
    argv: Sequence[str],
    on_line: Callable[[str], object],
    tmp: Path,
    dst: Path,
    failed: Callable[[int, list[str]], Exception],
) -> None:
    """Run a tool that writes ``tmp``; on success move it to ``dst`` (atomically), else raise
    ``failed(exit status, last lines)``. ``tmp`` is removed whatever goes wrong, even when
    cancelled."""
    try:
        returncode, tail = await run_tool(argv, on_line)
        if returncode != 0:
            raise failed(returncode, tail)
        await anyio.to_thread.run_sync(_publish, tmp, dst)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(lambda: tmp.unlink(missing_ok=True))
        raise


async def quantize(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    type: str,
    *,
    binary: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    allow_requantize: bool = False,
    extra_args: Sequence[str] = (),
    on_progress: Callable[[QuantizeProgress], object] | None = None,
) -> Path:
    """Quantize the GGUF model ``src`` to ``type`` (``"Q4_K_M"``, ``"Q8_0"``...) into ``dst``.

    Runs ``llama-quantize`` (``binary``, else ``find_llama_quantize()``) as a subprocess of
    its own process group, with ``threads`` threads (default: all cores). ``on_progress`` is
    called on the event loop with a ``QuantizeProgress`` for each tensor. ``allow_requantize``
    lets an already quantized model be quantized again (at a loss of quality);
    ``extra_args`` go to llama-quantize before the file names (``["--pure"]``,
    ``["--imatrix", "m.imatrix"]``; the IQ1/IQ2 types need an importance matrix). Returns
    ``dst``, written atomically: a temporary file beside it is renamed into place.

    Raises ``ConfigError`` for an unknown type (listing the valid ones) or a bad argument,
    ``ModelNotFoundError`` / ``ModelFormatError`` when ``src`` is missing or not a readable
    GGUF, ``LlamaServerNotFoundError`` without a binary, and ``QuantizeError`` (exit status,
    last output lines) when llama-quantize fails. Cancelling kills it and leaves no file.

    ```python
    out = await quantize("model-f16.gguf", "model-Q4_K_M.gguf", "Q4_K_M",
                         on_progress=lambda p: print(f"{p.fraction:.0%} {p.tensor}"))
    ```
    """
    name = _type_name(type)
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ConfigError(f"threads: must be an int >= 1, got {threads!r}", field="threads")
    if isinstance(extra_args, str) or not all(isinstance(a, str) for a in extra_args):
        raise ConfigError(
            f"extra_args: a list of strings, one per argument, got {extra_args!r}",
            field="extra_args",
        )
    exe, src_path, dst_path, tmp = await anyio.to_thread.run_sync(_prepare, src, dst, binary)
    argv = [
        os.fspath(exe),
        *(["--allow-requantize"] if allow_requantize else []),
        *extra_args,
        os.fspath(src_path),
        os.fspath(tmp),
        name,
        *([str(threads)] if threads is not None else []),
    ]
    logger.info("quantizing %s to %s -> %s", src_path, name, dst_path)

    def on_line(text: str) -> None:
        if on_progress is not None and (match := _PROGRESS.match(text)):
            done, total, tensor = match.groups()
            on_progress(QuantizeProgress(int(done), int(total), tensor))

    def failed(returncode: int, tail: list[str]) -> QuantizeError:
        log_tail = "\n".join(tail)
        hint = ""
        if "requantiz" in log_tail and not allow_requantize:
            hint = " (the model is already quantized: pass allow_requantize=True)"
        elif "importance matrix" in log_tail:
            hint = " (this type needs an importance matrix: extra_args=['--imatrix', file])"
        return QuantizeError(
            f"llama-quantize {src_path} -> {name} failed (exit status {returncode}){hint}:"
            f"\n{log_tail}",
            model=os.fspath(src_path),
            returncode=returncode,
            log_tail=log_tail,
        )

    await run_tool_into(argv, on_line, tmp, dst_path, failed)
    logger.info("quantized %s", dst_path)
    return dst_path
