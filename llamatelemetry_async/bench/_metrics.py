"""What a benchmark measured: one ``RequestRecord`` per request, and the metrics made of them.

Every function here is pure: records in, numbers out. Times are seconds since the start of
the run (``time.perf_counter``); statistics of latencies are in milliseconds.

Memory: a record keeps every chunk's arrival time in an ``array('d')``, 8 bytes a chunk
(a tuple of floats would take 32): 100,000 requests of 128 tokens hold about 100 MB of
chunk times. The metrics are computed with numpy on flat arrays, never per-gap Python
floats.
"""

from __future__ import annotations

import array
import dataclasses
import itertools
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "FORMULAS",
    "BenchMetrics",
    "RequestRecord",
    "Stats",
    "Timeline",
    "compute_metrics",
    "max_in_flight",
    "pooled_itl",
    "throughput_timeline",
]

#: How each metric is computed, as the summary and the JSON state it.
FORMULAS: dict[str, str] = {
    "ttft": "TTFT = t(first content chunk) - t(send), per completed request with a token",
    "tpot": (
        "TPOT = (E2E - TTFT) / (n - 1) per request, n = output tokens of the request (n > 1 only)"
    ),
    "itl": "ITL = t(chunk k+1) - t(chunk k): every gap of every completed request, pooled",
    "e2e": "E2E = t(stream end) - t(send), per completed request",
    "duration": (
        "duration = last stream end - first send, over the measured requests (failed included)"
    ),
    "request_throughput": "requests/s = completed requests / duration",
    "output_throughput": "output tokens/s = sum of n over completed requests / duration",
    "total_token_throughput": (
        "total tokens/s = sum of (input + output tokens) over completed requests / duration"
    ),
    "goodput": (
        "goodput = completed requests with a token, TTFT <= ttft_slo and TPOT <= tpot_slo "
        "(one token: no TPOT to miss) / duration"
    ),
    "percentiles": "pXX: linear interpolation between closest ranks (numpy.percentile's default)",
    "server_tpot": (
        "server TPOT = llama.cpp timings.predicted_per_token_ms = predicted_ms / predicted_n"
    ),
    "ttft_minus_server_prompt": (
        "TTFT - prompt_ms = client TTFT minus llama.cpp timings.prompt_ms (HTTP + queueing)"
    ),
    "prompt_cache_hit_rate": (
        "prompt cache hit rate = sum cache_n / sum (cache_n + prompt_n), llama.cpp timings"
    ),
}


@dataclasses.dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request of a run, as the client saw it (seconds since the run started).

    ``send``: just before the request was sent; ``first_byte``: when the response head
    arrived; ``chunk_times``: when each content chunk arrived (llama-server streams one
    token per chunk), an ``array('d')`` (any sequence of floats given is turned into
    one); ``end``: when the stream ended (or failed). ``output_tokens`` is the
    server's count (``usage``) when it gave one, else the number of chunks.
    ``server_*`` are llama.cpp's own ``timings`` of the request (``server_prompt_n``: prompt
    tokens it processed, ``server_cache_n``: prompt tokens it took from its cache).
    ``scheduled`` is when a rate-driven request was due (``None`` with fixed concurrency).
    ``error`` is the exception's type and message for a failed request. ``server`` names
    the server that answered (an engine's server name, else ``None``); ``conversation``
    and ``turn`` (from 0) place a multi-turn request in its conversation.
    """

    index: int
    send: float
    end: float
    first_byte: float | None = None
    # Not hashed: an array is mutable (records still compare equal by value).
    chunk_times: Sequence[float] = dataclasses.field(default=(), hash=False)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    requested_tokens: int | None = None
    scheduled: float | None = None
    warmup: bool = False
    finish_reason: str | None = None
    server_prompt_ms: float | None = None
    server_predicted_ms: float | None = None
    server_predicted_per_second: float | None = None
    error: str | None = None
    server_prompt_n: int | None = None
    server_cache_n: int | None = None
    server_predicted_n: int | None = None
    server_predicted_per_token_ms: float | None = None
    server: str | None = None
    conversation: int | None = None
    turn: int | None = None

    def __post_init__(self) -> None:
        times = self.chunk_times
        if not (isinstance(times, array.array) and times.typecode == "d"):
            object.__setattr__(self, "chunk_times", array.array("d", times))

    @property
    def ok(self) -> bool:
        """The request completed without an error."""
        return self.error is None

    @property
    def ttft(self) -> float | None:
        """Time to first token (s): first content chunk minus send; ``None`` without one."""
        return self.chunk_times[0] - self.send if self.chunk_times else None

    @property
    def e2e(self) -> float:
        """End-to-end latency (s): stream end minus send."""
        return self.end - self.send

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (s): ``(E2E - TTFT) / (n - 1)``.

        ``None`` when there is no first token or only one token.
        """
        ttft = self.ttft
        if ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - ttft) / (self.output_tokens - 1)

    @property
    def itl(self) -> list[float]:
        """Inter-token latencies (s): every gap between consecutive chunks."""
        times = self.chunk_times
        return [b - a for a, b in itertools.pairwise(times)]

    def to_json(self) -> dict[str, Any]:
        """The record as JSON values (times rounded to the microsecond)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("send", "end", "first_byte", "scheduled"):
            if out[name] is not None:
                out[name] = round(out[name], 6)
        out["chunk_times"] = [round(t, 6) for t in self.chunk_times]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestRecord:
        """A record from ``to_json()``'s output."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        return cls(**values)


