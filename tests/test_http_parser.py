"""The sans-IO HTTP/1.1 response parser behind the connection pool."""

from __future__ import annotations

import pytest

from llamatelemetry_async import ReadError, RemoteProtocolError
from llamatelemetry_async.client._http import _Parser

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
BODY = b"data: one\n\ndata: two\n\n"
CHUNKED = b"b\r\ndata: one\n\n\r\nB;ext=1\r\ndata: two\n\n\r\n0\r\nX-Trailer: y\r\n\r\n"


def _run(data: bytes, size: int, *, head_only: bool = False) -> tuple[_Parser, bytes]:
    parser = _Parser()
    parser.start(head_only=head_only)
    out: list[bytes] = []
    for i in range(0, len(data), size):
        parser.feed(data[i : i + size])
        if parser.head is not None and parser.sink is not out.append:
            parser.set_sink(out.append)
    return parser, b"".join(out)


@pytest.mark.parametrize("size", [1, 2, 5, 13, 1000])
def test_chunked_at_every_split(size: int) -> None:
    parser, body = _run(HEAD + CHUNKED, size)
    assert parser.done
    assert body == BODY
    assert parser.head is not None
    assert parser.head.status == 200
    assert parser.head.keep_alive
    assert parser.head.get(b"content-type") == b"text/event-stream"


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_content_length(size: int) -> None:
    data = b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    parser, body = _run(data, size)
    assert parser.done
    assert body == b"hello"
    assert parser.head is not None
    assert (parser.head.status, parser.head.reason, parser.head.keep_alive) == (
        404,
        "Not Found",
        False,
    )


def test_body_until_close_and_interim_response() -> None:
    parser, body = _run(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\n\r\nabc", 1000)
    assert not parser.done
    assert body == b"abc"
    parser.feed_eof()
    assert parser.done
    assert parser.head is not None
    assert not parser.head.keep_alive


def test_truncated_body_is_a_read_error() -> None:
    parser, _ = _run(HEAD + CHUNKED[:20], 1000)
    with pytest.raises(ReadError, match="before the response was complete"):
        parser.feed_eof()


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\naXX",
        b"SMTP 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nab",
    ],
)
def test_malformed_responses(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        _run(data, 1000)


def test_head_response_has_no_body() -> None:
    parser, body = _run(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", 1000, head_only=True)
    assert parser.done
    assert body == b""
