"""Server-sent events: body bytes in, ``data`` payloads out.

Sans-IO and allocation-light: llama-server writes one ``data: {...}\\n\\n`` event per
token, so the common case is one ``split`` per read and one slice per event. Comments
(``:`` pings), ``event:``/``id:``/``retry:`` fields and CRLF line endings are handled by
the general path, which the hot path never touches.

An event that spans many reads is kept as a list of pieces and joined once, when its end
arrives; each read is scanned once. Work is linear in the bytes received, and one event
may not grow past ``max_event_bytes`` (a hostile or broken server cannot pin the loop or
fill memory with a single endless line).
"""

from __future__ import annotations

from .._errors import RemoteProtocolError

__all__ = ["DEFAULT_MAX_EVENT_BYTES", "SSEDecoder"]

DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024


class SSEDecoder:
    """Splits an SSE byte stream into the ``data`` payload of each event.

    ``feed`` appends finished payloads to ``events``; the consumer takes them from
    there (and clears the list) at its own pace. An event longer than
    ``max_event_bytes`` raises ``RemoteProtocolError``.
    """

    __slots__ = ("_cr", "_max", "_pending", "_size", "events")

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._pending: list[bytes] = []  # pieces of the event not yet complete
        self._size = 0  # their total length (stale while there are none)
        self._cr = False  # the last byte fed was a CR (an LF opening the next read is its pair)
        self._max = max_event_bytes
        self.events: list[bytes] = []

    def feed(self, data: bytes) -> None:
        if self._cr or b"\r" in data:
            data = self._normalize(data)  # rare: llama-server sends bare LF
        pending = self._pending
        if pending:
            # Only the new bytes are searched (and the one byte before them, for a blank
            # line split between reads), never those already pending: a long event costs
            # time linear in its length, and its pieces are joined once, at its end.
            if b"\n\n" in data or (data[:1] == b"\n" and pending[-1][-1:] == b"\n"):
                if len(pending) == 1:
                    data = pending[0] + data  # the usual case: an event split in two reads
                else:
                    pending.append(data)
                    data = b"".join(pending)
                pending.clear()
            else:
                if data:
                    pending.append(data)
                    self._size += len(data)
                    if self._size > self._max + 1:  # + an LF that may start the blank line
                        self._too_big()
                return
        blocks = data.split(b"\n\n")
        tail = blocks.pop()  # an event not yet complete (often b"")
        if tail:
            pending.append(tail)
            self._size = len(tail)
        if len(data) > self._max:
            self._check_sizes(blocks, tail)
        events = self.events
        for block in blocks:
            if block[:6] == b"data: " and b"\n" not in block:
                events.append(block[6:])
            else:
                payload = self._parse_block(block)
                if payload is not None:
                    events.append(payload)

    def backlog(self) -> int:
        """Finished events the consumer has not taken yet."""
        return len(self.events)

    @property
    def pending_bytes(self) -> int:
        """Bytes of an event not yet complete."""
        return self._size if self._pending else 0

    def _normalize(self, data: bytes) -> bytes:
        # CR and CRLF become LF, one read at a time; a CR that ends a read is a line end
        # at once, and an LF opening the next read is then the rest of that CRLF.
        if self._cr:
            self._cr = False
            if data[:1] == b"\n":
                data = data[1:]
        if b"\r" in data:
            self._cr = data.endswith(b"\r")
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        return data

    def _check_sizes(self, blocks: list[bytes], tail: bytes) -> None:
        if len(tail) > self._max + 1 or any(len(block) > self._max for block in blocks):
            self._too_big()

    def _too_big(self) -> None:
        self._pending.clear()
        raise RemoteProtocolError(
            f"the server sent an SSE event longer than {self._max} bytes "
            "(max_event_bytes); it is not a llama-server token stream, or raise the limit"
        )

    @staticmethod
    def _parse_block(block: bytes) -> bytes | None:
        data: list[bytes] = []
        for line in block.split(b"\n"):
            if not line or line.startswith(b":"):
                continue  # blank line or comment (llama-server's keep-alive ping)
            name, sep, value = line.partition(b":")
            if not sep:
                continue  # a field with no value: only `data` would matter, and it is empty
            if name == b"data":
                data.append(value[1:] if value.startswith(b" ") else value)
        return b"\n".join(data) if data else None
