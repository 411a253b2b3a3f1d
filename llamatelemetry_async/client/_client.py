"""``AsyncLlamaClient``: every llama-server endpoint, streaming ones as ``TokenStream``."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
import msgspec

from .._errors import ClientClosedError, RemoteProtocolError, UsageError
from .._version import __version__
from ._errors_map import map_httpx_error, status_error
from ._http import Backend, PoolStats
from ._observe import Instrumentation, Outcome
from ._stream import HttpxSource, PoolSource, Source, TokenStream
from ._transport import LlamaTransport, httpx_timeouts
from ._types import (
    ChatChunk,
    ChatCompletion,
    Completion,
    CompletionChunk,
    EmbeddingList,
    Health,
    RerankResult,
    ServedModel,
    TextCompletion,
    TextCompletionChunk,
)

__all__ = ["DEFAULT_TIMEOUT", "AsyncLlamaClient", "Message"]

T = TypeVar("T")
OutcomeT = TypeVar("OutcomeT", bound=Outcome)
ChunkT = TypeVar("ChunkT", CompletionChunk, ChatChunk, TextCompletionChunk)

#: A chat message: ``{"role": "user", "content": "..."}`` (any OpenAI message shape).
Message = Mapping[str, Any]

#: Reads may wait long: a big prompt's prefill sends nothing until the first token.
DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=60.0)


class _State(enum.Enum):
    UNOPENED = 1
    OPENED = 2
    CLOSED = 3


class _ModelList(msgspec.Struct, frozen=True):
    data: list[ServedModel] = msgspec.field(default_factory=list)


class _RerankResponse(msgspec.Struct, frozen=True):
    results: list[RerankResult] = msgspec.field(default_factory=list)


class _Tokens(msgspec.Struct, frozen=True):
    tokens: list[int | dict[str, Any]]


class _Content(msgspec.Struct, frozen=True):
    content: str = ""


class _Prompt(msgspec.Struct, frozen=True):
    prompt: str = ""


class AsyncLlamaClient:
    """An async client for one llama-server.

    ```python
    async with AsyncLlamaClient("http://127.0.0.1:8080") as client:
        async with client.stream_completion("Once upon a time", n_predict=32) as stream:
            async for chunk in stream:
                print(chunk.text, end="", flush=True)
        print(stream.timings)
    ```

    By default requests go through the library's own HTTP/1.1 connection pool
    (``LlamaTransport``), whose cost per request does not grow with the number of open
    connections, so one client carries thousands of concurrent streams. Pass
    ``http_client`` to use your own ``httpx.AsyncClient`` instead (its transport, proxies,
    TLS and limits); the client then does not close it.

    ``timeout`` is an ``httpx.Timeout`` or seconds; the default allows 600 s between two
    reads because a long prompt's prefill sends nothing until the first token.
    ``max_connections=None`` (the default) sets no limit.
    """

    def __init__(
        self,
        base_url: str | httpx.URL = "http://127.0.0.1:8080",
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_connections: int | None = None,
        headers: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
        backend: Backend = "auto",
        instrumentation: Instrumentation | None = None,
    ) -> None:
        url = httpx.URL(str(base_url))
        if url.scheme not in ("http", "https") or not url.host:
            raise UsageError(
                f"base_url must be an http:// or https:// URL with a host, got {str(base_url)!r}"
            )
        if backend not in ("auto", "asyncio", "anyio"):
            raise UsageError(f"backend must be 'auto', 'asyncio' or 'anyio', got {backend!r}")
        self.base_url = url
        self.instrumentation = instrumentation
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        all_headers = {"User-Agent": f"llamatelemetry_async/{__version__}"}
        if api_key:
            all_headers["Authorization"] = f"Bearer {api_key}"
        all_headers.update(headers or {})
        self._prefix = url.raw_path.rstrip(b"/")
        self._origin = f"{url.scheme}://{url.netloc.decode('ascii')}"
        self._transport: LlamaTransport | None = None
        self._owns_http = http_client is None
        if http_client is None:
            transport: httpx.AsyncBaseTransport
            if url.scheme == "http":
                transport = self._transport = LlamaTransport(
                    max_connections=max_connections, backend=backend
                )
            else:  # TLS: httpx's own transport (the O(1) pool speaks plain HTTP only)
                limits = httpx.Limits(max_connections=max_connections)
                transport = httpx.AsyncHTTPTransport(limits=limits)
            http_client = httpx.AsyncClient(
                base_url=url, transport=transport, timeout=self._timeout, headers=all_headers
            )
            self._static_head = b"".join(
                b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1"))
                for k, v in {
                    "Host": url.netloc.decode("ascii"),
                    "Accept": "text/event-stream",
                    "Content-Type": "application/json",
                    **all_headers,
                }.items()
            )
        else:
            self._static_head = b""
        self._http = http_client
        self._extra_headers = all_headers
        self._state = _State.UNOPENED

    # ----------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> Self:
        if self._state is not _State.UNOPENED:
            raise UsageError(
                "this client was already opened"
                if self._state is _State.OPENED
                else "this client is closed; create a new AsyncLlamaClient"
            )
        self._state = _State.OPENED
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection; calling it again does nothing."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        if self._owns_http:
            await self._http.aclose()  # closes our transport and its pool too

    @property
    def is_closed(self) -> bool:
        """True once ``aclose()`` was called (or the ``async with`` block was left)."""
        return self._state is _State.CLOSED

    @property
    def pool_stats(self) -> PoolStats | None:
        """Connections opened, active, idle and requests sent (built-in transport only)."""
        return self._transport.stats if self._transport is not None else None

    def _check_open(self) -> None:
        if self._state is _State.CLOSED:
            raise ClientClosedError("this client is closed; create a new AsyncLlamaClient")

    # ----------------------------------------------------------------- streaming
    def stream_completion(
        self, prompt: str | Sequence[Any], **params: Any
    ) -> TokenStream[CompletionChunk]:
        """Stream llama.cpp's native ``POST /completion``.

        ``params`` use llama.cpp's names: ``n_predict``, ``temperature``, ``seed``,
        ``stop``, ``top_k``, ``cache_prompt``, ...
        """
        return self._stream(
            *completion_stream_request(prompt, params), CompletionChunk, "text_completion"
        )

    def stream_chat(self, messages: Iterable[Message], **params: Any) -> TokenStream[ChatChunk]:
        """Stream ``POST /v1/chat/completions`` (OpenAI names: ``max_tokens``, ...).

        Usage is asked for (``stream_options.include_usage``) unless ``params`` say otherwise.
        """
        return self._stream(*chat_stream_request(messages, params), ChatChunk, "chat")

    def stream_openai_completion(
        self, prompt: str | Sequence[Any], **params: Any
    ) -> TokenStream[TextCompletionChunk]:
        """Stream the OpenAI-compatible ``POST /v1/completions``."""
        body = {"prompt": prompt, "stream_options": {"include_usage": True}, **params}
        return self._stream("/v1/completions", body, TextCompletionChunk, "text_completion")

    def stream_infill(
        self, input_prefix: str, input_suffix: str, **params: Any
    ) -> TokenStream[CompletionChunk]:
        """Stream ``POST /infill`` (fill-in-the-middle; the model needs FIM tokens)."""
        body = {"input_prefix": input_prefix, "input_suffix": input_suffix, **params}
        return self._stream("/infill", body, CompletionChunk, "text_completion")

    def _stream(
        self, path: str, body: dict[str, Any], chunk_type: type[ChunkT], operation: str
    ) -> TokenStream[ChunkT]:
        source = self._stream_source(path, body)
        instrumentation = self.instrumentation
        if instrumentation is None:
            return TokenStream(source, chunk_type)
        return TokenStream(source, chunk_type, instrumentation.start(operation, body, stream=True))

    def _stream_source(self, path: str, body: dict[str, Any]) -> Source:
        """Where a stream of ``POST path`` reads from (the engine wraps it to route)."""
        self._check_open()
        body["stream"] = True
        payload = msgspec.json.encode(body)
        url = self.base_url
        if self._transport is not None:
            target = self._prefix + path.encode("ascii")
            head = b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n" % (
                target,
                self._static_head,
                len(payload),
            )
            source: PoolSource | HttpxSource = PoolSource(
                self._transport.pool,
                url.host,
                url.port or 80,
                head,
                payload,
                httpx_timeouts(self._timeout),
                f"{url.scheme}://{url.netloc.decode('ascii')}{target.decode('ascii')}",
            )
        else:
            request = self._http.build_request(
                "POST",
                self._url(path),
                content=payload,
                headers={
                    **self._extra_headers,
                    "Accept": "text/event-stream",
                    "Content-Type": "application/json",
                },
            )
            source = HttpxSource(self._http, request)
        return source

    # ----------------------------------------------------------------- generation
    async def completion(self, prompt: str | Sequence[Any], **params: Any) -> Completion:
        """``POST /completion`` without streaming (llama.cpp parameter names)."""
        body = {"prompt": prompt, **params}
        return await self._observed("text_completion", "/completion", body, Completion)

    async def chat(self, messages: Iterable[Message], **params: Any) -> ChatCompletion:
        """``POST /v1/chat/completions`` without streaming (OpenAI parameter names)."""
        body = {"messages": _messages(messages), **params}
        return await self._observed("chat", "/v1/chat/completions", body, ChatCompletion)

    async def openai_completion(self, prompt: str | Sequence[Any], **params: Any) -> TextCompletion:
        """``POST /v1/completions`` without streaming."""
        body = {"prompt": prompt, **params}
        return await self._observed("text_completion", "/v1/completions", body, TextCompletion)

    async def infill(self, input_prefix: str, input_suffix: str, **params: Any) -> Completion:
        """``POST /infill`` without streaming."""
        body = {"input_prefix": input_prefix, "input_suffix": input_suffix, **params}
        return await self._observed("text_completion", "/infill", body, Completion)

    # ----------------------------------------------------------------- server state
    async def health(self) -> Health:
        """``GET /health``; raises ``HTTPStatusError`` (503) while the model loads."""
        return await self._call("GET", "/health", None, Health)

    async def props(self) -> dict[str, Any]:
        """``GET /props``: the server's settings, model path, chat template, build."""
        return await self._call("GET", "/props", None, dict[str, Any])

    async def set_props(self, **props: Any) -> dict[str, Any]:
        """``POST /props`` (the server must run with ``--props``)."""
        return await self._call("POST", "/props", props, dict[str, Any])

    async def slots(self) -> list[dict[str, Any]]:
        """``GET /slots``: each slot's state (the server must not run with ``--no-slots``)."""
        return await self._call("GET", "/slots", None, list[dict[str, Any]])

    async def save_slot(self, id_slot: int, filename: str) -> dict[str, Any]:
        """Save a slot's KV cache to ``filename`` under the server's ``--slot-save-path``."""
        return await self._slot_action(id_slot, "save", filename)

    async def restore_slot(self, id_slot: int, filename: str) -> dict[str, Any]:
        """Restore a slot's KV cache saved with ``save_slot``."""
        return await self._slot_action(id_slot, "restore", filename)

    async def erase_slot(self, id_slot: int) -> dict[str, Any]:
        """Erase a slot's KV cache."""
        return await self._slot_action(id_slot, "erase", None)

    async def _slot_action(self, id_slot: int, action: str, filename: str | None) -> dict[str, Any]:
        body = {"filename": filename} if filename is not None else {}
        path = f"/slots/{int(id_slot)}?action={action}"
        return await self._call("POST", path, body, dict[str, Any])

    async def metrics(self) -> dict[str, float]:
        """``GET /metrics`` parsed: sample name -> value (the server needs ``--metrics``)."""
        return _parse_prometheus((await self._send("GET", "/metrics", None)).text)

    async def lora_adapters(self) -> list[dict[str, Any]]:
        """``GET /lora-adapters``."""
        return await self._call("GET", "/lora-adapters", None, list[dict[str, Any]])

    async def set_lora_adapters(self, adapters: Sequence[Mapping[str, Any]]) -> Any:
        """``POST /lora-adapters`` with ``[{"id": 0, "scale": 0.5}, ...]``."""
        return await self.request("POST", "/lora-adapters", list(adapters))

    async def models(self) -> list[ServedModel]:
        """``GET /v1/models``."""
        return (await self._call("GET", "/v1/models", None, _ModelList)).data

    # ----------------------------------------------------------------- text tools
    async def tokenize(
        self, content: str, *, add_special: bool = False, parse_special: bool = True
    ) -> list[int]:
        """``POST /tokenize``: token ids of ``content``."""
        body = {"content": content, "add_special": add_special, "parse_special": parse_special}
        tokens = (await self._call("POST", "/tokenize", body, _Tokens)).tokens
        return [t if isinstance(t, int) else int(t["id"]) for t in tokens]

    async def detokenize(self, tokens: Sequence[int]) -> str:
        """``POST /detokenize``: the text of ``tokens``."""
        return (await self._call("POST", "/detokenize", {"tokens": list(tokens)}, _Content)).content

    async def apply_template(self, messages: Iterable[Message], **params: Any) -> str:
        """``POST /apply-template``: the prompt the chat template makes of ``messages``."""
        body = {"messages": _messages(messages), **params}
        return (await self._call("POST", "/apply-template", body, _Prompt)).prompt

    # ----------------------------------------------------------------- embeddings
    async def embedding(self, content: str | Sequence[str], **params: Any) -> list[dict[str, Any]]:
        """Native ``POST /embedding`` (raw: its shape depends on ``--pooling``)."""
        body = {"content": content, **params}
        return await self._call("POST", "/embedding", body, list[dict[str, Any]])

    async def embeddings(self, input: str | Sequence[str], **params: Any) -> EmbeddingList:
        """OpenAI ``POST /v1/embeddings`` (the server needs ``--embeddings``)."""
        return await self._call("POST", "/v1/embeddings", {"input": input, **params}, EmbeddingList)

    async def rerank(
        self, query: str, documents: Sequence[str], *, top_n: int | None = None, **params: Any
    ) -> list[RerankResult]:
        """``POST /rerank``: relevance of each document (the server needs ``--reranking``)."""
        body: dict[str, Any] = {"query": query, "documents": list(documents), **params}
        if top_n is not None:
            body["top_n"] = top_n
        return (await self._call("POST", "/rerank", body, _RerankResponse)).results

    # ----------------------------------------------------------------- raw access
    async def request(self, method: str, path: str, json: Any = None) -> Any:
        """Any endpoint, raw: the decoded JSON (or the text, if it is not JSON)."""
        response = await self._send(method, path, json)
        try:
            return msgspec.json.decode(response.content)
        except msgspec.DecodeError:
            return response.text

    def _url(self, path: str) -> str:
        # Absolute, so a user's own httpx client (without our base_url) works too.
        return self._origin + self._prefix.decode("ascii") + path

    async def _send(self, method: str, path: str, body: Any) -> httpx.Response:
        self._check_open()
        content = msgspec.json.encode(body) if body is not None else None
        url = self._url(path)
        # Our own httpx client carries the headers already; a user's does not know them.
        headers = {} if self._owns_http else dict(self._extra_headers)
        if content is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = await self._http.request(method, url, content=content, headers=headers)
        except httpx.HTTPError as exc:
            raise map_httpx_error(exc, url) from exc
        if response.status_code >= 400:
            raise status_error(response.status_code, response.content, str(response.url))
        return response

    async def _observed(
        self, operation: str, path: str, body: dict[str, Any], result: type[OutcomeT]
    ) -> OutcomeT:
        """A generation call, seen by the instrumentation when there is one."""
        instrumentation = self.instrumentation
        if instrumentation is None:
            return await self._call("POST", path, body, result)
        observer = instrumentation.start(operation, body, stream=False)
        observer.on_server(self._origin, None, ())
        try:
            with observer.activate():
                outcome = await self._call("POST", path, body, result)
        except BaseException as exc:
            observer.on_error(exc)
            raise
        observer.on_end(outcome)
        return outcome

    async def _call(self, method: str, path: str, body: Any, result: type[T]) -> T:
        response = await self._send(method, path, body)
        try:
            return msgspec.json.decode(response.content, type=result)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise RemoteProtocolError(
                f"unexpected response from {response.url}: {exc}", url=str(response.url)
            ) from exc

    def __repr__(self) -> str:
        return f"<AsyncLlamaClient {self.base_url} {self._state.name.lower()}>"


def completion_stream_request(prompt: Any, params: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Path and body of a streamed native completion."""
    return "/completion", {"prompt": prompt, **params}


def chat_stream_request(
    messages: Iterable[Message], params: Mapping[str, Any]
) -> tuple[str, dict[str, Any]]:
    """Path and body of a streamed chat completion (usage asked for unless params say)."""
    body = {"messages": _messages(messages), "stream_options": {"include_usage": True}}
    return "/v1/chat/completions", {**body, **params}


def _messages(messages: Iterable[Message]) -> Any:
    # A str is iterable too: pass it on untouched so the server names the mistake.
    return messages if isinstance(messages, str) else list(messages)


def _parse_prometheus(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values[sample.name] = float(sample.value)
    except ValueError as exc:
        raise RemoteProtocolError(f"malformed /metrics text: {exc}") from exc
    return values
