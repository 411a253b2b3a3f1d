"""The request methods, written once: ``AsyncLlamaClient`` and ``AsyncEngine`` share them.

Each method builds a ``Request`` and hands it to ``self._dispatcher``: one server's
``HttpDispatcher`` for a client, the router for an engine. So every endpoint has one name,
one signature and one return type wherever it is called.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import msgspec

from .._errors import ConfigError, RemoteProtocolError, UsageError
from ._dispatch import Dispatcher, Reply, Request
from ._observe import Instrumentation, Outcome, RequestObserver
from ._params import (
    NO_OPTIONS,
    RequestOptions,
    TimeoutTypes,
    chat_messages,
    parse_options,
    request_options,
)
from ._stream import TokenStream
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

__all__ = [
    "Message",
    "RequestMethods",
    "chat_stream_request",
    "completion_stream_request",
    "lora_body",
]

T = TypeVar("T")
OutcomeT = TypeVar("OutcomeT", bound=Outcome)
ChunkT = TypeVar("ChunkT", CompletionChunk, ChatChunk, TextCompletionChunk)

#: A chat message: ``{"role": "user", "content": "..."}`` (any OpenAI message shape).
Message = Mapping[str, Any]


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


class _Route(NamedTuple):
    slot: bool  # a generation request: it takes one of a server's slots
    operation: str | None = None  # the GenAI operation, for requests that are observed
    chunk: type[Any] | None = None  # the chunk type of its stream, if it streams
    result: type[Any] | None = None  # the type of its whole answer


_COMPLETION = _Route(True, "text_completion", CompletionChunk, Completion)
_CHAT = _Route(True, "chat", ChatChunk, ChatCompletion)
_TEXT = _Route(True, "text_completion", TextCompletionChunk, TextCompletion)
_SLOT = _Route(True)

# The paths ``forward()`` treats as generation requests (llama-server's aliases included);
# any other path goes to any ready server.
_FORWARD: dict[str, _Route] = {
    "/completion": _COMPLETION,
    "/completions": _COMPLETION,
    "/infill": _COMPLETION,
    "/v1/completions": _TEXT,
    "/v1/chat/completions": _CHAT,
    "/chat/completions": _CHAT,
    "/embedding": _SLOT,
    "/embeddings": _SLOT,
    "/v1/embeddings": _SLOT,
    "/rerank": _SLOT,
    "/reranking": _SLOT,
    "/v1/rerank": _SLOT,
    "/v1/reranking": _SLOT,
}


class RequestMethods(abc.ABC):
    """Every llama-server endpoint as a method; subclasses say where requests go.

    Every method takes, as keywords, ``timeout=`` (this request only), ``extra_headers=``
    and, where a JSON body is sent, ``extra_body=`` (fields merged into the body unchecked).
    Streaming methods take ``deadline=`` (seconds for the whole stream). Generation methods
    take ``retries=``: how often an engine tries a request that a server did not take
    (refused, or answered 503 while loading) on another server; a client, with one server,
    does not retry. These names never go into the body. Other keywords are llama-server
    request parameters, sent as they are; a name that neither llama.cpp nor the OpenAI API
    knows (a typo such as ``n_predcit``) gives one ``UnknownParameterWarning`` per name, or a
    ``UsageError`` when ``strict``.
    """

    _dispatcher: Dispatcher
    _strict: bool = False
    _model_name: str | None = None  # named on the spans of an engine's requests
    instrumentation: Instrumentation | None = None

    @abc.abstractmethod
    def _check_open(self) -> None:
        """Raise if requests can no longer be made (a closed client or engine)."""

    def _options(
        self,
        params: Mapping[str, Any],
        timeout: TimeoutTypes | None,
        deadline: float | None,
        extra_headers: Mapping[str, str] | None,
        extra_body: Mapping[str, Any] | None,
        *,
        retries: int | None = None,
    ) -> RequestOptions:
        return parse_options(
            params,
            timeout,
            deadline,
            extra_headers,
            extra_body,
            strict=self._strict,
            retries=retries,
        )

    def _observe(
        self, operation: str, body: dict[str, Any], *, stream: bool
    ) -> RequestObserver | None:
        instrumentation = self.instrumentation
        if instrumentation is None:
            return None
        if self._model_name is not None:
            body = {**body, "model": self._model_name}
        return instrumentation.start(operation, body, stream=stream)

    # ----------------------------------------------------------------- streaming
    def stream(
        self,
        prompt: str | Sequence[Any],
        *,
        timeout: TimeoutTypes | None = None,
        deadline: float | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        retries: int | None = None,
        **params: Any,
    ) -> TokenStream[CompletionChunk]:
        """Stream llama.cpp's native ``POST /completion``.

        ``params`` use llama.cpp's names: ``n_predict``, ``temperature``, ``seed``,
        ``stop``, ``top_k``, ``cache_prompt``, ...
        """
        options = self._options(
            params, timeout, deadline, extra_headers, extra_body, retries=retries
        )
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
        retries: int | None = None,
        **params: Any,
    ) -> TokenStream[ChatChunk]:
        """Stream ``POST /v1/chat/completions`` (OpenAI names: ``max_tokens``, ...).

        Usage is asked for (``stream_options.include_usage``) unless ``params`` say otherwise.
        """
        options = self._options(
            params, timeout, deadline, extra_headers, extra_body, retries=retries
        )
        return self._stream(*chat_stream_request(messages, params), ChatChunk, "chat", options)

    def stream_openai_completion(
        self,
        prompt: str | Sequence[Any],
        *,
        timeout: TimeoutTypes | None = None,
        deadline: float | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        retries: int | None = None,
        **params: Any,
    ) -> TokenStream[TextCompletionChunk]:
        """Stream the OpenAI-compatible ``POST /v1/completions``."""
        options = self._options(
            params, timeout, deadline, extra_headers, extra_body, retries=retries
        )
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
        retries: int | None = None,
        **params: Any,
    ) -> TokenStream[CompletionChunk]:
        """Stream ``POST /infill`` (fill-in-the-middle; the model needs FIM tokens)."""
        options = self._options(
            params, timeout, deadline, extra_headers, extra_body, retries=retries
        )
        body = {"input_prefix": input_prefix, "input_suffix": input_suffix, **params}
        return self._stream("/infill", body, CompletionChunk, "text_completion", options)

    # ----------------------------------------------------------------- generation
    async def completion(
        self,
        prompt: str | Sequence[Any],
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        retries: int | None = None,
        **params: Any,
    ) -> Completion:
        """``POST /completion`` without streaming (llama.cpp parameter names)."""
        options = self._options(params, timeout, None, extra_headers, extra_body, retries=retries)
        body = {"prompt": prompt, **params}
        return await self._observed("text_completion", "/completion", body, Completion, options)

    async def chat(
        self,
        messages: Iterable[Message],
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        retries: int | None = None,
        **params: Any,
    ) -> ChatCompletion:
        """``POST /v1/chat/completions`` without streaming (OpenAI parameter names)."""
        options = self._options(params, timeout, None, extra_headers, extra_body, retries=retries)
        body = {"messages": chat_messages(messages), **params}
        return await self._observed("chat", "/v1/chat/completions", body, ChatCompletion, options)

    async def openai_completion(
        self,
        prompt: str | Sequence[Any],
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        retries: int | None = None,
        **params: Any,
    ) -> TextCompletion:
        """``POST /v1/completions`` without streaming."""
        options = self._options(params, timeout, None, extra_headers, extra_body, retries=retries)
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
        retries: int | None = None,
        **params: Any,
    ) -> Completion:
        """``POST /infill`` without streaming."""
        options = self._options(params, timeout, None, extra_headers, extra_body, retries=retries)
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
        adapters: Iterable[Mapping[str, Any]] | Mapping[int, float],
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Any:
        """``POST /lora-adapters`` with ``[{"id": 0, "scale": 0.5}, ...]`` or ``{0: 0.5}``.

        As in llama-server, an adapter left out gets scale 0 (off).
        """
        return await self.request(
            "POST",
            "/lora-adapters",
            lora_body(adapters),
            timeout=timeout,
            extra_headers=extra_headers,
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
        retries: int | None = None,
        **params: Any,
    ) -> list[dict[str, Any]]:
        """Native ``POST /embedding`` (raw: its shape depends on ``--pooling``)."""
        options = self._options(params, timeout, None, extra_headers, extra_body, retries=retries)
        body = {"content": content, **params}
        return await self._call(
            "POST", "/embedding", body, list[dict[str, Any]], options, slot=True
        )

    async def embeddings(
        self,
        input: str | Sequence[str],
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        retries: int | None = None,
        **params: Any,
    ) -> EmbeddingList:
        """OpenAI ``POST /v1/embeddings`` (the server needs ``--embeddings``)."""
        options = self._options(params, timeout, None, extra_headers, extra_body, retries=retries)
        body = {"input": input, **params}
        return await self._call("POST", "/v1/embeddings", body, EmbeddingList, options, slot=True)

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        top_n: int | None = None,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        retries: int | None = None,
        **params: Any,
    ) -> list[RerankResult]:
        """``POST /rerank``: relevance of each document (the server needs ``--reranking``)."""
        options = self._options(params, timeout, None, extra_headers, extra_body, retries=retries)
        body: dict[str, Any] = {"query": query, "documents": list(documents), **params}
        if top_n is not None:
            body["top_n"] = top_n
        return (
            await self._call("POST", "/rerank", body, _RerankResponse, options, slot=True)
        ).results

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
        """Any endpoint, raw: the decoded JSON (or the text, if it is not JSON).

        Sent as ``forward`` sends it: generation paths take a slot on an engine.
        """
        response = await self.forward(
            method, path, json, timeout=timeout, extra_headers=extra_headers
        )
        try:
            return msgspec.json.decode(response.content)
        except msgspec.DecodeError:
            return response.text

    # ----------------------------------------------------------------- relaying
    async def forward(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        timeout: TimeoutTypes | None = None,
        extra_headers: Mapping[str, str] | None = None,
        retries: int | None = None,
    ) -> Reply:
        """Send a request another client made, unchanged, and return the raw ``Reply``.

        For a proxy (the front door): ``body`` (decoded JSON) is sent as it is, with no
        parameter checks, and the reply body comes back as the server wrote it. Generation
        paths (completions, chat, infill, embeddings, rerank) take a slot as their methods
        do, and completions and chat are observed by the instrumentation; other paths go to
        any ready server. A 4xx/5xx answer raises ``HTTPStatusError`` with the server's body.
        """
        route = _FORWARD.get(path)
        if route is not None and route.chunk is not None and _streams(body):
            raise UsageError(
                f"the body asks {path} to stream: use forward_stream() (forward() reads a "
                "whole reply)"
            )
        options = request_options(timeout, None, extra_headers, None, retries)
        if route is None or not route.slot:
            return await self._send(method, path, body, options)
        if route.operation is None or route.result is None or not isinstance(body, dict):
            return await self._send(method, path, body, options, slot=True)
        reply, _ = await self._generate(route.operation, path, body, route.result, options)
        return reply

    def forward_stream(
        self,
        path: str,
        body: Mapping[str, Any],
        *,
        timeout: TimeoutTypes | None = None,
        deadline: float | None = None,
        extra_headers: Mapping[str, str] | None = None,
        retries: int | None = None,
    ) -> TokenStream[Any]:
        """Stream a request another client made, unchanged (``stream: true`` is set).

        The stream's ``raw`` list collects every event's payload as the server sent it, for a
        relay to send on; the chunks, ``usage``, ``timings`` and the telemetry are those of
        the matching method (``stream``, ``stream_chat``, ...). ``path`` is one of
        ``/completion``, ``/infill``, ``/v1/completions`` and ``/v1/chat/completions``.
        """
        route = _FORWARD.get(path)
        if route is None or route.chunk is None or route.operation is None:
            streams = sorted(p for p, r in _FORWARD.items() if r.chunk is not None)
            raise UsageError(f"{path} does not stream; paths that do: {', '.join(streams)}")
        options = request_options(timeout, deadline, extra_headers, None, retries)
        stream = self._stream(path, dict(body), route.chunk, route.operation, options)
        stream.raw = []
        return stream

    # ----------------------------------------------------------------- plumbing
    def _stream(
        self,
        path: str,
        body: dict[str, Any],
        chunk_type: type[ChunkT],
        operation: str,
        options: RequestOptions,
    ) -> TokenStream[ChunkT]:
        self._check_open()
        request = Request("POST", path, body, options, stream=True, slot=True)
        observer = self._observe(operation, body, stream=True)
        try:
            source = self._dispatcher.open_stream(request, observer)
        except BaseException as exc:
            if observer is not None:
                observer.on_error(exc)
            raise
        return TokenStream(source, chunk_type, observer, deadline=options.deadline)

    async def _send(
        self,
        method: str,
        path: str,
        body: Any,
        options: RequestOptions = NO_OPTIONS,
        *,
        slot: bool = False,
        observer: RequestObserver | None = None,
    ) -> Reply:
        self._check_open()
        request = Request(method, path, body, options, slot=slot)
        return await self._dispatcher.send(request, observer)

    async def _observed(
        self,
        operation: str,
        path: str,
        body: dict[str, Any],
        result: type[OutcomeT],
        options: RequestOptions,
    ) -> OutcomeT:
        """A generation call, seen by the instrumentation when there is one."""
        reply, outcome = await self._generate(operation, path, body, result, options)
        return outcome if outcome is not None else _decode(reply, result)

    async def _generate(
        self,
        operation: str,
        path: str,
        body: dict[str, Any],
        result: type[OutcomeT],
        options: RequestOptions,
    ) -> tuple[Reply, OutcomeT | None]:
        """Send a generation request; with an observer, also its decoded outcome."""
        observer = self._observe(operation, body, stream=False)
        if observer is None:
            return await self._send("POST", path, body, options, slot=True), None
        try:
            with observer.activate():
                reply = await self._send("POST", path, body, options, slot=True, observer=observer)
                outcome = _decode(reply, result)
        except BaseException as exc:
            observer.on_error(exc)
            raise
        observer.on_end(outcome)
        return reply, outcome

    async def _call(
        self,
        method: str,
        path: str,
        body: Any,
        result: type[T],
        options: RequestOptions = NO_OPTIONS,
        *,
        slot: bool = False,
    ) -> T:
        return _decode(await self._send(method, path, body, options, slot=slot), result)


def _streams(body: object) -> bool:
    return isinstance(body, dict) and bool(body.get("stream"))


def _decode(reply: Reply, result: type[T]) -> T:
    try:
        return msgspec.json.decode(reply.content, type=result)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        # msgspec's message names a position or a JSON path, never the body itself,
        # which may hold completion text.
        raise RemoteProtocolError(
            f"unexpected response from {reply.url} (HTTP {reply.status}, "
            f"{reply.content_type or 'no content type'}, {len(reply.content)} bytes): {exc}",
            url=reply.url,
        ) from None


def completion_stream_request(prompt: Any, params: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Path and body of a streamed native completion."""
    return "/completion", {"prompt": prompt, **params}


