"""A loopback HTTP/1.1 server that replays llama-server-format SSE, for tests and benchmarks.

Run it in its own process, so that its CPU never counts against the client being measured::

    python -m llamatelemetry_async.testing._replay [--host 127.0.0.1] [--port 0]
                                                    [--tokens 50] [--rate 0]

It prints one line, ``listening on http://HOST:PORT``, once bound, and serves until SIGTERM or
SIGINT. From Python, :func:`replay_server` starts it as a child process and yields its URL.

Endpoints (POST with a JSON body unless said otherwise):

- ``/completion``: llama.cpp's native shape, streamed when ``"stream": true``.
- ``/v1/chat/completions``: OpenAI chat shape, ending with ``data: [DONE]``. The finish
  chunk carries ``usage`` and ``timings``; with ``stream_options.include_usage`` they come
  in a chunk of their own with ``"choices": []`` after it, as llama-server sends them.
- ``/v1/completions``: OpenAI text-completion shape, ending with ``data: [DONE]``.
- ``GET /stats``: ``{"connections_opened", "connections_open", "requests", ...}``
  (``requests`` leaves out ``/stats`` itself; ``connections_open`` includes the connection
  asking), plus how late paced writes ran against their deadlines (``paced_writes``,
  ``pacing_late_p50_ms``, ``pacing_late_p99_ms``, ``pacing_late_max_ms``) and its own CPU
  time (``process_cpu_s``), so a benchmark can tell this server falling behind from its
  client falling behind. ``GET /stats?reset=1``
  answers, then starts the pacing figures afresh.
- ``GET /health`` and ``GET /v1/models``, as llama-server answers them; ``GET /props`` with
  ``total_slots`` (``--slots``), so an engine can route many streams to one replay server.
- ``GET /requests``: ``{"requests": [{"method", "target", "headers": [[name, value], ...],
  "body"}]}``, the heads and the first 64 KiB of the bodies of the last 256 requests
  (oldest first; ``/stats`` and ``/requests`` left out), each header line as it came,
  repeated names included, so a test can read what a client sent (its ``traceparent``,
  the messages of a conversation's turns...). ``GET /requests?reset=1`` answers, then forgets them.
  :func:`recorded_requests` reads it.

Body fields: ``n_predict`` (``/completion``) or ``max_tokens`` / ``max_completion_tokens``
(OpenAI routes) set the token count (default ``--tokens``); ``"_replay_ping": true`` sends an
SSE comment ``: ping`` before the first token; ``"_replay_fault"`` picks a fault:

==================== ===============================================================
``malformed_json``   one event whose data is not JSON, after the first token
``bad_chunk``        an invalid chunk-size line after the first token, then close
``error_event``      after 2 tokens, ``data: {"error": ...}`` and a clean end
``close_mid_stream`` close the socket after 3 tokens, without the chunked terminator
``status_500``       HTTP 500 with an OpenAI-style error body (``server_error``)
``status_400``       HTTP 400 with an OpenAI-style error body (``invalid_request_error``)
``stall``            headers and one token, then nothing until the client goes away
==================== ===============================================================

A fault that needs k tokens raises the token count to k. Without streaming, ``stall`` sends
nothing, ``close_mid_stream`` closes before answering, ``malformed_json`` sends a body that is
not JSON and ``error_event`` answers 500.

Pacing: ``--rate R`` sends token i (from 1) of each stream at ``start + i/R``, absolute
deadlines so pacing never drifts; ``0`` writes one token per event-loop turn, as fast as the
socket takes it. Every token is its own chunked write, like llama-server's.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import enum
import http.client
import math
import os
import resource
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, Final, cast
from urllib.parse import urlsplit

import msgspec

__all__ = ["RecordedRequest", "main", "recorded_requests", "replay_server", "serve"]

_TOKEN_ID: Final = 123
_MAX_HEAD: Final = 64 * 1024
_MAX_BODY: Final = 16 * 1024 * 1024
_RECORDED: Final = 256  # request heads kept for GET /requests
_RECORDED_BODY: Final = 64 * 1024  # of each request's body, kept beside its head
_FINGERPRINT: Final = "b11434"
_TERMINATOR: Final = b"0\r\n\r\n"
_CONTENT: Final = " tok"
_JSON: Final = "application/json; charset=utf-8"

# How many tokens each fault needs before it fires.
_FAULT_MIN_TOKENS: Final = {
    "malformed_json": 1,
    "bad_chunk": 1,
    "error_event": 2,
    "close_mid_stream": 3,
    "stall": 1,
}
_FAULTS: Final = frozenset({*_FAULT_MIN_TOKENS, "status_500", "status_400"})

_ERROR_EVENT: Final = b'data: {"error":{"code":500,"message":"boom","type":"server_error"}}\n\n'


class _Op(enum.Enum):
    """Instructions a response generator yields besides bytes and deadlines."""

    STALL = enum.auto()  # wait, writing nothing, until the peer goes away
    CLOSE = enum.auto()  # close the connection now, whatever the response has sent


# A response is a generator of: bytes to write, a loop-clock deadline to wait for (0.0: the
# next loop turn), or an _Op. The connection drives it from callbacks, with no task per stream.
_Item = bytes | float | _Op
_Response = Generator[_Item, None, None]


def _chunk(payload: bytes) -> bytes:
    return b"%X\r\n%b\r\n" % (len(payload), payload)


_PING_CHUNK: Final = _chunk(b": ping\n\n")


def _head(status: str, content_type: str, keep_alive: bool, length: int | None) -> bytes:
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    # llama-server's own SSE headers; X-Accel-Buffering keeps proxies from batching events.
    extra = "X-Accel-Buffering: no\r\n" if content_type == "text/event-stream" else ""
    return (
        f"HTTP/1.1 {status}\r\n"
        "Server: llama.cpp-replay\r\n"
        f"Content-Type: {content_type}\r\n"
        f"{extra}{framing}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n"
        "Access-Control-Allow-Origin: *\r\n\r\n"
    ).encode("latin-1")


_STATUS_TEXT: Final = {
    200: "200 OK",
    400: "400 Bad Request",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
    413: "413 Content Too Large",
    431: "431 Request Header Fields Too Large",
    500: "500 Internal Server Error",
    501: "501 Not Implemented",
    505: "505 HTTP Version Not Supported",
}


def _json_response(status: int, body: bytes, keep_alive: bool) -> bytes:
    return _head(_STATUS_TEXT[status], _JSON, keep_alive, len(body)) + body


def _error_body(code: int, message: str, kind: str) -> bytes:
    return msgspec.json.encode({"error": {"code": code, "message": message, "type": kind}})


def _timings(prompt_n: int, n: int, prompt_s: float, predicted_s: float) -> dict[str, Any]:
    # Guard the rates against zero durations: unpaced runs can be faster than the clock.
    prompt_ms = max(prompt_s * 1000.0, 1e-3)
    predicted_ms = max(predicted_s * 1000.0, 1e-3)
    return {
        "cache_n": 0,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / max(prompt_n, 1),
        "prompt_per_second": 1000.0 * prompt_n / prompt_ms,
        "predicted_n": n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / max(n, 1),
        "predicted_per_second": 1000.0 * n / predicted_ms,
    }


def _usage(prompt_n: int, n: int) -> dict[str, int]:
    return {"completion_tokens": n, "prompt_tokens": prompt_n, "total_tokens": prompt_n + n}


def _text_tokens(value: object) -> int:
    """Estimate a prompt's token count the way a benchmark needs: stable, not exact."""
    if isinstance(value, str):
        return len(value) // 4 + 1
    if isinstance(value, list):
        if all(isinstance(v, int) for v in value):
            return max(len(value), 1)
        return sum(_text_tokens(v) for v in value)
    if isinstance(value, dict):
        return _text_tokens(value.get("content", value.get("text", "")))
    return 1


