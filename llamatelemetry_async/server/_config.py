"""ServerConfig and ServerPlan: a pure, typed description of one llama-server, and argv + env.

Nothing here spawns a process. ``server_command`` turns a config, a model and a plan (which
GPUs the server gets) into the exact argv and environment for the child:

```python
config = ServerConfig(ctx_size=4096, n_parallel=8, api_key="s3cret")
argv, env = server_command(
    config, binary="llama-server", model="m.gguf", plan=ServerPlan("gpu0+1", (0, 1), (0.6, 0.4))
)
# argv: llama-server --model m.gguf --host 127.0.0.1 --port 0 --n-gpu-layers all
#       --ctx-size 4096 --parallel 8 --tensor-split 0.6,0.4 --metrics --slots
# env:  ...os.environ, CUDA_VISIBLE_DEVICES=0,1, CUDA_DEVICE_ORDER=PCI_BUS_ID,
#       LLAMA_API_KEY=s3cret (the key never appears in argv)
```

Flag names are those of llama.cpp build 11434 (``llama-server --help``); a test runs the real
binary's ``--help`` and checks every flag this module can emit, so the names cannot rot.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

from .._errors import ConfigError

__all__ = [
    "CACHE_TYPES",
    "UNQUANTIZED_CACHE_TYPES",
    "ServerConfig",
    "ServerPlan",
    "core_ranges",
    "describe_cores",
    "server_affinity",
    "server_command",
]

FlashAttn: TypeAlias = Literal["on", "off", "auto"]
SplitMode: TypeAlias = Literal["none", "layer", "row", "tensor"]
Pooling: TypeAlias = Literal["none", "mean", "cls", "last", "rank"]
CacheType: TypeAlias = Literal[
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"
]

# The values this llama.cpp build accepts (its --help lists them).
FLASH_ATTN_VALUES: Final = ("on", "off", "auto")
SPLIT_MODES: Final = ("none", "layer", "row", "tensor")
POOLING_TYPES: Final = ("none", "mean", "cls", "last", "rank")
CACHE_TYPES: Final = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
# Quantized V caches need flash attention: llama.cpp refuses to create the context with
# flash_attn off ("quantized V cache requires flash_attn to be enabled").
UNQUANTIZED_CACHE_TYPES: Final = frozenset({"f32", "f16", "bf16"})

#: llama-server reads the API key from this variable (``--api-key``'s env in common/arg.cpp).
API_KEY_ENV: Final = "LLAMA_API_KEY"

# Every spelling llama-server accepts for a flag that a ServerConfig field, the model or the
# placement owns. extra_args may not repeat them: llama-server would take the last one and
# warn, so the typed field would silently lose. The test checks each one against --help.
_OWNED_FLAGS: Final[Mapping[str, str]] = {
    "-m": "model",
    "--model": "model",
    "--host": "host",
    "--port": "port",
    "-ngl": "n_gpu_layers",
    "--gpu-layers": "n_gpu_layers",
    "--n-gpu-layers": "n_gpu_layers",
    "-c": "ctx_size",
    "--ctx-size": "ctx_size",
    "-np": "n_parallel",
    "--parallel": "n_parallel",
    "-b": "batch_size",
    "--batch-size": "batch_size",
    "-ub": "ubatch_size",
    "--ubatch-size": "ubatch_size",
    "-t": "threads",
    "--threads": "threads",
    "-tb": "threads_batch",
    "--threads-batch": "threads_batch",
    "--poll": "poll",
    "-fa": "flash_attn",
    "--flash-attn": "flash_attn",
    "-ctk": "cache_type_k",
    "--cache-type-k": "cache_type_k",
    "-ctv": "cache_type_v",
    "--cache-type-v": "cache_type_v",
    "-sm": "split_mode",
    "--split-mode": "split_mode",
    "-ts": "tensor_split",
    "--tensor-split": "tensor_split",
    "-mg": "main_gpu",
    "--main-gpu": "main_gpu",
    "--embedding": "embeddings",
    "--embeddings": "embeddings",
    "--pooling": "pooling",
    "--rerank": "reranking",
    "--reranking": "reranking",
    "--metrics": "metrics",
    "--slots": "slots_endpoint",
    "--no-slots": "slots_endpoint",
    "--props": "props",
    "--slot-save-path": "slot_save_path",
    "--lora": "lora",
    "--lora-scaled": "lora",
    "--lora-init-without-apply": "lora_init_without_apply",
    "--api-key": "api_key",
}

# Environment variables the placement or the config owns; extra_env may not set them.
_OWNED_ENV: Final[Mapping[str, str]] = {
    API_KEY_ENV: "api_key",
    "CUDA_VISIBLE_DEVICES": "the placement (ServerPlan.gpus)",
}


def _fail(field: str, message: str) -> ConfigError:
    return ConfigError(f"{field}: {message}", field=field)


def _check_int(field: str, value: object, *, minimum: int, meaning: str = "") -> None:
    # bool is an int subclass; True as a size is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(field, f"must be an int >= {minimum}{meaning}, got {value!r}")
    if value < minimum:
        raise _fail(field, f"must be >= {minimum}{meaning}, got {value}")


def _check_choice(field: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise _fail(field, f"must be one of {', '.join(allowed)}; got {value!r}")


def _check_split(field: str, value: object) -> tuple[float, ...]:
    """Validate a tensor split and return it as a tuple (lists are accepted)."""
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) == 0:
        raise _fail(field, f"must be a non-empty tuple of positive proportions, got {value!r}")
    for entry in value:
        if isinstance(entry, bool) or not isinstance(entry, int | float):
            raise _fail(field, f"entries must be numbers, got {entry!r}")
        if not math.isfinite(entry) or entry <= 0:
            raise _fail(
                field,
                f"entries must be positive proportions (e.g. (0.6, 0.4) or (3, 1)), got {entry!r}; "
                "leave a GPU out of the placement instead of giving it 0",
            )
    return tuple(float(entry) for entry in value)


def _check_cores(value: object, field: str = "cpu_affinity") -> tuple[int, ...]:
    """CPU core ids as a sorted tuple without repeats (lists and sets are accepted)."""
    if isinstance(value, str) or not isinstance(value, Sequence | Set):
        raise _fail(field, f"must be CPU core ids (ints >= 0), got {value!r}")
    for core in value:
        _check_int(field, core, minimum=0, meaning=" (a CPU core id)")
    return tuple(sorted(set(value)))


def _normalise_flag(token: str) -> str:
    # llama-server turns '_' into '-' in long flags, so --ctx_size is --ctx-size.
    return token.replace("_", "-") if token.startswith("--") else token


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerConfig:
    """How one llama-server runs: every field is optional, ``None`` means llama-server's default.

    Invalid values raise ``ConfigError`` naming the field, before anything is spawned:

    ```python
    ServerConfig(ctx_size=8192, n_parallel=4, flash_attn="on", cache_type_k="q8_0")
    ServerConfig(batch_size=256, ubatch_size=512)  # ConfigError: ubatch_size: must be <= ...
    ```

    ``port=0`` (the default) lets llama-server bind a free port itself and log it, so there
    is no window in which another process can take the port. ``api_key`` reaches the server
    through the environment (``LLAMA_API_KEY``), never through argv, where any local user
    could read it in ``ps``. Placement-related fields (``n_gpu_layers``, ``tensor_split``,
    ``split_mode``, ``main_gpu``) are refined by the ``ServerPlan`` a server runs on.
    """

    n_gpu_layers: int | Literal["auto", "all"] | None = None
    """Layers offloaded to the GPU(s): a count, ``"auto"`` or ``"all"`` (``--n-gpu-layers``).

    ``None`` means ``"all"`` on a GPU plan; a CPU plan always runs ``0``."""
    ctx_size: int | None = None
    """Total context in tokens, shared by the slots; 0 = the model's own (``--ctx-size``)."""
    n_parallel: int | None = None
    """Number of slots, i.e. requests decoded at once (``--parallel``)."""
    batch_size: int | None = None
    """Logical maximum batch size (``--batch-size``)."""
    ubatch_size: int | None = None
    """Physical maximum batch size, at most ``batch_size`` (``--ubatch-size``)."""
    threads: int | None = None
    """CPU threads for generation (``--threads``).

    ``None`` under an engine: the engine's share of the cores for this server (see
    ``ServerPlan.cores``); a bare ``LlamaServer``: llama-server's default, every core."""
    threads_batch: int | None = None
    """CPU threads for prompt processing (``--threads-batch``); ``None``: as ``threads``."""
    cpu_affinity: tuple[int, ...] | None = None
    """CPU cores the whole server process is pinned to (every thread it starts).

    ``None``: the engine's share of the cores when it divides them (and ``threads`` is
    unset), else not pinned; ``()``: never pinned. Linux only (elsewhere it is ignored)."""
    poll: int | None = None
    """How hard idle worker threads poll for work, 0 (sleep at once) to 100 (``--poll``).

    ``None``: llama-server's 50, or 0 where the engine had to put servers on shared cores
    (a polling thread steals the core from the server beside it)."""
    flash_attn: FlashAttn | None = None
    """Flash attention: on, off or auto (``--flash-attn``)."""
    cache_type_k: CacheType | None = None
    """KV cache type for K (``--cache-type-k``)."""
    cache_type_v: CacheType | None = None
    """KV cache type for V (``--cache-type-v``); quantized types need flash attention."""
    split_mode: SplitMode | None = None
    """How a multi-GPU server splits the model (``--split-mode``); the plan's wins."""
    tensor_split: tuple[float, ...] | None = None
    """Proportions per GPU of the plan (``--tensor-split``); the plan's wins."""
    main_gpu: int | None = None
    """GPU index inside the plan (0..k-1, after CUDA_VISIBLE_DEVICES) (``--main-gpu``)."""
    embeddings: bool = False
    """Restrict the server to embeddings (``--embeddings``)."""
    pooling: Pooling | None = None
    """Embedding pooling (``--pooling``)."""
    reranking: bool = False
    """Enable the rerank endpoint (``--reranking``; implies rank pooling)."""
    metrics: bool = True
    """Serve Prometheus ``/metrics`` (``--metrics``)."""
    slots_endpoint: bool = True
    """Serve ``/slots`` (``--slots`` / ``--no-slots``)."""
    props: bool = False
    """Allow changing global properties with POST ``/props`` (``--props``)."""
    slot_save_path: str | None = None
    """Directory for saved slot KV caches (``--slot-save-path``)."""
    lora: tuple[str | tuple[str, float], ...] = ()
    """LoRA adapters to load: paths (``--lora``) or ``(path, scale)`` pairs (``--lora-scaled``;
    a plain path among them gets scale 1).

    Their ids, in this order, are what ``AsyncEngine.set_lora_adapters`` takes."""
    lora_init_without_apply: bool = False
    """Load the adapters with scale 0, to be switched on later (``--lora-init-without-apply``)."""
    api_key: str | None = dataclasses.field(default=None, repr=False)
    """Bearer key the server requires; passed as ``LLAMA_API_KEY``, never on argv."""
    port: int = 0
    """TCP port; 0 lets llama-server pick a free one and log it (``--port``)."""
    host: str = "127.0.0.1"
    """Address to bind (``--host``)."""
    extra_args: tuple[str, ...] = ()
    """More llama-server arguments, appended after the typed ones.

    One string (``"--no-repack --seed 7"``) is split like a shell would."""
    extra_env: tuple[tuple[str, str], ...] = ()
    """More environment variables for the child, as ``(name, value)`` pairs."""

    def __post_init__(self) -> None:
        # Accept lists where tuples are declared, so a literal from JSON or YAML works and
        # the frozen instance stays hashable.
        if isinstance(self.tensor_split, list):
            object.__setattr__(self, "tensor_split", tuple(self.tensor_split))
        if isinstance(self.extra_args, str):
            # One string is split like a shell would: iterating it would pass one character
            # per argument and slip owned flags past the check below.
            try:
                split = shlex.split(self.extra_args)
            except ValueError as exc:  # an unclosed quote
                # Not echoed: the string may hold a secret.
                raise _fail("extra_args", f"cannot split it like a shell: {exc}") from None
            object.__setattr__(self, "extra_args", tuple(split))
        elif isinstance(self.extra_args, list):
            object.__setattr__(self, "extra_args", tuple(self.extra_args))
        object.__setattr__(self, "lora", _lora_entries(self.lora))
        if isinstance(self.extra_env, list | dict):
            pairs = self.extra_env.items() if isinstance(self.extra_env, dict) else self.extra_env
            object.__setattr__(self, "extra_env", tuple(tuple(pair) for pair in pairs))
        self._validate()

    def _validate(self) -> None:
        ngl = self.n_gpu_layers
        if ngl is not None and ngl not in ("auto", "all"):
            _check_int("n_gpu_layers", ngl, minimum=0, meaning=', "auto" or "all"')
        if self.ctx_size is not None:
            _check_int("ctx_size", self.ctx_size, minimum=0, meaning=" (0 = the model's own)")
        if self.n_parallel is not None:
            _check_int("n_parallel", self.n_parallel, minimum=1)
        if self.batch_size is not None:
            _check_int("batch_size", self.batch_size, minimum=1)
        if self.ubatch_size is not None:
            _check_int("ubatch_size", self.ubatch_size, minimum=1)
            if self.batch_size is not None and self.ubatch_size > self.batch_size:
                raise _fail(
                    "ubatch_size",
                    f"must be <= batch_size ({self.batch_size}), got {self.ubatch_size}",
                )
        for name in ("threads", "threads_batch"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        if self.poll is not None:
            _check_int("poll", self.poll, minimum=0)
            if self.poll > 100:
                raise _fail("poll", f"is a level from 0 to 100, got {self.poll}")
        if self.cpu_affinity is not None:
            object.__setattr__(self, "cpu_affinity", _check_cores(self.cpu_affinity))
        if self.flash_attn is not None:
            _check_choice("flash_attn", self.flash_attn, FLASH_ATTN_VALUES)
        if self.cache_type_k is not None:
            _check_choice("cache_type_k", self.cache_type_k, CACHE_TYPES)
        if self.cache_type_v is not None:
            _check_choice("cache_type_v", self.cache_type_v, CACHE_TYPES)
            if self.flash_attn == "off" and self.cache_type_v not in UNQUANTIZED_CACHE_TYPES:
                raise _fail(
                    "cache_type_v",
                    f"a quantized V cache ({self.cache_type_v}) needs flash attention; "
                    'set flash_attn="on" or "auto", or use f16/bf16/f32',
                )
        if self.split_mode is not None:
            _check_choice("split_mode", self.split_mode, SPLIT_MODES)
            _check_tensor_flash(self.split_mode, self.flash_attn)
        if self.tensor_split is not None:
            _check_split("tensor_split", self.tensor_split)
        if self.main_gpu is not None:
            _check_int("main_gpu", self.main_gpu, minimum=0)
        if self.pooling is not None:
            _check_choice("pooling", self.pooling, POOLING_TYPES)
            if self.reranking and self.pooling != "rank":
                raise _fail(
                    "pooling",
                    'reranking uses rank pooling; leave pooling unset or "rank", '
                    f"got {self.pooling!r}",
                )
        for name in ("embeddings", "reranking", "metrics", "slots_endpoint", "props"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, f"must be True or False, got {getattr(self, name)!r}")
        if self.slot_save_path is not None and (
            not isinstance(self.slot_save_path, str) or not self.slot_save_path
        ):
            raise _fail("slot_save_path", f"must be a non-empty path, got {self.slot_save_path!r}")
        self._validate_api_key()
        self._validate_address()
        self._validate_extra()

    def _validate_api_key(self) -> None:
        key = self.api_key
        if key is None:
            return
        # llama-server splits the value as CSV into several keys, and HTTP trims the
        # Authorization header: such characters would give a key the client cannot present.
        if (
            not isinstance(key, str)
            or not key
            or any(ch in key for ch in ',"')
            or any(ch.isspace() or not ch.isprintable() for ch in key)
        ):
            raise _fail(
                "api_key",
                "must be a non-empty printable string without spaces, commas or quotes "
                "(the value is not shown)",
            )

    def _validate_address(self) -> None:
        _check_int("port", self.port, minimum=0, meaning=" (0 = a free port)")
        if self.port > 65535:
            raise _fail("port", f"must be 0..65535 (0 = a free port), got {self.port}")
        host = self.host
        if not isinstance(host, str) or not host or any(ch.isspace() for ch in host):
            raise _fail("host", f"must be a non-empty address without spaces, got {host!r}")
        if "," in host and self.port == 0:
            # llama-server refuses --port 0 with several TCP addresses.
            raise _fail("host", "several addresses need a fixed port; set port or use one host")

    def _validate_extra(self) -> None:
        for token in self.extra_args:
            if not isinstance(token, str):
                raise _fail("extra_args", f"must be strings, got {token!r}")
            flag = _normalise_flag(token)
            if flag == "--api-key" or flag.startswith("--api-key="):
                raise _fail(
                    "extra_args",
                    "--api-key on the command line is visible to every local user (ps); "
                    "use ServerConfig(api_key=...), which passes it through the environment",
                )
            owner = _OWNED_FLAGS.get(flag)
            if owner is not None:
                where = (
                    "server_command's model argument"
                    if owner == "model"
                    else f"ServerConfig.{owner}"
                )
                raise _fail("extra_args", f"{token} is set through {where}; use that instead")
        for pair in self.extra_env:
            if (
                not isinstance(pair, tuple)
                or len(pair) != 2
                or not all(isinstance(part, str) for part in pair)
            ):
                raise _fail("extra_env", f"must be (name, value) string pairs, got {pair!r}")
            name = pair[0]
            if not name or "=" in name or "\0" in name or "\0" in pair[1]:
                raise _fail("extra_env", f"invalid environment variable name {name!r}")
            owner = _OWNED_ENV.get(name)
            if owner is not None:
                raise _fail("extra_env", f"{name} is set through {owner}; use that instead")

    def replace(self, **changes: Any) -> ServerConfig:
        """A copy with ``changes`` applied, validated again.

        ```python
        bigger = config.replace(ctx_size=16384)
        ```
        """
        return dataclasses.replace(self, **changes)


def _check_tensor_flash(split_mode: str, flash_attn: str | None) -> None:
    # llama.cpp: "SPLIT_MODE_TENSOR requires flash_attn to be enabled" (auto turns it on).
    if split_mode == "tensor" and flash_attn == "off":
        raise _fail(
            "split_mode", 'split_mode "tensor" needs flash attention; set flash_attn "on" or "auto"'
        )


@dataclass(frozen=True, slots=True)
class ServerPlan:
    """Where one server runs: its name and the GPUs it gets (none = CPU).

    ``gpus`` are physical ids (NVML order); the server sees them as 0..k-1 through
    ``CUDA_VISIBLE_DEVICES``. ``tensor_split`` and ``split_mode`` override the config's.

    ```python
    ServerPlan("gpu0", (0,))
    ServerPlan("gpu0+1", (0, 1), tensor_split=(0.6, 0.4), split_mode="layer")
    ServerPlan("cpu0", ())
    ```
    """

    name: str
    gpus: tuple[int, ...]
    tensor_split: tuple[float, ...] | None = None
    split_mode: str | None = None
    cores: tuple[int, ...] = ()
    """The CPU cores the server is given (``Placement.plans(..., cores=...)`` divides them);
    ``()``: not pinned, any core."""
    threads: int | None = None
    """Threads for its share of the cores; the config's ``threads`` wins."""
    poll: int | None = None
    """Polling level for its worker threads (0 on shared cores); the config's ``poll`` wins."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise _fail("name", f"a plan needs a non-empty name, got {self.name!r}")
        if isinstance(self.gpus, list):
            object.__setattr__(self, "gpus", tuple(self.gpus))
        object.__setattr__(self, "cores", _check_cores(self.cores, "cores"))
        if self.threads is not None:
            _check_int("threads", self.threads, minimum=1)
        if self.poll is not None:
            _check_int("poll", self.poll, minimum=0)
        for gpu in self.gpus:
            _check_int("gpus", gpu, minimum=0, meaning=" (a GPU id)")
        if len(set(self.gpus)) != len(self.gpus):
            raise _fail("gpus", f"lists a GPU twice: {self.gpus}")
        if self.split_mode is not None:
            _check_choice("split_mode", self.split_mode, SPLIT_MODES)
        if self.tensor_split is not None:
            object.__setattr__(
                self, "tensor_split", _check_split("tensor_split", self.tensor_split)
            )
            _check_split_length(self.tensor_split, self.gpus, self.name)
        if not self.gpus and self.split_mode not in (None, "none"):
            raise _fail("split_mode", f"CPU plan {self.name!r} cannot split over GPUs")

    def __repr__(self) -> str:
        # Only what is set: plans are printed in logs and docs, mostly with few fields.
        extra = "".join(
            f", {f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)[2:]
            if getattr(self, f.name) != f.default
        )
        return f"ServerPlan({self.name!r}, {self.gpus!r}{extra})"


def _check_split_length(split: Sequence[float], gpus: Sequence[int], name: str) -> None:
    if not gpus:
        raise _fail(
            "tensor_split",
            f"plan {name!r} runs on the CPU; a tensor split needs GPUs (use a GPU placement)",
        )
    if len(split) != len(gpus):
        raise _fail(
            "tensor_split",
            f"has {len(split)} entries but plan {name!r} has {len(gpus)} GPU(s) {tuple(gpus)}; "
            "give one proportion per GPU",
        )


def _format_float(value: float) -> str:
    # 0.6 -> "0.6", 3.0 -> "3": the shortest text that round-trips, no exponent for sane values.
    return format(value, "g")


def _lora_entries(value: object) -> tuple[str | tuple[str, float], ...]:
    """``lora`` as a tuple of paths and ``(path, scale)`` pairs; one path alone is accepted."""
    items = [value] if isinstance(value, str | os.PathLike) else value
    if not isinstance(items, list | tuple):
        raise _fail("lora", f"expected paths or (path, scale) pairs, got {value!r}")
    entries: list[str | tuple[str, float]] = []
    for item in items:
        if isinstance(item, str | os.PathLike):
            entries.append(os.fspath(item))
        elif (
            isinstance(item, list | tuple)
            and len(item) == 2
            and isinstance(item[0], str | os.PathLike)
            and isinstance(item[1], int | float)
            and not isinstance(item[1], bool)
        ):
            entries.append((os.fspath(item[0]), float(item[1])))
        else:
            raise _fail("lora", f"expected a path or a (path, scale) pair, got {item!r}")
    scaled = any(not isinstance(entry, str) for entry in entries)
    for entry in entries:
        # llama-server splits the list at ',' and each scaled entry at ':'.
        path = entry if isinstance(entry, str) else entry[0]
        if "," in path or (scaled and ":" in path):
            bad = "',' or ':'" if scaled else "','"
            raise _fail(
                "lora",
                f"llama-server cannot take an adapter path with {bad} in it: {path!r} "
                "(rename or link the file)",
            )
    return tuple(entries)


def server_command(
    config: ServerConfig,
    *,
    binary: str | os.PathLike[str],
    model: str | os.PathLike[str],
    plan: ServerPlan,
    base_env: Mapping[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The argv and the complete environment for one llama-server child. Pure: spawns nothing.

    argv is ``binary --model MODEL --host HOST --port PORT`` followed by one flag per set
    field, then ``config.extra_args``. The environment is built in this order:

    1. ``base_env`` (default: a copy of ``os.environ``), without inherited ``LLAMA_ARG_*``
       and ``LLAMA_API_KEY``: llama-server reads those as defaults for every flag, so a
       stray one in the parent would silently change a server this config describes.
    2. The placement: a GPU plan sets ``CUDA_VISIBLE_DEVICES`` to its GPU ids (the server
       sees them as 0..k-1) and ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so that CUDA numbers GPUs as
       NVML does; a CPU plan sets ``CUDA_VISIBLE_DEVICES=""``.
    3. ``config.extra_env``.
    4. ``LLAMA_API_KEY`` when ``config.api_key`` is set (nothing can override it).

    Placement rules: a GPU plan offloads all layers unless ``n_gpu_layers`` says otherwise,
    and its ``tensor_split`` / ``split_mode`` win over the config's; a tensor split must have
    one entry per GPU of the plan. A CPU plan always runs ``--n-gpu-layers 0 --device none``
    (whatever ``n_gpu_layers`` and ``main_gpu`` say, so that one config serves every
    placement) and refuses a tensor split or a split mode other than ``none``.

    Raises ``ConfigError`` naming the field when config and plan do not fit together.
    """
    ngl, split_mode, tensor_split, main_gpu = _placement_flags(config, plan)

    argv = [os.fspath(binary), "--model", os.fspath(model)]
    argv += ["--host", config.host, "--port", str(config.port)]
    argv += ["--n-gpu-layers", str(ngl)]
    if not plan.gpus:
        # CUDA_VISIBLE_DEVICES="" hides CUDA GPUs only; --device none also keeps other
        # backends (Vulkan, Metal) of a multi-backend build from offloading anything.
        argv += ["--device", "none"]
    _add(argv, "--ctx-size", config.ctx_size)
    _add(argv, "--parallel", config.n_parallel)
    _add(argv, "--batch-size", config.batch_size)
    _add(argv, "--ubatch-size", config.ubatch_size)
    _add(argv, "--threads", config.threads if config.threads is not None else plan.threads)
    _add(argv, "--threads-batch", config.threads_batch)
    _add(argv, "--poll", config.poll if config.poll is not None else plan.poll)
    _add(argv, "--flash-attn", config.flash_attn)
    _add(argv, "--cache-type-k", config.cache_type_k)
    _add(argv, "--cache-type-v", config.cache_type_v)
    _add(argv, "--split-mode", split_mode)
    if tensor_split is not None:
        argv += ["--tensor-split", ",".join(_format_float(x) for x in tensor_split)]
    _add(argv, "--main-gpu", main_gpu)
    if config.embeddings:
        argv.append("--embeddings")
    _add(argv, "--pooling", config.pooling)
    if config.reranking:
        argv.append("--reranking")
    if config.metrics:
        argv.append("--metrics")
    # Said explicitly either way: older llama-server builds had /slots off by default.
    argv.append("--slots" if config.slots_endpoint else "--no-slots")
    if config.props:
        argv.append("--props")
    _add(argv, "--slot-save-path", config.slot_save_path)
    if config.lora:
        # One list, in the config's order (the adapters' ids): b11434 keeps only the last of
        # a repeated --lora, and takes scaled adapters as PATH:SCALE.
        if all(isinstance(adapter, str) for adapter in config.lora):
            argv += ["--lora", ",".join(str(adapter) for adapter in config.lora)]
        else:
            argv += [
                "--lora-scaled",
                ",".join(
                    f"{adapter}:1" if isinstance(adapter, str)
                    else f"{adapter[0]}:{_format_float(adapter[1])}"
                    for adapter in config.lora
                ),
            ]  # fmt: skip
    if config.lora_init_without_apply:
        argv.append("--lora-init-without-apply")
    argv += config.extra_args

    source = os.environ if base_env is None else base_env
    env = {
        name: value
        for name, value in source.items()
        if not name.startswith("LLAMA_ARG_") and name != API_KEY_ENV
    }
    if plan.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu) for gpu in plan.gpus)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(config.extra_env)
    if config.api_key is not None:
        env[API_KEY_ENV] = config.api_key
    return argv, env


