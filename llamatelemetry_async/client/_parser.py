"""Sans-IO HTTP/1.1 response parser shared by both connection kinds.

Bytes go in through ``feed`` (on the loop, inside ``data_received``, for the asyncio
connection; in the reader for the anyio one); the head is parsed into a
``ResponseHead`` and body bytes go to ``sink`` as they arrive. The parser owns its own
lifecycle: ``start`` before a request, ``reset`` once the exchange is over.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from .._errors import ReadError, RemoteProtocolError, TransportError

__all__ = ["ResponseHead", "ResponseParser", "locate", "request_url"]

# Parser states.
_HEAD: Final = 0
_CHUNK_SIZE: Final = 1
_CHUNK_DATA: Final = 2
_CHUNK_END: Final = 3
_TRAILERS: Final = 4
_LENGTH: Final = 5
_UNTIL_CLOSE: Final = 6
_DONE: Final = 7
_IDLE: Final = 8

_MAX_HEAD = 64 * 1024


class ResponseHead:
    """Status line and headers of a response (header names lower-cased)."""

    __slots__ = ("headers", "keep_alive", "reason", "status")

    def __init__(
        self, status: int, reason: str, headers: list[tuple[bytes, bytes]], keep_alive: bool
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.keep_alive = keep_alive

    def get(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class ResponseParser:
    """Sans-IO HTTP/1.1 response parser; body bytes go to ``sink`` as they arrive."""

    __slots__ = (
        "_buf",
        "_early",
        "_hbuf",
        "_head_only",
        "_held",
        "_remaining",
        "eof_pending",
        "head",
        "origin",
        "request_head",
        "sink",
        "state",
    )

    def __init__(self, origin: tuple[str, int] = ("", 0)) -> None:
        self.state: int = _IDLE
        self.head: ResponseHead | None = None
        # Where the request in flight went: errors name its URL.
        self.origin = origin
        self.request_head = b""
        self.sink: Callable[[bytes], object] = _discard
        self._buf = b""
        # A head that spans reads collects here (amortized O(1) appends: a server that
        # trickles its head byte by byte costs linear time, not quadratic).
        self._hbuf = bytearray()
        self._remaining = 0
        self._head_only = False
        # Body bytes that arrive before the reader has chosen a sink are held here.
        self._held = False
        self._early = b""
        self.eof_pending = False

    def start(self, *, head_only: bool) -> None:
        self.state = _HEAD
        self.head = None
        self.sink = _discard
        self._buf = b""
        self._hbuf.clear()
        self._head_only = head_only
        self._held = True
        self._early = b""
        self.eof_pending = False

    def set_sink(self, sink: Callable[[bytes], object]) -> None:
        """Route body bytes to ``sink``, starting with any that arrived with the head."""
        self.sink = sink
        self._held = False
        early, self._early = self._early, b""
        try:
            if early:
                self.feed(early)
            if self.eof_pending:
                self.eof_pending = False
                self.feed_eof()
        except TransportError as exc:
            locate(exc, self.url)  # raised while the reader takes the body, not on the loop
            raise

    @property
    def url(self) -> str:
        """The URL of the request in flight (or the last one)."""
        return request_url(*self.origin, self.request_head)

    def reset(self) -> None:
        """End the exchange: idle until the next ``start``, body bytes going nowhere.

        Bytes that arrive while idle are an error (data after the end of the response).
        """
        self.state = _IDLE
        self.sink = _discard
        self._held = False

    @property
    def done(self) -> bool:
        return self.state == _DONE

    @property
    def incomplete(self) -> bool:
        """True while a response is expected or being read and has not ended."""
        return self.state not in (_DONE, _IDLE)

    def feed(self, data: bytes) -> None:
        state = self.state
        if state == _HEAD:
            data = self._feed_head(data)
            state = self.state
            if not data:
                return
            if state == _DONE:
                self._extra_data()  # a body after a head that announced none
        if self._held:
            self._early += data
            return
        if _CHUNK_SIZE <= state <= _TRAILERS:
            self._feed_chunked(data)
        elif state == _LENGTH:
            take = min(self._remaining, len(data))
            self.sink(data[:take] if take < len(data) else data)
            self._remaining -= take
            if not self._remaining:
                self.state = _DONE
                if take < len(data):
                    self._extra_data()
        elif state == _UNTIL_CLOSE:
            self.sink(data)
        elif state in (_DONE, _IDLE) and data:
            self._extra_data()

    def feed_eof(self) -> None:
        if self._held and self.head is not None:
            self.eof_pending = True  # the reader has not taken the body yet
            return
        if self.state == _UNTIL_CLOSE:
            self.state = _DONE
        elif self.state not in (_DONE, _IDLE):
            raise ReadError("the server closed the connection before the response was complete")

    def _extra_data(self) -> None:
        raise RemoteProtocolError("the server sent data after the end of the response")

    def _feed_head(self, data: bytes) -> bytes:
        hbuf = self._hbuf
        if hbuf:
            start = len(hbuf) - 3 if len(hbuf) > 3 else 0  # a CRLFCRLF split by reads
            hbuf += data
            if hbuf.find(b"\r\n\r\n", start) < 0:
                if len(hbuf) > _MAX_HEAD:
                    raise RemoteProtocolError("response headers exceed 64 KiB")
                return b""
            data = bytes(hbuf)
            hbuf.clear()
        # The usual case is the whole head in one read: one find, no copy. A loop (not
        # recursion, nor a copy of the rest per head) walks a burst of interim 1xx heads.
        pos = 0
        while True:
            end = data.find(b"\r\n\r\n", pos)
            if end < 0:
                if len(data) - pos > _MAX_HEAD:
                    raise RemoteProtocolError("response headers exceed 64 KiB")
                hbuf += data[pos:] if pos else data
                return b""
            if end + 4 - pos > _MAX_HEAD:  # however it arrived, in one read or many
                raise RemoteProtocolError("response headers exceed 64 KiB")
            if self._parse_head(data[pos:end]):
                return data[end + 4 :]
            pos = end + 4  # an interim response: the real one follows
            if pos == len(data):
                return b""

    def _parse_head(self, block: bytes) -> bool:
        """Take one head; ``False`` for an interim (1xx) response, whose successor follows."""
        lines = block.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        status_text, _, reason = rest.partition(b" ")
        if not version.startswith(b"HTTP/1.") or len(status_text) != 3 or not status_text.isdigit():
            raise RemoteProtocolError(f"malformed status line {lines[0][:100]!r}")
        status = int(status_text)
        if 100 <= status < 200:
            return False
        headers: list[tuple[bytes, bytes]] = []
        chunked = False
        length: int | None = None
        keep_alive = version == b"HTTP/1.1"
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise RemoteProtocolError(f"malformed header line {line[:100]!r}")
            name = name.strip().lower()
            value = value.strip()
            headers.append((name, value))
            if name == b"transfer-encoding":
                # The last coding decides; anything but chunked is read until close.
                chunked = value.rpartition(b",")[2].strip().lower() == b"chunked"
            elif name == b"content-length":
                if not value.isdigit():
                    raise RemoteProtocolError(f"malformed Content-Length {value[:40]!r}")
                if length is not None and int(value) != length:
                    # Two lengths: which one frames the body is ambiguous (a smuggling
                    # vector through proxies), so neither is trusted.
                    raise RemoteProtocolError("conflicting Content-Length headers")
                length = int(value)
            elif name == b"connection":
                keep_alive = b"close" not in value.lower()
        self.head = ResponseHead(status, reason.decode("latin-1"), headers, keep_alive)
        if self._head_only or status in (204, 304):
            self.state = _DONE
        elif chunked:
            self.state = _CHUNK_SIZE
        elif length is not None:
            self._remaining = length
            self.state = _LENGTH if length else _DONE
        else:
            self.state = _UNTIL_CLOSE
            self.head.keep_alive = False
        if self.state == _DONE:
            self._held = False
        return True

    def _feed_chunked(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos = 0
        end = len(buf)
        state = self.state
        # Whole chunks are the common case (llama-server writes one event per chunk, and a
        # read often holds many): they take one pass each, and the sink is called once.
        out: list[bytes] = []
        while pos < end:
            if state == _CHUNK_SIZE:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos > 1024:
                        raise RemoteProtocolError("chunk-size line too long")
                    break
                size = _chunk_size(buf[pos:eol])
                pos = eol + 2
                if not size:
                    state = _TRAILERS
                    continue
                stop = pos + size
                if stop + 2 <= end:
                    if buf[stop : stop + 2] != b"\r\n":
                        raise RemoteProtocolError("chunk data not followed by CRLF")
                    out.append(buf[pos:stop])
                    pos = stop + 2
                    continue
                self._remaining = size
                state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                take = min(self._remaining, end - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    state = _CHUNK_END
            elif state == _CHUNK_END:
                if end - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise RemoteProtocolError("chunk data not followed by CRLF")
                pos += 2
                state = _CHUNK_SIZE
            elif state == _TRAILERS:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos > _MAX_HEAD:
                        raise RemoteProtocolError("a trailer line exceeds 64 KiB")
                    break
                blank = eol == pos  # the empty line that ends the trailers
                pos = eol + 2
                if blank:
                    state = _DONE
                    break
            else:  # _DONE
                break
        self.state = state
        self._buf = buf[pos:] if pos < end else b""
        if out:
            self.sink(out[0] if len(out) == 1 else b"".join(out))
        if state == _DONE and self._buf:
            self._buf = b""
            self._extra_data()


_HEX: Final = b"0123456789abcdefABCDEF"


def _chunk_size(line: bytes) -> int:
    # Hex digits only: int(x, 16) alone would also take "0x1f", "1_0", "+5" and spaces,
    # which another parser on the path (a proxy) may read differently.
    if line and not line.strip(_HEX):
        return int(line, 16)
    size, sep, _ = line.partition(b";")  # a chunk extension: rare, ignored
    size = size.rstrip(b" \t")
    if sep and size and not size.strip(_HEX):
        return int(size, 16)
    raise RemoteProtocolError(f"malformed chunk size {line[:40]!r}")


def _discard(data: bytes) -> None:
    return None


def locate(exc: TransportError, url: str) -> TransportError:
    """Name ``url`` in a transport error raised where the URL was not known (the parser)."""
    if exc.url is None:
        exc.url = url
        exc.args = (f"{exc.args[0] if exc.args else type(exc).__name__} ({url})",)
    return exc


def request_url(host: str, port: int, head: bytes) -> str:
    parts = head.split(b" ", 2)
    target = parts[1].decode("latin-1") if len(parts) == 3 else ""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{target}"