class _Request:
    """What a response generator needs to know about one request."""

    __slots__ = ("fault", "include_usage", "keep_alive", "n", "ping", "prompt_n", "rate", "stream")

    def __init__(
        self, body: dict[str, Any], n: int, prompt_n: int, rate: float, keep_alive: bool
    ) -> None:
        fault = body.get("_replay_fault")
        self.fault: str | None = fault if isinstance(fault, str) else None
        self.n = max(n, _FAULT_MIN_TOKENS.get(self.fault or "", 0))
        self.prompt_n = prompt_n
        self.rate = rate
        self.keep_alive = keep_alive
        self.stream = body.get("stream") is True
        self.ping = body.get("_replay_ping") is True
        options = body.get("stream_options")
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True


def _deadline(start: float, i: int, rate: float) -> float:
    return start + i / rate if rate > 0 else 0.0


def _status_fault(req: _Request) -> _Response | None:
    """Answer the faults that replace the whole response, or return None."""
    fault = req.fault
    if fault == "status_500" or (fault == "error_event" and not req.stream):
        body = _error_body(500, "replay failure", "server_error")
        return _once(_json_response(500, body, req.keep_alive))
    if fault == "status_400":
        body = _error_body(400, "replay failure", "invalid_request_error")
        return _once(_json_response(400, body, req.keep_alive))
    if req.stream:
        return None
    if fault == "stall":
        return _once(_Op.STALL)
    if fault == "close_mid_stream":
        return _once(_Op.CLOSE)
    if fault == "malformed_json":
        return _once(_json_response(200, b'{"content": not json', req.keep_alive))
    if fault == "bad_chunk":
        return _once(_head(_STATUS_TEXT[200], _JSON, False, None), b"zz\r\n", _Op.CLOSE)
    return None