@dataclasses.dataclass(frozen=True, slots=True)
class Stats:
    """Summary statistics of one metric; every field is ``None`` when there are no values.

    ``std`` is the population standard deviation; percentiles interpolate linearly
    between closest ranks (numpy's default).
    """

    count: int
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, values: Iterable[float], scale: float = 1.0) -> Stats:
        """Statistics of ``values`` times ``scale`` (1000 turns seconds into ms).

        ``values`` may be a numpy array (used as it is, without a Python list).
        """
        import numpy as np

        if not isinstance(values, np.ndarray):
            values = list(values)
        data = np.asarray(values, dtype=np.float64) * scale
        if data.size == 0:
            return cls(0)
        p50, p90, p99 = (float(x) for x in np.percentile(data, [50, 90, 99]))
        return cls(
            count=int(data.size),
            mean=float(data.mean()),
            std=float(data.std()),
            min=float(data.min()),
            p50=p50,
            p90=p90,
            p99=p99,
            max=float(data.max()),
        )

    def to_json(self) -> dict[str, Any]:
        """The fields as a dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True)
class BenchMetrics:
    """The metrics of a run (``FORMULAS`` says how each is computed).

    Latency statistics are in milliseconds: ``ttft_ms``, ``tpot_ms``, ``itl_ms``,
    ``e2e_ms``, over completed measured requests (warm-up left out). Throughputs are per
    second of ``duration_s``; they are ``None`` when nothing was measured. ``goodput`` is
    ``None`` unless an SLO was given. ``server_prompt_ms``,
    ``server_predicted_per_second`` and ``server_predicted_per_token_ms`` summarise
    llama.cpp's own timings of each request, beside the client's: ``tpot_ms`` against
    ``server_predicted_per_token_ms``, and ``ttft_minus_server_prompt_ms`` (TTFT less
    llama.cpp's prompt time: HTTP, queueing and the first token's sampling).
    ``prompt_cache_hit_rate``: prompt tokens llama.cpp took from its cache over all prompt
    tokens (``cache_n / (cache_n + prompt_n)`` summed over requests), ``None`` without timings.
    """

    requests_completed: int
    requests_failed: int
    duration_s: float
    input_tokens: int
    output_tokens: int
    request_throughput: float | None
    output_throughput: float | None
    total_token_throughput: float | None
    goodput: float | None
    goodput_requests: int | None
    max_in_flight: int
    ttft_ms: Stats
    tpot_ms: Stats
    itl_ms: Stats
    e2e_ms: Stats
    server_prompt_ms: Stats
    server_predicted_per_second: Stats
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    server_predicted_per_token_ms: Stats = Stats(0)
    ttft_minus_server_prompt_ms: Stats = Stats(0)
    prompt_cache_hit_rate: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The metrics as a dict (statistics as nested dicts)."""
        return dataclasses.asdict(self)


