"""VRAM planning: which layers, how much context and how many slots fit each server's GPUs.

``plan(model_info, gpus, ...)`` places a model the way llama.cpp will, byte for byte where
llama.cpp is exact and with a stated, conservative estimate where it is not:

- **Weights**: exact, per layer, from the GGUF's tensors. With ``n_gpu_layers = k`` llama.cpp
  offloads the *last* ``k`` of the ``n_layer + 1`` layers (the ``+ 1`` is the output layer:
  ``output.weight`` and ``output_norm``, or the token embeddings again when they are tied).
  The token embeddings themselves always stay on the CPU. Over a GPU pair (layer split) the
  offloaded layers go to the GPUs by the cumulative tensor split, as ``llama-model.cpp`` does
  (``upper_bound(splits, i / n_offloaded)``, in float32). A row split spreads each matrix's
  rows over the pair by the split; a tensor split spreads the weights and the KV cache.
- **KV cache**: exact. Per offloaded layer and per cell, a K row of
  ``n_kv_heads * head_dim_k`` and a V row of ``n_kv_heads * head_dim_v`` elements of the
  cache type (``f16``: 2 bytes; ``q8_0``: 34 bytes per 32; ``q4_0``: 18 bytes per 32; an
  MLA model has no V row), on the layer's own GPU (layer and row splits).
  llama-server's ``-c`` is the *total* context shared by the ``-np`` slots: llama.cpp pads it
  to a multiple of 256, gives each slot ``pad(c / np, 256)`` cells, so the cache holds
  ``np * pad(pad(c, 256) / np, 256)`` cells (``kv_cells``). A sliding-window layer
  (``ModelInfo.swa_layers``) holds ``np * pad(min(c / np, window + n_ubatch), 256)`` cells
  instead, unless ``swa_full``.
- **Compute buffer** (estimate, see ``compute_buffer_bytes``): float32 activations of one
  micro-batch: ``4 * n_ubatch * (n_vocab + 3 * n_embd + 2 * n_ff)`` bytes (the logits and the
  widest activations; for MoE the chosen experts' too), plus the attention score matrix
  ``4 * n_ubatch * n_head * n_ctx_per_slot`` when flash attention is off, plus an f16 copy of
  one layer's K and V when the cache is quantized. Counted in full on every GPU of a server.
  Measured for comparison: Llama-3-8B, ubatch 512, flash attention: llama.cpp's CUDA compute
  buffer is 258.5 MiB; this formula gives 330 MiB.
- **CUDA overhead**: ``CUDA_OVERHEAD_BYTES`` (400 MiB) per GPU for the CUDA context, cuBLAS
  workspace and llama.cpp's small buffers.

```python
info = await inspect_model("Meta-Llama-3-8B-Instruct-Q4_K_M.gguf")
t4 = [GPUSpec(0, "Tesla T4", 15360 * MiB), GPUSpec(1, "Tesla T4", 15360 * MiB)]
vram = plan(info, t4)                        # one server per GPU
print(vram.explain())
vram = plan(info, t4, placement=Placement.kaggle_t4x2_pair("60/40"), ctx_size=16384)
config = vram.servers[0].apply(ServerConfig())  # n_gpu_layers, ctx_size, n_parallel filled
```
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

from .._errors import ConfigError, ModelDoesNotFitError
from .._placement import Placement
from ..gpu import read_gpu_memory
from ..server import CACHE_TYPES, UNQUANTIZED_CACHE_TYPES, ServerConfig, ServerPlan
from ._gguf import (
    KV_CELL_ALIGN,
    ModelInfo,
    TensorTypeStats,
    human_bytes,
    kv_cells,
)

__all__ = [
    "CUDA_OVERHEAD_BYTES",
    "DEFAULT_N_PARALLEL",
    "DEFAULT_UBATCH",
    "KV_CELL_ALIGN",
    "MIN_AUTO_CONTEXT",
    "MIN_SLOT_CONTEXT",
    "DeviceUse",
    "GPUSpec",
    "ServerVRAMPlan",
    "VRAMPlan",
    "compute_buffer_bytes",
    "kv_cells",
    "model_shape",
    "plan",
    "probe_gpu_specs",
    "read_gpu_specs",
]

MiB: Final = 2**20
GiB: Final = 2**30

CUDA_OVERHEAD_BYTES: Final = 400 * MiB
"""Reserved on every GPU of a server: CUDA context, cuBLAS workspace, llama.cpp's small
buffers (a CUDA context alone takes ~250-300 MiB on a T4 with CUDA 12)."""
DEFAULT_UBATCH: Final = 512
"""llama-server's default ``--ubatch-size``."""
DEFAULT_N_PARALLEL: Final = 4
"""Slots when ``n_parallel`` is unset: llama-server's own automatic count."""
MIN_SLOT_CONTEXT: Final = 1024
"""An unset ``n_parallel`` is lowered so that each slot keeps at least this much context."""
MIN_AUTO_CONTEXT: Final = 2048
"""An unset ``ctx_size`` is never planned below this (or the model's own, if smaller): below
it the plan offloads fewer layers instead."""

NGL: TypeAlias = int | Literal["all"]

# Bits per weight of llama-quantize's common types, from its own table (file sizes of
# Llama-3-8B, 8.03e9 parameters): what a smaller quantization of a model would weigh.
_QUANT_BPW: Final[tuple[tuple[str, float], ...]] = (
    ("Q8_0", 8.52),
    ("Q6_K", 6.57),
    ("Q5_K_M", 5.70),
    ("Q4_K_M", 4.90),
    ("Q4_0", 4.64),
    ("Q3_K_M", 4.00),
    ("Q2_K", 3.17),
)


