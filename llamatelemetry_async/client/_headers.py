"""Request header validation: nothing a caller passes may change the shape of a request.

A header value holding CR or LF ends its line early, so a key such as
``"k\\r\\nContent-Length: 0\\r\\n\\r\\nGET /slots ..."`` would add headers or smuggle a whole
second request onto the connection. httpx's h11 transport refuses such input; the built-in
pool writes raw bytes, so the same rules (RFC 9110 field names and values) are checked here:
once when a client is built (``check_headers``) and again on every request the pool sends
(``check_request_head``). Messages name the header and the kind of character, never the
value, which is often a secret.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from .._errors import UsageError

__all__ = ["check_header", "check_headers", "check_request_head", "is_safe_header"]

# RFC 9110 5.1 token characters, and field values: visible ASCII, SP, HTAB and (in bytes
# only) obs-text 0x80-0xFF. No other control character, and never CR, LF or NUL.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_VALUE = rb"[\t\x20-\x7e\x80-\xff]*"
_NAME_RE = re.compile(_TOKEN)
_VALUE_RE = re.compile(_VALUE)
_REQUEST_LINE = rb"[A-Z]+ [\x21-\x7e\x80-\xff]+ HTTP/1\.1"
_REQUEST_LINE_RE = re.compile(_REQUEST_LINE)
# A whole request head as the pool writes it: one request line, header lines, a blank line.
_HEAD_RE = re.compile(_REQUEST_LINE + rb"\r\n(?:" + _TOKEN + rb":" + _VALUE + rb"\r\n)*\r\n")

_FIX = "; pass header names and values as printable ASCII text"


def check_header(name: str | bytes, value: str | bytes) -> tuple[bytes, bytes]:
    """``(name, value)`` as wire bytes, or ``UsageError`` if either could break the request.

    ``str`` values must be ASCII (encode anything else yourself, for example as base64);
    ``bytes`` values may also hold obs-text (0x80-0xFF), as HTTP allows.
    """
    raw_name = _encode(name, None, "name")
    if _NAME_RE.fullmatch(raw_name) is None:
        # Only the valid start of the name is shown: the rest may be a value pasted into it.
        start = _NAME_RE.match(raw_name)
        shown = start.group().decode("ascii") if start is not None else ""
        raise UsageError(
            f"the header name starting {shown!r} is not a valid HTTP token: it contains "
            f"{_problem(raw_name)}{_FIX}"
        )
    shown = raw_name.decode("ascii")
    raw_value = _encode(value, shown, "value")
    if _VALUE_RE.fullmatch(raw_value) is None:
        raise UsageError(
            f"the value of the header {shown!r} contains {_problem(raw_value)}; a header "
            "value may hold only printable ASCII, spaces and tabs (a CR or LF would end "
            "the line and let the value inject headers or a second request)"
        )
    return raw_name, raw_value


def is_safe_header(name: str, value: str) -> bool:
    """Whether ``name: value`` (ASCII ``str``) can go on the wire as it is; never raises.

    For headers the library did not get from its caller (a trace propagator's): one that is
    not safe is left out rather than failing the request.
    """
    if not (isinstance(name, str) and isinstance(value, str)):
        return False
    if not (name.isascii() and value.isascii()):
        return False
    raw_name, raw_value = name.encode("ascii"), value.encode("ascii")
    return _NAME_RE.fullmatch(raw_name) is not None and _VALUE_RE.fullmatch(raw_value) is not None


def check_headers(
    headers: Mapping[str, str] | Iterable[tuple[str | bytes, str | bytes]],
) -> list[tuple[bytes, bytes]]:
    """``check_header`` on every pair of a mapping or of a list of pairs; the wire bytes."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    return [check_header(name, value) for name, value in pairs]


def check_request_head(head: bytes) -> None:
    """Raise ``UsageError`` unless ``head`` is exactly one well-formed request head.

    The pool calls this for every request it writes, whoever built the head: it is the last
    point before the bytes reach the socket. One regular-expression match, a microsecond or
    two for a typical head.
    """
    if _HEAD_RE.fullmatch(head) is not None:
        return
    # Slow path, for the message: find the line at fault.
    lines = head.split(b"\r\n")
    if _REQUEST_LINE_RE.fullmatch(lines[0]) is None:
        raise UsageError(
            f"the request line is not 'METHOD /path HTTP/1.1' ({_problem(lines[0])} in "
            "the wrong place); check the base URL and the path"
        )
    ends_well = len(lines) > 2 and head.endswith(b"\r\n\r\n")
    # The header lines: between the request line and the final blank line (or the end).
    end = -2 if ends_well else -1 if not lines[-1] else len(lines)
    for line in lines[1:end]:
        if not line:
            raise UsageError(
                "the request head has a blank line before its end: a header value holds "
                "CR LF, which would smuggle a second request" + _FIX
            )
        name, sep, value = line.partition(b":")
        if not sep:
            raise UsageError(
                "a request header line has no ':': a header value holds a line break" + _FIX
            )
        check_header(name, value)  # raises, naming the header
    raise UsageError("the request head does not end with one blank line" + _FIX)


def _encode(text: str | bytes, header: str | None, part: str) -> bytes:
    if isinstance(text, bytes):
        return text
    if not isinstance(text, str):
        where = f"the header {header!r}" if header is not None else "a header name"
        raise UsageError(f"{where}: the {part} must be a str, not {type(text).__name__}")
    try:
        return text.encode("ascii")
    except UnicodeEncodeError:
        where = f"the value of the header {header!r}" if header is not None else "a header name"
        raise UsageError(
            f"{where} contains a non-ASCII character; HTTP header text must be ASCII "
            "(percent-encode or base64-encode it)"
        ) from None


def _problem(raw: bytes) -> str:
    """The kind of the first bad character, in words (the value itself stays unsaid)."""
    for byte in raw:
        if byte == 0x0D:
            return "a carriage return (CR)"
        if byte == 0x0A:
            return "a line feed (LF)"
        if byte == 0x00:
            return "a NUL character"
        if (byte < 0x20 and byte != 0x09) or byte == 0x7F:
            return f"the control character 0x{byte:02x}"
    if not raw:
        return "nothing (it is empty)"
    if any(byte >= 0x80 for byte in raw):
        return "a non-ASCII byte"
    return "a space or a separator such as ':' or '('"