def compute_metrics(
    records: Sequence[RequestRecord],
    *,
    ttft_slo_ms: float | None = None,
    tpot_slo_ms: float | None = None,
) -> BenchMetrics:
    """The metrics of ``records``; warm-up records are left out of everything.

    Failed requests count in ``requests_failed``, ``duration_s`` and ``max_in_flight`` only.
    Input tokens are the server's counts (requests without one add nothing).
    """
    measured = [r for r in records if not r.warmup]
    done = [r for r in measured if r.ok]
    duration = (max(r.end for r in measured) - min(r.send for r in measured)) if measured else 0.0
    output_tokens = sum(r.output_tokens for r in done)
    input_tokens = sum(r.prompt_tokens or 0 for r in done)

    def per_second(value: float) -> float | None:
        return value / duration if duration > 0 else None

    goodput_requests: int | None = None
    if ttft_slo_ms is not None or tpot_slo_ms is not None:
        goodput_requests = sum(1 for r in done if _meets(r, ttft_slo_ms, tpot_slo_ms))
    ttfts = [t for r in done if (t := r.ttft) is not None]
    tpots = [t for r in done if (t := r.tpot) is not None]
    return BenchMetrics(
        requests_completed=len(done),
        requests_failed=len(measured) - len(done),
        duration_s=duration,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        request_throughput=per_second(len(done)),
        output_throughput=per_second(output_tokens),
        total_token_throughput=per_second(input_tokens + output_tokens),
        goodput=None if goodput_requests is None else per_second(goodput_requests),
        goodput_requests=goodput_requests,
        max_in_flight=max_in_flight(measured),
        ttft_ms=Stats.of(ttfts, 1000.0),
        tpot_ms=Stats.of(tpots, 1000.0),
        itl_ms=Stats.of(pooled_itl(done), 1000.0),  # one numpy array: millions of gaps
        e2e_ms=Stats.of((r.e2e for r in done), 1000.0),
        server_prompt_ms=Stats.of(
            r.server_prompt_ms for r in done if r.server_prompt_ms is not None
        ),
        server_predicted_per_second=Stats.of(
            r.server_predicted_per_second for r in done if r.server_predicted_per_second is not None
        ),
        ttft_slo_ms=ttft_slo_ms,
        tpot_slo_ms=tpot_slo_ms,
        server_predicted_per_token_ms=Stats.of(
            r.server_predicted_per_token_ms
            for r in done
            if r.server_predicted_per_token_ms is not None
        ),
        ttft_minus_server_prompt_ms=Stats.of(
            t * 1000.0 - r.server_prompt_ms
            for r in done
            if (t := r.ttft) is not None and r.server_prompt_ms is not None
        ),
        prompt_cache_hit_rate=_cache_hit_rate(done),
    )


def _cache_hit_rate(records: Sequence[RequestRecord]) -> float | None:
    timed = [r for r in records if r.server_prompt_n is not None and r.server_cache_n is not None]
    total = sum((r.server_prompt_n or 0) + (r.server_cache_n or 0) for r in timed)
    return sum(r.server_cache_n or 0 for r in timed) / total if total else None


def _meets(record: RequestRecord, ttft_slo_ms: float | None, tpot_slo_ms: float | None) -> bool:
    ttft = record.ttft
    if ttft is None:
        return False  # no token, nothing served: not good, whichever limits were given
    if ttft_slo_ms is not None and ttft * 1000.0 > ttft_slo_ms:
        return False
    if tpot_slo_ms is not None:
        tpot = record.tpot  # one token only: no TPOT to miss (as vLLM counts it)
        if tpot is not None and tpot * 1000.0 > tpot_slo_ms:
            return False
    return True