def _once(*items: _Item) -> _Response:
    yield from items


def _token_events(
    loop: asyncio.AbstractEventLoop,
    req: _Request,
    token_chunk: Callable[[int], bytes],
    times: list[float],
) -> Generator[_Item, None, bool]:
    """Yield the headers and every token with its faults; return False if the stream ended.

    ``times`` receives the loop time of the first and the last token, for ``timings``.
    """
    start = loop.time()
    times[:] = [start, start]
    yield _head(_STATUS_TEXT[200], "text/event-stream", req.keep_alive, None)
    if req.ping:
        yield _PING_CHUNK
    fault, rate = req.fault, req.rate
    for i in range(1, req.n + 1):
        yield _deadline(start, i, rate)
        if i == 1:
            times[0] = loop.time()
        yield token_chunk(i)
        if fault is None:
            continue
        if fault == "stall":
            yield _Op.STALL
        elif fault == "malformed_json" and i == 1:
            yield _chunk(b'data: {"content": not json\n\n')
        elif fault == "bad_chunk" and i == 1:
            yield b"zz\r\ndata: {}\n\n\r\n"
            yield _Op.CLOSE
        elif fault == "error_event" and i == 2:
            yield _chunk(_ERROR_EVENT) + _TERMINATOR
            return False
        elif fault == "close_mid_stream" and i == 3:
            yield _Op.CLOSE
    times[1] = loop.time()
    return True


def _completion(loop: asyncio.AbstractEventLoop, req: _Request) -> _Response:
    """``POST /completion``: llama.cpp's native shape."""
    n, prompt_n = req.n, req.prompt_n
    if not req.stream:
        start = loop.time()
        if req.rate > 0:
            yield start + n / req.rate
        body = {
            "index": 0,
            "content": _CONTENT * n,
            "tokens": [],
            "id_slot": 0,
            "stop": True,
            "model": "replay",
            "tokens_predicted": n,
            "tokens_evaluated": prompt_n,
            "generation_settings": {"n_predict": n, "stream": False},
            "prompt": "",
            "has_new_line": False,
            "truncated": False,
            "stop_type": "limit",
            "stopping_word": "",
            "tokens_cached": prompt_n + n,
            "timings": _timings(prompt_n, n, 0.0, loop.time() - start),
        }
        yield _json_response(200, msgspec.json.encode(body), req.keep_alive)
        return

    prefix = (
        b'data: {"index":0,"content":"%b","tokens":[%d],"stop":false,"id_slot":0,'
        b'"tokens_predicted":' % (_CONTENT.encode(), _TOKEN_ID)
    )
    suffix = b',"tokens_evaluated":%d}\n\n' % prompt_n

    def token_chunk(i: int) -> bytes:
        return _chunk(b"%b%d%b" % (prefix, i, suffix))

    times: list[float] = []
    start = loop.time()
    if not (yield from _token_events(loop, req, token_chunk, times)):
        return
    final = {
        "index": 0,
        "content": "",
        "tokens": [],
        "id_slot": 0,
        "stop": True,
        "model": "replay",
        "tokens_predicted": n,
        "tokens_evaluated": prompt_n,
        "generation_settings": {"n_predict": n, "stream": True},
        "prompt": "",
        "has_new_line": False,
        "truncated": False,
        "stop_type": "limit",
        "stopping_word": "",
        "tokens_cached": prompt_n + n,
        "timings": _timings(prompt_n, n, times[0] - start, times[1] - times[0]),
    }
    yield _chunk(b"data: %b\n\n" % msgspec.json.encode(final)) + _TERMINATOR


