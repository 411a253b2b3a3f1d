"""Which GPUs this process may use: NVML's device count, narrowed by CUDA_VISIBLE_DEVICES.

``visible_gpus()`` blocks: ``nvmlInit`` took 9 ms on an H100, so async code calls it in a
worker thread::

    gpus = await anyio.to_thread.run_sync(visible_gpus)
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["visible_gpus"]


def visible_gpus() -> list[int]:
    """Physical ids (NVML order) of the GPUs this process may use; ``[]`` when there are none.

    - NVML works: its devices ``0..count-1``; when ``CUDA_VISIBLE_DEVICES`` is set, only the
      ones it names, in its order. Its entries may be indices or ``GPU-`` UUIDs (or unique
      prefixes of them); as in CUDA, the list ends at the first entry that is neither (e.g.
      ``-1``, a ``MIG-`` instance, an index past the last GPU), so ``""`` and ``"-1"`` mean
      no GPU.
    - NVML does not initialise (no driver, no library: not an error): the integer ids in
      ``CUDA_VISIBLE_DEVICES`` when it is set, else ``[]``. UUIDs cannot be resolved
      without NVML, so the list ends at the first one.

    Blocking (NVML initialisation takes milliseconds): from async code use
    ``await anyio.to_thread.run_sync(visible_gpus)``.

    ```python
    >>> visible_gpus()          # on a Kaggle T4 x2 notebook
    [0, 1]
    ```
    """
    cuda_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    nvml = _nvml_devices()
    if nvml is None:
        if cuda_visible is None:
            return []
        return _parse_cuda_visible(cuda_visible, count=None, uuids=())
    count, uuids = nvml
    if cuda_visible is None:
        return list(range(count))
    return _parse_cuda_visible(cuda_visible, count=count, uuids=uuids)


def _nvml_devices() -> tuple[int, list[str]] | None:
    """NVML's device count and, when CUDA_VISIBLE_DEVICES names one, the UUIDs by index.

    ``None`` when NVML is unusable. Every NVML call happens here, between init and shutdown.
    """
    try:
        import pynvml  # here, not at module level: no NVML work at import time
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        # No driver or no libnvidia-ml (a CPU machine): simply no GPUs seen through NVML.
        return None
    try:
        count = int(pynvml.nvmlDeviceGetCount())
        uuids: list[str] = []
        if "GPU-" in os.environ.get("CUDA_VISIBLE_DEVICES", ""):
            for index in range(count):
                uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(index))
                # Older nvidia-ml-py releases return bytes.
                uuids.append(uuid.decode() if isinstance(uuid, bytes) else str(uuid))
    except pynvml.NVMLError:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass  # discovery already has its answer (or none); nothing to do about it
    return count, uuids


def _parse_cuda_visible(value: str, *, count: int | None, uuids: Sequence[str]) -> list[int]:
    """The ids CUDA_VISIBLE_DEVICES names, read as CUDA reads it (stop at the first bad one)."""
    ids: list[int] = []
    for raw in value.split(","):
        token = raw.strip()
        if token.isdigit():
            index = int(token)
            if count is not None and index >= count:
                break
        elif token.startswith("GPU-"):
            matches = [i for i, uuid in enumerate(uuids) if uuid.startswith(token)]
            if len(matches) != 1:  # unknown, ambiguous, or no NVML to resolve it
                break
            index = matches[0]
        else:
            break
        if index not in ids:
            ids.append(index)
    return ids
