"""llamatelemetry_async: run llama.cpp's llama-server and stream tokens from it, async-native.

```python
from llamatelemetry_async import AsyncLlamaClient

async with AsyncLlamaClient("http://127.0.0.1:8080") as client:
    async for chunk in client.stream_completion("Once upon a time", n_predict=32):
        print(chunk.text, end="")
```

Importing the package is cheap and has no side effects: it loads the exception tree and the
version, and every other public name imports its subpackage (httpx, anyio, OpenTelemetry...)
the first time it is used.
"""

from __future__ import annotations

import importlib

from ._errors import (
    APIError as APIError,
    BuildError as BuildError,
    ClientClosedError as ClientClosedError,
    ConfigError as ConfigError,
    ConnectError as ConnectError,
    ConnectTimeout as ConnectTimeout,
    DeadlineExceeded as DeadlineExceeded,
    EngineBusyError as EngineBusyError,
    EngineError as EngineError,
    HTTPStatusError as HTTPStatusError,
    LlamaError as LlamaError,
    LlamaServerError as LlamaServerError,
    LlamaServerNotFoundError as LlamaServerNotFoundError,
    LlamaWarning as LlamaWarning,
    ModelDoesNotFitError as ModelDoesNotFitError,
    ModelError as ModelError,
    ModelFormatError as ModelFormatError,
    ModelNotFoundError as ModelNotFoundError,
    NCCLError as NCCLError,
    NCCLNotFoundError as NCCLNotFoundError,
    NCCLSymbolError as NCCLSymbolError,
    NCCLUsageError as NCCLUsageError,
    PoolTimeout as PoolTimeout,
    PromptFileError as PromptFileError,
    QuantizeError as QuantizeError,
    ReadError as ReadError,
    ReadTimeout as ReadTimeout,
    RemoteProtocolError as RemoteProtocolError,
    ServerCrashedError as ServerCrashedError,
    ServerStartError as ServerStartError,
    ServerUnavailableError as ServerUnavailableError,
    StreamConsumedError as StreamConsumedError,
    StreamError as StreamError,
    TimeoutException as TimeoutException,
    TransportError as TransportError,
    UnknownParameterWarning as UnknownParameterWarning,
    UsageError as UsageError,
    WriteError as WriteError,
    WriteTimeout as WriteTimeout,
)
from ._version import (
    __version__ as __version__,
)

# typing.TYPE_CHECKING without importing typing (~8 ms, most of this package's import time);
# type checkers treat any name TYPE_CHECKING as true.
TYPE_CHECKING = False

# What type checkers and IDEs see; at run time __getattr__ below imports each name on first use.
if TYPE_CHECKING:
    from typing import Any

    from .bench import (
        BenchConfig as BenchConfig,
        BenchMetrics as BenchMetrics,
        BenchPrompt as BenchPrompt,
        BenchResult as BenchResult,
        RequestRecord as RequestRecord,
        load_prompts_jsonl as load_prompts_jsonl,
        run_bench as run_bench,
    )
    from .client import (
        DEFAULT_TIMEOUT as DEFAULT_TIMEOUT,
        AsyncLlamaClient as AsyncLlamaClient,
        ChatChoice as ChatChoice,
        ChatChunk as ChatChunk,
        ChatChunkChoice as ChatChunkChoice,
        ChatCompletion as ChatCompletion,
        ChatDelta as ChatDelta,
        ChatMessage as ChatMessage,
        Completion as Completion,
        CompletionChunk as CompletionChunk,
        Embedding as Embedding,
        EmbeddingList as EmbeddingList,
        Health as Health,
        LlamaTransport as LlamaTransport,
        Message as Message,
        PoolStats as PoolStats,
        RerankResult as RerankResult,
        ServedModel as ServedModel,
        TextChoice as TextChoice,
        TextCompletion as TextCompletion,
        TextCompletionChunk as TextCompletionChunk,
        Timings as Timings,
        TokenStream as TokenStream,
        Usage as Usage,
    )
    from .engine import (
        AsyncEngine as AsyncEngine,
        Placement as Placement,
        ServerInfo as ServerInfo,
        ServerPlan as ServerPlan,
    )
    from .environment import (
        Environment as Environment,
        detect_environment as detect_environment,
        load_secrets as load_secrets,
    )
    from .gpu import (
        GPUSample as GPUSample,
        GPUSampler as GPUSampler,
        attribute_energy as attribute_energy,
        visible_gpus as visible_gpus,
    )
    from .models import (
        GPUSpec as GPUSpec,
        ModelInfo as ModelInfo,
        RegistryModel as RegistryModel,
        VRAMPlan as VRAMPlan,
        inspect_model as inspect_model,
        list_models as list_models,
        quantize as quantize,
        resolve_model as resolve_model,
    )
    from .nccl import Communicator as Communicator, find_nccl as find_nccl
    from .server import (
        LlamaServer as LlamaServer,
        ServerConfig as ServerConfig,
        ServerState as ServerState,
        build_llama_server as build_llama_server,
        find_llama_server as find_llama_server,
        server_command as server_command,
    )
    from .telemetry import (
        GenAIInstrumentation as GenAIInstrumentation,
        Telemetry as Telemetry,
        TokenEvents as TokenEvents,
        setup_telemetry as setup_telemetry,
    )

