"""What llama-server itself counted during a run: ``/metrics`` deltas and ``/slots`` polls.

Before the measured load, every server's ``/metrics`` is read; while it runs, ``/metrics``
and ``/slots`` are polled (gauges: requests deferred and processing, KV cache usage where
the build reports it, busy slots); after it, ``/metrics`` is read again. Counters become
deltas over the run; gauges become their mean and max over the polls. A server without
``--metrics`` (or not a llama-server) is reported as such, and the run goes on. A counter
that goes down between two reads (the server restarted), or a read that fails after the
first, leaves that server's counters unknown (``counters_unknown`` says why), never a
negative delta.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import anyio

from .._errors import LlamaError

__all__ = ["ServerWatch", "server_summary"]

_PREFIX = "llamacpp:"
# Counters whose delta over a run says what the server did.
_COUNTERS = (
    "prompt_tokens_total",
    "prompt_tokens_cached_total",
    "prompt_seconds_total",
    "tokens_predicted_total",
    "tokens_predicted_seconds_total",
    "n_decode_total",
)
# Gauges sampled while the run goes on.
_GAUGES = (
    "requests_deferred",
    "requests_processing",
    "kv_cache_usage_ratio",
    "kv_cache_tokens",
    "n_busy_slots_per_decode",
)

Read = Callable[[], Awaitable[Any]]


class _One:
    """One server's readings."""

    def __init__(self, name: str, metrics: Read, slots: Read) -> None:
        self.name = name
        self.metrics = metrics
        self.slots = slots
        self.before: dict[str, float] | None = None
        self.after: dict[str, float] | None = None
        self.gauges: dict[str, list[float]] = {}
        self.busy_slots: list[int] = []
        self.slot_count: int | None = None
        self.kv_used: list[float] = []
        self.metrics_error: str | None = None
        self.slots_error: str | None = None
        self.last: dict[str, float] | None = None  # the latest /metrics that answered
        # Why the counters' deltas cannot be trusted: a counter went down (the server
        # restarted) or a read failed after the first (it may have restarted then).
        self.counters_unknown: str | None = None

    async def read_metrics(self) -> dict[str, float] | None:
        if self.metrics_error is not None:
            return None
        try:
            values: dict[str, float] = await self.metrics()
        except LlamaError as exc:
            if self.last is None:  # no --metrics, or not a llama-server: say so, go on
                self.metrics_error = f"{type(exc).__name__}: {exc}"
            elif self.counters_unknown is None:
                self.counters_unknown = (
                    f"a /metrics read failed during the run ({type(exc).__name__}: {exc}); "
                    "the server may have restarted"
                )
            return None
        if self.last is not None and self.counters_unknown is None:
            for name in _COUNTERS:
                was, now = self.last.get(_PREFIX + name), values.get(_PREFIX + name)
                if was is not None and now is not None and now < was:
                    self.counters_unknown = (
                        f"{name} went down from {was:g} to {now:g}: the server restarted "
                        "during the run"
                    )
                    break
        self.last = values
        return values

    async def poll(self) -> None:
        values = await self.read_metrics()
        if values is not None:
            for name in _GAUGES:
                value = values.get(_PREFIX + name)
                if value is not None:
                    self.gauges.setdefault(name, []).append(value)
        if self.slots_error is None:
            try:
                slots = await self.slots()
            except LlamaError as exc:
                self.slots_error = f"{type(exc).__name__}: {exc}"
            else:
                self._read_slots(slots)

    def _read_slots(self, slots: Any) -> None:
        if not isinstance(slots, list):
            return
        self.slot_count = len(slots)
        self.busy_slots.append(
            sum(1 for s in slots if isinstance(s, dict) and s.get("is_processing"))
        )
        # KV cache in use: each slot's prompt plus the tokens it decoded (what its cells
        # hold), over every slot's context; builds that report n_past give it directly.
        used = 0
        size = 0
        for slot in slots:
            if not isinstance(slot, dict) or not isinstance(slot.get("n_ctx"), int):
                return
            size += slot["n_ctx"]
            if isinstance(slot.get("n_past"), int):
                used += slot["n_past"]
            elif isinstance(slot.get("n_prompt_tokens"), int):
                decoded = slot.get("next_token")
                first = decoded[0] if isinstance(decoded, list) and decoded else {}
                n = first.get("n_decoded", 0) if isinstance(first, dict) else 0
                used += slot["n_prompt_tokens"] + (n if isinstance(n, int) else 0)
        if size > 0:
            self.kv_used.append(min(used / size, 1.0))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.before is not None and self.after is not None and self.counters_unknown is None:
            out["counters"] = {
                name: self.after[_PREFIX + name] - self.before[_PREFIX + name]
                for name in _COUNTERS
                if _PREFIX + name in self.after and _PREFIX + name in self.before
            }
        else:
            out["counters"] = None
        out["gauges"] = {
            name: {"mean": sum(v) / len(v), "max": max(v), "polls": len(v)}
            for name, v in self.gauges.items()
        }
        out["slots"] = self.slot_count
        out["busy_slots_max"] = max(self.busy_slots) if self.busy_slots else None
        out["kv_cache_usage_max"] = max(self.kv_used) if self.kv_used else None
        out["metrics_error"] = self.metrics_error
        out["counters_unknown"] = self.counters_unknown
        out["slots_error"] = self.slots_error
        return out


