"""The request path: ``AsyncLlamaClient``, ``TokenStream``, typed payloads, the O(1) pool.

Knows nothing of processes, engines or OpenTelemetry.

```python
async with AsyncLlamaClient("http://127.0.0.1:8080") as client:
    async with client.stream_chat([{"role": "user", "content": "hi"}], max_tokens=32) as stream:
        async for chunk in stream:
            print(chunk.text, end="")
```

Constants and aliases:

- ``DEFAULT_TIMEOUT``: the client's default ``httpx.Timeout``: connect 10 s, read 600 s
  (a long prompt's prefill sends nothing until its first token), write 60 s, pool 60 s.
- ``Message``: the type of one chat message, any mapping in the OpenAI shape
  (``{"role": "user", "content": "..."}``).
"""

from ._client import DEFAULT_TIMEOUT, AsyncLlamaClient, Message
from ._pool import PoolStats
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
