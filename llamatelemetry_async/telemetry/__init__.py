"""OpenTelemetry for llama-server requests: GenAI spans with per-token events, GenAI
metrics, llama-server's own ``/metrics``, and a GPU-aware resource.

``setup_telemetry()`` builds providers and exporters; ``AsyncEngine(telemetry=...)`` or
``AsyncLlamaClient(instrumentation=telemetry.instrumentation)`` use them. With nothing
configured, nothing is recorded and the per-token path pays one ``is None`` test.

``ContentCapture`` names where prompt and completion text go (``capture_content=``);
``capture_content_from_env()`` and ``latest_experimental()`` read the environment variables
OpenTelemetry's GenAI instrumentations read.
"""

from __future__ import annotations

from ._genai import (
    ContentCapture,
    GenAIInstrumentation,
    TokenEvents,
    capture_content_from_env,
    latest_experimental,
)
from ._scrape import MetricsScraper
from ._setup import Telemetry, gpu_resource_attributes, setup_telemetry

__all__ = [
    "ContentCapture",
    "GenAIInstrumentation",
    "MetricsScraper",
    "Telemetry",
    "TokenEvents",
    "capture_content_from_env",
    "gpu_resource_attributes",
    "latest_experimental",
    "setup_telemetry",
]