class ServerWatch:
    """Read every server's ``/metrics`` before and after a block; poll it and ``/slots``
    every ``interval`` seconds inside it (a task of its own task group)."""

    def __init__(
        self, servers: Sequence[tuple[str, Read, Read]], *, interval: float = 0.25
    ) -> None:
        self._servers = [_One(*s) for s in servers]
        self._interval = interval

    @contextlib.asynccontextmanager
    async def watch(self) -> AsyncGenerator[None]:
        async def first(one: _One) -> None:
            one.before = await one.read_metrics()

        async with anyio.create_task_group() as tg:
            for one in self._servers:
                tg.start_soon(first, one)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._poll_forever)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()

        async def last(one: _One) -> None:
            await one.poll()
            one.after = await one.read_metrics()

        async with anyio.create_task_group() as tg:
            for one in self._servers:
                tg.start_soon(last, one)

    async def _poll_forever(self) -> None:
        while True:
            async with anyio.create_task_group() as tg:
                for one in self._servers:
                    tg.start_soon(one.poll)
            await anyio.sleep(self._interval)  # a polling period, not synchronisation

    def summaries(self) -> list[dict[str, Any]]:
        """One summary per server (see ``server_summary`` for the run's totals)."""
        return [one.summary() for one in self._servers]


def server_summary(servers: Sequence[Mapping[str, Any]], prompt_tokens_sent: int) -> dict[str, Any]:
    """The run's server side: per-server readings and totals.

    ``prompt_tokens_processed`` is the servers' ``prompt_tokens_total`` delta;
    ``prompt_cache_hit_rate`` is ``1 - processed / sent`` (``sent``: the prompt tokens of
    the run's requests, as the servers counted them in ``usage``); ``requests_deferred_max``
    the most requests any server held waiting for a slot at one poll.
    """
    counters = [s["counters"] for s in servers if s.get("counters")]
    processed: float | None = None
    if counters and len(counters) == len(servers):
        processed = sum(c.get("prompt_tokens_total", 0.0) for c in counters)
    hit = None
    if processed is not None and prompt_tokens_sent > 0:
        hit = 1.0 - processed / prompt_tokens_sent
    deferred = [
        s["gauges"]["requests_deferred"]["max"]
        for s in servers
        if "requests_deferred" in s.get("gauges", {})
    ]
    kv = [s["kv_cache_usage_max"] for s in servers if s.get("kv_cache_usage_max") is not None]
    kv += [
        s["gauges"]["kv_cache_usage_ratio"]["max"]
        for s in servers
        if "kv_cache_usage_ratio" in s.get("gauges", {})
    ]
    return {
        "prompt_tokens_sent": prompt_tokens_sent,
        "prompt_tokens_processed": processed,
        "prompt_cache_hit_rate": hit,
        "requests_deferred_max": max(deferred) if deferred else None,
        "kv_cache_usage_max": max(kv) if kv else None,
        "servers": list(servers),
    }