def server_affinity(config: ServerConfig, plan: ServerPlan) -> tuple[int, ...]:
    """The CPU cores ``config`` on ``plan`` pins its server's process to (``()``: none).

    The config's ``cpu_affinity`` wins; else the plan's cores, unless the config sets its
    own ``threads``: a thread count chosen for other cores would crowd the plan's share.
    """
    if config.cpu_affinity is not None:
        return config.cpu_affinity
    return plan.cores if config.threads is None else ()


def core_ranges(cores: Iterable[int]) -> str:
    """``{0, 1, 2, 5}`` as ``"0-2,5"``, as taskset and /proc write core lists."""
    runs: list[list[int]] = []
    for core in sorted(cores):
        if runs and core == runs[-1][1] + 1:
            runs[-1][1] = core
        else:
            runs.append([core, core])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)


def describe_cores(config: ServerConfig, plan: ServerPlan) -> str:
    """How ``config`` on ``plan`` uses the CPU, in words: ``"2 threads on cores 0-1"``."""
    threads = config.threads if config.threads is not None else plan.threads
    cores = server_affinity(config, plan)
    counted = f"{threads} thread{'s' if threads != 1 else ''}" if threads else "default threads"
    where = (
        f"on core{'s' if len(cores) != 1 else ''} {core_ranges(cores)}" if cores else "on any core"
    )
    poll = config.poll if config.poll is not None else plan.poll
    return f"{counted} {where}" + (f", poll {poll}" if poll is not None else "")