# Subpackage -> the public names it provides, each imported on first access. To export a
# name: add it here, to the TYPE_CHECKING block above and to __all__ (tests/test_import.py
# checks that the three agree).
_LAZY: dict[str, tuple[str, ...]] = {
    "models": (
        "GPUSpec",
        "ModelInfo",
        "RegistryModel",
        "VRAMPlan",
        "inspect_model",
        "list_models",
        "quantize",
        "resolve_model",
    ),
    "environment": (
        "Environment",
        "detect_environment",
        "load_secrets",
    ),
    "bench": (
        "BenchConfig",
        "BenchMetrics",
        "BenchPrompt",
        "BenchResult",
        "RequestRecord",
        "load_prompts_jsonl",
        "run_bench",
    ),
    "client": (
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
    ),
    "engine": (
        "AsyncEngine",
        "Placement",
        "ServerInfo",
        "ServerPlan",
    ),
    "gpu": (
        "GPUSample",
        "GPUSampler",
        "attribute_energy",
        "visible_gpus",
    ),
    "nccl": (
        "Communicator",
        "find_nccl",
    ),
    "server": (
        "LlamaServer",
        "ServerConfig",
        "ServerState",
        "build_llama_server",
        "find_llama_server",
        "server_command",
    ),
    "telemetry": (
        "GenAIInstrumentation",
        "Telemetry",
        "TokenEvents",
        "setup_telemetry",
    ),
}
_SOURCE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = [
    "DEFAULT_TIMEOUT",
    "APIError",
    "AsyncEngine",
    "AsyncLlamaClient",
    "BenchConfig",
    "BenchMetrics",
    "BenchPrompt",
    "BenchResult",
    "BuildError",
    "ChatChoice",
    "ChatChunk",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatDelta",
    "ChatMessage",
    "ClientClosedError",
    "Communicator",
    "Completion",
    "CompletionChunk",
    "ConfigError",
    "ConnectError",
    "ConnectTimeout",
    "DeadlineExceeded",
    "Embedding",
    "EmbeddingList",
    "EngineBusyError",
    "EngineError",
    "Environment",
    "GPUSample",
    "GPUSampler",
    "GPUSpec",
    "GenAIInstrumentation",
    "HTTPStatusError",
    "Health",
    "LlamaError",
    "LlamaServer",
    "LlamaServerError",
    "LlamaServerNotFoundError",
    "LlamaTransport",
    "LlamaWarning",
    "Message",
    "ModelDoesNotFitError",
    "ModelError",
    "ModelFormatError",
    "ModelInfo",
    "ModelNotFoundError",
    "NCCLError",
    "NCCLNotFoundError",
    "NCCLSymbolError",
    "NCCLUsageError",
    "Placement",
    "PoolStats",
    "PoolTimeout",
    "PromptFileError",
    "QuantizeError",
    "ReadError",
    "ReadTimeout",
    "RegistryModel",
    "RemoteProtocolError",
    "RequestRecord",
    "RerankResult",
    "ServedModel",
    "ServerConfig",
    "ServerCrashedError",
    "ServerInfo",
    "ServerPlan",
    "ServerStartError",
    "ServerState",
    "ServerUnavailableError",
    "StreamConsumedError",
    "StreamError",
    "Telemetry",
    "TextChoice",
    "TextCompletion",
    "TextCompletionChunk",
    "TimeoutException",
    "Timings",
    "TokenEvents",
    "TokenStream",
    "TransportError",
    "UnknownParameterWarning",
    "Usage",
    "UsageError",
    "VRAMPlan",
    "WriteError",
    "WriteTimeout",
    "__version__",
    "attribute_energy",
    "build_llama_server",
    "detect_environment",
    "find_llama_server",
    "find_nccl",
    "inspect_model",
    "list_models",
    "load_prompts_jsonl",
    "load_secrets",
    "quantize",
    "resolve_model",
    "run_bench",
    "server_command",
    "setup_telemetry",
    "visible_gpus",
]

if not TYPE_CHECKING:  # hidden from type checkers, so a misspelt name stays an error for them

    def __getattr__(name: str) -> Any:
        module = _SOURCE.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value  # later look-ups are plain attribute reads
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SOURCE})
