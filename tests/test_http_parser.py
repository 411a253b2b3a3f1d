"""The sans-IO HTTP/1.1 response parser behind the connection pool."""

from __future__ import annotations

import pytest

from llamatelemetry_async import ReadError, RemoteProtocolError
from llamatelemetry_async.client._parser import ResponseParser

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
BODY = b"data: one\n\ndata: two\n\n"
CHUNKED = b"b\r\ndata: one\n\n\r\nB;ext=1\r\ndata: two\n\n\r\n0\r\nX-Trailer: y\r\n\r\n"


def _run(data: bytes, size: int, *, head_only: bool = False) -> tuple[ResponseParser, bytes]:
    parser = ResponseParser()
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


@pytest.mark.parametrize(
    "size_line",
    [b"0x5", b"1_0", b"+5", b"-5", b" 5", b"5 5", b"\xd9\xa5", b"", b";5", b"5x"],
)
def test_chunk_size_is_hex_digits_only(size_line: bytes) -> None:
    # int(x, 16) alone takes "0x5", "1_0", "+5" and spaces; a proxy may read them otherwise.
    data = HEAD + size_line + b"\r\nhello\r\n0\r\n\r\n"
    with pytest.raises(RemoteProtocolError, match="chunk size"):
        _run(data, 1000)


@pytest.mark.parametrize("size_line", [b"5", b"05", b"5;name=value", b"5 ;x", b"0000000000000005"])
def test_chunk_size_with_an_extension_or_zeros(size_line: bytes) -> None:
    parser, body = _run(HEAD + size_line + b"\r\nhello\r\n0\r\n\r\n", 1000)
    assert parser.done
    assert body == b"hello"


def test_conflicting_content_lengths_are_refused() -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 50\r\n\r\nhello"
    with pytest.raises(RemoteProtocolError, match="conflicting Content-Length"):
        _run(data, 1000)
    same = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
    parser, body = _run(same, 1000)
    assert parser.done
    assert body == b"hello"


@pytest.mark.parametrize("size", [1 << 20, 4096])
def test_head_limit_holds_however_the_head_arrives(size: int) -> None:
    # 70 KB of headers: refused whether they come in one read or in many.
    head = b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 70_000 + b"\r\nContent-Length: 0\r\n\r\n"
    with pytest.raises(RemoteProtocolError, match="64 KiB"):
        _run(head, size)


def test_a_head_just_under_the_limit_passes() -> None:
    pad = b"a" * (64 * 1024 - 100)
    parser, _ = _run(b"HTTP/1.1 204 No Content\r\nX-Pad: " + pad + b"\r\n\r\n", 1 << 20)
    assert parser.done


def test_status_must_be_three_digits() -> None:
    with pytest.raises(RemoteProtocolError, match="status line"):
        _run(b"HTTP/1.1 0200 OK\r\nContent-Length: 0\r\n\r\n", 1000)


def test_transfer_encoding_decided_by_its_last_coding() -> None:
    # "notchunked" is not chunked: the body runs until the connection closes.
    parser, body = _run(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: notchunked\r\n\r\n5\r\n", 1000)
    assert not parser.done
    parser.feed_eof()
    assert body == b"5\r\n"


def test_endless_trailer_line_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="trailer"):
        _run(HEAD + b"0\r\nX-Trailer: " + b"t" * 70_000, 4096)


def test_many_interim_responses_in_one_read() -> None:
    # Parsed in a loop: thousands of 1xx heads in one read do not exhaust the stack.
    data = b"HTTP/1.1 100 Continue\r\n\r\n" * 5000 + b"HTTP/1.1 204 No Content\r\n\r\n"
    parser, _ = _run(data, len(data))
    assert parser.done
    assert parser.head is not None
    assert parser.head.status == 204


def test_empty_reads_are_harmless() -> None:
    parser, body = _run(HEAD + CHUNKED, 1000)
    parser.feed(b"")
    assert parser.done
    assert body == BODY
