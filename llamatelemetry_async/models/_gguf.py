"""GGUF inspection: ``inspect_model(path)`` reads a model's shape with the ``gguf`` package.

Only the header and the tensor table are read (the tensor data stay memory-mapped and
untouched), yet the byte counts are exact: each tensor's size comes from its type and shape,
as llama.cpp computes it. Parsing a big model takes a while (its vocabulary alone is an array
of 100k+ strings), so the async ``inspect_model`` runs ``read_model_info`` in a worker thread.
A split model (``name-00001-of-00003.gguf``, as ``gguf-split`` writes it) is read whole: the
first part's metadata and every part's tensors, found by name beside the first part, as
llama.cpp finds them.

```python
info = await inspect_model("Llama-3.2-1B-Instruct-Q4_K_M.gguf")
info.architecture, info.file_type, info.parameter_count  # ('llama', 'Q4_K_M', 1235814432)
info.block_count, info.head_count_kv, info.head_dim_k    # (16, 8, 64)
info.kv_bytes_per_token("q8_0")                          # KV cache bytes per token of context
```
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio.to_thread

from .._errors import ConfigError, ModelFormatError, ModelNotFoundError

__all__ = [
    "KV_CELL_ALIGN",
    "ModelInfo",
    "TensorTypeStats",
    "cache_type_bytes",
    "human_bytes",
    "inspect_model",
    "kv_cells",
    "read_model_info",
    "with_adapters",
]

KV_CELL_ALIGN: Final = 256
"""llama.cpp pads the context, and each slot's share of it, to a multiple of this."""