# Splits worth suggesting for a GPU pair whose own split does not fit (even first).
_PAIR_SPLITS: Final = ((0.5, 0.5), (0.6, 0.4), (0.4, 0.6), (0.7, 0.3), (0.3, 0.7))


@dataclass(frozen=True, slots=True)
class GPUSpec:
    """One GPU's memory, as the planner sees it.

    ``free_bytes`` (when known) is what the plan may use; otherwise ``total_bytes``. Kaggle's
    T4 reports 15360 MiB in total: ``GPUSpec(0, "Tesla T4", 15360 * 2**20)``.
    """

    index: int
    """Physical GPU id (NVML order), as in ``visible_gpus()`` and ``ServerPlan.gpus``."""
    name: str
    total_bytes: int
    free_bytes: int | None = None

    @property
    def available_bytes(self) -> int:
        """What a plan may use: free memory when known, else the total."""
        return self.total_bytes if self.free_bytes is None else self.free_bytes


@dataclass(frozen=True, slots=True)
class DeviceUse:
    """What a plan puts on one GPU, in bytes."""

    gpu: int
    name: str
    capacity_bytes: int
    """The memory the plan could use (``GPUSpec.available_bytes``)."""
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    overhead_bytes: int
    layers: int
    """Repeating layers on this GPU."""
    output_layer: bool
    """Whether the output layer is on this GPU."""

    @property
    def used_bytes(self) -> int:
        """Weights + KV cache + compute buffer + CUDA overhead."""
        return self.weights_bytes + self.kv_bytes + self.compute_bytes + self.overhead_bytes

    @property
    def free_bytes(self) -> int:
        """What is left of ``capacity_bytes`` (negative: it does not fit)."""
        return self.capacity_bytes - self.used_bytes

    @property
    def fits(self) -> bool:
        """Whether ``used_bytes`` stays within ``capacity_bytes``."""
        return self.used_bytes <= self.capacity_bytes


@dataclass(frozen=True, kw_only=True)
class ServerVRAMPlan:
    """The settings chosen for one server, and what they put on each of its GPUs."""

    server: ServerPlan
    n_gpu_layers: int
    """Offloaded layers, ``0 .. n_layers + 1`` (``n_layers + 1``: every layer and the output)."""
    n_layers: int
    ctx_size: int
    """Total context (``--ctx-size``), shared by the slots."""
    n_parallel: int
    """Slots (``--parallel``); each gets ``ctx_size / n_parallel`` tokens."""
    cache_type_k: str
    cache_type_v: str
    ubatch_size: int
    kv_bytes_per_token: int
    """KV cache bytes per token of context over all layers (GPU and CPU), each at full size
    (``ModelInfo.kv_bytes_per_token``; sliding-window layers hold less: ``devices``)."""
    devices: tuple[DeviceUse, ...]
    host_weights_bytes: int
    """Weights left in host memory (token embeddings, layers not offloaded)."""
    host_kv_bytes: int
    """KV cache of the layers not offloaded (in host memory)."""
    notes: tuple[str, ...] = ()
    """Why the plan is what it is (context capped, partial offload ...)."""

    @property
    def full_offload(self) -> bool:
        """Every layer, and the output layer, on the GPU(s)."""
        return self.n_gpu_layers > self.n_layers

    @property
    def ctx_per_slot(self) -> int:
        """Tokens of context each slot gets (llama-server splits ``ctx_size`` evenly)."""
        return self.ctx_size // self.n_parallel

    def config_overrides(self, config: ServerConfig | None = None) -> dict[str, Any]:
        """The ``ServerConfig`` fields this plan sets, for those ``config`` leaves unset.

        ``n_gpu_layers="auto"`` counts as unset: the plan's count replaces it, so that the
        server runs what the plan describes. A CPU server gets nothing: llama-server's
        defaults stand there.
        """
        if not self.server.gpus:
            return {}
        config = config if config is not None else ServerConfig()
        chosen = {
            "n_gpu_layers": self.n_gpu_layers,
            "ctx_size": self.ctx_size,
            "n_parallel": self.n_parallel,
        }
        return {
            name: value
            for name, value in chosen.items()
            if getattr(config, name) is None or getattr(config, name) == "auto"
        }

    def apply(self, config: ServerConfig) -> ServerConfig:
        """``config`` with its unset ``n_gpu_layers``, ``ctx_size`` and ``n_parallel`` filled."""
        return config.replace(**self.config_overrides(config))

    def summary(self) -> str:
        """One line: layers, context, slots, and memory per GPU."""
        name = self.server.name
        if not self.devices:
            return f"{name}: CPU, ctx {self.ctx_size} ({self.n_parallel} slots)"
        layers = (
            f"all {self.n_layers} layers + output"
            if self.full_offload
            else f"{self.n_gpu_layers} of {self.n_layers + 1} layers (partial offload)"
        )
        use = ", ".join(
            f"GPU {d.gpu} {human_bytes(d.used_bytes)}/{human_bytes(d.capacity_bytes)}"
            for d in self.devices
        )
        return (
            f"{name}: {layers}, ctx {self.ctx_size} ({self.n_parallel} slots of "
            f"{self.ctx_per_slot}), KV {self.cache_type_k}/{self.cache_type_v}; {use}"
        )

    def explain(self) -> str:
        """Several lines: the summary, then each GPU's bytes, then the notes."""
        lines = [self.summary()]
        for d in self.devices:
            where = f"{d.layers} layers" + (" + output" if d.output_layer else "")
            lines.append(
                f"  GPU {d.gpu} ({d.name}): {where}: weights {human_bytes(d.weights_bytes)}"
                f" + KV {human_bytes(d.kv_bytes)} + compute {human_bytes(d.compute_bytes)}"
                f" + CUDA {human_bytes(d.overhead_bytes)} = {human_bytes(d.used_bytes)}"
                f" of {human_bytes(d.capacity_bytes)} ({human_bytes(d.free_bytes)} left)"
            )
        if self.devices:
            lines.append(
                f"  host memory: weights {human_bytes(self.host_weights_bytes)}"
                f" + KV {human_bytes(self.host_kv_bytes)}"
            )
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True, kw_only=True)
class VRAMPlan:
    """One ``ServerVRAMPlan`` per server of a placement."""

    model: ModelInfo
    servers: tuple[ServerVRAMPlan, ...]

    def server(self, name: str) -> ServerVRAMPlan:
        """The plan of the server called ``name`` (``"gpu0"``, ``"gpu0+1"`` ...).

        Raises ``KeyError`` (naming the servers there are) for a name the plan does not have.
        """
        for server in self.servers:
            if server.server.name == name:
                return server
        names = ", ".join(repr(s.server.name) for s in self.servers)
        raise KeyError(f"no server {name!r} in this plan; its servers: {names}")

    def summary(self) -> str:
        """One line per server, joined with ``"; "``: fit for a log line."""
        return "; ".join(server.summary() for server in self.servers)

    def explain(self) -> str:
        """The model, then every server's ``explain()``."""
        return "\n".join([self.model.summary(), *(s.explain() for s in self.servers)])


