"""Property-based tests of the two sans-IO parsers on the wire: SSE and HTTP/1.1 responses.

For any split of a valid byte stream into reads, the parsers give what the whole stream
gives; for any bytes at all, they raise nothing but the library's own errors.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from llamatelemetry_async import LlamaError, UsageError
from llamatelemetry_async.client._headers import check_header, check_request_head
from llamatelemetry_async.client._parser import ResponseParser
from llamatelemetry_async.client._sse import SSEDecoder

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    out: list[bytes] = []
    start = 0
    for point in [*points, len(data)]:
        out.append(data[start:point])  # empty reads included: a parser must take them
        start = point
    return out


cuts = st.lists(st.integers(min_value=0, max_value=4096), max_size=24)

# ------------------------------------------------------------------------------ SSE

line_text = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
newline = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def sse_streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A valid SSE stream and the ``data`` payload of each of its events."""
    stream = b""
    expected: list[bytes] = []

    def end_line() -> bytes:
        # CR then LF would be one CRLF, not two line ends: after a CR, an LF comes as CRLF.
        nl = draw(newline)
        return b"\r\n" if nl == b"\n" and stream.endswith(b"\r") else nl

    for _ in range(draw(st.integers(0, 6))):
        data: list[bytes] = []
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(["data", "data", "comment", "field"]))
            value = draw(line_text)
            if kind == "data":
                space = draw(st.booleans())
                stream += b"data:" + (b" " if space else b"") + value
                # One leading space is part of the syntax, not of the value.
                data.append(value if space or not value.startswith(b" ") else value[1:])
            elif kind == "comment":
                stream += b":" + value
            else:
                stream += draw(st.sampled_from([b"event", b"id", b"retry"])) + b": " + value
            stream += end_line()
        stream += end_line()  # the blank line that ends the event
        if data:
            expected.append(b"\n".join(data))
    return stream, expected


@SETTINGS
@given(sse_streams(), cuts)
def test_sse_any_split_gives_the_same_events(
    case: tuple[bytes, list[bytes]], cut: list[int]
) -> None:
    stream, expected = case
    decoder = SSEDecoder()
    for piece in _pieces(stream, cut):
        decoder.feed(piece)
    assert decoder.events == expected
    assert decoder.pending_bytes == 0


@SETTINGS
@given(st.binary(max_size=600), cuts)
def test_sse_split_never_changes_the_outcome(data: bytes, cut: list[int]) -> None:
    whole = SSEDecoder()
    whole.feed(data)
    split = SSEDecoder()
    for piece in _pieces(data, cut):
        split.feed(piece)
    assert split.events == whole.events


@SETTINGS
@given(st.binary(max_size=600), cuts, st.integers(min_value=1, max_value=64))
def test_sse_arbitrary_bytes_raise_only_library_errors(
    data: bytes, cut: list[int], limit: int
) -> None:
    decoder = SSEDecoder(max_event_bytes=limit)
    try:
        for piece in _pieces(data, cut):
            decoder.feed(piece)
    except LlamaError:
        pass  # an event over the (small) limit: the only error the decoder has


@SETTINGS
@given(st.integers(min_value=1, max_value=200), cuts)
def test_sse_event_size_cap_holds_for_any_split(limit: int, cut: list[int]) -> None:
    ok = b"data: " + b"x" * (limit - 6) + b"\n\n" if limit > 6 else b""
    too_big = b"data: " + b"y" * limit + b"\n\n"
    decoder = SSEDecoder(max_event_bytes=limit)
    for piece in _pieces(ok, cut):
        decoder.feed(piece)
    assert decoder.events == ([b"x" * (limit - 6)] if ok else [])
    with pytest.raises(LlamaError, match="longer than"):
        for piece in _pieces(too_big, cut):
            decoder.feed(piece)


# ------------------------------------------------------------------------------ HTTP/1.1

token = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).map(str.encode)
header_value = st.binary(max_size=30).map(
    lambda b: bytes(c for c in b if c == 9 or 32 <= c < 127).strip()
)


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, int, list[tuple[bytes, bytes]], bytes]:
    """A valid response: wire bytes, status, headers (as the parser reports them), body."""
    status = draw(st.sampled_from([200, 201, 400, 404, 500, 503]))
    body = draw(st.binary(max_size=300))
    headers = [
        (b"x-" + name, value)
        for name, value in draw(st.lists(st.tuples(token, header_value), max_size=4))
    ]
    interim = draw(st.booleans())
    if draw(st.booleans()):
        headers.append((b"content-length", b"%d" % len(body)))
        wire_body = body
    else:
        headers.append((b"transfer-encoding", b"chunked"))
        wire_body = b""
        rest = body
        while rest:
            size = draw(st.integers(1, len(rest)))
            chunk, rest = rest[:size], rest[size:]
            ext = draw(st.sampled_from([b"", b";a=b", b" ;x"]))
            hex_size = draw(st.sampled_from([b"%x", b"%X", b"%04x"])) % size
            wire_body += hex_size + ext + b"\r\n" + chunk + b"\r\n"
        wire_body += b"0\r\n"
        if draw(st.booleans()):
            wire_body += b"X-Trailer: t\r\n"
        wire_body += b"\r\n"
    head = b"HTTP/1.1 %d Reason\r\n" % status
    for name, value in headers:
        spaced = draw(st.sampled_from([b": ", b":", b":  "]))
        head += name + spaced + value + b"\r\n"
    wire = (b"HTTP/1.1 100 Continue\r\n\r\n" if interim else b"") + head + b"\r\n" + wire_body
    return wire, status, headers, body


def _parse(pieces: list[bytes]) -> tuple[ResponseParser, bytes]:
    parser = ResponseParser()
    parser.start(head_only=False)
    out: list[bytes] = []
    for piece in pieces:
        parser.feed(piece)
        if parser.head is not None and parser.sink is not out.append:
            parser.set_sink(out.append)
    return parser, b"".join(out)


@SETTINGS
@given(responses(), cuts)
def test_http_any_split_gives_the_same_head_and_body(
    case: tuple[bytes, int, list[tuple[bytes, bytes]], bytes], cut: list[int]
) -> None:
    wire, status, headers, body = case
    parser, got = _parse(_pieces(wire, cut))
    assert parser.done
    assert parser.head is not None
    assert parser.head.status == status
    assert parser.head.headers == headers
    assert parser.head.keep_alive
    assert got == body


@SETTINGS
@given(st.binary(max_size=600), cuts, st.booleans())
def test_http_arbitrary_bytes_raise_only_library_errors(
    data: bytes, cut: list[int], with_head: bool
) -> None:
    if with_head:  # past the head, so the body framing code sees the noise too
        data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + data
    try:
        parser, _ = _parse(_pieces(data, cut))
        if parser.head is not None:
            parser.set_sink(lambda _: None)
        parser.feed_eof()
    except LlamaError:
        pass


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=1, max_value=1500), cuts)
def test_http_interim_responses_in_one_read_stay_flat(count: int, cut: list[int]) -> None:
    wire = b"HTTP/1.1 100 Continue\r\n\r\n" * count + b"HTTP/1.1 204 No Content\r\n\r\n"
    parser, body = _parse(_pieces(wire, cut))
    assert parser.done
    assert parser.head is not None
    assert parser.head.status == 204
    assert body == b""


# ------------------------------------------------------------------------------ headers


@SETTINGS
@given(st.text(max_size=20), st.text(max_size=40))
def test_any_header_is_refused_or_keeps_the_request_whole(name: str, value: str) -> None:
    try:
        raw_name, raw_value = check_header(name, value)
    except UsageError:
        return  # refused, with the library's error
    head = b"GET /health HTTP/1.1\r\n%s: %s\r\n\r\n" % (raw_name, raw_value)
    check_request_head(head)  # what the pool checks before writing
    assert head.count(b"\r\n") == 3  # one request line, one header line, one blank line
    assert b"\n" not in raw_value
    assert b"\r" not in raw_value
