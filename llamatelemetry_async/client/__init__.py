"""The request path: ``AsyncLlamaClient``, ``TokenStream``, typed payloads, the O(1) pool.

Knows nothing of processes, engines or OpenTelemetry.

```python
async with AsyncLlamaClient("http://127.0.0.1:8080") as client:
    async with client.stream_chat([{"role": "user", "content": "hi"}], max_tokens=32) as stream:
        async for chunk in stream:
            print(chunk.text, end="")
```

The seam between what to send and where it goes: ``RequestMethods`` (every endpoint,
written once) builds a ``Request`` and hands it to a ``Dispatcher``; ``HttpDispatcher`` sends
to one server, and the engine has a dispatcher that routes. A stream reads from a ``Source``;
telemetry sees requests through ``Instrumentation`` and ``RequestObserver``.

Constants and aliases:

- ``TimeoutTypes``: what ``timeout=`` takes: seconds (``float``) or an ``httpx.Timeout``.

- ``DEFAULT_TIMEOUT``: the client's default ``httpx.Timeout``: connect 10 s, read 600 s
  (a long prompt's prefill sends nothing until its first token), write 60 s, pool 60 s.
- ``Message``: the type of one chat message, any mapping in the OpenAI shape
  (``{"role": "user", "content": "..."}``).
"""

from ._api import Message, RequestMethods, lora_body
from ._client import DEFAULT_TIMEOUT, AsyncLlamaClient
from ._dispatch import Dispatcher, HttpDispatcher, Reply, Request
from ._observe import Instrumentation, Outcome, RequestObserver
from ._params import TimeoutTypes
from ._pool import PoolStats
from ._stream import Source, TokenStream
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
    "Dispatcher",
    "Embedding",
    "EmbeddingList",
    "Health",
    "HttpDispatcher",
    "Instrumentation",
    "LlamaTransport",
    "Message",
    "Outcome",
    "PoolStats",
    "Reply",
    "Request",
    "RequestMethods",
    "RequestObserver",
    "RerankResult",
    "ServedModel",
    "Source",
    "TextChoice",
    "TextCompletion",
    "TextCompletionChunk",
    "TimeoutTypes",
    "Timings",
    "TokenStream",
    "Usage",
    "lora_body",
]
