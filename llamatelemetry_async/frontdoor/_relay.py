"""Relaying one stream: upstream events out as SSE, chunk by chunk, nothing buffered.

The engine's ``TokenStream`` (from ``forward_stream``) reads and checks each event (slots,
telemetry, usage, errors) and keeps its raw payload; the relay frames those payloads as they
are and sends them on. A second task watches the client: when it disconnects, the stream
is closed at once, which frees the server's slot even while the request still waits for one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Final

import anyio
import anyio.lowlevel
import msgspec
from starlette.types import Receive, Send

from .._errors import LlamaError, StreamError
from ..client import TokenStream

__all__ = ["error_body", "extras", "relay", "splice", "watching"]

_SSE_HEADERS: Final = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # a reverse proxy in front must not buffer either
]
_DONE: Final = b"[DONE]"
_GPU_PREFIX: Final = "llamatelemetry.gpu."


def error_body(status: int, message: str, kind: str, code: str | None = None) -> bytes:
    """An error in the shape both OpenAI clients and llama.cpp clients read."""
    error = {"code": code or status, "message": message, "type": kind, "param": None}
    return msgspec.json.encode({"error": error})


def splice(payload: bytes, fields: Mapping[str, Any]) -> bytes:
    """``payload`` (a JSON object) with ``fields`` added, without decoding it again."""
    body = payload.rstrip()
    if not fields or not body.endswith(b"}"):
        return payload
    extra = msgspec.json.encode(dict(fields))[1:-1]
    return body[:-1] + (b"," if body != b"{}" else b"") + extra + b"}"


def extras(gpu: Mapping[str, Any] | None) -> dict[str, Any]:
    """The request's GPU figures, as the extra field OpenAI clients ignore."""
    if not gpu:
        return {}
    figures = {key.removeprefix(_GPU_PREFIX): value for key, value in gpu.items()}
    return {"llamatelemetry": {"gpu": figures}}


def _final_fields(stream: TokenStream[Any], payload: bytes) -> dict[str, Any]:
    """What the final chunk gains: usage (when the server left it out) and GPU figures."""
    fields = extras(stream.gpu)
    timings = stream.timings
    openai = b'"choices":' in payload
    if openai and b'"usage":' not in payload and timings is not None:
        prompt = timings.prompt_n + timings.cache_n
        fields["usage"] = {
            "prompt_tokens": prompt,
            "completion_tokens": timings.predicted_n,
            "total_tokens": prompt + timings.predicted_n,
        }
    return fields


def _frame(payloads: list[bytes]) -> bytes:
    if len(payloads) == 1:
        return b"data: " + payloads[0] + b"\n\n"
    return b"".join([b"data: " + p + b"\n\n" for p in payloads])


class _Watch:
    """Calls ``gone`` when the client goes away (its request body already read)."""

    def __init__(self, receive: Receive, gone: Callable[[], Awaitable[None]]) -> None:
        self.receive = receive
        self.gone = gone
        self.done = False

    async def run(self) -> None:
        try:
            while (await self.receive())["type"] != "http.disconnect":
                pass
            await self.gone()
        finally:
            self.done = True


@contextlib.asynccontextmanager
async def watching(receive: Receive, gone: Callable[[], Awaitable[None]]) -> AsyncIterator[None]:
    """Call ``gone`` if the client goes away while the block runs.

    Per request, so asyncio gets a plain task (~4 us; an anyio task group with its cancel
    costs ~90 us: anyio puts the task's repr in every cancel reason); trio, a task group.
    ASGI servers answer ``receive()`` with ``http.disconnect`` once the response is
    complete, so the watch usually ends by itself.
    """
    watch = _Watch(receive, gone)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # trio
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch.run)
            try:
                yield
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.lowlevel.checkpoint()  # the watch sees the end
                if not watch.done:
                    tg.cancel_scope.cancel()
        return
    task = loop.create_task(watch.run())
    try:
        yield
    finally:
        task.cancel()  # a no-op when it has ended
        await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


async def relay(
    stream: TokenStream[Any],
    receive: Receive,
    send: Send,
    refuse: Callable[[LlamaError], Awaitable[None]],
) -> None:
    """Open ``stream`` and send its events on as SSE; ``refuse`` answers a failed open.

    A failure once the response has started becomes the error event llama-server itself
    sends (``data: {"error": ...}``), then the end of the response.
    """
    raw = stream.raw
    assert raw is not None, "relay() needs a stream from forward_stream()"
    sent = 0
    async with watching(receive, stream.aclose):  # aclose: safe from any task
        try:
            try:
                await stream.__aenter__()
            except LlamaError as exc:
                await refuse(exc)
                return
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            try:
                async for _ in stream:
                    data = _frame(raw)
                    raw.clear()
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                    sent += 1
                    if not sent & 3:
                        # Events already read are relayed without a wait; a client that
                        # left is only noticed by the loop (asyncio warns past 5 writes).
                        await anyio.lowlevel.checkpoint()
            except LlamaError as exc:
                if not isinstance(exc, StreamError):  # the server's own error event is in raw
                    raw.append(error_body(_status_of(exc), str(exc), "server_error"))
            else:
                last = len(raw) - 1
                while last >= 0 and raw[last] == _DONE:
                    last -= 1
                if last >= 0:
                    raw[last] = splice(raw[last], _final_fields(stream, raw[last]))
            tail = _frame(raw) if raw else b""
            raw.clear()
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()


def _status_of(exc: LlamaError) -> int:
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else 500
