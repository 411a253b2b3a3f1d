"""What a benchmark runs: ``BenchConfig``, its prompts, and the JSONL prompt loader."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from .._errors import ConfigError, PromptFileError

__all__ = [
    "BenchConfig",
    "BenchPrompt",
    "Conversation",
    "Endpoint",
    "PromptFileError",
    "load_prompts_jsonl",
]

#: Which streaming endpoint a prompt goes to.
Endpoint = Literal["completion", "chat"]

_ENDPOINTS: tuple[Endpoint, ...] = ("completion", "chat")

# Body fields the run sets per request; from params they would clash with its own
# keyword arguments (a TypeError mid-run) or silently override the requested length.
_RESERVED_PARAMS = frozenset(
    {"prompt", "messages", "n_predict", "max_tokens", "max_completion_tokens", "stream"}
)


@dataclasses.dataclass(frozen=True, slots=True)
class BenchPrompt:
    """One prompt of a benchmark: text or token ids, or chat messages.

    ``prompt`` goes to ``/completion`` (or, with ``endpoint="chat"``, becomes one user
    message); ``messages`` always go to ``/v1/chat/completions``. ``max_tokens`` overrides
    the config's ``output_tokens`` for this prompt.

    ```python
    BenchPrompt("Once upon a time", max_tokens=64)
    BenchPrompt(messages=({"role": "user", "content": "hi"},))
    ```
    """

    prompt: str | tuple[int, ...] | None = None
    messages: tuple[Mapping[str, Any], ...] | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ConfigError(
                "a BenchPrompt needs exactly one of prompt or messages", field="prompt"
            )
        if isinstance(self.prompt, list):
            object.__setattr__(self, "prompt", tuple(self.prompt))
        if isinstance(self.prompt, tuple) and not all(
            isinstance(t, int) and not isinstance(t, bool) for t in self.prompt
        ):
            raise ConfigError("a token-id prompt must hold only ints", field="prompt")
        if self.messages is not None:
            messages = tuple(self.messages)
            if not messages or not all(isinstance(m, Mapping) for m in messages):
                raise ConfigError(
                    "messages must be a non-empty list of {'role': ..., 'content': ...}",
                    field="messages",
                )
            object.__setattr__(self, "messages", messages)
        if self.max_tokens is not None and not _positive_int(self.max_tokens):
            raise ConfigError(
                f"max_tokens must be an int >= 1, got {self.max_tokens!r}", field="max_tokens"
            )

    def to_json(self) -> dict[str, Any]:
        """The prompt as a JSONL line of ``load_prompts_jsonl`` reads it."""
        out: dict[str, Any] = {}
        if self.messages is not None:
            out["messages"] = [dict(m) for m in self.messages]
        else:
            out["prompt"] = list(self.prompt) if isinstance(self.prompt, tuple) else self.prompt
        if self.max_tokens is not None:
            out["max_tokens"] = self.max_tokens
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class Conversation:
    """A multi-turn conversation to replay turn by turn (``load_sharegpt_conversations``).

    ``turns`` are the user's messages, in order. Each turn is sent with every earlier turn
    and the server's actual answers to them (the growing prefix), and only after the
    previous answer has ended. ``max_tokens`` caps each answer (one value per turn, or
    ``None`` for the config's ``output_tokens``); ``system`` opens the conversation.

    ```python
    Conversation(("Hi, who are you?", "What can you do?"), system="Be brief.")
    ```
    """

    turns: tuple[str, ...]
    max_tokens: tuple[int | None, ...] | None = None
    system: str | None = None

    def __post_init__(self) -> None:
        turns = tuple(self.turns)
        if not turns or not all(isinstance(t, str) for t in turns):
            raise ConfigError("a Conversation needs one or more user turns (str)", field="turns")
        object.__setattr__(self, "turns", turns)
        if self.max_tokens is not None:
            caps = tuple(self.max_tokens)
            if len(caps) != len(turns) or not all(c is None or _positive_int(c) for c in caps):
                raise ConfigError(
                    "max_tokens must give one int >= 1 (or None) per turn", field="max_tokens"
                )
            object.__setattr__(self, "max_tokens", caps)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """How to load a server. Every field has a default; invalid values raise ``ConfigError``.

    Load: ``rate=None`` runs ``concurrency`` workers (default 1), each sending its next
    request when its last one ends. ``rate`` (requests/s) sends requests at random arrival
    times instead: gaps drawn from a gamma distribution with shape ``burstiness`` and mean
    ``1/rate`` (``burstiness=1``: a Poisson process; below 1 burstier, above 1 more even;
    ``rate=math.inf`` sends everything at once); ``concurrency`` then caps how many run at
    once. The run ends after ``requests`` requests or ``duration`` seconds, whichever comes
    first (set ``requests=None`` to run by time alone; ``rate=math.inf`` needs a count);
    requests in flight at the deadline finish and count, and no request is sent after it.
    ``warmup`` requests run first and are left out of every statistic.

    Prompts: ``input_tokens`` and ``output_tokens`` size synthetic prompts, drawn with
    ``seed``; or pass ``prompts`` (``load_prompts_jsonl``), used in order and cycled.
    ``ignore_eos`` (llama-server) makes every request generate exactly its ``max_tokens``.
    ``params`` are sent with every request (``{"temperature": 0.0}``, ``{"cache_prompt":
    False}``); the prompt, the output length and ``stream`` are the run's to set.
    ``prefix_tokens`` puts the same prefix of that many tokens in front of every synthetic
    prompt (to measure llama.cpp's prompt cache: the prompt is then ``prefix_tokens +
    input_tokens`` long). ``range_ratio`` samples each synthetic prompt's input and output
    lengths uniformly in ``[n * (1 - r), n * (1 + r)]`` (0: fixed lengths).
    ``conversations`` (``load_sharegpt_conversations``) replays multi-turn conversations
    turn by turn instead of single prompts: each turn is one request, sent when the
    previous answer has ended, carrying every earlier turn and answer; ``concurrency``
    conversations run at once (fixed concurrency only).

    Goodput counts the completed requests that produced a token and whose TTFT and TPOT
    are within ``ttft_slo_ms`` and ``tpot_slo_ms`` (either may be left out).

    ```python
    BenchConfig(concurrency=16, requests=200, input_tokens=512, output_tokens=128)
    BenchConfig(rate=8.0, burstiness=0.5, duration=60, requests=None, ttft_slo_ms=500)
    ```
    """

    requests: int | None = 100
    duration: float | None = None
    concurrency: int | None = None
    rate: float | None = None
    burstiness: float = 1.0
    warmup: int = 0
    input_tokens: int = 128
    output_tokens: int = 128
    prompts: tuple[BenchPrompt, ...] | None = dataclasses.field(default=None, hash=False)
    endpoint: Endpoint = "completion"
    ignore_eos: bool = True
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    seed: int = 0
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    prefix_tokens: int = 0
    range_ratio: float = 0.0
    conversations: tuple[Conversation, ...] | None = dataclasses.field(default=None, hash=False)

    def __post_init__(self) -> None:
        if self.requests is None and self.duration is None:
            raise ConfigError(
                "give requests (a count) or duration (seconds), or both", field="requests"
            )
        if self.requests is not None and not _positive_int(self.requests):
            raise ConfigError(
                f"requests must be an int >= 1, got {self.requests!r}", field="requests"
            )
        _check_positive("duration", self.duration)
        if self.concurrency is not None and not _positive_int(self.concurrency):
            raise ConfigError(
                f"concurrency must be an int >= 1, got {self.concurrency!r}", field="concurrency"
            )
        _check_positive("rate", self.rate, allow_inf=True)
        _check_positive("burstiness", self.burstiness)
        if not _int(self.warmup) or self.warmup < 0:
            raise ConfigError(f"warmup must be an int >= 0, got {self.warmup!r}", field="warmup")
        for name in ("input_tokens", "output_tokens"):
            value = getattr(self, name)
            if not _positive_int(value):
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}", field=name)
        if self.prompts is not None:
            prompts = tuple(self.prompts)
            if not prompts or not all(isinstance(p, BenchPrompt) for p in prompts):
                raise ConfigError(
                    "prompts must be a non-empty sequence of BenchPrompt "
                    "(load_prompts_jsonl reads them from a file)",
                    field="prompts",
                )
            if self.endpoint == "chat" and any(isinstance(p.prompt, tuple) for p in prompts):
                raise ConfigError(
                    "token-id prompts cannot go to the chat endpoint; give text or messages",
                    field="prompts",
                )
            object.__setattr__(self, "prompts", prompts)
        if self.endpoint not in _ENDPOINTS:
            raise ConfigError(
                f"endpoint must be 'completion' or 'chat', got {self.endpoint!r}", field="endpoint"
            )
        _check_positive("ttft_slo_ms", self.ttft_slo_ms)
        _check_positive("tpot_slo_ms", self.tpot_slo_ms)
        if not _int(self.seed):
            raise ConfigError(f"seed must be an int, got {self.seed!r}", field="seed")
        if not isinstance(self.params, Mapping):
            raise ConfigError(f"params must be a mapping, got {self.params!r}", field="params")
        reserved = sorted(set(self.params) & _RESERVED_PARAMS)
        if reserved:
            raise ConfigError(
                f"params may not set {', '.join(map(repr, reserved))}: the benchmark sets the "
                "prompt and the output length itself (use output_tokens, BenchPrompt.max_tokens "
                "or prompts)",
                field="params",
            )
        object.__setattr__(self, "params", dict(self.params))
        if not _int(self.prefix_tokens) or self.prefix_tokens < 0:
            raise ConfigError(
                f"prefix_tokens must be an int >= 0, got {self.prefix_tokens!r}",
                field="prefix_tokens",
            )
        if (
            not isinstance(self.range_ratio, int | float)
            or isinstance(self.range_ratio, bool)
            or not 0.0 <= self.range_ratio < 1.0
        ):
            raise ConfigError(
                f"range_ratio must be a number in [0, 1), got {self.range_ratio!r}",
                field="range_ratio",
            )
        if self.conversations is not None:
            conversations = tuple(self.conversations)
            if not conversations or not all(isinstance(c, Conversation) for c in conversations):
                raise ConfigError(
                    "conversations must be a non-empty sequence of Conversation "
                    "(load_sharegpt_conversations reads them from a file)",
                    field="conversations",
                )
            if self.prompts is not None:
                raise ConfigError("give prompts or conversations, not both", field="conversations")
            if self.rate is not None:
                raise ConfigError(
                    "conversations run at fixed concurrency (each turn waits for the last "
                    "answer): leave rate out",
                    field="conversations",
                )
            object.__setattr__(self, "conversations", conversations)
        if self.rate is not None and math.isinf(self.rate) and self.requests is None:
            # Every request is due at once: only a count can end the sending.
            raise ConfigError(
                "rate=inf sends every request at once; give requests (a count) with it",
                field="rate",
            )

    @property
    def mode(self) -> Literal["concurrency", "rate"]:
        """``"rate"`` when requests arrive at ``rate``, else ``"concurrency"``."""
        return "concurrency" if self.rate is None else "rate"

    @property
    def workers(self) -> int | None:
        """The most requests in flight at once: ``concurrency`` (1 by default without a
        rate), or ``None`` (no cap) for a rate without a concurrency."""
        if self.concurrency is not None:
            return self.concurrency
        return 1 if self.rate is None else None

    def describe(self) -> str:
        """One line: load, length and prompts, for summaries and plot titles."""
        if self.rate is None:
            load = f"concurrency {self.workers}"
        else:
            rate = "inf" if math.isinf(self.rate) else f"{self.rate:g}"
            load = f"rate {rate} req/s, burstiness {self.burstiness:g}"
            if self.concurrency is not None:
                load += f", at most {self.concurrency} in flight"
        stop = []
        if self.requests is not None:
            stop.append(f"{self.requests} requests")
        if self.duration is not None:
            stop.append(f"{self.duration:g} s")
        warm = f" (+{self.warmup} warm-up)" if self.warmup else ""
        if self.conversations is not None:
            turns = sum(len(c.turns) for c in self.conversations)
            prompts = f"{len(self.conversations)} conversations ({turns} turns), multi-turn"
        elif self.prompts is None:
            spread = f" (+-{self.range_ratio:.0%})" if self.range_ratio else ""
            prefix = f"{self.prefix_tokens} shared + " if self.prefix_tokens else ""
            prompts = (
                f"synthetic {prefix}{self.input_tokens} in / {self.output_tokens} out "
                f"tokens{spread}"
            )
        else:
            prompts = f"{len(self.prompts)} given prompts"
        return f"{load}; {' or '.join(stop)}{warm}; {prompts}; /{self.endpoint}"

    def to_json(self) -> dict[str, Any]:
        """The settings as plain JSON values (given prompts are summarised by their count)."""
        out: dict[str, Any] = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("prompts", "conversations")
        }
        out["params"] = dict(self.params)
        if self.rate is not None and math.isinf(self.rate):
            out["rate"] = "inf"  # JSON has no infinity
        out["prompts"] = "synthetic" if self.prompts is None else f"{len(self.prompts)} given"
        out["conversations"] = None if self.conversations is None else len(self.conversations)
        out["mode"] = self.mode
        return out


def load_prompts_jsonl(path: str | os.PathLike[str]) -> tuple[BenchPrompt, ...]:
    """Read prompts from a JSONL file: one JSON object per line, blank lines skipped.

    ```
    {"prompt": "Once upon a time", "max_tokens": 64}
    {"prompt": [1, 15043, 3186]}
    {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 128}
    ```

    Raises ``PromptFileError`` naming the file and the line of the first bad line.
    Blocking (reads the file): from async code use ``anyio.to_thread.run_sync``.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PromptFileError(path, None, f"cannot read the file ({exc.strerror or exc})") from exc
    return parse_prompts_jsonl(data.splitlines(), path)


def parse_prompts_jsonl(
    lines: Iterable[bytes | str], path: str | os.PathLike[str] = "<prompts>"
) -> tuple[BenchPrompt, ...]:
    """``load_prompts_jsonl`` on lines already in memory (``path`` only names them)."""
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = msgspec.json.decode(line)
        except msgspec.DecodeError as exc:
            raise PromptFileError(path, number, f"not valid JSON ({exc})") from exc
        prompts.append(_prompt_from(item, path, number))
    if not prompts:
        raise PromptFileError(path, None, "no prompts in the file")
    return tuple(prompts)


def _prompt_from(item: Any, path: str | os.PathLike[str], number: int) -> BenchPrompt:
    if not isinstance(item, dict):
        raise PromptFileError(path, number, f"expected a JSON object, got {type(item).__name__}")
    has_prompt, has_messages = "prompt" in item, "messages" in item
    if has_prompt == has_messages:
        raise PromptFileError(path, number, 'needs exactly one of "prompt" or "messages"')
    max_tokens = item.get("max_tokens")
    if max_tokens is not None and not _positive_int(max_tokens):
        raise PromptFileError(path, number, f'"max_tokens" must be an int >= 1, got {max_tokens!r}')
    if has_prompt:
        prompt = item["prompt"]
        if isinstance(prompt, list) and prompt and all(_int(t) for t in prompt):
            return BenchPrompt(tuple(prompt), max_tokens=max_tokens)
        if not isinstance(prompt, str) or not prompt:
            raise PromptFileError(
                path, number, '"prompt" must be a non-empty string or list of token ids'
            )
        return BenchPrompt(prompt, max_tokens=max_tokens)
    messages = item["messages"]
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) and "role" in m for m in messages)
    ):
        raise PromptFileError(
            path, number, '"messages" must be a non-empty list of objects with a "role"'
        )
    return BenchPrompt(messages=tuple(messages), max_tokens=max_tokens)


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: object) -> bool:
    return _int(value) and value >= 1  # type: ignore[operator]


def _check_positive(name: str, value: float | None, *, allow_inf: bool = False) -> None:
    if value is None:
        return
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and value > 0
        and (allow_inf or math.isfinite(value))
        and not math.isnan(value)
    )
    if not ok:
        allowed = "a number > 0 (math.inf allowed)" if allow_inf else "a finite number > 0"
        raise ConfigError(f"{name} must be {allowed}, got {value!r}", field=name)
