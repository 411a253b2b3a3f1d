"""Synthetic prompts of a given length, and the arrival process of rate-driven load.

Input lengths: against a server that answers ``/tokenize`` (llama-server), ``/completion``
prompts are token-id lists of exactly ``input_tokens`` ids, drawn (seeded) from the ids of
a fixed English word list; the server counts them as sent (plus a BOS token if the model
adds one). Chat prompts are text: ``round(input_tokens / r)`` words, where ``r`` is the
tokens per word measured with ``/tokenize``, so their length is approximate, and the chat
template adds its own tokens. Without ``/tokenize`` both are text of ``input_tokens`` words
(about one token per word for common English words in most vocabularies). Each record
keeps the server's own count (``prompt_tokens``).

A shared prefix (``prefix_tokens``) is drawn once per run from its own seeded stream and put
in front of every synthetic prompt; ``range_ratio`` samples each prompt's input and output
lengths uniformly in ``[n * (1 - r), n * (1 + r)]`` (at least 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

from collections.abc import Iterator, Sequence

from .._errors import ConfigError
from ._config import BenchConfig, BenchPrompt

__all__ = ["WORDS", "PromptSource", "inter_arrival_times"]

_WORD_TEXT = """the of and to in is was he for it with as his on be at by had are but from or
    have an they which one you were her all she there would their we him been has when who
    will more no if out so said what up its about into than them can only other new some
    could time these two may then do first any my now such like our over man me even most
    made after also did many before must through back years where much your way well down
    should because each just those people how too little state good very make world still
    own see men work long get here between both life being under never day same another know
    while last might us great old year off come since against go came right used take three
    small house water light city story cat dog river tree night road book"""

#: Common English words, each one token (with its leading space) in most vocabularies.
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())


def inter_arrival_times(
    rate: float, burstiness: float, rng: np.random.Generator
) -> Iterator[float]:
    """Endless seeded gaps (s) between request arrivals, with mean ``1/rate``.

    Each gap is drawn from a gamma distribution with shape ``burstiness`` and scale
    ``1/(rate * burstiness)``, as vLLM's ``benchmark_serving`` draws them: burstiness 1 is
    a Poisson process (exponential gaps); the coefficient of variation is
    ``1/sqrt(burstiness)``. An infinite rate gives gaps of 0 (everything at once).
    """
    import numpy as np

    if rate <= 0 or burstiness <= 0:
        raise ConfigError("rate and burstiness must be > 0", field="rate")
    if np.isinf(rate):
        while True:
            yield 0.0
    scale = 1.0 / (rate * burstiness)
    while True:
        # Drawn in blocks: one numpy call per 1,024 arrivals, not per arrival.
        yield from (float(x) for x in rng.gamma(burstiness, scale, size=1024))


class PromptSource:
    """The prompts of a run, in order: given ones cycled, or synthetic ones drawn lazily.

    ``vocabulary`` is the token ids of ``WORDS`` (from the server's ``/tokenize``), or
    ``None`` when the server cannot tokenize. ``next()`` is cheap, so a run by duration
    draws as many as it needs.
    """

    def __init__(self, config: BenchConfig, vocabulary: Sequence[int] | None) -> None:
        import numpy as np

        self._config = config
        self._rng = np.random.default_rng([config.seed, 1])  # apart from the arrivals' stream
        self._given = config.prompts
        self._count = 0
        self._ids = np.asarray(sorted(set(vocabulary)), dtype=np.int64) if vocabulary else None
        # Measured tokens per word of WORDS (1.0 assumed when the server cannot say).
        self.tokens_per_word = len(vocabulary) / len(WORDS) if vocabulary else 1.0
        # The shared prefix: its own stream, so it is the same whatever the prompts draw.
        prefix_rng = np.random.default_rng([config.seed, 2])
        self._prefix_ids: tuple[int, ...] = ()
        self._prefix_text = ""
        if config.prefix_tokens:
            if self._ids is not None:
                ids = prefix_rng.choice(self._ids, size=config.prefix_tokens)
                self._prefix_ids = tuple(int(i) for i in ids)
            words = prefix_rng.integers(0, len(WORDS), size=self._words(config.prefix_tokens))
            self._prefix_text = " ".join(WORDS[int(i)] for i in words) + " "

    @property
    def exact(self) -> bool:
        """Synthetic /completion prompts have exactly ``input_tokens`` ids."""
        return (
            self._given is None and self._ids is not None and self._config.endpoint == "completion"
        )

    def describe(self) -> str:
        """How input lengths come about, for the report."""
        config = self._config
        if self._given is not None:
            return f"{len(self._given)} given prompts, used in order and cycled"
        extra = ""
        if config.prefix_tokens:
            extra += f"; the same {config.prefix_tokens}-token prefix in front of each"
        if config.range_ratio:
            extra += f"; lengths sampled within +-{config.range_ratio:.0%}"
        if self.exact:
            return (
                f"exact: {config.input_tokens} token ids per prompt drawn from the server's "
                f"/tokenize ids of a word list (the server may add a BOS token){extra}"
            )
        if self._ids is not None:
            return (
                f"approximate: {self._words(config.input_tokens)} words per prompt at a "
                f"measured {self.tokens_per_word:.2f} tokens per word (plus the chat "
                f"template){extra}"
            )
        return (
            f"approximate: {config.input_tokens} common English words per prompt "
            f"(~1 token each; the server did not answer /tokenize){extra}"
        )

    def _words(self, tokens: int) -> int:
        return max(1, round(tokens / self.tokens_per_word))

    def _length(self, n: int) -> int:
        ratio = self._config.range_ratio
        if not ratio:
            return n
        low, high = max(1, round(n * (1 - ratio))), max(1, round(n * (1 + ratio)))
        return int(self._rng.integers(low, high + 1))

    def next(self) -> BenchPrompt:
        """The next prompt of the run."""
        index, self._count = self._count, self._count + 1
        given = self._given
        if given is not None:
            return given[index % len(given)]
        config = self._config
        n_in = self._length(config.input_tokens)
        n_out = self._length(config.output_tokens)
        if self.exact:
            assert self._ids is not None
            ids = self._rng.choice(self._ids, size=n_in)
            return BenchPrompt(self._prefix_ids + tuple(int(i) for i in ids), max_tokens=n_out)
        words = self._rng.integers(0, len(WORDS), size=self._words(n_in))
        text = self._prefix_text + " ".join(WORDS[int(i)] for i in words)
        if config.endpoint == "chat":
            return BenchPrompt(messages=({"role": "user", "content": text},), max_tokens=n_out)
        return BenchPrompt(text, max_tokens=n_out)