# ------------------------------------------------------------------------------ arithmetic


def compute_buffer_bytes(
    model: ModelInfo,
    *,
    ubatch_size: int = DEFAULT_UBATCH,
    ctx_per_slot: int = 0,
    flash_attn: str | None = None,
    cache_type_k: str = "f16",
    cache_type_v: str | None = None,
) -> int:
    """A conservative estimate of llama.cpp's compute buffer on one GPU, in bytes.

    ``4 * ubatch * (n_vocab + 3 * n_embd + 2 * n_ff)``: float32 logits of a micro-batch and
    its widest activations (residual, normed input, attention output; FFN gate and up). For a
    MoE model ``n_ff`` is at least ``n_expert_used * n_ff_expert`` (the chosen experts' gate
    and up), plus ``4 * ubatch * (n_expert + n_expert_used * n_embd)`` for the router's
    logits and each chosen expert's output.
    Flash attention off (``flash_attn="off"``): ``+ 4 * ubatch * n_head * ctx_per_slot`` for
    the attention scores. A quantized cache: ``+ 2 * ctx_per_slot * (K + V row elements)``,
    an f16 copy of one layer's K and V. ``None``/``"auto"``/``"on"`` count as flash attention
    on: llama.cpp's ``auto`` turns it on for CUDA GPUs that support it (T4 onwards).
    """
    embd = model.embedding_length
    ff = model.feed_forward_length or 4 * embd
    moe = 0
    if model.expert_count and model.expert_used_count:
        expert_ff = model.expert_feed_forward_length or model.feed_forward_length or 4 * embd
        ff = max(ff, model.expert_used_count * expert_ff)
        moe = model.expert_count + model.expert_used_count * embd
    total = 4 * ubatch_size * (model.vocab_size + 3 * embd + 2 * ff + moe)
    if flash_attn == "off":
        total += 4 * ubatch_size * model.head_count * ctx_per_slot
    if {cache_type_k, cache_type_v or cache_type_k} - UNQUANTIZED_CACHE_TYPES:
        row_k = model.head_count_kv * model.head_dim_k
        row_v = 0 if model.mla else model.head_count_kv * model.head_dim_v
        total += 2 * ctx_per_slot * (row_k + row_v)
    return total


# ------------------------------------------------------------------------------ GPU specs


def read_gpu_specs(gpus: Iterable[int] | None = None, *, nvml: Any = None) -> list[GPUSpec]:
    """The memory of each GPU in ``gpus`` (default: all), read through NVML. Blocking.

    GPUs NVML cannot read are left out; no NVML (no driver, no ``pynvml``) gives ``[]``.
    Free memory is ``total - used`` from ``nvmlDeviceGetMemoryInfo``. ``nvml`` is the
    binding (default ``pynvml``; tests pass a fake). From async code::

        specs = await anyio.to_thread.run_sync(read_gpu_specs)
    """
    return probe_gpu_specs(gpus, nvml=nvml)[0]


def probe_gpu_specs(
    gpus: Iterable[int] | None = None, *, nvml: Any = None
) -> tuple[list[GPUSpec], str | None]:
    """``read_gpu_specs``, and why GPUs are missing from it (``None`` when none is). Blocking.

    The reason is for the caller to show (e.g. "NVML did not start (...)" beside a plan made
    without GPU memory figures). NVML is read by ``gpu.read_gpu_memory``.
    """
    memory, why = read_gpu_memory(gpus, nvml=nvml)
    specs = [
        GPUSpec(m.index, m.name, m.total_bytes, free_bytes=max(0, m.total_bytes - m.used_bytes))
        for m in memory
    ]
    return specs, why


