"""Typed llama-server payloads, decoded with msgspec (fast; unknown fields are ignored).

Streamed chunks keep the server's wire shape, so decoding one is a single C call, and
expose the same small surface through properties: ``.text`` and ``.finish_reason``.
Whole responses add ``.usage`` and ``.timings``.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = [
    "ChatChoice",
    "ChatChunk",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatDelta",
    "ChatMessage",
    "Completion",
    "CompletionChunk",
    "Embedding",
    "EmbeddingList",
    "Health",
    "RerankResult",
    "ServedModel",
    "TextChoice",
    "TextCompletion",
    "TextCompletionChunk",
    "Timings",
    "Usage",
]

# llama.cpp's native stop_type -> the OpenAI finish_reason vocabulary.
_STOP_TYPES = {"eos": "stop", "word": "stop", "limit": "length"}


def native_finish_reason(stop_type: str | None) -> str | None:
    """Map llama.cpp's ``stop_type`` ("eos", "word", "limit") to "stop" or "length"."""
    if stop_type is None or stop_type == "none":
        return None
    return _STOP_TYPES.get(stop_type, stop_type)


class Timings(msgspec.Struct, frozen=True, gc=False):
    """llama.cpp's own timing of one request (milliseconds, tokens and rates)."""

    prompt_n: int = 0
    prompt_ms: float = 0.0
    prompt_per_token_ms: float = 0.0
    prompt_per_second: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0
    predicted_per_token_ms: float = 0.0
    predicted_per_second: float = 0.0
    cache_n: int = 0
    draft_n: int | None = None
    draft_n_accepted: int | None = None


