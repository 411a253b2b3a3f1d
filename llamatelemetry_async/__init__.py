"""llamatelemetry_async: run llama.cpp's llama-server and stream tokens from it, async-native.

```python
from llamatelemetry_async import AsyncLlamaClient

async with AsyncLlamaClient("http://127.0.0.1:8080") as client:
    async for chunk in client.stream("Once upon a time", n_predict=32):
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
    BuildArchiveError as BuildArchiveError,
    BuildError as BuildError,
    ClientClosedError as ClientClosedError,
    ConfigError as ConfigError,
    ConnectError as ConnectError,
    ConnectTimeout as ConnectTimeout,
    CUDAArchitectureError as CUDAArchitectureError,
    DeadlineExceeded as DeadlineExceeded,
    EngineBusyError as EngineBusyError,
    EngineError as EngineError,
    HTTPStatusError as HTTPStatusError,
    LlamaError as LlamaError,
    LlamaServerError as LlamaServerError,
    LlamaServerNotFoundError as LlamaServerNotFoundError,
    LlamaWarning as LlamaWarning,
    MergeLoraError as MergeLoraError,
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

# THE TABLE OF PUBLIC NAMES. Every name this module imports as itself (`from .x import N as N`)
# is public, and only those: the eager imports above (the exception tree and the version:
# cheap, and `except LlamaError` must not import the client) and the imports below, which
# type checkers and IDEs see with their types while at run time nothing is imported here:
# __getattr__ imports a name's subpackage the first time the name is used. To export a name,
# add it to one of these imports; that is the only edit.
#
# __all__ and the map name -> subpackage are derived from these imports (this file's source,
# parsed with ast) the first time either is needed, not at import time: parsing costs ~3 ms
# and the import must stay ~5 ms and do nothing (tests/test_import.py). Why not a run-time
# table (a dict of names): type checkers cannot see through one (every name would be Any, or
# unknown), so it would need this import block beside it, two lists kept in step by a test.
if TYPE_CHECKING:
    from typing import Any

    __all__: list[str]  # derived from these imports; see __getattr__

    from ._placement import (
        Placement as Placement,
        RemoteServer as RemoteServer,
        available_cores as available_cores,
        share_cores as share_cores,
    )
    from .bench import (
        BenchConfig as BenchConfig,
        BenchMetrics as BenchMetrics,
        BenchPrompt as BenchPrompt,
        BenchResult as BenchResult,
        Conversation as Conversation,
        Ramp as Ramp,
        RequestRecord as RequestRecord,
        SweepConfig as SweepConfig,
        SweepResult as SweepResult,
        load_prompts_jsonl as load_prompts_jsonl,
        load_sharegpt as load_sharegpt,
        load_sharegpt_conversations as load_sharegpt_conversations,
        run_bench as run_bench,
        run_sweep as run_sweep,
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
        EngineModel as EngineModel,
        ServerInfo as ServerInfo,
        ServerPlan as ServerPlan,
    )
    from .environment import (
        Environment as Environment,
        detect_environment as detect_environment,
        load_secrets as load_secrets,
    )
    from .frontdoor import FrontDoor as FrontDoor
    from .gpu import (
        GPUSample as GPUSample,
        GPUSampler as GPUSampler,
        attribute_energy as attribute_energy,
        visible_gpus as visible_gpus,
    )
    from .models import (
        GPUSpec as GPUSpec,
        ModelInfo as ModelInfo,
        RAMPlan as RAMPlan,
        RegistryModel as RegistryModel,
        VRAMPlan as VRAMPlan,
        inspect_model as inspect_model,
        list_models as list_models,
        merge_lora as merge_lora,
        quantize as quantize,
        resolve_model as resolve_model,
    )
    from .nccl import Communicator as Communicator, find_nccl as find_nccl
    from .server import (
        LlamaServer as LlamaServer,
        ServerConfig as ServerConfig,
        ServerState as ServerState,
        build_llama_server as build_llama_server,
        export_build_archive as export_build_archive,
        find_llama_server as find_llama_server,
        install_build_archive as install_build_archive,
        server_command as server_command,
    )
    from .telemetry import (
        GenAIInstrumentation as GenAIInstrumentation,
        Telemetry as Telemetry,
        TokenEvents as TokenEvents,
        setup_telemetry as setup_telemetry,
    )

_PUBLIC: dict[str, str] | None = None  # name -> the module it comes from; see _public()


def _public() -> dict[str, str]:
    """Every public name -> the module (``"client"``, ``"_errors"``...) it is imported from.

    Read from this file's imports of a name as itself, at module level and under
    ``if TYPE_CHECKING:``; once.
    """
    global _PUBLIC
    if _PUBLIC is None:
        import ast

        loader = __spec__.loader if __spec__ is not None else None
        get_source = getattr(loader, "get_source", None)
        source = get_source(__name__) if get_source is not None else None
        if source is None:  # an installation without .py files (bytecode only)
            raise ImportError(f"{__name__}: its public names are read from its __init__.py")
        public: dict[str, str] = {}
        for node in ast.parse(source).body:
            if isinstance(node, ast.If):
                if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    continue
                block = node.body
            else:
                block = [node]
            for stmt in block:
                if isinstance(stmt, ast.ImportFrom) and stmt.level == 1 and stmt.module:
                    for alias in stmt.names:
                        if alias.asname == alias.name:
                            public[alias.name] = stmt.module
        _PUBLIC = public
    return _PUBLIC


if not TYPE_CHECKING:  # hidden from type checkers, so a misspelt name stays an error for them

    def __getattr__(name: str) -> Any:
        if name == "__all__":  # `from llamatelemetry_async import *` asks for it too
            value = sorted(_public())
        elif name.startswith("__"):  # hasattr(module, "__wrapped__") and the like: not ours
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        else:
            module = _public().get(name)
            if module is None:
                raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
            value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value  # later look-ups are plain attribute reads
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_public()})
