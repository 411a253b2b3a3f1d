"""Per-request options, request parameter names, and the one place a request body is encoded.

The request methods pass llama.cpp's many parameters straight into the JSON body. A few
keyword names are the library's own and never reach the body: ``timeout``, ``deadline``,
``extra_headers`` and ``extra_body`` (``RESERVED``). Every other name is checked against
the parameters llama-server and the OpenAI API know (``KNOWN_PARAMETERS``): an unknown
one (usually a typo such as ``n_predcit``) is still sent, with an
``UnknownParameterWarning`` once per name, or refused with ``UsageError`` by a client
created with ``strict=True``. Names sent on purpose go through ``extra_body=``, which is
merged into the body unchecked; a name that starts with ``_`` counts as deliberate too.
"""

from __future__ import annotations

import difflib
import math
import os
import sys
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Final, TypeAlias

import httpx
import msgspec

from .._errors import UnknownParameterWarning, UsageError
from ._headers import check_header

__all__ = [
    "KNOWN_PARAMETERS",
    "NO_OPTIONS",
    "RESERVED",
    "RequestOptions",
    "TimeoutTypes",
    "chat_messages",
    "check_api_key",
    "check_headers",
    "check_parameters",
    "client_timeout",
    "encode_body",
    "request_options",
]

#: Seconds (connect, read, write and pool alike, as in httpx) or an ``httpx.Timeout``.
TimeoutTypes: TypeAlias = float | httpx.Timeout

#: Keyword names the library takes for itself; they never go into a request body.
RESERVED: Final = frozenset({"timeout", "deadline", "retries", "extra_headers", "extra_body"})

# llama-server's request fields (tools/server/README.md and server-schema.cpp / server-
# common.cpp of llama.cpp b11434): native /completion and /infill, the OpenAI-compatible
# endpoints (which accept the native names too), embeddings, rerank, tokenize, templates.
# fmt: off
_LLAMA_CPP = (
    # /completion: sampling and generation
    "prompt temperature dynatemp_range dynatemp_exponent top_k top_p min_p n_predict n_indent",
    "n_keep n_discard n_cmpl n_cache_reuse stream stop typical_p repeat_penalty repeat_last_n",
    "presence_penalty frequency_penalty dry_multiplier dry_base dry_allowed_length",
    "dry_penalty_last_n dry_sequence_breakers xtc_probability xtc_threshold mirostat",
    "mirostat_tau mirostat_eta top_n_sigma adaptive_target adaptive_decay grammar",
    "grammar_lazy grammar_triggers grammar_type preserved_tokens json_schema seed ignore_eos",
    "logit_bias n_probs min_keep t_max_predict_ms t_max_prompt_ms id_slot cache_prompt",
    "return_tokens samplers timings_per_token return_progress sse_ping_interval",
    "post_sampling_probs response_fields lora backend_sampling stream_options include_usage",
    "verbose multimodal_data image_data",
    "speculative.n_max speculative.n_min speculative.p_min speculative.types",
    # /infill
    "input_prefix input_suffix input_extra",
    # chat templates and reasoning (/v1/chat/completions, /apply-template)
    "messages chat_template chat_template_kwargs add_generation_prompt continue_final_message",
    "chat_format chat_parser generation_prompt parse_tool_calls reasoning_format",
    "reasoning_in_content reasoning_control reasoning_budget reasoning_budget_tokens",
    "thinking_budget_tokens reasoning_budget_message reasoning_budget_start_tag",
    "reasoning_budget_end_tag reasoning_budget_end_tags enable_thinking",
    # /tokenize, /detokenize, /embedding, /rerank, slots
    "content add_special parse_special with_pieces tokens embd_normalize query documents",
    "top_n return_text return_documents filename",
)
_OPENAI = (
    # chat/completions and completions
    "model messages prompt max_tokens max_completion_tokens n best_of echo suffix logprobs",
    "top_logprobs response_format tools tool_choice parallel_tool_calls functions",
    "function_call user store metadata modalities audio prediction reasoning_effort",
    "service_tier web_search_options verbosity prompt_cache_key safety_identifier",
    # embeddings
    "input dimensions encoding_format",
)
# fmt: on

#: Every request parameter name checked as known (llama.cpp's own and OpenAI's).
KNOWN_PARAMETERS: Final = frozenset(name for line in _LLAMA_CPP + _OPENAI for name in line.split())

