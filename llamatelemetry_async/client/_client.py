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
from ._params import (
    NO_OPTIONS,
    RequestOptions,
    TimeoutTypes,
    chat_messages,
    check_api_key,
    check_headers,
    client_timeout,
    encode_body,
    parse_options,
    request_options,
)
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

    Every request method also takes, as keywords, ``timeout=`` (this request only),
    ``extra_headers=`` and, where a JSON body is sent, ``extra_body=`` (fields merged into
    the body unchecked); streaming methods take ``deadline=`` (seconds for the whole
    stream). These names never go into the body. Other keywords are llama-server request
    parameters, sent as they are; a name that neither llama.cpp nor the OpenAI API knows
    (a typo such as ``n_predcit``) gives one ``UnknownParameterWarning`` per name, or a
    ``UsageError`` when the client was created with ``strict=True``.
    """

    def __init__(
        self,
        base_url: str | httpx.URL = "http://127.0.0.1:8080",
        *,
        api_key: str | None = None,
        timeout: TimeoutTypes | None = DEFAULT_TIMEOUT,
        max_connections: int | None = None,
        headers: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
        backend: Backend = "auto",
        instrumentation: Instrumentation | None = None,
        strict: bool = False,
    ) -> None:
        try:
            url = base_url if isinstance(base_url, httpx.URL) else httpx.URL(str(base_url))
        except httpx.InvalidURL as exc:
            raise UsageError(
                f"base_url {_redact_text(str(base_url))!r} is not a valid URL: {exc}"
            ) from None  # httpx's error may quote the URL whole, password included
        if url.scheme not in ("http", "https") or not url.host:
            raise UsageError(
                "base_url must be an http:// or https:// URL with a host, got "
                f"{_redact_text(str(base_url))!r}"
            )
        if backend not in ("auto", "asyncio", "anyio"):
            raise UsageError(f"backend must be 'auto', 'asyncio' or 'anyio', got {backend!r}")
        self.base_url = url
        self.instrumentation = instrumentation
        self._strict = bool(strict)
        self._timeout = client_timeout(timeout)
        self._pool_timeouts = httpx_timeouts(self._timeout)
        all_headers = {"User-Agent": f"llamatelemetry_async/{__version__}"}
        if api_key is not None:
            check_api_key(api_key)
            if api_key:
                all_headers["Authorization"] = f"Bearer {api_key}"
        if headers is not None:
            all_headers = _merge_headers(all_headers, check_headers(headers, "headers"))
        self._prefix = url.raw_path.rstrip(b"/")
        self._origin = f"{url.scheme}://{url.netloc.decode('ascii')}"
        self._transport: LlamaTransport | None = None
        self._owns_http = http_client is None
        # The head of every streamed request on the built-in pool: written once, as bytes.
        self._head_headers = _merge_headers(
            {
                "Host": url.netloc.decode("ascii"),
                "Accept": "text/event-stream",
                "Content-Type": "application/json",
            },
            all_headers,
        )
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
            self._static_head = _head_bytes(self._head_headers)
        else:
            self._static_head = b""
        self._http = http_client
        self._headers = all_headers
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
    def strict(self) -> bool:
        """True if unknown request parameter names raise ``UsageError`` (not a warning)."""
        return self._strict

    @property
    def pool_stats(self) -> PoolStats | None:
        """Connections opened, active, idle and requests sent (built-in transport only)."""
        return self._transport.stats if self._transport is not None else None

    def _check_open(self) -> None:
        if self._state is _State.CLOSED:
            raise ClientClosedError("this client is closed; create a new AsyncLlamaClient")

    def _options(
        self,
        params: Mapping[str, Any],
        timeout: TimeoutTypes | None,
        deadline: float | None,
        extra_headers: Mapping[str, str] | None,
        extra_body: Mapping[str, Any] | None,
    ) -> RequestOptions:
        return parse_options(
            params, timeout, deadline, extra_headers, extra_body, strict=self._strict
        )

    # ----------------------------------------------------------------- streaming
    def stream_completion(
        self,
        prompt: str | Sequence[Any],
        *,
        timeout: TimeoutTypes | None = None,
        deadline: float | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        **params: Any,
    ) -> TokenStream[CompletionChunk]:
        """Stream llama.cpp's native ``POST /completion``.

        ``params`` use llama.cpp's names: ``n_predict``, ``temperature``, ``seed``,
        ``stop``, ``top_k``, ``cache_prompt``, ...
        """
        options = self._options(params, timeout, deadline, extra_headers, extra_body)
        return self._stream(
            *completion_stream_request(prompt, params), CompletionChunk, "text_completion", options
        )

    def stream_chat(
        self,
        messages: Iterable[Message],
        *,
        timeout: TimeoutTypes | None = None,
        deadline: float | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        **params: Any,
    ) -> TokenStream[ChatChunk]:
        """Stream ``POST /v1/chat/completions`` (OpenAI names: ``max_tokens``, ...).

        Usage is asked for (``stream_options.include_usage``) unless ``params`` say otherwise.
        """
        options = self._options(params, timeout, deadline, extra_headers, extra_body)
        return self._stream(*chat_stream_request(messages, params), ChatChunk, "chat", options)

    def stream_openai_completion(
        self,
        prompt: str | Sequence[Any],
        *,
        timeout: TimeoutTypes | None = None,
        deadline: float | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        **params: Any,
    ) -> TokenStream[TextCompletionChunk]:
        """Stream the OpenAI-compatible ``POST /v1/completions``."""
        options = self._options(params, timeout, deadline, extra_headers, extra_body)
        body = {"prompt": prompt, "stream_options": {"include_usage": True}, **params}
        return self._stream(
            "/v1/completions", body, TextCompletionChunk, "text_completion", options
        )

    def stream_infill(
        self,
        input_prefix: str,
        input_suffix: str,
        *,
        timeout: TimeoutTypes | None = None,
        deadline: float | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        **params: Any,
    ) -> TokenStream[CompletionChunk]:
        """Stream ``POST /infill`` (fill-in-the-middle; the model needs FIM tokens)."""
        options = self._options(params, timeout, deadline, extra_headers, extra_body)
        body = {"input_prefix": input_prefix, "input_suffix": input_suffix, **params}
        return self._stream("/infill", body, CompletionChunk, "text_completion", options)

    def _stream(
        self,
        path: str,
        body: dict[str, Any],
        chunk_type: type[ChunkT],
        operation: str,
        options: RequestOptions,
    ) -> TokenStream[ChunkT]:
        source = self._stream_source(path, body, options)
        instrumentation = self.instrumentation
        observer = (
            None if instrumentation is None else instrumentation.start(operation, body, stream=True)
        )
        return TokenStream(source, chunk_type, observer, deadline=options.deadline)

    def _stream_source(
        self, path: str, body: dict[str, Any], options: RequestOptions | None = None
    ) -> Source:
        """Where a stream of ``POST path`` reads from (the engine wraps it to route).

        ``options`` (from ``request_options`` or ``split_options``) set this request's
        timeout, headers and extra body fields; its ``deadline`` belongs to the
        ``TokenStream``. ``body`` is updated in place.
        """
        self._check_open()
        if options is None:
            options = NO_OPTIONS
        elif options.extra_body is not None:
            body.update(options.extra_body)
        body["stream"] = True  # after extra_body: this is a stream whatever it says
        payload = encode_body(body)
        if self._transport is not None:
            url = self.base_url
            target = self._prefix + path.encode("ascii")
            head = b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n" % (
                target,
                self._static_head
                if options.headers is None
                else _head_bytes(_merge_headers(self._head_headers, options.headers)),
                len(payload),
            )
            return PoolSource(
                self._transport.pool,
                url.host,
                url.port or 80,
                head,
                payload,
                self._pool_timeouts if options.timeout is None else httpx_timeouts(options.timeout),
                self._origin + target.decode("ascii"),
            )
        headers = {
            **self._headers,
            "Accept": "text/event-stream",
            "Content-Type": "application/json",
        }
        if options.headers is not None:
            headers = _merge_headers(headers, options.headers)
        request = self._http.build_request(
            "POST",
            self._url(path),
            content=payload,
            headers=headers,
            timeout=httpx.USE_CLIENT_DEFAULT if options.timeout is None else options.timeout,
        )
        return HttpxSource(self._http, request)

    # ----------------------------------------------------------------- generation
    async def completion(
        self,
        prompt: str | Sequence[Any],
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        **params: Any,
    ) -> Completion:
        """``POST /completion`` without streaming (llama.cpp parameter names)."""
        options = self._options(params, timeout, None, extra_headers, extra_body)
        body = {"prompt": prompt, **params}
        return await self._observed("text_completion", "/completion", body, Completion, options)

    async def chat(
        self,
        messages: Iterable[Message],
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        **params: Any,
    ) -> ChatCompletion:
        """``POST /v1/chat/completions`` without streaming (OpenAI parameter names)."""
        options = self._options(params, timeout, None, extra_headers, extra_body)
        body = {"messages": chat_messages(messages), **params}
        return await self._observed("chat", "/v1/chat/completions", body, ChatCompletion, options)

    async def openai_completion(
        self,
        prompt: str | Sequence[Any],
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        **params: Any,
    ) -> TextCompletion:
        """``POST /v1/completions`` without streaming."""
        options = self._options(params, timeout, None, extra_headers, extra_body)
        body = {"prompt": prompt, **params}
        return await self._observed(
            "text_completion", "/v1/completions", body, TextCompletion, options
        )

    async def infill(
        self,
        input_prefix: str,
        input_suffix: str,
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        **params: Any,
    ) -> Completion:
        """``POST /infill`` without streaming."""
        options = self._options(params, timeout, None, extra_headers, extra_body)
        body = {"input_prefix": input_prefix, "input_suffix": input_suffix, **params}
        return await self._observed("text_completion", "/infill", body, Completion, options)

    # ----------------------------------------------------------------- server state
    async def health(
        self,
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Health:
        """``GET /health``; raises ``HTTPStatusError`` (503) while the model loads."""
        options = request_options(timeout, None, extra_headers)
        return await self._call("GET", "/health", None, Health, options)

    async def props(
        self,
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """``GET /props``: the server's settings, model path, chat template, build."""
        options = request_options(timeout, None, extra_headers)
        return await self._call("GET", "/props", None, dict[str, Any], options)

    async def set_props(
        self,
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        **props: Any,
    ) -> dict[str, Any]:
        """``POST /props`` (the server must run with ``--props``); names are not checked."""
        options = request_options(timeout, None, extra_headers, extra_body)
        return await self._call("POST", "/props", props, dict[str, Any], options)

    async def slots(
        self,
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """``GET /slots``: each slot's state (the server must not run with ``--no-slots``)."""
        options = request_options(timeout, None, extra_headers)
        return await self._call("GET", "/slots", None, list[dict[str, Any]], options)

    async def save_slot(
        self,
        id_slot: int,
        filename: str,
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Save a slot's KV cache to ``filename`` under the server's ``--slot-save-path``."""
        options = request_options(timeout, None, extra_headers)
        return await self._slot_action(id_slot, "save", filename, options)

    async def restore_slot(
        self,
        id_slot: int,
        filename: str,
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Restore a slot's KV cache saved with ``save_slot``."""
        options = request_options(timeout, None, extra_headers)
        return await self._slot_action(id_slot, "restore", filename, options)

    async def erase_slot(
        self,
        id_slot: int,
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Erase a slot's KV cache."""
        options = request_options(timeout, None, extra_headers)
        return await self._slot_action(id_slot, "erase", None, options)

    async def _slot_action(
        self, id_slot: int, action: str, filename: str | None, options: RequestOptions
    ) -> dict[str, Any]:
        body = {"filename": filename} if filename is not None else {}
        path = f"/slots/{int(id_slot)}?action={action}"
        return await self._call("POST", path, body, dict[str, Any], options)

    async def metrics(
        self,
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> dict[str, float]:
        """``GET /metrics`` parsed: sample name -> value (the server needs ``--metrics``)."""
        options = request_options(timeout, None, extra_headers)
        return _parse_prometheus((await self._send("GET", "/metrics", None, options)).text)

    async def lora_adapters(
        self,
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """``GET /lora-adapters``."""
        options = request_options(timeout, None, extra_headers)
        return await self._call("GET", "/lora-adapters", None, list[dict[str, Any]], options)

    async def set_lora_adapters(
        self,
        adapters: Sequence[Mapping[str, Any]],
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Any:
        """``POST /lora-adapters`` with ``[{"id": 0, "scale": 0.5}, ...]``."""
        return await self.request(
            "POST", "/lora-adapters", list(adapters), timeout=timeout, extra_headers=extra_headers
        )

    async def models(
        self,
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> list[ServedModel]:
        """``GET /v1/models``."""
        options = request_options(timeout, None, extra_headers)
        return (await self._call("GET", "/v1/models", None, _ModelList, options)).data

    # ----------------------------------------------------------------- text tools
    async def tokenize(
        self,
        content: str,
        *,
        add_special: bool = False,
        parse_special: bool = True,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> list[int]:
        """``POST /tokenize``: token ids of ``content``."""
        options = request_options(timeout, None, extra_headers)
        body = {"content": content, "add_special": add_special, "parse_special": parse_special}
        tokens = (await self._call("POST", "/tokenize", body, _Tokens, options)).tokens
        return [t if isinstance(t, int) else int(t["id"]) for t in tokens]

    async def detokenize(
        self,
        tokens: Sequence[int],
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> str:
        """``POST /detokenize``: the text of ``tokens``."""
        options = request_options(timeout, None, extra_headers)
        body = {"tokens": list(tokens)}
        return (await self._call("POST", "/detokenize", body, _Content, options)).content

    async def apply_template(
        self,
        messages: Iterable[Message],
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        **params: Any,
    ) -> str:
        """``POST /apply-template``: the prompt the chat template makes of ``messages``."""
        options = self._options(params, timeout, None, extra_headers, extra_body)
        body = {"messages": chat_messages(messages), **params}
        return (await self._call("POST", "/apply-template", body, _Prompt, options)).prompt

    # ----------------------------------------------------------------- embeddings
    async def embedding(
        self,
        content: str | Sequence[str],
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        **params: Any,
    ) -> list[dict[str, Any]]:
        """Native ``POST /embedding`` (raw: its shape depends on ``--pooling``)."""
        options = self._options(params, timeout, None, extra_headers, extra_body)
        body = {"content": content, **params}
        return await self._call("POST", "/embedding", body, list[dict[str, Any]], options)

    async def embeddings(
        self,
        input: str | Sequence[str],
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        **params: Any,
    ) -> EmbeddingList:
        """OpenAI ``POST /v1/embeddings`` (the server needs ``--embeddings``)."""
        options = self._options(params, timeout, None, extra_headers, extra_body)
        body = {"input": input, **params}
        return await self._call("POST", "/v1/embeddings", body, EmbeddingList, options)

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        top_n: int | None = None,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        **params: Any,
    ) -> list[RerankResult]:
        """``POST /rerank``: relevance of each document (the server needs ``--reranking``)."""
        options = self._options(params, timeout, None, extra_headers, extra_body)
        body: dict[str, Any] = {"query": query, "documents": list(documents), **params}
        if top_n is not None:
            body["top_n"] = top_n
        return (await self._call("POST", "/rerank", body, _RerankResponse, options)).results

    # ----------------------------------------------------------------- raw access
    async def request(
        self,
        method: str,
        path: str,
        json: Any = None,
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Any endpoint, raw: the decoded JSON (or the text, if it is not JSON)."""
        options = request_options(timeout, None, extra_headers)
        response = await self._send(method, path, json, options)
        try:
            return msgspec.json.decode(response.content)
        except msgspec.DecodeError:
            return response.text

    def _url(self, path: str) -> str:
        # Absolute, so a user's own httpx client (without our base_url) works too.
        return self._origin + self._prefix.decode("ascii") + path

    async def _send(
        self, method: str, path: str, body: Any, options: RequestOptions = NO_OPTIONS
    ) -> httpx.Response:
        self._check_open()
        if body is None:
            content = None
        else:
            if options.extra_body is not None and isinstance(body, dict):
                body = {**body, **options.extra_body}
            content = encode_body(body)
        url = self._url(path)
        # Our own httpx client carries the headers already; a user's does not know them.
        headers = {} if self._owns_http else dict(self._headers)
        if content is not None:
            headers["Content-Type"] = "application/json"
        if options.headers is not None:
            headers = _merge_headers(headers, options.headers)
        timeout = httpx.USE_CLIENT_DEFAULT if options.timeout is None else options.timeout
        try:
            response = await self._http.request(
                method, url, content=content, headers=headers, timeout=timeout
            )
        except httpx.HTTPError as exc:
            raise map_httpx_error(exc, url) from exc
        if response.status_code >= 400:
            raise status_error(response.status_code, response.content, str(response.url))
        return response

    async def _observed(
        self,
        operation: str,
        path: str,
        body: dict[str, Any],
        result: type[OutcomeT],
        options: RequestOptions,
    ) -> OutcomeT:
        """A generation call, seen by the instrumentation when there is one."""
        instrumentation = self.instrumentation
        if instrumentation is None:
            return await self._call("POST", path, body, result, options)
        observer = instrumentation.start(operation, body, stream=False)
        observer.on_server(self._origin, None, ())
        try:
            with observer.activate():
                outcome = await self._call("POST", path, body, result, options)
        except BaseException as exc:
            observer.on_error(exc)
            raise
        observer.on_end(outcome)
        return outcome

    async def _call(
        self,
        method: str,
        path: str,
        body: Any,
        result: type[T],
        options: RequestOptions = NO_OPTIONS,
    ) -> T:
        response = await self._send(method, path, body, options)
        try:
            return msgspec.json.decode(response.content, type=result)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            # Never the body itself: it may hold generated text, and this message can
            # become a span event with content capture off. msgspec's own message names
            # only a position or a JSON path and types.
            problem = (
                "is not valid JSON"
                if isinstance(exc, msgspec.DecodeError)
                else "is JSON of an unexpected shape"
            )
            raise RemoteProtocolError(
                f"unexpected response from {response.url}: the body {problem} "
                f"(HTTP {response.status_code}, "
                f"{response.headers.get('content-type', 'no content-type')}, "
                f"{len(response.content)} bytes; {exc})",
                url=str(response.url),
            ) from None

    def __repr__(self) -> str:
        return f"<AsyncLlamaClient {_redact_url(self.base_url)} {self._state.name.lower()}>"


def completion_stream_request(prompt: Any, params: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Path and body of a streamed native completion."""
    return "/completion", {"prompt": prompt, **params}


def chat_stream_request(
    messages: Iterable[Message], params: Mapping[str, Any]
) -> tuple[str, dict[str, Any]]:
    """Path and body of a streamed chat completion (usage asked for unless params say)."""
    body = {"messages": chat_messages(messages), "stream_options": {"include_usage": True}}
    return "/v1/chat/completions", {**body, **params}


def _merge_headers(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """``base`` with ``extra`` added; an ``extra`` name replaces ``base``'s in any case."""
    replaced = {name.lower() for name in extra}
    merged = {name: value for name, value in base.items() if name.lower() not in replaced}
    merged.update(extra)
    return merged


def _head_bytes(headers: Mapping[str, str]) -> bytes:
    # Checked to be printable ASCII (check_headers), so no byte can end a header line.
    return b"".join(
        b"%s: %s\r\n" % (k.encode("ascii"), v.encode("ascii")) for k, v in headers.items()
    )


def _redact_url(url: httpx.URL) -> str:
    """The URL without its user and password (they may be credentials)."""
    return str(url.copy_with(userinfo=b"***")) if url.userinfo else str(url)


def _redact_text(url: str) -> str:
    """``_redact_url`` for text that did not parse as a URL."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    return f"{scheme}{sep}{authority}{slash}{path}"


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
