"""The one exception tree of llamatelemetry_async.

```
LlamaError
├── UsageError ..................... the caller did something the API does not allow
│   ├── ClientClosedError .......... a client used after aclose()
│   ├── StreamConsumedError ........ a TokenStream iterated again after it ended or was closed
│   └── ConfigError ................ invalid ServerConfig / ServerPlan / Placement (names the field)
│       └── PromptFileError ........ a benchmark prompts file (JSONL) with a bad line (path, line)
├── TransportError ................. the request did not get a complete HTTP answer
│   ├── ConnectError ............... no connection could be made (server down, wrong port)
│   ├── ReadError .................. the connection broke while reading the response
│   ├── WriteError ................. the connection broke while sending the request
│   ├── RemoteProtocolError ........ the server sent malformed HTTP, SSE or JSON
│   └── TimeoutException ........... (also a builtin TimeoutError)
│       ├── ConnectTimeout
│       ├── ReadTimeout
│       ├── WriteTimeout
│       ├── PoolTimeout
│       └── DeadlineExceeded ....... a request (a whole stream) outlived its ``deadline=``
├── APIError ....................... the server answered, with an error
│   ├── HTTPStatusError ............ a non-2xx status, with the server's own message and type
│   └── StreamError ................ an error event in the middle of an SSE stream
├── LlamaServerError ............... getting or running the llama-server binary
│   ├── LlamaServerNotFoundError ... no binary found; says how to get one
│   ├── BuildError ................. building llama-server from source failed
│   ├── BuildArchiveError .......... a build archive is corrupt, hostile or not for this machine
│   ├── CUDAArchitectureError ...... the binary has no code for its GPUs' compute capability
│   ├── ServerStartError ........... a server exited or timed out while starting (log tail)
│   └── ServerCrashedError ......... a server died with a request in flight
├── EngineError .................... the engine could not take the request
│   ├── EngineBusyError ............ every slot busy and the waiting line full
│   └── ServerUnavailableError ..... no server is ready and none can become ready (log tails)
├── ModelError ..................... a model file, name or plan problem (names the model)
│   ├── ModelFormatError ........... not a GGUF file, truncated or corrupt (path, problem)
│   ├── ModelNotFoundError ......... a spec that resolves to nothing (lists what was tried)
│   ├── ModelDoesNotFitError ....... no setting fits the GPUs (lists what would fit)
│   ├── QuantizeError .............. llama-quantize failed (exit code, log tail)
│   └── MergeLoraError ............. llama-export-lora failed (exit code, log tail)
└── NCCLError ...................... an NCCL call failed (code, name, NCCL's own texts)
    ├── NCCLNotFoundError .......... no libnccl.so.2 found; says where it looked, what to install
    ├── NCCLSymbolError ............ the loaded NCCL lacks a function (older library)
    └── NCCLUsageError ............. bad buffers or arguments, before any call (also a UsageError)
```

Dependency errors (httpx, OSError, msgspec) are translated at the edges with
``raise ... from exc`` so that callers only ever catch this tree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = [
    "APIError",
    "BuildArchiveError",
    "BuildError",
    "CUDAArchitectureError",
    "ClientClosedError",
    "ConfigError",
    "ConnectError",
    "ConnectTimeout",
    "DeadlineExceeded",
    "EngineBusyError",
    "EngineError",
    "HTTPStatusError",
    "LlamaError",
    "LlamaServerError",
    "LlamaServerNotFoundError",
    "LlamaWarning",
    "MergeLoraError",
    "ModelDoesNotFitError",
    "ModelError",
    "ModelFormatError",
    "ModelNotFoundError",
    "NCCLError",
    "NCCLNotFoundError",
    "NCCLSymbolError",
    "NCCLUsageError",
    "PoolTimeout",
    "PromptFileError",
    "QuantizeError",
    "ReadError",
    "ReadTimeout",
    "RemoteProtocolError",
    "ServerCrashedError",
    "ServerStartError",
    "ServerUnavailableError",
    "StreamConsumedError",
    "StreamError",
    "TimeoutException",
    "TransportError",
    "UnknownParameterWarning",
    "UsageError",
    "WriteError",
    "WriteTimeout",
]


class LlamaError(Exception):
    """Base class of every error this library raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable whatever a subclass's __init__ takes (keyword-only fields), so that an
        # error raised in another process (a Ray actor) arrives as itself, fields and all.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[LlamaError], args: tuple[Any, ...], state: dict[str, Any]) -> LlamaError:
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class UsageError(LlamaError):
    """The API was used in a way it does not allow; the message says what to do instead."""


class ClientClosedError(UsageError):
    """A client (or an NCCL communicator) was used after ``aclose()``; create a new one."""


class StreamConsumedError(UsageError):
    """A ``TokenStream`` was iterated after it ended or was closed; start a new request."""