def _openai(loop: asyncio.AbstractEventLoop, req: _Request, chat: bool) -> _Response:
    """``POST /v1/chat/completions`` and ``POST /v1/completions``: OpenAI shapes."""
    n, prompt_n = req.n, req.prompt_n
    created = int(time.time())
    ident = ("chatcmpl-" if chat else "cmpl-") + os.urandom(12).hex()
    if not req.stream:
        start = loop.time()
        if req.rate > 0:
            yield start + n / req.rate
        choice: dict[str, Any] = {"finish_reason": "length", "index": 0}
        if chat:
            choice["message"] = {"role": "assistant", "content": _CONTENT * n}
        else:
            choice.update(text=_CONTENT * n, logprobs=None)
        body = {
            "choices": [choice],
            "created": created,
            "model": "replay",
            "system_fingerprint": _FINGERPRINT,
            "object": "chat.completion" if chat else "text_completion",
            "usage": _usage(prompt_n, n),
            "id": ident,
            "timings": _timings(prompt_n, n, 0.0, loop.time() - start),
        }
        yield _json_response(200, msgspec.json.encode(body), req.keep_alive)
        return

    obj = "chat.completion.chunk" if chat else "text_completion"
    tail = (
        f',"created":{created},"id":"{ident}","model":"replay",'
        f'"system_fingerprint":"{_FINGERPRINT}","object":"{obj}"}}\n\n'
    ).encode()
    if chat:
        token_event = (
            b'data: {"choices":[{"finish_reason":null,"index":0,'
            b'"delta":{"content":"%b"}}]%b' % (_CONTENT.encode(), tail)
        )
        # llama-server sends the role chunk in the same write as the first token.
        role_event = (
            b'data: {"choices":[{"finish_reason":null,"index":0,'
            b'"delta":{"role":"assistant","content":null}}]%b' % tail
        )
        first_chunk = _chunk(role_event + token_event)
    else:
        token_event = (
            b'data: {"choices":[{"text":"%b","index":0,"logprobs":null,'
            b'"finish_reason":null}]%b' % (_CONTENT.encode(), tail)
        )
        first_chunk = _chunk(token_event)
    # Every token event of one stream is the same bytes: frame it once.
    next_chunk = _chunk(token_event)

    def token_chunk(i: int) -> bytes:
        return first_chunk if i == 1 else next_chunk

    times: list[float] = []
    start = loop.time()
    if not (yield from _token_events(loop, req, token_chunk, times)):
        return
    last: dict[str, Any] = {"finish_reason": "length", "index": 0}
    if chat:
        last["delta"] = {}
    else:
        last.update(text="", logprobs=None)
    common = {
        "created": created,
        "id": ident,
        "model": "replay",
        "system_fingerprint": _FINGERPRINT,
        "object": obj,
    }
    totals = {
        "usage": _usage(prompt_n, n),
        "timings": _timings(prompt_n, n, times[0] - start, times[1] - times[0]),
    }
    if chat and req.include_usage:
        # What llama-server sends when asked for usage: the finish chunk, then usage and
        # timings in a chunk of their own with no choices (the OpenAI streaming spec).
        finals = [{"choices": [last], **common}, {"choices": [], **common, **totals}]
    else:
        finals = [{"choices": [last], **common, **totals}]
    events = b"".join(b"data: %b\n\n" % msgspec.json.encode(e) for e in finals)
    yield _chunk(events + b"data: [DONE]\n\n") + _TERMINATOR


_LATE_PER_MS: Final = 4  # histogram buckets per millisecond of pacing lateness
_LATE_BUCKETS: Final = 1000 * _LATE_PER_MS  # up to 1 s; one more bucket holds the rest


