"""llama-server's own ``/metrics`` (Prometheus text) as OpenTelemetry observable instruments.

A background task of the engine scrapes each ready server every ``interval`` seconds (an
async HTTP call: never from a metric callback, which runs on the SDK's export thread). The
callbacks then report the latest values, one series per server. Counters (``*_total``)
become observable counters, the rest observable gauges; ``llamacpp:x`` becomes
``llamacpp.x``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import anyio
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from .._errors import LlamaError
from .._version import __version__

if TYPE_CHECKING:
    from ..client import AsyncLlamaClient

__all__ = ["MetricsScraper"]

logger = logging.getLogger("llamatelemetry_async.telemetry")


class MetricsScraper:
    """Latest ``/metrics`` values per server, exported through observable instruments."""

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        self._meter = metrics.get_meter(
            "llamatelemetry_async.llamacpp", __version__, meter_provider=meter_provider
        )
        self.values: dict[str, dict[str, float]] = {}  # server -> sample name -> value
        self._instruments: set[str] = set()

    async def scrape(self, server: str, client: AsyncLlamaClient) -> None:
        """Read one server's ``/metrics`` now (errors are logged: the next scrape retries)."""
        try:
            samples = await client.metrics()
        except LlamaError as exc:
            logger.debug("scraping /metrics of %s failed: %s", server, exc)
            return
        self.values[server] = samples
        for name in samples:
            if name not in self._instruments:
                self._instruments.add(name)
                self._create(name)

    def forget(self, server: str) -> None:
        """Stop reporting ``server``'s values (it stopped; a restart scrapes it afresh)."""
        self.values.pop(server, None)

    async def run(
        self, servers: Callable[[], Iterable[tuple[str, AsyncLlamaClient]]], interval: float
    ) -> None:
        """Scrape every ready server every ``interval`` seconds, until cancelled."""
        while True:
            for name, client in list(servers()):
                await self.scrape(name, client)
            await anyio.sleep(interval)  # the scrape period, not synchronisation

    def _create(self, sample: str) -> None:
        otel_name = sample.replace(":", ".")

        def observe(options: CallbackOptions) -> Iterable[Observation]:
            for server, samples in list(self.values.items()):
                value = samples.get(sample)
                if value is not None:
                    yield Observation(value, {"llamatelemetry.server.name": server})

        if sample.endswith("_total"):
            self._meter.create_observable_counter(
                otel_name, [observe], description=f"llama-server {sample}"
            )
        else:
            self._meter.create_observable_gauge(
                otel_name, [observe], description=f"llama-server {sample}"
            )
