"""GPUs: discovery (which GPUs this process may use).

``visible_gpus()`` asks NVML (nvidia-ml-py) and honours ``CUDA_VISIBLE_DEVICES``; it blocks for
a few milliseconds, so async code runs it with ``anyio.to_thread.run_sync``.
"""

from __future__ import annotations

from ._discovery import visible_gpus as visible_gpus

__all__ = ["visible_gpus"]
