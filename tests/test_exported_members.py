"""The public surface is pinned: adding or removing a name is a deliberate change."""

from __future__ import annotations

import llamatelemetry_async

EXPECTED = [
    "APIError",
    "AsyncEngine",
    "AsyncLlamaClient",
    "BenchConfig",
    "BenchMetrics",
    "BenchPrompt",
    "BenchResult",
    "BuildArchiveError",
    "BuildError",
    "CUDAArchitectureError",
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
    "Conversation",
    "DEFAULT_TIMEOUT",
    "DeadlineExceeded",
    "Embedding",
    "EmbeddingList",
    "EngineBusyError",
    "EngineError",
    "EngineModel",
    "Environment",
    "FrontDoor",
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
    "MergeLoraError",
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
    "RAMPlan",
    "Ramp",
    "ReadError",
    "ReadTimeout",
    "RegistryModel",
    "RemoteProtocolError",
    "RemoteServer",
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
    "SweepConfig",
    "SweepResult",
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
    "available_cores",
    "build_llama_server",
    "detect_environment",
    "export_build_archive",
    "find_llama_server",
    "find_nccl",
    "inspect_model",
    "install_build_archive",
    "list_models",
    "load_prompts_jsonl",
    "load_secrets",
    "load_sharegpt",
    "load_sharegpt_conversations",
    "merge_lora",
    "quantize",
    "resolve_model",
    "run_bench",
    "run_sweep",
    "server_command",
    "setup_telemetry",
    "share_cores",
    "visible_gpus",
]


def test_all_is_pinned_and_sorted() -> None:
    # ruff (RUF022) keeps __all__ itself sorted, constants first.
    assert sorted(llamatelemetry_async.__all__) == EXPECTED
    assert len(set(llamatelemetry_async.__all__)) == len(EXPECTED)


def test_every_public_name_exists_and_is_documented() -> None:
    for name in llamatelemetry_async.__all__:
        obj = getattr(llamatelemetry_async, name)
        if callable(obj) and not name.startswith("_"):
            assert obj.__doc__, f"{name} has no docstring"


def test_errors_form_one_tree() -> None:
    for name in llamatelemetry_async.__all__:
        obj = getattr(llamatelemetry_async, name)
        if isinstance(obj, type) and issubclass(obj, Warning):
            assert issubclass(obj, llamatelemetry_async.LlamaWarning), name
        elif isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, llamatelemetry_async.LlamaError), name
