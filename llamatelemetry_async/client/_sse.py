"""Server-sent events: body bytes in, ``data`` payloads out.

Sans-IO and allocation-light: llama-server writes one ``data: {...}\\n\\n`` event per
token, so the common case is one ``find`` and one slice per event. Comments (``:``
pings), ``event:``/``id:``/``retry:`` fields and CRLF line endings are handled by the
general path, which the hot path never touches.
"""

from __future__ import annotations

__all__ = ["SSEDecoder"]


class SSEDecoder:
    """Splits an SSE byte stream into the ``data`` payload of each event.

    ``feed`` appends finished payloads to ``events``; the consumer takes them from
    there (and clears the list) at its own pace.
    """

    __slots__ = ("_buf", "events")

    def __init__(self) -> None:
        self._buf = b""
        self.events: list[bytes] = []

    def feed(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            # Rare (llama-server sends bare LF); keep a trailing CR in case its LF follows.
            keep_cr = buf.endswith(b"\r")
            buf = buf[:-1] if keep_cr else buf
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if keep_cr:
                buf += b"\r"
        blocks = buf.split(b"\n\n")
        self._buf = blocks.pop()  # an event not yet complete (often b"")
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
        return len(self._buf)

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