class Usage(msgspec.Struct, frozen=True, gc=False):
    """Token counts of one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionChunk(msgspec.Struct, frozen=True, gc=False):
    """One event of a native ``/completion`` (or ``/infill``) stream."""

    content: str = ""
    tokens: list[int] = msgspec.field(default_factory=list)
    stop: bool = False
    index: int = 0
    id_slot: int = -1
    tokens_predicted: int = 0
    tokens_evaluated: int = 0
    stop_type: str | None = None
    stopping_word: str | None = None
    truncated: bool = False
    model: str | None = None
    timings: Timings | None = None

    @property
    def text(self) -> str:
        """The text this chunk adds."""
        return self.content

    @property
    def finish_reason(self) -> str | None:
        """ "stop" or "length" on the last chunk, else ``None``."""
        return native_finish_reason(self.stop_type) if self.stop else None


class Completion(msgspec.Struct, frozen=True):
    """A whole native ``/completion`` (or ``/infill``) response."""

    content: str = ""
    tokens: list[int] = msgspec.field(default_factory=list)
    stop: bool = True
    id_slot: int = -1
    tokens_predicted: int = 0
    tokens_evaluated: int = 0
    stop_type: str | None = None
    stopping_word: str | None = None
    truncated: bool = False
    model: str | None = None
    timings: Timings | None = None
    generation_settings: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        """The generated text (``content``)."""
        return self.content

    @property
    def finish_reason(self) -> str | None:
        """ "stop" (end of text or a stop word) or "length" (``n_predict`` reached)."""
        return native_finish_reason(self.stop_type)

    @property
    def usage(self) -> Usage:
        """Prompt and generated token counts, in the OpenAI shape."""
        return Usage(
            self.tokens_evaluated,
            self.tokens_predicted,
            self.tokens_evaluated + self.tokens_predicted,
        )


class ChatDelta(msgspec.Struct, frozen=True, gc=False):
    """What one chat chunk adds to the assistant message."""

    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChunkChoice(msgspec.Struct, frozen=True, gc=False):
    """One choice of a chat chunk (llama-server sends one)."""

    index: int = 0
    delta: ChatDelta = ChatDelta()
    finish_reason: str | None = None


class ChatChunk(msgspec.Struct, frozen=True, gc=False):
    """One event of a ``/v1/chat/completions`` stream (OpenAI shape)."""

    id: str = ""
    created: int = 0
    model: str = ""
    choices: list[ChatChunkChoice] = msgspec.field(default_factory=list)
    usage: Usage | None = None
    timings: Timings | None = None

    @property
    def text(self) -> str:
        """The text this chunk adds (the first choice's ``delta.content``)."""
        choices = self.choices
        return (choices[0].delta.content or "") if choices else ""

    @property
    def finish_reason(self) -> str | None:
        """The first choice's finish reason: set on the last chunk, else ``None``."""
        choices = self.choices
        return choices[0].finish_reason if choices else None


class ChatMessage(msgspec.Struct, frozen=True):
    """The assistant message of a whole chat response."""

    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(msgspec.Struct, frozen=True):
    """One choice of a whole chat response."""

    index: int = 0
    message: ChatMessage = ChatMessage()
    finish_reason: str | None = None


class ChatCompletion(msgspec.Struct, frozen=True):
    """A whole ``/v1/chat/completions`` response."""

    id: str = ""
    created: int = 0
    model: str = ""
    choices: list[ChatChoice] = msgspec.field(default_factory=list)
    usage: Usage = Usage()
    timings: Timings | None = None

    @property
    def text(self) -> str:
        """The assistant's reply (the first choice's ``message.content``)."""
        return (self.choices[0].message.content or "") if self.choices else ""

    @property
    def finish_reason(self) -> str | None:
        """Why generation stopped: "stop", "length", "tool_calls"..."""
        return self.choices[0].finish_reason if self.choices else None


class TextChoice(msgspec.Struct, frozen=True, gc=False):
    """One choice of a ``/v1/completions`` response or chunk."""

    index: int = 0
    text: str = ""
    finish_reason: str | None = None


class TextCompletionChunk(msgspec.Struct, frozen=True, gc=False):
    """One event of a ``/v1/completions`` stream (OpenAI text-completion shape)."""

    id: str = ""
    created: int = 0
    model: str = ""
    choices: list[TextChoice] = msgspec.field(default_factory=list)
    usage: Usage | None = None
    timings: Timings | None = None

    @property
    def text(self) -> str:
        """The first choice's text."""
        return self.choices[0].text if self.choices else ""

    @property
    def finish_reason(self) -> str | None:
        """The first choice's finish reason ("stop", "length"), or ``None``."""
        return self.choices[0].finish_reason if self.choices else None


class TextCompletion(msgspec.Struct, frozen=True):
    """A whole ``/v1/completions`` response."""

    id: str = ""
    created: int = 0
    model: str = ""
    choices: list[TextChoice] = msgspec.field(default_factory=list)
    usage: Usage = Usage()
    timings: Timings | None = None

    @property
    def text(self) -> str:
        """The first choice's text."""
        return self.choices[0].text if self.choices else ""

    @property
    def finish_reason(self) -> str | None:
        """The first choice's finish reason ("stop", "length"), or ``None``."""
        return self.choices[0].finish_reason if self.choices else None


class Health(msgspec.Struct, frozen=True):
    """``GET /health``: ``status`` is "ok" once the model is loaded."""

    status: str = ""


class Embedding(msgspec.Struct, frozen=True):
    """One vector of a ``/v1/embeddings`` response."""

    index: int = 0
    embedding: list[float] = msgspec.field(default_factory=list)


class EmbeddingList(msgspec.Struct, frozen=True):
    """A ``/v1/embeddings`` response: one vector per input, in input order."""

    data: list[Embedding] = msgspec.field(default_factory=list)
    model: str = ""
    usage: Usage = Usage()

    @property
    def vectors(self) -> list[list[float]]:
        """The embedding vectors, in input order."""
        return [item.embedding for item in sorted(self.data, key=lambda e: e.index)]


class RerankResult(msgspec.Struct, frozen=True):
    """The relevance of the document at ``index`` to the query."""

    index: int = 0
    relevance_score: float = 0.0


class ServedModel(msgspec.Struct, frozen=True):
    """One entry of ``/v1/models``."""

    id: str = ""
    object: str = "model"
    created: int = 0
    owned_by: str = ""
    meta: dict[str, Any] | None = None
