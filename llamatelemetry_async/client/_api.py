"""The request methods, written once: ``AsyncLlamaClient`` and ``AsyncEngine`` share them.

Each method builds a ``Request`` and hands it to ``self._dispatcher``: one server's
``HttpDispatcher`` for a client, the router for an engine. So every endpoint has one name,
one signature and one return type wherever it is called.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    Timings,
    Usage,
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
    usage: Usage | None = None


class _UsageOnly(msgspec.Struct, frozen=True):
    """The ``usage`` of an OpenAI-shaped reply (``/v1/embeddings``, ``/rerank``), alone."""

    usage: Usage | None = None


_usage_only = msgspec.json.Decoder(_UsageOnly).decode


class _Counted(NamedTuple):
    """The ``Outcome`` of a request that generates no text (embeddings, rerank).

    Only the prompt is read: ``usage`` counts its tokens (``completion_tokens`` 0), or is
    ``None`` when the server's reply does not say.
    """

    usage: Usage | None
    text: str = ""
    finish_reason: str | None = None
    timings: Timings | None = None


def _counted(prompt_tokens: int | None) -> _Counted:
    if prompt_tokens is None:
        return _Counted(None)
    return _Counted(Usage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens))


_NO_ATTRIBUTES: Mapping[str, Any] = {}


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
    result: type[Any] | None = None  # the type of its whole answer (None: only its usage)


_COMPLETION = _Route(True, "text_completion", CompletionChunk, Completion)
_CHAT = _Route(True, "chat", ChatChunk, ChatCompletion)
_TEXT = _Route(True, "text_completion", TextCompletionChunk, TextCompletion)
_EMBEDDINGS = _Route(True, "embeddings")
_RERANK = _Route(True, "rerank")

# The paths ``forward()`` treats as generation requests (llama-server's aliases included);
# any other path goes to any ready server.
_FORWARD: dict[str, _Route] = {
    "/completion": _COMPLETION,
    "/completions": _COMPLETION,
    "/infill": _COMPLETION,
    "/v1/completions": _TEXT,
    "/v1/chat/completions": _CHAT,
    "/chat/completions": _CHAT,
    "/embedding": _EMBEDDINGS,
    "/embeddings": _EMBEDDINGS,
    "/v1/embeddings": _EMBEDDINGS,
    "/rerank": _RERANK,
    "/reranking": _RERANK,
    "/v1/rerank": _RERANK,
    "/v1/reranking": _RERANK,
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
        """Native ``POST /embedding`` (raw: its shape depends on ``--pooling``).

        Its span (operation ``embeddings``) counts input tokens only with ``--pooling
        none``, where the reply has one vector per token: a pooled reply does not say.
        """
        options = self._options(params, timeout, None, extra_headers, extra_body, retries=retries)
        body = {"content": content, **params}
        return await self._measured(
            "embeddings",
            "/embedding",
            body,
            list[dict[str, Any]],
            options,
            _native_embeddings_outcome,
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
        """OpenAI ``POST /v1/embeddings`` (the server needs ``--embeddings``).

        Its span (operation ``embeddings``) has the reply's ``usage.prompt_tokens`` as
        ``gen_ai.usage.input_tokens``.
        """
        options = self._options(params, timeout, None, extra_headers, extra_body, retries=retries)
        body = {"input": input, **params}
        return await self._measured(
            "embeddings", "/v1/embeddings", body, EmbeddingList, options, _embeddings_outcome
        )

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
        """``POST /rerank``: relevance of each document (the server needs ``--reranking``).

        Its span (operation ``rerank``) has the tokens the server read (the query with each
        document) as ``gen_ai.usage.input_tokens``, and the number of documents.
        """
        options = self._options(params, timeout, None, extra_headers, extra_body, retries=retries)
        documents = list(documents)
        body: dict[str, Any] = {"query": query, "documents": documents, **params}
        if top_n is not None:
            body["top_n"] = top_n

        def measure(reply: _RerankResponse) -> tuple[Outcome, Mapping[str, Any]]:
            return _rerank_outcome(len(documents), reply)

        reply = await self._measured("rerank", "/rerank", body, _RerankResponse, options, measure)
        return reply.results

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
        do and are observed by the instrumentation; other paths go to any ready server. A
        4xx/5xx answer raises ``HTTPStatusError`` with the server's body.
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
        if route.operation is None or not isinstance(body, dict):
            return await self._send(method, path, body, options, slot=True)
        read = _forwarded_usage if route.result is None else _outcome_reader(route.result)
        reply, _ = await self._generate(route.operation, path, body, options, read)
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
        reply, outcome = await self._generate(
            operation, path, body, options, _outcome_reader(result)
        )
        return outcome if outcome is not None else _decode(reply, result)

    async def _measured(
        self,
        operation: str,
        path: str,
        body: dict[str, Any],
        result: type[T],
        options: RequestOptions,
        measure: Callable[[T], tuple[Outcome, Mapping[str, Any]]],
    ) -> T:
        """A call that generates no text (embeddings, rerank), seen by the instrumentation
        when there is one: ``measure`` makes the span's outcome and attributes of the
        decoded answer."""

        def read(reply: Reply) -> tuple[T, Outcome, Mapping[str, Any]]:
            value = _decode(reply, result)
            return (value, *measure(value))

        reply, value = await self._generate(operation, path, body, options, read)
        return value if value is not None else _decode(reply, result)

    async def _generate(
        self,
        operation: str,
        path: str,
        body: dict[str, Any],
        options: RequestOptions,
        read: Callable[[Reply], tuple[T, Outcome, Mapping[str, Any]]],
    ) -> tuple[Reply, T | None]:
        """Send a generation request; with an observer, also what ``read`` makes of it.

        ``read`` gives the decoded answer, the outcome that ends the request's span, and
        attributes the span gets first. The span is current while the request is sent, so
        the request carries its trace context.
        """
        observer = self._observe(operation, body, stream=False)
        if observer is None:
            return await self._send("POST", path, body, options, slot=True), None
        try:
            with observer.activate():
                reply = await self._send("POST", path, body, options, slot=True, observer=observer)
                value, outcome, attributes = read(reply)
        except BaseException as exc:
            observer.on_error(exc)
            raise
        if attributes:
            observer.annotate(attributes)
        observer.on_end(outcome)
        return reply, value

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


def _outcome_reader(
    result: type[OutcomeT],
) -> Callable[[Reply], tuple[OutcomeT, Outcome, Mapping[str, Any]]]:
    """A ``read`` for ``_generate``: a completion's answer is its own outcome."""

    def read(reply: Reply) -> tuple[OutcomeT, Outcome, Mapping[str, Any]]:
        value = _decode(reply, result)
        return value, value, _NO_ATTRIBUTES

    return read


