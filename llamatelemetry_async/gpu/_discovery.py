"""What NVML says about this machine's GPUs: which this process may use, their memory, models.

``visible_gpus()`` is NVML's device count, narrowed by CUDA_VISIBLE_DEVICES;
``read_gpu_memory()`` reads each GPU's name and memory (``models`` plans with it);
``read_gpu_inventory()`` the names, compute capabilities, driver and CUDA versions
(``telemetry`` puts them on its resource). This package is the only one that talks to NVML.

Each call blocks: ``nvmlInit`` took 9 ms on an H100, so async code calls them in a worker
thread::

    gpus = await anyio.to_thread.run_sync(visible_gpus)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "GPUInventory",
    "GPUMemory",
    "read_gpu_inventory",
    "read_gpu_memory",
    "visible_gpus",
]


@dataclass(frozen=True, slots=True)
class GPUMemory:
    """One GPU's name and memory, as NVML reported them (``nvmlDeviceGetMemoryInfo``)."""

    index: int
    """The GPU's physical id (NVML order)."""
    name: str
    """Its name, e.g. ``"Tesla T4"``."""
    total_bytes: int
    """Its memory."""
    used_bytes: int
    """The memory in use when it was read (by any process)."""


@dataclass(frozen=True, slots=True)
class GPUInventory:
    """The machine's GPUs and driver, as NVML reported them. A field NVML cannot read is empty."""

    names: tuple[str, ...]
    """Each GPU's name, in NVML order."""
    compute_capabilities: tuple[str, ...]
    """``"major.minor"`` of each GPU that reported one."""
    driver_version: str | None
    """The NVIDIA driver's version, e.g. ``"580.159.04"``."""
    cuda_version: str | None
    """The newest CUDA version the driver supports, e.g. ``"12.8"``."""


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


def _nvml_module(nvml: Any) -> tuple[Any, str | None]:
    """``nvml``, or ``pynvml`` when it is ``None``; ``(None, why)`` when it is not installed."""
    if nvml is not None:
        return nvml, None
    try:
        import pynvml  # here, not at module level: no NVML work at import time
    except ImportError:
        return None, "pynvml (nvidia-ml-py) is not installed"
    return pynvml, None


def read_gpu_memory(
    gpus: Iterable[int] | None = None, *, nvml: Any = None
) -> tuple[list[GPUMemory], str | None]:
    """The name and memory of each GPU in ``gpus`` (default: all), and why any is missing.

    GPUs NVML cannot read are left out and the reason is the second item (``None`` when
    every GPU asked for was read; ids past NVML's device count are simply skipped). No NVML
    (no driver, no ``pynvml``) gives ``([], why)``. ``nvml`` is the binding (default
    ``pynvml``; tests pass ``testing``'s fake). Blocking.
    """
    nvml, why = _nvml_module(nvml)
    if nvml is None:
        return [], why
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        # No driver: no figures, not an error; the reason goes to the caller.
        return [], f"NVML did not start ({type(exc).__name__}: {exc})"
    read: list[GPUMemory] = []
    problems: list[str] = []
    try:
        count = int(nvml.nvmlDeviceGetCount())
        wanted = range(count) if gpus is None else [g for g in gpus if 0 <= g < count]
        for index in wanted:
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = nvml.nvmlDeviceGetName(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            except nvml.NVMLError as exc:
                problems.append(f"GPU {index}: {type(exc).__name__}: {exc}")
                continue  # a lost or unreadable GPU: the others are still read
            read.append(GPUMemory(index, _text(name), int(memory.total), int(memory.used)))
    except nvml.NVMLError as exc:
        problems.append(f"NVML failed ({type(exc).__name__}: {exc})")
    finally:
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()  # the figures are read; nothing to do about a failing shutdown
    return read, "; ".join(problems) or None


def read_gpu_inventory(*, nvml: Any = None) -> GPUInventory | None:
    """The GPUs' names, compute capabilities, driver and CUDA versions; ``None`` without NVML.

    ``None`` when there is no ``pynvml``, no driver or no NVML library (a CPU machine is not
    an error). A figure NVML does not support is left out. ``nvml`` is the binding (default
    ``pynvml``). Blocking (NVML's init, ~10 ms).
    """
    nvml, _ = _nvml_module(nvml)
    if nvml is None:
        return None
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:
        return None
    try:
        names: list[str] = []
        capabilities: list[str] = []
        for index in range(int(nvml.nvmlDeviceGetCount())):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                names.append(_text(nvml.nvmlDeviceGetName(handle)))
            except nvml.NVMLError:  # a lost or forbidden GPU: left out, as its figures are
                continue
            with contextlib.suppress(nvml.NVMLError):
                major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
                capabilities.append(f"{major}.{minor}")
        driver: str | None = None
        with contextlib.suppress(nvml.NVMLError):
            driver = _text(nvml.nvmlSystemGetDriverVersion())
        cuda: str | None = None
        with contextlib.suppress(nvml.NVMLError):
            version = int(nvml.nvmlSystemGetCudaDriverVersion())
            cuda = f"{version // 1000}.{version % 1000 // 10}"
        return GPUInventory(tuple(names), tuple(capabilities), driver, cuda)
    finally:
        nvml.nvmlShutdown()


def _text(value: object) -> str:
    """An NVML string: older nvidia-ml-py releases return bytes."""
    return value.decode() if isinstance(value, bytes) else str(value)