class _Pacer:
    """Wakes paced connections in 1 ms slots: one loop timer per slot, not one per token.

    asyncio keeps timers in a heap whose comparisons run in Python; with 1,000 paced streams
    that heap was a large share of this server's CPU. The loop's selector sleeps in whole
    milliseconds anyway, so slotting costs no precision.
    """

    __slots__ = ("_loop", "_slots")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._slots: dict[int, list[_Connection]] = {}

    def schedule(self, connection: _Connection, deadline: float) -> int:
        """Wake ``connection`` at ``deadline`` (loop time) or just after; return the slot."""
        slot = math.ceil(deadline * 1000.0)
        waiting = self._slots.get(slot)
        if waiting is None:
            self._slots[slot] = [connection]
            self._loop.call_at(slot / 1000.0, self._fire, slot)
        else:
            waiting.append(connection)
        return slot

    def _fire(self, slot: int) -> None:
        for connection in self._slots.pop(slot, ()):
            connection.wake(slot)


class _State:
    """Server-wide settings and counters."""

    __slots__ = (
        "connections",
        "heads",
        "late",
        "late_max",
        "opened",
        "pacer",
        "rate",
        "requests",
        "slots",
        "tokens",
    )

    def __init__(
        self, tokens: int, rate: float, loop: asyncio.AbstractEventLoop, slots: int = 1
    ) -> None:
        self.tokens = tokens
        self.rate = rate
        self.slots = slots
        self.pacer = _Pacer(loop)
        self.opened = 0
        self.requests = 0
        self.connections: set[_Connection] = set()
        # The last requests' method, target and header lines, as they came (one append per
        # request: the lines are split already, and parsed only when /requests asks).
        self.heads: collections.deque[tuple[str, str, list[str], bytes]] = collections.deque(
            maxlen=_RECORDED
        )
        self.reset_pacing()

    def reset_pacing(self) -> None:
        # A histogram, not samples: a long run must not grow memory per token.
        self.late = [0] * (_LATE_BUCKETS + 1)
        self.late_max = 0.0

    def record_late(self, seconds: float) -> None:
        ms = seconds * 1000.0
        self.late_max = max(self.late_max, ms)
        self.late[min(int(ms * _LATE_PER_MS), _LATE_BUCKETS)] += 1

    def late_quantile(self, q: float) -> float:
        """Upper edge (ms) of the bucket holding quantile ``q`` of pacing lateness."""
        total = sum(self.late)
        seen = 0
        for index, count in enumerate(self.late):
            seen += count
            if total and seen >= q * total:
                return (index + 1) / _LATE_PER_MS
        return 0.0

    def stats(self) -> dict[str, float]:
        return {
            "connections_opened": self.opened,
            "connections_open": len(self.connections),
            "requests": self.requests,
            "paced_writes": sum(self.late),
            "pacing_late_p50_ms": self.late_quantile(0.5),
            "pacing_late_p99_ms": self.late_quantile(0.99),
            "pacing_late_max_ms": round(self.late_max, 3),
            "process_cpu_s": round(time.process_time(), 6),
        }

    def recorded(self) -> dict[str, Any]:
        requests = []
        for method, target, lines, body in self.heads:
            headers = []
            for line in lines:
                name, _, value = line.partition(":")
                headers.append([name.strip(), value.strip()])
            text = body.decode("utf-8", "replace")
            requests.append({"method": method, "target": target, "headers": headers, "body": text})
        return {"requests": requests}


