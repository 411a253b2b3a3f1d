"""Energy per request, with a GPU's energy split between the requests it served at once.

The method, for one GPU:

1. Between two consecutive samples the GPU used ``ΔE`` joules: the difference of NVML's
   total-energy counter, or, when the counter did not move although the GPU drew power
   (it updates more slowly than a short request lasts), the mean power times the interval
   (Zeus falls back the same way). The energy is spread evenly over the interval.
2. The timeline is cut at every sample and at every request's start and end. Each piece's
   energy goes to the requests running during it, in proportion to their token rate
   (tokens ÷ duration: a request producing tokens twice as fast gets twice the share). A
   piece with no request running is idle energy, attributed to no one.
3. A request's energy is the sum of its shares; the method says whether it came from the
   counter, from power times time, or both ("mixed").

So the requests' joules add up to the GPU's energy while it was busy. Energy before the
first or after the last sample is not known and not attributed.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Hashable, Sequence
from typing import Literal

from ._sampler import GPUSample

__all__ = ["EnergyShare", "RequestWindow", "attribute_energy"]

Method = Literal["counter", "power", "mixed", "none"]


@dataclasses.dataclass(frozen=True, slots=True)
class RequestWindow:
    """A request as energy attribution sees it: when it ran and how many tokens it made."""

    key: Hashable
    t0: float
    t1: float
    tokens: float


@dataclasses.dataclass(frozen=True, slots=True)
class EnergyShare:
    """A request's energy on one GPU, and how it was measured.

    ``joules`` is its share of the GPU's energy; ``method`` says where that came from:
    "counter" (NVML's energy counter), "power" (mean power times time), "mixed" (both) or
    "none" (no sample covered it). ``mean_power_w`` and ``mean_utilization`` (percent)
    average the samples taken while it ran, or the one nearest to its middle.
    """

    joules: float
    method: Method
    mean_power_w: float | None
    mean_utilization: float | None


def attribute_energy(
    samples: Sequence[GPUSample],
    requests: Sequence[RequestWindow],
    *,
    until: float | None = None,
) -> dict[Hashable, EnergyShare]:
    """Split one GPU's energy between ``requests`` by token share (see the module doc).

    ``until`` extends the timeline past the last sample at its power (a request that ends
    between two samples is not left without its tail).
    """
    samples = sorted(samples, key=lambda s: s.t)
    intervals: list[tuple[float, float, float, str]] = []  # (start, end, watts, method)
    for a, b in itertools.pairwise(samples):
        span = b.t - a.t
        if span <= 0:
            continue
        if a.energy_j is not None and b.energy_j is not None and b.energy_j > a.energy_j:
            intervals.append((a.t, b.t, (b.energy_j - a.energy_j) / span, "counter"))
        elif a.power_w is not None or b.power_w is not None:
            powers = [p for p in (a.power_w, b.power_w) if p is not None]
            intervals.append((a.t, b.t, sum(powers) / len(powers), "power"))
    if until is not None and samples and until > samples[-1].t and samples[-1].power_w is not None:
        intervals.append((samples[-1].t, until, samples[-1].power_w, "power"))
    joules: dict[Hashable, float] = {r.key: 0.0 for r in requests}
    methods: dict[Hashable, set[str]] = {r.key: set() for r in requests}
    rates = {r.key: (r.tokens / (r.t1 - r.t0) if r.t1 > r.t0 else 0.0) for r in requests}
    for start, end, watts, method in intervals:
        cuts = sorted({start, end, *(t for r in requests for t in (r.t0, r.t1) if start < t < end)})
        for u, v in itertools.pairwise(cuts):
            active = [r for r in requests if r.t0 <= u and r.t1 >= v]
            if not active:
                continue  # idle energy: nobody's
            energy = watts * (v - u)
            total = sum(rates[r.key] for r in active)
            for r in active:
                share = rates[r.key] / total if total > 0 else 1 / len(active)
                joules[r.key] += energy * share
                methods[r.key].add(method)
    result: dict[Hashable, EnergyShare] = {}
    for r in requests:
        inside = [s for s in samples if r.t0 <= s.t <= r.t1] or _nearest(samples, r)
        power = [s.power_w for s in inside if s.power_w is not None]
        util = [s.utilization_gpu for s in inside if s.utilization_gpu is not None]
        used = methods[r.key]
        how: Method = (
            "none" if not used else "mixed" if len(used) > 1 else "counter" if "counter" in used
            else "power"
        )  # fmt: skip
        result[r.key] = EnergyShare(
            joules=joules[r.key],
            method=how,
            mean_power_w=sum(power) / len(power) if power else None,
            mean_utilization=sum(util) / len(util) if util else None,
        )
    return result


def _nearest(samples: Sequence[GPUSample], r: RequestWindow) -> list[GPUSample]:
    """For a request shorter than the sampling interval: the sample closest to its middle."""
    if not samples:
        return []
    middle = (r.t0 + r.t1) / 2
    return [min(samples, key=lambda s: abs(s.t - middle))]
