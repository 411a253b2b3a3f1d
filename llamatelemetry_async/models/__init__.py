"""Models: GGUF inspection and VRAM planning (usable without an engine).

``inspect_model(path)`` reads a GGUF's shape with the ``gguf`` package (in a worker thread;
every part of a split model);
``plan(info, gpus)`` chooses the GPU layers, context and slots that fit each server's GPUs,
counting ``CUDA_OVERHEAD_BYTES`` (400 MiB) per GPU for the CUDA context and workspaces;
``plan_ram(info, servers)`` checks that CPU servers fit in host memory together (the model
mapped once, a KV cache each, and ``SERVER_OVERHEAD_BYTES`` (64 MiB) per process).
``resolve_model(spec)`` turns a path, a registry name (``list_models()``) or a Hub file
(``owner/repo:file.gguf``, through huggingface_hub and its cache) into a local path.
``quantize(src, dst, type)`` runs llama.cpp's ``llama-quantize`` (built beside llama-server)
with progress; ``QUANT_TYPES`` maps its type names (``"Q4_K_M"``) to the GGUF file type each
writes. ``merge_lora(model, adapters, out)`` merges LoRA adapters into a model with llama.cpp's
``llama-export-lora`` (built beside llama-server too); ``LoraAdapter`` is the type of one
adapter it takes: a file, or a ``(file, scale)`` pair.
"""

from __future__ import annotations

from ._gguf import (
    ModelInfo as ModelInfo,
    TensorTypeStats as TensorTypeStats,
    human_bytes as human_bytes,
    inspect_model as inspect_model,
    read_model_info as read_model_info,
    with_adapters as with_adapters,
)
from ._lora import (
    LoraAdapter as LoraAdapter,
    MergeLoraError as MergeLoraError,
    MergeProgress as MergeProgress,
    merge_lora as merge_lora,
)
from ._quantize import (
    QUANT_TYPES as QUANT_TYPES,
    QuantizeProgress as QuantizeProgress,
    quantize as quantize,
)
from ._ram import (
    SERVER_OVERHEAD_BYTES as SERVER_OVERHEAD_BYTES,
    RAMPlan as RAMPlan,
    ServerRAMPlan as ServerRAMPlan,
    plan_ram as plan_ram,
    read_available_ram as read_available_ram,
)
from ._registry import RegistryModel as RegistryModel, list_models as list_models
from ._resolve import resolve_model as resolve_model
from ._vram import (
    CUDA_OVERHEAD_BYTES as CUDA_OVERHEAD_BYTES,
    DeviceUse as DeviceUse,
    GPUSpec as GPUSpec,
    ServerVRAMPlan as ServerVRAMPlan,
    VRAMPlan as VRAMPlan,
    compute_buffer_bytes as compute_buffer_bytes,
    kv_cells as kv_cells,
    model_shape as model_shape,
    plan as plan,
    probe_gpu_specs as probe_gpu_specs,
    read_gpu_specs as read_gpu_specs,
)

__all__ = [
    "CUDA_OVERHEAD_BYTES",
    "QUANT_TYPES",
    "SERVER_OVERHEAD_BYTES",
    "DeviceUse",
    "GPUSpec",
    "LoraAdapter",
    "MergeLoraError",
    "MergeProgress",
    "ModelInfo",
    "QuantizeProgress",
    "RAMPlan",
    "RegistryModel",
    "ServerRAMPlan",
    "ServerVRAMPlan",
    "TensorTypeStats",
    "VRAMPlan",
    "compute_buffer_bytes",
    "human_bytes",
    "inspect_model",
    "kv_cells",
    "list_models",
    "merge_lora",
    "model_shape",
    "plan",
    "plan_ram",
    "probe_gpu_specs",
    "quantize",
    "read_available_ram",
    "read_gpu_specs",
    "read_model_info",
    "resolve_model",
    "with_adapters",
]