def pooled_itl(records: Sequence[RequestRecord]) -> npt.NDArray[np.float64]:
    """Every gap (s) between consecutive chunks of each record, pooled in one array.

    Gaps never cross from one record to the next; a record with fewer than two chunks
    adds none.
    """
    import numpy as np

    flat, counts = _flat_chunk_times(records)
    if flat.size < 2:
        return np.empty(0, dtype=np.float64)
    gaps = np.diff(flat)
    # The gap ending at each record's first chunk spans two records: drop it.
    firsts = np.cumsum(counts) - counts
    keep = np.ones(gaps.size, dtype=bool)
    keep[firsts[(firsts > 0) & (counts > 0)] - 1] = False
    return gaps[keep]


def _flat_chunk_times(
    records: Sequence[RequestRecord],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Every record's chunk times end to end, and how many each record has."""
    import numpy as np

    counts = np.fromiter((len(r.chunk_times) for r in records), dtype=np.int64, count=len(records))
    # Zero-copy views of each record's array('d'), joined once.
    parts = [
        np.frombuffer(cast("array.array[float]", r.chunk_times), dtype=np.float64)
        for r in records
        if r.chunk_times
    ]
    flat = np.concatenate(parts) if parts else np.empty(0, dtype=np.float64)
    return flat, counts


def max_in_flight(records: Iterable[RequestRecord]) -> int:
    """The most requests between send and end at one instant.

    A request that ends at the very instant another is sent does not overlap it.
    """
    # Ends sort before sends at the same time (0 < 1): back-to-back is not overlap.
    events = sorted(
        [(r.send, 1) for r in records] + [(r.end, 0) for r in records],
    )
    running = peak = 0
    for _, kind in events:
        running += 1 if kind else -1
        peak = max(peak, running)
    return peak


@dataclasses.dataclass(frozen=True, slots=True)
class Timeline:
    """Throughput over time, in bins of ``bin_s`` seconds starting at ``starts``.

    ``output_tokens_per_s``: chunks arriving in the bin / ``bin_s`` (failed requests'
    chunks too: what the server delivered);
    ``requests_per_s``: requests ending (completed) in the bin / ``bin_s``;
    ``in_flight``: requests between send and end at the bin's middle.
    """

    bin_s: float
    starts: tuple[float, ...]
    output_tokens_per_s: tuple[float, ...]
    requests_per_s: tuple[float, ...]
    in_flight: tuple[int, ...]


def throughput_timeline(
    records: Sequence[RequestRecord], bin_s: float | None = None, *, bins: int = 40
) -> Timeline:
    """Bin the measured requests' chunks and completions over the run.

    ``bin_s`` defaults to the measured span divided into ``bins`` bins (at least 10 ms).
    """
    import numpy as np

    measured = [r for r in records if not r.warmup]
    if not measured:
        return Timeline(bin_s or 1.0, (), (), (), ())
    t0 = min(r.send for r in measured)
    t1 = max(r.end for r in measured)
    width = bin_s if bin_s is not None else max((t1 - t0) / bins, 0.01)
    count = max(1, math.ceil((t1 - t0) / width))
    edges = t0 + width * np.arange(count + 1)
    chunks = _flat_chunk_times(measured)[0]
    ends = np.asarray([r.end for r in measured if r.ok], dtype=np.float64)
    # The last edge closes the last bin, so t1 itself falls inside it.
    edges[-1] = max(edges[-1], t1)
    token_counts = np.histogram(chunks, bins=edges)[0]
    end_counts = np.histogram(ends, bins=edges)[0]
    sends = np.sort(np.asarray([r.send for r in measured]))
    all_ends = np.sort(np.asarray([r.end for r in measured]))
    middles = edges[:-1] + width / 2
    running = np.searchsorted(sends, middles, side="right") - np.searchsorted(
        all_ends, middles, side="right"
    )
    return Timeline(
        bin_s=width,
        starts=tuple(float(x) for x in edges[:-1]),
        output_tokens_per_s=tuple(float(x) / width for x in token_counts),
        requests_per_s=tuple(float(x) / width for x in end_counts),
        in_flight=tuple(int(x) for x in running),
    )
