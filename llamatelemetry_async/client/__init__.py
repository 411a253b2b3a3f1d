"""The request path: ``AsyncLlamaClient``, ``TokenStream``, typed payloads, the O(1) pool.

Knows nothing of processes, engines or OpenTelemetry.
"""

from ._client import DEFAULT_TIMEOUT, AsyncLlamaClient, Message
from ._http import PoolStats
from ._stream import TokenStream
from ._transport import LlamaTransport
from ._types import (
    ChatChoice,
    ChatChunk,
    ChatChunkChoice,
    ChatCompletion,
    ChatDelta,
    ChatMessage,
    Completion,
    CompletionChunk,
    Embedding,
    EmbeddingList,
    Health,
    RerankResult,
    ServedModel,
    TextChoice,
    TextCompletion,
    TextCompletionChunk,
    Timings,
    Usage,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncLlamaClient",
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
    "LlamaTransport",
    "Message",
    "PoolStats",
    "RerankResult",
    "ServedModel",
    "TextChoice",
    "TextCompletion",
    "TextCompletionChunk",
    "Timings",
    "TokenStream",
    "Usage",
]