class ConfigError(UsageError):
    """A configuration value is invalid; raised before anything is spawned.

    ``field`` names the offending field (``"ubatch_size"``, ``"tensor_split"`` ...) when
    there is one; the message names it too and says what is allowed.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


_JSONL_PROMPTS = (
    'Each line must be a JSON object with "prompt" (a string or a list of token ids) or '
    '"messages" (a list of {"role": ..., "content": ...}), and optionally "max_tokens" '
    "(an int >= 1)"
)


class PromptFileError(ConfigError):
    """A prompts or dataset file cannot be used; ``path`` and ``line`` (from 1) say where.

    ``line`` is ``None`` when the problem is the file as a whole (missing, empty);
    ``expected`` says what the file should hold (by default: the JSONL prompts format).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        line: int | None,
        problem: str,
        *,
        expected: str = _JSONL_PROMPTS,
    ) -> None:
        where = f"{os.fspath(path)}:{line}" if line is not None else os.fspath(path)
        super().__init__(f"{where}: {problem}. {expected}", field="prompts")
        self.path = Path(path)
        self.line = line
        self.problem = problem


class TransportError(LlamaError):
    """The request did not get a complete HTTP answer.

    ``url`` names the request, when one was being made.
    """

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class ConnectError(TransportError):
    """No connection could be made: is the server running, on that host and port?"""


class ReadError(TransportError):
    """The connection broke while the response was being read."""


class WriteError(TransportError):
    """The connection broke while the request was being sent."""


class RemoteProtocolError(TransportError):
    """The server sent something that is not valid HTTP/1.1, SSE or JSON."""


class TimeoutException(TransportError, TimeoutError):
    """A time limit ran out; raise the matching part of ``httpx.Timeout`` if it is too short."""


class ConnectTimeout(TimeoutException):
    """Connecting took longer than the connect timeout."""


class ReadTimeout(TimeoutException):
    """No byte arrived for longer than the read timeout (a long prefill needs a larger one)."""


class WriteTimeout(TimeoutException):
    """Sending the request took longer than the write timeout."""


class PoolTimeout(TimeoutException):
    """No connection became free within the pool timeout (``max_connections`` reached)."""


class DeadlineExceeded(TimeoutException):
    """The whole request took longer than its ``deadline=`` (seconds, for a stream end to end).

    The read timeout bounds only the gap between two reads, so a server that drips bytes
    slowly never hits it; a deadline bounds the total.
    """


