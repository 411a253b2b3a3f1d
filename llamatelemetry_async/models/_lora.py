"""``merge_lora(model, adapters, out)``: llama.cpp's ``llama-export-lora`` as a supervised
subprocess.

The binary comes from the same build as llama-server (``find_llama_export_lora``). It adds
``scale * alpha / rank * B @ A`` of each adapter to every weight the adapters touch, writes
those weights as F16 (the others are copied as they are) and prints one line per tensor
(``merge_tensor : blk.0.attn_q.weight [...]``, ``copy_tensor :  token_embd.weight [...]``),
which become ``MergeProgress`` values. As with ``quantize``, the result is written under a
temporary name beside ``out`` and renamed into place on success; cancelling kills the
process group and removes the temporary file.
"""

from __future__ import annotations

import collections
import math
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.to_thread

from .._errors import ConfigError, MergeLoraError
from ..server import find_llama_export_lora
from ._quantize import run_tool_into

__all__ = ["LoraAdapter", "MergeLoraError", "MergeProgress", "merge_lora"]

LoraAdapter = str | os.PathLike[str] | tuple[str | os.PathLike[str], float]
"""A LoRA adapter file, or a ``(file, scale)`` pair (as ``ServerConfig.lora`` takes them)."""

_PROGRESS: Final = re.compile(r"^(merge|copy)_tensor\s*:\s+(\S+)\s+\[")
# Its per-tensor chatter: the error (on unbuffered stderr) lands before the buffered
# stdout, so the log tail keeps the other lines.
_CHATTER: Final = re.compile(r"^(file_input|merge_tensor|copy_tensor|run_merge)\s*:")


@dataclass(frozen=True, slots=True)
class MergeProgress:
    """llama-export-lora wrote tensor ``done`` of ``total``, ``tensor``; ``merged`` when an
    adapter changed it (else it was copied)."""

    done: int
    total: int
    tensor: str
    merged: bool

    @property
    def fraction(self) -> float:
        """``done / total``, between 0 and 1."""
        return self.done / self.total if self.total else 0.0


def _check_scale(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{field}: a finite number, got {value!r}", field=field)
    return float(value)


def _adapters(adapters: object, scale: float) -> list[tuple[Path, float]]:
    """``adapters`` as (path, scale) pairs; one path or pair alone is accepted."""
    if isinstance(adapters, str | os.PathLike) or (
        isinstance(adapters, tuple)
        and len(adapters) == 2
        and isinstance(adapters[1], int | float)
        and not isinstance(adapters[1], bool)
    ):
        adapters = [adapters]
    if not isinstance(adapters, Sequence) or not adapters:
        raise ConfigError(
            f"adapters: one or more LoRA adapter files, or (file, scale) pairs, got {adapters!r}",
            field="adapters",
        )
    entries: list[tuple[Path, float]] = []
    for item in adapters:
        if isinstance(item, str | os.PathLike):
            path, item_scale = Path(item), scale
        elif isinstance(item, tuple | list) and len(item) == 2:
            if not isinstance(item[0], str | os.PathLike):
                raise ConfigError(
                    f"adapters: {item!r} is not a (file, scale) pair", field="adapters"
                )
            path, item_scale = Path(item[0]), _check_scale(item[1], "adapters")
        else:
            raise ConfigError(
                f"adapters: expected a file or a (file, scale) pair, got {item!r}",
                field="adapters",
            )
        # llama-export-lora reads --lora-scaled FILE:SCALE,FILE:SCALE.
        if any(c in os.fspath(path) for c in ",:"):
            raise ConfigError(
                f"adapters: {os.fspath(path)!r} has a ',' or ':', which llama-export-lora "
                "cannot take in a file name; rename or link the file",
                field="adapters",
            )
        entries.append((path.expanduser(), item_scale))
    return entries


def _read_adapter(path: Path) -> tuple[str | None, str | None, str | None]:
    """(general.type, adapter.type, general.architecture) of a GGUF adapter file."""
    from ._gguf import _open

    reader, _ = _open(path, os.fspath(path), missing=None)
    try:
        fields: Any = reader.fields

        def text(key: str) -> str | None:
            field = fields.get(key)
            value = field.contents() if field is not None else None
            return value if isinstance(value, str) else None

        return text("general.type"), text("adapter.type"), text("general.architecture")
    finally:
        del reader


def _prepare(
    model: str | os.PathLike[str],
    adapters: list[tuple[Path, float]],
    out: str | os.PathLike[str],
    binary: str | os.PathLike[str] | None,
) -> tuple[Path, Path, int, Path, Path]:
    """The blocking checks: (binary, model, its tensor count, out, a temporary file)."""
    from ._gguf import read_model_info

    model_path, out_path = Path(model).expanduser(), Path(out).expanduser()
    info = read_model_info(model_path)  # ModelNotFoundError / ModelFormatError
    if info.split_count > 1:
        raise ConfigError(
            f"model: {model_path} is split in {info.split_count} files, which llama-export-lora "
            "cannot read; merge the parts first (llama-gguf-split --merge)",
            field="model",
        )
    for path, _scale in adapters:
        general_type, adapter_type, arch = _read_adapter(path)
        if general_type != "adapter" or adapter_type != "lora":
            raise ConfigError(
                f"adapters: {path} is not a LoRA adapter (general.type={general_type!r}, "
                f"adapter.type={adapter_type!r}); convert it with llama.cpp's "
                "convert_lora_to_gguf.py",
                field="adapters",
            )
        if arch != info.architecture:
            raise ConfigError(
                f"adapters: {path} is for architecture {arch!r}, and {model_path} is "
                f"{info.architecture!r}: it was trained on another model",
                field="adapters",
            )
    exe = find_llama_export_lora(binary)
    if out_path.is_dir():
        raise ConfigError(f"out: {out_path} is a directory; give the output file", field="out")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".part", dir=out_path.parent)
    os.close(fd)
    return exe, model_path, info.tensor_count, out_path, Path(name)


