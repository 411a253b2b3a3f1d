"""The SSE decoder: llama-server's shape, every split point, and the general grammar."""

from __future__ import annotations

import pytest

from llamatelemetry_async import RemoteProtocolError
from llamatelemetry_async.client._sse import SSEDecoder

STREAM = (
    b'data: {"content":" a"}\n\n'
    b":\n\n"  # llama-server's keep-alive ping
    b'data: {"content":" b"}\n\n'
    b"event: message\nid: 7\ndata: first\ndata: second\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [b'{"content":" a"}', b'{"content":" b"}', b"first\nsecond", b"[DONE]"]


def test_whole_stream() -> None:
    decoder = SSEDecoder()
    decoder.feed(STREAM)
    assert decoder.events == EXPECTED
    assert decoder.pending_bytes == 0


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16])
def test_any_split(size: int) -> None:
    decoder = SSEDecoder()
    for i in range(0, len(STREAM), size):
        decoder.feed(STREAM[i : i + size])
    assert decoder.events == EXPECTED


def test_crlf_and_cr_line_endings_split_between_cr_and_lf() -> None:
    decoder = SSEDecoder()
    data = b"data: x\r\n\r\ndata: y\r\rdata:z\r\n\r\n"
    for i in range(len(data)):
        decoder.feed(data[i : i + 1])
    assert decoder.events == [b"x", b"y", b"z"]


def test_incomplete_event_waits() -> None:
    decoder = SSEDecoder()
    decoder.feed(b'data: {"content":')
    assert decoder.events == []
    assert decoder.pending_bytes == len(b'data: {"content":')
    decoder.feed(b'"x"}\n\n')
    assert decoder.events == [b'{"content":"x"}']


def test_comment_only_and_fields_without_data_produce_nothing() -> None:
    decoder = SSEDecoder()
    decoder.feed(b": ping\n\nevent: x\n\nretry: 5\n\ndata\n\n")
    assert decoder.events == []


def test_long_event_pieces_are_kept_not_copied() -> None:
    # Linear work: a long event's pieces are held as they came and joined once, at its
    # end, instead of the pending buffer being copied and searched again on every read.
    decoder = SSEDecoder()
    pieces = [b"data: "] + [bytes([65 + i % 26]) * 1000 for i in range(2000)]
    for piece in pieces:
        decoder.feed(piece)
    assert decoder.pending_bytes == sum(map(len, pieces))
    assert all(a is b for a, b in zip(decoder._pending, pieces, strict=True))
    decoder.feed(b"\n\n")
    assert decoder.events == [b"".join(pieces)[6:]]
    assert decoder.pending_bytes == 0


def test_forty_megabyte_event_with_a_raised_limit() -> None:
    decoder = SSEDecoder(max_event_bytes=64 << 20)
    piece = b"x" * (1 << 20)
    decoder.feed(b"data: ")
    for _ in range(40):
        decoder.feed(piece)
    decoder.feed(b"\n\n")
    assert len(decoder.events) == 1
    assert len(decoder.events[0]) == 40 << 20


def test_event_over_the_default_limit_is_a_protocol_error() -> None:
    decoder = SSEDecoder()
    piece = b"y" * (1 << 20)
    decoder.feed(b"data: ")
    with pytest.raises(RemoteProtocolError, match="longer than 16777216 bytes"):
        for _ in range(17):
            decoder.feed(piece)


@pytest.mark.parametrize("whole", [True, False])
def test_event_limit_counts_one_event(whole: bool) -> None:
    decoder = SSEDecoder(max_event_bytes=20)
    events = b"data: 0123456789\n\n" * 10  # 180 bytes, each event within the limit
    if whole:
        decoder.feed(events)
    else:
        for i in range(0, len(events), 7):
            decoder.feed(events[i : i + 7])
    assert decoder.events == [b"0123456789"] * 10
    with pytest.raises(RemoteProtocolError):
        decoder.feed(b"data: " + b"z" * 30 + b"\n\n")  # complete, in one read, too long
