"""The bench's figures against llama.cpp's own clock, on a real model on the CPU.

At concurrency 1 with prompt caching off, the client's TPOT ((E2E - TTFT) / (n - 1), from
chunk arrival times) and llama-server's ``timings.predicted_per_token_ms`` (its decode time
over its tokens) measure the same decode steps with two clocks in two processes; they agree
within 5% per request and on average, or one of the two is measuring something else (a
TPOT over all n tokens, or one counting TTFT in, is off by TTFT / n: here at least a whole
prompt's processing time; the test checks that it misses the bound). TTFT minus
llama.cpp's ``prompt_ms`` is what HTTP, queueing and the first token's sampling add:
reported, positive, and small against TTFT at concurrency 1. At higher concurrency both
figures are reported side by side.

A measurement, run once on asyncio: the bench's behaviour on every backend is covered by
the replay-server tests, and each run here costs seconds of real decoding.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llamatelemetry_async.bench import BenchConfig, SweepConfig, run_sweep
from llamatelemetry_async.testing import smollm2_model
from llamatelemetry_async.testing._server import RunningServer, run_llama_server


@pytest.fixture
def _way() -> str:
    """One way of running (conftest's ``_way`` gives three)."""
    return "asyncio"


@pytest.fixture(scope="module")
def smollm2_url() -> Iterator[str]:
    # --no-repack: some llama.cpp builds crash repacking Q4_1 on AVX-512 CPUs.
    server: RunningServer
    with run_llama_server(
        smollm2_model(), args=["-np", "2", "-c", "4096", "--no-repack", "--metrics"]
    ) as server:
        yield server.url


@pytest.mark.anyio
async def test_tpot_agrees_with_llama_cpp_within_5_percent_at_concurrency_1(
    smollm2_url: str,
) -> None:
    base = BenchConfig(
        requests=2,
        warmup=1,
        # A long prompt: its processing outweighs a few decode steps, so a TPOT that took
        # TTFT in would miss the bound (checked below).
        input_tokens=128,
        output_tokens=24,
        params={"cache_prompt": False},  # every prompt processed: prompt_ms is all of it
    )
    result = await run_sweep(
        smollm2_url, SweepConfig(base, concurrencies=(1, 2), warmup=1), progress=False
    )
    one, two = result.points
    records = [r for r in one.records if not r.warmup]
    assert len(records) == 2
    for r in records:
        assert r.tpot is not None
        assert r.server_predicted_per_token_ms is not None
        assert r.server_cache_n == 0  # nothing from the prompt cache
        assert r.tpot * 1000 == pytest.approx(r.server_predicted_per_token_ms, rel=0.05)
    m = one.metrics
    assert m.tpot_ms.mean is not None
    assert m.server_predicted_per_token_ms.mean is not None
    assert m.tpot_ms.mean == pytest.approx(m.server_predicted_per_token_ms.mean, rel=0.05)
    # TTFT - prompt_ms: positive (TTFT holds the prompt's processing) and a small part of it.
    gap = m.ttft_minus_server_prompt_ms
    assert gap.count == 2
    assert gap.min is not None
    assert gap.min > 0
    assert m.ttft_ms.mean is not None
    assert gap.mean is not None
    assert gap.mean < 0.5 * m.ttft_ms.mean
    # The bound tells right from wrong: a TPOT that took TTFT in (E2E / n) misses it.
    wrong = sum(r.e2e / r.output_tokens for r in records) / len(records) * 1000
    assert wrong != pytest.approx(m.server_predicted_per_token_ms.mean, rel=0.05)

    # Concurrency 2: both clocks side by side, in the metrics, the summary and the sweep.
    assert two.metrics.max_in_flight == 2
    assert two.metrics.server_predicted_per_token_ms.count == 2
    assert two.metrics.ttft_minus_server_prompt_ms.count == 2
    assert "timings.predicted_per_token_ms" in two.summary_text()
    rows = result.rows()
    assert [row["server_predicted_per_token_ms"]["count"] for row in rows] == [2, 2]
    assert all(row["tpot_ms"]["mean"] is not None for row in rows)