def _format_scale(value: float) -> str:
    return repr(float(value))  # shortest round-trip text, which std::stof reads back


async def merge_lora(
    model: str | os.PathLike[str],
    adapters: LoraAdapter | Sequence[LoraAdapter],
    out: str | os.PathLike[str],
    *,
    scale: float = 1.0,
    binary: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    on_progress: Callable[[MergeProgress], object] | None = None,
) -> Path:
    """Merge LoRA ``adapters`` into the GGUF ``model``, writing a standalone model to ``out``.

    ``adapters`` is one GGUF LoRA adapter file, or several, each optionally a ``(file,
    scale)`` pair; ``scale`` applies to those given without one. Each adds
    ``scale * alpha / rank * B @ A`` to the weights it adapts, as llama-server's
    ``--lora-scaled`` does at run time, so the merged model generates what the base model
    with the adapters loaded generates. Merged weights are written as F16 (quantize the
    result to shrink it); other tensors are copied. Runs ``llama-export-lora`` (``binary``,
    else ``find_llama_export_lora()``) in its own process group with ``threads`` threads;
    ``on_progress`` gets a ``MergeProgress`` per tensor, on the event loop. Returns ``out``,
    written atomically.

    Raises ``ConfigError`` for bad arguments, an adapter that is not a LoRA GGUF or was made
    for another architecture, or a split model; ``ModelNotFoundError`` /
    ``ModelFormatError`` for a missing or unreadable file; ``LlamaServerNotFoundError``
    without a binary; ``MergeLoraError`` (exit status, last output lines) when
    llama-export-lora fails. Cancelling kills it and leaves no file.

    ```python
    out = await merge_lora("base-f16.gguf", "my-lora.gguf", "merged-f16.gguf", scale=0.8)
    ```
    """
    base_scale = _check_scale(scale, "scale")
    entries = _adapters(adapters, base_scale)
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ConfigError(f"threads: must be an int >= 1, got {threads!r}", field="threads")
    exe, model_path, total, out_path, tmp = await anyio.to_thread.run_sync(
        _prepare, model, entries, out, binary
    )
    argv = [os.fspath(exe), "--model", os.fspath(model_path), "--output", os.fspath(tmp)]
    # One comma-separated list: llama.cpp deprecates repeating the flag.
    scaled = (f"{os.fspath(path)}:{_format_scale(item_scale)}" for path, item_scale in entries)
    argv += ["--lora-scaled", ",".join(scaled)]
    if threads is not None:
        argv += ["--threads", str(threads)]
    done = 0
    notes: collections.deque[str] = collections.deque(maxlen=40)

    def on_line(text: str) -> None:
        nonlocal done
        if _CHATTER.match(text) is None:
            notes.append(text)
        if on_progress is not None and (match := _PROGRESS.match(text)):
            done += 1
            on_progress(MergeProgress(done, total, match.group(2), match.group(1) == "merge"))

    def failed(returncode: int, tail: list[str]) -> MergeLoraError:
        log_tail = "\n".join(notes or tail)
        return MergeLoraError(
            f"llama-export-lora {model_path} + "
            f"{', '.join(os.fspath(p) for p, _ in entries)} failed "
            f"(exit status {returncode}):\n{log_tail}",
            model=os.fspath(model_path),
            returncode=returncode,
            log_tail=log_tail,
        )

    await run_tool_into(argv, on_line, tmp, out_path, failed)
    return out_path