def _coerce_gpus(gpus: Sequence[GPUSpec | int]) -> dict[int, GPUSpec]:
    specs: dict[int, GPUSpec] = {}
    for position, gpu in enumerate(gpus):
        if isinstance(gpu, GPUSpec):
            spec = gpu
        elif isinstance(gpu, int) and not isinstance(gpu, bool) and gpu > 0:
            spec = GPUSpec(position, f"GPU {position}", gpu)
        else:
            raise ConfigError(
                f"gpus: each entry is a GPUSpec or a memory size in bytes (> 0), got {gpu!r}",
                field="gpus",
            )
        if spec.index in specs:
            raise ConfigError(f"gpus: GPU {spec.index} is listed twice", field="gpus")
        specs[spec.index] = spec
    return specs


# ------------------------------------------------------------------------------ hand shapes


def model_shape(
    *,
    n_layer: int,
    n_embd: int,
    n_head: int,
    n_ff: int,
    n_vocab: int,
    n_ctx_train: int,
    n_head_kv: int | None = None,
    head_dim: int | None = None,
    weight_type: str = "Q4_K",
    output_type: str | None = None,
    tied_embeddings: bool = False,
    name: str | None = None,
    file_type: str | None = None,
) -> ModelInfo:
    """A ``ModelInfo`` for a llama-shaped model given by its hyperparameters, without a file.

    Every matrix is ``weight_type`` (a ggml type: ``Q4_K``, ``Q4_0``, ``Q8_0``, ``F16`` ...),
    the output matrix ``output_type`` (default: the same), norms ``F32``. Per layer:
    ``attn_q`` (n_embd x n_head*head_dim), ``attn_k`` and ``attn_v`` (n_embd x
    n_head_kv*head_dim), ``attn_output``, ``ffn_gate``/``ffn_up``/``ffn_down`` (n_embd x
    n_ff), two norms of n_embd. So 7B/13B/70B-like shapes plan without big files:

    ```python
    llama2_7b = model_shape(n_layer=32, n_embd=4096, n_head=32, n_ff=11008,
                            n_vocab=32000, n_ctx_train=4096, weight_type="Q4_0")
    ```
    """
    import gguf

    kv_heads = n_head if n_head_kv is None else n_head_kv
    hd = n_embd // n_head if head_dim is None else head_dim
    out_type = weight_type if output_type is None else output_type
    types: dict[str, list[int]] = {}

    def tensor(kind: str, rows: int, cols: int) -> int:
        """Bytes of a ``rows`` x ``cols`` tensor (ggml: ne0 = cols), counted under ``kind``."""
        qtype = _ggml_type(kind)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = rows * -(-cols // block) * size
        stats = types.setdefault(qtype.name, [0, 0, 0])
        stats[0] += 1
        stats[1] += rows * cols
        stats[2] += nbytes
        return int(nbytes)

    layer_bytes = []
    for _ in range(n_layer):
        layer_bytes.append(
            tensor("F32", 1, n_embd)
            + tensor("F32", 1, n_embd)
            + tensor(weight_type, n_head * hd, n_embd)
            + tensor(weight_type, kv_heads * hd, n_embd)
            + tensor(weight_type, kv_heads * hd, n_embd)
            + tensor(weight_type, n_embd, n_head * hd)
            + tensor(weight_type, n_ff, n_embd)
            + tensor(weight_type, n_ff, n_embd)
            + tensor(weight_type, n_embd, n_ff)
        )
    input_bytes = tensor(weight_type, n_vocab, n_embd)
    output_bytes = tensor("F32", 1, n_embd)
    if not tied_embeddings:
        output_bytes += tensor(out_type, n_vocab, n_embd)
    weight_bytes = sum(layer_bytes) + input_bytes + output_bytes
    return ModelInfo(
        path=None,
        file_size=weight_bytes,
        architecture="llama",
        name=name,
        file_type=file_type if file_type is not None else weight_type.upper(),
        parameter_count=sum(stats[1] for stats in types.values()),
        tensor_count=sum(stats[0] for stats in types.values()),
        tensor_types={k: TensorTypeStats(*v) for k, v in sorted(types.items())},
        context_length=n_ctx_train,
        block_count=n_layer,
        head_count=n_head,
        head_count_kv=kv_heads,
        head_dim_k=hd,
        head_dim_v=hd,
        embedding_length=n_embd,
        feed_forward_length=n_ff,
        vocab_size=n_vocab,
        layer_bytes=tuple(layer_bytes),
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        tied_embeddings=tied_embeddings,
    )


def _ggml_type(name: str) -> Any:
    import gguf

    try:
        return gguf.GGMLQuantizationType[name.upper()]
    except KeyError:
        raise ConfigError(
            f"weight_type: unknown ggml type {name!r} (Q4_K, Q4_0, Q8_0, F16 ...)",
            field="weight_type",
        ) from None


# ------------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class _Settings:
    """Everything that shapes a server's memory, except the layers and the context."""

    cache_type_k: str
    cache_type_v: str
    ubatch: int
    flash_attn: str | None
    min_ctx: int
    allow_partial: bool
    swa_full: bool = False


class _Layout:
    """Assigns layers to a server's GPUs and adds up the bytes (llama.cpp's rules)."""

    def __init__(
        self, model: ModelInfo, server: ServerPlan, specs: Sequence[GPUSpec], s: _Settings
    ) -> None:
        import numpy as np

        self.model = model
        self.server = server
        self.specs = specs
        self.s = s
        self.n_layer = model.block_count
        self.kv_row = model.kv_row_bytes(s.cache_type_k, s.cache_type_v)
        self.mode = server.split_mode or "layer"
        if server.tensor_split is not None:
            proportions = list(server.tensor_split)
        else:  # llama.cpp's default split: by free memory
            proportions = [float(spec.available_bytes) for spec in specs]
        # llama.cpp sums and normalises the split in float32; so do we, so that the layer
        # boundaries land where llama.cpp puts them.
        cumulative = np.cumsum(np.asarray(proportions, dtype=np.float32), dtype=np.float32)
        self.splits = [float(x) for x in cumulative / cumulative[-1]]
        self.fractions = [p / sum(proportions) for p in proportions]

    def layer_weights(self, il: int) -> int:
        if il == self.n_layer:
            return self.model.output_device_bytes
        return self.model.layer_bytes[il] if il < len(self.model.layer_bytes) else 0

    def devices(self, ngl: int, ctx: int, n_parallel: int) -> tuple[list[DeviceUse], int, int]:
        """(per-GPU use, host weight bytes, host KV bytes) for ``ngl`` layers and ``ctx``."""
        import numpy as np

        cells = self.model.kv_cells_by_layer(
            ctx, n_parallel, ubatch_size=self.s.ubatch, swa_full=self.s.swa_full
        )
        n = len(self.specs)
        weights = [0] * n
        kv = [0] * n
        layers = [0] * n
        output = [False] * n
        host_weights, host_kv = self.model.input_bytes, 0  # the input layer stays on the CPU
        i_start = max(self.n_layer + 1 - ngl, 0)
        act = min(ngl, self.n_layer + 1)
        for il in range(self.n_layer + 1):
            w = self.layer_weights(il)
            k = self.kv_row * cells[il] if il < self.n_layer else 0
            if il < i_start:
                host_weights += w if il < self.n_layer else self.model.output_bytes
                host_kv += k
                continue
            # llama-model.cpp: a layer's device is upper_bound(splits, i / n_offloaded), in
            # float32; the layer's KV cache lives there (llama-kv-cache.cpp: dev_layer(il)).
            x = float(np.float32(il - i_start) / np.float32(act))
            dev = min(bisect.bisect_right(self.splits, x), n - 1)
            if self.mode == "none":
                dev = 0  # everything on the main GPU (the plan's first)
            if self.mode in ("layer", "none") or n == 1:
                weights[dev] += w
                kv[dev] += k
                layers[dev] += il < self.n_layer
                output[dev] |= il == self.n_layer
                continue
            # Row and tensor split: every GPU holds a share of every layer's matrices, by the
            # proportions (an approximation: norms and biases stay whole on one GPU). A row
            # split keeps each layer's KV cache on the layer's own GPU, as a layer split does;
            # a tensor split shares the KV cache too.
            for other, fraction in enumerate(self.fractions):
                weights[other] += math.ceil(w * fraction)
                if self.mode == "tensor":
                    kv[other] += math.ceil(k * fraction)
                layers[other] += il < self.n_layer
                output[other] |= il == self.n_layer
            if self.mode == "row":
                kv[dev] += k
        compute = compute_buffer_bytes(
            self.model,
            ubatch_size=self.s.ubatch,
            ctx_per_slot=kv_cells(ctx, n_parallel) // n_parallel,
            flash_attn=self.s.flash_attn,
            cache_type_k=self.s.cache_type_k,
            cache_type_v=self.s.cache_type_v,
        )
        uses = [
            DeviceUse(
                gpu=spec.index,
                name=spec.name,
                capacity_bytes=spec.available_bytes,
                weights_bytes=weights[i],
                kv_bytes=kv[i],
                compute_bytes=compute,
                overhead_bytes=CUDA_OVERHEAD_BYTES,
                layers=layers[i],
                output_layer=output[i],
            )
            for i, spec in enumerate(self.specs)
        ]
        return uses, host_weights, host_kv

    def fits(self, ngl: int, ctx: int, n_parallel: int) -> bool:
        return all(d.fits for d in self.devices(ngl, ctx, n_parallel)[0])

    def max_layers(self, ctx: int, n_parallel: int) -> int:
        """The most layers that fit with ``ctx`` (0: not even one)."""
        for ngl in range(self.n_layer + 1, 0, -1):
            if self.fits(ngl, ctx, n_parallel):
                return ngl
        return 0

    def max_ctx(self, ngl: int, limit: int, n_parallel: int | None) -> int:
        """The largest context <= ``limit`` that fits with ``ngl`` layers, rounded down to
        whole slots of 256 cells (0: not even the smallest)."""

        def ok(ctx: int) -> bool:
            return self.fits(ngl, ctx, n_parallel or _slots(ctx, None))

        lo, hi = 0, max(limit, 0) // KV_CELL_ALIGN  # in units of 256 tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if ok(mid * KV_CELL_ALIGN):
                lo = mid
            else:
                hi = mid - 1
        best = lo * KV_CELL_ALIGN
        if best < limit and limit % KV_CELL_ALIGN and ok(limit):
            best = limit  # a model context that is no multiple of 256 (it is padded anyway)
        if best == 0:
            return 0
        slots = n_parallel or _slots(best, None)
        granule = KV_CELL_ALIGN * slots
        return best if best < granule else best // granule * granule


def _slots(ctx: int, n_parallel: int | None) -> int:
    if n_parallel is not None:
        return n_parallel
    return min(DEFAULT_N_PARALLEL, max(1, ctx // MIN_SLOT_CONTEXT))


def plan(
    model: ModelInfo,
    gpus: Sequence[GPUSpec | int],
    *,
    ctx_size: int | None = None,
    n_parallel: int | None = None,
    n_gpu_layers: NGL | Literal["auto"] | None = None,
    cache_type_k: str | None = None,
    cache_type_v: str | None = None,
    ubatch_size: int | None = None,
    flash_attn: str | None = None,
    swa_full: bool = False,
    placement: Placement | str | Sequence[ServerPlan] | None = None,
    min_ctx: int = MIN_AUTO_CONTEXT,
    allow_partial: bool = True,
    cache_type: str | None = None,
) -> VRAMPlan:
    """Choose ``n_gpu_layers``, ``ctx_size`` and ``n_parallel`` for every server of a placement.

    ``gpus``: a ``GPUSpec`` per GPU (``read_gpu_specs()`` reads them), or plain memory sizes
    in bytes for GPUs 0, 1, ... ``placement``: a ``Placement`` (default ``"auto"``: one server
    per GPU), or the ``ServerPlan`` list it resolved to. Settings given here are kept;
    for those left ``None`` (``n_gpu_layers="auto"`` too) the plan chooses, per server:

    - ``n_gpu_layers``: every layer and the output layer when they fit with at least
      ``min_ctx`` (2048) of context, else the most that fit (partial offload; with
      ``allow_partial=False`` that raises instead).
    - ``ctx_size``: the model's training context, capped to what fits, never below
      ``min_ctx`` (or the model's own context if smaller); a multiple of 256 per slot.
    - ``n_parallel``: 4 slots, fewer when a slot would get under 1024 tokens.

    ``cache_type_k`` and ``cache_type_v`` are the KV cache types, as in ``ServerConfig``
    (default ``f16``; V defaults to K's; ``cache_type`` is another name for ``cache_type_k``).
    ``swa_full`` plans sliding-window layers at full size, as llama-server's ``--swa-full``.
    Raises ``ModelDoesNotFitError`` when nothing fits; its ``suggestions`` say what would
    (a smaller context, a GPU pair, a smaller quantization, partial offload).
    """
    if cache_type is not None and cache_type_k is not None and cache_type != cache_type_k:
        raise ConfigError(
            f"cache_type: another name for cache_type_k; got both ({cache_type!r} and "
            f"{cache_type_k!r}): give one",
            field="cache_type",
        )
    settings = _settings(
        cache_type_k or cache_type or "f16",
        cache_type_v,
        ubatch_size,
        flash_attn,
        min_ctx,
        allow_partial,
        model,
        swa_full=swa_full,
        k_field="cache_type_k" if cache_type_k is not None else "cache_type",
    )
    _check_request(ctx_size, n_parallel, n_gpu_layers)
    specs = _coerce_gpus(gpus)
    servers = _server_plans(placement, list(specs))
    planned = []
    for server in servers:
        server_specs = [specs[gpu] for gpu in server.gpus]
        planned.append(
            _plan_server(
                model,
                server,
                server_specs,
                settings,
                ctx_size=ctx_size,
                n_parallel=n_parallel,
                n_gpu_layers=None if n_gpu_layers == "auto" else n_gpu_layers,
                all_specs=specs,
            )
        )
    return VRAMPlan(model=model, servers=tuple(planned))


def _settings(
    cache_k: str,
    cache_v: str | None,
    ubatch: int | None,
    flash_attn: str | None,
    min_ctx: int,
    allow_partial: bool,
    model: ModelInfo,
    *,
    swa_full: bool,
    k_field: str = "cache_type_k",
) -> _Settings:
    for field, value in ((k_field, cache_k), ("cache_type_v", cache_v)):
        if value is not None and value not in CACHE_TYPES:
            raise ConfigError(
                f"{field}: must be one of {', '.join(CACHE_TYPES)}; got {value!r}", field=field
            )
    for field, value, head_dim in (
        (k_field, cache_k, model.head_dim_k),
        ("cache_type_v", cache_v or cache_k, model.head_dim_v),
    ):
        if not _cache_fits_heads(value, head_dim):
            raise ConfigError(
                f"{field}: a {value} cache needs a head dimension that is a multiple of "
                f"{_block_size(value)}; this model's is {head_dim} (llama.cpp refuses it): "
                "use f16",
                field=field,
            )
    if ubatch is not None and (isinstance(ubatch, bool) or ubatch < 1):
        raise ConfigError(f"ubatch_size: must be an int >= 1, got {ubatch!r}", field="ubatch_size")
    if isinstance(min_ctx, bool) or not isinstance(min_ctx, int) or min_ctx < 1:
        raise ConfigError(f"min_ctx: must be an int >= 1, got {min_ctx!r}", field="min_ctx")
    return _Settings(
        cache_type_k=cache_k,
        cache_type_v=cache_v or cache_k,
        ubatch=ubatch or DEFAULT_UBATCH,
        flash_attn=flash_attn,
        min_ctx=min_ctx,
        allow_partial=allow_partial,
        swa_full=swa_full,
    )


def _block_size(cache_type: str) -> int:
    import gguf

    return int(gguf.GGML_QUANT_SIZES[_ggml_type(cache_type)][0])


def _cache_fits_heads(cache_type: str, head_dim: int) -> bool:
    """llama.cpp: "K cache type q8_0 with block size 32 does not divide n_embd_head_k=16"."""
    return head_dim == 0 or head_dim % _block_size(cache_type) == 0


def _check_request(
    ctx: int | None, n_parallel: int | None, ngl: NGL | Literal["auto"] | None
) -> None:
    for field, value, minimum in (("ctx_size", ctx, 0), ("n_parallel", n_parallel, 1)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < minimum
        ):
            raise ConfigError(f"{field}: must be an int >= {minimum}, got {value!r}", field=field)
    if (
        ngl is not None
        and ngl not in ("all", "auto")
        and (isinstance(ngl, bool) or not isinstance(ngl, int) or ngl < 0)
    ):
        raise ConfigError(
            f'n_gpu_layers: must be an int >= 0, "all" or "auto", got {ngl!r}',
            field="n_gpu_layers",
        )


def _server_plans(
    placement: Placement | str | Sequence[ServerPlan] | None, gpus: list[int]
) -> list[ServerPlan]:
    if placement is None or isinstance(placement, str):
        return Placement.coerce(placement or "auto").plans(gpus)
    if isinstance(placement, Placement):
        return placement.plans(gpus)
    plans: list[ServerPlan] = list(placement)
    for server in plans:
        missing = [gpu for gpu in server.gpus if gpu not in gpus]
        if missing:
            raise ConfigError(
                f"placement: server {server.name!r} uses GPU(s) {missing} but no memory "
                f"was given for them (gpus: {gpus})",
                field="placement",
            )
    return plans


def _plan_server(
    model: ModelInfo,
    server: ServerPlan,
    specs: Sequence[GPUSpec],
    s: _Settings,
    *,
    ctx_size: int | None,
    n_parallel: int | None,
    n_gpu_layers: NGL | None,
    all_specs: Mapping[int, GPUSpec],
) -> ServerVRAMPlan:
    n_layer = model.block_count
    full = n_layer + 1
    train = model.context_length or s.min_ctx
    floor = min(s.min_ctx, train)
    notes: list[str] = []
    kv_per_token = model.kv_bytes_per_token(s.cache_type_k, s.cache_type_v)

    def result(ngl: int, ctx: int, slots: int, layout: _Layout | None) -> ServerVRAMPlan:
        if layout is not None:
            devices, host_w, host_kv = layout.devices(ngl, ctx, slots)
        else:
            host_kv = model.kv_row_bytes(s.cache_type_k, s.cache_type_v) * sum(
                model.kv_cells_by_layer(ctx, slots, ubatch_size=s.ubatch, swa_full=s.swa_full)
            )
            devices, host_w = [], model.weight_bytes
        return ServerVRAMPlan(
            server=server,
            n_gpu_layers=ngl,
            n_layers=n_layer,
            ctx_size=ctx,
            n_parallel=slots,
            cache_type_k=s.cache_type_k,
            cache_type_v=s.cache_type_v,
            ubatch_size=s.ubatch,
            kv_bytes_per_token=kv_per_token,
            devices=tuple(devices),
            host_weights_bytes=host_w,
            host_kv_bytes=host_kv,
            notes=tuple(notes),
        )

    if not specs:  # a CPU server: nothing to fit, llama-server's defaults stand
        ctx = ctx_size or train
        notes.append("runs on the CPU: no VRAM to plan")
        return result(0, ctx, _slots(ctx, n_parallel), None)
    layout = _Layout(model, server, specs, s)

    wanted_ngl = None if n_gpu_layers is None else full if n_gpu_layers == "all" else n_gpu_layers
    wanted_ngl = None if wanted_ngl is None else min(wanted_ngl, full)

    def does_not_fit(reason: str, ctx: int) -> ModelDoesNotFitError:
        # Not even the CUDA context and compute buffer fit: no setting of the model helps.
        bare = [d for d in layout.devices(0, KV_CELL_ALIGN, 1)[0] if not d.fits]
        if bare:
            d = bare[0]
            reason = (
                f"GPU {d.gpu} has {human_bytes(d.capacity_bytes)} free, less than the "
                f"{human_bytes(d.used_bytes)} llama.cpp needs on it before any layer (CUDA "
                f"context and workspaces {human_bytes(d.overhead_bytes)}, compute buffer "
                f"{human_bytes(d.compute_bytes)})"
            )
            suggestions = [
                f"free memory on GPU {d.gpu} (another process holds it; nvidia-smi shows which)",
                "the CPU: Placement.cpu()",
            ]
        else:
            suggestions = _suggestions(
                model, server, specs, s, layout, ctx=ctx, n_parallel=n_parallel,
                ngl=wanted_ngl, all_specs=all_specs,
            )  # fmt: skip
        where = ", ".join(f"GPU {g.index} ({human_bytes(g.available_bytes)})" for g in specs)
        text = "; ".join(suggestions) if suggestions else "nothing smaller fits either"
        return ModelDoesNotFitError(
            f"{_model_name(model)} does not fit server {server.name} on {where}: {reason}. "
            f"What would fit: {text}",
            model=_model_name(model),
            suggestions=suggestions,
        )

    def partial(ngl: int, ctx: int) -> None:
        notes.append(
            f"partial offload: {ngl} of {full} layers fit with ctx_size={ctx}; "
            "the rest run on the CPU (slower)"
        )
        others = _suggestions(
            model, server, specs, s, layout, ctx=ctx, n_parallel=n_parallel, ngl=None,
            all_specs=all_specs,
        )  # fmt: skip
        notes.extend(
            f"every layer would fit with {text}"
            for text in others
            if not text.startswith(("n_gpu_layers=", "ctx_size="))
        )

    if ctx_size is not None:
        ctx = ctx_size or train  # 0 = the model's own context, as for llama-server
        slots = _slots(ctx, n_parallel)
        if wanted_ngl is not None:
            if not layout.fits(wanted_ngl, ctx, slots):
                raise does_not_fit(f"{wanted_ngl} layers with ctx_size={ctx} need more", ctx)
            return result(wanted_ngl, ctx, slots, layout)
        ngl = layout.max_layers(ctx, slots)
        if ngl == 0 or (ngl < full and not s.allow_partial):
            raise does_not_fit(f"ctx_size={ctx} with all {n_layer} layers needs more", ctx)
        if ngl < full:
            partial(ngl, ctx)
        return result(ngl, ctx, slots, layout)

    ngl = full if wanted_ngl is None else wanted_ngl
    ctx = layout.max_ctx(ngl, train, n_parallel)
    if ctx >= floor:
        if ctx < train:
            notes.append(
                f"context capped at {ctx} by GPU memory (the model was trained on {train})"
            )
        return result(ngl, ctx, _slots(ctx, n_parallel), layout)
    if wanted_ngl is not None:
        raise does_not_fit(f"{wanted_ngl} layers leave room for less than {floor} tokens", floor)
    # Full offload leaves less than the floor of context: keep the floor, offload fewer layers.
    slots = _slots(floor, n_parallel)
    granule = KV_CELL_ALIGN * slots
    ctx = floor if floor < granule else floor // granule * granule
    ngl = layout.max_layers(ctx, slots)
    if ngl == 0 or not s.allow_partial:
        raise does_not_fit(f"all {n_layer} layers with ctx_size={ctx} need more", ctx)
    partial(ngl, ctx)
    return result(ngl, ctx, slots, layout)


def _suggestions(
    model: ModelInfo,
    server: ServerPlan,
    specs: Sequence[GPUSpec],
    s: _Settings,
    layout: _Layout,
    *,
    ctx: int,
    n_parallel: int | None,
    ngl: int | None,
    all_specs: Mapping[int, GPUSpec],
) -> list[str]:
    """What would fit instead, most useful first."""
    full = model.block_count + 1
    slots = _slots(ctx, n_parallel)
    out: list[str] = []
    target_ngl = full if ngl is None else ngl
    smaller = layout.max_ctx(target_ngl, ctx - 1, n_parallel) if ctx > 1 else 0
    if smaller > 0:
        what = "all layers" if target_ngl == full else f"{target_ngl} layers"
        out.append(f"ctx_size={smaller} (the largest context that fits with {what} on the GPU)")
    if (
        s.cache_type_k == "f16"
        and s.cache_type_v == "f16"
        and model.head_count_kv
        and _cache_fits_heads("q8_0", model.head_dim_k)
        and _cache_fits_heads("q8_0", model.head_dim_v)
    ):
        q8 = dataclasses.replace(s, cache_type_k="q8_0", cache_type_v="q8_0")
        if _Layout(model, server, specs, q8).fits(target_ngl, ctx, slots):
            out.append(
                f'cache_type_k="q8_0", cache_type_v="q8_0" with flash_attn="on" '
                f"(half the KV cache; ctx_size={ctx} fits)"
            )
    if len(server.gpus) == 1:
        others = [g for g in all_specs.values() if g.index != server.gpus[0]]
        if others:
            a, b = sorted((server.gpus[0], others[0].index))
            pair = (a, b)
            pair_plan = ServerPlan(f"gpu{pair[0]}+{pair[1]}", pair)
            pair_specs = [all_specs[pair[0]], all_specs[pair[1]]]
            if _Layout(model, pair_plan, pair_specs, s).fits(full, ctx, slots):
                out.append(
                    f"a GPU pair: Placement.pairs([{pair}]) (one server on both GPUs, the "
                    f"layers split between them) fits all layers with ctx_size={ctx}"
                )
    if len(server.gpus) == 2:
        for split in _PAIR_SPLITS:
            if split == server.tensor_split:
                continue
            resplit = dataclasses.replace(server, tensor_split=split)
            if _Layout(model, resplit, specs, s).fits(full, ctx, slots):
                out.append(
                    f"another split of the pair: tensor_split={split} (Placement.pairs("
                    f"[{server.gpus}], tensor_split={split})) fits all layers with ctx_size={ctx}"
                )
                break
    current = model.bits_per_weight
    for quant, bpw in _QUANT_BPW:
        if not current or bpw >= current * 0.97:
            continue
        lighter = _scaled(model, bpw / current)
        if _Layout(lighter, server, specs, s).fits(full, ctx, slots):
            out.append(
                f"a smaller quantization: {quant} (~{bpw:.2f} bits per weight, about "
                f"{human_bytes(lighter.weight_bytes)} of weights) fits all layers with "
                f"ctx_size={ctx}"
            )
            break
    if ngl is None or ngl > 0:
        partial = layout.max_layers(ctx, slots)
        if 0 < partial < target_ngl:
            out.append(
                f"n_gpu_layers={partial} (partial offload: the other layers run on the CPU, slower)"
            )
    return out


def _scaled(model: ModelInfo, ratio: float) -> ModelInfo:
    """``model`` with every weight scaled by ``ratio``: a requantized model's rough size."""
    return dataclasses.replace(
        model,
        layer_bytes=tuple(math.ceil(b * ratio) for b in model.layer_bytes),
        input_bytes=math.ceil(model.input_bytes * ratio),
        output_bytes=math.ceil(model.output_bytes * ratio),
    )


def _model_name(model: ModelInfo) -> str:
    if model.path is not None:
        return model.path.name
    return model.name or "the model"