def chat_stream_request(
    messages: Iterable[Message], params: Mapping[str, Any]
) -> tuple[str, dict[str, Any]]:
    """Path and body of a streamed chat completion (usage asked for unless params say)."""
    body = {"messages": chat_messages(messages), "stream_options": {"include_usage": True}}
    return "/v1/chat/completions", {**body, **params}


def lora_body(adapters: Iterable[Mapping[str, Any]] | Mapping[int, float]) -> list[dict[str, Any]]:
    """``[{"id": int, "scale": float}, ...]`` from either form, checked."""
    if isinstance(adapters, Mapping):
        entries: list[Any] = [{"id": k, "scale": v} for k, v in adapters.items()]
    elif isinstance(adapters, str | bytes):
        entries = [adapters]  # rejected below
    else:
        entries = list(adapters)
    body: list[dict[str, Any]] = []
    seen: set[int] = set()
    for entry in entries:
        ident = entry.get("id") if isinstance(entry, Mapping) else None
        scale = entry.get("scale") if isinstance(entry, Mapping) else None
        if (
            isinstance(ident, bool)
            or not isinstance(ident, int)
            or ident < 0
            or isinstance(scale, bool)
            or not isinstance(scale, int | float)
            or scale != scale  # NaN
            or scale in (float("inf"), float("-inf"))
        ):
            raise ConfigError(
                'adapters: each entry is {"id": int >= 0, "scale": finite number} '
                f"(or pass {{id: scale}}), got {entry!r}",
                field="adapters",
            )
        if ident in seen:
            raise ConfigError(f"adapters: id {ident} is given twice", field="adapters")
        seen.add(ident)
        body.append({"id": ident, "scale": float(scale)})
    return body


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
