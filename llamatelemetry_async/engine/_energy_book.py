"""Per-request GPU figures for the engine: energy (split by token share), power, utilization.

Requests register when they get a server and report when they end; the figures come from
the sampler's ring (no NVML call on the request path), attributed with ``attribute_energy``
among the requests that overlapped on each GPU: finished ones with their final token
counts, running ones with their tokens so far.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..gpu import GPUSample, RequestWindow, attribute_energy

__all__ = ["EnergyBook", "Samples"]


class Samples(Protocol):
    """Where an ``EnergyBook`` reads samples: a ``GPUSampler``, or a mirror of one elsewhere."""

    @property
    def available(self) -> bool: ...
    @property
    def interval(self) -> float: ...
    def samples(self, gpu: int) -> list[GPUSample]: ...


class EnergyBook:
    """The GPU figures of the requests on some GPUs, from one source of samples.

    The engine keeps one over its own ``GPUSampler``; a backend whose server runs elsewhere
    (a Ray actor on another node) sets ``Backend.energy`` to one over that node's samples.
    """

    def __init__(self, sampler: Samples, *, keep: int = 4096) -> None:
        self.sampler = sampler
        self._ids = itertools.count()
        self._active: dict[int, tuple[tuple[int, ...], float, Callable[[], int]]] = {}
        self._done: collections.deque[tuple[tuple[int, ...], RequestWindow]] = collections.deque(
            maxlen=keep
        )

    def begin(self, gpus: tuple[int, ...], tokens_so_far: Callable[[], int]) -> int | None:
        """Start tracking a request on ``gpus``; ``None`` when there is nothing to measure."""
        if not gpus or not self.sampler.available:
            return None
        key = next(self._ids)
        self._active[key] = (gpus, time.monotonic(), tokens_so_far)
        return key

    def end(self, key: int | None, tokens: int) -> dict[str, Any]:
        """Finish a request: its span attributes (empty if nothing could be measured)."""
        if key is None or key not in self._active:
            return {}
        gpus, t0, _ = self._active.pop(key)
        now = time.monotonic()
        mine = RequestWindow(key, t0, now, float(tokens))
        self._done.append((gpus, mine))
        joules = 0.0
        power: list[float] = []
        util: list[float] = []
        methods: set[str] = set()
        margin = 2 * self.sampler.interval
        for gpu in gpus:
            samples = [s for s in self.sampler.samples(gpu) if t0 - margin <= s.t <= now]
            if not samples:
                continue
            share = attribute_energy(samples, self._overlapping(gpu, mine, now), until=now)[key]
            joules += share.joules
            methods.add(share.method)
            if share.mean_power_w is not None:
                power.append(share.mean_power_w)
            if share.mean_utilization is not None:
                util.append(share.mean_utilization)
        if not methods:
            return {}
        attrs: dict[str, Any] = {
            "llamatelemetry.gpu.energy_j": joules,
            "llamatelemetry.gpu.energy_method": methods.pop() if len(methods) == 1 else "mixed",
        }
        if tokens:
            attrs["llamatelemetry.gpu.energy_j_per_token"] = joules / tokens
        if power:
            attrs["llamatelemetry.gpu.mean_power_w"] = sum(power)  # the server's GPUs together
        if util:
            attrs["llamatelemetry.gpu.mean_utilization"] = sum(util) / len(util)
        return attrs

    def _overlapping(self, gpu: int, mine: RequestWindow, now: float) -> list[RequestWindow]:
        windows = [mine]
        for gpus, window in self._done:
            if gpu in gpus and window.key != mine.key and window.t1 > mine.t0:
                windows.append(window)
        for key, (gpus, t0, tokens) in self._active.items():
            if gpu in gpus:
                windows.append(RequestWindow(key, t0, now, float(tokens())))
        return windows