_LAYER: Final = re.compile(r"^blk\.(\d+)\.")
# gguf-split's part names (llama.cpp's llama_split_path): PREFIX-00001-of-00003.gguf.
_SPLIT_NAME: Final = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
# Architectures whose sliding-window (SWA) layers llama.cpp b11434 knows by a fixed pattern
# (src/models/<arch>.cpp: load_swa_pattern(ml, n)): every n-th layer is full attention, the
# others SWA; a file's own {arch}.attention.sliding_window_pattern wins. (pattern, window when
# the file gives none; 0: the model has no SWA layers without a window in the file).
_SWA_PATTERNS: Final[Mapping[str, tuple[int, int]]] = {
    "gemma2": (2, 4096),
    "gemma3": (6, 0),
    "cohere2": (4, 0),
    "gpt-oss": (2, 0),
    "olmo2": (4, 0),
}
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
    """The file (``None`` for a hand-built shape); the first part of a split model."""
    file_size: int
    """Size in bytes (header + tensor data), of every part together for a split model."""
    architecture: str
    """``general.architecture``: ``llama``, ``qwen2``, ``gemma3`` ..."""
    name: str | None
    """``general.name``, if the file has one."""
    file_type: str | None
    """llama.cpp's name for ``general.file_type`` (``Q4_K_M``, ``F16`` ...)."""
    parameter_count: int
    """Sum of the element counts of every tensor (every expert of a MoE model)."""
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
    """Sliding-window size of the SWA layers (``swa_layers``), if the model has any."""
    swa_layers: tuple[bool, ...] = ()
    """Per layer, whether llama.cpp gives it a sliding-window KV cache (``sliding_window`` +
    ``n_ubatch`` cells per slot instead of the whole context). From the file's
    ``attention.sliding_window_pattern``, else llama.cpp's fixed pattern for gemma2, gemma3,
    cohere2, gpt-oss and olmo2. Empty when there are none, or when llama.cpp's pattern for
    the architecture is not known here: every layer is then planned at full size."""
    expert_count: int = 0
    """Experts per MoE layer (``{arch}.expert_count``); 0 for a dense model."""
    expert_used_count: int = 0
    """Experts each token goes through (``{arch}.expert_used_count``); 0 for a dense model."""
    expert_feed_forward_length: int | None = None
    """FFN length of one expert (``{arch}.expert_feed_forward_length``), if the file says."""
    mla: bool = False
    """Multi-head latent attention (DeepSeek-V2/V3, Kimi: ``attention.key_length_mla``):
    llama.cpp caches only the compressed K rows (``head_dim_k`` wide), no V."""
    split_count: int = 1
    """Files the model is split into (``split.count``; 1 for a single file)."""
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

    def kv_row_bytes(self, cache_type_k: str = "f16", cache_type_v: str | None = None) -> int:
        """KV cache bytes of one layer for one token (one cell): a K row and a V row.

        The K row holds ``head_count_kv * head_dim_k`` elements and the V row
        ``head_count_kv * head_dim_v`` of the cache type (``f16``: 2 bytes each; ``q8_0``:
        34 bytes per 32; ``q4_0``: 18 bytes per 32). An MLA model has no V row.
        """
        k = cache_type_bytes(cache_type_k, self.head_count_kv * self.head_dim_k)
        if self.mla:
            return k
        return k + cache_type_bytes(
            cache_type_v or cache_type_k, self.head_count_kv * self.head_dim_v
        )

    def kv_bytes_per_token(self, cache_type_k: str = "f16", cache_type_v: str | None = None) -> int:
        """KV cache bytes per token of context over all layers, each at full size.

        ``block_count * kv_row_bytes(...)``. For a model with sliding-window layers this is
        the cost with ``--swa-full``; ``kv_cache_bytes`` gives the real total.
        """
        return self.block_count * self.kv_row_bytes(cache_type_k, cache_type_v)

    def kv_cells_by_layer(
        self,
        ctx_size: int,
        n_parallel: int = 1,
        *,
        ubatch_size: int = 512,
        swa_full: bool = False,
    ) -> tuple[int, ...]:
        """KV cells llama.cpp allocates for each layer with ``-c ctx_size -np n_parallel``.

        A full-attention layer gets ``kv_cells(ctx_size, n_parallel)``; a sliding-window
        layer (``swa_layers``) gets, per slot, ``pad(min(ctx per slot, sliding_window +
        ubatch_size), 256)`` (llama-kv-cache-iswa.cpp), unless ``swa_full``.
        """
        full = kv_cells(ctx_size, n_parallel)
        if swa_full or not self.sliding_window or not any(self.swa_layers):
            return (full,) * self.block_count
        per_slot = min(full // n_parallel, self.sliding_window + ubatch_size)
        swa = _pad(per_slot, KV_CELL_ALIGN) * n_parallel
        flags = self.swa_layers
        return tuple(
            swa if il < len(flags) and flags[il] else full for il in range(self.block_count)
        )

    def kv_cache_bytes(
        self,
        ctx_size: int,
        n_parallel: int = 1,
        *,
        cache_type_k: str = "f16",
        cache_type_v: str | None = None,
        ubatch_size: int = 512,
        swa_full: bool = False,
    ) -> int:
        """The whole KV cache llama-server allocates for ``-c ctx_size -np n_parallel``.

        ```python
        info.kv_cache_bytes(8192, 4, cache_type_k="q8_0")  # bytes, over every layer
        ```
        """
        row = self.kv_row_bytes(cache_type_k, cache_type_v)
        cells = self.kv_cells_by_layer(
            ctx_size, n_parallel, ubatch_size=ubatch_size, swa_full=swa_full
        )
        return row * sum(cells)

    def summary(self) -> str:
        """One line: name, architecture, size, quantization, shape."""
        params = _human_count(self.parameter_count)
        moe = (
            f", {self.expert_used_count} of {self.expert_count} experts"
            if self.expert_count
            else ""
        )
        return (
            f"{self.name or (self.path.name if self.path else 'model')} ({self.architecture}, "
            f"{params} params, {self.file_type or '?'}, {human_bytes(self.weight_bytes)}): "
            f"{self.block_count} layers, {self.head_count} heads / {self.head_count_kv} KV "
            f"of {self.head_dim_k}, embd {self.embedding_length}, ctx {self.context_length}, "
            f"vocab {self.vocab_size}{moe}"
        )


def kv_cells(ctx_size: int, n_parallel: int) -> int:
    """KV cells llama.cpp allocates for ``-c ctx_size -np n_parallel`` (non-unified cache).

    ``n_ctx = pad(ctx, 256)``; each slot gets ``pad(n_ctx / np, 256)``; cells = slots x that.
    """
    n_ctx = _pad(ctx_size, KV_CELL_ALIGN)
    per_slot = _pad(n_ctx // n_parallel, KV_CELL_ALIGN)
    return per_slot * n_parallel


def _pad(value: int, align: int) -> int:
    return -(-value // align) * align


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
    """The blocking body of ``inspect_model``: parse ``path`` with ``gguf.GGUFReader``.

    For the first part of a split model (``x-00001-of-00003.gguf``) every part is read; the
    others must sit beside it under gguf-split's names.
    """
    import gguf

    file = Path(path)
    shown = os.fspath(file)
    reader, size = _open(file, shown, missing=None)
    try:
        fields: Mapping[str, Any] = reader.fields
        split_no = _scalar(fields, gguf.Keys.Split.LLM_KV_SPLIT_NO)
        split_count = _scalar(fields, gguf.Keys.Split.LLM_KV_SPLIT_COUNT)
        split_tensors = _scalar(fields, gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
        parts = _split_parts(file, shown, split_no, split_count)
        tensors = _Tensors()
        tensors.add(reader, shown, size)
        try:
            return _model_info(reader, file, parts, tensors, split_tensors)
        except (ValueError, IndexError, KeyError, TypeError, OverflowError) as exc:
            raise _format_error(shown, f"has unreadable metadata ({exc})") from exc
    finally:
        del reader  # drops the memory map now, not at the next garbage collection


def _open(file: Path, shown: str, *, missing: str | None) -> tuple[Any, int]:
    """A ``GGUFReader`` on ``file`` and the file's size; typed errors for what is wrong.

    ``missing``: the problem to report when the file does not exist (a split model's part),
    ``None`` for ``ModelNotFoundError``. Errors always name ``shown``, the file asked for.
    """
    import gguf

    def error(problem: str) -> ModelFormatError:
        if file == Path(shown):
            return _format_error(shown, problem)
        return _format_error(shown, f"is split, and its part {file} {problem}")

    try:
        size = file.stat().st_size
    except FileNotFoundError:
        if missing is not None:
            raise _format_error(shown, missing) from None
        raise ModelNotFoundError(
            f"no model file at {shown}; pass the path of a .gguf file", model=shown, tried=[shown]
        ) from None
    except OSError as exc:
        raise error(f"cannot be read ({exc.strerror or exc})") from exc
    if not file.is_file():
        raise error("is not a regular file (a directory?)")
    if size == 0:
        raise error("is empty (0 bytes)")
    try:
        with file.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise error(f"cannot be read ({exc.strerror or exc})") from exc
    if magic != b"GGUF":
        raise error(f"is not a GGUF file (it starts with {magic!r}, a GGUF file with b'GGUF')")
    try:
        return gguf.GGUFReader(file, "r"), size
    except OSError as exc:
        raise error(f"cannot be read ({exc.strerror or exc})") from exc
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError) as exc:
        # GGUFReader indexes a memory map: a short file gives empty slices, which surface as
        # IndexError or as ValueError from numpy's view/reshape. Either way the file is bad.
        problem = str(exc)
        unknown = _UNKNOWN_TYPE.search(problem)
        if unknown is not None:
            # A tensor type newer than the gguf package: the file is fine, the reader is old.
            raise error(
                f"uses ggml tensor type {unknown.group(1)}, which the installed gguf package "
                f"({_gguf_version()}) does not know: upgrade it (pip install -U gguf), or "
                "start the engine with auto_configure=False"
            ) from exc
        if "version" in problem:
            raise error(f"has an unsupported GGUF version ({problem})") from exc
        raise error(
            f"is truncated or corrupt: its header or tensor table is unreadable ({problem})"
        ) from exc


_UNKNOWN_TYPE: Final = re.compile(r"(\d+)\)? is not a valid GGMLQuantizationType")


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"gguf {version('gguf')}"
    except PackageNotFoundError:
        return "gguf, version unknown"


def _scalar(fields: Mapping[str, Any], key: str) -> int | None:
    entry = fields.get(key)
    if entry is None or len(entry.types) != 1:
        return None
    value = entry.contents()
    return int(value) if isinstance(value, int) else None


def _split_parts(file: Path, shown: str, split_no: int | None, count: int | None) -> list[Path]:
    """The other parts of a split model whose first part is ``file`` (``[]`` if not split)."""
    if not count or count <= 1:
        return []
    match = _SPLIT_NAME.match(file.name)
    if split_no:
        first = (
            file.with_name(f"{match.group('prefix')}-00001-of-{count:05d}.gguf") if match else None
        )
        raise _format_error(
            shown,
            f"is part {split_no + 1} of {count} of a split model; pass its first part"
            + (f" ({first})" if first else ""),
        )
    if match is None or int(match.group("count")) != count:
        raise _format_error(
            shown,
            f"is the first of {count} parts of a split model, but its name does not end in "
            f"-00001-of-{count:05d}.gguf, by which llama.cpp finds the other parts",
        )
    prefix = match.group("prefix")
    return [file.with_name(f"{prefix}-{i:05d}-of-{count:05d}.gguf") for i in range(2, count + 1)]


class _Tensors:
    """Exact tensor bytes, per layer, per type, input and output, added up over the parts."""

    def __init__(self) -> None:
        self.layers: dict[int, int] = {}
        self.types: dict[str, list[int]] = {}
        self.names: set[str] = set()
        self.input_bytes = self.output_bytes = self.params = self.count = self.size = 0

    def add(self, reader: Any, shown: str, size: int) -> None:
        """Count ``reader``'s tensors; the file (``size`` bytes) must hold all of their data."""
        import gguf

        data_end = 0
        for tensor in reader.tensors:
            name = str(tensor.name)
            self.names.add(name)
            n_elements, n_bytes = int(tensor.n_elements), int(tensor.n_bytes)
            self.params += n_elements
            data_end = max(data_end, int(tensor.data_offset) + n_bytes)
            kind = gguf.GGMLQuantizationType(tensor.tensor_type).name
            stats = self.types.setdefault(kind, [0, 0, 0])
            stats[0] += 1
            stats[1] += n_elements
            stats[2] += n_bytes
            match = _LAYER.match(name)
            if match:
                index = int(match.group(1))
                self.layers[index] = self.layers.get(index, 0) + n_bytes
            elif name.startswith(_INPUT_PREFIXES):
                self.input_bytes += n_bytes
            else:
                self.output_bytes += n_bytes
        if data_end > size:
            raise _format_error(
                shown,
                f"is truncated: its tensors need {data_end} bytes but the file has {size}",
            )
        self.count += len(reader.tensors)
        self.size += size


def with_adapters(model: ModelInfo, adapters: Sequence[str | os.PathLike[str]]) -> ModelInfo:
    """``model`` with the weights of LoRA ``adapters`` added where llama.cpp puts them. Blocking.

    llama.cpp loads each adapter tensor (``blk.N.<weight>.lora_a`` / ``.lora_b``) on the
    device of the weight it adapts, so each layer grows by its adapters' bytes.
    """
    if not adapters:
        return model
    layers = list(model.layer_bytes)
    input_bytes, output_bytes = model.input_bytes, model.output_bytes
    for adapter in adapters:
        file = Path(adapter)
        shown = os.fspath(file)
        reader, size = _open(file, shown, missing=None)
        try:
            tensors = _Tensors()
            tensors.add(reader, shown, size)
        finally:
            del reader
        for index, nbytes in tensors.layers.items():
            layers.extend([0] * (index + 1 - len(layers)))
            layers[index] += nbytes
        input_bytes += tensors.input_bytes
        output_bytes += tensors.output_bytes
    return dataclasses.replace(
        model, layer_bytes=tuple(layers), input_bytes=input_bytes, output_bytes=output_bytes
    )


def _format_error(path: str, problem: str) -> ModelFormatError:
    return ModelFormatError(
        f"{path} {problem}; check the file (download it again, or re-convert it)",
        model=path,
        problem=problem,
    )


def _model_info(
    reader: Any, file: Path, parts: list[Path], tensors: _Tensors, split_tensors: int | None
) -> ModelInfo:
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
            return entry.contents()  # a per-layer array (head counts, ff lengths, SWA flags)
        return entry.contents()

    arch = value("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise _format_error(shown, "has no general.architecture (is it a GGUF model file?)")
    if value("general.type") == "adapter":
        raise _format_error(
            shown,
            "is an adapter (general.type=adapter), not a model; load it with --lora on a model",
        )

    # The other parts of a split model hold tensors only; the first one holds the metadata.
    for part in parts:
        part_reader, part_size = _open(
            part, shown, missing=f"is split, but its part {part} is missing: put every part "
            "in the same folder"
        )  # fmt: skip
        try:
            tensors.add(part_reader, shown, part_size)
        finally:
            del part_reader
    if split_tensors is not None and parts and tensors.count != split_tensors:
        raise _format_error(
            shown,
            f"is split, and its parts hold {tensors.count} tensors where it says "
            f"{split_tensors} (split.tensors.count): a part is from another model or corrupt",
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

    layers = tensors.layers
    block_count = count("block_count", len(layers))
    embd = count("embedding_length")
    heads = count("attention.head_count")
    kv_heads = count("attention.head_count_kv", heads)
    head_k = count("attention.key_length", embd // heads if heads else 0)
    head_v = count("attention.value_length", head_k)
    ff = count("feed_forward_length")
    mla = bool(count("attention.key_length_mla") and count("attention.value_length_mla"))

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
    window, swa_layers = _swa(arch, value, count, block_count)
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
        file_size=tensors.size,
        architecture=arch,
        name=name if isinstance(name, str) else None,
        file_type=_file_type_name(ftype_raw),
        parameter_count=tensors.params,
        tensor_count=tensors.count,
        tensor_types={
            name: TensorTypeStats(count=c, elements=e, nbytes=b)
            for name, (c, e, b) in sorted(tensors.types.items())
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
        sliding_window=window,
        swa_layers=swa_layers,
        expert_count=count("expert_count"),
        expert_used_count=count("expert_used_count"),
        expert_feed_forward_length=count("expert_feed_forward_length") or None,
        mla=mla,
        split_count=len(parts) + 1,
        layer_bytes=tuple(layers.get(i, 0) for i in range(max([block_count - 1, *layers]) + 1)),
        input_bytes=tensors.input_bytes,
        output_bytes=tensors.output_bytes,
        tied_embeddings="output.weight" not in tensors.names,
        metadata=metadata,
    )


def _swa(
    arch: str, value: Callable[[str], Any], count: Callable[..., int], n_layer: int
) -> tuple[int | None, tuple[bool, ...]]:
    """(sliding window, per-layer SWA flags) as llama.cpp reads them for ``arch``.

    Flags only for the architectures of ``_SWA_PATTERNS``: for others llama.cpp's rules are
    not known here, so their layers are planned at full size (more memory, never less).
    """
    window = count("attention.sliding_window") or None
    known = _SWA_PATTERNS.get(arch)
    if known is None:
        return window, ()
    default_pattern, default_window = known
    window = window or default_window or None
    if window is None:
        return None, ()
    raw = value(f"{arch}.attention.sliding_window_pattern")
    if isinstance(raw, list):
        flags = tuple(bool(x) for x in raw[:n_layer])
        return window, flags + (False,) * (n_layer - len(flags))
    pattern = int(raw) if isinstance(raw, int) else default_pattern
    # llama_hparams::set_swa_pattern(n, dense_first=false): the last of every n is full.
    return window, tuple(pattern == 0 or il % pattern < pattern - 1 for il in range(n_layer))


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
