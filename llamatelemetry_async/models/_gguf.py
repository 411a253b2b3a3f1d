"""GGUF inspection: ``inspect_model(path)`` reads a model's shape with the ``gguf`` package.

Only the header and the tensor table are read (the tensor data stay memory-mapped and
untouched), yet the byte counts are exact: each tensor's size comes from its type and shape,
as llama.cpp computes it. Parsing a big model takes a while (its vocabulary alone is an array
of 100k+ strings), so the async ``inspect_model`` runs ``read_model_info`` in a worker thread.

```python
info = await inspect_model("Llama-3.2-1B-Instruct-Q4_K_M.gguf")
info.architecture, info.file_type, info.parameter_count  # ('llama', 'Q4_K_M', 1235814432)
info.block_count, info.head_count_kv, info.head_dim_k    # (16, 8, 64)
info.kv_bytes_per_token("q8_0")                          # KV cache bytes per token of context
```
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio.to_thread

from .._errors import ConfigError, ModelFormatError, ModelNotFoundError

__all__ = [
    "ModelInfo",
    "TensorTypeStats",
    "cache_type_bytes",
    "human_bytes",
    "inspect_model",
    "read_model_info",
]

_LAYER: Final = re.compile(r"^blk\.(\d+)\.")
# Input tensors: llama.cpp always keeps the input layer on the CPU (llama-model.cpp,
# "there is very little benefit to offloading the input layer").
_INPUT_PREFIXES: Final = ("token_embd.", "position_embd.", "token_types.")


@dataclass(frozen=True, slots=True)
class TensorTypeStats:
    """How many tensors of one ggml type a model holds, their elements and their bytes."""

    count: int
    elements: int
    nbytes: int


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """The shape of a GGUF model: what inspection reads and what VRAM planning needs.

    Byte counts are exact (from each tensor's type and shape). ``layer_bytes[i]`` holds the
    weights of block ``i`` (``blk.i.*``); ``input_bytes`` the token embeddings, which
    llama.cpp keeps on the CPU; ``output_bytes`` every other tensor (``output.weight``,
    ``output_norm.weight`` ...), which goes to a GPU with the last offloaded layer.

    ``model_shape(...)`` (in ``_vram``) builds one from hand-given shapes, without a file.
    """

    path: Path | None
    """The file (``None`` for a hand-built shape)."""
    file_size: int
    """Size of the file in bytes (header + tensor data)."""
    architecture: str
    """``general.architecture``: ``llama``, ``qwen2``, ``gemma3`` ..."""
    name: str | None
    """``general.name``, if the file has one."""
    file_type: str | None
    """llama.cpp's name for ``general.file_type`` (``Q4_K_M``, ``F16`` ...)."""
    parameter_count: int
    """Sum of the element counts of every tensor."""
    tensor_count: int
    tensor_types: Mapping[str, TensorTypeStats]
    """Per ggml tensor type (``Q4_K``, ``Q6_K``, ``F32`` ...): count, elements, bytes."""
    context_length: int
    """The training context (``{arch}.context_length``)."""
    block_count: int
    """Repeating layers (``{arch}.block_count``)."""
    head_count: int
    head_count_kv: int
    """KV heads (grouped-query attention); the largest one if it varies per layer."""
    head_dim_k: int
    """Elements per K head (``attention.key_length``, else ``embedding_length / head_count``)."""
    head_dim_v: int
    """Elements per V head (``attention.value_length``, else as for K)."""
    embedding_length: int
    feed_forward_length: int | None
    """The largest one, if it varies per layer; ``None`` when the file does not say."""
    vocab_size: int
    chat_template: str | None = None
    bos_token_id: int | None = None
    bos_token: str | None = None
    eos_token_id: int | None = None
    eos_token: str | None = None
    rope_freq_base: float | None = None
    rope_dimension_count: int | None = None
    rope_scaling_type: str | None = None
    rope_scaling_factor: float | None = None
    sliding_window: int | None = None
    """Sliding-window size of SWA layers, if any (planning counts them at full size)."""
    layer_bytes: tuple[int, ...] = ()
    input_bytes: int = 0
    output_bytes: int = 0
    tied_embeddings: bool = False
    """No ``output.weight``: llama.cpp uses the token embeddings as the output layer too,
    and copies them to the output layer's device."""
    metadata: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """Every scalar metadata value (arrays left out), for what the fields above omit."""

    @property
    def weight_bytes(self) -> int:
        """Bytes of every tensor: layers, input and output."""
        return sum(self.layer_bytes) + self.input_bytes + self.output_bytes

    @property
    def output_device_bytes(self) -> int:
        """Bytes the output layer puts on its device (token embeddings again when tied)."""
        return self.output_bytes + (self.input_bytes if self.tied_embeddings else 0)

    @property
    def bits_per_weight(self) -> float:
        """Average bits per parameter over all tensors (4.89 for a typical Q4_K_M)."""
        return self.weight_bytes * 8 / self.parameter_count if self.parameter_count else 0.0

    def kv_bytes_per_token(self, cache_type_k: str = "f16", cache_type_v: str | None = None) -> int:
        """KV cache bytes per token of context, over all layers (llama.cpp's layout).

        Per layer llama.cpp stores, per cell, a K row of ``head_count_kv * head_dim_k``
        elements and a V row of ``head_count_kv * head_dim_v`` elements of the cache type
        (``f16``: 2 bytes each; ``q8_0``: 34 bytes per 32; ``q4_0``: 18 bytes per 32).
        """
        k = cache_type_bytes(cache_type_k, self.head_count_kv * self.head_dim_k)
        v = cache_type_bytes(cache_type_v or cache_type_k, self.head_count_kv * self.head_dim_v)
        return self.block_count * (k + v)

    def summary(self) -> str:
        """One line: name, architecture, size, quantization, shape."""
        params = _human_count(self.parameter_count)
        return (
            f"{self.name or (self.path.name if self.path else 'model')} ({self.architecture}, "
            f"{params} params, {self.file_type or '?'}, {human_bytes(self.weight_bytes)}): "
            f"{self.block_count} layers, {self.head_count} heads / {self.head_count_kv} KV "
            f"of {self.head_dim_k}, embd {self.embedding_length}, ctx {self.context_length}, "
            f"vocab {self.vocab_size}"
        )


def cache_type_bytes(cache_type: str, elements: int) -> int:
    """Bytes of ``elements`` values of a KV cache type (``f16``, ``q8_0``, ``q4_0`` ...).

    ggml's row size: ``type_size * elements / block_size`` (rounded up to a whole block).
    Raises ``ConfigError`` for a name that is no ggml type.
    """
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType[cache_type.upper()]
    except KeyError:
        raise ConfigError(
            f"cache_type: unknown KV cache type {cache_type!r}; use f16, q8_0, q4_0 ...",
            field="cache_type",
        ) from None
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(-(-elements // block) * size)


async def inspect_model(path: str | os.PathLike[str]) -> ModelInfo:
    """Read a GGUF model's shape without blocking the event loop (a worker thread parses it).

    Raises ``ModelNotFoundError`` when there is no file at ``path`` and ``ModelFormatError``
    when the file is not a readable GGUF (not GGUF at all, truncated, corrupt).
    """
    return await anyio.to_thread.run_sync(read_model_info, path)


def read_model_info(path: str | os.PathLike[str]) -> ModelInfo:
    """The blocking body of ``inspect_model``: parse ``path`` with ``gguf.GGUFReader``."""
    import gguf

    file = Path(path)
    shown = os.fspath(file)
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        raise ModelNotFoundError(
            f"no model file at {shown}; pass the path of a .gguf file", model=shown, tried=[shown]
        ) from None
    except OSError as exc:
        raise _format_error(shown, f"cannot be read ({exc.strerror or exc})") from exc
    if not file.is_file():
        raise _format_error(shown, "is not a regular file (a directory?)")
    if size == 0:
        raise _format_error(shown, "is empty (0 bytes)")
    try:
        with file.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise _format_error(shown, f"cannot be read ({exc.strerror or exc})") from exc
    if magic != b"GGUF":
        raise _format_error(
            shown, f"is not a GGUF file (it starts with {magic!r}, a GGUF file with b'GGUF')"
        )
    try:
        reader = gguf.GGUFReader(file, "r")
    except OSError as exc:
        raise _format_error(shown, f"cannot be read ({exc.strerror or exc})") from exc
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError) as exc:
        # GGUFReader indexes a memory map: a short file gives empty slices, which surface as
        # IndexError or as ValueError from numpy's view/reshape. Either way the file is bad.
        problem = str(exc)
        if "version" in problem:
            raise _format_error(shown, f"has an unsupported GGUF version ({problem})") from exc
        raise _format_error(
            shown, f"is truncated or corrupt: its header or tensor table is unreadable ({problem})"
        ) from exc
    try:
        return _model_info(reader, file, size)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError) as exc:
        raise _format_error(shown, f"has unreadable metadata ({exc})") from exc
    finally:
        del reader  # drops the memory map now, not at the next garbage collection


def _format_error(path: str, problem: str) -> ModelFormatError:
    return ModelFormatError(
        f"{path} {problem}; check the file (download it again, or re-convert it)",
        model=path,
        problem=problem,
    )


def _model_info(reader: Any, file: Path, size: int) -> ModelInfo:
    import gguf

    shown = os.fspath(file)
    fields: Mapping[str, Any] = reader.fields

    def value(key: str) -> Any:
        entry = fields.get(key)
        if entry is None or not entry.types:
            return None
        if entry.types[0] == gguf.GGUFValueType.ARRAY:
            if entry.types[-1] == gguf.GGUFValueType.STRING:
                return None
            return entry.contents()  # a per-layer array (head counts, ff lengths)
        return entry.contents()

    arch = value("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise _format_error(shown, "has no general.architecture (is it a GGUF model file?)")
    if value("general.type") == "adapter":
        raise _format_error(
            shown,
            "is an adapter (general.type=adapter), not a model; load it with --lora on a model",
        )

    # Tensors: exact bytes from type and shape; the file must hold all of their data.
    layers: dict[int, int] = {}
    types: dict[str, list[int]] = {}
    input_bytes = output_bytes = params = 0
    data_end = 0
    names = set()
    for tensor in reader.tensors:
        name = str(tensor.name)
        names.add(name)
        n_elements, n_bytes = int(tensor.n_elements), int(tensor.n_bytes)
        params += n_elements
        data_end = max(data_end, int(tensor.data_offset) + n_bytes)
        stats = types.setdefault(gguf.GGMLQuantizationType(tensor.tensor_type).name, [0, 0, 0])
        stats[0] += 1
        stats[1] += n_elements
        stats[2] += n_bytes
        match = _LAYER.match(name)
        if match:
            index = int(match.group(1))
            layers[index] = layers.get(index, 0) + n_bytes
        elif name.startswith(_INPUT_PREFIXES):
            input_bytes += n_bytes
        else:
            output_bytes += n_bytes
    if data_end > size:
        raise _format_error(
            shown,
            f"is truncated: its tensors need {data_end} bytes but the file has {size}",
        )

    def count(key: str, default: int = 0) -> int:
        raw = value(f"{arch}.{key}")
        if raw is None:
            return default
        if isinstance(raw, list):
            return max((int(x) for x in raw), default=default)
        return int(raw)

    def real(key: str) -> float | None:
        raw = value(f"{arch}.{key}")
        return None if raw is None or isinstance(raw, list) else float(raw)

    block_count = count("block_count", len(layers))
    embd = count("embedding_length")
    heads = count("attention.head_count")
    kv_heads = count("attention.head_count_kv", heads)
    head_k = count("attention.key_length", embd // heads if heads else 0)
    head_v = count("attention.value_length", head_k)
    ff = count("feed_forward_length")

    tokens = fields.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens.data) if tokens is not None else 0
    vocab = count("vocab_size", n_tokens)

    def token(key: str) -> tuple[int | None, str | None]:
        raw = value(key)
        if raw is None:
            return None, None
        tid = int(raw)
        text = tokens.contents(tid) if tokens is not None and 0 <= tid < n_tokens else None
        return tid, text

    bos_id, bos = token("tokenizer.ggml.bos_token_id")
    eos_id, eos = token("tokenizer.ggml.eos_token_id")
    template = value("tokenizer.chat_template")
    ftype_raw = value("general.file_type")
    scaling = value(f"{arch}.rope.scaling.type")
    window = count("attention.sliding_window")
    metadata = {
        key: value(key)
        for key, entry in fields.items()
        if entry.types
        and entry.types[0] != gguf.GGUFValueType.ARRAY
        and not key.startswith("GGUF.")
    }
    name = value("general.name")
    return ModelInfo(
        path=file,
        file_size=size,
        architecture=arch,
        name=name if isinstance(name, str) else None,
        file_type=_file_type_name(ftype_raw),
        parameter_count=params,
        tensor_count=len(reader.tensors),
        tensor_types={
            name: TensorTypeStats(count=c, elements=e, nbytes=b)
            for name, (c, e, b) in sorted(types.items())
        },
        context_length=count("context_length"),
        block_count=block_count,
        head_count=heads,
        head_count_kv=kv_heads,
        head_dim_k=head_k,
        head_dim_v=head_v,
        embedding_length=embd,
        feed_forward_length=ff or None,
        vocab_size=vocab,
        chat_template=template if isinstance(template, str) else None,
        bos_token_id=bos_id,
        bos_token=bos,
        eos_token_id=eos_id,
        eos_token=eos,
        rope_freq_base=real("rope.freq_base"),
        rope_dimension_count=count("rope.dimension_count") or None,
        rope_scaling_type=scaling if isinstance(scaling, str) else None,
        rope_scaling_factor=real("rope.scaling.factor"),
        sliding_window=window or None,
        layer_bytes=tuple(layers.get(i, 0) for i in range(max([block_count - 1, *layers]) + 1)),
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        tied_embeddings="output.weight" not in names,
        metadata=metadata,
    )


def _file_type_name(raw: object) -> str | None:
    """llama.cpp's name of a ``general.file_type`` value: 15 -> ``Q4_K_M``, 1 -> ``F16``."""
    import gguf

    if not isinstance(raw, int):
        return None
    try:
        name = str(gguf.LlamaFileType(raw).name)
    except ValueError:
        return f"unknown ({raw})"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _human_count(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    """``n`` bytes in binary units: ``"14.50 GiB"``, ``"258.5 MiB"``, ``"-1.2 GiB"``."""
    sign, n = ("-", -n) if n < 0 else ("", n)
    if n >= 2**30:
        return f"{sign}{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{sign}{n / 2**20:.1f} MiB"
    if n >= 2**10:
        return f"{sign}{n / 2**10:.1f} KiB"
    return f"{sign}{n} B"
