"""The SSE decoder: llama-server's shape, every split point, and the general grammar."""

from __future__ import annotations

import pytest

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