_warned: set[str] = set()
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


class RequestOptions:
    """One request's own settings, parsed and checked once (see ``request_options``)."""

    __slots__ = ("deadline", "extra_body", "headers", "retries", "timeout")

    def __init__(
        self,
        timeout: httpx.Timeout | None = None,
        deadline: float | None = None,
        headers: dict[str, str] | None = None,
        extra_body: dict[str, Any] | None = None,
        retries: int | None = None,
    ) -> None:
        self.timeout = timeout
        """This request's timeout, or ``None`` for the client's."""
        self.deadline = deadline
        """Seconds for a whole stream, or ``None`` for no bound beyond the timeouts."""
        self.headers = headers
        """Headers added to (or replacing) the client's for this request."""
        self.extra_body = extra_body
        """Fields merged into the JSON body last, unchecked."""
        self.retries = retries
        """How often a request the server did not take is tried again (``None``: the
        dispatcher's own setting)."""

    def __repr__(self) -> str:
        headers = sorted(self.headers) if self.headers else None  # names only: values are secrets
        return (
            f"RequestOptions(timeout={self.timeout!r}, deadline={self.deadline!r}, "
            f"headers={headers!r}, extra_body={sorted(self.extra_body or ())!r}, "
            f"retries={self.retries!r})"
        )


#: The options of a request that sets none of its own (shared; never mutated).
NO_OPTIONS: Final = RequestOptions()


def request_options(
    timeout: TimeoutTypes | None = None,
    deadline: float | None = None,
    extra_headers: Mapping[str, str] | None = None,
    extra_body: Mapping[str, Any] | None = None,
    retries: int | None = None,
) -> RequestOptions:
    """Check a request's own keywords; ``NO_OPTIONS`` when none is given (the usual case)."""
    if (
        timeout is None
        and deadline is None
        and extra_headers is None
        and extra_body is None
        and retries is None
    ):
        return NO_OPTIONS
    return RequestOptions(
        None if timeout is None else _timeout(timeout, "timeout"),
        None if deadline is None else _deadline(deadline),
        None if extra_headers is None else check_headers(extra_headers, "extra_headers"),
        None if extra_body is None else _extra_body(extra_body),
        None if retries is None else _retries(retries),
    )


def _retries(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"retries must be an int >= 0, got {value!r}")
    return value


def parse_options(
    params: Mapping[str, Any],
    timeout: TimeoutTypes | None,
    deadline: float | None,
    extra_headers: Mapping[str, str] | None,
    extra_body: Mapping[str, Any] | None,
    *,
    strict: bool,
    retries: int | None = None,
) -> RequestOptions:
    """Check a request's parameter names and its own keywords (the client's and the engine's)."""
    # One set lookup per name when all are known: the usual request pays no more.
    if not KNOWN_PARAMETERS.issuperset(params):
        check_parameters(params, strict=strict)
    return request_options(timeout, deadline, extra_headers, extra_body, retries)


