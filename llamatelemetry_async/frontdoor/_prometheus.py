"""``GET /metrics``: the door's and the engine's figures, and each server's own ``/metrics``
labelled ``server="..."``, in the Prometheus text format (written by ``prometheus_client``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# prometheus_client loads on the first scrape (it is heavy for an import of the package).
import anyio

from .._errors import LlamaError
from ..client import AsyncLlamaClient

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from ._app import FrontDoor

__all__ = ["exposition"]

_SCRAPE_TIMEOUT = 2.0  # seconds per server: a slow server must not stall the scrape


class _Snapshot:
    """A collector that yields families gathered beforehand (the scrape is async)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


async def exposition(door: FrontDoor) -> bytes:
    """The whole ``/metrics`` page."""
    from prometheus_client import CollectorRegistry, generate_latest

    families = _own(door)
    if door.engine.running:
        families += await _servers(door)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families))
    return generate_latest(registry)


def _own(door: FrontDoor) -> list[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    engine = door.engine
    in_flight = GaugeMetricFamily(
        "llamatelemetry_frontdoor_requests_in_flight",
        "Requests the front door is answering now.",
        value=door.in_flight,
    )
    answered = CounterMetricFamily(
        "llamatelemetry_frontdoor_requests",
        "Requests the front door answered, by route and status.",
        labels=["route", "code"],
    )
    for (route, code), count in sorted(door.answered.items()):
        answered.add_metric([route, str(code)], count)
    waiting = GaugeMetricFamily(
        "llamatelemetry_engine_waiting_requests",
        "Requests waiting in the engine for a free slot.",
        value=engine.waiting,
    )
    per_server: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
        "ready": GaugeMetricFamily(
            "llamatelemetry_server_ready", "1 if the server takes requests.", labels=["server"]
        ),
        "in_flight": GaugeMetricFamily(
            "llamatelemetry_server_requests_in_flight",
            "Requests the engine has in flight on the server.",
            labels=["server"],
        ),
        "slots": GaugeMetricFamily(
            "llamatelemetry_server_slots", "Requests the server decodes at once.", labels=["server"]
        ),
        "served": CounterMetricFamily(
            "llamatelemetry_server_requests",
            "Requests the engine sent the server.",
            labels=["server"],
        ),
        "restarts": CounterMetricFamily(
            "llamatelemetry_server_restarts", "Times the server was restarted.", labels=["server"]
        ),
    }
    state = GaugeMetricFamily(
        "llamatelemetry_server_state",
        "The server's state (1 for the current one).",
        labels=["server", "state"],
    )
    for info in engine.servers:
        values = {
            "ready": float(info.state == "ready"),
            "in_flight": info.outstanding,
            "slots": info.slots,
            "served": info.served,
            "restarts": max(info.starts - 1, 0),
        }
        for key, family in per_server.items():
            family.add_metric([info.name], values[key])
        state.add_metric([info.name, info.state], 1)
    return [in_flight, answered, waiting, *per_server.values(), state]


async def _servers(door: FrontDoor) -> list[Metric]:
    """Each ready server's llama.cpp metrics, one family per name, labelled by server."""
    from prometheus_client.core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    async def scrape(client: AsyncLlamaClient) -> Any:
        try:
            return await client.request("GET", "/metrics", timeout=_SCRAPE_TIMEOUT)
        except LlamaError:  # --no-metrics (501), or gone: it is just left out
            return None

    texts: dict[str, Any] = {}
    with anyio.move_on_after(2 * _SCRAPE_TIMEOUT):
        try:
            texts = await door.engine.each_server(scrape)
        except LlamaError:  # the engine stopped meanwhile
            pass
    merged: dict[str, Metric] = {}
    for server, text in texts.items():
        if not isinstance(text, str):
            continue
        try:
            families = list(text_string_to_metric_families(text))
        except ValueError:
            continue  # malformed text from one server must not break the page
        for family in families:
            mine = merged.get(family.name)
            if mine is None:
                mine = merged[family.name] = Metric(family.name, family.documentation, family.type)
            for sample in family.samples:
                mine.add_sample(sample.name, {**sample.labels, "server": server}, sample.value)
    return list(merged.values())