def _forwarded_usage(reply: Reply) -> tuple[None, Outcome, Mapping[str, Any]]:
    """A ``read`` for a relayed embeddings or rerank reply: its usage, if it has one.

    Never raises: the reply goes back as the server wrote it whatever its shape (a native
    ``/embedding`` or a TEI-style ``/rerank`` answers a bare list, with no counts).
    """
    try:
        usage = _usage_only(reply.content).usage
    except (msgspec.DecodeError, msgspec.ValidationError):
        usage = None
    return None, _counted(usage.prompt_tokens if usage is not None else None), _NO_ATTRIBUTES


def _embeddings_outcome(reply: EmbeddingList) -> tuple[Outcome, Mapping[str, Any]]:
    usage = reply.usage
    # The type's default is zero counts: a reply without usage, which is not the truth.
    counted = _counted(usage.prompt_tokens if usage.prompt_tokens or usage.total_tokens else None)
    attrs: dict[str, Any] = {}
    if reply.data:
        attrs["gen_ai.embeddings.dimension.count"] = len(reply.data[0].embedding)
    return counted, attrs


def _native_embeddings_outcome(reply: list[dict[str, Any]]) -> tuple[Outcome, Mapping[str, Any]]:
    """Native ``/embedding`` answers ``[{"index", "embedding": [[...], ...]}]``: one vector
    per input when pooled, one per token with ``--pooling none``. Only the second counts
    tokens, and tells itself apart by an input with more than one row."""
    rows = [item.get("embedding") for item in reply if isinstance(item, dict)]
    matrices = [r for r in rows if isinstance(r, list) and r and isinstance(r[0], list)]
    attrs: dict[str, Any] = {}
    if matrices:
        attrs["gen_ai.embeddings.dimension.count"] = len(matrices[0][0])
    per_token = len(matrices) == len(rows) and any(len(m) > 1 for m in matrices)
    return _counted(sum(map(len, matrices)) if per_token else None), attrs


def _rerank_outcome(documents: int, reply: _RerankResponse) -> tuple[Outcome, Mapping[str, Any]]:
    usage = reply.usage
    attrs = {
        "llamatelemetry.rerank.documents": documents,
        "llamatelemetry.rerank.results": len(reply.results),
    }
    return _counted(usage.prompt_tokens if usage is not None else None), attrs


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