def check_parameters(params: Iterable[str], *, strict: bool = False) -> None:
    """Warn once per unknown parameter name (or raise ``UsageError`` when ``strict``)."""
    for name in params:
        # A leading underscore marks a deliberate private field (llama.cpp's own
        # "__verbose", a test server's hooks): never a typo of a public name.
        if name in KNOWN_PARAMETERS or name.startswith("_"):
            continue
        if name in RESERVED:
            raise UsageError(
                f"{name}= is the library's own keyword and this method does not take it; pass "
                f"extra_body={{{name!r}: ...}} to send a field of that name to the server"
            )
        if strict or name not in _warned:
            close = difflib.get_close_matches(name, KNOWN_PARAMETERS | RESERVED, n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            if strict:
                raise UsageError(
                    f"unknown request parameter {name!r}{hint}; pass "
                    f"extra_body={{{name!r}: ...}} to send it anyway"
                )
            warnings.warn(
                f"unknown request parameter {name!r}{hint} is sent to llama-server as it "
                f"is; pass extra_body={{{name!r}: ...}} to send it without this warning",
                UnknownParameterWarning,
                stacklevel=_user_stacklevel(),
            )
            _warned.add(name)


def _user_stacklevel() -> int:
    # The first frame outside this package: the user's call, however deep the library
    # (client or engine) called from. Runs once per unknown name, never on the hot path.
    frame = sys._getframe(2)  # 0: here, 1: check_parameters, 2: its caller
    level = 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level


def client_timeout(value: object) -> httpx.Timeout:
    """The client's default timeout: seconds, an ``httpx.Timeout``, or ``None`` (no limit)."""
    if value is None:
        return httpx.Timeout(None)
    return _timeout(value, "timeout")


def _timeout(value: object, what: str) -> httpx.Timeout:
    if isinstance(value, httpx.Timeout):
        for field, part in value.as_dict().items():
            if part is not None and not _seconds(part):
                raise UsageError(
                    f"{what}: httpx.Timeout {field}={part!r} is not a number of seconds >= 0"
                )
        return value
    if not _seconds(value):
        raise UsageError(
            f"{what} must be seconds (a number >= 0) or an httpx.Timeout, got {value!r}; "
            "httpx.Timeout(None) sets no limit"
        )
    return httpx.Timeout(float(value))  # type: ignore[arg-type]  # _seconds checked it


def _seconds(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _deadline(value: object) -> float:
    if not _seconds(value) or value == 0:
        raise UsageError(
            f"deadline must be seconds for the whole stream (a number > 0), got {value!r}"
        )
    return float(value)  # type: ignore[arg-type]  # _seconds checked it


def _extra_body(value: object) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise UsageError(
            "extra_body must be a mapping of str field names to JSON values, got "
            f"{type(value).__name__}"
        )
    return dict(value)


# Set by the client from the body it sends; a caller's value would break the framing.
_FRAMING = frozenset({"content-length", "transfer-encoding"})


def check_headers(headers: object, what: str = "headers") -> dict[str, str]:
    """Header names and values that cannot change the request's shape (no CR, LF, NUL).

    The built-in pool writes headers as raw bytes: a value with CR/LF would add header
    lines or smuggle a second request. Names and values must be ASCII ``str``.
    """
    if not isinstance(headers, Mapping):
        raise UsageError(
            f"{what} must be a mapping of header names to str values, got {type(headers).__name__}"
        )
    checked: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise UsageError(f"{what}: header names and values must be str")
        try:
            check_header(name, value)
        except UsageError as exc:
            raise UsageError(f"{what}: {exc}") from None
        if name.lower() in _FRAMING:
            raise UsageError(f"{what}: {name} is set by the client itself and cannot be given")
        checked[name] = value
    return checked


def check_api_key(api_key: object) -> None:
    """An ``api_key`` that can go into an ``Authorization`` header (never echoed)."""
    if not isinstance(api_key, str):
        raise UsageError(f"api_key must be a str, got {type(api_key).__name__}")
    try:
        check_header("Authorization", f"Bearer {api_key}")
    except UsageError as exc:
        raise UsageError(f"api_key: {exc}") from None


def chat_messages(messages: object) -> list[dict[str, Any]]:
    """The ``messages`` of a chat request as a list of dicts, or ``UsageError``."""
    # A list or tuple skips the ABC checks below: they cost more than the rest.
    if (
        type(messages) is not list
        and type(messages) is not tuple
        and (isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Iterable))
    ):
        hint = " (wrap one message in a list)" if isinstance(messages, Mapping) else ""
        raise UsageError(
            'messages must be a list of {"role": ..., "content": ...} dicts, got '
            f"{type(messages).__name__}{hint}"
        )
    items = list(messages)
    for i, message in enumerate(items):
        if type(message) is not dict:
            if not isinstance(message, Mapping):
                raise UsageError(
                    'messages must be a list of {"role": ..., "content": ...} dicts; '
                    f"message {i} is a {type(message).__name__}"
                )
            items[i] = dict(message)
    return items


_encode = msgspec.json.Encoder().encode


def encode_body(body: Any) -> bytes:
    """The JSON of a request body; bad input becomes ``UsageError`` (never echoing content)."""
    try:
        return _encode(body)
    except UnicodeEncodeError as exc:
        raise UsageError(
            "the request holds text that is not valid Unicode: a lone surrogate (such as "
            "'\\ud800', often from bytes decoded with errors='surrogateescape'); clean it "
            "first, e.g. text.encode('utf-8', 'replace').decode('utf-8')"
        ) from exc
    except (TypeError, OverflowError, msgspec.EncodeError) as exc:
        raise UsageError(
            f"the request cannot be sent as JSON ({exc}); use str, int, float, bool, None, "
            "lists and dicts with str keys"
        ) from exc