class _Connection(asyncio.Protocol):
    """One client connection: parses requests in order and drives one response at a time."""

    __slots__ = (
        "_blocked",
        "_buf",
        "_due",
        "_due_slot",
        "_handle",
        "_keep_alive",
        "_loop",
        "_parsing",
        "_paused",
        "_response",
        "_state",
        "_transport",
    )

    def __init__(self, state: _State, loop: asyncio.AbstractEventLoop) -> None:
        self._state = state
        self._loop = loop
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._response: _Response | None = None
        self._handle: asyncio.Handle | None = None
        self._keep_alive = True
        self._paused = False
        self._blocked = False  # a write was held back by flow control
        self._due = 0.0  # the deadline a pacing timer waits for, 0.0 when none
        self._due_slot = 0  # the pacer's slot for it; 0 when none (a stale wake is ignored)
        self._parsing = False

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._state.opened += 1
        self._state.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._response is None:
            self._parse()
        elif len(self._buf) > _MAX_HEAD + _MAX_BODY:
            # A client pipelining without reading: refuse to buffer without bound.
            self.abort()

    def eof_received(self) -> bool:
        return False  # a half-closed client is gone: close, which also ends a stall

    def connection_lost(self, exc: Exception | None) -> None:
        self._state.connections.discard(self)
        self._drop_response()
        self._buf.clear()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._blocked:
            self._blocked = False
            self._pump()

    # -- helpers ----------------------------------------------------------------------------

    def abort(self) -> None:
        """Drop the connection at once (server shutdown, misbehaving client)."""
        self._drop_response()
        if self._transport is not None:
            self._transport.abort()

    def wake(self, slot: int) -> None:
        """The pacer's call: a paced deadline came (unless this wait was dropped since)."""
        if slot == self._due_slot:
            self._due_slot = 0
            self._pump()

    def _drop_response(self) -> None:
        self._due_slot = 0
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._response is not None:
            self._response.close()
            self._response = None

    def _parse(self) -> None:
        """Handle every complete request in the buffer, one response at a time."""
        if self._parsing:
            return  # a response finished synchronously: the loop below goes on
        self._parsing = True
        try:
            while self._response is None and self._buf and not self._closing():
                if not self._parse_one():
                    return
        finally:
            self._parsing = False

    def _closing(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    def _parse_one(self) -> bool:
        """Start the response to the first buffered request; False if it is incomplete."""
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEAD:
                self._reject(431, "request head too large")
            return False
        lines = buf[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            self._reject(400, "bad request line")
            return False
        method, target, version = parts
        if version != "HTTP/1.1":
            self._reject(505, "only HTTP/1.1 is served")
            return False
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                self._reject(400, "bad header line")
                return False
            headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers:
            self._reject(501, "chunked request bodies are not supported")
            return False
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= _MAX_BODY:
            self._reject(413 if length > 0 else 400, "bad Content-Length")
            return False
        total = end + 4 + length
        if len(buf) < total:
            return False
        body = bytes(buf[end + 4 : total])
        del buf[:total]
        keep_alive = "close" not in headers.get("connection", "").lower()
        self._start(self._route(method, target, body, keep_alive, lines), keep_alive)
        return True

    def _reject(self, status: int, message: str) -> None:
        """Answer a request that cannot be parsed, then close: the stream is out of sync."""
        body = _error_body(status, message, "invalid_request_error")
        self._buf.clear()
        self._start(_once(_json_response(status, body, False)), False)

    def _route(
        self, method: str, target: str, raw: bytes, keep_alive: bool, lines: list[str]
    ) -> _Response:
        state = self._state
        path, _, query = target.partition("?")
        if method == "GET":
            if path == "/stats":
                body = msgspec.json.encode(state.stats())
                if query == "reset=1":
                    state.reset_pacing()
                return _once(_json_response(200, body, keep_alive))
            if path == "/requests":
                body = msgspec.json.encode(state.recorded())
                if query == "reset=1":
                    state.heads.clear()
                return _once(_json_response(200, body, keep_alive))
        state.requests += 1
        state.heads.append((method, target, lines[1:], raw[:_RECORDED_BODY]))
        if method == "GET":
            if path == "/health":
                return _once(_json_response(200, b'{"status":"ok"}', keep_alive))
            if path == "/props":  # what an engine reads to size its routing
                body = msgspec.json.encode({"total_slots": state.slots, "model_path": "replay"})
                return _once(_json_response(200, body, keep_alive))
            if path == "/v1/models":
                model = {"id": "replay", "object": "model", "created": 0, "owned_by": "llamacpp"}
                body = msgspec.json.encode({"object": "list", "data": [model]})
                return _once(_json_response(200, body, keep_alive))
        if path not in ("/completion", "/completions", "/v1/chat/completions", "/v1/completions"):
            body = _error_body(404, "File Not Found", "not_found_error")
            return _once(_json_response(404, body, keep_alive))
        if method != "POST":
            body = _error_body(405, f"{method} not allowed", "invalid_request_error")
            return _once(_json_response(405, body, keep_alive))
        try:
            decoded = msgspec.json.decode(raw) if raw else {}
        except msgspec.DecodeError as exc:
            body = _error_body(400, f"body is not JSON: {exc}", "invalid_request_error")
            return _once(_json_response(400, body, keep_alive))
        if not isinstance(decoded, dict):
            body = _error_body(400, "body must be a JSON object", "invalid_request_error")
            return _once(_json_response(400, body, keep_alive))
        fault = decoded.get("_replay_fault")
        if fault is not None and fault not in _FAULTS:
            body = _error_body(400, f"unknown _replay_fault {fault!r}", "invalid_request_error")
            return _once(_json_response(400, body, keep_alive))

        native = path in ("/completion", "/completions")
        if native:
            count = decoded.get("n_predict")
            prompt_n = _text_tokens(decoded.get("prompt", ""))
        else:
            count = decoded.get("max_completion_tokens", decoded.get("max_tokens"))
            source = decoded.get("messages") if path == "/v1/chat/completions" else None
            # A chat template adds a few tokens per message.
            prompt_n = (
                _text_tokens(source) + 4 * len(source)
                if isinstance(source, list)
                else _text_tokens(decoded.get("prompt", ""))
            )
        # llama.cpp reads a negative n_predict as "until end of generation": use the default.
        n = count if isinstance(count, int) and count >= 0 else state.tokens
        req = _Request(decoded, n, prompt_n, state.rate, keep_alive)
        replaced = _status_fault(req)
        if replaced is not None:
            return replaced
        if native:
            return _completion(self._loop, req)
        return _openai(self._loop, req, chat=path == "/v1/chat/completions")

    def _start(self, response: _Response, keep_alive: bool) -> None:
        self._response = response
        self._keep_alive = keep_alive
        self._pump()

    def _pump(self) -> None:
        """Run the response generator until it waits, stalls or ends."""
        self._handle = None
        if self._due:
            # How late the loop ran this timer: shows whether this server keeps its pace.
            self._state.record_late(self._loop.time() - self._due)
            self._due = 0.0
        response = self._response
        transport = self._transport
        if response is None or transport is None:
            return
        write = transport.write
        while True:
            if transport.is_closing():
                self._drop_response()
                return
            if self._paused:
                self._blocked = True
                return
            try:
                item = next(response)
            except StopIteration:
                self._response = None
                if not self._keep_alive:
                    transport.close()
                elif self._buf:
                    self._parse()
                return
            if isinstance(item, bytes):
                write(item)
            elif isinstance(item, float):
                if item > 0:
                    self._due = item
                    self._due_slot = self._state.pacer.schedule(self, item)
                else:
                    self._handle = self._loop.call_soon(self._pump)
                return
            elif item is _Op.CLOSE:
                self._drop_response()
                transport.close()
                return
            else:  # _Op.STALL: connection_lost ends it
                return


async def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    tokens: int = 50,
    rate: float = 0.0,
    slots: int = 1,
    on_listening: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set (forever when it is None); report the URL once bound.

    ``slots`` is what ``/props`` reports as ``total_slots`` (streams are never limited).
    """
    loop = asyncio.get_running_loop()
    state = _State(tokens, rate, loop, slots)
    # A large backlog: a benchmark opens 1,000 connections at once, and a full accept queue
    # turns into SYN retries a second apart.
    server = await loop.create_server(
        lambda: _Connection(state, loop), host, port, backlog=4096, reuse_address=True
    )
    try:
        bound = server.sockets[0].getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        if on_listening is not None:
            on_listening(f"http://{shown}:{bound[1]}")
        await (stop or asyncio.Event()).wait()
    finally:
        server.close()
        for connection in list(state.connections):
            connection.abort()
        await server.wait_closed()


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):  # best effort: the default may do
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.watch_stdin:
        # The parent holds our stdin open: EOF means it died, so do not outlive it.
        def on_stdin() -> None:
            try:
                data = os.read(0, 4096)
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(0)
                stop.set()

        loop.add_reader(0, on_stdin)

    def on_listening(url: str) -> None:
        print(f"listening on {url}", flush=True)

    await serve(
        args.host,
        args.port,
        tokens=args.tokens,
        rate=args.rate,
        slots=args.slots,
        on_listening=on_listening,
        stop=stop,
    )


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m llamatelemetry_async.testing._replay",
        description="Replay llama-server-format SSE on a loopback port, as fast as possible.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--tokens", type=int, default=50, help="tokens per response by default")
    parser.add_argument("--rate", type=float, default=0.0, help="tokens/s per stream; 0: unpaced")
    parser.add_argument(
        "--slots", type=int, default=1, help="total_slots reported by /props (default 1)"
    )
    parser.add_argument("--watch-stdin", action="store_true", help="exit when stdin closes")
    args = parser.parse_args(argv)
    if args.tokens < 0 or args.rate < 0:
        parser.error("--tokens and --rate must not be negative")
    if args.slots < 1:
        parser.error("--slots must be at least 1")
    _raise_fd_limit()
    asyncio.run(_main(args))


@contextlib.contextmanager
def replay_server(
    *,
    tokens: int = 50,
    rate: float = 0.0,
    slots: int = 1,
    host: str = "127.0.0.1",
    startup_timeout: float = 30.0,
) -> Iterator[str]:
    """Run the replay server in a child process; yield its base URL; stop and reap it on exit."""
    argv = [
        sys.executable,
        "-m",
        "llamatelemetry_async.testing._replay",
        "--host",
        host,
        "--port",
        "0",
        "--tokens",
        str(tokens),
        "--rate",
        repr(float(rate)),
        "--slots",
        str(slots),
        "--watch-stdin",
    ]
    # Make the package importable in the child even when it is not installed.
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        yield _read_url(proc, startup_timeout)
    finally:
        _stop(proc)


class RecordedRequest:
    """The head of one request a replay server received (see :func:`recorded_requests`)."""

    __slots__ = ("body", "headers", "method", "target")

    def __init__(
        self, method: str, target: str, headers: list[tuple[str, str]], body: str = ""
    ) -> None:
        self.method = method
        self.target = target
        """The request target: the path, with its query if any."""
        self.headers = headers
        """Every header line as ``(name, value)``, in order, repeated names included."""
        self.body = body
        """The request's body as text (its first 64 KiB; undecodable bytes replaced)."""

    def json(self) -> Any:
        """The body decoded as JSON."""
        return msgspec.json.decode(self.body)

    def header(self, name: str) -> list[str]:
        """Every value sent under ``name`` (any case): empty if none, two if sent twice."""
        lowered = name.lower()
        return [value for key, value in self.headers if key.lower() == lowered]

    def __repr__(self) -> str:
        return f"<RecordedRequest {self.method} {self.target}>"


def recorded_requests(
    url: str, *, reset: bool = False, timeout: float = 10.0
) -> list[RecordedRequest]:
    """The heads of the last requests the replay server at ``url`` received, oldest first.

    Blocking (a loopback round trip, without proxies); ``reset=True`` forgets them after
    reading, so the next call sees only newer requests.
    """
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(
        parts.hostname or "127.0.0.1", parts.port, timeout=timeout
    )
    try:
        connection.request("GET", "/requests?reset=1" if reset else "/requests")
        response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET /requests answered {response.status}: {data[:200]!r}")
    finally:
        connection.close()
    decoded = msgspec.json.decode(data)
    return [
        RecordedRequest(r["method"], r["target"], [(k, v) for k, v in r["headers"]], r["body"])
        for r in decoded["requests"]
    ]


def _read_url(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """Read the ``listening on URL`` line within ``timeout`` seconds."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    data = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"replay server did not start within {timeout} s")
            if not selector.select(remaining):
                continue
            more = os.read(fd, 4096)
            if not more:
                code = proc.wait(timeout=5)
                raise RuntimeError(f"replay server exited with code {code} before listening")
            data += more
    line = data.partition(b"\n")[0].decode().strip()
    prefix = "listening on "
    if not line.startswith(prefix):
        raise RuntimeError(f"unexpected first line from the replay server: {line!r}")
    return line.removeprefix(prefix)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate, wait, kill if it will not go, and always reap."""
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
    finally:
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


if __name__ == "__main__":
    main()
