"""The hook through which telemetry observes requests (the client knows no OpenTelemetry).

``AsyncLlamaClient(..., instrumentation=...)`` and the engine call ``Instrumentation.start``
once per generation request (completions, chat, infill, embeddings, rerank); the returned
``RequestObserver`` sees each streamed chunk and the end. With no instrumentation the
per-token path pays one ``is None`` test.

While the observer is active (``activate()``), its span is current: the request is sent then,
and carries that span's trace context (``traceparent``), so a server that traces continues it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Protocol

from ._types import Timings, Usage

__all__ = ["Instrumentation", "Outcome", "RequestObserver"]


class Outcome(Protocol):
    """What a finished request looks like: a ``TokenStream`` or a whole response.

    An embeddings or rerank request generates no text: its outcome has an empty ``text``, no
    ``finish_reason`` and no ``timings``, and ``usage`` counts the input tokens the server
    read (``completion_tokens`` 0), or is ``None`` when the server's reply does not say.
    """

    @property
    def text(self) -> str:
        """The whole completion text."""
        ...

    @property
    def finish_reason(self) -> str | None:
        """Why generation stopped ("stop", "length", ...)."""
        ...

    @property
    def usage(self) -> Usage | None:
        """Token counts from the server."""
        ...

    @property
    def timings(self) -> Timings | None:
        """llama.cpp's timings of the request."""
        ...


class RequestObserver(Protocol):
    """Observes one request, from issue to end."""

    def activate(self) -> contextlib.AbstractContextManager[object]:
        """Make the request's span current (so an instrumented HTTP client nests under it)."""
        ...

    def on_server(self, url: str, name: str | None, gpus: tuple[int, ...]) -> None:
        """The server that serves the request (known after routing)."""
        ...

    def annotate(self, attributes: Mapping[str, Any]) -> None:
        """Add attributes to the request's span before it ends (GPU and energy figures)."""
        ...

    def on_chunk(self, chunk: Any) -> None:
        """A streamed chunk arrived (the per-token path: keep it cheap)."""
        ...

    def on_end(self, outcome: Outcome) -> None:
        """The request completed."""
        ...

    def on_error(self, exc: BaseException | None) -> None:
        """The request failed with ``exc``, or (``None``) was closed early by its caller."""
        ...


class Instrumentation(Protocol):
    """Creates a ``RequestObserver`` per request."""

    def start(self, operation: str, body: Mapping[str, Any], *, stream: bool) -> RequestObserver:
        """``operation`` is a GenAI operation name: "text_completion", "chat", "embeddings",
        or "rerank" (which the GenAI conventions do not name yet)."""
        ...
