"""``GPUSampler``: NVML metrics sampled in a worker thread, kept in a ring, exported to OTel.

Every NVML call runs on one worker thread (a limiter of 1 keeps them ordered): reading the
energy counter takes ~3.9 ms and PCIe throughput ~21 ms on an H100, which on the event loop
would stall every stream. A metric a GPU does not support is dropped for that GPU once, with
a log line; a transient error skips one reading; a GPU that is lost stops being sampled. No
NVML at all (no GPU, driver or library) leaves the sampler ``available=False`` with the
reason, and nothing raises.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from types import ModuleType
from typing import TYPE_CHECKING, Any, Self

import anyio

from .._version import __version__

if TYPE_CHECKING:
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, Observation

__all__ = ["GPUSample", "GPUSampler"]

logger = logging.getLogger("llamatelemetry_async.gpu")


@dataclasses.dataclass(frozen=True, slots=True)
class GPUSample:
    """One reading of one GPU; ``None`` where the GPU does not report that metric.

    ``t`` is ``time.monotonic()`` (compare with request times), ``energy_j`` the GPU's total
    energy counter in joules (Volta and newer), power in watts, memory in bytes.
    """

    index: int
    t: float
    name: str
    utilization_gpu: float | None = None  # percent
    utilization_memory: float | None = None
    memory_used: int | None = None
    memory_total: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    energy_j: float | None = None
    temperature_c: float | None = None
    sm_clock_mhz: int | None = None
    memory_clock_mhz: int | None = None
    pcie_tx_kbps: int | None = None
    pcie_rx_kbps: int | None = None
    throttle_reasons: int | None = None
    ecc_errors: int | None = None
    processes: tuple[tuple[int, int], ...] = ()  # (pid, GPU memory bytes)


class GPUSampler(anyio.AsyncContextManagerMixin):
    """Sample every visible GPU every ``interval`` seconds while the block runs.

    ```python
    async with GPUSampler(interval=0.5) as sampler:
        ...
        print(sampler.latest())                  # {gpu index: GPUSample}
        print(sampler.window(t0, t1))            # {gpu index: [GPUSample, ...]}
    ```

    ``pcie=True`` also reads PCIe throughput (slow: ~21 ms per direction per GPU).
    ``nvml`` is the NVML binding (default: nvidia-ml-py's ``pynvml``; tests pass a fake with
    the same surface). ``AsyncEngine(gpu_sampler=...)`` runs one for the engine's lifetime.
    """

    def __init__(
        self,
        interval: float = 0.5,
        *,
        pcie: bool = False,
        capacity: int = 3600,
        nvml: ModuleType | Any = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self.interval = interval
        self.pcie = pcie
        self._nvml = nvml
        self._capacity = capacity
        self._meter_provider = meter_provider
        self._samples: dict[int, collections.deque[GPUSample]] = {}
        self._handles: dict[int, Any] = {}
        self._names: dict[int, str] = {}
        self._unsupported: dict[int, set[str]] = {}
        self._lost: set[int] = set()
        self._limiter = anyio.CapacityLimiter(1)  # NVML calls one at a time, in order
        self.available = False
        self.reason: str | None = "not started"
        self.ticks = 0

    # ----------------------------------------------------------------- reading
    def latest(self) -> dict[int, GPUSample]:
        """The newest sample of each GPU."""
        return {i: ring[-1] for i, ring in self._samples.items() if ring}

    def window(self, t0: float, t1: float) -> dict[int, list[GPUSample]]:
        """Samples with ``t0 <= t <= t1`` (``time.monotonic()`` times), per GPU."""
        return {i: [s for s in ring if t0 <= s.t <= t1] for i, ring in self._samples.items()}

    def samples(self, gpu: int) -> list[GPUSample]:
        """Every kept sample of one GPU, oldest first."""
        return list(self._samples.get(gpu, ()))

    @property
    def gpus(self) -> list[int]:
        """The NVML indices being sampled (empty until started, or when unavailable)."""
        return sorted(self._handles)

    # ----------------------------------------------------------------- lifecycle
    @contextlib.asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        started = await self._run_nvml(self._start)
        if not started:
            yield self  # unavailable: the reason says why; the caller runs on
            return
        self._instruments()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._loop)
                try:
                    yield self
                finally:
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._run_nvml(self._stop)

    async def _loop(self) -> None:
        while True:
            began = time.monotonic()
            await self._run_nvml(self._sample_all)
            self.ticks += 1
            # The sampling period; a slow tick (PCIe reads) shortens the wait, never stacks.
            await anyio.sleep(max(0.0, self.interval - (time.monotonic() - began)))

    async def sample_now(self) -> dict[int, GPUSample]:
        """Take one sample of every GPU at once (outside the periodic loop)."""
        if self.available:
            await self._run_nvml(self._sample_all)
        return self.latest()

    async def _run_nvml(self, fn: Callable[[], Any]) -> Any:
        return await anyio.to_thread.run_sync(fn, limiter=self._limiter)

    # ----------------------------------------------------------------- worker thread
    def _start(self) -> bool:
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                self.reason = "unavailable: nvidia-ml-py (pynvml) is not installed"
                return False
            self._nvml = pynvml
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            self.reason = f"unavailable: NVML did not initialise ({exc})"
            logger.info("GPU sampler %s", self.reason)
            return False
        try:
            count = nvml.nvmlDeviceGetCount()
            for i in range(count):
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                name = nvml.nvmlDeviceGetName(handle)
                self._handles[i] = handle
                self._names[i] = name.decode() if isinstance(name, bytes) else str(name)
                self._samples[i] = collections.deque(maxlen=self._capacity)
                self._unsupported[i] = set()
        except nvml.NVMLError as exc:
            self.reason = f"unavailable: listing GPUs failed ({exc})"
            nvml.nvmlShutdown()
            return False
        if not self._handles:
            self.reason = "unavailable: NVML reports no GPU"
            nvml.nvmlShutdown()
            return False
        self.available = True
        self.reason = None
        return True

    def _stop(self) -> None:
        if self.available:
            self.available = False
            self.reason = "stopped"
            with contextlib.suppress(Exception):  # shutting down: nothing left to report to
                self._nvml.nvmlShutdown()

    def _sample_all(self) -> None:
        for i in list(self._handles):
            if i not in self._lost:
                sample = self._sample(i)
                if sample is not None:
                    self._samples[i].append(sample)

    def _sample(self, i: int) -> GPUSample | None:
        nvml = self._nvml
        h = self._handles[i]
        values: dict[str, Any] = {}
        try:
            util = self._read(i, "utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(h))
            if util is not None:
                values["utilization_gpu"] = float(util.gpu)
                values["utilization_memory"] = float(util.memory)
            mem = self._read(i, "memory", lambda: nvml.nvmlDeviceGetMemoryInfo(h))
            if mem is not None:
                values["memory_used"] = int(mem.used)
                values["memory_total"] = int(mem.total)
            readers: list[tuple[str, Callable[[], Any], Callable[[Any], Any]]] = [
                ("power_w", lambda: nvml.nvmlDeviceGetPowerUsage(h), _per_k),
                ("power_limit_w", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(h), _per_k),
                ("energy_j", lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(h), _per_k),
                (
                    "temperature_c",
                    lambda: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
                    float,
                ),
                ("sm_clock_mhz", lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM), int),
                (
                    "memory_clock_mhz",
                    lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM),
                    int,
                ),
                (
                    "throttle_reasons",
                    lambda: nvml.nvmlDeviceGetCurrentClocksThrottleReasons(h),
                    int,
                ),
                (
                    "ecc_errors",
                    lambda: nvml.nvmlDeviceGetTotalEccErrors(
                        h, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC
                    ),
                    int,
                ),
            ]
            if self.pcie:
                readers += [
                    (
                        "pcie_tx_kbps",
                        lambda: nvml.nvmlDeviceGetPcieThroughput(h, nvml.NVML_PCIE_UTIL_TX_BYTES),
                        int,
                    ),
                    (
                        "pcie_rx_kbps",
                        lambda: nvml.nvmlDeviceGetPcieThroughput(h, nvml.NVML_PCIE_UTIL_RX_BYTES),
                        int,
                    ),
                ]
            for field, read, convert in readers:
                raw = self._read(i, field, read)
                if raw is not None:
                    values[field] = convert(raw)
            procs = self._read(i, "processes", lambda: nvml.nvmlDeviceGetComputeRunningProcesses(h))
            if procs is not None:
                values["processes"] = tuple((int(p.pid), int(p.usedGpuMemory or 0)) for p in procs)
        except _GpuLost as lost:
            self._lost.add(i)
            logger.warning("GPU %d (%s) is lost (%s): no longer sampled", i, self._names[i], lost)
            return None
        return GPUSample(index=i, t=time.monotonic(), name=self._names[i], **values)

    def _read(self, i: int, metric: str, read: Callable[[], Any]) -> Any:
        if metric in self._unsupported[i]:
            return None
        nvml = self._nvml
        try:
            return read()
        except nvml.NVMLError as exc:
            if isinstance(exc, nvml.NVMLError_NotSupported | nvml.NVMLError_FunctionNotFound):
                self._unsupported[i].add(metric)
                logger.info("GPU %d (%s) does not support %s: skipped", i, self._names[i], metric)
            elif isinstance(exc, nvml.NVMLError_GpuIsLost | nvml.NVMLError_GpuNotFound):
                raise _GpuLost(str(exc)) from exc
            else:  # transient: skip this reading, try again next tick
                logger.debug("GPU %d: reading %s failed: %s", i, metric, exc)
            return None

    # ----------------------------------------------------------------- OpenTelemetry
    def _instruments(self) -> None:
        from opentelemetry import metrics  # here: the sampler alone needs no OpenTelemetry

        meter = metrics.get_meter(
            "llamatelemetry_async.gpu", __version__, meter_provider=self._meter_provider
        )
        # OpenTelemetry hardware semantic-convention names where they exist.
        specs: list[tuple[str, str, str, Callable[[GPUSample], float | None], bool]] = [
            ("hw.gpu.utilization", "1", "GPU utilization", _ratio("utilization_gpu"), False),
            (
                "hw.gpu.memory.utilization",
                "1",
                "GPU memory bandwidth utilization",
                _ratio("utilization_memory"),
                False,
            ),
            ("hw.gpu.memory.usage", "By", "GPU memory used", _field("memory_used"), False),
            ("hw.gpu.memory.limit", "By", "GPU memory size", _field("memory_total"), False),
            ("hw.power", "W", "GPU power draw", _field("power_w"), False),
            ("hw.energy", "J", "GPU energy since driver load", _field("energy_j"), True),
            ("hw.temperature", "Cel", "GPU temperature", _field("temperature_c"), False),
            (
                "llamatelemetry.gpu.clock.sm",
                "MHz",
                "SM clock",
                _field("sm_clock_mhz"),
                False,
            ),
        ]
        for name, unit, description, value_of, counter in specs:
            callback = self._observe(value_of)
            if counter:
                meter.create_observable_counter(name, [callback], unit, description)
            else:
                meter.create_observable_gauge(name, [callback], unit, description)

    def _observe(
        self, value_of: Callable[[GPUSample], float | None]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        from opentelemetry.metrics import Observation

        def callback(options: CallbackOptions) -> Iterable[Observation]:
            for sample in self.latest().values():
                value = value_of(sample)
                if value is not None:
                    yield Observation(
                        value,
                        {"hw.id": f"gpu{sample.index}", "hw.name": sample.name, "hw.type": "gpu"},
                    )

        return callback


class _GpuLost(Exception):
    pass


def _per_k(value: Any) -> float:
    return float(value) / 1000  # NVML reports milliwatts and millijoules


def _field(name: str) -> Callable[[GPUSample], float | None]:
    return lambda s: getattr(s, name)


def _ratio(name: str) -> Callable[[GPUSample], float | None]:
    def value(s: GPUSample) -> float | None:
        v = getattr(s, name)
        return None if v is None else v / 100

    return value
