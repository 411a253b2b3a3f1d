"""llamatelemetry_async: run llama.cpp's llama-server and stream tokens from it, async-native.

```python
from llamatelemetry_async import AsyncLlamaClient

async with AsyncLlamaClient("http://127.0.0.1:8080") as client:
    async for chunk in client.stream_completion("Once upon a time", n_predict=32):
        print(chunk.text, end="")
```
"""

from ._errors import (
    APIError as APIError,
)
from ._errors import (
    BuildError as BuildError,
)
from ._errors import (
    ClientClosedError as ClientClosedError,
)
from ._errors import (
    ConnectError as ConnectError,
)
from ._errors import (
    ConnectTimeout as ConnectTimeout,
)
from ._errors import (
    HTTPStatusError as HTTPStatusError,
)
from ._errors import (
    LlamaError as LlamaError,
)
from ._errors import (
    LlamaServerError as LlamaServerError,
)
from ._errors import (
    LlamaServerNotFoundError as LlamaServerNotFoundError,
)
from ._errors import (
    PoolTimeout as PoolTimeout,
)
from ._errors import (
    ReadError as ReadError,
)
from ._errors import (
    ReadTimeout as ReadTimeout,
)
from ._errors import (
    RemoteProtocolError as RemoteProtocolError,
)
from ._errors import (
    StreamConsumedError as StreamConsumedError,
)
from ._errors import (
    StreamError as StreamError,
)
from ._errors import (
    TimeoutException as TimeoutException,
)
from ._errors import (
    TransportError as TransportError,
)
from ._errors import (
    UsageError as UsageError,
)
from ._errors import (
    WriteError as WriteError,
)
from ._errors import (
    WriteTimeout as WriteTimeout,
)
from ._version import __version__ as __version__
from .client import (
    DEFAULT_TIMEOUT as DEFAULT_TIMEOUT,
)
from .client import (
    AsyncLlamaClient as AsyncLlamaClient,
)
from .client import (
    ChatChoice as ChatChoice,
)
from .client import (
    ChatChunk as ChatChunk,
)
from .client import (
    ChatChunkChoice as ChatChunkChoice,
)
from .client import (
    ChatCompletion as ChatCompletion,
)
from .client import (
    ChatDelta as ChatDelta,
)
from .client import (
    ChatMessage as ChatMessage,
)
from .client import (
    Completion as Completion,
)
from .client import (
    CompletionChunk as CompletionChunk,
)
from .client import (
    Embedding as Embedding,
)
from .client import (
    EmbeddingList as EmbeddingList,
)
from .client import (
    Health as Health,
)
from .client import (
    LlamaTransport as LlamaTransport,
)
from .client import (
    Message as Message,
)
from .client import (
    ModelInfo as ModelInfo,
)
from .client import (
    PoolStats as PoolStats,
)
from .client import (
    RerankResult as RerankResult,
)
from .client import (
    TextChoice as TextChoice,
)
from .client import (
    TextCompletion as TextCompletion,
)
from .client import (
    TextCompletionChunk as TextCompletionChunk,
)
from .client import (
    Timings as Timings,
)
from .client import (
    TokenStream as TokenStream,
)
from .client import (
    Usage as Usage,
)
from .server import (
    build_llama_server as build_llama_server,
)
from .server import (
    find_llama_server as find_llama_server,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "APIError",
    "AsyncLlamaClient",
    "BuildError",
    "ChatChoice",
    "ChatChunk",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatDelta",
    "ChatMessage",
    "ClientClosedError",
    "Completion",
    "CompletionChunk",
    "ConnectError",
    "ConnectTimeout",
    "Embedding",
    "EmbeddingList",
    "HTTPStatusError",
    "Health",
    "LlamaError",
    "LlamaServerError",
    "LlamaServerNotFoundError",
    "LlamaTransport",
    "Message",
    "ModelInfo",
    "PoolStats",
    "PoolTimeout",
    "ReadError",
    "ReadTimeout",
    "RemoteProtocolError",
    "RerankResult",
    "StreamConsumedError",
    "StreamError",
    "TextChoice",
    "TextCompletion",
    "TextCompletionChunk",
    "TimeoutException",
    "Timings",
    "TokenStream",
    "TransportError",
    "Usage",
    "UsageError",
    "WriteError",
    "WriteTimeout",
    "__version__",
    "build_llama_server",
    "find_llama_server",
]
