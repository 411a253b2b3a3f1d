"""GPUs: discovery, an NVML sampler that never blocks the event loop, and energy per request.

``visible_gpus()`` asks NVML (nvidia-ml-py) and honours ``CUDA_VISIBLE_DEVICES``; it blocks for
a few milliseconds, so async code runs it with ``anyio.to_thread.run_sync``. ``GPUSampler``
samples every GPU in a worker thread; ``attribute_energy`` splits a GPU's energy between the
requests it served at the same time. ``read_gpu_memory()`` and ``read_gpu_inventory()`` read
each GPU's memory and the machine's GPU models and driver; this package is the only one that
talks to NVML.
"""

from __future__ import annotations

from ._discovery import (
    GPUInventory as GPUInventory,
    GPUMemory as GPUMemory,
    read_gpu_inventory as read_gpu_inventory,
    read_gpu_memory as read_gpu_memory,
    visible_gpus as visible_gpus,
)
from ._energy import (
    EnergyShare as EnergyShare,
    RequestWindow as RequestWindow,
    attribute_energy as attribute_energy,
)
from ._sampler import GPUSample as GPUSample, GPUSampler as GPUSampler

__all__ = [
    "EnergyShare",
    "GPUInventory",
    "GPUMemory",
    "GPUSample",
    "GPUSampler",
    "RequestWindow",
    "attribute_energy",
    "read_gpu_inventory",
    "read_gpu_memory",
    "visible_gpus",
]