def _add(argv: list[str], flag: str, value: object) -> None:
    if value is not None:
        argv += [flag, str(value)]


def _placement_flags(
    config: ServerConfig, plan: ServerPlan
) -> tuple[int | str, str | None, tuple[float, ...] | None, int | None]:
    """Resolve (n_gpu_layers, split_mode, tensor_split, main_gpu) for ``config`` on ``plan``."""
    split_mode = plan.split_mode if plan.split_mode is not None else config.split_mode
    tensor_split = plan.tensor_split if plan.tensor_split is not None else config.tensor_split
    if not plan.gpus:
        if tensor_split is not None:
            _check_split_length(tensor_split, plan.gpus, plan.name)
        if split_mode not in (None, "none"):
            raise _fail(
                "split_mode",
                f"plan {plan.name!r} runs on the CPU; split_mode {split_mode!r} needs GPUs "
                '(leave it unset or "none", or use a GPU placement)',
            )
        # split_mode "none" on a CPU changes nothing; leaving it out keeps argv minimal.
        return 0, None, None, None
    if tensor_split is not None:
        _check_split_length(tensor_split, plan.gpus, plan.name)
    if split_mode is not None:
        _check_tensor_flash(split_mode, config.flash_attn)
    if config.main_gpu is not None and config.main_gpu >= len(plan.gpus):
        raise _fail(
            "main_gpu",
            f"is an index inside the plan (0..{len(plan.gpus) - 1} for plan {plan.name!r}, "
            f"GPUs {plan.gpus}), got {config.main_gpu}",
        )
    ngl: int | str = "all" if config.n_gpu_layers is None else config.n_gpu_layers
    return ngl, split_mode, tensor_split, config.main_gpu
