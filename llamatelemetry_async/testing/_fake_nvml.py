"""A fake NVML with nvidia-ml-py's surface (``pynvml``), for machines without a GPU.

Only what cannot run here is faked: the sampler's own logic runs for real against it.
Each GPU is scriptable: which metrics it does not support, transient failures, a GPU that
disappears, and a call that blocks (as reading PCIe throughput does for ~21 ms).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

__all__ = ["FakeGPU", "FakeNVML"]


class NVMLError(Exception):
    """The fake's base error, like ``pynvml.NVMLError``."""


class NVMLError_NotSupported(NVMLError):
    pass


class NVMLError_FunctionNotFound(NVMLError):
    pass


class NVMLError_GpuIsLost(NVMLError):
    pass


class NVMLError_GpuNotFound(NVMLError):
    pass


class NVMLError_Unknown(NVMLError):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


@dataclasses.dataclass
class FakeGPU:
    """One fake GPU: a constant power draw whose energy counter grows with real time."""

    name: str = "NVIDIA H100 80GB HBM3"
    power_w: float = 300.0
    utilization: int = 90
    memory_total: int = 80 * 2**30
    memory_used: int = 10 * 2**30
    unsupported: set[str] = dataclasses.field(default_factory=set)
    fail_next: dict[str, int] = dataclasses.field(default_factory=dict)  # transient errors
    block: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per call
    lost: bool = False
    processes: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    compute_capability: tuple[int, int] = (9, 0)
    _start: float = dataclasses.field(default_factory=time.monotonic)


class FakeNVML:
    """Use as ``GPUSampler(nvml=FakeNVML([FakeGPU(), ...]))``; ``no_driver=True`` fails init."""

    NVMLError = NVMLError
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_FunctionNotFound = NVMLError_FunctionNotFound
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVMLError_GpuNotFound = NVMLError_GpuNotFound
    NVMLError_Unknown = NVMLError_Unknown
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2
    NVML_PCIE_UTIL_TX_BYTES = 0
    NVML_PCIE_UTIL_RX_BYTES = 1
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0

    def __init__(self, gpus: Iterable[FakeGPU] = (), *, no_driver: bool = False) -> None:
        self.gpus = list(gpus)
        self.no_driver = no_driver
        self.initialised = False
        self.calls = 0
        self.threads: set[str] = set()  # names of the threads NVML was called from

    # lifecycle
    def nvmlInit(self) -> None:
        self._enter("init")
        if self.no_driver:
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGPU:
        return self.gpus[i]

    def nvmlDeviceGetName(self, h: FakeGPU) -> str:
        return h.name

    def nvmlDeviceGetCudaComputeCapability(self, h: FakeGPU) -> tuple[int, int]:
        self._call(h, "compute_capability")
        return h.compute_capability

    def nvmlSystemGetDriverVersion(self) -> str:
        return "580.95.05"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 13000  # CUDA 13.0, as NVML encodes it (1000 * major + 10 * minor)

    # metrics
    def nvmlDeviceGetUtilizationRates(self, h: FakeGPU) -> Any:
        self._call(h, "utilization")
        return SimpleNamespace(gpu=h.utilization, memory=h.utilization // 2)

    def nvmlDeviceGetMemoryInfo(self, h: FakeGPU) -> Any:
        self._call(h, "memory")
        return SimpleNamespace(used=h.memory_used, total=h.memory_total, free=0)

    def nvmlDeviceGetPowerUsage(self, h: FakeGPU) -> int:
        self._call(h, "power_w")
        return int(h.power_w * 1000)

    def nvmlDeviceGetEnforcedPowerLimit(self, h: FakeGPU) -> int:
        self._call(h, "power_limit_w")
        return 700_000

    def nvmlDeviceGetTotalEnergyConsumption(self, h: FakeGPU) -> int:
        self._call(h, "energy_j")
        return int((time.monotonic() - h._start) * h.power_w * 1000)

    def nvmlDeviceGetTemperature(self, h: FakeGPU, sensor: int) -> int:
        self._call(h, "temperature_c")
        return 55

    def nvmlDeviceGetClockInfo(self, h: FakeGPU, clock: int) -> int:
        self._call(h, "sm_clock_mhz" if clock == self.NVML_CLOCK_SM else "memory_clock_mhz")
        return 1980 if clock == self.NVML_CLOCK_SM else 2619

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h: FakeGPU) -> int:
        self._call(h, "throttle_reasons")
        return 0

    def nvmlDeviceGetTotalEccErrors(self, h: FakeGPU, kind: int, counter: int) -> int:
        self._call(h, "ecc_errors")
        return 0

    def nvmlDeviceGetPcieThroughput(self, h: FakeGPU, direction: int) -> int:
        self._call(h, "pcie_tx_kbps" if direction == 0 else "pcie_rx_kbps")
        return 1024

    def nvmlDeviceGetComputeRunningProcesses(self, h: FakeGPU) -> list[Any]:
        self._call(h, "processes")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in h.processes]

    def _enter(self, what: str) -> None:
        self.calls += 1
        self.threads.add(threading.current_thread().name)

    def _call(self, h: FakeGPU, metric: str) -> None:
        self._enter(metric)
        if not self.initialised:
            raise NVMLError("Uninitialized")
        if h.lost:
            raise NVMLError_GpuIsLost("GPU is lost")
        if metric in h.unsupported:
            raise NVMLError_NotSupported("Not Supported")
        if h.fail_next.get(metric, 0) > 0:
            h.fail_next[metric] -= 1
            raise NVMLError_Unknown("Unknown Error")
        delay = h.block.get(metric)
        if delay:
            time.sleep(delay)  # the simulated duration of a slow NVML call, in its thread