class APIError(LlamaError):
    """The server answered with an error.

    ``message`` and ``error_type`` are the server's own (llama-server sends
    ``{"error": {"code", "message", "type"}}``); ``body`` is the raw decoded body.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error_type: str | None = None,
        body: object = None,
        url: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.error_type = error_type
        self.body = body
        self.url = url


class HTTPStatusError(APIError):
    """The server answered with a 4xx or 5xx status.

    ``status_code``, ``message`` and ``error_type`` say what the server objected to.
    """


class StreamError(APIError):
    """The server sent an error event in the middle of a stream."""


class LlamaServerError(LlamaError):
    """Getting or running the llama-server binary failed."""


class LlamaServerNotFoundError(LlamaServerError):
    """No llama-server binary was found in any of the places searched.

    ``searched`` lists them in order.
    """

    def __init__(self, message: str, *, searched: list[str]) -> None:
        super().__init__(message)
        self.searched = searched


class BuildError(LlamaServerError):
    """Building llama-server from source failed; ``log_tail`` holds the last build lines."""

    def __init__(self, message: str, *, log_tail: str = "") -> None:
        super().__init__(f"{message}\n{log_tail}" if log_tail else message)
        self.log_tail = log_tail


class BuildArchiveError(LlamaServerError):
    """A build archive cannot be used: unreadable, corrupt, tampered with, or not for this
    machine. ``archive`` is its path; the message says what is wrong and what to do."""

    def __init__(self, message: str, *, archive: str) -> None:
        super().__init__(message)
        self.archive = archive


class CUDAArchitectureError(LlamaServerError):
    """The llama-server binary has no code its GPUs can run (raised before it starts).

    ``binary`` is its path, ``architectures`` what it was built for (``"sm_90"``,
    ``"compute_90"``), ``gpus`` the GPU ids it was given and ``compute_capabilities`` theirs
    (``"7.5"``), in the same order. The message names the ``build-server --cuda-arch`` that
    fixes it.
    """

    def __init__(
        self,
        message: str,
        *,
        binary: str,
        architectures: tuple[str, ...],
        gpus: tuple[int, ...],
        compute_capabilities: tuple[str, ...],
    ) -> None:
        super().__init__(message)
        self.binary = binary
        self.architectures = architectures
        self.gpus = gpus
        self.compute_capabilities = compute_capabilities


class ServerStartError(LlamaServerError):
    """A llama-server exited, or did not become ready, while starting.

    ``exit_code`` is ``None`` when it was still running (a start timeout); ``log_tail`` holds
    its last lines, which usually say why (bad model file, port taken, out of memory).
    """

    def __init__(
        self, message: str, *, server: str, exit_code: int | None, log_tail: str = ""
    ) -> None:
        super().__init__(f"{message}\n{log_tail}" if log_tail else message)
        self.server = server
        self.exit_code = exit_code
        self.log_tail = log_tail


class ServerCrashedError(LlamaServerError):
    """The server handling a request died; the engine restarts it, retry the request."""

    def __init__(self, message: str, *, server: str, exit_code: int | None) -> None:
        super().__init__(message)
        self.server = server
        self.exit_code = exit_code


class EngineError(LlamaError):
    """The engine could not take a request: it is closing, or every server has exited.

    Also raised when no server is ready for an operation that needs every server
    (``set_lora_adapters``).
    """


class EngineBusyError(EngineError):
    """Every slot is busy and ``max_waiting`` requests already wait; slow down or raise it."""


class ServerUnavailableError(EngineError):
    """No server is ready and none can become ready: each failed to (re)start repeatedly.

    ``servers`` names them; ``log_tail`` holds the last lines of each (they usually say why:
    a missing model file, out of memory). The engine keeps retrying in the background, and a
    server that comes back takes requests again.
    """

    def __init__(self, message: str, *, servers: tuple[str, ...], log_tail: str = "") -> None:
        super().__init__(f"{message}\n{log_tail}" if log_tail else message)
        self.servers = servers
        self.log_tail = log_tail


class ModelError(LlamaError):
    """A model file, model name or placement plan problem; ``model`` names the model."""

    def __init__(self, message: str, *, model: str | None = None) -> None:
        super().__init__(message)
        self.model = model


class ModelFormatError(ModelError):
    """The file is not a readable GGUF: not GGUF at all, truncated, or corrupt.

    ``model`` is the path and ``problem`` says what is wrong with it, in a few words.
    """

    def __init__(self, message: str, *, model: str | None = None, problem: str = "") -> None:
        super().__init__(message, model=model)
        self.problem = problem


class ModelNotFoundError(ModelError):
    """A model spec resolved to nothing; ``tried`` lists every place looked, in order."""

    def __init__(self, message: str, *, model: str | None = None, tried: list[str]) -> None:
        super().__init__(message, model=model)
        self.tried = tried


class ModelDoesNotFitError(ModelError):
    """No setting fits the model on the GPUs; ``suggestions`` lists what would fit."""

    def __init__(self, message: str, *, model: str | None = None, suggestions: list[str]) -> None:
        super().__init__(message, model=model)
        self.suggestions = suggestions


class _ToolError(ModelError):
    """A llama.cpp model tool failed; ``returncode`` and ``log_tail`` say how."""

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        returncode: int | None = None,
        log_tail: str = "",
    ) -> None:
        super().__init__(message, model=model)
        self.returncode = returncode
        self.log_tail = log_tail


class QuantizeError(_ToolError):
    """``llama-quantize`` failed; ``returncode`` and ``log_tail`` say how."""


class MergeLoraError(_ToolError):
    """``llama-export-lora`` failed; ``returncode`` and ``log_tail`` say how."""


class NCCLError(LlamaError):
    """An NCCL call failed.

    ``code`` is the ``ncclResult_t`` value, ``name`` its enum name (``"ncclInvalidUsage"``);
    ``error_string`` is ``ncclGetErrorString(code)`` and ``last_error`` is ``ncclGetLastError``,
    NCCL's own account of what went wrong (``None`` where not applicable).
    """

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        name: str | None = None,
        error_string: str | None = None,
        last_error: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.name = name
        self.error_string = error_string
        self.last_error = last_error


class NCCLNotFoundError(NCCLError):
    """No NCCL library was found; ``searched`` lists the places tried, in order.

    ``pip install nvidia-nccl-cu12`` (or ``-cu13``) provides one.
    """

    def __init__(self, message: str, *, searched: list[str]) -> None:
        super().__init__(message)
        self.searched = searched


class NCCLSymbolError(NCCLError):
    """The loaded NCCL lacks a function (it is older than the binding); ``symbol`` names it."""

    def __init__(self, message: str, *, symbol: str) -> None:
        super().__init__(message)
        self.symbol = symbol


class NCCLUsageError(NCCLError, UsageError):
    """Buffers or arguments that NCCL would reject (count or dtype mismatch, bad layout).

    Raised before any library call.
    """


class LlamaWarning(UserWarning):
    """Base class of the warnings this library issues."""


class UnknownParameterWarning(LlamaWarning):
    """A request keyword is neither a known llama.cpp/OpenAI parameter nor in ``extra_body=``.

    It is still sent (llama.cpp gains parameters often); a typo such as ``n_predcit`` is the
    usual cause. Pass deliberate unknown names through ``extra_body=`` to silence it, or
    create the client with ``strict=True`` to raise ``UsageError`` instead.
    """
