"""ShareGPT-format datasets: single prompts or whole conversations to replay turn by turn.

The ShareGPT file (``ShareGPT_V3_unfiltered_cleaned_split.json``, the de facto benchmark
dataset) is a JSON array of conversations::

    [{"id": "...", "conversations": [{"from": "human", "value": "..."},
                                     {"from": "gpt", "value": "..."}, ...]}, ...]

A JSONL file with one such object per line is read too. Roles: ``human``/``user`` are the
user's turns, ``gpt``/``chatgpt``/``bard``/``bing``/``assistant`` the model's (their text is
not sent: a replay carries the server's own answers), ``system`` opens the conversation.
A bad file or entry raises ``PromptFileError`` with the file and the line where the bad
entry starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from .._errors import PromptFileError
from ._config import BenchPrompt, Conversation

__all__ = ["load_sharegpt", "load_sharegpt_conversations", "parse_sharegpt"]

_SHAREGPT = (
    'A ShareGPT file is a JSON array (or JSON lines) of {"conversations": [{"from": '
    '"human", "value": ...}, {"from": "gpt", "value": ...}, ...]}'
)


def _bad(path: str | os.PathLike[str], line: int | None, problem: str) -> PromptFileError:
    return PromptFileError(path, line, problem, expected=_SHAREGPT)


_USER = frozenset({"human", "user"})
_MODEL = frozenset({"gpt", "chatgpt", "bard", "bing", "assistant", "model"})


def load_sharegpt(
    path: str | os.PathLike[str], *, limit: int | None = None
) -> tuple[BenchPrompt, ...]:
    """The first user turn of each ShareGPT conversation, as chat prompts.

    Conversations that do not start with a user turn (after an optional system message)
    are skipped, as vLLM's benchmark skips them. ``limit`` keeps the first ``limit``.
    Blocking (reads the file): from async code use ``anyio.to_thread.run_sync``.
    """
    prompts = []
    # One prompt per conversation: the limit passes through, and reading stops there.
    for conversation in load_sharegpt_conversations(path, limit=limit):
        messages: list[dict[str, str]] = []
        if conversation.system is not None:
            messages.append({"role": "system", "content": conversation.system})
        messages.append({"role": "user", "content": conversation.turns[0]})
        prompts.append(BenchPrompt(messages=tuple(messages)))
    return tuple(prompts)


def load_sharegpt_conversations(
    path: str | os.PathLike[str], *, limit: int | None = None
) -> tuple[Conversation, ...]:
    """Every ShareGPT conversation with at least one user turn, for multi-turn replay.

    Blocking (reads the file): from async code use ``anyio.to_thread.run_sync``.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise _bad(path, None, f"cannot read the file ({exc.strerror or exc})") from exc
    return parse_sharegpt(data, path, limit=limit)


def parse_sharegpt(
    data: bytes | str, path: str | os.PathLike[str] = "<sharegpt>", *, limit: int | None = None
) -> tuple[Conversation, ...]:
    """``load_sharegpt_conversations`` on a document already in memory."""
    # utf-8-sig: a byte-order mark (editors on Windows write one) is not JSON.
    text = data.decode("utf-8-sig", "replace") if isinstance(data, bytes) else data
    text = text.removeprefix("\ufeff")
    stripped = text.lstrip()
    if not stripped:
        raise _bad(path, None, "the file is empty")
    # Entries are decoded one at a time, so that ``limit`` stops reading a big file early.
    items = _array_items(text, path) if stripped.startswith("[") else _jsonl_items(text, path)
    conversations = []
    for number, item in items:
        conversation = _conversation(item, path, number)
        if conversation is not None:
            conversations.append(conversation)
            if limit is not None and len(conversations) >= limit:
                break
    if not conversations:
        raise _bad(path, None, "no conversation with a user turn in the file")
    return tuple(conversations)


def _jsonl_items(text: str, path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    # split("\n"), not splitlines(): that also breaks at U+2028, U+0085 and others, which
    # JSON allows unescaped inside strings (text pasted from web pages has them).
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = msgspec.json.decode(line)
        except msgspec.DecodeError as exc:
            # msgspec refuses escaped lone surrogates ("\ud83d"), which json reads (and the
            # array form accepts): one rule for both forms, the text repaired in _text.
            try:
                value = json.loads(line)
            except ValueError:
                raise _bad(path, number, f"not valid JSON ({exc})") from exc
        yield number, value


def _array_items(text: str, path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """The array's items with the line each starts on (the stdlib decoder gives offsets)."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    end = len(text)
    # Lines are counted from the last item on, not from the start of the text each time:
    # ShareGPT's 640 MB file has 94,000 entries.
    counted, lines = 0, 1

    def line_at(at: int) -> int:
        nonlocal counted, lines
        lines += text.count("\n", counted, at)
        counted = at
        return lines

    def skip(at: int) -> int:
        while at < end and text[at] in " \t\r\n":
            at += 1
        return at

    pos = skip(pos)
    if pos < end and text[pos] == "]":
        return
    while True:
        line = line_at(pos)
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise _bad(path, exc.lineno, f"not valid JSON ({exc.msg})") from exc
        yield line, value
        pos = skip(pos)
        if pos < end and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < end and text[pos] == "]":
            if skip(pos + 1) != end:
                raise _bad(path, line_at(pos), "text after the closing ']'")
            return
        raise _bad(path, line_at(pos), "expected ',' or ']' between conversations")


def _conversation(item: Any, path: str | os.PathLike[str], number: int) -> Conversation | None:
    if not isinstance(item, dict):
        raise _bad(
            path, number, f"expected a JSON object with 'conversations', got {type(item).__name__}"
        )
    turns = item.get("conversations", item.get("conversation"))
    if not isinstance(turns, list):
        raise _bad(path, number, "no 'conversations' list in this entry")
    system: str | None = None
    users: list[str] = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _bad(path, number, f"turn {k} is not an object")
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if not isinstance(role, str) or not isinstance(value, str):
            raise _bad(path, number, f"turn {k} needs a 'from' and a 'value' (strings)")
        role = role.lower()
        value = _text(value)
        if role == "system":
            if users or system is not None:
                raise _bad(
                    path, number, f"turn {k} is a system message after the conversation began"
                )
            system = value
        elif role in _USER:
            users.append(value)
        elif role not in _MODEL:
            raise _bad(path, number, f"turn {k} has an unknown role {role!r}")
    if not users:
        return None  # as vLLM: a conversation without a user turn is skipped
    return Conversation(tuple(users), system=system)


def _text(value: str) -> str:
    # JSON may escape a lone UTF-16 surrogate ("\ud83d", half an emoji cut off by a
    # scraper); such a str cannot be encoded as UTF-8, so a request carrying it would fail
    # to send. Each becomes U+FFFD, as an invalid byte does when the file is decoded.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in value)
    return value
